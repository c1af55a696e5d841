"""Build webdataset shards from the embedded world, a folder, or a manifest (`tools/make_shards.py`).

Why here: every source ends in the same sample format (see `shards.py`), each media file is
probed and test-decoded once at ingest so training never meets a broken file it could have
been told about, and the summary (written/skipped by reason) is the step's verifiable output.
Real media bytes are stored untouched; world clips are rendered deterministically (their mp4
bytes can still vary where x264 does, see `decode.encode_mp4`).

Scaling out: the probe + full test decode of each input (or the render of each world sample) is
a pure function of that input, so `workers` processes do it in a pool while the main process
keeps the input order (`Pool.imap`), writes the shards and counts skips: the output is the
same for any number of workers. For SLURM job arrays, `num_parts`/`part` keep only the
inputs i with i % num_parts == part and name their files after the part
(`shard-{part:03d}-{n:06d}.tar`, `summary.part-{part:03d}.json`); `merge_summaries` then writes
the dataset's `summary.json`. Keys are assigned from the whole input list before the split, so
the parts together hold exactly the samples (and keys) of one single run.

Accounting: every input ends as exactly one of a written sample, a caption sidecar, or a skip
counted by reason, and the summary says so: `"inputs": {"seen", "samples", "captions",
"skipped"}` with seen == samples + captions + skipped (checked before the summary is written,
and again when parts are merged). An input is a folder entry (every file below the folder,
hidden ones and links included), a manifest row, or a world sample. What a file is comes
from FFmpeg's probe of its bytes, never from its name: a clip saved as `.bin` is a sample, a
PDF saved as `.mov` is "unsupported_format", and the shard member is named after the probed
container (`shards.CONTAINER_EXTS`). Folder skip reasons besides the decode and caption ones:
"orphan_caption" (a `.txt` with no same-stem file), "hidden" (a name starting with "." or
inside such a folder: `.DS_Store`, `.git/`, editor backups), "symlink" (never followed, so
nothing outside the input is read and nothing is read twice), "not_regular_file" (fifos,
sockets, devices: reading them could block), "unreadable" (permissions, vanished files).
"""

from __future__ import annotations

import argparse
import csv
import functools
import hashlib
import json
import logging
import multiprocessing
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple

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
    sniff_file,
)
from sora_lightning.data.parts import (
    PartRecord,
    check_part,
    check_parts,
    read_part_records,
    resolve_part,
    select_part,
)
from sora_lightning.data.shards import member_ext, write_shards
from sora_lightning.utils import write_json_atomic

log = logging.getLogger(__name__)

KEY_FIRST_EXTS = ("mp4", "mov", "mkv", "webm", "avi", "png", "jpg", "jpeg")
"""Folder files with these extensions reserve their sample keys first, so that `clip.md` never
takes the key `clip` from `clip.mp4` (and keys stay those of earlier versions, which only took
these files). Whether a file becomes a sample is decided by probing, never by its extension."""
CAPTION_SUFFIX = ".txt"
"""A folder file's caption is the same-stem file with this suffix."""
SUMMARY_NAME = "summary.json"
"""Written last in the output folder: its presence marks a finished ingest."""
PART_SUMMARY = "summary.part-{part:03d}.json"
"""Summary of one array task (`--num-parts/--part`); `merge_summaries` combines them."""


@dataclass(frozen=True)
class Output:
    """Where and how to write shards; shared by every source."""

    out_dir: Path
    """Output folder for shards and the summary."""
    max_count: int = 1000
    """Samples per shard."""
    max_size: float = 1e9
    """Bytes per shard (approximate)."""
    overwrite: bool = False
    """Replace an earlier ingest's files instead of refusing."""
    progress: bool = True
    """Show a tqdm progress bar."""
    workers: int = 1
    """Processes that probe/decode (or render) inputs; the output does not depend on it."""
    num_parts: int | None = None
    """Split the inputs into this many array tasks (None: one run writes everything)."""
    part: int = 0
    """This task's part, in [0, num_parts)."""

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.num_parts is not None:
            check_part(self.num_parts, self.part)

    @property
    def shard_prefix(self) -> str:
        """`shard`, or `shard-{part:03d}` for an array task."""
        return "shard" if self.num_parts is None else f"shard-{self.part:03d}"

    @property
    def summary_name(self) -> str:
        """`summary.json`, or this part's `summary.part-{part:03d}.json`."""
        return SUMMARY_NAME if self.num_parts is None else PART_SUMMARY.format(part=self.part)

    def select(self, jobs: list) -> list:
        """This part's inputs: those at positions i with i % num_parts == part (`parts.py`)."""
        return select_part(jobs, self.num_parts, self.part)


