"""Latent and text-embedding caches: encode once, train the DiT many times without the VAE.

A cache is a folder of webdataset shards (one safetensors member per sample: the VAE posterior
mean and the text states of each caption) plus `meta.json`. The cache is keyed by a hash of the
VAE weights, the text-encoder weights and the preprocessing settings; a reader that expects other
weights or settings refuses it and names both keys, because silently training on stale latents
wastes a whole run.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import safetensors.torch
import torch
import webdataset as wds
from torch import Tensor
from tqdm import tqdm

from sora_lightning.data.clips import decode_sample, fit_clip, to_model_range, valid_length
from sora_lightning.data.decode import MediaError
from sora_lightning.data.shards import BadSampleCounter, RawSample, iter_shard_samples
from sora_lightning.models.text import TextEncoder
from sora_lightning.models.vae import VideoVAE
from sora_lightning.utils import combined_hash, state_dict_hash, write_json_atomic

log = logging.getLogger(__name__)
META_NAME = "meta.json"
NULL_TEXT_NAME = "null_text.safetensors"


@dataclass
class CacheSettings:
    """Preprocessing that changes the cached tensors; part of the cache key."""

    max_area: int = 64 * 64
    """Pixel area cap; clips are resized keeping their aspect ratio."""
    multiple: int = 8
    """Sides rounded to this (VAE spatial factor x DiT patch size)."""
    max_frames: int = 33
    """Longest clip cached (1 + 4k); shorter stages use causal prefixes of its latents."""

    def __post_init__(self) -> None:
        if self.max_area < self.multiple**2 or (self.max_frames - 1) % 4:
            raise ValueError(
                "cache settings: max_area must hold one multiple^2 tile and max_frames be 1 + 4k"
            )


@dataclass
class CachedSample:
    """One cached training example, held in memory by the DiT data module."""

    key: str
    latent: Tensor  # [C, F, h, w] float32, unnormalised posterior mean
    texts: dict[str, Tensor]  # caption kind -> [S, Dt] states of real tokens only


def cache_key(vae_hash: str, text_hash: str, settings: CacheSettings) -> str:
    """The key a cache must carry for a given VAE, text encoder and preprocessing."""
    return combined_hash(vae_hash, text_hash, json.dumps(asdict(settings), sort_keys=True))


def _text_states(encoder: TextEncoder, texts: list[str]) -> list[Tensor]:
    """Encode captions and keep only real tokens (packed batches carry no padding)."""
    encoding = encoder.encode(texts)
    return [
        states[mask].to(torch.float16)
        for states, mask in zip(encoding.states, encoding.mask, strict=True)
    ]


@torch.no_grad()
def _encode_sample(
    sample: RawSample, vae: VideoVAE, encoder: TextEncoder, settings: CacheSettings
) -> tuple[dict, Tensor]:
    """Decode, fit and encode one sample: the members of its cache record, and its latent."""
    frames, fps = decode_sample(sample)
    frames = frames[: valid_length(len(frames), vae.config.temporal_factor, settings.max_frames)]
    frames = fit_clip(frames, max_area=settings.max_area, multiple=settings.multiple)
    video = to_model_range(frames).unsqueeze(0)
    latent = vae.encode(video).mode()[0].float()
    captions = sample.meta.get("captions") or {"detailed": sample.meta["caption"]}
    kinds = sorted(captions)
    states = _text_states(encoder, [captions[k] for k in kinds])
    tensors = {"latent": latent.contiguous()}
    tensors.update({f"text_{k}": s.contiguous() for k, s in zip(kinds, states, strict=True)})
    meta = {
        "frames": int(frames.shape[0]),
        "height": int(frames.shape[1]),
        "width": int(frames.shape[2]),
        "fps": fps,
        "caption": captions[kinds[0]],
        "captions": captions,
    }
    record = {
        "__key__": sample.key,
        "safetensors": safetensors.torch.save(tensors),
        "json": json.dumps(meta).encode(),
    }
    return record, latent


def write_cache(
    shards: Iterable[str | Path],
    out_dir: str | Path,
    vae: VideoVAE,
    encoder: TextEncoder,
    settings: CacheSettings,
    *,
    max_count: int = 2000,
) -> dict:
    """Encode every readable sample of `shards` into a cache at `out_dir`; returns the summary."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vae.eval()
    stats = BadSampleCounter()
    sums, sq_sums, count, written = None, None, 0, 0
    with wds.ShardWriter(str(out / "latents-%06d.tar"), maxcount=max_count, verbose=0) as sink:
        for sample in tqdm(
            iter_shard_samples([str(s) for s in shards], stats=stats),
            desc="cache latents",
            unit="clip",
        ):
            try:
                record, latent = _encode_sample(sample, vae, encoder, settings)
            except (MediaError, KeyError, ValueError) as error:
                reason = getattr(error, "reason", type(error).__name__)
                stats.add_bad(reason, sample.shard, sample.key, str(error))
                continue
            sink.write(record)
            flat = latent.double().flatten(1)
            sums = flat.sum(1) if sums is None else sums + flat.sum(1)
            sq_sums = flat.pow(2).sum(1) if sq_sums is None else sq_sums + flat.pow(2).sum(1)
            count += flat.shape[1]
            written += 1
    if written == 0:
        raise RuntimeError(
            f"no sample of {list(shards)} could be cached; see the skipped counts {stats.counts}"
        )
    mean = sums / count
    std = (sq_sums / count - mean.pow(2)).clamp_min(1e-12).sqrt()
    safetensors.torch.save_file(
        {"states": _text_states(encoder, [""])[0].contiguous()}, str(out / NULL_TEXT_NAME)
    )
    vae_hash = state_dict_hash(vae.state_dict())
    meta = {
        "key": cache_key(vae_hash, encoder.weights_hash(), settings),
        "vae_hash": vae_hash,
        "text_hash": encoder.weights_hash(),
        "settings": asdict(settings),
        "latent_mean": mean.tolist(),
        "latent_std": std.tolist(),
        "num_samples": written,
        "skipped": dict(stats.counts),
        "shards": sorted(p.name for p in out.glob("latents-*.tar")),
    }
    write_json_atomic(out / META_NAME, meta)
    return meta


