"""Webdataset tar shards: write samples, read them back robustly.

A sample is a key, one media member with its bytes untouched ("mp4"/"mov"/"ts"/... for video,
"png"/"jpg"/... for images; `CONTAINER_EXTS` names a member after the probed container, not
after the input's file name) and a UTF-8 "json" record:
{"caption": detailed caption, "captions": {"short": ..., "detailed": ...}, "fps", "frames",
"width", "height", "duration", "codec", optional "scene", optional "source"}.

Reading decodes nothing implicitly (no pickle, no torch.load): bytes stay bytes and JSON is
parsed with `json.loads`. Bad data is skipped, counted by reason in a `BadSampleCounter` and
logged with shard and key, so one broken file never stops a training run but a broken dataset
does (`BadSampleCounter.check`).
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import json
import logging
import lzma
import re
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger(__name__)

CONTAINER_EXTS = {
    "mp4": "mp4",
    "mov": "mov",
    "matroska": "mkv",
    "webm": "webm",
    "avi": "avi",
    "mpegts": "ts",
    "flv": "flv",
    "mpeg": "mpg",
    "mpegvideo": "m2v",
    "m4v": "m4v",
    "asf": "wmv",
    "ogg": "ogv",
    "gif": "gif",
    "apng": "apng",
    "mxf": "mxf",
    "nut": "nut",
    "yuv4mpegpipe": "y4m",
    "ivf": "ivf",
    "h264": "h264",
    "hevc": "hevc",
    "mjpeg": "mjpeg",
    "png_pipe": "png",
    "jpeg_pipe": "jpg",
    "webp_pipe": "webp",
    "bmp_pipe": "bmp",
    "tiff_pipe": "tiff",
    "qoi_pipe": "qoi",
    "ppm_pipe": "ppm",
    "pgm_pipe": "pgm",
    "pam_pipe": "pam",
    "jpegxl_pipe": "jxl",
}
"""Probed container (`decode.MediaInfo.container`, FFmpeg's demuxer name with mp4/mov and
matroska/webm told apart) -> the member extension ingest stores its bytes under.

