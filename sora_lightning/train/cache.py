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
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sora_lightning.data.captioning import AddedCaptions
from sora_lightning.data.latent_cache import (
    CacheSettings,
    cache_key,
    merge_cache_parts,
    read_cache_meta,
    write_cache,
    write_cache_part,
)
from sora_lightning.data.parts import resolve_part
from sora_lightning.models.text import TextEncoder, TextEncoderConfig
from sora_lightning.models.vae import (
    VAEConfig,
    VideoVAE,
    clip_lengths_hint,
    is_clip_length,
    longest_clip_length,
)
from sora_lightning.models.wan_vae import WanVAEConfig, vae_config_from_dict
from sora_lightning.train.weights import load_vae, read_module_meta
from sora_lightning.utils import state_dict_hash, write_json_atomic

log = logging.getLogger(__name__)
REUSED_NAME = "reused.json"
"""Written by the cache step under cache.reuse: which existing cache the run reads, and its key."""


def vae_config_for(cfg: DictConfig) -> VAEConfig | WanVAEConfig:
    """The VAE the cache and the DiT will use: data.vae_dir, else vae.pretrained, else model.vae."""
    directory = cfg.data.get("vae_dir") or cfg.get("vae", {}).get("pretrained")
    if directory and Path(directory, "vae.json").is_file():
        values = read_module_meta(directory, "vae")["config"]
    else:
        values = OmegaConf.to_container(cfg.model.vae, resolve=True)
    return vae_config_from_dict(values)  # ours, or Wan's by its `kind`


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
    if not is_clip_length(max_frames, factor):
        low = longest_clip_length(max_frames, factor)
        raise ValueError(
            f"cache.max_frames={max_frames} does not fit the VAE ({clip_lengths_hint(factor)}): "
            f"use {low} or {low + factor}, or null for the curriculum's longest clip"
        )
    added = added_captions(cfg)
    return CacheSettings(
        max_area=int(cfg.cache.max_area),
        multiple=multiple,
        max_frames=max_frames,
        captions=added.source if added is not None else "",
    )


def added_captions(cfg: DictConfig) -> AddedCaptions | None:
    """`data.captions_dir`: VLM captions (the pipeline's caption step) the cache adds to each
    sample's own; both the cache and the DiT read it, so the key covers the captioner."""
    directory = cfg.data.get("captions_dir")
    return AddedCaptions.load(directory) if directory else None


def text_encoder(cfg: DictConfig) -> TextEncoder:
    """The text encoder of `model.text`, as training builds it."""
    from hydra.utils import instantiate

    config = instantiate(cfg.model.text, _convert_="all")
    assert isinstance(config, TextEncoderConfig)
    return TextEncoder(config)


def _part(cfg: DictConfig) -> int | None:
    """This array task's part: cache.part, else $SLURM_ARRAY_TASK_ID; None when not split."""
    names = ("cache.num_parts", "cache.part")
    return resolve_part(cfg.cache.get("num_parts"), cfg.cache.get("part"), names=names)


def reuse_cache(cfg: DictConfig, vae: VideoVAE, settings: CacheSettings) -> dict[str, Any]:
    """`cache.reuse=DIR`: check that DIR was made with this VAE, text encoder and settings (its
    key), then record it in data.cache_dir/reused.json instead of encoding anything again."""
    expected = cache_key(
        state_dict_hash(vae.state_dict()), text_encoder(cfg).states_hash(), settings
    )
    source = Path(cfg.cache.reuse).expanduser().resolve()
    meta = read_cache_meta(source, expected)  # names both keys when they differ
    record = {"cache_dir": str(source), "key": meta["key"], "num_samples": meta["num_samples"]}
    write_json_atomic(Path(cfg.data.cache_dir) / REUSED_NAME, record)
    return {"task": "cache", "reused": str(source), "key": meta["key"]}


def build_cache(cfg: DictConfig) -> dict[str, Any]:
    """task=cache: encode data.shards with the VAE of data.vae_dir into data.cache_dir (or, with
    cache.reuse, verify an existing cache instead)."""
    out = Path(cfg.data.cache_dir)
    if cfg.cache.get("reuse"):
        vae = load_vae(cfg.data.vae_dir)
        return reuse_cache(cfg, vae, cache_settings(cfg, vae.config))
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
    added = added_captions(cfg)
    if part is not None:
        num_parts = int(cfg.cache.num_parts)
        record = write_cache_part(
            shards, out, vae, encoder, settings, num_parts=num_parts, part=part, added=added
        )
        written = sum(p["written"] for p in record["partials"])
        return {"task": "cache", "part": part, "num_parts": num_parts, "samples": written}
    meta = write_cache(shards, out, vae, encoder, settings, added=added)
    log.info("cached %d samples into %s, key %s", meta["num_samples"], out, meta["key"])
    return {"task": "cache", "samples": meta["num_samples"], "key": meta["key"]}
