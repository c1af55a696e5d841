"""Checkpoints that lose nothing: atomic writes, a manifest of hashes, verified resume, safe retention.

A checkpoint `step=N.ckpt` counts only once `step=N.manifest.json` exists and the file's size and
sha256 match it. The write order makes that a proof of completeness: the checkpoint goes to a
hidden temp file, is fsynced and renamed (`utils.atomic_path`), and only then is the manifest
written (atomically too).
A process killed at any moment leaves either a temp file, a checkpoint without a manifest, or a
complete pair; the first two never count. Retention runs only after the new pair is complete, so
the last good checkpoint is never deleted first. Loading always uses `torch.load(weights_only=True)`
and saving refuses anything that would need pickled classes, so a checkpoint can never carry code.

Sharded strategies (DeepSpeed ZeRO-3, FSDP2/DCP) write folders through their own I/O and are not
covered here; they keep Lightning's retention (see `build_checkpointing`).
"""

from __future__ import annotations

import json
import logging
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from sora_lightning.train.weights import torch_load_safe
from sora_lightning.utils import atomic_path, file_sha256, reporting_no_space, write_json_atomic

log = logging.getLogger(__name__)
_STEP_FILE = re.compile(r"^step=(\d+)\.ckpt$")
_TEMP_FILE = re.compile(r"^\.step=\d+\..*\.tmp$")
MANIFEST_FORMAT = 1
PLAIN_TYPES = (
    str,
    int,
    float,
    bool,
    type(None),
    torch.Tensor,
    torch.Size,
    torch.dtype,
    torch.device,
)


class CheckpointError(RuntimeError):
    """A checkpoint that was asked for (or is about to be written) cannot be used; the message says why."""


@dataclass
class CheckpointConfig:
    """The `checkpoint:` block of conf/train.yaml."""

    every_n_steps: int = 100
    """Write `step=N.ckpt` every this many optimizer steps (and always at the end of a run)."""
    keep_last: int = 3
    """How many verified checkpoints to keep; older ones are deleted only after a newer one verifies."""
    resume_from: str | None = None
    """Resume from exactly this file (an error if it is missing or does not verify); None picks the
    newest checkpoint of the run that verifies, or starts fresh if there is none."""

    def __post_init__(self) -> None:
        if self.every_n_steps < 1:
            raise ValueError(f"checkpoint.every_n_steps must be >= 1, got {self.every_n_steps}")
        if self.keep_last < 1:
            raise ValueError(
                f"checkpoint.keep_last must be >= 1 (the last good one is always kept), got {self.keep_last}"
            )


@dataclass
class CheckpointStatus:
    """What a scan found for one `step=N.ckpt`: whether it counts, and if not, why."""

    path: Path
    step: int
    ok: bool
    reason: str = ""


def manifest_path(checkpoint: str | Path) -> Path:
    """`step=N.ckpt` -> `step=N.manifest.json` beside it."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(f"{checkpoint.stem}.manifest.json")


def step_of(path: str | Path) -> int | None:
    """N of a `step=N.ckpt` file name; None for any other name."""
    match = _STEP_FILE.match(Path(path).name)
    return int(match.group(1)) if match else None


def assert_plain(value: Any, where: str = "checkpoint") -> None:
    """Refuse objects that `torch.load(weights_only=True)` could only rebuild by unpickling classes.

    Checked at save time so a bad hparam (a Path, a DictConfig, a dataclass) fails when written,
    naming its key, instead of making the checkpoint unloadable when a resume needs it.
    """
    if isinstance(value, PLAIN_TYPES):
        return
    if isinstance(value, dict | OrderedDict):
        for key, item in value.items():
            if not isinstance(key, str | int | float | bool | type(None)):
                raise CheckpointError(
                    f"{where}: key {key!r} of type {type(key).__name__} is not plain data"
                )
            assert_plain(item, f"{where}[{key!r}]")
        return
    if isinstance(value, list | tuple | set):
        for index, item in enumerate(value):
            assert_plain(item, f"{where}[{index}]")
        return
    raise CheckpointError(
        f"{where} is a {type(value).__module__}.{type(value).__qualname__}: only plain data "
        "(dict, list, str, numbers, tensors) may go into a checkpoint, so it loads with weights_only=True"
    )


def stage_of(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    """Curriculum stage and step within it of a DiT checkpoint (None for modules without a curriculum)."""
    curriculum = (checkpoint.get("hyper_parameters") or {}).get("curriculum")
    if not curriculum:
        return None
    from sora_lightning.train.curriculum import Curriculum

    schedule = Curriculum(**curriculum)
    index, in_stage = schedule.stage_at(int(checkpoint.get("global_step", 0)))
    return {"index": index, "name": schedule.stages[index].name, "step_in_stage": in_stage}


def write_manifest(path: Path, checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The manifest that makes `path` count: size, sha256, step and curriculum stage."""
    manifest = {
        "format": MANIFEST_FORMAT,
        "file": path.name,
        "size": path.stat().st_size,
        "sha256": file_sha256(path),
        "step": int(checkpoint.get("global_step", -1)),
        "stage": checkpoint.get("curriculum_state"),
        "topology": checkpoint.get("topology"),  # strategy + world size (train/elastic.py)
    }
    write_json_atomic(manifest_path(path), manifest)
    return manifest


