"""Where training samples come from (`conf/dataset/`), and which of them are held out.

Why one module: every step (shards, VAE, cache, DiT, eval) must agree on the source and on the
held-out split, so the config is typed and checked here once, and the split is one pure
function of a sample's key. The world is one source among others: `world`, `folder` and
`manifest` are written into the run's own shards by `ingest`; `shards` are read where they are,
never rewritten, and only indexed into the run folder.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sora_lightning.data import world
from sora_lightning.data.shards import BadSampleCounter, iter_shard_samples
from sora_lightning.utils import write_json_atomic

SOURCES = ("world", "folder", "manifest", "shards")
"""`dataset.name` choices, one YAML each in conf/dataset/."""


@dataclass
class DatasetConfig:
    """The `dataset` node of the composed config (every field of every source; each uses its own)."""

    name: str = "world"
    """One of SOURCES."""
    path: str | None = None
    """folder: a directory; manifest: a .csv/.jsonl file; shards: a glob of .tar files."""
    clips: int = 1200
    """world: clips rendered."""
    images: int = 400
    """world: still images rendered."""
    seed: int = 0
    """world: renderer seed."""
    clip_lengths: tuple[int, ...] = ()
    """world: frame counts of rendered clips; empty: every world length (5, 9, 17, 33)."""
    max_objects: int = 3
    """world: at most this many objects per scene (1 to 3)."""
    speed_scale: float = 1.0
    """world: multiplier on object speeds (further per frame, so motion is more of each clip)."""
    path_spread: float | None = None
    """world: a translating object's path midpoint lies within this share of the frame from its
    centre (None: anywhere it fits), so start words and start no longer give the direction away."""
    captions: str = "full"
    """world: "full" (short + detailed captions) or "alt_text" (terse web-style alt-text only)."""
    labelled_fraction: float = 0.1
    """world, alt_text: share of samples (by key hash) whose record keeps the scene's truth."""
    shard_max_count: int = 500
    """Samples per written shard."""
    workers: int = 1
    """Processes probing/decoding (or rendering) inputs; the shards do not depend on it."""
    full_decode: bool = True
    """Test-decode every frame at ingest (False: the first frame only)."""
    val_fraction: float = 0.05
    """Share of samples held out by key (`is_held_out`): never trained on, used for validation."""
    prompts: tuple[str, ...] = ()
    """Example prompts for this data, sampled by the samples and eval steps; empty: captions of
    held-out samples (so a recipe's prompts never follow it onto another dataset)."""

    def __post_init__(self) -> None:
        self.prompts = tuple(str(p) for p in self.prompts or ())
        self.clip_lengths = tuple(int(n) for n in self.clip_lengths or ())
        if any(n < 2 for n in self.clip_lengths):
            raise ValueError(f"dataset.clip_lengths must be >= 2 frames, got {self.clip_lengths}")
        if not 1 <= self.max_objects <= 3 or not self.speed_scale > 0:
            raise ValueError(
                f"dataset.max_objects must be 1..3 and dataset.speed_scale > 0, got "
                f"{self.max_objects} and {self.speed_scale}"
            )
        try:
            world.check_path_spread(self.path_spread)
        except ValueError as error:
            raise ValueError(f"dataset.{error}") from None
        if self.name not in SOURCES:
            raise ValueError(f"dataset.name={self.name!r} is not one of {SOURCES}")
        if self.captions not in ("full", "alt_text") or not 0.0 <= self.labelled_fraction <= 1.0:
            raise ValueError(
                f"dataset.captions must be full or alt_text and dataset.labelled_fraction in "
                f"[0, 1], got {self.captions!r} and {self.labelled_fraction}"
            )
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"dataset.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.shard_max_count < 1 or self.workers < 1:
            raise ValueError("dataset.shard_max_count and dataset.workers must be >= 1")
        if self.name != "world":
            self._check_path()

    def _check_path(self) -> None:
        """The input must exist now: a typo should fail before any step runs."""
        if not self.path or self.path == "???":
            raise ValueError(f"dataset={self.name} needs dataset.path=...")
        path = Path(self.path).expanduser()
        if self.name == "folder" and not path.is_dir():
            raise ValueError(f"dataset.path={self.path} is not a folder (dataset=folder)")
        if self.name == "manifest" and not path.is_file():
            raise ValueError(f"dataset.path={self.path} is not a file (dataset=manifest)")
        if self.name == "shards" and not glob.glob(str(path)):
            raise ValueError(
                f"dataset.path={self.path} matches no file (dataset=shards wants a glob of .tar)"
            )

    @classmethod
    def from_config(cls, node: Any) -> DatasetConfig:
        """From the composed `dataset` node (a DictConfig or dict); unknown keys are an error."""
        values = dict(node.items()) if hasattr(node, "items") else dict(node)
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown dataset keys {unknown}; known: {sorted(known)}")
        return cls(**values)

    @property
    def writes_shards(self) -> bool:
        """True when the pipeline writes the run's own shards (every source but `shards`)."""
        return self.name != "shards"


def is_held_out(key: str, fraction: float) -> bool:
    """Whether the sample `key` belongs to the held-out split.

    A hash of the key alone, so the split is the same in every step, process, rank and rerun,
    does not depend on shard order or count, and a sample never moves between splits when
    other samples are added.
    """
    if fraction <= 0.0:
        return False
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def index_shards(pattern: str, out_dir: str | Path) -> dict:
    """`dataset=shards`: count the readable samples of existing shards into `summary.json`.

    The shards are only read. The summary names each one with its size and mtime, so a later
    step (and a rerun) can tell that they are still the files the run was built on.
    """
    paths = sorted(Path(p).resolve() for p in glob.glob(str(Path(pattern).expanduser())))
    if not paths:
        raise FileNotFoundError(f"dataset.path={pattern} matches no shard")
    stats = BadSampleCounter()
    written = sum(1 for _ in iter_shard_samples([str(p) for p in paths], stats=stats))
    summary = {
        "written": written,
        "skipped": dict(sorted(stats.counts.items())),
        "shards": [str(p) for p in paths],
        "source": f"shards:{pattern}",
        "request": {"shards": [_stat(p) for p in paths]},
    }
    write_json_atomic(Path(out_dir) / "summary.json", summary)
    return summary


def _stat(path: Path) -> dict[str, Any]:
    stat = path.stat()
    return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m sora_lightning.data.sources --index-shards GLOB --output DIR`."""
    parser = argparse.ArgumentParser(description="Index existing webdataset shards (read only)")
    parser.add_argument("--index-shards", required=True, help="glob of existing .tar shards")
    parser.add_argument("--output", required=True, type=Path, help="folder for summary.json")
    args = parser.parse_args(argv)
    summary = index_shards(args.index_shards, args.output)
    print(json.dumps({k: summary[k] for k in ("written", "skipped", "source")}, indent=2))
    return 0 if summary["written"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
