"""The whole job end to end with tiny models, as real processes on real files.

One module-scoped run of `sora-pipeline experiment=tiny` feeds several checks: every step's outputs,
TensorBoard scalars read back with TensorBoard's own reader, mp4s that decode to the requested
shape, eval.json fields, resume-by-skip on re-run, and `sora-train` resuming from a checkpoint.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pipeline_checks import ONLY_EXPORT_REDONE, break_export, step_statuses

from sora_lightning.data.decode import decode_video

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (
        f"{args} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    )
    return result


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("pipeline") / "run"
    run([str(BIN / "sora-pipeline"), "experiment=tiny", f"run_dir={run_dir}"], cwd=Path.cwd())
    return run_dir


def test_every_step_produced_its_outputs(pipeline_run: Path) -> None:
    summary = json.loads((pipeline_run / "summary.json").read_text())
    assert [s["status"] for s in summary["steps"]] == ["done"] * 7
    shards = json.loads((pipeline_run / "shards" / "summary.json").read_text())
    assert shards["written"] == 14
    for rel in (
        "vae/vae.safetensors",
        "cache/meta.json",
        "dit/final/dit.safetensors",
        "export/dit.safetensors",
    ):
        assert (pipeline_run / rel).is_file(), rel


def test_samples_decode_to_requested_shape(pipeline_run: Path) -> None:
    frames, _ = decode_video((pipeline_run / "samples" / "000.mp4").read_bytes())
    assert frames.shape == (5, 16, 16, 3)


def test_eval_json_has_scores_and_chance(pipeline_run: Path) -> None:
    scores = json.loads((pipeline_run / "eval" / "eval.json").read_text())
    for key in ("colour_acc", "shape_acc", "motion_acc", "detector_acc_on_truth", "chance"):
        assert key in scores
    assert scores["detector_acc_on_truth"] >= 0.98
    # The tiny VAE barely trains, so only the form of its ceiling is checked, not its level.
    assert set(scores["vae_ceiling"]) == {"colour_acc", "shape_acc", "motion_acc"}
    assert all(0.0 <= value <= 1.0 for value in scores["vae_ceiling"].values())


def test_tensorboard_has_loss_every_step(pipeline_run: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(pipeline_run / "dit" / "tb"))
    events.Reload()
    steps = [e.step for e in events.Scalars("train/loss")]
    assert len(steps) == 6 and len(set(steps)) == 6
    assert {"train/tokens_per_s", "train/lr", "train/mfu", "train/packing_efficiency"} <= set(
        events.Tags()["scalars"]
    )
    assert (
        "samples/0" in events.Tags()["images"]
    )  # sample videos as animated GIFs (TensorBoard's video form)
    gif = events.Images("samples/0")[0].encoded_image_string
    assert gif[:6] in (b"GIF87a", b"GIF89a")


def test_rerun_skips_verified_steps_and_redoes_broken(pipeline_run: Path) -> None:
    break_export(pipeline_run)
    run([str(BIN / "sora-pipeline"), "experiment=tiny", f"run_dir={pipeline_run}"], cwd=Path.cwd())
    assert step_statuses(pipeline_run) == ONLY_EXPORT_REDONE


def test_train_resumes_from_newest_checkpoint(pipeline_run: Path, tmp_path: Path) -> None:
    common = [
        str(BIN / "sora-train"),
        "experiment=tiny",
        "task=dit",
        f"run_dir={tmp_path / 'dit'}",
        f"data.cache_dir={pipeline_run / 'cache'}",
        f"data.vae_dir={pipeline_run / 'vae'}",
    ]
    run([*common, "trainer.max_steps=3"], cwd=Path.cwd())
    assert (tmp_path / "dit" / "checkpoints" / "step=3.ckpt").is_file()
    out = run([*common, "trainer.max_steps=5"], cwd=Path.cwd())
    assert (
        "resuming from" in (out.stdout + out.stderr)
        or (tmp_path / "dit" / "checkpoints" / "step=5.ckpt").is_file()
    )
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "dit" / "tb"))
    events.Reload()
    assert sorted({e.step for e in events.Scalars("train/loss")}) == [0, 1, 2, 3, 4]
