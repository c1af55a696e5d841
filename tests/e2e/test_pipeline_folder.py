"""A user's own folder of real clips and photos through the whole tiny pipeline, as real processes.

The folder (tests/media_fixtures.py) holds 16:9, 2.35:1 and portrait clips, stills, other
containers, a corrupt and an unsupported file. Checks: every step runs, every input file is
written or counted by reason, inputs are byte-identical afterwards, eval works without the
world, a rerun is a no-op, the cache tool alone reproduces the cache key, existing shards are
read in place with a pretrained VAE, and a file the pipeline did not write is never overwritten.
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from media_fixtures import make_real_media_folder

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent
TOOLS = Path(__file__).resolve().parents[2] / "tools"


def run(args: list[str], ok: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(args, capture_output=True, text=True, timeout=900)
    if ok:
        assert result.returncode == 0, f"{args}:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file (a link: its target path) under root."""
    hashes = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            hashes[rel] = "link:" + str(path.readlink())
        elif path.is_file():
            hashes[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return hashes


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory) -> tuple[Path, Path, dict, dict]:
    base = tmp_path_factory.mktemp("own-data")
    media = base / "my_videos"
    expected = make_real_media_folder(media)
    before = tree_hashes(media)
    run_dir = base / "run"
    run(pipeline_args(media, run_dir))
    return media, run_dir, expected, before


def pipeline_args(media: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        str(BIN / "sora-pipeline"),
        "experiment=tiny",
        "dataset=folder",
        f"dataset.path={media}",
        "dataset.val_fraction=0.3",
        "samples.prompts=null",
        "samples.num_prompts=2",
        f"run_dir={run_dir}",
        *extra,
    ]


def test_every_step_ran_and_every_input_is_accounted(folder_run) -> None:
    media, run_dir, expected, _ = folder_run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [s["status"] for s in summary["steps"]] == ["done"] * 7
    shards = json.loads((run_dir / "shards" / "summary.json").read_text())
    assert shards["written"] == expected["written"]
    assert shards["skipped"] == expected["skipped"]
    assert shards["inputs"]["seen"] == expected["seen"]


def test_inputs_are_byte_identical_after_the_run(folder_run) -> None:
    media, _, _, before = folder_run
    assert tree_hashes(media) == before


def test_eval_for_any_data(folder_run) -> None:
    _, run_dir, _, _ = folder_run
    scores = json.loads((run_dir / "eval" / "eval.json").read_text())
    assert math.isfinite(scores["val_flow_loss"]) and scores["val_samples"] >= 1
    assert math.isfinite(scores["vae_psnr"]) and scores["vae_clips"] >= 1
    assert "colour_acc" not in scores  # the world's detector only runs on the world
    assert len(scores["prompts"]) == 2
    for record in scores["prompts"]:
        assert (run_dir / "eval" / "samples" / record["contact_sheet"]).stat().st_size > 0
        assert record["expanded_prompt"] == record["prompt"]  # no world grammar on user data
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "dit" / "tb"))
    events.Reload()
    logged = events.Scalars("val/flow_loss")
    assert logged[-1].value == pytest.approx(scores["val_flow_loss"], rel=1e-5)


def test_rerun_is_a_no_op(folder_run) -> None:
    media, run_dir, _, before = folder_run
    outputs = tree_hashes(run_dir / "shards") | tree_hashes(run_dir / "cache")
    run(pipeline_args(media, run_dir))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert {s["status"] for s in summary["steps"]} == {"skipped"}
    assert tree_hashes(run_dir / "shards") | tree_hashes(run_dir / "cache") == outputs
    assert tree_hashes(media) == before


def test_cache_tool_alone_gives_the_pipelines_cache_key(folder_run, tmp_path: Path) -> None:
    media, run_dir, _, _ = folder_run
    run(
        [
            sys.executable,
            str(TOOLS / "cache_latents.py"),
            "experiment=tiny",
            "dataset=folder",
            f"dataset.path={media}",
            f"data.shards={run_dir}/shards/*.tar",
            f"data.vae_dir={run_dir}/vae",
            f"data.cache_dir={tmp_path / 'cache'}",
        ]
    )
    key = json.loads((tmp_path / "cache" / "meta.json").read_text())["key"]
    assert key == json.loads((run_dir / "cache" / "meta.json").read_text())["key"]


def test_existing_shards_in_place_with_a_pretrained_vae(folder_run, tmp_path: Path) -> None:
    _, run_dir, _, _ = folder_run
    shards_before = tree_hashes(run_dir / "shards")
    second = tmp_path / "second"
    run(
        [
            str(BIN / "sora-pipeline"),
            "experiment=tiny",
            "dataset=shards",
            f"dataset.path={run_dir}/shards/*.tar",
            "dataset.val_fraction=0.3",
            f"vae.pretrained={run_dir}/vae",
            f"run_dir={second}",
            "pipeline.steps=[shards,vae,cache]",
        ]
    )
    summary = json.loads((second / "summary.json").read_text())
    assert [s["name"] for s in summary["steps"]] == ["shards", "cache"]  # no VAE training
    assert not list((second / "shards").glob("*.tar"))  # read in place, not copied
    assert tree_hashes(run_dir / "shards") == shards_before
    key = json.loads((second / "cache" / "meta.json").read_text())["key"]
    assert key == json.loads((run_dir / "cache" / "meta.json").read_text())["key"]


def test_a_file_the_pipeline_did_not_write_is_refused_and_kept(folder_run, tmp_path) -> None:
    media, _, _, _ = folder_run
    run_dir = tmp_path / "run"
    (run_dir / "shards").mkdir(parents=True)
    (run_dir / "shards" / "mine-000.tar").write_bytes(b"a user's own shard")
    result = run(pipeline_args(media, run_dir, "pipeline.steps=[shards,vae]"), ok=False)
    assert result.returncode != 0
    assert "mine-000.tar" in result.stdout + result.stderr
    assert (run_dir / "shards" / "mine-000.tar").read_bytes() == b"a user's own shard"
    assert sorted(p.name for p in run_dir.iterdir()) == ["shards"]  # nothing else written


def test_a_changed_setting_is_not_silently_reused(folder_run) -> None:
    media, run_dir, _, _ = folder_run
    before = tree_hashes(run_dir / "cache")
    result = run(pipeline_args(media, run_dir, "model.text.max_length=32"), ok=False)
    assert result.returncode != 0
    assert "other settings" in result.stdout + result.stderr and "'cache'" in result.stderr
    assert tree_hashes(run_dir / "cache") == before


@pytest.mark.slow  # two more pipeline processes, 81 s: keeps `make test` under 15 minutes
def test_another_runs_cache_is_reused_by_key(folder_run, tmp_path: Path) -> None:
    media, run_dir, _, _ = folder_run
    second = tmp_path / "reuse"
    args = pipeline_args(media, second, f"vae.pretrained={run_dir}/vae", "pipeline.steps=[cache]")
    run([*args, f"cache.reuse={run_dir}/cache"])
    reused = json.loads((second / "cache" / "reused.json").read_text())
    assert reused["key"] == json.loads((run_dir / "cache" / "meta.json").read_text())["key"]
    assert not list((second / "cache").glob("*.tar"))  # nothing encoded again
    args = pipeline_args(
        media, tmp_path / "mismatch", f"vae.pretrained={run_dir}/vae", "pipeline.steps=[cache]"
    )
    other = run([*args, f"cache.reuse={run_dir}/cache", "model.text.layers=[0,-1]"], ok=False)
    assert other.returncode != 0 and "was made with key" in other.stdout + other.stderr