The one rule for naming media members: ingest names a member after what FFmpeg found in the
bytes, never after the input's file name. "m4v" is FFmpeg's raw MPEG-4 part 2 stream; an
iTunes-style .m4v file is ISO-BMFF and probes as "mp4". A 1-frame GIF is a 1-frame clip.
Containers missing here are refused at ingest ("unsupported_format"): add them here, where
the readers see them too.
"""
_LEGACY_EXTS = ("jpeg", "tif")
"""Accepted when reading (other writers use them) though ingest writes "jpg" and "tiff"."""
IMAGE_EXTS = tuple(
    dict.fromkeys(
        [ext for name, ext in CONTAINER_EXTS.items() if name.endswith("_pipe")] + list(_LEGACY_EXTS)
    )
)
"""Member extensions holding still-image bytes (FFmpeg's `*_pipe` image demuxers)."""
VIDEO_EXTS = tuple(dict.fromkeys(ext for ext in CONTAINER_EXTS.values() if ext not in IMAGE_EXTS))
"""Member extensions holding video bytes (animated GIF/APNG included)."""
MEDIA_EXTS = VIDEO_EXTS + IMAGE_EXTS


def member_ext(container: str) -> str | None:
    """The member extension for bytes FFmpeg probed as `container`; None when shards have none."""
    return CONTAINER_EXTS.get(container)


BAD_SAMPLE_REASONS = (
    "missing_media",
    "multiple_media",
    "zero_byte",
    "missing_json",
    "missing_caption",
    "invalid_utf8",
    "invalid_json",
    "truncated_tar",
    "duplicate_key",
)
"""Reasons `iter_shard_samples` skips a sample for."""

# webdataset's rule: the key is the member path up to the first dot of its file name.
_MEMBER_RE = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


@dataclass
class RawSample:
    """One sample as stored: media bytes still encoded, metadata parsed."""

    key: str
    """Sample key, unique within its shard."""
    shard: str
    """Path of the shard it came from (for error messages and resumption)."""
    media: bytes
    """Media file bytes, exactly as written."""
    media_ext: str
    """Member extension of the media, e.g. "mp4" or "png"."""
    meta: dict
    """The parsed JSON record (always has a non-empty "caption")."""

    @property
    def is_image(self) -> bool:
        """True for still-image members."""
        return self.media_ext in IMAGE_EXTS


@dataclass
class BadSampleCounter:
    """Counts skipped samples by reason so a run can fail loudly when data is mostly broken."""

    counts: dict[str, int] = field(default_factory=dict)
    """Skipped samples per reason."""
    seen: int = 0
    """All samples looked at, good or bad."""
    examples: dict[str, list[str]] = field(default_factory=dict)
    """Per reason, the first `MAX_EXAMPLES` "shard: key" places, so an abort can name them."""

    MAX_EXAMPLES = 5

    @classmethod
    def from_counts(cls, counts: dict[str, int], num_good: int, where: str) -> BadSampleCounter:
        """A counter rebuilt from saved counts (a latent cache's `skipped`); `where` names the source."""
        clean = {reason: int(n) for reason, n in counts.items() if int(n) > 0}
        examples = {reason: [f"{where}: (keys not recorded)"] for reason in clean}
        return cls(counts=clean, seen=num_good + sum(clean.values()), examples=examples)

    @property
    def bad(self) -> int:
        """Total skipped samples."""
        return sum(self.counts.values())

    def add_good(self) -> None:
        """Record a sample that was usable."""
        self.seen += 1

    def add_bad(self, reason: str, shard: str, key: str, detail: str = "") -> None:
        """Record and log a skipped sample."""
        self.seen += 1
        self.counts[reason] = self.counts.get(reason, 0) + 1
        places = self.examples.setdefault(reason, [])
        if len(places) < self.MAX_EXAMPLES:
            places.append(f"{shard}: {key}")
        log.warning(
            "skipping sample %r in %s: %s%s", key, shard, reason, f" ({detail})" if detail else ""
        )

    def fraction(self) -> float:
        """Fraction of seen samples that were bad (0 when nothing was seen)."""
        return self.bad / self.seen if self.seen else 0.0

    def check(self, threshold: float) -> None:
        """Raise RuntimeError when more than `threshold` of the samples were bad."""
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        if self.fraction() > threshold:
            raise RuntimeError(
                f"{self.bad} of {self.seen} samples ({self.fraction():.1%}) were bad, above the allowed "
                f"{threshold:.1%}; reasons: {dict(sorted(self.counts.items()))}; first places: "
                f"{self.describe()}. Fix or drop those shards (tools/make_shards.py test-decodes "
                "every file), or raise data.max_bad_fraction."
            )

    def describe(self) -> str:
        """`reason -> shard: key, ...` for the recorded places, one reason after another."""
        return "; ".join(
            f"{reason} -> {', '.join(places)}" for reason, places in sorted(self.examples.items())
        )


SHARDS_NO_SPACE_THEN = (
    "the shard in progress was removed and the summary is not written, so nothing counts as "
    "done; free space and rerun with --overwrite"
)


def write_shards(
    samples: Iterable[dict],
    out_dir: str | Path,
    *,
    max_count: int = 1000,
    max_size: float = 1e9,
    prefix: str = "shard",
) -> list[Path]:
    """Write samples to `out_dir/{prefix}-%06d.tar`; returns the shard paths written.

    Each sample is {"__key__": str, <one media ext>: bytes, "json": dict | bytes}. Tar member
    times are fixed, so the same samples give byte-identical shards.
    """
    if max_count < 1 or max_size <= 0:
        raise ValueError(f"max_count must be >= 1 and max_size > 0, got {max_count}, {max_size}")
    import webdataset as wds  # imported here: it pulls in torch, which readers do not need

    from sora_lightning.utils import reporting_no_space  # torch too

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    num_samples = 0
    pattern = str(out / f"{prefix}-%06d.tar")
    writer = wds.ShardWriter(
        pattern,
        maxcount=max_count,
        maxsize=max_size,
        post=lambda name: written.append(Path(name)),
        verbose=0,
        encoder=False,
        mtime=0.0,
    )
    try:
        with reporting_no_space(out, f"{prefix}-*.tar", SHARDS_NO_SPACE_THEN), writer:
            for sample in samples:
                writer.write(_encode_sample(sample))
                num_samples += 1
    except BaseException:
        if writer.fname is not None:  # the shard in progress may be cut short: never leave it
            Path(writer.fname).unlink(missing_ok=True)
        raise
    if num_samples == 0:  # ShardWriter always opens one shard; an empty tar is not a shard
        for path in written:
            path.unlink(missing_ok=True)
        return []
    return written


def _encode_sample(sample: dict) -> dict:
    """Validate one sample dict and turn its JSON record into UTF-8 bytes."""
    key = sample.get("__key__")
    if (
        not isinstance(key, str)
        or _MEMBER_RE.match(f"{key}.json") is None
        or "." in key.rsplit("/", 1)[-1]
    ):
        raise ValueError(
            f"sample key {key!r} must be a non-empty string without dots in its file name part"
        )
    media = [ext for ext in sample if ext in MEDIA_EXTS]
    if len(media) != 1:
        raise ValueError(
            f"sample {key!r} must have exactly one media member from {MEDIA_EXTS}, got {media}"
        )
    meta = sample.get("json")
    if isinstance(meta, dict):
        if not str(meta.get("caption", "")).strip():
            raise ValueError(f"sample {key!r} has no caption in its json record")
        meta = json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8")
    if not isinstance(meta, bytes):
        raise ValueError(f"sample {key!r} needs a 'json' member (dict or bytes)")
    return {"__key__": key, media[0]: bytes(sample[media[0]]), "json": meta}


def iter_shard_samples(
    paths: Iterable[str | Path], *, stats: BadSampleCounter | None = None
) -> Iterator[RawSample]:
    """Stream `RawSample`s from tar shards in order, skipping (and counting) bad samples.

    A truncated or corrupt tar counts as "truncated_tar" once and the rest of that shard is
    skipped; reading goes on with the next shard.
    """
    stats = BadSampleCounter() if stats is None else stats
    for path in paths:
        yield from _iter_one_shard(str(path), stats)


def load_samples(
    paths: Iterable[str | Path], *, stats: BadSampleCounter | None = None
) -> list[RawSample]:
    """All good samples of small shards, held in memory (tests, tiny datasets, evaluation)."""
    return list(iter_shard_samples(paths, stats=stats))


def _iter_one_shard(shard: str, stats: BadSampleCounter) -> Iterator[RawSample]:
    """Group a shard's members by key (webdataset keeps a sample's members adjacent).

    A key met again later in the shard is skipped as "duplicate_key" (the first group counts,
    as `streaming.read_plan` keeps it too): one key, one sample, whatever a tar holds.
    """
    key, members, seen = None, {}, set()
    try:
        with open(shard, "rb") as handle, _decompressed(handle) as stream:
            reader = _TailReader(stream)
            with tarfile.open(fileobj=reader, mode="r|") as tar:
                for info in tar:
                    match = _MEMBER_RE.match(info.name)
                    if not info.isfile() or match is None:
                        continue
                    if match.group(1) != key:
                        sample = _group_sample(key, shard, members, stats, seen)
                        if sample is not None:
                            yield sample
                        key, members = match.group(1), {}
                    members[match.group(2).lower()] = tar.extractfile(info).read()
                reader.check_end_marker(tar.offset)
    except (tarfile.TarError, EOFError, OSError, lzma.LZMAError) as error:
        stats.add_bad("truncated_tar", shard, key or "<start>", f"{type(error).__name__}: {error}")
        return
    sample = _group_sample(key, shard, members, stats, seen)
    if sample is not None:
        yield sample


def _group_sample(
    key: str | None, shard: str, members: dict, stats: BadSampleCounter, seen: set[str]
) -> RawSample | None:
    """One finished member group as a sample, or None (no group yet, bad, or a repeated key)."""
    if key is None:
        return None
    if key in seen:
        stats.add_bad("duplicate_key", shard, key, "the key appeared earlier in this shard")
        return None
    seen.add(key)
    return raw_sample(key, shard, members, stats)


def _decompressed(handle: BinaryIO) -> BinaryIO:
    """Decompress .tar.gz/.bz2/.xz with the stdlib readers, which raise on a cut stream."""
    magic = handle.read(6)
    handle.seek(0)
    if magic.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=handle, mode="rb")
    if magic.startswith(b"BZh"):
        return bz2.BZ2File(handle, mode="rb")
    if magic.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(handle, mode="rb")
    return contextlib.nullcontext(handle)


