"""Latent and text-embedding caches: encode once, train the DiT many times without the VAE.

A cache is a folder of webdataset shards (one safetensors member per sample: the VAE posterior
mean and the text states of each caption) plus `meta.json`. The cache is keyed by a hash of the
VAE weights, the text-encoder weights and the preprocessing settings; a reader that expects other
weights or settings refuses it and names both keys, because silently training on stale latents
wastes a whole run.
"""

from __future__ import annotations

import argparse
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

from sora_lightning.data.captioning import AddedCaptions, add_caption
from sora_lightning.data.clips import to_model_range, valid_length
from sora_lightning.data.decode import MediaError, decode_video
from sora_lightning.data.parts import PartRecord, check_parts, read_part_records, select_part
from sora_lightning.data.resize import FitFrame
from sora_lightning.data.shards import BadSampleCounter, RawSample, iter_shard_samples
from sora_lightning.data.sources import is_held_out
from sora_lightning.models.text import TextEncoder
from sora_lightning.models.vae import VideoVAE
from sora_lightning.utils import (
    atomic_path,
    combined_hash,
    reporting_no_space,
    state_dict_hash,
    write_json_atomic,
)

log = logging.getLogger(__name__)
META_NAME = "meta.json"
NULL_TEXT_NAME = "null_text.safetensors"
PART_META = "meta.part-{part:03d}.json"
"""What one array task (`--num-parts/--part`) records for `merge_cache_parts`."""


CACHE_RESIZES = ("ffmpeg_bilinear",)
NO_SPACE_THEN = (
    "its meta.json is not written, so the cache does not count; free space and rerun "
    "(it is rebuilt from the shards)"
)


@dataclass
class CacheSettings:
    """Preprocessing that changes the cached tensors; part of the cache key."""

    max_area: int = 64 * 64
    """Pixel area cap; clips are resized keeping their aspect ratio."""
    multiple: int = 8
    """Sides rounded to this (VAE spatial factor x DiT patch size)."""
    max_frames: int = 33
    """Longest clip cached (1 + k x the VAE's temporal factor, checked by `train.cache`);
    shorter stages use causal prefixes of its latents."""
    resize: str = "ffmpeg_bilinear"
    """How frames are fitted: FFmpeg's bilinear scale while converting from YUV, as the VAE
    loaders do (`clips.decode_fitted`), so the DiT sees latents of the pixels the VAE was
    trained on. Caches made before this field (torch area resize) get another key."""
    captions: str = ""
    """Source hash of the captions added by a VLM (`captioning.AddedCaptions.source`: captioner
    weights, instruction, frames, size); empty when none, which leaves older keys unchanged."""

    def __post_init__(self) -> None:
        if self.max_area < self.multiple**2 or self.max_frames < 1:
            raise ValueError(
                "cache settings: max_area must hold one multiple^2 tile and max_frames be >= 1"
            )
        if self.resize not in CACHE_RESIZES:
            raise ValueError(f"cache settings: resize must be one of {CACHE_RESIZES}")


@dataclass
class CachedSample:
    """One cached training example, held in memory by the DiT data module."""

    key: str
    latent: Tensor  # [C, F, h, w] float32, unnormalised posterior mean
    texts: dict[str, Tensor]  # caption kind -> [S, Dt] states of real tokens only


def cache_key(vae_hash: str, text_hash: str, settings: CacheSettings) -> str:
    """The key a cache must carry for a given VAE, text encoder and preprocessing."""
    fields = asdict(settings)
    if not fields["captions"]:  # no added captions: the key of caches made before the field
        del fields["captions"]
    return combined_hash(vae_hash, text_hash, json.dumps(fields, sort_keys=True))


def _text_states(encoder: TextEncoder, texts: list[str]) -> list[Tensor]:
    """Encode captions and keep only real tokens (packed batches carry no padding)."""
    encoding = encoder.encode(texts)
    return [
        states[mask].to(torch.float16)
        for states, mask in zip(encoding.states, encoding.mask, strict=True)
    ]


TEXT_BATCH = 32
"""Samples whose captions are encoded in one text-encoder call (one call per sample was ~30%
of the demo's cache step on 2 cores)."""


@dataclass
class _Encoded:
    """One sample's latent and record fields, waiting for its captions' states."""

    key: str
    latent: Tensor  # [C, F, h, w]
    meta: dict
    captions: dict[str, str]


