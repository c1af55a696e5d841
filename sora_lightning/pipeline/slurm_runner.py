"""Runs pipeline steps as SLURM jobs chained by `afterok` dependencies (`sora-pipeline launcher=slurm`).

Every step that does not verify becomes one `sbatch` job running the very command the local runner
runs (`Step.command`), wrapped by `python -m sora_lightning.pipeline.slurm_runner` so the job itself
writes the step's output manifest. A job depends on the jobs of its inputs; a failed job's
dependents are cancelled by SLURM (`--kill-on-invalid-dep=yes`) and reported as blocked. The
training steps (vae, dit) get launcher.nodes x launcher.tasks_per_node ranks under srun; the
others one task. Shards and the latent cache are one job each, not arrays: both write dataset-wide
files (the shard summary, the cache's latent statistics) that per-shard tasks would have to merge.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import DictConfig

from sora_lightning.launch.slurm import SlurmLauncherConfig, launcher_config
from sora_lightning.pipeline.runner import StepResult, _run_step, select_steps, verify
from sora_lightning.pipeline.steps import STEPS, Step

TRAINING_STEPS = ("vae", "dit")
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


def batch_script(
    step: Step, command: list[str], run_dir: Path, launcher: SlurmLauncherConfig
) -> str:
    """The sbatch script of one step (kept in run_dir/slurm/ for inspection and manual re-submission)."""
    training = step.name in TRAINING_STEPS
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name=sora-{step.name}",
        f"#SBATCH --output={run_dir / 'slurm' / step.name}-%j.out",
        f"#SBATCH --nodes={launcher.nodes if training else 1}",
        f"#SBATCH --ntasks-per-node={launcher.tasks_per_node if training else 1}",
        f"#SBATCH --cpus-per-task={launcher.cpus_per_task}",
        f"#SBATCH --time={launcher.time_min}",
    ]
    if launcher.partition:
        lines.append(f"#SBATCH --partition={launcher.partition}")
    if training and launcher.gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={launcher.gpus_per_node}")
    for key in ("account", "qos"):
        if getattr(launcher, key):
            lines.append(f"#SBATCH --{key}={getattr(launcher, key)}")
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
    lines += [
        *launcher.setup,
        "export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1} TOKENIZERS_PARALLELISM=false",
        "exec " + shlex.join([*wrapper, "--", *command]),
    ]
    return "\n".join(lines) + "\n"


def submit_step(script: Path, dependencies: list[str]) -> str:
    """sbatch the script after its dependencies succeed; returns the job id."""
    args = ["sbatch", "--parsable", "--kill-on-invalid-dep=yes"]
    if dependencies:
        args.append("--dependency=afterok:" + ":".join(dependencies))
    out = subprocess.run([*args, str(script)], check=True, capture_output=True, text=True).stdout
    return out.strip().split(";")[0]


def job_states(job_ids: list[str]) -> dict[str, tuple[str, str, str]]:
    """job id -> (state, exit code, elapsed) from accounting (jobs not yet recorded are absent)."""
    out = subprocess.run(
        [
            "sacct",
            "-n",
            "-P",
            "-X",
            "-o",
            "JobIDRaw,State,ExitCode,ElapsedRaw",
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
        states[job_id] = (state.split()[0], exit_code, elapsed)
    return states


def wait_for_jobs(job_ids: dict[str, str], poll_s: float = 2.0) -> dict[str, tuple[str, str, str]]:
    """Poll until every job reached a final state, printing each state change."""
    seen: dict[str, str] = {}
    while True:
        states = job_states(list(job_ids.values())) if job_ids else {}
        for name, job_id in job_ids.items():
            state = states.get(job_id, ("PENDING", "", "0"))[0]
            if seen.get(name) != state:
                print(f"step {name}: job {job_id} {state}", flush=True)
                seen[name] = state
        if all(states.get(j, ("PENDING",))[0] in FINAL_STATES for j in job_ids.values()):
            return states
        time.sleep(poll_s)


def run_slurm(
    cfg: DictConfig,
    run_dir: Path,
    overrides: list[str],
    names: list[str] | None = None,
    force: bool = False,
) -> list[StepResult]:
    """Submit every selected step that does not verify as a dependent job; wait; report like run_local."""
    launcher = launcher_config(cfg)
    run_dir = run_dir.resolve()
    (run_dir / "slurm").mkdir(parents=True, exist_ok=True)
    results: dict[str, StepResult] = {}
    job_ids: dict[str, str] = {}
    for step in select_steps(names):
        if not force and verify(step, run_dir):
            results[step.name] = StepResult(
                step.name, "skipped", log=str(run_dir / "logs" / f"{step.name}.log")
            )
            continue
        command = step.command(cfg, run_dir, step_overrides(overrides, step, launcher))
        script = run_dir / "slurm" / f"{step.name}.sbatch"
        script.write_text(batch_script(step, command, run_dir, launcher))
        job_ids[step.name] = submit_step(script, [job_ids[i] for i in step.inputs if i in job_ids])
        print(f"submitted step {step.name} as job {job_ids[step.name]}", flush=True)
    states = wait_for_jobs(job_ids)
    for name, job_id in job_ids.items():
        results[name] = step_result(name, job_id, states[job_id], run_dir, results)
    return [results[s.name] for s in select_steps(names)]


def step_result(
    name: str,
    job_id: str,
    state: tuple[str, str, str],
    run_dir: Path,
    earlier: dict[str, StepResult],
) -> StepResult:
    """A finished job as a StepResult; cancelled after a failed input means blocked."""
    status, exit_code, elapsed = state
    log = str(run_dir / "logs" / f"{name}.log")
    step = {s.name: s for s in STEPS}[name]
    if status == "COMPLETED" and verify(step, run_dir):
        return StepResult(name, "done", float(elapsed or 0), log, {"job_id": job_id})
    bad_inputs = [
        i for i in step.inputs if earlier.get(i) and earlier[i].status in ("failed", "blocked")
    ]
    if status == "CANCELLED" and bad_inputs:
        return StepResult(name, "blocked", 0.0, log, {"because": bad_inputs, "job_id": job_id})
    return StepResult(
        name,
        "failed",
        float(elapsed or 0),
        log,
        {
            "job_id": job_id,
            "state": status,
            "exit_code": exit_code,
            "slurm_log": str(run_dir / "slurm" / f"{name}-{job_id}.out"),
        },
    )


def run_in_job(run_dir: Path, name: str, command: list[str], use_srun: bool) -> int:
    """Inside the job: run the step's command (under srun for multi-rank steps) and write its manifest."""
    step = {s.name: s for s in STEPS}[name]
    if use_srun:
        command = ["srun", "--kill-on-bad-exit=1", *command]
    in_job = dataclasses.replace(step, command=lambda *_: command)
    result = _run_step(in_job, None, run_dir, [])  # type: ignore[arg-type]
    print(
        f"step {name}: {result.status} in {result.seconds:.1f} s {result.detail or ''}", flush=True
    )
    return 0 if result.status == "done" else 1


def main(argv: list[str] | None = None) -> None:
    """`python -m sora_lightning.pipeline.slurm_runner RUN_DIR STEP [--srun] -- COMMAND...` (in a job)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("step", choices=[s.name for s in STEPS])
    parser.add_argument(
        "--srun", action="store_true", help="start the command under srun (one task per rank)"
    )
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        parser.error("missing `-- COMMAND...`")
    split = argv.index("--")
    args = parser.parse_args(argv[:split])
    command = argv[split + 1 :]
    sys.exit(run_in_job(args.run_dir, args.step, command, args.srun))


if __name__ == "__main__":
    main()
