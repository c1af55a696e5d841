"""The SLURM path against a real SLURM (slurm/local-cluster.sh): real sbatch, srun, requeue, sacct.

Skipped unless `sbatch` is on PATH and the cluster answers. Set SORA_TEST_START_SLURM=1 (as root,
with apt) to let the fixture start the local cluster itself (installing takes about a minute).
Order of work: the tiny pipeline as dependent jobs and arrays (d) feeds its VAE and latent cache to
the training jobs; a reference 2-node ZeRO-3 run (a) and a preempted one (b) run side by side;
then (c), kill -9 of one rank of a DDP run (DDP: its checkpoints carry verified manifests).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from pipeline_checks import ONLY_EXPORT_REDONE, break_export, step_statuses
from safetensors.torch import load_file

pytestmark = [pytest.mark.slurm, pytest.mark.e2e, pytest.mark.slow]
BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]
CLUSTER_SCRIPT = REPO / "slurm" / "local-cluster.sh"
STEPS = 12


def _cluster_answers() -> bool:
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True)
    nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True)
    up = [line for line in nodes.stdout.splitlines() if re.search(r" (idle|mix|alloc)$", line)]
    return ping.returncode == 0 and "UP" in ping.stdout and len(up) >= 2


@pytest.fixture(scope="module")
def cluster() -> None:
    """A running SLURM with two nodes, or a skip that says why."""
    if os.environ.get("SORA_TEST_START_SLURM") == "1" and os.geteuid() == 0:
        subprocess.run(["bash", str(CLUSTER_SCRIPT), "start"], check=True, timeout=600)
    if shutil.which("sbatch") is None:
        pytest.skip("sbatch not on PATH: start a cluster with `sudo slurm/local-cluster.sh start`")
    if not _cluster_answers():
        pytest.skip(
            "SLURM does not answer or has fewer than 2 nodes up: `sudo slurm/local-cluster.sh start`"
        )


def sora_train(
    run_dir: Path, pipeline_run: Path, *extra: str, strategy: str = "deepspeed_zero3"
) -> list[str]:
    """A 2-node, 1-task-per-node run of the tiny DiT on SLURM (ZeRO-3 unless told otherwise).

    In-training sample videos are off to keep the jobs short (under ZeRO-3 every rank joins their
    forwards; tests/e2e/test_strategies.py covers that).
    """
    return [
        str(BIN / "sora-train"),
        "experiment=tiny",
        "task=dit",
        f"run_dir={run_dir}",
        f"data.cache_dir={pipeline_run / 'cache'}",
        f"data.vae_dir={pipeline_run / 'vae'}",
        "launcher=slurm",
        "launcher.nodes=2",
        "launcher.tasks_per_node=1",
        f"strategy={strategy}",
        "dit_train.sample_every_n_steps=0",
        "trainer.enable_progress_bar=false",
        f"trainer.max_steps={STEPS}",
        *extra,
    ]


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.5)


def job_id_of(run_dir: Path) -> str:
    wait_for(
        lambda: list((run_dir / "slurm").glob("*_submitted.pkl")), 120, "the job to be submitted"
    )
    return sorted((run_dir / "slurm").glob("*_submitted.pkl"))[0].name.split("_")[0]


def job_logs(run_dir: Path) -> str:
    return "".join(
        p.read_text(errors="replace") for p in sorted((run_dir / "slurm").glob("*_log.*"))
    )


def sacct(job_id: str, fields: str) -> list[list[str]]:
    out = subprocess.run(
        ["sacct", "-n", "-P", "-X", "-D", "-j", job_id, "-o", fields],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [line.split("|") for line in out.splitlines()]


@pytest.fixture(scope="module")
def pipeline_run(cluster, tmp_path_factory) -> tuple[Path, float]:
    """(d) The tiny pipeline with launcher=slurm: every step one job, chained by afterok."""
    run_dir = tmp_path_factory.mktemp("slurm-pipeline") / "run"
    start = time.perf_counter()
    result = subprocess.run(
        [str(BIN / "sora-pipeline"), "experiment=tiny", f"run_dir={run_dir}", "launcher=slurm"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return run_dir, time.perf_counter() - start


ARRAY_STEPS = ("shards", "cache")


def test_pipeline_runs_as_dependent_jobs_and_arrays(pipeline_run: tuple[Path, float]) -> None:
    run_dir, seconds = pipeline_run
    summary = json.loads((run_dir / "summary.json").read_text())
    steps = {s["name"]: s for s in summary["steps"]}
    assert [s["status"] for s in summary["steps"]] == ["done"] * 7, summary
    job_ids = {name: s["detail"]["job_id"] for name, s in steps.items()}
    assert len(set(job_ids.values())) == 7
    times = {name: sacct(job_id, "Start,End")[-1] for name, job_id in job_ids.items()}
    for name in ARRAY_STEPS:  # P array tasks, each with its own log, then the merge job
        array_id = steps[name]["detail"]["array_job_id"]
        tasks = sacct(array_id, "JobID,State,Start,End")
        assert sorted(t[0] for t in tasks) == [f"{array_id}_{i}" for i in range(2)], tasks
        assert all(t[1] == "COMPLETED" and times[name][0] >= t[3] for t in tasks), tasks
        for part in range(2):
            assert (run_dir / "logs" / f"{name}.part-{part:03d}.log").is_file()
        times[f"{name}-parts"] = [min(t[2] for t in tasks), max(t[3] for t in tasks)]
    assert sorted(p.name for p in (run_dir / "shards").glob("*.tar"))[0].startswith("shard-000-")
    for name, inputs in {
        "vae": ["shards"],
        "cache-parts": ["shards", "vae"],
        "dit": ["cache", "vae"],
        "samples": ["dit"],
        "eval": ["dit"],
        "export": ["dit", "vae"],
    }.items():
        for source in inputs:  # afterok: a job starts only after each input's job ended
            assert times[name][0] >= times[source][1], (name, source, times)
    print(f"slurm pipeline: {seconds:.1f} s")


def test_merged_cache_equals_a_single_process_cache(pipeline_run: tuple[Path, float]) -> None:
    run_dir, _ = pipeline_run
    single = run_dir.parent / "single-cache"
    command = shlex.split((run_dir / "slurm" / "cache-parts.sbatch").read_text().splitlines()[-1])
    command = command[command.index("--") + 1 : command.index("--num-parts")]
    command[command.index("--output") + 1] = str(single)
    # Same threads as the array tasks (cpus_per_task=1): oneDNN sums in a thread-dependent order.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(command, cwd=REPO, check=True, capture_output=True, timeout=600, env=env)
    assert (single / "meta.json").read_bytes() == (run_dir / "cache" / "meta.json").read_bytes()


def test_pipeline_rerun_submits_only_what_does_not_verify(pipeline_run: tuple[Path, float]) -> None:
    run_dir, _ = pipeline_run
    break_export(run_dir)
    result = subprocess.run(
        [str(BIN / "sora-pipeline"), "experiment=tiny", f"run_dir={run_dir}", "launcher=slurm"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert step_statuses(run_dir) == ONLY_EXPORT_REDONE
    assert re.findall(r"submitted step (\w+)", result.stdout) == ["export"]


def test_failed_step_cancels_dependents_and_is_named(
    pipeline_run: tuple[Path, float], tmp_path: Path
) -> None:
    run_dir, _ = pipeline_run
    broken = tmp_path / "run"  # no shards here: the vae job fails, cache and dit must never start
    result = subprocess.run(
        [
            str(BIN / "sora-pipeline"),
            "experiment=tiny",
            f"run_dir={broken}",
            "launcher=slurm",
            "pipeline.steps=[vae,cache,dit]",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 1
    status = {s["name"]: s for s in json.loads((broken / "summary.json").read_text())["steps"]}
    assert status["vae"]["status"] == "failed"
    assert status["cache"]["status"] == "blocked" and status["dit"]["status"] == "blocked"
    assert sacct(status["cache"]["detail"]["job_id"], "State")[-1][0].startswith("CANCELLED")
    assert "step vae failed" in result.stdout


def test_failed_array_tasks_are_named_with_their_logs(
    pipeline_run: tuple[Path, float], tmp_path: Path
) -> None:
    run_dir, _ = pipeline_run
    broken = tmp_path / "run"  # a VAE but no shards: every cache array task fails
    shutil.copytree(run_dir / "vae", broken / "vae")
    result = subprocess.run(
        [
            str(BIN / "sora-pipeline"),
            "experiment=tiny",
            f"run_dir={broken}",
            "launcher=slurm",
            "pipeline.steps=[cache]",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 1
    (cache,) = json.loads((broken / "summary.json").read_text())["steps"]
    assert cache["status"] == "failed"
    parts = cache["detail"]["failed_parts"]
    assert [p["part"] for p in parts] == [0, 1] and all(p["state"] == "FAILED" for p in parts)
    for part in parts:
        assert "no shard matches" in Path(part["log"]).read_text()
        assert Path(part["slurm_log"]).is_file()
        assert part["log"] in result.stdout and part["slurm_log"] in result.stdout
    merge_state = sacct(cache["detail"]["job_id"], "State")[-1][0]
    assert merge_state.startswith("CANCELLED"), merge_state


@pytest.fixture(scope="module")
def reference_and_preempted(pipeline_run: tuple[Path, float], tmp_path_factory) -> dict:
    """(a) and (b) side by side: an uninterrupted run and one sent SIGUSR2 after its first checkpoint."""
    root = tmp_path_factory.mktemp("slurm-train")
    cache = pipeline_run[0]
    start = time.perf_counter()
    reference = subprocess.Popen(
        sora_train(root / "reference", cache),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    preempted = subprocess.Popen(
        sora_train(root / "preempted", cache),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    job_id = job_id_of(root / "preempted")
    wait_for(
        lambda: (root / "preempted" / "checkpoints" / "step=2.ckpt").exists(),  # ZeRO-3: a folder
        300,
        "the first checkpoint",
    )
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    outputs = {
        "reference": reference.communicate(timeout=600)[0],
        "preempted": preempted.communicate(timeout=600)[0],
    }
    assert reference.returncode == 0, outputs["reference"][-4000:]
    assert preempted.returncode == 0, (
        outputs["preempted"][-4000:] + job_logs(root / "preempted")[-6000:]
    )
    return {"root": root, "job_id": job_id, "seconds": time.perf_counter() - start, **outputs}


def test_two_node_job_trains_and_finishes(reference_and_preempted: dict) -> None:
    run_dir = reference_and_preempted["root"] / "reference"
    assert f"'steps': {STEPS}" in reference_and_preempted["reference"]
    logs = job_logs(run_dir)
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in logs and "GLOBAL_RANK: 1, MEMBER: 2/2" in logs
    assert "initializing deepspeed distributed" in logs
    stored = re.findall(r"rank (\d) stores (\d+) of (\d+) DiT parameter elements", logs)
    assert {rank for rank, _, _ in stored} == {"0", "1"}, stored  # ZeRO-3 partitions over ranks
    assert all(int(mine) < int(total) for _, mine, total in stored), stored
    assert (run_dir / "final" / "dit.safetensors").is_file()
    print(f"reference + preempted runs: {reference_and_preempted['seconds']:.1f} s")


def test_usr2_checkpoints_requeues_and_resumes_exactly(reference_and_preempted: dict) -> None:
    root = reference_and_preempted["root"]
    logs = job_logs(root / "preempted")
    stopped = re.search(r"preempted at step (\d+); checkpoint (\S+)", logs)
    assert stopped, logs[-4000:]
    assert 2 <= int(stopped.group(1)) < STEPS
    resumed_from = rf"resuming from (sharded checkpoint )?\S+step={stopped.group(1)}\.ckpt"
    assert re.search(resumed_from, logs), logs[-4000:]
    job_id = reference_and_preempted["job_id"]
    # submitit has the result a moment before slurmdbd records the requeued job's end.
    wait_for(lambda: sacct(job_id, "State")[-1][0] == "COMPLETED", 60, "accounting to catch up")
    states = [row[0] for row in sacct(job_id, "State")]
    assert states[0] == "REQUEUED" and states[-1] == "COMPLETED", states
    reference = load_file(root / "reference" / "final" / "dit.safetensors")
    resumed = load_file(root / "preempted" / "final" / "dit.safetensors")
    assert reference.keys() == resumed.keys()
    for name in reference:
        assert torch.equal(reference[name], resumed[name]), name


def _pid_of_rank(job_id: str, rank: int) -> int | None:
    """The process of one rank of a job, found by its SLURM environment."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if (
            b"submitit.core._submit" in cmdline
            and f"SLURM_JOB_ID={job_id}".encode() in environ
            and f"SLURM_PROCID={rank}".encode() in environ
        ):
            return int(proc.name)
    return None