@torch.no_grad()
def _encode_media(sample: RawSample, vae: VideoVAE, settings: CacheSettings) -> _Encoded:
    """Decode, fit and VAE-encode one sample (its captions are encoded later, batched)."""
    fit = FitFrame(max_area=settings.max_area, multiple=settings.multiple)
    frames, fps = decode_video(sample.media, convert=fit)  # an image decodes as one frame
    frames = frames[: valid_length(len(frames), vae.config.temporal_factor, settings.max_frames)]
    video = to_model_range(frames).unsqueeze(0)
    latent = vae.encode(video).mode()[0].float()
    captions = sample.meta.get("captions") or {"detailed": sample.meta["caption"]}
    meta = {
        "frames": int(frames.shape[0]),
        "height": int(frames.shape[1]),
        "width": int(frames.shape[2]),
        "fps": fps,
        "caption": captions[sorted(captions)[0]],
        "captions": captions,
    }
    return _Encoded(sample.key, latent, meta, captions)


@torch.no_grad()
def _records(encoded: list[_Encoded], encoder: TextEncoder) -> list[dict]:
    """Cache records of `encoded`, all their captions through the text encoder in one call."""
    texts = [item.captions[kind] for item in encoded for kind in sorted(item.captions)]
    states = iter(_text_states(encoder, texts))
    records = []
    for item in encoded:
        tensors = {"latent": item.latent.contiguous()}
        tensors.update({f"text_{k}": next(states).contiguous() for k in sorted(item.captions)})
        records.append(
            {
                "__key__": item.key,
                "safetensors": safetensors.torch.save(tensors),
                "json": json.dumps(item.meta).encode(),
            }
        )
    return records


class _ShardSink:
    """Writes one input shard's records and keeps the exact float64 latent sums for meta.json."""

    def __init__(self, pattern: str, max_count: int) -> None:
        self.pattern, self.max_count = pattern, max_count
        self.writer: wds.ShardWriter | None = None
        self.sums: Tensor | None = None
        self.sq_sums: Tensor | None = None
        self.count = self.written = 0

    def write(self, encoded: list[_Encoded], encoder: TextEncoder) -> None:
        if not encoded:
            return
        # Fixed member times: the same inputs give byte-identical cache shards.
        self.writer = self.writer or wds.ShardWriter(
            self.pattern, maxcount=self.max_count, verbose=0, mtime=0.0
        )
        for item, record in zip(encoded, _records(encoded, encoder), strict=True):
            self.writer.write(record)
            flat = item.latent.double().flatten(1)
            self.sums = flat.sum(1) if self.sums is None else self.sums + flat.sum(1)
            squares = flat.pow(2).sum(1)
            self.sq_sums = squares if self.sq_sums is None else self.sq_sums + squares
            self.count += flat.shape[1]
            self.written += 1

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _encode_shard(
    index: int,
    shard: str | Path,
    out: Path,
    models: tuple[VideoVAE, TextEncoder],
    settings: CacheSettings,
    stats: BadSampleCounter,
    max_count: int,
    added: AddedCaptions | None = None,
) -> dict:
    """Cache one input shard into its own `latents-{index:06d}-*.tar` files; returns its partial.

    One output series per input shard is what lets array tasks split the work by input shard and
    a merge list the files in input order: a merged cache then reads like a single-process one.
    """
    vae, encoder = models
    sink = _ShardSink(str(out / f"latents-{index:06d}-%06d.tar"), max_count)
    pending: list[_Encoded] = []
    recaptions = added.for_shard(shard) if added is not None else {}
    try:
        for sample in iter_shard_samples([str(shard)], stats=stats):
            try:
                pending.append(_encode_media(sample, vae, settings))
            except (MediaError, KeyError, ValueError) as error:
                reason = getattr(error, "reason", type(error).__name__)
                stats.add_bad(reason, sample.shard, sample.key, str(error))
                continue
            if sample.key in recaptions:
                _add_recaption(pending[-1], added, recaptions[sample.key], sample.shard)
            if len(pending) >= TEXT_BATCH:
                sink.write(pending, encoder)
                pending = []
        sink.write(pending, encoder)
    finally:
        sink.close()
    written = sink.written
    files = sorted(p.name for p in out.glob(f"latents-{index:06d}-*.tar")) if written else []
    return {
        "index": index,
        "input": Path(shard).name,
        "files": files,
        "written": written,
        "count": sink.count,
        # float64 -> JSON -> float64 is exact, so a merge adds the very same numbers.
        "sums": sink.sums.tolist() if sink.sums is not None else None,
        "sq_sums": sink.sq_sums.tolist() if sink.sq_sums is not None else None,
    }


