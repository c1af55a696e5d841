"""The SLURM pipeline's job layout, without a cluster: sharded steps become an array + a merge."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from sora_lightning.config import CONFIG_MODULE
from sora_lightning.launch.slurm import launcher_config
from sora_lightning.pipeline.slurm_runner import (
    Submitted,
    _array_indices,
    batch_script,
    step_jobs,
    step_result,
)
from sora_lightning.pipeline.steps import STEPS

STEP = {s.name: s for s in STEPS}


def pipeline_cfg(*overrides: str):
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        return compose("pipeline", overrides=["experiment=tiny", "launcher=slurm", *overrides])


@pytest.mark.parametrize(
    "name, cli, parts_arg, merge_arg",
    [
        ("shards", "data.ingest", "--num-parts=3", "--merge-summaries"),
        ("cache", "train.main", "cache.num_parts=3", "cache.merge=true"),
    ],
)
def test_sharded_steps_are_an_array_then_a_merge(
    name: str, cli: str, parts_arg: str, merge_arg: str, tmp_path: Path
) -> None:
    cfg = pipeline_cfg("launcher.array_parts=3")
    launcher = launcher_config(cfg)
    parts, merge = step_jobs(STEP[name], cfg, tmp_path, [], launcher)
    assert (parts.kind, parts.num_parts, merge.kind) == ("parts", 3, "merge")
    flat = " ".join(parts.command).replace("--num-parts 3", "--num-parts=3")
    assert parts_arg in flat
    assert "--part " not in flat and "cache.part=" not in flat  # part: $SLURM_ARRAY_TASK_ID
    assert f"sora_lightning.{cli}" in merge.command and merge_arg in merge.command
    script = batch_script(parts, tmp_path, launcher)
    assert "#SBATCH --array=0-2" in script and "--part-task" in script
    assert f"#SBATCH --output={tmp_path}/slurm/{name}-parts-%A_%a.out" in script
    merge_script = batch_script(merge, tmp_path, launcher)
    assert "--array" not in merge_script and "--part-task" not in merge_script


def test_one_part_and_unsharded_steps_stay_one_job(tmp_path: Path) -> None:
    cfg = pipeline_cfg("launcher.array_parts=1")
    (job,) = step_jobs(STEP["cache"], cfg, tmp_path, [], launcher_config(cfg))
    assert job.kind == "step" and not any("num_parts" in arg for arg in job.command)
    cfg = pipeline_cfg("launcher.nodes=2")
    (job,) = step_jobs(STEP["dit"], cfg, tmp_path, [], launcher_config(cfg))
    assert "trainer.num_nodes=2" in job.command
    assert "#SBATCH --nodes=2" in batch_script(job, tmp_path, launcher_config(cfg))


def test_array_parts_must_be_positive() -> None:
    with pytest.raises(ValueError, match="array_parts"):
        launcher_config(pipeline_cfg("launcher.array_parts=0"))


def test_pending_array_task_ranges_expand() -> None:
    assert _array_indices("[0-3]") == [0, 1, 2, 3]
    assert _array_indices("[0,2-3%2]") == [0, 2, 3]
    assert _array_indices("[5]") == [5]


def test_failed_array_tasks_are_reported_with_their_logs(tmp_path: Path) -> None:
    sub = Submitted("12", array_id="11", num_parts=2)
    states = {
        "11_0": ("COMPLETED", "0:0", "5"),
        "11_1": ("FAILED", "1:0", "3"),
        "12": ("CANCELLED", "0:0", "0"),
    }
    result = step_result("cache", sub, states, tmp_path, {})
    assert result.status == "failed"
    (part,) = result.detail["failed_parts"]
    assert part["part"] == 1 and part["state"] == "FAILED"
    assert part["log"] == str(tmp_path / "logs" / "cache.part-001.log") == result.log
    assert part["slurm_log"] == str(tmp_path / "slurm" / "cache-parts-11_1.out")


def test_cache_step_composes_the_training_config(tmp_path: Path) -> None:
    """The cache step is `sora-train task=cache` with the user's overrides, so the cache holds
    the states (model.text.layers) and settings the DiT step expects."""
    cfg = pipeline_cfg("launcher.array_parts=1", "model.text.layers=[0,-1]")
    overrides = ["experiment=tiny", "model.text.layers=[0,-1]"]
    (job,) = step_jobs(STEP["cache"], cfg, tmp_path, overrides, launcher_config(cfg))
    assert job.command[job.command.index("sora_lightning.train.main") + 1 :][:3] == [
        *overrides,
        "task=cache",
    ]