class Outcome(NamedTuple):
    """One input's result: a sample, a caption sidecar, or why it was skipped (reason, what)."""

    sample: dict | None
    reason: str | None = None
    what: str = ""
    caption: bool = False


WORLD_CAPTIONS = ("full", "alt_text")
"""World caption modes: the grammar's short + detailed captions, or terse web-style alt-text."""


def _output(out_dir: str | Path, options: dict) -> Output:
    return Output(Path(out_dir), **options)


def shards_from_world(
    out_dir: str | Path,
    *,
    num_clips: int,
    num_images: int,
    seed: int,
    clip_lengths: Sequence[int] | None = None,
    max_objects: int = 3,
    speed_scale: float = 1.0,
    path_spread: float | None = None,
    captions: str = "full",
    labelled_fraction: float = 0.1,
    **options: object,
) -> dict:
    """Render `num_clips` clips and `num_images` images of the embedded world (train split) into shards.

    Deterministic in `seed`: sample i is drawn from its own generator seeded (seed, kind, i), so
    the same seed gives the same scenes, records and images (clip bytes: see `encode_mp4`).
    Clips and images are interleaved evenly; an array task (`num_parts`) takes every
    num_parts-th sample of that interleaved order. `max_objects`, `speed_scale` and `path_spread`
    configure the world (`world.sample_scene`). `options` are the fields of `Output`
    (max_count, max_size, overwrite, progress, workers, num_parts, part).
    `captions`: "full" (short + detailed, the scene's truth in the record) or "alt_text" (terse
    web-style alt-text only; `labelled_fraction` of samples, by a hash of the key, keep the
    scene's truth for a captioner to learn from, the rest carry none: see `world_scene`).
    """
    output = _output(out_dir, options)
    if captions not in WORLD_CAPTIONS or not 0.0 <= labelled_fraction <= 1.0:
        raise ValueError(
            f"captions must be one of {WORLD_CAPTIONS} and labelled_fraction in [0, 1], got "
            f"{captions!r} and {labelled_fraction}"
        )
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
    request = {"world_clips": num_clips, "world_images": num_images, "seed": seed}
    request.update(clip_lengths=list(lengths), max_objects=max_objects, speed_scale=speed_scale)
    scenes = {"max_objects": max_objects, "speed_scale": speed_scale}
    if path_spread is not None:  # a request without it stays the one older runs recorded
        request.update(path_spread=path_spread)
        scenes.update(path_spread=path_spread)
    if captions != "full":  # a request without these keys stays the one older runs recorded
        request.update(captions=captions, labelled_fraction=labelled_fraction)
    world.sample_scene(np.random.default_rng(0), num_frames=max(lengths), **scenes)  # fail fast
    labels = (captions, labelled_fraction)
    work = functools.partial(_world_job, seed=seed, lengths=lengths, scenes=scenes, labels=labels)
    return _ingest(jobs, work, output, "world", request)


def _interleave(clips: list, images: list) -> list:
    """Merge two lists by their relative position, so every shard holds a mix of both."""
    keyed = [((i + 0.5) / len(clips), 0, job) for i, job in enumerate(clips)]
    keyed += [((i + 0.5) / len(images), 1, job) for i, job in enumerate(images)]
    return [job for _, _, job in sorted(keyed, key=lambda item: item[:2])]


