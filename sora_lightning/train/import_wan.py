"""Import a diffusers-format Wan 2.1 text-to-video folder as an export `sora-sample` loads.

Usage: python tools/import_weights.py --diffusers Wan2.1-T2V-1.3B-Diffusers --output EXPORT

The folder is what `WanPipeline.save_pretrained` writes (model_index.json, transformer/, vae/,
text_encoder/, tokenizer/, scheduler/). The export gets:
- dit.safetensors + dit.json: the transformer converted by `models.wan` (dtype kept), with the
  text-encoder settings (UMT5, max_length 512 like WanPipeline), the VAE factors, and the
  scheduler's shift as the export's default sampling shift (`meta.sampling`);
- vae.safetensors + vae.json: the Wan VAE kind (`models.wan_vae.WanVideoVAE`), which normalises
  latents itself, so the DiT's `latent_mean`/`latent_std` are 0 and 1;
- text_encoder/{text_encoder,tokenizer}: the UMT5 folders copied (or, `copy_text_encoder=False`,
  the source folder referenced by its absolute path).

Every transformer and VAE key is accounted for: a missing or unexpected one is an error naming it.
Anything but Wan 2.1 text-to-video (image-to-video, Wan 2.2's two transformers, another pipeline)
is refused with what was found. The export is written into a staging folder and renamed into
place, so a failed import leaves nothing half-written; an existing non-empty EXPORT is refused
unless this importer wrote it (its `import.json`).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from torch import Tensor

from sora_lightning.models.dit import DiT, DiTConfig
from sora_lightning.models.wan import convert_wan_transformer, wan_transformer_config
from sora_lightning.train.weights import config_to_dict, load_safetensors, save_module
from sora_lightning.utils import atomic_path, write_json_atomic

WAN_TEXT_MAX_LENGTH = 512
"""Tokens per caption in WanPipeline (its `max_sequence_length`)."""
IMPORT_MARKER = "import.json"
"""Written last into an import: what the folder came from; lets a re-import replace it."""
COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
FLOW_SCHEDULERS = {  # scheduler class -> the config key holding its flow shift
    "FlowMatchEulerDiscreteScheduler": "shift",
    "UniPCMultistepScheduler": "flow_shift",
    "DPMSolverMultistepScheduler": "flow_shift",
}


class NotWan21Error(ValueError):
    """The folder is not a diffusers Wan 2.1 text-to-video pipeline; the message says why."""


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise NotWan21Error(f"{path} is missing: not a diffusers Wan 2.1 folder")
    return json.loads(path.read_text(encoding="utf-8"))


def check_wan21_folder(folder: str | Path) -> dict[str, Any]:
    """model_index.json of a Wan 2.1 T2V pipeline folder; NotWan21Error naming what differs."""
    folder = Path(folder)
    index = _read_json(folder / "model_index.json")
    name = index.get("_class_name")
    if name != "WanPipeline":
        raise NotWan21Error(
            f"{folder} holds a {name!r} pipeline; only Wan 2.1 text-to-video (WanPipeline) "
            "imports (image-to-video and other pipelines are not reproduced)"
        )
    second = index.get("transformer_2") or [None, None]
    if second[0] is not None or index.get("boundary_ratio") is not None:
        raise NotWan21Error(
            f"{folder} has a second transformer (transformer_2 / boundary_ratio): that is Wan 2.2, "
            "not Wan 2.1; only Wan 2.1 text-to-video imports"
        )
    if index.get("expand_timesteps"):
        raise NotWan21Error(f"{folder} sets expand_timesteps (Wan 2.2 TI2V): not Wan 2.1")
    for part in COMPONENTS:
        if not (folder / part).is_dir():
            raise NotWan21Error(f"{folder}/{part}/ is missing: a Wan 2.1 folder has {COMPONENTS}")
    return index


def read_sharded_safetensors(folder: Path, stem: str) -> dict[str, Tensor]:
    """`stem.safetensors`, or every shard listed by `stem.safetensors.index.json`."""
    single = folder / f"{stem}.safetensors"
    if single.is_file():
        return load_safetensors(single)
    index_path = folder / f"{stem}.safetensors.index.json"
    if not index_path.is_file():
        raise FileNotFoundError(f"{folder} holds neither {single.name} nor {index_path.name}")
    shards = sorted(set(_read_json(index_path)["weight_map"].values()))
    state: dict[str, Tensor] = {}
    for shard in shards:
        if "/" in shard or "\\" in shard or shard in (".", ".."):
            raise ValueError(f"{index_path} names {shard!r}, not a file beside it")
        state.update(load_safetensors(folder / shard))
    return state


def import_transformer(folder: Path) -> tuple[DiTConfig, dict[str, Tensor]]:
    """(our DiTConfig, our state dict) of transformer/; keys checked against our DiT's."""
    config = wan_transformer_config(_read_json(folder / "transformer" / "config.json"))
    state = convert_wan_transformer(
        read_sharded_safetensors(folder / "transformer", "diffusion_pytorch_model"), config
    )
    expected = DiT.from_config_on_meta(config).state_dict()
    wrong = [k for k, v in state.items() if tuple(v.shape) != tuple(expected[k].shape)]
    if wrong:
        raise ValueError(f"transformer tensors of the wrong shape for its config.json: {wrong}")
    return config, state


