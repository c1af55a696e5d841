"""One process per run folder: refusal naming the holder, crash safety, SLURM requeue takeover.

Holders run in real processes (flock is per open file, and the kernel must see a process die);
each is a few lines of Python that import only `sora_lightning.runlock`, so they start fast.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from sora_lightning import runlock
from sora_lightning.pipeline.main import written_names
from sora_lightning.pipeline.ownership import RunFolder
from sora_lightning.runlock import LOCK_NAME, RunFolderBusy, RunLock, hold_run_lock, read_holder

HOLDER = """
import sys, time
from sora_lightning.runlock import RunLock
lock = RunLock(sys.argv[1], sys.argv[2]).acquire()
print("locked", flush=True)
time.sleep(120)
"""
SLURM_KEYS = ("SLURM_JOB_ID", "SLURM_RESTART_COUNT", *runlock.RANK_VARIABLES)


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without SLURM/rank variables (tests may run inside a job), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in SLURM_KEYS}
    return {**env, **extra}


@pytest.fixture(autouse=True)
def _no_slurm(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in SLURM_KEYS:
        monkeypatch.delenv(key, raising=False)


def start_holder(folder: Path, tool: str = "sora-pipeline", **env: str) -> subprocess.Popen:
    """A process that locks `folder` and sleeps; returns once it holds the lock."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder), tool],
        stdout=subprocess.PIPE,
        text=True,
        env=clean_env(**env),
    )
    assert process.stdout is not None and process.stdout.readline().strip() == "locked"
    return process


@pytest.fixture
def holders():
    started: list[subprocess.Popen] = []
    yield started
    for process in started:
        process.kill()
        process.wait(timeout=10)


def test_second_process_is_refused_naming_the_first(tmp_path: Path, holders: list) -> None:
    holder = start_holder(tmp_path / "run")
    holders.append(holder)
    with pytest.raises(RunFolderBusy) as refused:
        RunLock(tmp_path / "run", "sora-train").acquire()
    message = str(refused.value)
    assert f"{tmp_path / 'run'} is in use by another sora-pipeline process" in message
    assert f"pid {holder.pid} on host {socket.gethostname()}" in message
    assert "command: " in message and "started 20" in message
    assert f"kill {holder.pid}" in message


def test_kill_9_leaves_no_stuck_lock(tmp_path: Path) -> None:
    holder = start_holder(tmp_path / "run")
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=10)
    with RunLock(tmp_path / "run", "sora-train") as lock:
        assert read_holder(lock.path)["pid"] == os.getpid()


def test_release_empties_the_record_and_frees_the_folder(tmp_path: Path) -> None:
    with hold_run_lock(tmp_path, "sora-train") as lock:
        assert lock is not None and read_holder(lock.path)["tool"] == "sora-train"
        with pytest.raises(RunFolderBusy):  # flock is per open file: the same process too
            RunLock(tmp_path, "sora-pipeline").acquire()
    assert (tmp_path / LOCK_NAME).read_text() == ""
    with hold_run_lock(tmp_path, "sora-pipeline"):
        pass


def test_other_ranks_do_not_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with hold_run_lock(tmp_path, "sora-train"):
        monkeypatch.setenv("LOCAL_RANK", "1")
        with hold_run_lock(tmp_path, "sora-train") as lock:
            assert lock is None


def test_requeued_slurm_job_takes_over_its_stale_lock(tmp_path: Path, holders: list) -> None:
    """NFS after a node crash: the server still holds the first run's lock; the requeued run
    (same job id, higher restart count) replaces the lock file with a fresh locked one."""
    holders.append(start_holder(tmp_path, "sora-train", SLURM_JOB_ID="77"))
    requeued = start_holder(tmp_path, "sora-train", SLURM_JOB_ID="77", SLURM_RESTART_COUNT="1")
    holders.append(requeued)
    assert read_holder(tmp_path / LOCK_NAME)["pid"] == requeued.pid
    with pytest.raises(RunFolderBusy, match=f"pid {requeued.pid} .*SLURM job 77"):
        RunLock(tmp_path, "sora-train").acquire()
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize(
    "env", [{"SLURM_JOB_ID": "77"}, {"SLURM_JOB_ID": "78", "SLURM_RESTART_COUNT": "1"}]
)
def test_other_jobs_and_same_incarnation_are_refused(
    tmp_path: Path, holders: list, monkeypatch: pytest.MonkeyPatch, env: dict
) -> None:
    holders.append(start_holder(tmp_path, "sora-train", SLURM_JOB_ID="77"))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(RunFolderBusy):
        RunLock(tmp_path, "sora-train").acquire()


def test_file_system_without_flock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Lustre `noflock`: go on with a warning, but a live holder on this host is still refused."""

    def no_flock(fd: int, operation: int) -> None:
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(runlock.fcntl, "flock", no_flock)
    with RunLock(tmp_path, "sora-train"):
        assert "does not support flock" in caplog.text
        with pytest.raises(RunFolderBusy, match=f"pid {os.getpid()}"):
            RunLock(tmp_path, "sora-train").acquire()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 2**22 + 1, "host": "elsewhere"}))
    with RunLock(tmp_path, "sora-train"):
        pass


def test_pipeline_ownership_accepts_the_lock_file(tmp_path: Path) -> None:
    with hold_run_lock(tmp_path, "sora-pipeline"):
        names = written_names([], slurm=False)
        assert LOCK_NAME in names
        RunFolder(tmp_path).claim(names)  # the lock file exists and is not refused as foreign
        assert LOCK_NAME in RunFolder(tmp_path).owned()