def _add_recaption(item: _Encoded, added: AddedCaptions, text: str, shard: str) -> None:
    """A VLM caption joins the sample's captions (its text states get cached with the others)."""
    item.captions = add_caption(item.captions, added.field, text, f"{shard}: {item.key}")
    item.meta["captions"] = item.captions


def _combine(partials: list[dict], skipped: dict[str, int], identity: dict) -> dict:
    """meta.json from per-input-shard partials, added in input order (single process or merge)."""
    partials = sorted(partials, key=lambda p: p["index"])
    sums, sq_sums, count = None, None, 0
    for partial in (p for p in partials if p["written"]):
        part_sums = torch.tensor(partial["sums"], dtype=torch.float64)
        part_sq = torch.tensor(partial["sq_sums"], dtype=torch.float64)
        sums = part_sums if sums is None else sums + part_sums
        sq_sums = part_sq if sq_sums is None else sq_sums + part_sq
        count += partial["count"]
    if sums is None:
        raise RuntimeError(
            f"no sample of {[p['input'] for p in partials]} could be cached; "
            f"see the skipped counts {skipped}"
        )
    mean = sums / count
    std = (sq_sums / count - mean.pow(2)).clamp_min(1e-12).sqrt()
    return {
        **identity,
        "latent_mean": mean.tolist(),
        "latent_std": std.tolist(),
        "num_samples": sum(p["written"] for p in partials),
        "skipped": dict(sorted(skipped.items())),
        "shards": [name for p in partials for name in p["files"]],
    }


def _identity(vae: VideoVAE, encoder: TextEncoder, settings: CacheSettings) -> dict:
    """The fields of meta.json that name the weights and settings (the cache key among them)."""
    vae_hash = state_dict_hash(vae.state_dict())
    text_hash = encoder.states_hash()
    return {
        "key": cache_key(vae_hash, text_hash, settings),
        "vae_hash": vae_hash,
        "text_hash": text_hash,
        "settings": asdict(settings),
    }


def _write_null_text(out: Path, encoder: TextEncoder) -> None:
    """States of the empty caption (classifier-free guidance), written atomically."""
    states = _text_states(encoder, [""])[0].contiguous()
    with atomic_path(out / NULL_TEXT_NAME) as tmp:
        safetensors.torch.save_file({"states": states}, str(tmp))


def _encode_shards(
    indexed: list[tuple[int, str | Path]],
    out: Path,
    vae: VideoVAE,
    encoder: TextEncoder,
    settings: CacheSettings,
    max_count: int,
    added: AddedCaptions | None = None,
) -> tuple[list[dict], dict[str, int]]:
    """Partials of the given (index, shard) pairs and the skip counts of their samples."""
    out.mkdir(parents=True, exist_ok=True)
    vae.eval()
    stats = BadSampleCounter()
    partials = [
        _encode_shard(index, shard, out, (vae, encoder), settings, stats, max_count, added)
        for index, shard in tqdm(indexed, desc="cache latents", unit="shard")
    ]
    return partials, dict(stats.counts)


def write_cache(
    shards: Iterable[str | Path],
    out_dir: str | Path,
    vae: VideoVAE,
    encoder: TextEncoder,
    settings: CacheSettings,
    *,
    max_count: int = 2000,
    added: AddedCaptions | None = None,
) -> dict:
    """Encode every readable sample of `shards` into a cache at `out_dir`; returns its meta.

    `added`: VLM captions (`captioning`) joined to each sample's own; `settings.captions` must
    name their source so the key covers them.
    """
    out = Path(out_dir)
    shards = list(shards)
    _check_added(added, settings)
    # An earlier meta.json would describe shards this run is about to overwrite: gone first, so
    # an interrupted rewrite (a full disk, a kill) leaves a cache that does not count.
    (out / META_NAME).unlink(missing_ok=True)
    with reporting_no_space(out, "the latent cache", NO_SPACE_THEN):
        partials, skipped = _encode_shards(
            list(enumerate(shards)), out, vae, encoder, settings, max_count, added
        )
        meta = _combine(partials, skipped, _identity(vae, encoder, settings))
        _write_null_text(out, encoder)
        write_json_atomic(out / META_NAME, meta)
    return meta


