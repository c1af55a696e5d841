"""One atomic-write helper: temp file beside the target, fsync, os.replace, fsync of the folder."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from sora_lightning.train import checkpoint
from sora_lightning.utils import (
    atomic_path,
    temp_path_for,
    write_bytes_atomic,
    write_json_atomic,
    write_text_atomic,
)


def test_writes_round_trip_and_leave_only_the_file(tmp_path: Path) -> None:
    write_bytes_atomic(tmp_path / "a" / "blob.bin", b"\x00\x01")
    write_text_atomic(tmp_path / "a" / "note.txt", "héllo\n")
    write_json_atomic(tmp_path / "a" / "data.json", {"b": 1, "a": [1, 2]})
    write_json_atomic(tmp_path / "a" / "data.json", {"b": 2, "a": []})  # overwrite in place
    folder = tmp_path / "a"
    assert (folder / "blob.bin").read_bytes() == b"\x00\x01"
    assert (folder / "note.txt").read_text(encoding="utf-8") == "héllo\n"
    assert json.loads((folder / "data.json").read_text()) == {"b": 2, "a": []}
    assert sorted(p.name for p in folder.iterdir()) == ["blob.bin", "data.json", "note.txt"]


def test_json_keeps_the_payloads_order_when_asked(tmp_path: Path) -> None:
    write_json_atomic(tmp_path / "s.json", {"written": 1, "inputs": 2}, sort_keys=False)
    assert (tmp_path / "s.json").read_text().index("written") < (
        tmp_path / "s.json"
    ).read_text().index("inputs")
    assert (tmp_path / "s.json").read_text().endswith("}\n")


def test_a_failed_write_keeps_the_old_file_and_no_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed mid-write")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["weights.bin"]


def test_file_and_folder_are_fsynced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    write_bytes_atomic(tmp_path / "x.bin", b"1")
    assert synced == ["file", "dir"]


def test_permissions_follow_the_umask(tmp_path: Path) -> None:
    """Unlike mkstemp's 0600, shared datasets stay readable by the group, as plain writes are."""
    old = os.umask(0o022)
    try:
        write_bytes_atomic(tmp_path / "x.bin", b"1")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "x.bin").stat().st_mode) == 0o644


def test_temp_files_are_hidden_unique_and_swept_by_checkpoint_retention(tmp_path: Path) -> None:
    target = tmp_path / "step=3.ckpt"
    first, second = temp_path_for(target), temp_path_for(target)
    assert first != second and first.parent == tmp_path and first.name.startswith(".step=3.ckpt.")
    assert checkpoint._TEMP_FILE.match(first.name)
