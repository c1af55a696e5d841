"""Faults with real processes: SIGTERM mid-run, a second process on a locked run folder.

SIGTERM: a tiny VAE run (world shards) is sent SIGTERM after its first periodic checkpoint; it
must write a verified `step=N.ckpt` at the next step boundary (N not a multiple of the periodic
interval, so the signal made it), exit with 143, and a rerun must resume from it. The lock: a
process holds a run folder; the real `sora-pipeline` and `train(cfg)` on it are refused at once,
naming that process, and write nothing.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

from sora_lightning.config import CONFIG_MODULE
from sora_lightning.launch.slurm import TERMINATED_EXIT_CODE
from sora_lightning.runlock import LOCK_NAME, RunFolderBusy, read_holder
from sora_lightning.train.checkpoint import manifest_path, verify_checkpoint
from sora_lightning.train.main import train

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent
EVERY = 2  # the tiny experiment's checkpoint.every_n_steps


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny world shards (a few seconds)."""
    out = tmp_path_factory.mktemp("fault_shards")
    args = ["--world-clips", "4", "--world-images", "4", "--output", str(out), "--quick"]
    result = subprocess.run(
        [sys.executable, "-m", "sora_lightning.data.ingest", *args, "--no-progress"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def vae_overrides(run_dir: Path, shards: Path, *extra: str) -> list[str]:
    return [
        "experiment=tiny",
        "task=vae",
        f"run_dir={run_dir}",
        f"data.shards={shards}/*.tar",
        "trainer.enable_progress_bar=false",
        *extra,
    ]


def one_thread_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def test_sigterm_checkpoints_at_a_step_boundary_then_resume(
    shards: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_dir = tmp_path / "vae"
    args = [str(BIN / "sora-train"), *vae_overrides(run_dir, shards, "vae_train.steps=40")]
    first = run_dir / "checkpoints" / f"step={EVERY}.manifest.json"
    with open(tmp_path / "train.log", "w") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=one_thread_env())
        deadline = time.monotonic() + 300
        while not first.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=120)
    output = (tmp_path / "train.log").read_text()
    assert code == TERMINATED_EXIT_CODE, f"exit {code}:\n{output[-3000:]}"
    stopped = [p for p in (run_dir / "checkpoints").glob("step=*.ckpt") if p.name != first.name]
    steps = sorted(int(p.stem.split("=")[1]) for p in stopped)
    assert steps and steps[-1] > EVERY, f"no checkpoint after the signal: {steps}\n{output[-2000:]}"
    last = run_dir / "checkpoints" / f"step={steps[-1]}.ckpt"
    assert f"preempted at step {steps[-1]}; checkpoint {last} (stopped by SIGTERM)" in output
    assert verify_checkpoint(last) is None
    assert json.loads(manifest_path(last).read_text())["step"] == steps[-1]
    assert read_holder(run_dir / LOCK_NAME) == {}, "the lock record must be emptied on exit"

    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        cfg = compose(
            "train", overrides=vae_overrides(run_dir, shards, f"vae_train.steps={steps[-1] + 1}")
        )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with caplog.at_level(logging.INFO, logger="sora_lightning.train.checkpoint"):
            summary = train(cfg)
    finally:
        torch.set_num_threads(threads)
    assert f"resuming from {last} (step {steps[-1]})" in caplog.text
    assert summary["steps"] == steps[-1] + 1


HOLDER = """
import sys, time
from sora_lightning.runlock import RunLock
RunLock(sys.argv[1], "sora-pipeline").acquire()
print("locked", flush=True)
time.sleep(300)
"""


@pytest.fixture
def held(tmp_path: Path):
    """A run folder locked by another (real) process; yields (folder, that process)."""
    folder = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None and process.stdout.readline().strip() == "locked"
    yield folder, process
    process.kill()
    process.wait(timeout=10)


def test_run_pipeline_on_a_held_run_folder_is_refused(held: tuple[Path, subprocess.Popen]) -> None:
    from sora_lightning.pipeline.main import run_pipeline

    folder, holder = held
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        cfg = compose("pipeline", overrides=["experiment=tiny", f"run_dir={folder}"])
    with pytest.raises(RunFolderBusy, match=f"pid {holder.pid} on host"):
        run_pipeline(cfg, [])
    assert sorted(p.name for p in folder.iterdir()) == [LOCK_NAME]


@pytest.mark.slow
def test_second_pipeline_cli_on_a_run_folder_is_refused(
    held: tuple[Path, subprocess.Popen],
) -> None:
    folder, holder = held
    start = time.monotonic()
    result = subprocess.run(
        [str(BIN / "sora-pipeline"), "experiment=tiny", f"run_dir={folder}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert (
        f"{folder} is in use by another sora-pipeline process (pid {holder.pid} on host" in output
    )
    assert sorted(p.name for p in folder.iterdir()) == [LOCK_NAME], "wrote into the run folder"
    assert time.monotonic() - start < 120


def test_train_on_a_held_run_folder_is_refused(
    held: tuple[Path, subprocess.Popen], shards: Path
) -> None:
    folder, holder = held
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        cfg = compose("train", overrides=vae_overrides(folder, shards))
    with pytest.raises(RunFolderBusy, match=f"pid {holder.pid} on host"):
        train(cfg)
    assert sorted(p.name for p in folder.iterdir()) == [LOCK_NAME]


STEP = """
import signal, sys, time
def stop(signum, frame):
    print("step got", signal.Signals(signum).name, flush=True)
    sys.exit(128 + signum)
signal.signal(signal.SIGTERM, stop)
print("step running", flush=True)
time.sleep(60)
"""


def test_pipeline_passes_sigterm_to_the_running_step(tmp_path: Path) -> None:
    """`sora-pipeline` under Kubernetes gets SIGTERM itself: the step must get it too."""
    from sora_lightning.pipeline.runner import run_command, stop_signals_forwarded

    log = tmp_path / "step.log"
    with stop_signals_forwarded() as stops:
        timer = threading.Timer(2.0, os.kill, (os.getpid(), signal.SIGTERM))
        timer.start()
        code = run_command([sys.executable, "-c", STEP], log)
        timer.join()
    assert stops.signum == signal.SIGTERM
    assert code == TERMINATED_EXIT_CODE
    assert "step got SIGTERM" in log.read_text()
    assert signal.getsignal(signal.SIGTERM) is not stops.handle, "handler left installed"


def test_a_refused_run_folder_gets_no_lock_file(tmp_path: Path) -> None:
    """Ownership is checked before the lock: a user's folder is left exactly as it was."""
    from sora_lightning.pipeline.main import run_pipeline
    from sora_lightning.pipeline.ownership import NotOurs

    run_dir = tmp_path / "run"
    (run_dir / "shards").mkdir(parents=True)
    (run_dir / "shards" / "mine-000.tar").write_bytes(b"a user's own shard")
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        cfg = compose("pipeline", overrides=["experiment=tiny", f"run_dir={run_dir}"])
    with pytest.raises(NotOurs, match="mine-000.tar"):
        run_pipeline(cfg, [])
    assert sorted(p.name for p in run_dir.iterdir()) == ["shards"]
