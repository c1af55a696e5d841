"""Finding the checkpoint to resume from: newest first, only files that load, skips reported."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from sora_lightning.train.weights import torch_load_safe

log = logging.getLogger(__name__)
_STEP = re.compile(r"step=(\d+)")


def _step_of(path: Path) -> int:
    match = _STEP.search(path.name)
    return int(match.group(1)) if match else -1


def find_resume_checkpoint(directory: str | Path) -> Path | None:
    """Newest checkpoint in `directory` that loads (weights_only); corrupt ones are skipped and named."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    candidates = sorted(directory.glob("*.ckpt"), key=lambda p: (_step_of(p), p.stat().st_mtime), reverse=True)
    for path in candidates:
        try:
            state = torch_load_safe(path)
        except Exception as error:  # noqa: BLE001 - any unreadable file is skipped, with the reason logged
            log.warning("skipping checkpoint %s: %s", path, error)
            continue
        if "state_dict" in state and "global_step" in state:
            log.info("resuming from %s (step %d)", path, state["global_step"])
            return path
        log.warning("skipping checkpoint %s: not a Lightning training checkpoint", path)
    return None
