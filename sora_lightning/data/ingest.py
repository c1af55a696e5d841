"""Build webdataset shards from the embedded world, a folder, or a manifest (`tools/make_shards.py`).

Why here: every source ends in the same sample format (see `shards.py`), each media file is
probed and test-decoded once at ingest so training never meets a broken file it could have
been told about, and the summary (written/skipped by reason) is the step's verifiable output.
Real media bytes are stored untouched; world clips are rendered and encoded deterministically.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from sora_lightning.data import world
from sora_lightning.data.decode import (
    MediaError,
    MediaInfo,
    check_media,
    decode_image,
    encode_mp4,
    encode_png,
    probe,
)
from sora_lightning.data.shards import IMAGE_EXTS, VIDEO_EXTS, write_shards

log = logging.getLogger(__name__)

FOLDER_VIDEO_EXTS = ("mp4", "mov", "mkv", "webm", "avi")
"""Video files picked up by `shards_from_folder`."""
FOLDER_IMAGE_EXTS = ("png", "jpg", "jpeg")
"""Image files picked up by `shards_from_folder`."""
SUMMARY_NAME = "summary.json"
"""Written last in the output folder: its presence marks a finished ingest."""


def shards_from_world(
    out_dir: str | Path,
    *,
    num_clips: int,
    num_images: int,
    seed: int,
    clip_lengths: Sequence[int] | None = None,
    max_count: int = 1000,
    max_size: float = 1e9,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Render `num_clips` clips and `num_images` images of the embedded world (train split) into shards.

    Deterministic in `seed`: sample i is drawn from its own generator seeded (seed, kind, i), so
    the same seed gives byte-identical shards. Clips and images are interleaved evenly.
    """
    if num_clips < 0 or num_images < 0 or num_clips + num_images == 0:
        raise ValueError(
            f"need a positive total of clips and images, got {num_clips} and {num_images}"
        )
    lengths = tuple(clip_lengths) if clip_lengths else tuple(n for n in world.CLIP_LENGTHS if n > 1)
    if any(n < 1 for n in lengths):
        raise ValueError(f"clip lengths must be >= 1, got {lengths}")
    jobs = _interleave(
        [("clip", i) for i in range(num_clips)], [("image", i) for i in range(num_images)]
    )
    bar = tqdm(jobs, desc="world", unit="sample", disable=not progress)
    samples = (_world_sample(kind, index, seed, lengths) for kind, index in bar)
    return _write(samples, out_dir, Counter(), "world", max_count, max_size, overwrite)


def _interleave(clips: list, images: list) -> list:
    """Merge two lists by their relative position, so every shard holds a mix of both."""
    keyed = [((i + 0.5) / len(clips), 0, job) for i, job in enumerate(clips)]
    keyed += [((i + 0.5) / len(images), 1, job) for i, job in enumerate(images)]
    return [job for _, _, job in sorted(keyed, key=lambda item: item[:2])]


def _world_sample(kind: str, index: int, seed: int, lengths: Sequence[int]) -> dict:
    """Render one world scene and encode it like a real file (mp4 clip or png image)."""
    rng = np.random.default_rng([seed, 0 if kind == "clip" else 1, index])
    num_frames = int(rng.choice(lengths)) if kind == "clip" else 1
    scene = world.sample_scene(rng, num_frames=num_frames, resolution=None, split="train")
    frames = world.render(scene)  # T H W 3
    if kind == "clip":
        ext, media = "mp4", encode_mp4(frames, fps=scene.fps)
    else:
        ext, media = "png", encode_png(frames[0])
    captions = {"short": world.short_prompt(scene), "detailed": world.detailed_caption(scene)}
    meta = make_meta(
        probe(media), captions["detailed"], captions, scene=scene.to_dict(), source="world"
    )
    return {"__key__": f"world_{kind}{index:07d}", ext: media, "json": meta}


def make_meta(info: MediaInfo, caption: str, captions: dict | None = None, **extra: object) -> dict:
    """The shard JSON record: caption(s) plus what `probe` found (see `shards.py`)."""
    record = {
        "caption": caption,
        "captions": dict(captions) if captions else {"detailed": caption},
        "fps": info.fps,
        "frames": info.num_frames,
        "width": info.width,
        "height": info.height,
        "duration": info.duration,
        "codec": info.codec,
    }
    record.update({key: value for key, value in extra.items() if value is not None})
    return record


