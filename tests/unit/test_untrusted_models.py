"""Model folders and checkpoints from someone else: nothing in them runs, nothing points outside.

Each hostile input is built from a real tiny export (a DiT and a VAE of a few thousand
parameters): pickles that would run a command (the command only touches a marker file, whose
absence proves nothing ran), JSON naming paths outside the folder, and safetensors files whose
header lies about their bytes. Every refusal must name the file.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch

from sora_lightning.models.dit import DiT, DiTConfig
from sora_lightning.models.vae import VAEConfig, VideoVAE
from sora_lightning.train.checkpoint import AtomicCheckpointIO, write_manifest
from sora_lightning.train.export import (
    _load_dcp,
    _load_zero3,
    consolidate_checkpoint,
    export_bundle,
)
from sora_lightning.train.weights import (
    UntrustedModelError,
    load_dit,
    load_vae,
    save_module,
    torch_load_safe,
)

TINY_DIT = dict(hidden_size=32, depth=1, num_heads=2, text_dim=16, patch_size=(1, 2, 2))
TINY_VAE = dict(base_channels=8, channel_mults=(1, 2), temporal_downsample=(True,), norm_groups=4)


class RunsCommand:
    """Unpickling this runs `touch marker`: what a hostile checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def export(tmp_path: Path) -> Path:
    """A real, loadable export folder (dit + vae, vae_dir '.')."""
    dit_dir, vae_dir = tmp_path / "dit", tmp_path / "vae"
    dit_config, vae_config = DiTConfig(**TINY_DIT), VAEConfig(**TINY_VAE)
    meta = {"vae_dir": str(vae_dir), "latent_mean": 0.0, "latent_std": 1.0}
    save_module(DiT(dit_config), dit_config, dit_dir, "dit", {"meta": meta})
    save_module(VideoVAE(vae_config), vae_config, vae_dir, "vae")
    return export_bundle(dit_dir, vae_dir, tmp_path / "export")


def set_vae_dir(folder: Path, value: str) -> None:
    meta = json.loads((folder / "dit.json").read_text())
    meta["meta"]["vae_dir"] = value
    (folder / "dit.json").write_text(json.dumps(meta))


# --- pickle: nothing runs -------------------------------------------------------------------


def test_pickled_code_in_a_checkpoint_is_refused_everywhere(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    hostile = tmp_path / "step=1.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": RunsCommand(marker)}, hostile)
    write_manifest(hostile, {"global_step": 1})  # even a checkpoint that "verifies"
    loaders = {
        "torch_load_safe": lambda: torch_load_safe(hostile),
        "resume (AtomicCheckpointIO)": lambda: AtomicCheckpointIO().load_checkpoint(hostile),
        "export --checkpoint": lambda: consolidate_checkpoint(hostile),
    }
    for where, load in loaders.items():
        with pytest.raises(UntrustedModelError, match="holds pickled objects") as refused:
            load()
        assert str(hostile) in str(refused.value), where
        assert "os.system" in str(refused.value) or "posix.system" in str(refused.value), where
    assert not marker.exists(), "the pickle ran"


def test_a_checkpoint_of_plain_data_still_loads(tmp_path: Path) -> None:
    path = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "global_step": 3}, path)
    assert torch_load_safe(path)["global_step"] == 3


def test_damaged_checkpoint_is_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.ckpt"
    path.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(UntrustedModelError, match=f"{path} is not a readable torch checkpoint"):
        torch_load_safe(path)


