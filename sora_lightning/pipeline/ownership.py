"""What in a run folder the pipeline wrote, so it never overwrites or deletes anything else.

Why: a run folder may hold a user's own files (their shards, notes, an older run), and steps
replace their outputs when they rerun. The pipeline therefore writes only into names it has
claimed: a name is claimed when it does not exist yet (or is an empty folder), and the claim is
recorded in `.sora-pipeline.json` before anything is written there. A name that exists and was
never claimed belongs to someone else: the run is refused before any step starts, naming it.
The run folder's lock file (`runlock.LOCK_NAME`, written by whichever sora tool locked the folder
first, before this check runs) is always the pipeline's own.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from sora_lightning.runlock import LOCK_NAME
from sora_lightning.utils import write_json_atomic

REGISTRY_NAME = ".sora-pipeline.json"
"""In the run folder: the top-level names (files and folders) this pipeline created."""


class NotOurs(FileExistsError):
    """A path the run would write exists and was not written by this pipeline."""


def _first_file(path: Path) -> Path:
    """A file inside `path` to name in the error (the folder itself if it has none)."""
    if path.is_dir():
        for child in sorted(path.rglob("*")):
            if child.is_file() or child.is_symlink():
                return child
    return path


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


class RunFolder:
    """The run folder and the registry of the names the pipeline owns in it."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.registry = self.run_dir / REGISTRY_NAME

    def owned(self) -> set[str]:
        """Names claimed by earlier runs of the pipeline in this folder."""
        if not self.registry.is_file():
            return set()
        try:
            return set(json.loads(self.registry.read_text(encoding="utf-8"))["owned"])
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise NotOurs(
                f"{self.registry} is damaged ({error}); it records which files of the run the "
                "pipeline wrote. Move the run folder aside or choose another run_dir"
            ) from error

    def foreign(self, names: Iterable[str]) -> list[Path]:
        """The paths among `names` that exist, hold something, and were not claimed by us."""
        owned = self.owned() | {LOCK_NAME}
        found = []
        for name in names:
            path = self.run_dir / name
            exists = path.exists() or path.is_symlink()
            if name not in owned and exists and not _is_empty_dir(path):
                found.append(path)
        return found

    def claim(self, names: Iterable[str]) -> None:
        """Refuse if any of `names` belongs to someone else; else record them all as ours.

        Called once before any step runs, with every name the requested steps will write.
        """
        names = sorted(set(names))
        self.check(names)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.registry, {"owned": sorted(self.owned() | set(names))})

    def check(self, names: Iterable[str]) -> None:
        """`claim`'s refusal without writing anything (run before the folder is locked, so a
        refused folder gets no lock file either)."""
        names = sorted(set(names))
        if self.registry.exists() and not self.registry.is_file():
            raise NotOurs(f"{self.registry} exists and is not the pipeline's registry file")
        foreign = self.foreign(names)
        if foreign:
            raise NotOurs(
                f"{_first_file(foreign[0])} is in the run folder but was not written by "
                f"sora-pipeline (also: {[p.name for p in foreign[1:]]}); the run would overwrite "
                f"it. Move it out of {self.run_dir}, or choose another run_dir. Existing shards "
                "are read in place with dataset=shards dataset.path='DIR/*.tar' (DIR outside "
                "the run folder)."
            )
