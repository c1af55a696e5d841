"""Weights on disk without pickle: safetensors tensors + a JSON config beside them.

Everything downstream of training (latent caching, sampling, evaluation, export) loads weights
through here, so no step ever unpickles code from a file it did not write.
"""

from __future__ import annotations

import json
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from sora_lightning.models.dit import DiT, DiTConfig
from sora_lightning.models.vae import VAEConfig, VideoVAE
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


def read_module_meta(directory: str | Path, name: str) -> dict[str, Any]:
    """The JSON written beside a module's weights; clear error if the step never finished."""
    path = Path(directory) / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: train or export the {name} first (or fix the path)"
        )
    return json.loads(path.read_text())


def load_vae(directory: str | Path, name: str = "vae") -> VideoVAE:
    """VideoVAE from `name.safetensors` + `name.json`, in eval mode."""
    meta = read_module_meta(directory, name)
    vae = VideoVAE(VAEConfig(**meta["config"]))
    _load_weights(vae, directory, name)
    return vae.eval()


def load_dit(directory: str | Path, name: str = "dit") -> tuple[DiT, dict[str, Any]]:
    """DiT + its metadata (latent stats, text encoder config, VAE location) from an export."""
    meta = read_module_meta(directory, name)
    dit = DiT(DiTConfig(**meta["config"]))
    _load_weights(dit, directory, name)
    return dit.eval(), meta


def _load_weights(module: nn.Module, directory: str | Path, name: str) -> None:
    """Load `name.safetensors` into a module built from `name.json`, naming both files on a mismatch."""
    path = Path(directory) / f"{name}.safetensors"
    try:
        module.load_state_dict(safetensors.torch.load_file(str(path)))
    except RuntimeError as error:
        raise ValueError(
            f"{path} does not fit the model described by {path.with_suffix('.json')} (a file from "
            f"another model or an older code version); re-export or retrain the {name}. Details: {error}"
        ) from error


def torch_load_safe(path: str | Path) -> dict[str, Any]:
    """Load a training checkpoint refusing pickled code (weights_only=True)."""
    return torch.load(str(path), map_location="cpu", weights_only=True)
