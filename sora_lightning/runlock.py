"""One writer per run folder: an exclusive lock that a crashed process cannot leave behind.

Why: two `sora-pipeline` (or `sora-train`) processes started on one run folder would run the same
steps side by side and overwrite each other's files. The first one holds `fcntl.flock` on
`<folder>/.sora-lock`; the second is refused at once, and the lock file's JSON body names the
holder (pid, host, command, start time) so the message says who to wait for. The kernel drops
the lock when the holder's process dies, `kill -9` included, so nothing stays stuck; the file
itself is never deleted (deleting a lock file races with a process that has it open).

Who locks what (per writer folder): `sora-pipeline` locks the run folder RUN; each `sora-train`
locks its own `run_dir`, which under the pipeline is RUN/vae or RUN/dit. A step's child process
therefore never meets its parent's lock, while a second pipeline on RUN, or a stray
`sora-train run_dir=RUN/dit` next to the pipeline's dit step, is refused. Only rank 0 locks: the
other ranks of one run (srun tasks, torchrun or Lightning's DDP children) belong to it.

Shared file systems: Linux's NFS client turns flock into a whole-file NFS lock held by the
server (v3 through lockd, v4 natively), so two nodes exclude each other; a lock held by a node
that crashed lapses when the server's lease runs out (NFSv4: about 90 s). A SLURM job requeued
onto another node (same SLURM_JOB_ID, higher SLURM_RESTART_COUNT) takes over a lock its own
earlier run still holds, because SLURM ends a job before it starts it again: it replaces the
lock file with a fresh, locked one. File systems without flock (Lustre mounted `noflock`) fail
the call with ENOLCK/ENOSYS/EOPNOTSUPP: the run then goes on with a warning and only the JSON
body as a guard (refused only when it names a live process on this host). Mounts that keep
flock local to a node (NFS `local_lock=flock`, Lustre `localflock`) exclude processes of one
node only.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shlex
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LOCK_NAME = ".sora-lock"
"""The lock file inside a locked folder (the pipeline's run folder registry knows it)."""
RANK_VARIABLES = ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK", "OMPI_COMM_WORLD_RANK")
"""Set to a non-zero value in every process of a multi-rank run but the first."""
NO_FLOCK_ERRNOS = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP)


class RunFolderBusy(RuntimeError):
    """Another process holds the folder's lock; the message names it and what to do."""


def is_rank_zero() -> bool:
    """False in the processes of a multi-rank run that are not its first rank (they never lock)."""
    return all(os.environ.get(name, "0") in ("", "0") for name in RANK_VARIABLES)


def holder_record(tool: str) -> dict[str, Any]:
    """What the lock file says about this process."""
    return {
        "tool": tool,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "",
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_restart_count": int(os.environ.get("SLURM_RESTART_COUNT") or 0),
    }


def read_holder(path: str | Path) -> dict[str, Any]:
    """The lock file's record ({} when it is empty, half-written or not JSON)."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def is_earlier_run_of_this_job(holder: dict[str, Any]) -> bool:
    """True when the holder is this SLURM job before its requeue (SLURM ended it first)."""
    job = os.environ.get("SLURM_JOB_ID")
    restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    earlier = int(holder.get("slurm_restart_count") or 0) < restarts
    return bool(job) and holder.get("slurm_job_id") == job and earlier


def describe(holder: dict[str, Any]) -> str:
    """`sora-train process (pid 12, host n1, started ..., command: ...)` for the refusal."""
    if not holder:
        return "another process (it has not written its name into the lock file yet)"
    job = f", SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return (
        f"another {holder.get('tool', 'sora')} process (pid {holder.get('pid')} on host "
        f"{holder.get('host')}, started {holder.get('started')}{job}, command: "
        f"{holder.get('command')})"
    )


def busy_message(folder: Path, lock_file: Path, holder: dict[str, Any]) -> str:
    """The refusal: who holds the folder, why two writers are refused, and the ways out."""
    stop = f"stop it (kill {holder['pid']} on {holder.get('host')}), " if holder else ""
    return (
        f"{folder} is in use by {describe(holder)}. Two runs on one folder would write the same "
        f"files, so this one stops before writing anything. Wait for it to end, {stop}or choose "
        f"another run_dir. The lock ({lock_file}) is released as soon as that process exits, even "
        "when it is killed; if its host crashed, a shared file system releases it when the "
        "server's lease runs out (about 90 s on NFSv4)."
    )


class RunLock:
    """An exclusive, crash-safe lock on one folder; `acquire` refuses at once if it is held."""

    def __init__(self, folder: str | Path, tool: str) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.tool = tool
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock and write our record into it, or raise RunFolderBusy naming the holder."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(10):  # a takeover may replace the file between our open and flock
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                locked = self._try_flock(fd)
            except BaseException:
                os.close(fd)
                raise
            if locked is None:  # taken over: `self.fd` holds the fresh file
                os.close(fd)
                return self
            if self._still_current(fd):
                self.fd = fd
                self._write_record(fd)
                return self
            os.close(fd)
        raise RunFolderBusy(busy_message(self.folder, self.path, read_holder(self.path)))

    def _try_flock(self, fd: int) -> bool | None:
        """True: locked (or locks unsupported and the record names no live local holder);
        None: our requeued job took over a stale lock; raises RunFolderBusy otherwise."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            holder = read_holder(self.path)
            if is_earlier_run_of_this_job(holder):
                self._take_over(holder)
                return None
            raise RunFolderBusy(busy_message(self.folder, self.path, holder)) from None
        except OSError as error:
            if error.errno not in NO_FLOCK_ERRNOS:
                raise
            return self._without_flock(error)

    def _without_flock(self, error: OSError) -> bool:
        """A file system without flock: the record alone guards, against live holders on this host."""
        holder = read_holder(self.path)
        if holder.get("host") == socket.gethostname() and _alive(holder.get("pid")):
            raise RunFolderBusy(busy_message(self.folder, self.path, holder))
        log.warning(
            "%s: this file system does not support flock (%s); going on without a lock, so a "
            "second process on %s on another host would not be refused",
            self.path,
            error,
            self.folder,
        )
        return True

    def _take_over(self, holder: dict[str, Any]) -> None:
        """Replace the lock file with a fresh one that we hold (the old inode's lock dies with it)."""
        fresh = self.path.with_name(f"{LOCK_NAME}.{os.getpid()}.tmp")
        fd = os.open(fresh, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._write_record(fd)
            os.replace(fresh, self.path)
        except BaseException:
            os.close(fd)
            fresh.unlink(missing_ok=True)
            raise
        self.fd = fd
        log.warning(
            "%s was held by this SLURM job's earlier run (restart %s, host %s); taking it over",
            self.path,
            holder.get("slurm_restart_count"),
            holder.get("host"),
        )

    def _still_current(self, fd: int) -> bool:
        """The locked file is still the one at `self.path` (not replaced by a takeover meanwhile)."""
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def _write_record(self, fd: int) -> None:
        data = json.dumps(holder_record(self.tool)).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)

    def release(self) -> None:
        """Empty the record (so nobody reads a stale name), then drop the lock by closing."""
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except (TypeError, ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def hold_run_lock(folder: str | Path, tool: str) -> Iterator[RunLock | None]:
    """Hold `folder`'s lock for the block (rank 0 only; other ranks get None and lock nothing)."""
    if not is_rank_zero():
        yield None
        return
    with RunLock(folder, tool) as lock:
        yield lock