def _world_job(
    job: tuple[str, int],
    *,
    seed: int,
    lengths: Sequence[int],
    scenes: dict[str, Any],
    labels: tuple[str, float] = ("full", 0.0),
) -> Outcome:
    kind, index = job
    return Outcome(_world_sample(kind, index, seed, lengths, scenes, labels))


def world_scene(
    kind: str, index: int, seed: int, lengths: Sequence[int], scenes: dict[str, Any]
) -> world.Scene:
    """The scene of world sample (kind, index): regenerated from the seed, so a measurement can
    know the truth of alt-text samples whose records do not carry it."""
    rng = np.random.default_rng([seed, 0 if kind == "clip" else 1, index])
    num_frames = int(rng.choice(lengths)) if kind == "clip" else 1
    return world.sample_scene(rng, num_frames=num_frames, resolution=None, split="train", **scenes)


def is_labelled(key: str, fraction: float) -> bool:
    """Whether an alt-text world sample keeps its truth: a salted hash of the key, independent of
    the validation split (`sources.is_held_out` hashes the bare key)."""
    digest = hashlib.sha256(f"labelled:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def _world_sample(
    kind: str,
    index: int,
    seed: int,
    lengths: Sequence[int],
    scenes: dict[str, Any],
    labels: tuple[str, float] = ("full", 0.0),
) -> dict:
    """Render one world scene and encode it like a real file (mp4 clip or png image)."""
    scene = world_scene(kind, index, seed, lengths, scenes)
    frames = world.render(scene)  # T H W 3
    if kind == "clip":
        ext, media = "mp4", encode_mp4(frames, fps=scene.fps)
    else:
        ext, media = "png", encode_png(frames[0])
    key = f"world_{kind}{index:07d}"
    captions = {"short": world.short_prompt(scene), "detailed": world.detailed_caption(scene)}
    truth: dict | None = scene.to_dict()
    if labels[0] == "alt_text":
        captions = {"alt_text": world.alt_text(scene)}
        truth = truth if is_labelled(key, labels[1]) else None  # None: no "scene" in the record
    caption = captions.get("detailed", captions.get("alt_text", ""))
    meta = make_meta(probe(media), caption, captions, scene=truth, source="world")
    return {"__key__": key, ext: media, "json": meta}


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
    in_dir: str | Path, out_dir: str | Path, *, full_decode: bool = True, **options: object
) -> dict:
    """Shard every file under `in_dir` (recursively) that FFmpeg decodes and that has a same-stem
    `.txt` caption; count every other file by reason (see the module docstring).

    Media bytes are stored untouched. `options`: fields of `Output`.
    """
    output = _output(out_dir, options)
    root = Path(in_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"input folder {root} does not exist")
    entries = sorted(_walk(root, "", hidden=False), key=lambda entry: entry[0].split("/"))
    jobs, sidecars = _folder_jobs(root, entries)
    request = {"input": str(root.resolve()), "full_decode": full_decode}
    request["inputs_digest"] = _folder_digest(root, entries, sidecars)
    work = functools.partial(_folder_job, full_decode=full_decode)
    return _ingest(jobs, work, output, f"folder:{root}", request)


def _walk(folder: Path, prefix: str, *, hidden: bool) -> Iterator[tuple[str, str | None]]:
    """(relative path, skip reason, or None for a file to probe or read as a caption) of every
    entry below `folder`. Links are listed, never followed; hidden folders are walked so that
    each file in them is counted."""
    try:
        with os.scandir(folder) as listing:
            entries = list(listing)
    except OSError as error:
        log.warning("cannot list %s: %s", folder, error)
        yield prefix.rstrip("/") or ".", "unreadable"
        return
    for entry in entries:
        rel = prefix + entry.name
        in_hidden = hidden or entry.name.startswith(".")
        if entry.is_symlink():
            yield rel, "symlink"
        elif entry.is_dir(follow_symlinks=False):
            yield from _walk(Path(entry.path), f"{rel}/", hidden=in_hidden)
        elif not entry.is_file(follow_symlinks=False):
            yield rel, "not_regular_file"
        else:
            yield rel, "hidden" if in_hidden else None


