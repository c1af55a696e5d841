"""DDP, DeepSpeed ZeRO-3 and FSDP2 with two real processes (gloo on CPU), through `sora-train`.

One small latent cache per module (`sora-pipeline experiment=tiny pipeline.steps=[shards,vae,cache]`)
feeds 4-step DiT runs: ZeRO-3 and FSDP2 must really shard (each rank stores half of the DiT),
match DDP's losses step by step, resume exactly from a mid-run checkpoint, and consolidate into one
safetensors file that `sora-sample` loads. Lightning spawns the second process itself
(accelerator=cpu devices=2). Every run is a few tens of seconds on 2 cores, so all are slow.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from sora_lightning.train.export import consolidate_checkpoint

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
BIN = Path(sys.executable).parent
STEPS = 4
LOSS_RTOL = (
    1e-4  # fp32 on CPU: only the order of the gradient reductions differs between strategies
)


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, (
        f"{args} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    )
    return result


@pytest.fixture(scope="module")
def cache_run(tiny_cache_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's tiny cache, seen from a folder of this module's own (runs go beside it)."""
    base = tmp_path_factory.mktemp("strategies") / "base"
    base.symlink_to(tiny_cache_run, target_is_directory=True)
    return base


def train(base: Path, run_dir: Path, strategy: str) -> Path:
    run(
        [
            str(BIN / "sora-train"),
            "experiment=tiny",
            "task=dit",
            f"run_dir={run_dir}",
            f"data.cache_dir={base / 'cache'}",
            f"data.vae_dir={base / 'vae'}",
            "trainer.devices=2",
            f"strategy={strategy}",
            f"trainer.max_steps={STEPS}",
            "checkpoint.every_n_steps=2",
            "checkpoint.keep_last=3",
        ],
        cwd=Path.cwd(),
    )
    return run_dir


@pytest.fixture(scope="module")
def runs(cache_run: Path) -> dict[str, Path]:
    root = cache_run.parent
    return {
        name: train(cache_run, root / name, name) for name in ("ddp", "deepspeed_zero3", "fsdp2")
    }


def losses(run_dir: Path) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    return [event.value for event in events.Scalars("train/loss")]


@pytest.mark.parametrize("strategy", ["deepspeed_zero3", "fsdp2"])
def test_each_rank_stores_half_of_the_dit(runs: dict[str, Path], strategy: str) -> None:
    reports = [
        json.loads((runs[strategy] / "sharding" / f"rank{r}.json").read_text()) for r in (0, 1)
    ]
    full = reports[0]["full_numel"]
    for report in reports:
        assert report["world_size"] == 2
        assert 0.45 * full <= report["local_numel"] <= 0.55 * full, report
    ddp = json.loads((runs["ddp"] / "sharding" / "rank0.json").read_text())
    assert ddp["local_numel"] == ddp["full_numel"] == full


@pytest.mark.parametrize("strategy", ["deepspeed_zero3", "fsdp2"])
def test_losses_match_ddp(runs: dict[str, Path], strategy: str) -> None:
    reference, sharded = losses(runs["ddp"]), losses(runs[strategy])
    assert len(reference) == len(sharded) == STEPS
    torch.testing.assert_close(
        torch.tensor(sharded), torch.tensor(reference), rtol=LOSS_RTOL, atol=1e-6
    )


@pytest.mark.parametrize("strategy", ["deepspeed_zero3", "fsdp2"])
def test_sharded_ema_matches_ddp(runs: dict[str, Path], strategy: str) -> None:
    reference = safetensors.torch.load_file(str(runs["ddp"] / "final" / "dit.safetensors"))
    sharded = safetensors.torch.load_file(str(runs[strategy] / "final" / "dit.safetensors"))
    assert sharded.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(sharded[key], reference[key], rtol=1e-3, atol=1e-3, msg=key)
    assert any(not torch.equal(reference[k], torch.zeros_like(reference[k])) for k in reference)


def test_zero3_resume_continues_exactly(runs: dict[str, Path]) -> None:
    uninterrupted = runs["deepspeed_zero3"]
    resumed = uninterrupted.parent / "zero3_resumed"
    shutil.copytree(
        uninterrupted / "checkpoints",
        resumed / "checkpoints",
        ignore=shutil.ignore_patterns(f"step={STEPS}.ckpt"),
    )
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["step=2.ckpt"]
    train(uninterrupted.parent / "base", resumed, "deepspeed_zero3")
    for weights in ("dit", "ema"):
        expected, _ = consolidate_checkpoint(
            uninterrupted / "checkpoints" / f"step={STEPS}.ckpt", weights
        )
        got, extra = consolidate_checkpoint(resumed / "checkpoints" / f"step={STEPS}.ckpt", weights)
        assert extra["steps"] == STEPS
        for (name, want), have in zip(
            expected.state_dict().items(), got.state_dict().values(), strict=True
        ):
            assert torch.equal(want, have), f"{weights}.{name} differs after resume"


@pytest.mark.parametrize("strategy", ["deepspeed_zero3", "fsdp2"])
def test_export_consolidates_and_sora_sample_loads_it(runs: dict[str, Path], strategy: str) -> None:
    run_dir = runs[strategy]
    export = run_dir / "export"
    run(
        [
            sys.executable,
            "tools/export_weights.py",
            "--checkpoint",
            str(run_dir / "checkpoints" / f"step={STEPS}.ckpt"),
            "--output",
            str(export),
        ],
        cwd=Path.cwd(),
    )
    exported = safetensors.torch.load_file(str(export / "dit.safetensors"))
    final = safetensors.torch.load_file(
        str(run_dir / "final" / "dit.safetensors")
    )  # EMA gathered in training
    assert all(torch.equal(exported[k], final[k]) for k in final)
    out = run_dir / "samples"
    run(
        [
            str(BIN / "sora-sample"),
            f"ckpt={export}",
            f"out_dir={out}",
            "prompts=['a red circle moves left']",
            "sampling.frames=5",
            "sampling.height=16",
            "sampling.width=16",
            "sampling.steps=2",
        ],
        cwd=Path.cwd(),
    )
    assert (out / "000.mp4").stat().st_size > 0
