"""Sequence parallelism switched by the curriculum, through the real `sora-train` entry.

Two CPU processes under Lightning DDP (gloo) train the tiny DiT on the session's tiny cache:
- stage 1 with sequence_parallel=1 (2 data-parallel ranks), stage 2 with sequence_parallel=2
  (both ranks share one packed video batch, Ulysses inside the DiT): the run finishes, logs the
  degree per step and finite losses;
- all stages at sequence_parallel=2 on 2 ranks must match a 1-process run step by step (same data:
  one data-parallel group either way), through DDP, loss x N, gradient clipping and AdamW;
- a degree that does not divide the world size is refused before any step, naming the stage.
Each run takes tens of seconds on 2 cores: slow.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_runs import compose_cfg, scalars, train_overrides

from sora_lightning.train.main import train

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
BIN = Path(sys.executable).parent
STAGE = "frames:[5,9],max_area:4096,token_budget:512,lr:1.0e-3,cond_probability:0.5"


def stages(first_degree: int, second_degree: int) -> str:
    return (
        f"curriculum.stages=[{{name:clips_dp,steps:2,{STAGE},sequence_parallel:{first_degree}}},"
        f"{{name:clips_sp,steps:2,{STAGE},sequence_parallel:{second_degree}}}]"
    )


def sora_train(run_dir: Path, cache_run: Path, devices: int, *extra: str) -> Path:
    args = [
        str(BIN / "sora-train"),
        *train_overrides(run_dir, cache_run, *extra),
        f"trainer.devices={devices}",
        f"strategy={'ddp' if devices > 1 else 'auto'}",
        "trainer.max_steps=4",
        "dit_train.sample_every_n_steps=1000",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(args, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, f"{args}:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return run_dir


@pytest.fixture(scope="module")
def cache_run(tiny_cache_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("sp_curriculum") / "base"
    base.symlink_to(tiny_cache_run, target_is_directory=True)
    return base


def test_stage_switches_from_data_to_sequence_parallel(cache_run: Path) -> None:
    run_dir = sora_train(cache_run.parent / "switch", cache_run, 2, stages(1, 2))
    degrees = scalars(run_dir, "train/sequence_parallel")
    assert [value for _, value in degrees] == [1.0, 1.0, 2.0, 2.0]
    losses = scalars(run_dir, "train/loss")
    assert len(losses) == 4 and all(math.isfinite(value) for _, value in losses)
    assert (run_dir / "final" / "dit.safetensors").is_file()


def test_two_rank_sequence_parallel_run_equals_one_rank(cache_run: Path) -> None:
    sharded = sora_train(cache_run.parent / "sp2", cache_run, 2, stages(2, 2))
    single = sora_train(cache_run.parent / "sp1", cache_run, 1, stages(1, 1))
    got = torch.tensor([value for _, value in scalars(sharded, "train/loss")])
    want = torch.tensor([value for _, value in scalars(single, "train/loss")])
    assert len(want) == 4
    print(f"losses sp=2 {got.tolist()} vs 1 rank {want.tolist()}")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_degree_not_dividing_world_is_a_config_error(
    cache_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cfg = compose_cfg(
        tmp_path / "bad", cache_run, stages(1, 2), "trainer.max_steps=1", "trainer.devices=1"
    )
    with pytest.raises(ValueError, match="stage 'clips_sp'.*does not divide the world size 1"):
        train(cfg)
