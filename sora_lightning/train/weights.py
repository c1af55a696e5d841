"""Weights on disk without pickle: safetensors tensors + a JSON config beside them.

Everything downstream of training (latent caching, sampling, evaluation, export) loads weights
through here, so no step ever unpickles code from a file it did not write.

A model folder may come from someone else, so loading trusts nothing in it: safetensors whose
header lies (offsets past the end, overlapping, a shape that does not fit its dtype and bytes)
and JSON that is not what `save_module` writes are refused naming the file; a path in the JSON
(the DiT's `meta.vae_dir`) must stay inside its folder; training checkpoints load only plain
data (`torch_load_safe`: weights_only=True, pickled code refused).
"""

from __future__ import annotations

import json
import pickle
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import SafetensorError
from torch import nn

from sora_lightning.models.dit import DiT, DiTConfig
from sora_lightning.models.vae import VAEConfig, VideoVAE
from sora_lightning.models.wan_vae import WAN_VAE_KIND, WanVAEConfig, build_vae
from sora_lightning.utils import atomic_path, write_json_atomic


def config_to_dict(config: Any) -> dict[str, Any]:
    """Dataclass config -> JSON-able dict (tuples become lists)."""
    return asdict(config) if is_dataclass(config) else dict(config)


def save_module(
    module: nn.Module, config: Any, directory: str | Path, name: str, extra: dict | None = None
) -> Path:
    """Write `name.safetensors`, then `name.json` (config + extra metadata), each atomically.

    The JSON goes last: `read_module_meta` treats its presence as "the weights are complete".
    """
    directory = Path(directory)
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    with atomic_path(directory / f"{name}.safetensors") as tmp:
        safetensors.torch.save_file(state, str(tmp))
    write_json_atomic(
        directory / f"{name}.json", {"config": config_to_dict(config), **(extra or {})}
    )
    return directory / f"{name}.safetensors"


class UntrustedModelError(ValueError):
    """A model file that cannot be loaded safely or is not what it claims; the message names it."""


class PickledCodeError(UntrustedModelError, pickle.UnpicklingError):
    """A checkpoint whose pickle names classes or functions beyond plain data (how pickles run code)."""


def pickled_code_error(path: Any, error: Exception) -> PickledCodeError:
    """The refusal of `path`, naming the global that weights_only=True would not load."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reason = next((line for line in lines if "global" in line.lower()), lines[0] if lines else "")
    return PickledCodeError(
        f"Weights only load failed for {path}: it holds pickled objects that are not plain data "
        f"({reason}); it is not loaded, because unpickling them could run code. Checkpoints "
        "written by sora-train hold only tensors, numbers and strings"
    )


def read_module_meta(directory: str | Path, name: str) -> dict[str, Any]:
    """The JSON written beside a module's weights; clear error if the step never finished."""
    path = Path(directory) / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: train or export the {name} first (or fix the path)"
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise UntrustedModelError(f"{path} is not valid JSON ({error})") from error
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise UntrustedModelError(
            f"{path} holds no `config` object: it was not written by sora-train or export"
        )
    return meta


def _build(config_class: type, meta: dict[str, Any], path: Path) -> Any:
    """`config_class(**meta["config"])`, naming the JSON file when its config does not fit."""
    try:
        return config_class(**meta["config"])
    except (TypeError, ValueError) as error:
        raise UntrustedModelError(
            f"{path}: its `config` is not a valid {config_class.__name__} ({error})"
        ) from error


def load_vae(directory: str | Path, name: str = "vae") -> VideoVAE:
    """VideoVAE from `name.safetensors` + `name.json`, in eval mode; the Wan VAE kind when its
    config says `kind: wan2.1` (an imported Wan export), behind the same interface."""
    meta = read_module_meta(directory, name)
    wan = isinstance(meta["config"], dict) and meta["config"].get("kind") == WAN_VAE_KIND
    config = _build(WanVAEConfig if wan else VAEConfig, meta, Path(directory) / f"{name}.json")
    vae = build_vae(config)
    _load_weights(vae, directory, name)
    return vae.eval()


def load_dit(directory: str | Path, name: str = "dit") -> tuple[DiT, dict[str, Any]]:
    """DiT + its metadata (latent stats, text encoder config, VAE location) from an export.

    The returned `meta.vae_dir` is absolute and checked (`confined_vae_dir`).
    """
    meta = read_module_meta(directory, name)
    json_path = Path(directory) / f"{name}.json"
    dit = DiT(_build(DiTConfig, meta, json_path))
    inner = meta.get("meta")
    if isinstance(inner, dict) and "vae_dir" in inner:
        meta["meta"] = {
            **inner,
            "vae_dir": confined_vae_dir(directory, inner["vae_dir"], json_path),
        }
    _load_weights(dit, directory, name)
    return dit.eval(), meta


def confined_vae_dir(directory: str | Path, value: Any, json_path: Path) -> str:
    """The VAE folder a DiT's JSON names, as an absolute path, refused if it leaves the folder.

    An export (the way a model is shared) carries its VAE: `vae_dir` is "." and anything that
    resolves outside the folder (`../x`, an absolute path, a symlink out) is refused. A training
    run's `final/` folder has no VAE of its own: sora-train wrote the absolute path of the run's
    VAE there, which is kept; relative paths must still stay inside.
    """
    if not isinstance(value, str) or not value or "\0" in value:
        raise UntrustedModelError(f"{json_path}: meta.vae_dir={value!r} is not a folder path")
    folder = Path(directory).resolve()
    own_vae = (folder / "vae.safetensors").is_file()
    if Path(value).is_absolute() and not own_vae:
        return value
    target = (folder / value).resolve()
    if target != folder and folder not in target.parents:
        raise UntrustedModelError(
            f"{json_path}: meta.vae_dir={value!r} points outside {folder}; a model folder may only "
            "name files inside itself (an export keeps its VAE beside the DiT, vae_dir '.'), so it "
            "is not loaded"
        )
    return str(target)


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, or UntrustedModelError naming it when its header lies."""
    try:
        return safetensors.torch.load_file(str(path))
    except SafetensorError as error:
        raise UntrustedModelError(
            f"{path} is not a valid safetensors file ({error}): its header does not describe its "
            "bytes (truncated, damaged or crafted); get the file again or re-export it"
        ) from error


def _load_weights(module: nn.Module, directory: str | Path, name: str) -> None:
    """Load `name.safetensors` into a module built from `name.json`, naming both files on a mismatch."""
    path = Path(directory) / f"{name}.safetensors"
    try:
        module.load_state_dict(load_safetensors(path))
    except RuntimeError as error:
        raise ValueError(
            f"{path} does not fit the model described by {path.with_suffix('.json')} (a file from "
            f"another model or an older code version); re-export or retrain the {name}. Details: {error}"
        ) from error


def torch_load_safe(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a training checkpoint refusing pickled code (weights_only=True), naming the file.

    weights_only=True rebuilds only tensors and plain containers; a pickle that names any other
    class or function (the way pickles run code) is refused before anything runs.
    """
    try:
        loaded = torch.load(str(path), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise pickled_code_error(path, error) from error
    except (RuntimeError, EOFError, OSError) as error:
        if isinstance(error, FileNotFoundError):
            raise
        raise UntrustedModelError(f"{path} is not a readable torch checkpoint ({error})") from error
    if not isinstance(loaded, dict):
        raise UntrustedModelError(f"{path} holds a {type(loaded).__name__}, not a checkpoint dict")
    return loaded