def read_cache_meta(cache_dir: str | Path, expected_key: str | None = None) -> dict:
    """Load meta.json and refuse a cache made by other weights or settings."""
    path = Path(cache_dir) / META_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: build the cache first (tools/cache_latents.py or the pipeline's 'cache' step)"
        )
    meta = json.loads(path.read_text())
    if expected_key is not None and meta["key"] != expected_key:
        raise ValueError(
            f"latent cache {cache_dir} was made with key {meta['key']} but the current VAE/text encoder/"
            f"settings give {expected_key}; rebuild the cache (delete {cache_dir}) or point to the matching weights"
        )
    return meta


def _iter_cache_records(path: Path) -> Iterator[tuple[str, bytes]]:
    """(key, safetensors bytes) of one cache shard; explicit decoding only, never unpickling."""
    for record in wds.WebDataset(
        str(path), shardshuffle=False, empty_check=False, nodesplitter=None
    ):
        if "safetensors" in record:
            yield record["__key__"], record["safetensors"]


def load_cache(
    cache_dir: str | Path, expected_key: str | None = None
) -> tuple[list[CachedSample], Tensor, dict]:
    """Read a whole cache into memory: samples, the null-caption states, and meta."""
    meta = read_cache_meta(cache_dir, expected_key)
    samples = []
    for shard in meta["shards"]:
        for key, blob in _iter_cache_records(Path(cache_dir) / shard):
            tensors = safetensors.torch.load(blob)
            texts = {k[len("text_") :]: v for k, v in tensors.items() if k.startswith("text_")}
            samples.append(CachedSample(key, tensors["latent"], texts))
    if len(samples) != meta["num_samples"]:
        raise RuntimeError(
            f"latent cache {cache_dir} holds {len(samples)} samples but meta.json says "
            f"{meta['num_samples']}; the cache is damaged: rebuild it"
        )
    null_text = safetensors.torch.load_file(str(Path(cache_dir) / NULL_TEXT_NAME))["states"]
    return samples, null_text, meta


def latent_stats(meta: dict) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std used to normalise latents to unit scale for the DiT."""
    return torch.tensor(meta["latent_mean"]), torch.tensor(meta["latent_std"])


def main(argv: list[str] | None = None) -> None:
    """CLI: encode shards into a latent + text cache (tools/cache_latents.py calls this)."""
    import argparse
    import glob

    from sora_lightning.models.text import TextEncoderConfig
    from sora_lightning.train.weights import load_vae

    parser = argparse.ArgumentParser(
        description="Cache VAE latents and text embeddings of webdataset shards"
    )
    parser.add_argument("--shards", required=True, help="glob of input .tar shards")
    parser.add_argument("--vae-dir", required=True, help="folder with vae.safetensors + vae.json")
    parser.add_argument("--output", required=True)
    parser.add_argument(
        "--text-path", default=None, help="local Hugging Face encoder (default: MiniLM package)"
    )
    parser.add_argument("--text-max-length", type=int, default=64)
    parser.add_argument("--max-area", type=int, default=CacheSettings.max_area)
    parser.add_argument("--multiple", type=int, default=CacheSettings.multiple)
    parser.add_argument("--max-frames", type=int, default=CacheSettings.max_frames)
    args = parser.parse_args(argv)
    shards = sorted(glob.glob(args.shards))
    if not shards:
        raise SystemExit(
            f"no shard matches {args.shards}; write shards first (tools/make_shards.py)"
        )
    settings = CacheSettings(args.max_area, args.multiple, args.max_frames)
    encoder = TextEncoder(TextEncoderConfig(path=args.text_path, max_length=args.text_max_length))
    meta = write_cache(shards, args.output, load_vae(args.vae_dir), encoder, settings)
    print(
        f"cached {meta['num_samples']} samples (skipped {meta['skipped']}) into {args.output}, key {meta['key']}"
    )


if __name__ == "__main__":
    main()