def _is_caption_file(rel: str) -> bool:
    return PurePosixPath(rel).suffix.lower() == CAPTION_SUFFIX


def _stem(rel: str) -> str:
    return PurePosixPath(rel).with_suffix("").as_posix()


def _folder_jobs(root: Path, entries: list[tuple[str, str | None]]) -> tuple[list, set[str]]:
    """One job per entry, in order: an `Outcome` decided from the listing (skips, captions), or
    (path, rel, key, caption path or None) for a file to probe. Also returns the relative paths
    of the caption sidecars (a `.txt`, any case, ".txt" preferred, of a file's stem)."""
    files = [rel for rel, reason in entries if reason is None]
    candidates = [rel for rel in files if not _is_caption_file(rel)]
    texts = sorted(
        (rel for rel in files if _is_caption_file(rel)),
        key=lambda rel: not rel.endswith(CAPTION_SUFFIX),  # stable: path order otherwise
    )
    by_stem: dict[str, str] = {}
    for rel in texts:
        by_stem.setdefault(_stem(rel), rel)
    caption_of = {rel: by_stem.get(_stem(rel)) for rel in candidates}
    sidecars = {rel for rel in caption_of.values() if rel is not None}
    keys = _folder_keys(candidates)
    jobs: list = []
    for rel, reason in entries:
        if reason is not None:
            jobs.append(Outcome(None, reason, str(root / rel)))
        elif rel in keys:
            caption = caption_of[rel]
            jobs.append((root / rel, rel, keys[rel], None if caption is None else root / caption))
        elif rel in sidecars:
            jobs.append(Outcome(None, None, rel, caption=True))
        else:
            jobs.append(Outcome(None, "orphan_caption", str(root / rel)))
    return jobs, sidecars


def _folder_keys(candidates: list[str]) -> dict[str, str]:
    """Sample keys of the files to probe: those with a `KEY_FIRST_EXTS` extension first."""
    first = [rel for rel in candidates if PurePosixPath(rel).suffix.lower()[1:] in KEY_FIRST_EXTS]
    chosen = set(first)
    rest = [rel for rel in candidates if rel not in chosen]
    taken: set[str] = set()
    return {rel: _unique_key(rel, taken) for rel in first + rest}


def _folder_digest(root: Path, entries: list[tuple[str, str | None]], sidecars: set[str]) -> str:
    """Cheap fingerprint of every entry (name, kind, size, mtime; link targets; caption texts),
    so a re-run knows the folder is the same."""
    digest = hashlib.sha256()
    for rel, reason in entries:
        path = root / rel
        try:
            stat = path.lstat()
            line = f"{rel}\0{reason or ''}\0{stat.st_size}\0{stat.st_mtime_ns}"
            if reason == "symlink":
                line += f"\0{os.readlink(path)}"
            digest.update(line.encode("utf-8", "surrogateescape") + b"\n")
            if rel in sidecars:
                digest.update(path.read_bytes() + b"\0")
        except OSError as error:  # unreadable or vanished: its job says so; still fingerprinted
            digest.update(
                f"{rel}\0{reason}\0{type(error).__name__}\n".encode("utf-8", "surrogateescape")
            )
    return digest.hexdigest()


def _folder_job(job: tuple[Path, str, str, Path | None], *, full_decode: bool) -> Outcome:
    """A folder file: not media at all (unsupported_format, ...) comes before a missing caption."""
    path, rel, key, caption_path = job
    caption, reason = (None, "missing_caption")
    if caption_path is not None:
        caption, reason = _read_caption(caption_path)
    if caption is None:
        try:
            sniff_file(path)
        except MediaError as error:
            return Outcome(None, error.reason, f"{path} ({error})")
        except OSError as error:
            return Outcome(None, "unreadable", f"{path} ({error})")
        return Outcome(None, reason, f"{path} (caption {path.with_suffix(CAPTION_SUFFIX).name})")
    return _media_sample(path, rel, key, caption, None, full_decode)


