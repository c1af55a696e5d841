"""`sora-train task=cache`: the latent cache built from the same composed config as training.

Why here: the cache key covers the preprocessing and the text encoder, and the DiT refuses a cache
whose key differs. When the cache tool and training each read their own settings, a cache built
with the tool's defaults is refused by training. So both call `cache_settings` on one config, and
the values that follow from the models (the side multiple, the longest clip) are derived here,
once, instead of being repeated in YAML.
"""

from __future__ import annotations

import glob
import logging
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sora_lightning.data.latent_cache import (
    CacheSettings,
    merge_cache_parts,
    write_cache,
    write_cache_part,
)
from sora_lightning.models.text import TextEncoder, TextEncoderConfig
from sora_lightning.models.vae import VAEConfig
from sora_lightning.train.weights import load_vae, read_module_meta

log = logging.getLogger(__name__)


def vae_config_for(cfg: DictConfig) -> VAEConfig:
    """The VAE the cache and the DiT will use: data.vae_dir, else vae.pretrained, else model.vae."""
    directory = cfg.data.get("vae_dir") or cfg.get("vae", {}).get("pretrained")
    if directory and Path(directory, "vae.json").is_file():
        values = read_module_meta(directory, "vae")["config"]
    else:
        values = OmegaConf.to_container(cfg.model.vae, resolve=True)
        values.pop("_target_", None)
    return VAEConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def _longest_clip(cfg: DictConfig) -> int:
    return max(int(stage["frames"][1]) for stage in cfg.curriculum.stages)


def cache_settings(cfg: DictConfig, vae: VAEConfig | None = None) -> CacheSettings:
    """CacheSettings of the composed config; `cache.multiple`/`max_frames` null are derived.

    multiple = VAE spatial factor x DiT spatial patch (a latent side must split into patches);
    max_frames = the curriculum's longest clip. Either, when set, must agree with the VAE.
    """
    vae = vae or vae_config_for(cfg)
    patch = tuple(cfg.model.dit.patch_size)
    stride = vae.spatial_factor * max(int(patch[1]), int(patch[2]))
    multiple = cfg.cache.get("multiple") or stride
    if multiple % stride:
        raise ValueError(
            f"cache.multiple={multiple} must be a multiple of VAE spatial factor x DiT patch "
            f"= {stride}; leave it null to derive it"
        )
    max_frames = cfg.cache.get("max_frames") or _longest_clip(cfg)
    factor = vae.temporal_factor
    if (max_frames - 1) % factor:
        low = 1 + (max_frames - 1) // factor * factor
        raise ValueError(
            f"cache.max_frames={max_frames} does not fit the VAE (1 + {factor}k frames): use "
            f"{low} or {low + factor}, or null for the curriculum's longest clip"
        )
    return CacheSettings(max_area=int(cfg.cache.max_area), multiple=multiple, max_frames=max_frames)


def text_encoder(cfg: DictConfig) -> TextEncoder:
    """The text encoder of `model.text`, as training builds it."""
    from hydra.utils import instantiate

    config = instantiate(cfg.model.text, _convert_="all")
    assert isinstance(config, TextEncoderConfig)
    return TextEncoder(config)


def _part(cfg: DictConfig) -> int | None:
    """This array task's part: cache.part, else $SLURM_ARRAY_TASK_ID; None when not split."""
    num_parts = cfg.cache.get("num_parts")
    if not num_parts:
        return None
    part = cfg.cache.get("part")
    if part is None and os.environ.get("SLURM_ARRAY_TASK_ID", "").isdigit():
        part = int(os.environ["SLURM_ARRAY_TASK_ID"])
    if part is None or not 0 <= part < num_parts:
        raise ValueError(f"cache.num_parts={num_parts} needs 0 <= cache.part < it, got {part}")
    return int(part)


def build_cache(cfg: DictConfig) -> dict[str, Any]:
    """task=cache: encode data.shards with the VAE of data.vae_dir into data.cache_dir."""
    out = Path(cfg.data.cache_dir)
    if cfg.cache.get("merge"):
        meta = merge_cache_parts(out)
        return {"task": "cache", "samples": meta["num_samples"], "key": meta["key"]}
    patterns = [cfg.data.shards] if isinstance(cfg.data.shards, str) else list(cfg.data.shards)
    shards = sorted({p for pattern in patterns for p in glob.glob(str(pattern))})
    if not shards:
        raise FileNotFoundError(f"no shard matches data.shards={patterns}; write shards first")
    vae = load_vae(cfg.data.vae_dir)
    settings = cache_settings(cfg, vae.config)
    encoder = text_encoder(cfg)
    part = _part(cfg)
    if part is not None:
        num_parts = int(cfg.cache.num_parts)
        record = write_cache_part(
            shards, out, vae, encoder, settings, num_parts=num_parts, part=part
        )
        written = sum(p["written"] for p in record["partials"])
        return {"task": "cache", "part": part, "num_parts": num_parts, "samples": written}
    meta = write_cache(shards, out, vae, encoder, settings)
    log.info("cached %d samples into %s, key %s", meta["num_samples"], out, meta["key"])
    return {"task": "cache", "samples": meta["num_samples"], "key": meta["key"]}