def test_kill_9_of_one_rank_fails_fast_and_resubmit_resumes(
    pipeline_run: tuple[Path, float], tmp_path: Path
) -> None:
    run_dir = tmp_path / "killed"
    submitter = subprocess.Popen(
        sora_train(run_dir, pipeline_run[0], "trainer.max_steps=5000", strategy="ddp"),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    job_id = job_id_of(run_dir)
    # Any verified checkpoint: retention deletes old ones, so a fixed step may be gone already.
    wait_for(
        lambda: any((run_dir / "checkpoints").glob("step=*.manifest.json")),
        300,
        "a verified checkpoint",
    )
    pid = _pid_of_rank(job_id, 1)
    assert pid is not None, "rank 1 not found in /proc"
    os.kill(pid, 9)
    killed_at = time.monotonic()
    output = submitter.communicate(timeout=300)[0]
    failed_after = time.monotonic() - killed_at
    assert submitter.returncode != 0, output[-3000:]
    assert failed_after < 90, f"the job took {failed_after:.0f}s to fail after kill -9"
    assert sacct(job_id, "State")[-1][0] in ("FAILED", "CANCELLED", "NODE_FAIL"), sacct(
        job_id, "State"
    )
    steps_on_disk = [
        int(m.group(1))
        for p in (run_dir / "checkpoints").glob("step=*.manifest.json")
        if (m := re.match(r"step=(\d+)\.manifest\.json$", p.name))
    ]
    resume_step = max(steps_on_disk)
    shutil.rmtree(run_dir / "slurm")
    again = subprocess.run(
        sora_train(
            run_dir, pipeline_run[0], f"trainer.max_steps={resume_step + 2}", strategy="ddp"
        ),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert again.returncode == 0, again.stdout[-3000:] + job_logs(run_dir)[-4000:]
    resumed = re.search(r"resuming from \S+step=(\d+)\.ckpt", job_logs(run_dir))
    assert resumed, job_logs(run_dir)[-3000:]
    assert int(resumed.group(1)) == resume_step  # the newest checkpoint whose manifest verifies
    assert f"'steps': {resume_step + 2}" in again.stdout
    print(
        f"kill -9: job failed {failed_after:.1f} s after the kill; resumed from step <= {resume_step}"
    )