def test_dcp_metadata_with_code_is_refused(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    folder = tmp_path / "dcp"
    state = {"state_dict": {"ema.w": torch.arange(6.0).reshape(2, 3)}}
    dcp.save(state, storage_writer=dcp.FileSystemWriter(folder), no_dist=True)
    loaded, _ = _load_dcp(folder)  # the real metadata passes the restricted unpickler
    assert torch.equal(loaded["ema.w"], state["state_dict"]["ema.w"])

    marker = tmp_path / "ran"
    (folder / ".metadata").write_bytes(pickle.dumps(RunsCommand(marker)))
    with pytest.raises(UntrustedModelError, match=r"\.metadata is not plain DCP metadata"):
        _load_dcp(folder)
    assert not marker.exists()


def test_deepspeed_folder_with_code_is_refused(tmp_path: Path) -> None:
    """DeepSpeed's own loader unpickles without restriction; ours forces weights_only."""
    pytest.importorskip("deepspeed")
    folder, marker = tmp_path / "zero3", tmp_path / "ran"
    (folder / "checkpoint").mkdir(parents=True)
    (folder / "latest").write_text("checkpoint")
    hostile = {"optimizer_state_dict": {"zero_stage": RunsCommand(marker)}}
    for name in (
        "zero_pp_rank_0_mp_rank_00_model_states.pt",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
    ):
        torch.save(hostile, folder / "checkpoint" / name)
    with pytest.raises(UntrustedModelError, match="holds pickled objects") as refused:
        _load_zero3(folder)
    assert "_states.pt" in str(refused.value)
    assert not marker.exists()
    (folder / "latest").write_text("../..")
    with pytest.raises(UntrustedModelError, match="not a folder inside"):
        _load_zero3(folder)


# --- JSON paths stay inside the folder ------------------------------------------------------


def test_export_loads_with_its_own_vae(export: Path) -> None:
    _, meta = load_dit(export)
    assert meta["meta"]["vae_dir"] == str(export.resolve())
    load_vae(meta["meta"]["vae_dir"])


@pytest.mark.parametrize("value", ["../../etc/x", "..", "/etc", "sub/../../x"])
def test_vae_dir_outside_an_export_is_refused(export: Path, value: str) -> None:
    set_vae_dir(export, value)
    with pytest.raises(UntrustedModelError, match="points outside") as refused:
        load_dit(export)
    assert str(export / "dit.json") in str(refused.value)


def test_symlink_out_of_an_export_is_refused(export: Path, tmp_path: Path) -> None:
    (export / "vae_link").symlink_to(tmp_path / "vae")
    set_vae_dir(export, "vae_link")
    with pytest.raises(UntrustedModelError, match="points outside"):
        load_dit(export)


def test_training_output_keeps_its_absolute_vae_path(tmp_path: Path, export: Path) -> None:
    """A run's final/ has no VAE of its own: sora-train wrote the run VAE's absolute path."""
    _, meta = load_dit(tmp_path / "dit")
    assert meta["meta"]["vae_dir"] == str(tmp_path / "vae")
    set_vae_dir(tmp_path / "dit", "../vae")  # relative paths must stay inside even there
    with pytest.raises(UntrustedModelError, match="points outside"):
        load_dit(tmp_path / "dit")


@pytest.mark.parametrize(
    "text, reason",
    [
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "holds no `config` object"),
        ('{"config": {"hidden_size": 32, "run": "rm -rf /"}}', "is not a valid DiTConfig"),
        ('{"config": {"hidden_size": -3}}', "is not a valid DiTConfig"),
    ],
)
def test_bad_json_is_refused_naming_it(export: Path, text: str, reason: str) -> None:
    (export / "dit.json").write_text(text)
    with pytest.raises(UntrustedModelError, match=reason) as refused:
        load_dit(export)
    assert str(export / "dit.json") in str(refused.value)


# --- safetensors headers that lie -----------------------------------------------------------


def split_safetensors(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    size = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + size]), raw[8 + size :]


def write_safetensors(path: Path, header: dict, data: bytes) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def _first(header: dict) -> str:
    return next(k for k in header if k != "__metadata__")


def _beyond_end(header: dict, data: bytes) -> tuple[dict, bytes]:
    name = _first(header)
    header[name]["data_offsets"][1] += 4096
    return header, data


def _overlapping(header: dict, data: bytes) -> tuple[dict, bytes]:
    names = sorted(
        (k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"]
    )
    header[names[1]]["data_offsets"][0] -= 4
    return header, data


def _dtype_mismatch(header: dict, data: bytes) -> tuple[dict, bytes]:
    name = next(k for k in header if k != "__metadata__" and header[k]["dtype"] == "F32")
    header[name]["dtype"] = "F64"  # same bytes, twice the size per element
    return header, data


def _shape_mismatch(header: dict, data: bytes) -> tuple[dict, bytes]:
    name = _first(header)
    header[name]["shape"] = [dim * 2 for dim in header[name]["shape"]] or [2]
    return header, data


def _truncated(header: dict, data: bytes) -> tuple[dict, bytes]:
    return header, data[: len(data) // 2]


@pytest.mark.parametrize(
    "lie", [_beyond_end, _overlapping, _dtype_mismatch, _shape_mismatch, _truncated]
)
@pytest.mark.parametrize("name", ["dit", "vae"])
def test_lying_safetensors_header_is_refused_naming_the_file(export: Path, lie, name: str) -> None:
    path = export / f"{name}.safetensors"
    write_safetensors(path, *lie(*split_safetensors(path)))
    with pytest.raises(UntrustedModelError, match="is not a valid safetensors file") as refused:
        load_dit(export) if name == "dit" else load_vae(export)
    assert str(path) in str(refused.value)


@pytest.mark.parametrize("blob", [b"", b"\x01", struct.pack("<Q", 2**60) + b"{}"])
def test_header_size_lies_are_refused(export: Path, blob: bytes) -> None:
    (export / "vae.safetensors").write_bytes(blob)
    with pytest.raises(UntrustedModelError, match=str(export / "vae.safetensors")):
        load_vae(export)


def test_sora_sample_refuses_both_kinds(export: Path, tmp_path: Path) -> None:
    """`load_generator` (sora-sample, sora-eval) goes through the same checks."""
    from sora_lightning.sample.generate import load_generator

    set_vae_dir(export, "../../etc/x")
    with pytest.raises(UntrustedModelError, match="points outside"):
        load_generator(export)
    marker, hostile = tmp_path / "ran", tmp_path / "model.ckpt"
    torch.save({"hyper_parameters": RunsCommand(marker)}, hostile)
    with pytest.raises(UntrustedModelError, match="holds pickled objects"):
        load_generator(hostile)
    assert not marker.exists()