def shards_from_manifest(
    manifest: str | Path, out_dir: str | Path, *, full_decode: bool = True, **options: object
) -> dict:
    """Shard the rows of a CSV or JSONL manifest: `path`, `caption`, optional `captions` (a dict).

    Relative paths are resolved against the manifest's folder. Bad rows and bad files are
    skipped and counted by reason. `options`: fields of `Output`.
    """
    output = _output(out_dir, options)
    manifest = Path(manifest)
    rows = list(_read_manifest(manifest))
    keys: set[str] = set()
    jobs = [(row, manifest.parent, _row_key(row, keys)) for row in rows]
    request = {"manifest": str(manifest.resolve()), "full_decode": full_decode}
    request["inputs_digest"] = _manifest_digest(manifest, rows)
    work = functools.partial(_manifest_job, full_decode=full_decode)
    return _ingest(jobs, work, output, f"manifest:{manifest}", request)


def _manifest_digest(manifest: Path, rows: list[dict | None]) -> str:
    """The manifest's bytes plus each named file's size and mtime (or its absence)."""
    digest = hashlib.sha256(manifest.read_bytes())
    for row in rows:
        if row and row.get("path"):
            path = _row_path(row, manifest.parent)
            try:
                stat = path.stat()
                digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
            except OSError as error:
                digest.update(f"{path}\0{type(error).__name__}\n".encode())
    return digest.hexdigest()


def _row_path(row: dict, base: Path) -> Path:
    """A row's file: absolute as given, or relative to the manifest's folder."""
    path = Path(str(row["path"]))
    return path if path.is_absolute() else base / path


def _row_key(row: dict | None, keys: set[str]) -> str | None:
    """A row's sample key, reserved before any row is processed (so array parts agree on keys)."""
    return _unique_key(str(row["path"]), keys) if row and row.get("path") else None


def _manifest_job(job: tuple[dict | None, Path, str | None], *, full_decode: bool) -> Outcome:
    row, base, key = job
    parsed = _parse_row(row, base)
    if isinstance(parsed, Outcome):
        return parsed
    path, caption, captions = parsed
    return _media_sample(path, str(row["path"]), key, caption, captions, full_decode)


def _read_caption(path: Path) -> tuple[str | None, str | None]:
    """(sidecar caption, None), or (None, reason) when it is unusable."""
    if not path.is_file():
        return None, "missing_caption"
    try:
        caption = path.read_bytes().decode("utf-8").strip()
    except UnicodeDecodeError:
        return None, "invalid_utf8_caption"
    except OSError:
        return None, "unreadable_caption"
    return (caption, None) if caption else (None, "empty_caption")


def _media_sample(
    path: Path,
    rel: str,
    key: str,
    caption: str,
    captions: dict | None,
    full_decode: bool,
) -> Outcome:
    """Probe, read and test-decode one file: a shard sample with its bytes untouched, or a skip.

    The member extension comes from the probed container, not from the file name.
    """
    try:
        sniff_file(path)  # refuses a large non-media file before reading it whole
        data = path.read_bytes()
        info = check_media(data) if full_decode else _quick_check(data)
    except MediaError as error:
        return Outcome(None, error.reason, f"{path} ({error})")
    except OSError as error:
        return Outcome(None, "unreadable", f"{path} ({error})")
    ext = member_ext(info.container)
    if ext is None:
        detail = f"FFmpeg reads it as {info.container!r}, a container shards.CONTAINER_EXTS lacks"
        return Outcome(None, "unsupported_format", f"{path} ({detail})")
    return Outcome(
        {"__key__": key, ext: data, "json": make_meta(info, caption, captions, source=_text(rel))}
    )


def _text(name: str) -> str:
    """A file name as valid Unicode for the JSON record: bytes that are not UTF-8 (which Python
    keeps as lone surrogates) become `\\xNN` escapes instead of failing the whole ingest."""
    try:
        raw = name.encode("utf-8", "surrogateescape")  # the name's own bytes
    except UnicodeEncodeError:  # a lone surrogate that no file system byte maps to (JSON "\\ud800")
        raw = name.encode("utf-8", "surrogatepass")
    return raw.decode("utf-8", "backslashreplace")


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


