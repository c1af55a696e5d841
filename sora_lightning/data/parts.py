"""One protocol for steps split over a job array: each task does a part, then a merge checks all.

Why one module: ingest (`data/ingest.py`) and the latent cache (`data/latent_cache.py`, reached
through `train/cache.py`) both split their inputs over SLURM array tasks and merge the parts'
records afterwards. The rules must be the same everywhere, or a pipeline's array step merges parts
another step would refuse:

- part p of P takes the inputs at positions i with i % P == p (`select_part`), so the merged
  output lists everything in input order, as one process would;
- a task's part is given explicitly or read from $SLURM_ARRAY_TASK_ID (`resolve_part`), so one
  command line serves every task of the array;
- a merge accepts only parts 0..P-1, each exactly once, all made by the same request, with every
  file they list on disk (`check_parts`); anything else is refused naming the parts to rerun,
  because a merge of incomplete or mixed parts would silently train on a different dataset.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

ARRAY_TASK_ENV = "SLURM_ARRAY_TASK_ID"
"""Where SLURM puts an array task's index; every split step reads its part from it by default."""

Item = TypeVar("Item")


def check_part(num_parts: int, part: int) -> None:
    """Raise ValueError unless 0 <= part < num_parts (and num_parts >= 1)."""
    if num_parts < 1 or not 0 <= part < num_parts:
        raise ValueError(f"need 0 <= part < num_parts, got part={part}, num_parts={num_parts}")


def resolve_part(
    num_parts: int | None, part: int | None, *, names: tuple[str, str] = ("num_parts", "part")
) -> int | None:
    """This task's part: `part`, else $SLURM_ARRAY_TASK_ID; None when the step is not split.

    `names` are how the caller's user spells the two settings (`--num-parts`/`--part`,
    `cache.num_parts`/`cache.part`), so the error says what to fix.
    """
    num_name, part_name = names
    if not num_parts:
        if part is not None:
            raise ValueError(f"{part_name}={part} needs {num_name}")
        return None
    if part is None and os.environ.get(ARRAY_TASK_ENV, "").isdigit():
        part = int(os.environ[ARRAY_TASK_ENV])
    if part is None or num_parts < 1 or not 0 <= part < num_parts:
        raise ValueError(
            f"{num_name}={num_parts} needs 0 <= {part_name} < {num_parts} (given, or from "
            f"${ARRAY_TASK_ENV} in a job array), got {part}"
        )
    return int(part)


def select_part(items: Sequence[Item], num_parts: int | None, part: int) -> list[Item]:
    """Part `part`'s items: those at positions i with i % num_parts == part (all when not split)."""
    if num_parts is None:
        return list(items)
    check_part(num_parts, part)
    return list(items[part::num_parts])


@dataclass(frozen=True)
class PartRecord:
    """What a merge needs to know of one part's record file, whatever step wrote it."""

    path: Path
    """The record file (named in errors)."""
    part: int
    num_parts: int
    request: Any
    """Everything that must be equal across parts: inputs, settings, weights (never the part)."""
    files: tuple[str, ...]
    """Outputs the part claims, relative to the output folder; each must exist."""


def read_part_records(out: Path, pattern: str) -> list[tuple[Path, dict]]:
    """(path, JSON) of the part records in `out` matching `pattern`, in name (= part) order."""
    paths = sorted(out.glob(pattern))
    if not paths:
        raise FileNotFoundError(f"no {pattern} in {out}: run the --part tasks first")
    return [(path, json.loads(path.read_text(encoding="utf-8"))) for path in paths]


def check_parts(out: Path, records: Sequence[PartRecord]) -> None:
    """Every part 0..P-1 present once, all of one request, every listed file on disk."""
    num_parts = records[0].num_parts
    found = sorted(record.part for record in records)
    if found != list(range(num_parts)):
        missing = sorted(set(range(num_parts)) - set(found))
        raise FileNotFoundError(
            f"{out}: missing parts {missing} of 0..{num_parts - 1} (found "
            f"{[record.path.name for record in records]}): rerun the --part tasks {missing}"
        )
    first = records[0]
    for record in records:
        if record.num_parts != num_parts or record.request != first.request:
            raise ValueError(
                f"{record.path.name} and {first.path.name} were made with other inputs, weights "
                f"or settings (they differ in {_differences(record.request, first.request)}); "
                "rerun every --part task with one command line"
            )
    lost = [name for record in records for name in record.files if not (out / name).is_file()]
    if lost:
        raise FileNotFoundError(f"{out}: files listed by the parts are missing: {lost[:5]}")


def _differences(one: Any, other: Any) -> list[str] | str:
    """Keys whose values differ between two requests (both dicts), else a short "value"."""
    if isinstance(one, dict) and isinstance(other, dict):
        return sorted(k for k in one.keys() | other.keys() if one.get(k) != other.get(k))
    return "value"