def write_cache_part(
    shards: Iterable[str | Path],
    out_dir: str | Path,
    vae: VideoVAE,
    encoder: TextEncoder,
    settings: CacheSettings,
    *,
    num_parts: int,
    part: int,
    max_count: int = 2000,
    added: AddedCaptions | None = None,
) -> dict:
    """One array task: cache the input shards i with i % num_parts == part (`parts.py`);
    `merge_cache_parts` then writes the meta.json `write_cache` would have written for `shards`."""
    out = Path(out_dir)
    shards = list(shards)
    mine = select_part(list(enumerate(shards)), num_parts, part)
    _check_added(added, settings)
    (out / PART_META.format(part=part)).unlink(missing_ok=True)  # as in write_cache
    with reporting_no_space(out, f"part {part} of the latent cache", NO_SPACE_THEN):
        partials, skipped = _encode_shards(mine, out, vae, encoder, settings, max_count, added)
        if part == 0:
            _write_null_text(out, encoder)
    record = {
        "num_parts": num_parts,
        "part": part,
        "inputs": [Path(s).name for s in shards],
        "identity": _identity(vae, encoder, settings),
        "partials": partials,
        "skipped": skipped,
    }
    with reporting_no_space(out, f"part {part} of the latent cache", NO_SPACE_THEN):
        write_json_atomic(out / PART_META.format(part=part), record)
    return record


def _check_added(added: AddedCaptions | None, settings: CacheSettings) -> None:
    """A cache whose key did not cover its added captions could be reused for other captions."""
    source = added.source if added is not None else ""
    if source != settings.captions:
        raise ValueError(
            f"cache settings name captions {settings.captions!r} but the added captions are "
            f"{source!r}; build the settings with train.cache.cache_settings"
        )


def merge_cache_parts(out_dir: str | Path) -> dict:
    """Combine the `meta.part-*.json` of an array run into meta.json (identical to one process's).

    Refuses, naming the files, when a part is missing or parts disagree on inputs or weights.
    """
    out = Path(out_dir)
    found = read_part_records(out, "meta.part-*.json")
    check_parts(out, [_part_record(path, record) for path, record in found])
    records = [record for _, record in found]
    skipped: dict[str, int] = {}
    for record in records:
        for reason, n in record["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + n
    partials = [p for record in records for p in record["partials"]]
    meta = _combine(partials, skipped, records[0]["identity"])
    write_json_atomic(out / META_NAME, meta)
    return meta


def _part_record(path: Path, record: dict) -> PartRecord:
    """A cache part for `parts.check_parts`: same inputs, weights and settings; its latent
    files (and, for part 0, which writes it, the null-caption states) on disk."""
    files = [name for partial in record["partials"] for name in partial["files"]]
    files += [NULL_TEXT_NAME] if record["part"] == 0 else []
    request = {k: record[k] for k in ("num_parts", "inputs", "identity")}
    return PartRecord(path, record["part"], record["num_parts"], request, tuple(files))


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


def _iter_cache_captions(cache_dir: Path, shards: list[str]) -> Iterator[tuple[str, str]]:
    """(key, caption) of every cached sample, in cache order; JSON only, no tensors."""
    for shard in shards:
        for record in wds.WebDataset(
            str(cache_dir / shard), shardshuffle=False, empty_check=False, nodesplitter=None
        ):
            if "json" in record:
                yield record["__key__"], json.loads(record["json"])["caption"]


def held_out_captions(cache_dir: str | Path, val_fraction: float, count: int) -> list[str]:
    """Captions of up to `count` held-out samples (by key), topped up from training samples.

    Why: prompts for samples and evaluation of any dataset, in the data's own caption style,
    for content the model never trained on.
    """
    meta = read_cache_meta(cache_dir)
    pairs = sorted(_iter_cache_captions(Path(cache_dir), meta["shards"]))
    held = [caption for key, caption in pairs if is_held_out(key, val_fraction)]
    rest = [caption for key, caption in pairs if not is_held_out(key, val_fraction)]
    return list(dict.fromkeys(held + rest))[:count]


def training_captions(cache_dir: str | Path, val_fraction: float, count: int) -> list[str]:
    """Up to `count` distinct captions of training samples (never held-out ones), by key.

    Why: examples of the data's caption style (the `llm` prompt expander) that never show it a
    held-out caption, since those are the prompts evaluation samples.
    """
    meta = read_cache_meta(cache_dir)
    pairs = sorted(_iter_cache_captions(Path(cache_dir), meta["shards"]))
    kept = [caption for key, caption in pairs if not is_held_out(key, val_fraction)]
    return list(dict.fromkeys(kept))[:count]


def latent_stats(meta: dict) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std used to normalise latents to unit scale for the DiT."""
    return torch.tensor(meta["latent_mean"]), torch.tensor(meta["latent_std"])


def layer_list(text: str) -> tuple[int, ...]:
    """argparse type of --text-layers: "0,-1" -> (0, -1); anything else is a usage error."""
    try:
        return tuple(int(layer) for layer in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of integers, e.g. 0,-1"
        ) from None
