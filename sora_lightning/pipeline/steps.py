"""The pipeline as named steps with declared inputs and outputs.

Each step is one command (so the local runner and SLURM run the very same thing) that reads the
outputs of its input steps from the run folder. A finished step leaves a manifest of its output
files' hashes; a step whose manifest verifies is skipped on re-run. Steps that work shard by shard
(writing shards, caching latents) also say how to run as P array tasks plus a merge: the SLURM
runner uses that, and the merged outputs equal the single command's.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig

from sora_lightning.utils import file_sha256

Command = Callable[[DictConfig, Path, list[str]], list[str]]
PartCommand = Callable[[DictConfig, Path, int], list[str]]
"""(cfg, run_dir, num_parts) -> the command of every array task; each task's part index comes
from $SLURM_ARRAY_TASK_ID, which both sharded CLIs read when --part is not given."""
MergeCommand = Callable[[DictConfig, Path], list[str]]


@dataclass
class Step:
    """One resumable unit of the job."""

    name: str
    inputs: tuple[str, ...]
    """Names of the steps whose outputs this step reads."""
    outputs: tuple[str, ...]
    """Files (relative to the run folder, globs allowed) that prove the step finished."""
    command: Command = field(repr=False)
    part_command: PartCommand | None = field(default=None, repr=False)
    """Set for steps that can run as a job array over parts (with `merge_command` after)."""
    merge_command: MergeCommand | None = field(default=None, repr=False)
    """Combines the parts' files into the step's declared outputs."""

    @property
    def splits_into_parts(self) -> bool:
        return self.part_command is not None and self.merge_command is not None

    def manifest_path(self, run_dir: Path) -> Path:
        return run_dir / "steps" / f"{self.name}.json"

    def output_files(self, run_dir: Path) -> list[Path]:
        """Existing files matching the declared outputs (each pattern must match at least one)."""
        files: list[Path] = []
        for pattern in self.outputs:
            matches = sorted(run_dir.glob(pattern))
            if not matches:
                return []
            files.extend(m for m in matches if m.is_file())
        return files


PY = [sys.executable, "-m"]


def _shards(cfg: DictConfig, run: Path, _: list[str]) -> list[str]:
    world = cfg.world
    return [
        *PY,
        "sora_lightning.data.ingest",
        "--world-clips",
        str(world.clips),
        "--world-images",
        str(world.images),
        "--seed",
        str(world.seed),
        "--output",
        str(run / "shards"),
        "--max-count",
        str(world.shard_max_count),
        "--overwrite",
    ]


def _shards_part(cfg: DictConfig, run: Path, num_parts: int) -> list[str]:
    return [*_shards(cfg, run, []), "--no-progress", "--num-parts", str(num_parts)]


def _shards_merge(cfg: DictConfig, run: Path) -> list[str]:
    return [*PY, "sora_lightning.data.ingest", "--merge-summaries", "--output", str(run / "shards")]


def _vae(cfg: DictConfig, run: Path, overrides: list[str]) -> list[str]:
    return [
        *PY,
        "sora_lightning.train.main",
        *overrides,
        "task=vae",
        f"run_dir={run / 'vae'}",
        f"data.shards={run / 'shards'}/*.tar",
    ]


def _cache(cfg: DictConfig, run: Path, _: list[str]) -> list[str]:
    text_path = cfg.model.text.get("path")
    return [
        *PY,
        "sora_lightning.data.latent_cache",
        "--shards",
        str(run / "shards" / "*.tar"),
        "--vae-dir",
        str(run / "vae"),
        "--output",
        str(run / "cache"),
        "--max-area",
        str(cfg.cache.max_area),
        "--multiple",
        str(cfg.cache.multiple),
        "--max-frames",
        str(cfg.cache.max_frames),
        "--text-max-length",
        str(cfg.model.text.max_length),
        "--text-layers",
        ",".join(str(layer) for layer in cfg.model.text.get("layers", [-1])),
        *(["--text-path", str(text_path)] if text_path else []),
    ]


def _cache_part(cfg: DictConfig, run: Path, num_parts: int) -> list[str]:
    return [*_cache(cfg, run, []), "--num-parts", str(num_parts)]


def _cache_merge(cfg: DictConfig, run: Path) -> list[str]:
    return [*PY, "sora_lightning.data.latent_cache", "--merge", "--output", str(run / "cache")]


def _dit(cfg: DictConfig, run: Path, overrides: list[str]) -> list[str]:
    return [
        *PY,
        "sora_lightning.train.main",
        *overrides,
        "task=dit",
        f"run_dir={run / 'dit'}",
        f"data.cache_dir={run / 'cache'}",
        f"data.vae_dir={run / 'vae'}",
    ]


def _samples(cfg: DictConfig, run: Path, _: list[str]) -> list[str]:
    s = cfg.samples
    return [
        *PY,
        "sora_lightning.sample.main",
        f"ckpt={run / 'dit' / 'final'}",
        f"out_dir={run / 'samples'}",
        f"prompts=[{','.join(repr(p) for p in s.prompts)}]",
        f"frames={s.frames}",
        f"height={s.height}",
        f"width={s.width}",
        f"steps={s.steps}",
        f"cfg_scale={s.cfg_scale}",
        f"seed={s.seed}",
    ]


def _eval(cfg: DictConfig, run: Path, _: list[str]) -> list[str]:
    e = cfg.eval
    return [
        *PY,
        "sora_lightning.eval.main",
        f"ckpt={run / 'dit' / 'final'}",
        f"out_dir={run / 'eval'}",
        f"frames={e.frames}",
        f"height={e.height}",
        f"width={e.width}",
        f"steps={e.steps}",
        f"cfg_scale={e.cfg_scale}",
        f"num_seeds={e.num_seeds}",
    ]


def _export(cfg: DictConfig, run: Path, _: list[str]) -> list[str]:
    return [
        *PY,
        "sora_lightning.train.export",
        "--dit",
        str(run / "dit" / "final"),
        "--vae",
        str(run / "vae"),
        "--output",
        str(run / "export"),
    ]


STEPS: tuple[Step, ...] = (
    Step(
        "shards",
        (),
        ("shards/summary.json", "shards/*.tar"),
        _shards,
        _shards_part,
        _shards_merge,
    ),
    Step("vae", ("shards",), ("vae/vae.safetensors", "vae/vae.json"), _vae),
    Step(
        "cache",
        ("shards", "vae"),
        ("cache/meta.json", "cache/latents-*.tar"),
        _cache,
        _cache_part,
        _cache_merge,
    ),
    Step("dit", ("cache", "vae"), ("dit/final/dit.safetensors", "dit/final/dit.json"), _dit),
    Step("samples", ("dit",), ("samples/*.mp4",), _samples),
    Step("eval", ("dit",), ("eval/eval.json",), _eval),
    Step("export", ("dit", "vae"), ("export/dit.safetensors", "export/vae.safetensors"), _export),
)


def hash_outputs(step: Step, run_dir: Path) -> dict[str, str]:
    """Relative path -> sha256 of every output file of a finished step."""
    return {str(p.relative_to(run_dir)): file_sha256(p) for p in step.output_files(run_dir)}
