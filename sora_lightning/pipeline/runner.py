"""Runs pipeline steps locally in dependency order, skipping steps whose outputs verify.

Each step runs as its own process with its output shown and kept in `logs/<step>.log`; a failed
step stops its dependents and the report names the step and its log.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig

from sora_lightning.pipeline.steps import STEPS, Step, config_fingerprint, hash_outputs, steps_for
from sora_lightning.utils import file_sha256, write_json_atomic


@dataclass
class StepResult:
    """What happened to one step in this invocation."""

    name: str
    status: str  # done | skipped | failed | blocked
    seconds: float = 0.0
    log: str = ""
    detail: dict = field(default_factory=dict)


def verify(step: Step, run_dir: Path) -> bool:
    """True when the step's manifest exists and every listed output still has its recorded hash."""
    path = step.manifest_path(run_dir)
    if not path.is_file():
        return False
    recorded = json.loads(path.read_text()).get("outputs", {})
    if not recorded:
        return False
    for rel, digest in recorded.items():
        file = run_dir / rel
        if not file.is_file() or file_sha256(file) != digest:
            return False
    return bool(step.output_files(run_dir))


def config_changes(steps: list[Step], cfg: DictConfig, run_dir: Path) -> dict[str, list[str]]:
    """Finished steps whose outputs still verify but were made with other config values.

    Why: rerunning with a changed setting (say `model.text.layers`) must not reuse outputs made
    with the old one (the DiT would then refuse the cache after its step was skipped, or worse,
    samples would come from the old model), and silently redoing a finished training run could
    throw away hours of work. So the run stops before any work and names the changed keys.
    """
    changed = {}
    for step in steps:
        manifest = step.manifest_path(run_dir)
        if not manifest.is_file():
            continue
        recorded = json.loads(manifest.read_text()).get("config", {})
        current = config_fingerprint(step, cfg)
        keys = [k for k in current if recorded.get(k) != current[k]]
        if keys and verify(step, run_dir):  # hash the outputs only when the config differs
            changed[step.name] = keys
    return changed


def run_command(command: list[str], log_path: Path) -> int:
    """Run one step's command, streaming its output to the console and to its log file."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log_file:
        log_file.write(("$ " + " ".join(command) + "\n").encode())
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert process.stdout is not None
        for chunk in iter(lambda: process.stdout.read1(4096), b""):  # type: ignore[union-attr]
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
            log_file.write(chunk)
        return process.wait()


def select_steps(names: list[str] | None, cfg: DictConfig | None = None) -> list[Step]:
    """The requested steps in pipeline order (all by default), fitted to `cfg` (`steps_for`).

    An unknown name is an error; a step the config leaves out (the vae step under
    `vae.pretrained`) is not run even when named.
    """
    known = {s.name for s in STEPS}
    unknown = set(names or []) - known
    if unknown:
        raise ValueError(
            f"unknown pipeline steps {sorted(unknown)}; known: {[s.name for s in STEPS]}"
        )
    return [s for s in steps_for(cfg) if names is None or s.name in names]


def step_log(run_dir: Path, name: str) -> Path:
    """Where a step's process output is kept (`logs/<step>.log`), whichever runner ran it."""
    return run_dir / "logs" / f"{name}.log"


def skipped_result(step: Step, run_dir: Path) -> StepResult:
    """A step whose outputs verify is not run again; its log is the one of the run that made them."""
    return StepResult(step.name, "skipped", log=str(step_log(run_dir, step.name)))


def run_local(
    cfg: DictConfig,
    run_dir: Path,
    overrides: list[str],
    names: list[str] | None = None,
    force: bool = False,
) -> list[StepResult]:
    """Run the selected steps; dependents of a failed step are reported as blocked, not run."""
    results: dict[str, StepResult] = {}
    for step in select_steps(names, cfg):
        failed_inputs = [
            i for i in step.inputs if results.get(i) and results[i].status in ("failed", "blocked")
        ]
        if failed_inputs:
            results[step.name] = StepResult(step.name, "blocked", detail={"because": failed_inputs})
            continue
        if not force and verify(step, run_dir):
            results[step.name] = skipped_result(step, run_dir)
            continue
        results[step.name] = _run_step(step, cfg, run_dir, overrides)
    return list(results.values())


def _run_step(step: Step, cfg: DictConfig, run_dir: Path, overrides: list[str]) -> StepResult:
    log_path = step_log(run_dir, step.name)
    print(f"\n=== step {step.name} (log: {log_path}) ===", flush=True)
    start = time.perf_counter()
    code = run_command(step.command(cfg, run_dir, overrides), log_path)
    seconds = time.perf_counter() - start
    if code != 0 or not step.output_files(run_dir):
        detail = {"exit_code": code, "missing_outputs": not step.output_files(run_dir)}
        return StepResult(step.name, "failed", seconds, str(log_path), detail)
    record = {"step": step.name, "seconds": seconds, "outputs": hash_outputs(step, run_dir)}
    if cfg is not None:
        record["config"] = config_fingerprint(step, cfg)
    write_json_atomic(step.manifest_path(run_dir), record)
    return StepResult(step.name, "done", seconds, str(log_path))
