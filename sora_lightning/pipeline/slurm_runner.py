"""Runs pipeline steps as SLURM jobs chained by `afterok` dependencies (`sora-pipeline launcher=slurm`).

Every step that does not verify becomes one `sbatch` job running the very command the local runner
runs (`Step.command`), wrapped by `python -m sora_lightning.pipeline.slurm_runner` so the job itself
writes the step's output manifest. A job depends on the jobs of its inputs; a failed job's
dependents are cancelled by SLURM (`--kill-on-invalid-dep=yes`) and reported as blocked. The
training steps (vae, dit) get launcher.nodes x launcher.tasks_per_node ranks under srun; the
others one task. The sharded steps (writing shards, captioning, caching latents) run as a job
array of launcher.array_parts one-task jobs (`sbatch --array`, each task's part from
$SLURM_ARRAY_TASK_ID; a caption task gets one GPU) and a merge job that depends on the whole array
and writes the dataset-wide files (the shard summary, the captions' and the cache's meta.json) and
the manifest. A failed array task is reported with its own
logs. Plain sbatch scripts rather than submitit pickles: each job is a command line, and the
scripts stay in run_dir/slurm/ for inspection and manual re-submission.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from sora_lightning.launch.slurm import SlurmLauncherConfig, launcher_config
from sora_lightning.pipeline.runner import (
    StepResult,
    _run_step,
    run_command,
    select_steps,
    skipped_result,
    step_log,
    verify,
)
from sora_lightning.pipeline.steps import STEPS, Step, steps_for

TRAINING_STEPS = ("vae", "dit")
ONE_GPU_STEPS = ("caption",)
"""Steps whose every job (or array task) but the merge runs one model on one GPU."""
FINAL_STATES = (
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "OUT_OF_MEMORY",
    "NODE_FAIL",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
)


def step_overrides(overrides: list[str], step: Step, launcher: SlurmLauncherConfig) -> list[str]:
    """The user's overrides for a step's command: launcher keys dropped (a job must not submit
    again), trainer ranks matched to the allocation for training steps."""
    kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+~").split(".", 1)[0] != "launcher"]
    if step.name in TRAINING_STEPS:
        kept += [
            f"trainer.num_nodes={launcher.nodes}",
            f"trainer.devices={launcher.tasks_per_node}",
        ]
    return kept


@dataclass
class StepJob:
    """One sbatch job of a step: the whole step, its array of parts, or the merge after them."""

    step: Step
    command: list[str]
    kind: str = "step"
    """step | parts | merge"""
    num_parts: int = 1

    @property
    def label(self) -> str:
        return self.step.name if self.kind == "step" else f"{self.step.name}-{self.kind}"

    def output_pattern(self, run_dir: Path) -> str:
        """sbatch --output: one file per array task (%A_%a) or per job (%j)."""
        suffix = "%A_%a" if self.kind == "parts" else "%j"
        return str(run_dir / "slurm" / f"{self.label}-{suffix}.out")


def step_jobs(
    step: Step, cfg: DictConfig, run_dir: Path, overrides: list[str], launcher: SlurmLauncherConfig
) -> list[StepJob]:
    """The jobs of one step, in submission order: [array, merge] for sharded steps, else [step]."""
    if step.splits_into_parts and launcher.array_parts > 1:
        assert step.part_command is not None and step.merge_command is not None
        kept = step_overrides(overrides, step, launcher)
        parts = step.part_command(cfg, run_dir, kept, launcher.array_parts)
        return [
            StepJob(step, parts, "parts", launcher.array_parts),
            StepJob(step, step.merge_command(cfg, run_dir, kept), "merge"),
        ]
    return [StepJob(step, step.command(cfg, run_dir, step_overrides(overrides, step, launcher)))]


def batch_script(job: StepJob, run_dir: Path, launcher: SlurmLauncherConfig) -> str:
    """The sbatch script of one job (kept in run_dir/slurm/ for inspection and manual re-submission)."""
    step = job.step
    training = step.name in TRAINING_STEPS and job.kind == "step"
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name=sora-{job.label}",
        f"#SBATCH --output={job.output_pattern(run_dir)}",
        f"#SBATCH --nodes={launcher.nodes if training else 1}",
        f"#SBATCH --ntasks-per-node={launcher.tasks_per_node if training else 1}",
        f"#SBATCH --cpus-per-task={launcher.cpus_per_task}",
        f"#SBATCH --time={launcher.time_min}",
    ]
    if launcher.partition:
        lines.append(f"#SBATCH --partition={launcher.partition}")
    if training and launcher.gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={launcher.gpus_per_node}")
    if step.name in ONE_GPU_STEPS and job.kind != "merge" and launcher.gpus_per_node:
        lines.append("#SBATCH --gpus-per-node=1")
    for key in ("account", "qos"):
        if getattr(launcher, key):
            lines.append(f"#SBATCH --{key}={getattr(launcher, key)}")
    if job.kind == "parts":
        lines.append(f"#SBATCH --array=0-{job.num_parts - 1}")
    lines += [
        f"#SBATCH --{k.replace('_', '-')}={v}" for k, v in launcher.additional_parameters.items()
    ]
    wrapper = [
        sys.executable,
        "-m",
        "sora_lightning.pipeline.slurm_runner",
        str(run_dir),
        step.name,
    ]
    wrapper += ["--srun"] if training else []
    wrapper += ["--part-task"] if job.kind == "parts" else []
    lines += [
        *launcher.setup,
        "export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1} TOKENIZERS_PARALLELISM=false",
        "exec " + shlex.join([*wrapper, "--", *job.command]),
    ]
    return "\n".join(lines) + "\n"


def submit_step(script: Path, dependencies: list[str]) -> str:
    """sbatch the script after its dependencies succeed; returns the job id."""
    args = ["sbatch", "--parsable", "--kill-on-invalid-dep=yes"]
    if dependencies:
        args.append("--dependency=afterok:" + ":".join(dependencies))
    out = subprocess.run([*args, str(script)], check=True, capture_output=True, text=True).stdout
    return out.strip().split(";")[0]


@dataclass
class Submitted:
    """A submitted step: the job that finishes it (what dependents wait for) and its array, if any."""

    job_id: str
    array_id: str | None = None
    num_parts: int = 0

    def part_ids(self) -> list[str]:
        """sacct's JobID of each array task (`<array>_<index>`)."""
        return [f"{self.array_id}_{i}" for i in range(self.num_parts)] if self.array_id else []

    def expected(self) -> list[str]:
        """Every JobID that must reach a final state before the step can be reported."""
        return [*self.part_ids(), self.job_id]


