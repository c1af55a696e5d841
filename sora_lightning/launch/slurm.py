"""`sora-train ... launcher=slurm`: the same run, submitted to SLURM through submitit.

Inside the job, srun starts one task per rank and Lightning's SLURMEnvironment reads ranks, world
size and the master address from SLURM's variables (the config's trainer.num_nodes/devices are set
to match the allocation). Preemption and time limits arrive as SIGUSR2 (`--signal=USR2@delay`):
the handler only sets a flag; at the next step boundary every rank agrees to stop, the run saves
`step=N.ckpt`, and rank 0 hands over to submitit, which pickles the same call again
(`SlurmTrainJob.checkpoint`) and requeues the job. The requeued job resumes from the newest
checkpoint like any re-run. Requeues are bounded by `max_requeues`.

SIGTERM (what `scontrol requeue`, `scancel`, SLURM's preemption in REQUEUE/CANCEL mode,
Kubernetes and a plain `kill` send, some seconds before SIGKILL) gets the same step-boundary
checkpoint, then the process exits without asking for a requeue: whoever sent SIGTERM already
decided whether the job comes back. Lightning's own SIGTERM handling (stop after the batch, no
checkpoint, exit status 0) is replaced while training runs.

A service of train: the training function comes in as an argument (`train.main` passes its own
`train`), so this module never imports train. submitit pickles the function by its qualified
name, and the job imports `sora_lightning.train.main` when it unpickles it.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import submitit
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

_STOP_REQUESTED = threading.Event()
_HANDLER_ACTIVE = threading.Event()
_FIRST_SIGNAL: list[int] = []
"""The stop signal that arrived first (the exit status and the requeue decision follow it)."""
STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)

TrainFn = Callable[[DictConfig], dict[str, Any]]
"""`train(cfg) -> summary`: what a job runs (a module-level function, so it pickles by name)."""


@dataclass
class SlurmLauncherConfig:
    """Resources and preemption policy of one SLURM job (conf/launcher/slurm.yaml)."""

    name: str = "slurm"
    nodes: int = 1
    """Nodes of the job; trainer.num_nodes is set to this."""
    tasks_per_node: int = 1
    """Ranks per node (one per GPU on GPU nodes); trainer.devices is set to this."""
    cpus_per_task: int = 1
    gpus_per_node: int = 0
    mem_gb: float | None = None
    """Memory per node; None leaves the partition's default."""
    partition: str | None = None
    """None: the cluster's default partition."""
    time_min: int = 60
    """Wall-clock limit of one job (each requeue gets a fresh one)."""
    signal_delay_s: int = 120
    """SLURM sends SIGUSR2 this long before the time limit, so the run can checkpoint."""
    max_requeues: int = 3
    """Preemptions/time-outs after which the job fails instead of requeueing."""
    folder: str = "slurm"
    """submitit's pickles and logs, relative to run_dir (or absolute)."""
    job_name: str = "sora-train"
    wait: bool = True
    """Block until the job ends and print its summary; False prints the job id and returns."""
    account: str | None = None
    qos: str | None = None
    additional_parameters: dict[str, Any] = field(default_factory=dict)
    """Extra `#SBATCH --key=value` lines, e.g. {constraint: a100}."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run in the batch script before srun (module load, env activation)."""
    array_parts: int = 2
    """`sora-pipeline`: the sharded steps (shards, cache) run as a job array of this many tasks
    plus a merge job; 1 runs each as one job."""

    def __post_init__(self) -> None:
        for key in ("nodes", "tasks_per_node", "cpus_per_task", "time_min", "array_parts"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"launcher.{key} must be >= 1, got {getattr(self, key)}")
        if self.max_requeues < 0 or self.gpus_per_node < 0 or self.signal_delay_s < 0:
            raise ValueError("launcher.max_requeues, gpus_per_node and signal_delay_s must be >= 0")
        if self.signal_delay_s >= self.time_min * 60:
            raise ValueError(
                f"launcher.signal_delay_s={self.signal_delay_s} must be shorter than time_min"
            )

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node


PREEMPTED_EXIT_CODE = 75
"""Exit status (EX_TEMPFAIL) of a rank stopped by SIGUSR2 in a plain sbatch job: "requeue me"."""
TERMINATED_EXIT_CODE = 128 + signal.SIGTERM
"""Exit status after a SIGTERM stop (the shell's "killed by SIGTERM"): the batch script does not
requeue; `scontrol requeue` or the scheduler already did, or the job was cancelled."""


class PreemptedError(Exception):
    """Raised at a step boundary after the preemption checkpoint is on disk: ends fit() on every rank."""

    def __init__(self, message: str, signum: int | None = None) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return TERMINATED_EXIT_CODE if self.signum == signal.SIGTERM else PREEMPTED_EXIT_CODE


