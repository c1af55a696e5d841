"""Small helpers shared across layers: hashing weights and files, atomic file writes."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Iterator
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
