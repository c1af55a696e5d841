"""shards.py: write/read round trip and robust skipping of bad samples and broken tars."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from sora_lightning.data import clips
from sora_lightning.data.decode import encode_png
from sora_lightning.data.shards import (
    CONTAINER_EXTS,
    IMAGE_EXTS,
    MEDIA_EXTS,
    VIDEO_EXTS,
    BadSampleCounter,
    iter_shard_samples,
    load_samples,
    member_ext,
    write_shards,
)


def _samples(count: int) -> list[dict]:
    rng = np.random.default_rng(0)
    return [
        {
            "__key__": f"sample{i:03d}",
            "png": encode_png(rng.integers(0, 256, (8, 6, 3), dtype=np.uint8)),
            "json": {"caption": f"caption {i} é", "captions": {"short": f"c{i}"}, "frames": 1},
        }
        for i in range(count)
    ]


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_round_trip_is_byte_identical_and_deterministic(tmp_path: Path) -> None:
    samples = _samples(7)
    shards = write_shards(samples, tmp_path / "a", max_count=3)
    assert [p.name for p in shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    again = write_shards(samples, tmp_path / "b", max_count=3)
    assert [p.read_bytes() for p in shards] == [p.read_bytes() for p in again]
    stats = BadSampleCounter()
    loaded = load_samples(shards, stats=stats)
    assert [s.key for s in loaded] == [s["__key__"] for s in samples]
    assert all(
        s.media == ref["png"] and s.meta == ref["json"]
        for s, ref in zip(loaded, samples, strict=True)
    )
    assert loaded[0].media_ext == "png" and loaded[0].is_image and loaded[3].shard == str(shards[1])
    assert (stats.seen, stats.bad) == (7, 0)


def test_write_validates_samples(tmp_path: Path) -> None:
    good = _samples(1)[0]
    with pytest.raises(ValueError, match="key"):
        write_shards([{**good, "__key__": "a.b"}], tmp_path)
    with pytest.raises(ValueError, match="exactly one media"):
        write_shards([{**good, "mp4": b"x"}], tmp_path)
    with pytest.raises(ValueError, match="caption"):
        write_shards([{**good, "json": {"caption": " "}}], tmp_path)
    assert write_shards([], tmp_path / "empty") == []
    assert not list((tmp_path / "empty").glob("*.tar"))


def test_bad_samples_are_skipped_and_counted_by_reason(tmp_path: Path) -> None:
    ok = json.dumps({"caption": "fine"}).encode()
    shard = _tar(
        tmp_path / "bad.tar",
        [
            ("good1.png", b"img"), ("good1.json", ok),
            ("nomedia.json", ok),
            ("nojson.mp4", b"vid"),
            ("badutf8.mp4", b"vid"), ("badutf8.json", b'{"caption": "\xff"}'),
            ("badjson.mp4", b"vid"), ("badjson.json", b"{caption"),
            ("nocaption.mp4", b"vid"), ("nocaption.json", b'{"captions": {}}'),
            ("two.mp4", b"vid"), ("two.png", b"img"), ("two.json", ok),
            ("good2.mp4", b"vid"), ("good2.json", ok), ("good2.txt", b"extra members are ignored"),
        ],
    )  # fmt: skip
    stats = BadSampleCounter()
    loaded = list(iter_shard_samples([shard], stats=stats))
    assert [(s.key, s.media_ext, s.media) for s in loaded] == [
        ("good1", "png", b"img"),
        ("good2", "mp4", b"vid"),
    ]
    assert stats.counts == {
        "missing_media": 1,
        "missing_json": 1,
        "invalid_utf8": 1,
        "invalid_json": 1,
        "missing_caption": 1,
        "multiple_media": 1,
    }
    assert stats.seen == 8 and stats.fraction() == pytest.approx(6 / 8)


@pytest.mark.parametrize("cut", ["mid_member", "member_boundary"])
def test_truncated_tar_stops_that_shard_but_not_the_others(tmp_path: Path, cut: str) -> None:
    shards = write_shards(_samples(8), tmp_path, max_count=4)
    data = shards[0].read_bytes()
    # Members are 512-byte headers + data padded to 512; sample i's png header starts a block.
    with tarfile.open(shards[0]) as tar:
        third_png = next(m for m in tar.getmembers() if m.name == "sample002.png")
    end = third_png.offset if cut == "member_boundary" else third_png.offset_data + 10
    shards[0].write_bytes(data[:end])
    stats = BadSampleCounter()
    keys = [s.key for s in iter_shard_samples(shards, stats=stats)]
    assert keys == ["sample000", "sample001", "sample004", "sample005", "sample006", "sample007"]
    assert stats.counts == {"truncated_tar": 1}


def test_compressed_shards_read_and_cut_compressed_shards_are_caught(tmp_path: Path) -> None:
    shard = write_shards(_samples(3), tmp_path)[0]
    packed = gzip.compress(shard.read_bytes())
    (tmp_path / "s.tar.gz").write_bytes(packed)
    assert len(load_samples([tmp_path / "s.tar.gz"])) == 3
    (tmp_path / "cut.tar.gz").write_bytes(packed[:-40])
    stats = BadSampleCounter()
    assert len(load_samples([tmp_path / "cut.tar.gz"], stats=stats)) < 3
    assert stats.counts == {"truncated_tar": 1}


def test_counter_check_threshold() -> None:
    stats = BadSampleCounter()
    assert stats.fraction() == 0.0
    for _ in range(9):
        stats.add_good()
    stats.add_bad("invalid_json", "shard-000000.tar", "k")
    stats.check(0.1)
    with pytest.raises(RuntimeError, match=r"1 of 10 samples .*invalid_json"):
        stats.check(0.05)
    with pytest.raises(ValueError, match="threshold"):
        stats.check(1.5)


def test_one_rule_names_media_members() -> None:
    """Every probed container maps into the readers' lists; images are FFmpeg's `*_pipe` ones."""
    assert not set(VIDEO_EXTS) & set(IMAGE_EXTS) and MEDIA_EXTS == VIDEO_EXTS + IMAGE_EXTS
    for container, ext in CONTAINER_EXTS.items():
        assert ext in (IMAGE_EXTS if container.endswith("_pipe") else VIDEO_EXTS), container
    assert {"mp4", "mov", "mkv", "webm", "avi", "ts", "flv", "mpg", "m4v", "gif"} <= set(VIDEO_EXTS)
    assert {"png", "jpg", "jpeg", "webp"} <= set(IMAGE_EXTS)
    assert clips.IMAGE_EXTS is IMAGE_EXTS  # the clip loader decides "image" by the same list
    assert member_ext("mpegts") == "ts" and member_ext("no_such_demuxer") is None


def test_new_member_extensions_read_back(tmp_path: Path) -> None:
    ok = {"caption": "fine"}
    samples = [
        {"__key__": "clip", "ts": b"\x47ts bytes", "json": ok},
        {"__key__": "anim", "gif": b"GIF89a", "json": ok},
        {"__key__": "still", "bmp": b"BM", "json": ok},
    ]
    loaded = load_samples(write_shards(samples, tmp_path))
    assert [(s.key, s.media_ext, s.is_image) for s in loaded] == [
        ("clip", "ts", False),
        ("anim", "gif", False),
        ("still", "bmp", True),
    ]
