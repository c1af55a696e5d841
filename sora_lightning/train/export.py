"""Export a trained model as one folder of safetensors + JSON that `sora-sample` loads.

Usage: python -m sora_lightning.train.export --dit RUN/dit/final --vae RUN/vae --output RUN/export
   or: python -m sora_lightning.train.export --checkpoint RUN/dit/checkpoints/step=N.ckpt --output OUT
The second form consolidates a sharded training checkpoint (DeepSpeed ZeRO-3 folder, FSDP2 / torch
DCP folder) or a plain Lightning `.ckpt` into one safetensors file, with no process group needed.

The text encoder that the DiT's `meta.text.path` names (a fine-tune of an imported Wan export
names the import's text_encoder/) is carried into OUT/text_encoder, hard-linked where OUT is on
the same file system (free, even for UMT5-XXL's 11 GB) and copied otherwise, so the export stands
alone; `--reference-text-encoder` keeps the path instead. A null path (the bundled MiniLM, found
through its package wherever it is installed) needs nothing.

A checkpoint from someone else may carry pickled code, and both sharded formats use pickle: a DCP
folder's `.metadata` is read with an unpickler that knows only DCP's own metadata classes, and
DeepSpeed's loader, which would unpickle anything, runs with every `torch.load` forced to
weights_only=True (`weights_only_loads`, allowing DeepSpeed's few plain classes).
"""

from __future__ import annotations

import argparse
import io
import os
import pickle
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from sora_lightning.models.dit import DiT, DiTConfig
from sora_lightning.train.lora import LORA_META, load_lora_dit
from sora_lightning.train.weights import (
    UntrustedModelError,
    load_dit,
    load_vae,
    pickled_code_error,
    read_module_meta,
    save_module,
    torch_load_safe,
)

WRAPPER_PREFIXES = ("_forward_module.", "_checkpoint_wrapped_module.", "module.")
TEXT_FOLDER = "text_encoder"
"""Where an export keeps its text encoder (the name tools/import_weights.py uses too)."""


def _strip(key: str) -> str:
    """Drop the prefixes Lightning/DeepSpeed/checkpoint_wrapper put in front of parameter names."""
    for prefix in WRAPPER_PREFIXES:
        key = key.replace(prefix, "")
    return key


DEEPSPEED_CLASSES = (
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
)
"""The classes besides tensors and plain data that DeepSpeed's checkpoint files pickle."""


@contextmanager
def weights_only_loads(allowed: list[Any]) -> Iterator[None]:
    """Every `torch.load` in the block runs with weights_only=True (plus the `allowed` classes).

    DeepSpeed's zero_to_fp32 loads its files with weights_only=False, so any pickled callable in
    them would run; this makes the same calls refuse them, naming the file.
    """
    original = torch.load

    def load(file: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        try:
            return original(file, *args, **kwargs)
        except pickle.UnpicklingError as error:
            raise pickled_code_error(file, error) from error

    torch.load = load  # DeepSpeed calls `torch.load` by attribute: swapped for the block only
    try:
        with torch.serialization.safe_globals(allowed):
            yield
    finally:
        torch.load = original


def _zero3_tag_folder(folder: Path) -> Path:
    """The folder that `latest` names, which must be a plain name inside `folder`."""
    tag = (folder / "latest").read_text(encoding="utf-8", errors="replace").strip()
    if not tag or tag in (".", "..") or "/" in tag or "\\" in tag or "\0" in tag:
        raise UntrustedModelError(
            f"{folder / 'latest'} names {tag!r}, not a folder inside {folder}; it is not loaded"
        )
    return folder / tag


def _load_zero3(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """fp32 weights merged from every rank's ZeRO partitions (frozen EMA included) + Lightning's extras."""
    import importlib

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag_folder = _zero3_tag_folder(folder)
    allowed = [getattr(importlib.import_module(m), name) for m, name in DEEPSPEED_CLASSES]
    with weights_only_loads(allowed):
        state = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=tag_folder.name)
    model_states = sorted(tag_folder.glob("*model_states.pt"))
    # Lightning's extras ride in DeepSpeed's model-states file
    extras = torch_load_safe(model_states[0])
    return state, extras


DCP_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata",
        "TensorStorageMetadata",
        "TensorProperties",
        "ChunkStorageMetadata",
        "BytesStorageMetadata",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
}
"""What a DCP `.metadata` pickle may name: DCP's dataclasses and enums, torch sizes and dtypes."""


class PlainMetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata; any other class or function (how pickles run code) is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in DCP_METADATA_CLASSES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not DCP metadata")


def read_dcp_metadata(folder: Path) -> Any:
    """A DCP folder's `.metadata` through `PlainMetadataUnpickler` (UntrustedModelError if it
    names anything else)."""
    path = folder / ".metadata"
    try:
        return PlainMetadataUnpickler(io.BytesIO(path.read_bytes())).load()
    except Exception as error:
        raise UntrustedModelError(
            f"{path} is not plain DCP metadata ({error}); it is not loaded, because unpickling it "
            "could run code"
        ) from error


def _safe_dcp_reader(folder: Path) -> Any:
    """torch's FileSystemReader, with `.metadata` read by `read_dcp_metadata` (not pickle.load)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    metadata = read_dcp_metadata(folder)

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(folder)


def read_dcp(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Everything a torch.distributed.checkpoint folder holds, read whole in one process, and
    its `meta.pt` extras (empty when absent).

    The tensor files are read with weights_only=True by torch itself; the metadata pickle through
    `PlainMetadataUnpickler`.
    """
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    loaded: dict[str, Any] = {}
    _load_state_dict(
        loaded,
        storage_reader=_safe_dcp_reader(folder),
        planner=_EmptyStateDictLoadPlanner(),
        no_dist=True,
    )
    extras = torch_load_safe(folder / "meta.pt") if (folder / "meta.pt").is_file() else {}
    return loaded, extras


