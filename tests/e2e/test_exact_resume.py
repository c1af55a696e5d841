"""Exact resume: a tiny DiT run interrupted and resumed reproduces the uninterrupted run bit for bit.

CPU, fp32, `trainer.deterministic=true`. Per-step losses are read back from the TensorBoard event
files with TensorBoard's own reader; final weights (DiT, EMA) and optimizer state are compared with
`torch.equal`. Interruptions: at step 2 (the tiny curriculum's first stage transition, resumed from
the checkpoint ModelCheckpoint writes inside the step loop), at step 3 (mid-stage, resumed from the
end-of-run checkpoint), and a real `sora-train` process SIGKILLed mid-run next to half-written
checkpoint files, which resume must skip and name.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
from tiny_runs import compose_cfg, scalars, train_overrides

from sora_lightning.train.checkpoint import find_resume_checkpoint, manifest_path
from sora_lightning.train.main import train

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent
TOTAL_STEPS = 6  # tiny curriculum: images 0-1, short_clips 2-3, long_clips 4-5


def logged_losses(run_dir: Path) -> list[tuple[int, float]]:
    """Every (step, train/loss) event in the run's TensorBoard folder, all event files together."""
    return scalars(run_dir, "train/loss")


def final_state(run_dir: Path) -> tuple[dict, dict, list]:
    """(EMA export, module state_dict, optimizer states) of a finished run."""
    ema = safetensors.torch.load_file(str(run_dir / "final" / "dit.safetensors"))
    checkpoint = torch.load(run_dir / "checkpoints" / f"step={TOTAL_STEPS}.ckpt", weights_only=True)
    return ema, checkpoint["state_dict"], checkpoint["optimizer_states"]


def assert_same_tensors(expected: object, actual: object, where: str = "") -> None:
    """Recursive exact equality of nested dicts/lists of tensors and numbers."""
    if isinstance(expected, torch.Tensor):
        assert torch.equal(expected, actual), f"{where} differs"
    elif isinstance(expected, dict):
        assert expected.keys() == actual.keys(), f"{where} keys differ"
        for key in expected:
            assert_same_tensors(expected[key], actual[key], f"{where}[{key!r}]")
    elif isinstance(expected, list | tuple):
        assert len(expected) == len(actual), f"{where} lengths differ"
        for index, (a, b) in enumerate(zip(expected, actual, strict=True)):
            assert_same_tensors(a, b, f"{where}[{index}]")
    else:
        assert expected == actual, f"{where}: {expected!r} != {actual!r}"


@pytest.fixture(scope="module")
def cache_run(tiny_cache_run: Path) -> Path:
    return tiny_cache_run


