"""Runs pipeline steps locally in dependency order, skipping steps whose outputs verify.

Each step runs as its own process with its output shown and kept in `logs/<step>.log`; a failed
step stops its dependents and the report names the step and its log.

SIGTERM or SIGUSR2 sent to the pipeline (Kubernetes, `kill`, a scheduler) is passed on to the
running step, whose training checkpoints at its next step boundary and exits; no later step
starts, and rerunning the pipeline continues from that checkpoint.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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


class StopRequests:
    """Stop signals the pipeline received, and the step process they are passed on to."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR2)

    def __init__(self) -> None:
        self.signum: int | None = None
        self.process: subprocess.Popen | None = None

    def handle(self, signum: int, frame: object = None) -> None:
        self.signum = self.signum or signum
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signum)  # the step checkpoints and exits


STOPS = StopRequests()


@contextmanager
def stop_signals_forwarded() -> Iterator[StopRequests]:
    """While steps run, SIGTERM/SIGUSR2 go to the running step and stop the pipeline after it."""
    if threading.current_thread() is not threading.main_thread():
        yield STOPS
        return
    previous = {signum: signal.getsignal(signum) for signum in StopRequests.SIGNALS}
    STOPS.signum = None
    for signum in StopRequests.SIGNALS:
        signal.signal(signum, STOPS.handle)
    try:
        yield STOPS
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _end_with_parent() -> Callable[[], None] | None:
    """What a step's process runs before exec: it is killed when the pipeline dies (Linux prctl).

    Why: a pipeline killed outright (`kill -9`, the OOM killer) cannot pass a signal on, and its
    step would go on alone: holding RUN/vae or RUN/dit's lock, so a rerun's step is refused, or,
    for the cache (which takes no lock and finishes before it honours SIGTERM), writing the same
    files as the rerun's cache step. SIGKILL, not SIGTERM, so the step is surely gone at once, as
    if the pipeline's process group had been killed; the rerun resumes training steps from their
    newest checkpoint that verifies. libc is looked up here, in the parent: between fork and exec
    only the call itself runs.
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def arm() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the pipeline died before prctl took effect
            os.kill(os.getpid(), signal.SIGKILL)

    return arm


PR_SET_PDEATHSIG = 1


def run_command(command: list[str], log_path: Path) -> int:
    """Run one step's command, streaming its output to the console and to its log file."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log_file:
        log_file.write(("$ " + " ".join(command) + "\n").encode())
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            preexec_fn=_end_with_parent(),
        )
        STOPS.process = process
        if STOPS.signum is not None:  # arrived while the step was starting
            process.send_signal(STOPS.signum)
        assert process.stdout is not None
        try:
            for chunk in iter(lambda: process.stdout.read1(4096), b""):  # type: ignore[union-attr]
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
                log_file.write(chunk)
            return process.wait()
        finally:
            STOPS.process = None


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
    """Run the selected steps; dependents of a failed step are reported as blocked, not run.

    After a stop signal (`stop_signals_forwarded`) no further step starts.
    """
    results: dict[str, StepResult] = {}
    with stop_signals_forwarded() as stops:
        for step in select_steps(names, cfg):
            if stops.signum is not None:
                print(f"{signal.Signals(stops.signum).name}: not starting {step.name}", flush=True)
                break
            results[step.name] = _next_result(step, results, cfg, run_dir, overrides, force)
    return list(results.values())


def _next_result(
    step: Step,
    results: dict[str, StepResult],
    cfg: DictConfig,
    run_dir: Path,
    overrides: list[str],
    force: bool,
) -> StepResult:
    """Blocked (an input failed), skipped (outputs verify) or run."""
    failed_inputs = [
        i for i in step.inputs if results.get(i) and results[i].status in ("failed", "blocked")
    ]
    if failed_inputs:
        return StepResult(step.name, "blocked", detail={"because": failed_inputs})
    if not force and verify(step, run_dir):
        return skipped_result(step, run_dir)
    return _run_step(step, cfg, run_dir, overrides)


def _run_step(step: Step, cfg: DictConfig, run_dir: Path, overrides: list[str]) -> StepResult:
    log_path = step_log(run_dir, step.name)
    print(f"\n=== step {step.name} (log: {log_path}) ===", flush=True)
    start = time.perf_counter()
    code = run_command(step.command(cfg, run_dir, overrides), log_path)
    seconds = time.perf_counter() - start
    if code != 0 or not step.output_files(run_dir):
        detail = {"exit_code": code, "missing_outputs": not step.output_files(run_dir)}
        if STOPS.signum is not None:
            detail["stopped_by"] = signal.Signals(STOPS.signum).name
        return StepResult(step.name, "failed", seconds, str(log_path), detail)
    record = {"step": step.name, "seconds": seconds, "outputs": hash_outputs(step, run_dir)}
    if cfg is not None:
        record["config"] = config_fingerprint(step, cfg)
    write_json_atomic(step.manifest_path(run_dir), record)
    return StepResult(step.name, "done", seconds, str(log_path))