class _TailReader:
    """Sequential reader that remembers the last bytes read.

    tarfile stops quietly when a tar is cut exactly between members; the end-of-archive zero
    block (or its absence) after the last member tells the two apart.
    """

    _TAIL = 1 << 16

    def __init__(self, stream: BinaryIO) -> None:
        self.stream, self.position, self.tail = stream, 0, b""

    def read(self, size: int = -1) -> bytes:
        """Read like the wrapped stream, keeping the tail."""
        data = self.stream.read(size)
        self.position += len(data)
        self.tail = (
            data[-self._TAIL :] if len(data) >= self._TAIL else (self.tail + data)[-self._TAIL :]
        )
        return data

    def check_end_marker(self, offset: int) -> None:
        """Raise tarfile.ReadError unless a zero block follows the last member at `offset`."""
        start = offset - (self.position - len(self.tail))
        block = self.tail[start : start + tarfile.BLOCKSIZE] if start >= 0 else b""
        if len(block) < tarfile.BLOCKSIZE or block.count(0) != tarfile.BLOCKSIZE:
            raise tarfile.ReadError(
                f"no end-of-archive block at byte {offset}: the tar was cut short"
            )


def raw_sample(
    key: str, shard: str, members: dict[str, bytes], stats: BadSampleCounter
) -> RawSample | None:
    """Turn one key's members (ext -> bytes) into a RawSample, or count why it cannot be one (None).

    Shared by this module's reader and the webdataset streaming reader, so both agree on what a
    bad sample is.
    """
    media = [ext for ext in members if ext in MEDIA_EXTS]
    meta, problem = _parse_meta(members.get("json"))
    if len(media) != 1:
        problem = ("missing_media" if not media else "multiple_media", f"members {sorted(members)}")
    elif not members[media[0]]:
        problem = ("zero_byte", f"{media[0]} member is empty")
    if problem is not None:
        stats.add_bad(problem[0], shard, key, problem[1])
        return None
    stats.add_good()
    return RawSample(key=key, shard=shard, media=members[media[0]], media_ext=media[0], meta=meta)


def _parse_meta(raw: bytes | None) -> tuple[dict, tuple[str, str] | None]:
    """JSON member bytes -> (record, None), or ({}, (reason, detail)) when unusable."""
    if raw is None:
        return {}, ("missing_json", "")
    try:
        meta = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as error:
        return {}, ("invalid_utf8", str(error))
    except json.JSONDecodeError as error:
        return {}, ("invalid_json", str(error))
    caption = meta.get("caption") if isinstance(meta, dict) else None
    if not isinstance(caption, str) or not caption.strip():
        return {}, ("missing_caption", "no non-empty 'caption' string")
    return meta, None
