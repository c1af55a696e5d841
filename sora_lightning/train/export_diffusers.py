"""Write a Wan-config export back as a diffusers Wan 2.1 folder (`WanPipeline.from_pretrained`).

Usage: python tools/export_diffusers.py --export EXPORT --output OUT
   or: python tools/import_weights.py --to-diffusers OUT --export EXPORT

The inverse of `train.import_wan`: our DiT weights are mapped back through the rules of
`models.wan` (fused qkv / kv rows split into to_q/to_k/to_v, the patch Linear reshaped to Wan's
Conv3d, proj_out rows put back in Wan's (pt, ph, pw, c) order) and checked by converting them
forward again, which must give our weights back bit for bit. The VAE must be the Wan kind
(`AutoencoderKLWan` is saved as is); the UMT5 encoder and tokenizer come from the export's text
settings; the scheduler is the one the import recorded, else FlowMatchEulerDiscreteScheduler with
the export's sampling shift.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import tempfile
from pathlib import Path
from typing import Any

import safetensors.torch
from torch import Tensor

from sora_lightning.models import wan
from sora_lightning.models.dit import DiTConfig
from sora_lightning.models.wan import convert_wan_transformer, wan_transformer_config
from sora_lightning.train.import_wan import load_export_vae
from sora_lightning.train.weights import load_safetensors, read_module_meta
from sora_lightning.utils import write_json_atomic

DEFAULT_SHIFT = 3.0
"""Wan 2.1's published flow shift, used when an export records none."""


def diffusers_transformer_config(config: DiTConfig) -> dict[str, Any]:
    """The `WanTransformer3DModel` config computing our DiT; ValueError naming what Wan lacks."""
    heads = config.num_heads
    values = {
        "patch_size": list(config.patch_size),
        "num_attention_heads": heads,
        "attention_head_dim": config.hidden_size // heads,
        "in_channels": config.in_channels,
        "out_channels": config.in_channels,
        "text_dim": config.text_dim,
        "freq_dim": config.time_frequency_dim,
        "ffn_dim": config.mlp_dim,
        "num_layers": config.depth,
        "cross_attn_norm": config.cross_attn_norm,
        "qk_norm": "rms_norm_across_heads",
        "eps": config.norm_eps,
        "image_dim": None,
        "added_kv_proj_dim": None,
        "rope_max_seq_len": 1024,
        "pos_embed_seq_len": None,
    }
    _check_same(config, wan_transformer_config(values))
    return values


def _check_same(ours: DiTConfig, wan_config: DiTConfig) -> None:
    """Refuse a DiT whose options Wan's transformer does not have (names every one)."""

    def comparable(config: DiTConfig) -> dict[str, Any]:
        config = dataclasses.replace(config, mlp_hidden_size=config.mlp_dim, mlp_ratio=4.0)
        return {k: v for k, v in dataclasses.asdict(config).items() if k != "attn_backend"}

    mine, theirs = comparable(ours), comparable(wan_config)
    differ = {k: mine[k] for k in mine if mine[k] != theirs[k]}
    if differ:
        raise ValueError(
            f"this DiT is not a Wan 2.1 transformer: {differ} (Wan needs "
            f"{ {k: theirs[k] for k in differ} }); only Wan-config exports write back to diffusers"
        )


def _wan_output_rows(rows: Tensor, patch: tuple[int, int, int]) -> Tensor:
    """Our proj_out rows (or bias) in (c, pt, ph, pw) order -> Wan's (pt, ph, pw, c)."""
    grid = rows.reshape(-1, *patch, *rows.shape[1:])  # [C, pt, ph, pw, (D)]
    return grid.movedim(0, 3).reshape(rows.shape)


def _invert(make: Any, tensor: Tensor, num_parts: int, config: DiTConfig) -> list[Tensor]:
    """The diffusers tensors one of our tensors was made of (inverse of a `models.wan` rule)."""
    if make is wan._take:
        return [tensor]
    if make is wan._concat:
        return list(tensor.chunk(num_parts, dim=0))
    if make is wan._squeeze:
        return [tensor.unsqueeze(0)]
    if make is wan._flatten_conv:
        return [tensor.reshape(tensor.shape[0], config.in_channels, *config.patch_size)]
    if getattr(make, "__name__", "") == "reorder":  # proj_out rows (models.wan._output_rows)
        return [_wan_output_rows(tensor, config.patch_size)]
    raise ValueError(f"no inverse for the conversion rule {make!r}; extend _invert")