@pytest.fixture(scope="module", autouse=True)
def _deterministic_torch():
    """`trainer.deterministic` flips a process-wide torch flag; put it back for the tests after us."""
    torch.set_num_threads(2)
    before = torch.are_deterministic_algorithms_enabled()
    env = {
        key: os.environ.get(key)
        for key in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS", "CUBLAS_WORKSPACE_CONFIG")
    }
    yield
    torch.use_deterministic_algorithms(before)
    for key, value in env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def uninterrupted(cache_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "dit"
    train(compose_cfg(run_dir, cache_run))
    return run_dir


@pytest.fixture(scope="module")
def interrupted(cache_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same command three times: stop at step 2 (a stage transition), at step 3, then run to the end."""
    run_dir = tmp_path_factory.mktemp("interrupted") / "dit"
    for max_steps in (2, 3, TOTAL_STEPS):
        train(compose_cfg(run_dir, cache_run, f"trainer.max_steps={max_steps}"))
    return run_dir


def test_uninterrupted_run_logs_one_loss_per_step(uninterrupted: Path) -> None:
    steps = [step for step, _ in logged_losses(uninterrupted)]
    assert steps == list(range(TOTAL_STEPS))


def test_interrupted_run_reproduces_losses_bit_for_bit(
    uninterrupted: Path, interrupted: Path
) -> None:
    assert logged_losses(interrupted) == logged_losses(uninterrupted)  # also: no step logged twice


def test_interrupted_run_reproduces_weights_ema_and_optimizer(
    uninterrupted: Path, interrupted: Path
) -> None:
    expected, actual = final_state(uninterrupted), final_state(interrupted)
    for name, a, b in zip(("EMA export", "state_dict", "optimizer"), expected, actual, strict=True):
        assert_same_tensors(a, b, name)


def test_checkpoints_carry_stage_and_verify(interrupted: Path) -> None:
    """Retention kept the newest two; each manifest names its step and curriculum stage."""
    checkpoints = interrupted / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("*.ckpt")) == ["step=4.ckpt", "step=6.ckpt"]
    manifest = json.loads(manifest_path(checkpoints / "step=4.ckpt").read_text())
    assert manifest["step"] == 4
    assert manifest["stage"] == {"index": 2, "name": "long_clips", "step_in_stage": 0}
    assert (
        len(manifest["sha256"]) == 64
        and manifest["size"] == (checkpoints / "step=4.ckpt").stat().st_size
    )
    assert not list(checkpoints.glob(".*")), "temp files left behind"


def same_threads_env() -> dict[str, str]:
    """The environment with this process's intra-op thread count made explicit.

    The in-process runs use `torch.get_num_threads()` threads; a subprocess would otherwise take
    whatever OMP_NUM_THREADS the shell exported, and a different count reorders float sums
    (the EMA then differs in the last bits).
    """
    threads = str(torch.get_num_threads())
    return {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}


def _kill_when_first_checkpoint_lands(args: list[str], run_dir: Path, log_file: Path) -> int:
    """Start `sora-train`, SIGKILL it as soon as its first checkpoint verifies; returns the exit code."""
    first = run_dir / "checkpoints" / "step=2.manifest.json"
    with open(log_file, "w") as log:
        process = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, env=same_threads_env()
        )
        deadline = time.monotonic() + 600
        while not first.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        return process.wait(timeout=60)


def test_sigkill_mid_run_then_resume_is_exact(
    cache_run: Path, uninterrupted: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_dir = tmp_path / "dit"
    args = [str(BIN / "sora-train"), *train_overrides(run_dir, cache_run)]
    code = _kill_when_first_checkpoint_lands(args, run_dir, tmp_path / "killed.log")
    assert code == -signal.SIGKILL, f"the run ended by itself ({code}) before it could be killed"
    good = find_resume_checkpoint(run_dir / "checkpoints")
    assert good is not None and good.name in ("step=2.ckpt", "step=4.ckpt")
    # What a kill leaves at other moments: a half-written temp file, and a renamed file whose manifest never came.
    half = good.read_bytes()[: good.stat().st_size // 2]
    (run_dir / "checkpoints" / ".step=5.ckpt.tmp").write_bytes(half)
    (run_dir / "checkpoints" / "step=5.ckpt").write_bytes(half)

    with caplog.at_level(logging.INFO, logger="sora_lightning.train.checkpoint"):
        train(compose_cfg(run_dir, cache_run))
    assert "skipping checkpoint" in caplog.text and "step=5.ckpt: no manifest" in caplog.text
    assert f"resuming from {good}" in caplog.text

    expected = dict(logged_losses(uninterrupted))
    resumed = logged_losses(
        run_dir
    )  # the killed run's events (as far as flushed) and the resumed run's
    resume_step = int(good.stem.split("=")[1])
    assert {step for step, _ in resumed} >= set(range(resume_step, TOTAL_STEPS))
    for step, value in resumed:
        assert value == expected[step], f"step {step}: {value!r} != {expected[step]!r}"
    for name, a, b in zip(
        ("EMA export", "state_dict", "optimizer"),
        final_state(uninterrupted),
        final_state(run_dir),
        strict=True,
    ):
        assert_same_tensors(a, b, name)
    assert not (run_dir / "checkpoints" / "step=5.ckpt").exists(), (
        "retention must drop unverified checkpoints"
    )