def _array_indices(spec: str) -> list[int]:
    """`[0-3]`, `[0,2-3]` or `[1-3%2]` (a not-yet-started array's tasks) -> indices."""
    indices: list[int] = []
    for item in spec.strip("[]").split("%")[0].split(","):
        low, _, high = item.partition("-")
        indices.extend(range(int(low), int(high or low) + 1))
    return indices


def job_states(job_ids: list[str]) -> dict[str, tuple[str, str, str]]:
    """JobID (`123`, or `123_4` for an array task) -> (state, exit code, elapsed) from accounting.

    Jobs not yet recorded are absent; array tasks that never started (`123_[1-3]`) are expanded.
    """
    out = subprocess.run(
        [
            "sacct",
            "-n",
            "-P",
            "-X",
            "-o",
            "JobID,State,ExitCode,ElapsedRaw",
            "-j",
            ",".join(job_ids),
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    states = {}
    for line in out.splitlines():
        job_id, state, exit_code, elapsed = line.split("|")
        value = (state.split()[0], exit_code, elapsed)
        base, _, index = job_id.partition("_")
        if index.startswith("["):
            states.update({f"{base}_{i}": value for i in _array_indices(index)})
        else:
            states[job_id] = value
    return states


def wait_for_jobs(
    submitted: dict[str, Submitted], poll_s: float = 2.0
) -> dict[str, tuple[str, str, str]]:
    """Poll until every job and array task reached a final state, printing each state change."""
    labels = {j: name for name, sub in submitted.items() for j in sub.expected()}
    query = sorted({sub.job_id for sub in submitted.values()})
    query += sorted({sub.array_id for sub in submitted.values() if sub.array_id})
    seen: dict[str, str] = {}
    while True:
        states = job_states(query) if query else {}
        for job_id, name in labels.items():
            state = states.get(job_id, ("PENDING", "", "0"))[0]
            if seen.get(job_id) != state:
                print(f"step {name}: job {job_id} {state}", flush=True)
                seen[job_id] = state
        if all(states.get(j, ("PENDING",))[0] in FINAL_STATES for j in labels):
            return states
        time.sleep(poll_s)


def submit_jobs(
    jobs: list[StepJob], run_dir: Path, launcher: SlurmLauncherConfig, after: list[str]
) -> Submitted:
    """Write and sbatch a step's jobs, each after the previous one (the first after `after`)."""
    submitted = Submitted("")
    for job in jobs:
        script = run_dir / "slurm" / f"{job.label}.sbatch"
        script.write_text(batch_script(job, run_dir, launcher))
        job_id = submit_step(script, [submitted.job_id] if submitted.job_id else after)
        if job.kind == "parts":
            submitted.array_id, submitted.num_parts = job_id, job.num_parts
        submitted.job_id = job_id
        print(f"submitted step {job.label} as job {job_id}", flush=True)
    return submitted


def run_slurm(
    cfg: DictConfig,
    run_dir: Path,
    overrides: list[str],
    names: list[str] | None = None,
    force: bool = False,
) -> list[StepResult]:
    """Submit every selected step that does not verify as dependent jobs; wait; report like run_local."""
    launcher = launcher_config(cfg)
    run_dir = run_dir.resolve()
    (run_dir / "slurm").mkdir(parents=True, exist_ok=True)
    results: dict[str, StepResult] = {}
    submitted: dict[str, Submitted] = {}
    for step in select_steps(names, cfg):
        if not force and verify(step, run_dir):
            results[step.name] = skipped_result(step, run_dir)
            continue
        jobs = step_jobs(step, cfg, run_dir, overrides, launcher)
        after = [submitted[i].job_id for i in step.inputs if i in submitted]
        submitted[step.name] = submit_jobs(jobs, run_dir, launcher, after)
    states = wait_for_jobs(submitted)
    for name, sub in submitted.items():
        results[name] = step_result(name, sub, states, run_dir, results)
    return [results[s.name] for s in select_steps(names, cfg)]


def failed_parts(name: str, sub: Submitted, states: dict, run_dir: Path) -> list[dict]:
    """Array tasks that did not complete, each with its own log files (the failure report names them)."""
    failed = []
    for index, job_id in enumerate(sub.part_ids()):
        state, exit_code, _ = states.get(job_id, ("UNKNOWN", "", "0"))
        if state != "COMPLETED":
            failed.append(
                {
                    "part": index,
                    "job_id": job_id,
                    "state": state,
                    "exit_code": exit_code,
                    "log": str(part_log(run_dir, name, index)),
                    "slurm_log": str(run_dir / "slurm" / f"{name}-parts-{job_id}.out"),
                }
            )
    return failed


def step_result(
    name: str,
    sub: Submitted,
    states: dict[str, tuple[str, str, str]],
    run_dir: Path,
    earlier: dict[str, StepResult],
) -> StepResult:
    """A finished step's jobs as a StepResult; cancelled after a failed input means blocked."""
    status, exit_code, elapsed = states[sub.job_id]
    seconds = float(elapsed or 0) + max(
        (float(states[j][2] or 0) for j in sub.part_ids() if j in states), default=0.0
    )
    log = str(step_log(run_dir, name))
    step = _bound_step(run_dir, name)
    ids = {"job_id": sub.job_id, **({"array_job_id": sub.array_id} if sub.array_id else {})}
    if status == "COMPLETED" and verify(step, run_dir):
        return StepResult(name, "done", seconds, log, ids)
    bad_inputs = [
        i for i in step.inputs if earlier.get(i) and earlier[i].status in ("failed", "blocked")
    ]
    if status == "CANCELLED" and bad_inputs:
        return StepResult(name, "blocked", 0.0, log, {"because": bad_inputs, **ids})
    parts = failed_parts(name, sub, states, run_dir)
    label = f"{name}-merge" if sub.array_id else name
    detail = {
        **ids,
        "state": status,
        "exit_code": exit_code,
        "slurm_log": str(run_dir / "slurm" / f"{label}-{sub.job_id}.out"),
    }
    if parts:
        detail["failed_parts"] = parts
        log = parts[0]["log"]
    return StepResult(name, "failed", seconds, log, detail)


def part_log(run_dir: Path, name: str, part: int) -> Path:
    """The log of one array task of a step (the merge job writes logs/<step>.log)."""
    return run_dir / "logs" / f"{name}.part-{part:03d}.log"


def _run_config(run_dir: Path) -> DictConfig | None:
    """The config the pipeline ran with (it writes pipeline.yaml before submitting any job)."""
    path = run_dir / "pipeline.yaml"
    return OmegaConf.load(path) if path.is_file() else None  # type: ignore[return-value]


def _bound_step(run_dir: Path, name: str) -> Step:
    """Step `name` as the run's config declares it."""
    return {s.name: s for s in steps_for(_run_config(run_dir))}[name]


def run_in_job(run_dir: Path, name: str, command: list[str], use_srun: bool) -> int:
    """Inside the job: run the step's command (under srun for multi-rank steps) and write its manifest."""
    step = _bound_step(run_dir, name)
    if use_srun:
        command = ["srun", "--kill-on-bad-exit=1", *command]
    in_job = dataclasses.replace(step, command=lambda *_: command)
    result = _run_step(in_job, _run_config(run_dir), run_dir, [])  # type: ignore[arg-type]
    print(
        f"step {name}: {result.status} in {result.seconds:.1f} s {result.detail or ''}", flush=True
    )
    return 0 if result.status == "done" else 1


def run_part_in_job(run_dir: Path, name: str, command: list[str]) -> int:
    """Inside an array task: run this part's command into its own log; the merge job checks outputs."""
    part = int(os.environ["SLURM_ARRAY_TASK_ID"])
    log_path = part_log(run_dir, name, part)
    print(f"\n=== step {name} part {part} (log: {log_path}) ===", flush=True)
    code = run_command(command, log_path)
    print(f"step {name} part {part}: exit code {code}", flush=True)
    return code


def main(argv: list[str] | None = None) -> None:
    """`python -m sora_lightning.pipeline.slurm_runner RUN_DIR STEP [--srun|--part-task] -- COMMAND...`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("step", choices=[s.name for s in STEPS])
    parser.add_argument(
        "--srun", action="store_true", help="start the command under srun (one task per rank)"
    )
    parser.add_argument(
        "--part-task", action="store_true", help="one array task: run, log, no manifest"
    )
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        parser.error("missing `-- COMMAND...`")
    split = argv.index("--")
    args = parser.parse_args(argv[:split])
    command = argv[split + 1 :]
    if args.part_task:
        sys.exit(run_part_in_job(args.run_dir, args.step, command))
    sys.exit(run_in_job(args.run_dir, args.step, command, args.srun))


if __name__ == "__main__":
    main()
