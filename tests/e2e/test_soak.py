"""Soak: a tiny `sora-train task=vae` SIGKILLed ten times at seeded random moments, resumed each
time, ends with weights bit-identical to an uninterrupted run.

The run trains 40 steps and checkpoints after every one (so kills land in startup, inside steps
and inside checkpoint writes). Each moment is drawn from a fixed seed: either a delay after the
process starts (startup, the first steps), or a short delay after the run's n-th new checkpoint
manifest appears (n of 1-3). Every resume must pick a checkpoint that verifies; the final
`vae.safetensors` must equal the uninterrupted run's byte for byte, and the last checkpoint's
weights, optimizer state and step must be equal tensor for tensor.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sora_lightning.train.checkpoint import find_resume_checkpoint, step_of
from sora_lightning.utils import file_sha256

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
BIN = Path(sys.executable).parent
STEPS = 40
KILLS = 10
SEED = 20261207


def args(run_dir: Path, shards: Path) -> list[str]:
    return [
        str(BIN / "sora-train"),
        "experiment=tiny",
        "task=vae",
        f"run_dir={run_dir}",
        f"data.shards={shards}/*.tar",
        f"vae_train.steps={STEPS}",
        "checkpoint.every_n_steps=1",
        "checkpoint.keep_last=2",
        "trainer.deterministic=true",
        "trainer.enable_progress_bar=false",
    ]


def env() -> dict[str, str]:
    """One thread in every run: another count reorders float sums."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def newest_step(folder: Path) -> int:
    """The highest N of a `step=N.manifest.json` in `folder` (0 when none)."""
    steps = [
        int(m.group(1))
        for p in folder.glob("step=*.manifest.json")
        if (m := re.match(r"step=(\d+)\.manifest\.json$", p.name))
    ]
    return max(steps, default=0)


def moments(seed: int) -> list[tuple[int, float]]:
    """(checkpoints to wait for, then seconds to wait): 0 checkpoints means seconds after start."""
    rng = random.Random(seed)
    drawn = []
    for _ in range(KILLS):
        after = rng.choice([0, 1, 1, 2, 3])
        drawn.append((after, round(rng.uniform(0.0, 0.4) if after else rng.uniform(0.5, 9.0), 3)))
    return drawn


def kill_at(moment: tuple[int, float], run_dir: Path, shards: Path, log: Path) -> dict:
    """Run until `moment`, SIGKILL; what it had reached."""
    after, delay = moment
    folder = run_dir / "checkpoints"
    start_step = newest_step(folder)
    with open(log, "w") as out:
        process = subprocess.Popen(
            args(run_dir, shards), stdout=out, stderr=subprocess.STDOUT, env=env()
        )
        deadline = time.monotonic() + 600
        while after and newest_step(folder) < start_step + after and process.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        time.sleep(delay)
        assert process.poll() is None, (
            f"the run ended before its kill at {moment}:\n{log.read_text()[-2000:]}"
        )
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    resume = find_resume_checkpoint(folder)
    return {
        "moment": moment,
        "from_step": start_step,
        "newest_manifest": newest_step(folder),
        "resumes_from": step_of(resume) if resume else None,
        "left": sorted(p.name for p in folder.iterdir()) if folder.is_dir() else [],
    }


@pytest.fixture(scope="module")
def uninterrupted(tiny_cache_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("soak_reference") / "vae"
    result = subprocess.run(
        args(run_dir, tiny_cache_run / "shards"), capture_output=True, text=True, env=env()
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run_dir


def test_ten_kills_then_resume_is_bit_identical(
    uninterrupted: Path, tiny_cache_run: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "vae"
    shards = tiny_cache_run / "shards"
    seen = []
    for index, moment in enumerate(moments(SEED)):
        seen.append(kill_at(moment, run_dir, shards, tmp_path / f"kill-{index}.log"))
        newest = seen[-1]["newest_manifest"]
        assert seen[-1]["resumes_from"] == (newest or None), "the newest manifest's file verifies"
    print(json.dumps(seen, indent=1))
    assert seen[-1]["resumes_from"], (
        "ten kills and not one checkpoint: the moments never reached training"
    )

    result = subprocess.run(args(run_dir, shards), capture_output=True, text=True, env=env())
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert f"(step {seen[-1]['resumes_from']})" in output, "the last run must resume"
    assert file_sha256(run_dir / "vae.safetensors") == file_sha256(
        uninterrupted / "vae.safetensors"
    )
    final = f"checkpoints/step={STEPS}.ckpt"
    expected = torch.load(uninterrupted / final, weights_only=True)
    actual = torch.load(run_dir / final, weights_only=True)
    assert expected["global_step"] == actual["global_step"] == STEPS
    for name in ("state_dict", "optimizer_states"):
        flat_expected, flat_actual = flatten(expected[name]), flatten(actual[name])
        assert flat_expected.keys() == flat_actual.keys(), name
        for key, value in flat_expected.items():
            same = (
                torch.equal(value, flat_actual[key])
                if isinstance(value, torch.Tensor)
                else value == flat_actual[key]
            )
            assert same, f"{name}{key} differs"


def flatten(value: object, prefix: str = "") -> dict[str, object]:
    """Nested dicts/lists as {path: leaf}."""
    if isinstance(value, dict):
        return {
            k: v
            for key, item in value.items()
            for k, v in flatten(item, f"{prefix}[{key!r}]").items()
        }
    if isinstance(value, list | tuple):
        return {
            k: v for i, item in enumerate(value) for k, v in flatten(item, f"{prefix}[{i}]").items()
        }
    return {prefix: value}
