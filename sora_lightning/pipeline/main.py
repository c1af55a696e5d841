"""`sora-pipeline`: the whole job (shards -> VAE -> cache -> DiT -> samples -> eval -> export).

Re-running the same command continues where it stopped: finished steps whose outputs verify are
skipped. Ends with a summary table (status and time per step) and the evaluation scores.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from sora_lightning.config import CONFIG_PATH
from sora_lightning.eval.evaluate import headline
from sora_lightning.pipeline.ownership import RunFolder
from sora_lightning.pipeline.runner import StepResult, config_changes, run_local, select_steps
from sora_lightning.pipeline.steps import Step, check_pretrained, hydra_value, prompt_expander
from sora_lightning.runlock import LOCK_NAME, hold_run_lock
from sora_lightning.sample.provenance import Provenance
from sora_lightning.sample.safety import SafetyConfig
from sora_lightning.train.main import validate
from sora_lightning.utils import write_json_atomic

PIPELINE_ONLY_KEYS = ("samples", "eval", "pipeline", "provenance", "safety", "caption", "export")


def forwarded_overrides(overrides: list[str]) -> list[str]:
    """The user's overrides that the training steps understand (pipeline-only keys stay here)."""

    def root(override: str) -> str:
        return override.split("=", 1)[0].lstrip("+~").split(".", 1)[0]

    return [o for o in overrides if root(o) not in PIPELINE_ONLY_KEYS and root(o) != "run_dir"]


def summarize(results: list[StepResult], run_dir: Path) -> dict[str, Any]:
    """Print a table of steps with their time, plus eval scores; also written to summary.json."""
    table = Table(title=f"sora-pipeline: {run_dir}")
    for column in ("step", "status", "seconds", "log"):
        table.add_column(column)
    for r in results:
        table.add_row(r.name, r.status, f"{r.seconds:.1f}", r.log)
    console = Console()
    console.print(table)
    summary: dict[str, Any] = {
        "steps": [vars(r) for r in results],
        "total_seconds": sum(r.seconds for r in results),
    }
    eval_path = run_dir / "eval" / "eval.json"
    if eval_path.is_file():
        scores = json.loads(eval_path.read_text())
        summary["eval"] = headline(scores)
        console.print(f"eval (held-out prompts): {summary['eval']}")
    console.print(f"total time this run: {summary['total_seconds']:.1f} s")
    for r in results:
        if r.status == "failed":
            console.print(f"[red]step {r.name} failed ({r.detail}); see its log: {r.log}[/red]")
            for part in r.detail.get("failed_parts", []):
                console.print(
                    f"[red]  array task {part['job_id']} (part {part['part']}) {part['state']}: "
                    f"logs {part['log']} and {part['slurm_log']}[/red]",
                    soft_wrap=True,  # whole paths, so they can be copied from the report
                )
        if r.status == "blocked":
            console.print(
                f"[yellow]step {r.name} not run: its inputs {r.detail['because']} failed[/yellow]"
            )
    write_json_atomic(run_dir / "summary.json", summary)
    return summary


def written_names(steps: list[Step], slurm: bool) -> list[str]:
    """Every top-level name in the run folder that running `steps` writes."""
    names = [step.writes for step in steps] + ["logs", "steps", "pipeline.yaml", "summary.json"]
    return names + [LOCK_NAME] + (["slurm"] if slurm else [])


def run_pipeline(cfg: DictConfig, overrides: list[str]) -> dict[str, Any]:
    """Check the config and the run folder, then run the requested steps locally or on SLURM.

    Everything that can be refused is refused here, before any step starts: a bad config, an
    input that does not exist, another pipeline already running in the run folder (`runlock`), a
    file in the run folder that the pipeline did not write.
    """
    check_pretrained(cfg)  # model.pretrained=EXPORT lacking a file is named now, with the fix
    validate(OmegaConf.merge(cfg, {"task": "vae", "data": {"shards": "x"}}))
    Provenance.from_config(
        cfg.get("provenance")
    )  # a bad key or certificate fails now, not after training
    SafetyConfig.from_config(cfg.get("safety"))
    prompt_expander(cfg, Path(cfg.run_dir))  # prompt_expander=llm without a model fails now
    if cfg.launcher.name not in ("local", "slurm"):
        raise ValueError(f"launcher={cfg.launcher.name!r} is not one of local, slurm")
    run_dir = Path(cfg.run_dir)
    names = list(cfg.pipeline.steps) if cfg.pipeline.get("steps") else None
    steps = select_steps(names, cfg)
    RunFolder(run_dir).check(written_names(steps, cfg.launcher.name == "slurm"))
    with hold_run_lock(run_dir, "sora-pipeline"):  # steps' sora-train lock RUN/vae, RUN/dit
        return _run_locked(cfg, overrides, run_dir, names, steps)


def _run_locked(
    cfg: DictConfig, overrides: list[str], run_dir: Path, names: list[str] | None, steps: list[Step]
) -> dict[str, Any]:
    """`run_pipeline` once this process holds the run folder's lock (claimed again under it)."""
    RunFolder(run_dir).claim(written_names(steps, cfg.launcher.name == "slurm"))
    changed = {} if cfg.pipeline.force else config_changes(steps, cfg, run_dir)
    if changed:
        raise ValueError(
            f"{run_dir} holds finished steps made with other settings: {changed} (step: changed "
            "config keys). Use a new run_dir, or redo them and what depends on them with "
            f"pipeline.force=true pipeline.steps=[{','.join(changed)},...]"
        )
    (run_dir / "pipeline.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    forwarded, force = forwarded_overrides(overrides), bool(cfg.pipeline.force)
    if cfg.launcher.name == "slurm":
        from sora_lightning.pipeline.slurm_runner import run_slurm

        results = run_slurm(cfg, run_dir, forwarded, names, force=force)
    else:
        results = run_local(cfg, run_dir, forwarded, names, force=force)
    return summarize(results, run_dir)


def search_path_overrides() -> list[str]:
    """The user's config folders (`hydra.searchpath=[...]`, `--config-dir DIR`) as an override
    for the steps: they compose the same groups, so e.g. a curriculum of one's own must be found
    there too, and Hydra keeps both out of `overrides.task`."""
    hydra_cfg = HydraConfig.get()
    paths = [str(path) for path in hydra_cfg.searchpath]
    for source in hydra_cfg.runtime.config_sources:
        if source.provider == "command-line" and source.path:  # --config-dir
            paths.append(f"{source.schema}://{source.path}")
    return [f"hydra.searchpath=[{','.join(hydra_value(p) for p in paths)}]"] if paths else []


@hydra.main(config_path=CONFIG_PATH, config_name="pipeline", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Console entry point; exits non-zero when a step failed."""
    summary = run_pipeline(cfg, [*HydraConfig.get().overrides.task, *search_path_overrides()])
    if any(s["status"] in ("failed", "blocked") for s in summary["steps"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