def shards_from_folder(
    in_dir: str | Path,
    out_dir: str | Path,
    *,
    max_count: int = 1000,
    max_size: float = 1e9,
    full_decode: bool = True,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Shard every video/image under `in_dir` (recursively) that has a same-stem `.txt` caption.

    Media bytes are stored untouched. Files without a usable caption or that fail to probe and
    decode are skipped and counted by reason in the summary.
    """
    root = Path(in_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"input folder {root} does not exist")
    exts = FOLDER_VIDEO_EXTS + FOLDER_IMAGE_EXTS
    files = sorted(
        p for p in root.rglob("*") if p.is_file() and p.suffix.lower().lstrip(".") in exts
    )
    skipped: Counter = Counter()
    keys: set[str] = set()

    def samples() -> Iterator[dict]:
        for path in tqdm(files, desc="files", unit="file", disable=not progress):
            caption = _read_caption(path.with_suffix(".txt"), skipped)
            if caption is not None:
                rel = path.relative_to(root).as_posix()
                sample = _media_sample(path, rel, caption, None, keys, skipped, full_decode)
                if sample is not None:
                    yield sample

    return _write(samples(), out_dir, skipped, f"folder:{root}", max_count, max_size, overwrite)


def shards_from_manifest(
    manifest: str | Path,
    out_dir: str | Path,
    *,
    max_count: int = 1000,
    max_size: float = 1e9,
    full_decode: bool = True,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Shard the rows of a CSV or JSONL manifest: `path`, `caption`, optional `captions` (a dict).

    Relative paths are resolved against the manifest's folder. Bad rows and bad files are
    skipped and counted by reason.
    """
    manifest = Path(manifest)
    rows = list(_read_manifest(manifest))
    skipped: Counter = Counter()
    keys: set[str] = set()

    def samples() -> Iterator[dict]:
        for row in tqdm(rows, desc="manifest", unit="row", disable=not progress):
            parsed = _parse_row(row, manifest.parent, skipped)
            if parsed is not None:
                path, caption, captions = parsed
                sample = _media_sample(
                    path, str(row["path"]), caption, captions, keys, skipped, full_decode
                )
                if sample is not None:
                    yield sample

    return _write(
        samples(), out_dir, skipped, f"manifest:{manifest}", max_count, max_size, overwrite
    )


def _read_caption(path: Path, skipped: Counter) -> str | None:
    """A sidecar caption, or None after counting why it is unusable."""
    if not path.is_file():
        return _skip(skipped, "missing_caption", path)
    try:
        caption = path.read_bytes().decode("utf-8").strip()
    except UnicodeDecodeError:
        return _skip(skipped, "invalid_utf8_caption", path)
    return caption if caption else _skip(skipped, "empty_caption", path)


def _skip(skipped: Counter, reason: str, what: object) -> None:
    skipped[reason] += 1
    log.warning("skipping %s: %s", what, reason)
    return None


def _media_sample(
    path: Path,
    rel: str,
    caption: str,
    captions: dict | None,
    keys: set[str],
    skipped: Counter,
    full_decode: bool,
) -> dict | None:
    """Read, probe and test-decode one file; a shard sample with its bytes untouched, or None."""
    ext = path.suffix.lower().lstrip(".")
    if ext not in VIDEO_EXTS + IMAGE_EXTS:
        return _skip(skipped, "unsupported_extension", path)
    data = path.read_bytes()
    try:
        info = check_media(data) if full_decode else _quick_check(data)
    except MediaError as error:
        return _skip(skipped, error.reason, f"{path} ({error})")
    key = _unique_key(rel, keys)
    return {"__key__": key, ext: data, "json": make_meta(info, caption, captions, source=rel)}


def _quick_check(data: bytes) -> MediaInfo:
    """Probe and decode the first frame only (for very large folders)."""
    info = probe(data)
    decode_image(data)
    return info


def _unique_key(rel: str, keys: set[str]) -> str:
    """Webdataset key from a relative path: no dots (they separate the extension), unique."""
    stem = rel.rsplit(".", 1)[0] if "." in Path(rel).name else rel
    base = re.sub(r"[^A-Za-z0-9_/-]", "_", stem).strip("/") or "sample"
    key, suffix = base, 1
    while key in keys:
        key, suffix = f"{base}_{suffix}", suffix + 1
    keys.add(key)
    return key


def _read_manifest(manifest: Path) -> Iterator[dict | None]:
    """Rows of a .csv (header with `path`, `caption`) or .jsonl; None for unparsable lines."""
    if not manifest.is_file():
        raise FileNotFoundError(f"manifest {manifest} does not exist")
    if manifest.suffix.lower() == ".csv":
        with manifest.open(newline="", encoding="utf-8") as handle:
            yield from csv.DictReader(handle)
        return
    for line in manifest.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            yield row if isinstance(row, dict) else None


def _parse_row(
    row: dict | None, base: Path, skipped: Counter
) -> tuple[Path, str, dict | None] | None:
    """Validate one manifest row -> (file path, caption, captions) or None after counting why not."""
    if row is None or not row.get("path"):
        return _skip(skipped, "invalid_row", row)
    captions = row.get("captions") or None
    if isinstance(captions, str):
        try:
            captions = json.loads(captions)
        except json.JSONDecodeError:
            return _skip(skipped, "invalid_row", row)
    if captions is not None and not isinstance(captions, dict):
        return _skip(skipped, "invalid_row", row)
    caption = str(row.get("caption") or (captions or {}).get("detailed") or "").strip()
    if not caption:
        return _skip(skipped, "empty_caption", row["path"])
    path = Path(row["path"]) if Path(row["path"]).is_absolute() else base / row["path"]
    if not path.is_file():
        return _skip(skipped, "missing_file", path)
    return path, caption, captions


def _write(
    samples: Iterable[dict],
    out_dir: str | Path,
    skipped: Counter,
    source: str,
    max_count: int,
    max_size: float,
    overwrite: bool,
) -> dict:
    """Write shards, then summary.json last (atomically) so its presence means "complete"."""
    out = Path(out_dir)
    _prepare_output(out, overwrite)
    written = Counter()

    def counted() -> Iterator[dict]:
        for sample in samples:
            written["n"] += 1
            yield sample

    shards = write_shards(counted(), out, max_count=max_count, max_size=max_size)
    summary = {
        "written": written["n"],
        "skipped": dict(sorted(skipped.items())),
        "shards": [path.name for path in shards],
        "source": source,
    }
    tmp = out / f".{SUMMARY_NAME}.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out / SUMMARY_NAME)
    return summary


def _prepare_output(out: Path, overwrite: bool) -> None:
    """Refuse to mix with an earlier ingest's shards unless told to replace them."""
    old = sorted(out.glob("shard-*.tar")) + (
        [out / SUMMARY_NAME] if (out / SUMMARY_NAME).exists() else []
    )
    if old and not overwrite:
        raise FileExistsError(
            f"{out} already holds shards ({old[0].name}, ...); pass overwrite=True / --overwrite"
        )
    for path in old:
        path.unlink()
    out.mkdir(parents=True, exist_ok=True)


def build_parser() -> argparse.ArgumentParser:
    """CLI of `tools/make_shards.py`."""
    parser = argparse.ArgumentParser(
        description="Write webdataset shards (media untouched + JSON captions)."
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--world-clips", type=int, help="render this many world clips (with --world-images)"
    )
    source.add_argument(
        "--input", type=Path, help="folder of videos/images with same-stem .txt captions"
    )
    source.add_argument(
        "--manifest", type=Path, help="CSV or JSONL manifest with path, caption[, captions]"
    )
    parser.add_argument(
        "--world-images", type=int, default=0, help="world images to render alongside clips"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the world renderer")
    parser.add_argument(
        "--output", type=Path, required=True, help="output folder for shards and summary.json"
    )
    parser.add_argument("--max-count", type=int, default=1000, help="samples per shard")
    parser.add_argument("--max-size", type=float, default=1e9, help="bytes per shard (approximate)")
    parser.add_argument(
        "--quick", action="store_true", help="decode only the first frame of each file"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace shards already in --output"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: build shards, print the summary; exit status 1 if nothing was written."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    common = {"max_count": args.max_count, "max_size": args.max_size, "overwrite": args.overwrite}
    common["progress"] = not args.no_progress
    if args.world_clips is not None:
        summary = shards_from_world(
            args.output,
            num_clips=args.world_clips,
            num_images=args.world_images,
            seed=args.seed,
            **common,
        )
    elif args.input is not None:
        summary = shards_from_folder(args.input, args.output, full_decode=not args.quick, **common)
    else:
        summary = shards_from_manifest(
            args.manifest, args.output, full_decode=not args.quick, **common
        )
    print(json.dumps(summary, indent=2))
    return 0 if summary["written"] > 0 else 1


if __name__ == "__main__":
    main()
