"""What a re-run of the tiny pipeline must report, whichever launcher (local or SLURM) ran it."""

from __future__ import annotations

import json
from pathlib import Path

ONLY_EXPORT_REDONE = {
    "shards": "skipped",
    "vae": "skipped",
    "cache": "skipped",
    "dit": "skipped",
    "samples": "skipped",
    "eval": "skipped",
    "export": "done",
}
"""Step statuses of a re-run after `break_export`: the verified steps skip, export runs again."""


def break_export(run_dir: Path) -> None:
    """Corrupt the exported weights so that only the export step fails to verify."""
    (run_dir / "export" / "dit.safetensors").write_bytes(b"corrupted")


def step_statuses(run_dir: Path) -> dict[str, str]:
    """Step name -> status, from the run's summary.json."""
    summary = json.loads((run_dir / "summary.json").read_text())
    return {step["name"]: step["status"] for step in summary["steps"]}