def import_vae(folder: Path) -> Any:
    """The Wan VAE of vae/ as our `WanVideoVAE`, every key checked (named when wrong)."""
    from sora_lightning.models.wan_vae import WanVAEConfig, WanVideoVAE

    vae_folder = folder / "vae"
    config = _read_json(vae_folder / "config.json")
    if config.get("_class_name") != "AutoencoderKLWan":
        raise NotWan21Error(f"{vae_folder} holds a {config.get('_class_name')!r}, not Wan's VAE")
    vae = WanVideoVAE(WanVAEConfig.from_diffusers(config))
    state = read_sharded_safetensors(vae_folder, "diffusion_pytorch_model")
    expected = vae.model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing:
        raise ValueError(f"missing AutoencoderKLWan keys: {missing}")
    if unexpected:
        raise ValueError(f"unexpected AutoencoderKLWan keys: {unexpected}")
    vae.model.load_state_dict({k: v.float() for k, v in state.items()})
    return vae.eval()


def scheduler_settings(folder: Path) -> dict[str, Any]:
    """The default sampling settings of scheduler/: its flow shift and the config itself."""
    config = _read_json(folder / "scheduler" / "scheduler_config.json")
    name = config.get("_class_name")
    if name not in FLOW_SCHEDULERS:
        raise NotWan21Error(
            f"scheduler {name!r} is not a flow-matching scheduler Wan 2.1 uses "
            f"({sorted(FLOW_SCHEDULERS)})"
        )
    if config.get("use_dynamic_shifting"):
        raise NotWan21Error(f"scheduler {name} uses dynamic shifting; Wan 2.1 uses a fixed shift")
    return {"shift": float(config.get(FLOW_SCHEDULERS[name], 1.0)), "scheduler": config}


def text_settings(folder: Path, text_path: Path) -> dict[str, Any]:
    """`TextEncoderConfig` fields of the UMT5 encoder, as WanPipeline encodes captions."""
    config = _read_json(folder / "text_encoder" / "config.json")
    if config.get("model_type") != "umt5":
        raise NotWan21Error(
            f"text_encoder/ holds a {config.get('model_type')!r} model; Wan 2.1 uses UMT5"
        )
    dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    return {
        "path": str(text_path),
        "max_length": WAN_TEXT_MAX_LENGTH,
        "dtype": dtype if dtype in ("float32", "bfloat16", "float16") else "float32",
        "layers": [-1],
        "model_type": "umt5",
    }


def _check_output(output: Path) -> None:
    """Refuse a non-empty folder this importer did not write."""
    if output.exists() and not output.is_dir():
        raise FileExistsError(f"{output} exists and is not a folder")
    if output.is_dir() and any(output.iterdir()) and not (output / IMPORT_MARKER).is_file():
        raise FileExistsError(
            f"{output} is not empty and was not written by this importer; pass a new or empty "
            "folder as --output"
        )


def _save_state(
    state: dict[str, Tensor], config: DiTConfig, directory: Path, extra: dict[str, Any]
) -> None:
    """`save_module`'s files (dit.safetensors, then dit.json) from a state dict, without
    building the DiT (a 14B model in float32 would need 56 GB)."""
    with atomic_path(directory / "dit.safetensors") as tmp:
        import safetensors.torch

        safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    write_json_atomic(directory / "dit.json", {"config": config_to_dict(config), **extra})


def import_wan21(
    diffusers_dir: str | Path, output: str | Path, *, copy_text_encoder: bool = True
) -> Path:
    """Convert a diffusers Wan 2.1 T2V folder into an export folder (module doc); returns it."""
    source, output = Path(diffusers_dir).resolve(), Path(output).resolve()
    check_wan21_folder(source)
    _check_output(output)
    config, state = import_transformer(source)
    vae = import_vae(source)
    sampling = scheduler_settings(source)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        text_path = output / "text_encoder" if copy_text_encoder else source
        if copy_text_encoder:
            for part in ("text_encoder", "tokenizer"):
                shutil.copytree(source / part, staging / "text_encoder" / part)
        meta = {
            "vae_dir": ".",
            "text": text_settings(source, text_path),
            "latent_mean": [0.0] * config.in_channels,  # WanVideoVAE normalises itself
            "latent_std": [1.0] * config.in_channels,
            "spatial_factor": vae.config.spatial_factor,
            "temporal_factor": vae.config.temporal_factor,
            "sampling": sampling,
        }
        _save_state(state, config, staging, {"meta": meta})
        save_module(vae, vae.config, staging, "vae", {})
        write_json_atomic(staging / IMPORT_MARKER, {"source": str(source), "format": "wan2.1"})
        if output.exists():
            shutil.rmtree(output)
        staging.rename(output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output


def load_export_vae(directory: str | Path, name: str = "vae") -> Any:
    """Our VAE or the Wan VAE kind from `name.safetensors` + `name.json`, dispatching on the
    config's `kind` (what `train.weights.load_vae` should do; see the report)."""
    from sora_lightning.models.wan_vae import build_vae, vae_config_from_dict
    from sora_lightning.train.weights import read_module_meta

    meta = read_module_meta(directory, name)
    vae = build_vae(vae_config_from_dict(meta["config"]))
    vae.load_state_dict(load_safetensors(Path(directory) / f"{name}.safetensors"))
    return vae.eval()