def _load_dcp(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The full model state dict of a DCP folder, and its extras."""
    loaded, extras = read_dcp(folder)
    return loaded["state_dict"], extras


def consolidate_checkpoint(path: str | Path, weights: str = "ema") -> tuple[DiT, dict[str, Any]]:
    """A DiT with the full `weights` ("ema" or "dit") of a training checkpoint, and its hyperparameters.

    Accepts a DeepSpeed ZeRO-3 folder, a DCP folder (FSDP2) or a plain `.ckpt` file, so weights
    trained under any strategy reach `sora-sample` the same way.
    """
    path = Path(path)
    if weights not in ("ema", "dit"):
        raise ValueError(f"weights must be 'ema' or 'dit', got {weights!r}")
    if path.is_dir() and (path / "latest").is_file():
        state, extras = _load_zero3(path)
    elif path.is_dir() and (path / ".metadata").is_file():
        state, extras = _load_dcp(path)
    elif path.is_file():
        extras = torch_load_safe(path)
        state = extras["state_dict"]
    else:
        raise FileNotFoundError(f"{path} is not a checkpoint file, DeepSpeed folder or DCP folder")
    hparams = extras.get("hyper_parameters")
    if not hparams:
        raise ValueError(
            f"{path} holds no hyper_parameters; was it written by sora-train task=dit?"
        )
    if (hparams.get("lora") or {}).get("rank"):  # no base inside: it comes from model.pretrained
        raise ValueError(
            f"{path} is a LoRA checkpoint (adapters only); sample the run's final/ folder "
            "(sora-sample ckpt=RUN/final merges its adapters into the base export)"
        )
    prefix = f"{weights}."
    module_state = {
        _strip(k)[len(prefix) :]: v.float()
        for k, v in state.items()
        if _strip(k).startswith(prefix)
    }
    dit = DiT(DiTConfig(**hparams["dit"]))  # the config turns JSON lists into tuples
    dit.load_state_dict(module_state)
    return dit.eval(), {
        "meta": hparams.get("meta") or {},
        "steps": int(extras.get("global_step", -1)),
    }


def export_checkpoint(
    checkpoint: str | Path,
    output: str | Path,
    vae_dir: str | Path | None = None,
    weights: str = "ema",
    *,
    copy_text_encoder: bool = True,
) -> Path:
    """Consolidate a (sharded) training checkpoint, then bundle it with its VAE like `export_bundle`."""
    dit, extra = consolidate_checkpoint(checkpoint, weights)
    vae_dir = vae_dir or extra["meta"].get("vae_dir")
    if not vae_dir:
        raise ValueError("the checkpoint names no VAE folder; pass --vae")
    with tempfile.TemporaryDirectory() as staging:
        save_module(dit, dit.config, staging, "dit", extra)
        return export_bundle(staging, vae_dir, output, copy_text_encoder=copy_text_encoder)


def _link_or_copy(source: str, target: str) -> str:
    """A hard link where both paths are on one file system (no bytes written), else a copy."""
    try:
        os.link(source, target)  # follows a symlinked file (a Hugging Face cache snapshot's)
    except OSError:
        shutil.copy2(source, target)
    return target


def carry_text_encoder(text: dict[str, Any] | None, output: Path) -> dict[str, Any] | None:
    """`meta.text` with the encoder its `path` names carried into output/text_encoder.

    A diffusers pipeline folder gives its text_encoder/ and tokenizer/ only (the layout
    tools/import_weights.py writes); any other folder comes whole. Staged beside, then renamed
    over an older copy, so a failed carry leaves the last one intact.
    """
    if not text or not text.get("path"):
        return text
    source = Path(str(text["path"])).expanduser().resolve()
    target = output.resolve() / TEXT_FOLDER
    if source == target:  # exported again into the same folder
        return text
    if not source.is_dir():
        raise FileNotFoundError(
            f"the DiT's text encoder {source} (dit.json meta.text.path) is not a folder, so it "
            "cannot be carried into the export; pass --reference-text-encoder to keep the path"
        )
    staging = Path(tempfile.mkdtemp(prefix=f".{TEXT_FOLDER}.", dir=output))
    try:
        nested = (source / "text_encoder" / "config.json").is_file()
        parts = ("text_encoder", "tokenizer") if nested and (source / "tokenizer").is_dir() else ()
        for part in parts:
            shutil.copytree(source / part, staging / part, copy_function=_link_or_copy)
        if not parts:
            shutil.copytree(source, staging, copy_function=_link_or_copy, dirs_exist_ok=True)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {**text, "path": str(target)}


def export_bundle(
    dit_dir: str | Path,
    vae_dir: str | Path,
    output: str | Path,
    *,
    copy_text_encoder: bool = True,
) -> Path:
    """Copy DiT (EMA), VAE and text encoder into one self-contained folder, re-pointing paths.

    A LoRA run's final/ (lora.json) is exported merged: its base with the adapters folded in.
    `copy_text_encoder=False` keeps `meta.text.path` naming the encoder where it is (module doc).
    """
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    lora = (Path(dit_dir) / LORA_META).is_file()
    dit, meta = load_lora_dit(dit_dir) if lora else load_dit(dit_dir)
    vae = load_vae(vae_dir)
    extra = {k: v for k, v in meta.items() if k != "config"}
    extra["meta"] = {**extra.get("meta", {}), "vae_dir": "."}
    if copy_text_encoder and "text" in extra["meta"]:  # before dit.json, which names it
        extra["meta"]["text"] = carry_text_encoder(extra["meta"]["text"], output)
    save_module(dit, dit.config, output, "dit", extra)
    save_module(
        vae,
        vae.config,
        output,
        "vae",
        {k: v for k, v in read_module_meta(vae_dir, "vae").items() if k != "config"},
    )
    shutil.copy(Path(dit_dir) / (LORA_META if lora else "dit.json"), output / "dit.source.json")
    return output


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--dit", help="folder with dit.safetensors + dit.json")
    source.add_argument(
        "--checkpoint", help="training checkpoint: ZeRO-3 folder, FSDP2/DCP folder or .ckpt file"
    )
    parser.add_argument(
        "--weights", default="ema", choices=("ema", "dit"), help="with --checkpoint: which weights"
    )
    parser.add_argument(
        "--vae", help="folder with vae.safetensors + vae.json (default: the one training used)"
    )
    parser.add_argument("--output", required=True)
    parser.add_argument(
        "--reference-text-encoder",
        dest="copy_text_encoder",
        action="store_false",
        help="name the DiT's text encoder by its path instead of carrying it into the export",
    )
    args = parser.parse_args(argv)
    carry = args.copy_text_encoder
    if args.checkpoint:
        output = export_checkpoint(
            args.checkpoint, args.output, args.vae, args.weights, copy_text_encoder=carry
        )
    elif not args.vae:
        parser.error("--dit needs --vae")
    else:
        output = export_bundle(args.dit, args.vae, args.output, copy_text_encoder=carry)
    print(f"exported to {output}")


if __name__ == "__main__":
    main()