def verify_checkpoint(path: str | Path) -> str | None:
    """None if `path` is complete and intact according to its manifest, else the reason it is not."""
    path = Path(path)
    if not path.is_file():
        return "file not found"
    manifest_file = manifest_path(path)
    if not manifest_file.is_file():
        return f"no manifest {manifest_file.name} (the write did not finish)"
    try:
        manifest = json.loads(manifest_file.read_text())
        size, digest = int(manifest["size"]), str(manifest["sha256"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"manifest {manifest_file.name} is unreadable ({error})"
    if manifest.get("file") != path.name:
        return f"manifest {manifest_file.name} describes {manifest.get('file')!r}, not {path.name}"
    actual_size = path.stat().st_size
    if actual_size != size:
        return f"size {actual_size} bytes != {size} in the manifest (truncated or overwritten)"
    if file_sha256(path) != digest:
        return "sha256 does not match the manifest (corrupt)"
    return None


def scan_checkpoints(directory: str | Path, *, full_hash: bool = True) -> list[CheckpointStatus]:
    """Every `step=N.ckpt` in `directory`, newest first, each verified (hash only if `full_hash`)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [
        (step, p) for p in directory.iterdir() if (step := step_of(p)) is not None and p.is_file()
    ]
    statuses = []
    for step, path in sorted(found, reverse=True):
        reason = verify_checkpoint(path) if full_hash else _quick_reason(path)
        statuses.append(CheckpointStatus(path, step, reason is None, reason or ""))
    return statuses


def _quick_reason(path: Path) -> str | None:
    """Manifest present and size right: enough to decide retention without re-hashing every file."""
    try:
        manifest = json.loads(manifest_path(path).read_text())
        return (
            None
            if int(manifest["size"]) == path.stat().st_size
            else "size differs from its manifest"
        )
    except (OSError, ValueError, KeyError, TypeError):
        return "no readable manifest"


def find_resume_checkpoint(directory: str | Path) -> Path | None:
    """Newest checkpoint in `directory` whose manifest verifies; each newer one skipped is logged with why."""
    for status in scan_checkpoints(directory):
        if status.ok:
            log.info("resuming from %s (step %d)", status.path, status.step)
            return status.path
        log.warning("skipping checkpoint %s: %s", status.path, status.reason)
    return None


def resolve_resume(resume_from: str | Path | None, directory: str | Path) -> Path | None:
    """The checkpoint a run continues from: the requested one (which must verify) or the newest good one.

    A requested checkpoint that is missing or corrupt raises `CheckpointError` naming it: silently
    starting fresh would throw away the run the user asked to continue.
    """
    if resume_from is None or str(resume_from) == "":
        return find_resume_checkpoint(directory)
    path = Path(resume_from)
    reason = verify_checkpoint(path)
    if reason is not None:
        raise CheckpointError(f"checkpoint.resume_from={path}: {reason}; refusing to start fresh")
    log.info("resuming from requested checkpoint %s", path)
    return path


def prune_checkpoints(
    directory: str | Path, keep_last: int, *, protect: Path | None = None
) -> list[Path]:
    """Delete all but the `keep_last` newest good checkpoints (and stale temp files); returns what went.

    Runs only after a new checkpoint is complete. Unverified checkpoints never count towards
    `keep_last` and are removed; `protect` (the file just written) is never removed.
    """
    directory = Path(directory)
    removed: list[Path] = []
    good = 0
    for status in scan_checkpoints(directory, full_hash=False):
        good += status.ok
        if (status.ok and good <= keep_last) or (protect is not None and status.path == protect):
            continue
        manifest_path(status.path).unlink(
            missing_ok=True
        )  # first: a half-deleted pair must not count
        status.path.unlink(missing_ok=True)
        removed.append(status.path)
    for stale in directory.iterdir():
        if _TEMP_FILE.match(stale.name):
            stale.unlink(missing_ok=True)
            removed.append(stale)
    if removed:
        log.info(
            "checkpoint retention (keep %d): removed %s",
            keep_last,
            ", ".join(p.name for p in removed),
        )
    return removed


def _after_no_space(directory: Path) -> str:
    """What a checkpoint write stopped by a full disk leaves that still counts, and the way on."""
    previous = next((s.path.name for s in scan_checkpoints(directory) if s.ok), None)
    if previous is None:
        return "no checkpoint of this run verifies yet; free space and rerun"
    return f"{previous} still verifies: free space and rerun, it resumes from there"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O: atomic write + manifest + retention on save; verify + weights_only on load."""

    def __init__(self, keep_last: int | None = None) -> None:
        super().__init__()
        self.keep_last = keep_last

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        """Refuse non-plain data, write atomically, then the manifest, then apply retention."""
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        path = Path(path)
        checkpoint.setdefault("curriculum_state", stage_of(checkpoint))
        assert_plain(checkpoint)
        manifest_path(path).unlink(
            missing_ok=True
        )  # overwriting: the old manifest no longer describes it
        with reporting_no_space(path.parent, path.name, lambda: _after_no_space(path.parent)):
            with atomic_path(path) as tmp, open(tmp, "xb") as handle:
                torch.save(checkpoint, handle)  # a handle: ENOSPC stays visible as the cause
            manifest = write_manifest(path, checkpoint)
        log.info(
            "checkpoint %s written (step %d, %d bytes, sha256 %s)",
            path,
            manifest["step"],
            manifest["size"],
            manifest["sha256"][:12],
        )
        if self.keep_last is not None and step_of(path) is not None:
            prune_checkpoints(path.parent, self.keep_last, protect=path)

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Load only a checkpoint that verifies, and never unpickle code (weights_only=True whatever is asked)."""
        reason = verify_checkpoint(path)
        if reason is not None:
            raise CheckpointError(f"cannot load checkpoint {path}: {reason}")
        if weights_only is False:
            log.warning(
                "weights_only=False requested for %s; loading with weights_only=True anyway", path
            )
        return torch_load_safe(path, map_location or "cpu")

    def remove_checkpoint(self, path: Any) -> None:
        """Manifest first, then the file: an interrupted removal leaves nothing that counts."""
        manifest_path(path).unlink(missing_ok=True)
        Path(path).unlink(missing_ok=True)


def build_checkpointing(
    config: CheckpointConfig, directory: Path, *, sharded: bool
) -> tuple[list[Callback], list[Any]]:
    """(callbacks, plugins) for the Trainer: periodic `step=N.ckpt` through `AtomicCheckpointIO`.

    Retention lives in the I/O plugin (it sees every save, including the end-of-run one, and
    knows which files verify), so ModelCheckpoint keeps everything it writes. Sharded strategies
    write folders with their own I/O and keep ModelCheckpoint's own top-k retention.
    """
    if sharded:
        callback = ModelCheckpoint(
            dirpath=directory,
            filename="{step}",
            monitor="step",
            mode="max",
            every_n_train_steps=config.every_n_steps,
            save_top_k=config.keep_last,
        )
        return [callback], []
    callback = ModelCheckpoint(
        dirpath=directory,
        filename="{step}",
        every_n_train_steps=config.every_n_steps,
        save_top_k=-1,
    )
    return [callback], [AtomicCheckpointIO(keep_last=config.keep_last)]