def _is_unicode(row: dict) -> bool:
    """False when a row holds text UTF-8 cannot encode (a JSON `\\ud800` escape): the shard
    record could not be written."""
    try:
        json.dumps(row, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _parse_row(row: dict | None, base: Path) -> tuple[Path, str, dict | None] | Outcome:
    """Validate one manifest row -> (file path, caption, captions), or the skip Outcome."""
    if row is None or not row.get("path") or not _is_unicode(row):
        return Outcome(None, "invalid_row", repr(row))
    captions = row.get("captions") or None
    if isinstance(captions, str):
        try:
            captions = json.loads(captions)
        except json.JSONDecodeError:
            return Outcome(None, "invalid_row", repr(row))
    if captions is not None and not isinstance(captions, dict):
        return Outcome(None, "invalid_row", repr(row))
    caption = str(row.get("caption") or (captions or {}).get("detailed") or "").strip()
    if not caption:
        return Outcome(None, "empty_caption", str(row["path"]))
    path = _row_path(row, base)
    if not path.is_file():
        return Outcome(None, "missing_file", str(path))
    return path, caption, captions


def _ingest(
    jobs: list, work: Callable[[object], Outcome], output: Output, source: str, request: dict
) -> dict:
    """Run `work` over this part's jobs (in a pool), write shards and the summary; idempotent.

    A finished ingest of the same request (summary present, every shard there) is returned as is
    unless `overwrite`; anything else already in the folder is refused unless `overwrite`.
    """
    request = {**request, "max_count": output.max_count, "max_size": output.max_size}
    request.update(num_parts=output.num_parts, part=output.part if output.num_parts else None)
    done = _finished(output, request)
    if done is not None:
        log.info("%s is up to date (same inputs and settings): nothing to do", output.out_dir)
        return done
    _prepare_output(output)
    skipped: Counter = Counter()
    tally: Counter = Counter()
    samples = _good_samples(_run(jobs, work, output), skipped, tally)
    summary = _write(samples, output, skipped, tally, source, request)
    check_accounting(summary, expected_seen=len(output.select(jobs)))
    write_json_atomic(output.out_dir / output.summary_name, summary, sort_keys=False)
    return summary


def _run(jobs: list, work: Callable[[object], Outcome], output: Output) -> Iterator[Outcome]:
    """Outcomes of this part's jobs in input order; jobs that are already an `Outcome` (decided
    from a folder listing) pass through, the rest are computed by `output.workers` processes."""
    mine = output.select(jobs)
    todo = [job for job in mine if not isinstance(job, Outcome)]
    bar = tqdm(total=len(mine), desc="ingest", unit="item", disable=not output.progress)
    with bar:
        if output.workers == 1:
            yield from _in_order(mine, map(work, todo), bar)
            return
        # spawn: workers start clean (no forked torch/FFmpeg state); imap keeps input order.
        context = multiprocessing.get_context("spawn")
        with context.Pool(output.workers) as pool:
            yield from _in_order(mine, pool.imap(work, todo, chunksize=1), bar)


def _in_order(mine: list, computed: Iterator[Outcome], bar: tqdm) -> Iterator[Outcome]:
    for job in mine:
        yield job if isinstance(job, Outcome) else next(computed)
        bar.update()


_QUIET_REASONS = ("hidden",)
"""Skips logged at debug level only (a `.git/` folder would flood the log)."""


def _good_samples(outcomes: Iterable[Outcome], skipped: Counter, tally: Counter) -> Iterator[dict]:
    """Samples of the outcomes; every outcome is tallied ("seen", "captions"), skips counted by
    reason and logged (in the main process)."""
    for sample, reason, what, caption in outcomes:
        tally["seen"] += 1
        if sample is not None:
            yield sample
        elif caption:
            tally["captions"] += 1
        else:
            skipped[reason] += 1
            level = logging.DEBUG if reason in _QUIET_REASONS else logging.WARNING
            log.log(level, "skipping %s: %s", what, reason)


def _write(
    samples: Iterable[dict],
    output: Output,
    skipped: Counter,
    tally: Counter,
    source: str,
    request: dict,
) -> dict:
    """Write shards; returns the summary, which the caller checks and writes last (atomically)
    so that its presence means "complete"."""
    written = Counter()

    def counted() -> Iterator[dict]:
        for sample in samples:
            written["n"] += 1
            yield sample

    shards = write_shards(
        counted(),
        output.out_dir,
        max_count=output.max_count,
        max_size=output.max_size,
        prefix=output.shard_prefix,
    )
    inputs = {"seen": tally["seen"], "samples": written["n"], "captions": tally["captions"]}
    inputs["skipped"] = sum(skipped.values())
    summary = {
        "written": written["n"],
        "skipped": dict(sorted(skipped.items())),
        "inputs": inputs,
        "shards": [path.name for path in shards],
        "source": source,
        "request": request,
    }
    return summary


def check_accounting(summary: dict, expected_seen: int | None = None) -> None:
    """Every input is a sample, a caption or a skip: raise RuntimeError (an ingest bug) if not."""
    inputs = summary.get("inputs") or {}
    parts = (inputs.get("samples"), inputs.get("captions"), inputs.get("skipped"))
    if (
        None in parts
        or inputs.get("seen") != sum(parts)
        or inputs["samples"] != summary["written"]
        or inputs["skipped"] != sum(summary["skipped"].values())
        or expected_seen not in (None, inputs["seen"])
    ):
        raise RuntimeError(
            f"input accounting does not add up: inputs={inputs}, written={summary['written']}, "
            f"skipped={summary['skipped']}, inputs listed={expected_seen}; this is a bug in ingest"
        )


def _own_files(output: Output) -> list[Path]:
    """Files an earlier ingest into this folder (or this part) left: they would mix with ours."""
    out = output.out_dir
    if output.num_parts is None:
        old = sorted(out.glob("shard-*.tar")) + sorted(out.glob("summary.part-*.json"))
    else:
        old = sorted(out.glob(f"{output.shard_prefix}-*.tar"))
    return old + ([out / output.summary_name] if (out / output.summary_name).exists() else [])


def _finished(output: Output, request: dict) -> dict | None:
    """The summary of a complete earlier ingest of exactly `request`, else None."""
    path = output.out_dir / output.summary_name
    if output.overwrite or not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    complete = all((output.out_dir / name).is_file() for name in summary.get("shards", []))
    current = "inputs" in summary  # a summary of a version without input accounting is redone
    return summary if summary.get("request") == request and complete and current else None


def _prepare_output(output: Output) -> None:
    """Refuse to mix with an earlier ingest's shards unless told to replace them."""
    old = _own_files(output)
    if old and not output.overwrite:
        raise FileExistsError(
            f"{output.out_dir} already holds files of another ingest ({old[0].name}, ...: other "
            "inputs or settings, an interrupted run, or an older version of this tool); pass "
            "overwrite=True / --overwrite"
        )
    for path in old:
        path.unlink()
    output.out_dir.mkdir(parents=True, exist_ok=True)


def merge_summaries(out_dir: str | Path) -> dict:
    """Combine the `summary.part-*.json` of an array ingest into `summary.json` (written last).

    Sums written, skipped (per reason) and the input accounting, and lists every part's shards
    in part order. Refuses when a part is missing or the parts come from different requests,
    naming the files.
    """
    out = Path(out_dir)
    found = read_part_records(out, "summary.part-*.json")
    _check_summary_parts(out, found)
    parts = [part for _, part in found]
    skipped: Counter = Counter()
    inputs: Counter = Counter()
    for part in parts:
        skipped.update(part["skipped"])
        inputs.update(part["inputs"])
    request = {k: v for k, v in parts[0]["request"].items() if k != "part"}
    summary = {
        "written": sum(part["written"] for part in parts),
        "skipped": dict(sorted(skipped.items())),
        "inputs": {key: inputs[key] for key in ("seen", "samples", "captions", "skipped")},
        "shards": [name for part in parts for name in part["shards"]],
        "source": parts[0]["source"],
        "request": request,
    }
    check_accounting(summary)
    write_json_atomic(out / SUMMARY_NAME, summary, sort_keys=False)
    return summary


def _check_summary_parts(out: Path, found: list[tuple[Path, dict]]) -> None:
    """The parts protocol (`parts.check_parts`), then: every part has input accounting."""
    records = []
    for path, part in found:
        request = dict(part.get("request", {}))
        index, num_parts = request.pop("part", None), request.get("num_parts")
        if index is None or num_parts is None:
            raise ValueError(f"{path} is not the summary of an array task (no part/num_parts)")
        records.append(PartRecord(path, index, num_parts, request, tuple(part["shards"])))
    check_parts(out, records)
    old = [path.name for path, part in found if "inputs" not in part]
    if old:
        raise ValueError(
            f"{out}: {old} lack input accounting (an older version): rerun those parts"
        )


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
    source.add_argument(
        "--merge-summaries",
        action="store_true",
        help="combine the summary.part-*.json of --output into summary.json (after an array)",
    )
    parser.add_argument(
        "--world-images", type=int, default=0, help="world images to render alongside clips"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the world renderer")
    parser.add_argument(
        "--world-clip-lengths",
        type=lambda text: [int(n) for n in text.split(",")],
        default=None,
        help="comma-separated frame counts of world clips (default: 5,9,17,33)",
    )
    parser.add_argument("--world-max-objects", type=int, default=3, help="objects per world scene")
    parser.add_argument(
        "--world-speed-scale", type=float, default=1.0, help="multiplier on world object speeds"
    )
    parser.add_argument(
        "--world-path-spread",
        type=float,
        default=None,
        help="translating objects' path midpoints within this share of the frame from its centre",
    )
    parser.add_argument(
        "--world-captions", choices=WORLD_CAPTIONS, default="full", help="full or alt_text only"
    )
    parser.add_argument(
        "--world-labelled-fraction",
        type=float,
        default=0.1,
        help="alt_text: share of samples (by key hash) that keep the scene's truth",
    )
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
    parser.add_argument(
        "--workers", type=int, default=1, help="processes probing/decoding inputs (same output)"
    )
    parser.add_argument(
        "--num-parts", type=int, default=None, help="SLURM array: split inputs into this many parts"
    )
    parser.add_argument(
        "--part", type=int, default=None, help="SLURM array: this task's part (inputs i % P == I)"
    )
    return parser


def _parts(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict:
    """--num-parts/--part come together; --part defaults to $SLURM_ARRAY_TASK_ID (`parts.py`)."""
    try:
        part = resolve_part(args.num_parts, args.part, names=("--num-parts", "--part"))
    except ValueError as error:
        parser.error(str(error))
    return {} if part is None else {"num_parts": args.num_parts, "part": part}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: build shards, print the summary; exit status 1 if nothing was written."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.merge_summaries:
        summary = merge_summaries(args.output)
        print(json.dumps(summary, indent=2))
        return 0 if summary["written"] > 0 else 1
    common = {"max_count": args.max_count, "max_size": args.max_size, "overwrite": args.overwrite}
    common.update(progress=not args.no_progress, workers=args.workers, **_parts(args, parser))
    if args.world_clips is not None:
        summary = shards_from_world(
            args.output,
            num_clips=args.world_clips,
            num_images=args.world_images,
            seed=args.seed,
            clip_lengths=args.world_clip_lengths,
            max_objects=args.world_max_objects,
            speed_scale=args.world_speed_scale,
            path_spread=args.world_path_spread,
            captions=args.world_captions,
            labelled_fraction=args.world_labelled_fraction,
            **common,
        )
    elif args.input is not None:
        summary = shards_from_folder(args.input, args.output, full_decode=not args.quick, **common)
    else:
        summary = shards_from_manifest(
            args.manifest, args.output, full_decode=not args.quick, **common
        )
    print(json.dumps(summary, indent=2))
    return 0 if summary["written"] > 0 or args.num_parts else 1


if __name__ == "__main__":
    main()