def request_stop(signum: int, frame: Any = None) -> None:
    """Signal handler: only records the request; the checkpoint happens at the next step boundary."""
    if not _STOP_REQUESTED.is_set():
        _FIRST_SIGNAL[:] = [signum]
    _STOP_REQUESTED.set()


def stop_signal() -> int | None:
    """The signal that asked this process to stop (None: another rank asked, or none did)."""
    return _FIRST_SIGNAL[0] if _STOP_REQUESTED.is_set() and _FIRST_SIGNAL else None


@contextmanager
def stop_signals_handled() -> Iterator[None]:
    """While the block runs, SIGUSR2 and SIGTERM only request a step-boundary checkpoint and stop
    (`PreemptionCheckpoint`); the previous handlers come back afterwards. Signal handlers can be
    set only from the main thread: elsewhere the block runs without them."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    _STOP_REQUESTED.clear()  # a request that stopped an earlier run in this process is spent
    _FIRST_SIGNAL.clear()
    for signum in STOP_SIGNALS:
        signal.signal(signum, request_stop)
    _HANDLER_ACTIVE.set()
    try:
        yield
    finally:
        _HANDLER_ACTIVE.clear()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def preemption_callbacks() -> list[L.Callback]:
    """[PreemptionCheckpoint()] while `stop_signals_handled` is active (sora-train's local and
    SLURM launchers), else [] (`train(cfg)` called directly keeps Lightning's own handling)."""
    return [PreemptionCheckpoint()] if _HANDLER_ACTIVE.is_set() else []


class PreemptionCheckpoint(L.Callback):
    """After a batch, if any rank received SIGUSR2 or SIGTERM, save `step=N.ckpt` and stop every
    rank together."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Take SIGTERM back from Lightning, which set its own in fit() (stop, no checkpoint)."""
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                signal.signal(signum, request_stop)

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if not trainer.strategy.reduce_boolean_decision(_STOP_REQUESTED.is_set(), all=False):
            return
        dirpath = (
            getattr(trainer.checkpoint_callback, "dirpath", None)
            or Path(trainer.default_root_dir) / "checkpoints"
        )
        path = Path(dirpath) / f"step={trainer.global_step}.ckpt"
        trainer.save_checkpoint(path)
        signum = stop_signal()
        name = signal.Signals(signum).name if signum else "a stop request from another rank"
        raise PreemptedError(
            f"preempted at step {trainer.global_step}; checkpoint {path} (stopped by {name})",
            signum,
        )


class SlurmTrainJob(submitit.helpers.Checkpointable):
    """The pickled callable submitit runs on every rank; `checkpoint` makes the requeued copy."""

    def __init__(self, train_fn: TrainFn, max_requeues: int) -> None:
        self.train_fn, self.max_requeues = train_fn, max_requeues
        self.requeues = 0

    def __call__(self, cfg_dict: dict[str, Any]) -> dict[str, Any]:
        """Train with SIGUSR2/SIGTERM turned into a step-boundary checkpoint; after SIGUSR2,
        requeue through submitit (SIGTERM: SLURM requeues or cancels the job by itself)."""
        env = submitit.JobEnvironment()
        submitit_handler = signal.getsignal(signal.SIGUSR2)
        configure_job_environment(cfg_dict)
        log.info("%s, requeues so far %d of %d", env, self.requeues, self.max_requeues)
        try:
            with stop_signals_handled():
                return self.train_fn(OmegaConf.create(cfg_dict))
        except PreemptedError as stop:
            log.warning("%s (rank %d)", stop, env.global_rank)
            requeue = stop.signum != signal.SIGTERM
            if requeue and env.global_rank == 0 and callable(submitit_handler):
                submitit_handler(signal.SIGUSR2, None)  # checkpoint() + scontrol requeue + exit
            return {"preempted": True, "rank": env.global_rank, "requeues": self.requeues}

    def checkpoint(self, cfg_dict: dict[str, Any]) -> submitit.helpers.DelayedSubmission | None:
        """The same call again (it resumes from the newest checkpoint), or None once requeues run out."""
        if self.requeues >= self.max_requeues:
            log.error("not requeueing: %d requeues already (launcher.max_requeues)", self.requeues)
            return None
        self.requeues += 1
        return submitit.helpers.DelayedSubmission(self, cfg_dict)


def train_in_job(cfg: DictConfig, train_fn: TrainFn) -> dict[str, Any]:
    """`sora-train` with launcher=local: `train_fn(cfg)`, with SIGUSR2 and SIGTERM turned into a
    step-boundary checkpoint. Then the process exits: PREEMPTED_EXIT_CODE after SIGUSR2 (under
    srun, slurm/train.sbatch requeues), TERMINATED_EXIT_CODE after SIGTERM. Re-running the same
    command resumes from that checkpoint."""
    try:
        with stop_signals_handled():
            return train_fn(cfg)
    except PreemptedError as stop:
        why = (
            "so the batch script requeues" if stop.exit_code == PREEMPTED_EXIT_CODE else "(SIGTERM)"
        )
        print(f"{stop}; exiting with {stop.exit_code} {why}", flush=True)
        sys.exit(stop.exit_code)


def configure_job_environment(cfg_dict: dict[str, Any]) -> None:
    """Per-rank settings that must exist before torch.distributed starts."""
    # No Hydra in the job: without this the run's own log lines (e.g. which checkpoint it resumes) vanish.
    logging.basicConfig(
        level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"
    )
    cpus = os.environ.get("SLURM_CPUS_PER_TASK", "1")
    os.environ.setdefault("OMP_NUM_THREADS", cpus)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # A dead peer must end the job, not hang it: NCCL surfaces errors instead of blocking forever.
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    import torch

    torch.set_num_threads(max(1, int(cpus)))


def job_config(cfg: DictConfig, launcher: SlurmLauncherConfig) -> dict[str, Any]:
    """The run's config as a plain dict for the job: resolved, absolute run_dir, ranks = allocation.

    Resolved here because Hydra's resolvers do not exist inside the job.
    """
    cfg_dict = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(cfg_dict, dict)
    cfg_dict["run_dir"] = str(Path(cfg.run_dir).resolve())
    cfg_dict["trainer"]["num_nodes"] = launcher.nodes
    cfg_dict["trainer"]["devices"] = launcher.tasks_per_node
    return cfg_dict  # other relative paths still work: sbatch starts the job in the submitting directory


def make_executor(launcher: SlurmLauncherConfig, folder: Path) -> submitit.AutoExecutor:
    """submitit executor for SLURM (named explicitly: AutoExecutor would guess from PATH)."""
    executor = submitit.AutoExecutor(
        folder=folder, cluster="slurm", slurm_max_num_timeout=launcher.max_requeues
    )
    extra = dict(launcher.additional_parameters)
    for key in ("account", "qos"):
        if getattr(launcher, key):
            extra[key] = getattr(launcher, key)
    params: dict[str, Any] = {
        "name": launcher.job_name,
        "nodes": launcher.nodes,
        "tasks_per_node": launcher.tasks_per_node,
        "cpus_per_task": launcher.cpus_per_task,
        "timeout_min": launcher.time_min,
        "slurm_signal_delay_s": launcher.signal_delay_s,
        # One rank dying (OOM, kill -9, node loss) ends the whole step instead of leaving peers in a collective.
        "slurm_srun_args": ["--kill-on-bad-exit=1"],
        "slurm_additional_parameters": extra,
        "slurm_setup": list(launcher.setup),
    }
    if launcher.gpus_per_node:
        params["gpus_per_node"] = launcher.gpus_per_node
    if launcher.mem_gb:
        params["mem_gb"] = launcher.mem_gb
    if launcher.partition:
        params["slurm_partition"] = launcher.partition
    executor.update_parameters(**params)
    return executor


def launcher_config(cfg: DictConfig) -> SlurmLauncherConfig:
    """cfg.launcher as a validated dataclass."""
    return SlurmLauncherConfig(**OmegaConf.to_container(cfg.launcher, resolve=True))  # type: ignore[arg-type]


def submit_training(cfg: DictConfig, train_fn: TrainFn) -> submitit.Job:
    """Submit `train_fn(cfg)` as one SLURM job with nodes x tasks_per_node ranks; returns the job."""
    launcher = launcher_config(cfg)
    folder = Path(launcher.folder)
    folder = folder if folder.is_absolute() else Path(cfg.run_dir).resolve() / folder
    executor = make_executor(launcher, folder)
    job = executor.submit(SlurmTrainJob(train_fn, launcher.max_requeues), job_config(cfg, launcher))
    log.info(
        "submitted SLURM job %s (%d ranks); logs in %s", job.job_id, launcher.world_size, folder
    )
    print(
        f"submitted SLURM job {job.job_id}: {launcher.nodes} node(s) x {launcher.tasks_per_node} task(s); "
        f"logs {folder}",
        flush=True,
    )
    return job


def launch_training(cfg: DictConfig, train_fn: TrainFn) -> dict[str, Any]:
    """`sora-train launcher=slurm`: submit `train_fn(cfg)`, and (launcher.wait) wait for rank 0's
    summary. The caller validates `cfg` first, so a bad config never reaches the queue."""
    job = submit_training(cfg, train_fn)
    if not cfg.launcher.get("wait", True):
        return {"job_id": job.job_id, "state": job.state}
    results = job.results()
    return {"job_id": job.job_id, **results[0]}
