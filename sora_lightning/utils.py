"""Small helpers shared across layers: hashing weights and files, atomic file writes."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import resource
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch


def state_dict_hash(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over sorted names and raw bytes: keys caches to the exact weights that made them."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode() + str(tensor.dtype).encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def file_sha256(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """Streaming sha256 of a file, for manifests that prove a step's outputs are intact."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def temp_path_for(path: Path) -> Path:
    """A fresh hidden `.name.<pid>.<random>.tmp` beside `path`.

    Same folder, because `os.replace` is atomic only within one file system; hidden and ending in
    `.tmp`, so listings skip it and a sweep can find what a killed writer left; unique, so two
    writers of one file never share a temp file.
    """
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def fsync_path(path: str | Path) -> None:
    """Flush a file's (or a folder's) data to disk: a folder's fsync makes a rename in it durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path to write `path`'s content to; on success it replaces `path` atomically.

    Why: a reader (a resume, a pipeline step checking its outputs, a person) sees the old file or
    the whole new one, never half of one, and a crash leaves at most a hidden `.tmp` file. The temp
    file is fsynced before the rename and the folder after it, so once this returns the new file
    survives a power loss too. Yielding a path (not a handle) serves writers that want a file name
    (safetensors, PIL, torch.save) as well as plain bytes; on an error the temp file is removed
    and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(path)
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_path(path.parent)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` through `atomic_path` (never half a file)."""
    with atomic_path(path) as tmp, open(tmp, "xb") as handle:
        handle.write(data)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write UTF-8 `text` to `path` through `atomic_path` (never half a file)."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, payload: Any, *, sort_keys: bool = True) -> None:
    """Write `payload` as indented JSON (one trailing newline) through `atomic_path`.

    `sort_keys=False` keeps the payload's own order where people read the file (summaries).
    """
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=sort_keys) + "\n")


def combined_hash(*parts: str) -> str:
    """One short key from several hashes/settings strings."""
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


class NoSpaceError(OSError):
    """A write failed because its file system is full (ENOSPC, or EDQUOT: a quota).

    Why a class of its own: the error a full disk raises deep inside a writer names no file
    (`OSError: [Errno 28]` from a tar stream), or hides it entirely (`torch.save` reports
    `unexpected pos 576 vs 534`); this one names the folder, what was being written, and what
    still counts, so a person knows which disk to free and that a rerun is safe.
    """


def find_no_space(error: BaseException | None) -> OSError | None:
    """The ENOSPC/EDQUOT `OSError` in `error`'s cause/context chain, if any."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


@contextmanager
def reporting_no_space(
    folder: str | Path, what: str, then: str | Callable[[], str] = ""
) -> Iterator[None]:
    """Turn a full-disk failure inside the block into `NoSpaceError` naming `folder` and `what`.

    `then` says what the interrupted write left that still counts and how to go on (a callable
    is asked only after a failure: finding that out may cost a scan). Any other error passes
    through unchanged.
    """
    try:
        yield
    except NoSpaceError:
        raise
    except Exception as error:
        if find_no_space(error) is None:
            raise
        try:
            free = f"{shutil.disk_usage(folder).free} bytes free"
        except OSError:
            free = "free space unknown"
        message = f"no space left on device in {folder} while writing {what} ({free})"
        then = then() if callable(then) else then
        raise NoSpaceError(errno.ENOSPC, message + (f"; {then}" if then else "")) from error


def rss_bytes() -> int:
    """Current resident set size of this process (memory benchmarks)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_bytes(reset_worked: bool) -> int:
    """Peak RSS since `reset_peak_rss` (VmHWM), else the lifetime peak from getrusage."""
    if reset_worked:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def pick_device(name: str) -> torch.device:
    """`device=auto|cpu|cuda|cuda:N` (sampling, eval, captioning): auto takes the GPU when there
    is one. A named GPU that is missing is refused here, before any weights load."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name}: no CUDA GPU is visible here; use device=cpu or auto")
    return device