def dit_to_wan_state(state: dict[str, Tensor], config: DiTConfig) -> dict[str, Tensor]:
    """Our DiT state dict -> diffusers `WanTransformer3DModel` keys (dtypes kept), checked by
    converting back: any difference raises."""
    diffusers_transformer_config(config)
    rules = wan._rules(config.depth, config.cross_attn_norm, config.patch_size)
    missing = sorted({ours for ours, _, _ in rules} - set(state))
    unexpected = sorted(set(state) - {ours for ours, _, _ in rules})
    if missing or unexpected:
        raise ValueError(f"DiT state dict: missing keys {missing}, unexpected keys {unexpected}")
    out: dict[str, Tensor] = {}
    for ours, sources, make in rules:
        parts = _invert(make, state[ours], len(sources), config)
        out.update({name: part.clone() for name, part in zip(sources, parts, strict=True)})
    back = convert_wan_transformer(out, config)
    wrong = [k for k in state if not state[k].equal(back[k])]
    if wrong:
        raise AssertionError(f"inverse conversion does not round-trip for {wrong}")
    return out


def _save_safetensors(state: dict[str, Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    safetensors.torch.save_file(state, str(path), metadata={"format": "pt"})


def _write_config(path: Path, class_name: str, values: dict[str, Any]) -> None:
    import diffusers

    header = {"_class_name": class_name, "_diffusers_version": diffusers.__version__}
    write_json_atomic(path, {**header, **values})


def _text_folders(text: dict[str, Any]) -> tuple[Path, Path]:
    """(encoder folder, tokenizer folder) the export's text settings name."""
    path = Path(text["path"]).expanduser()
    if (path / "text_encoder" / "config.json").is_file() and (path / "tokenizer").is_dir():
        return path / "text_encoder", path / "tokenizer"
    return path, path


def _write_text(text: dict[str, Any], out: Path) -> str:
    """Copy the UMT5 encoder to out/text_encoder, its tokenizer to out/tokenizer; the
    tokenizer's class name (what model_index.json records)."""
    from transformers import AutoConfig, AutoTokenizer

    encoder, tokenizer_folder = _text_folders(text)
    if AutoConfig.from_pretrained(str(encoder), local_files_only=True).model_type != "umt5":
        raise ValueError(f"{encoder} is not a UMT5 encoder; WanPipeline reads UMT5 states")
    shutil.copytree(encoder, out / "text_encoder")
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_folder), local_files_only=True)
    tokenizer.save_pretrained(out / "tokenizer")
    return type(tokenizer).__name__


def _scheduler(meta: dict[str, Any]) -> dict[str, Any]:
    """The scheduler config the import recorded, or Euler flow matching at the export's shift."""
    sampling = meta.get("sampling") or {}
    if isinstance(sampling.get("scheduler"), dict):
        return sampling["scheduler"]
    shift = sampling.get("shift")
    return {
        "_class_name": "FlowMatchEulerDiscreteScheduler",
        "shift": float(DEFAULT_SHIFT if shift is None else shift),
        "num_train_timesteps": 1000,
    }


def _model_index(tokenizer_class: str, scheduler_class: str) -> dict[str, Any]:
    return {
        "boundary_ratio": None,
        "expand_timesteps": False,
        "scheduler": ["diffusers", scheduler_class],
        "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", tokenizer_class],
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "transformer_2": [None, None],
        "vae": ["diffusers", "AutoencoderKLWan"],
    }


def export_to_diffusers(export: str | Path, output: str | Path) -> Path:
    """Write the Wan-config export folder `export` as a diffusers WanPipeline folder `output`
    (new or empty); written in a staging folder and renamed into place."""
    export, output = Path(export), Path(output).resolve()
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise FileExistsError(f"{output} exists and is not an empty folder; pass a new folder")
    saved = read_module_meta(export, "dit")
    config = DiTConfig(**saved["config"])
    meta = saved.get("meta") or {}
    transformer = diffusers_transformer_config(config)
    vae = load_export_vae(export)
    if not hasattr(vae, "model"):
        raise ValueError(
            f"{export}'s VAE is this project's VideoVAE; WanPipeline needs the Wan VAE "
            "(AutoencoderKLWan), so only exports trained on it write back to diffusers"
        )
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        state = dit_to_wan_state(load_safetensors(export / "dit.safetensors"), config)
        _save_safetensors(state, staging / "transformer" / "diffusion_pytorch_model.safetensors")
        _write_config(staging / "transformer" / "config.json", "WanTransformer3DModel", transformer)
        vae.model.save_pretrained(staging / "vae")
        tokenizer_class = _write_text(meta["text"], staging)
        scheduler = _scheduler(meta)
        values = {k: v for k, v in scheduler.items() if not k.startswith("_")}
        _write_config(
            staging / "scheduler" / "scheduler_config.json", scheduler["_class_name"], values
        )
        _write_config(
            staging / "model_index.json",
            "WanPipeline",
            _model_index(tokenizer_class, scheduler["_class_name"]),
        )
        if output.exists():
            output.rmdir()
        staging.rename(output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--export", required=True, help="export folder (dit.json, vae.json)")
    parser.add_argument("--output", required=True, help="diffusers folder to write (new)")
    args = parser.parse_args(argv)
    print(f"wrote {export_to_diffusers(args.export, args.output)}")
