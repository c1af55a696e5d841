"""Distributed strategy from config, applied from outside the model (torchtitan style).

`build_strategy` turns a `conf/strategy/*.yaml` dict into a Lightning strategy; `parallelize_module`
(called from `DiTModule.configure_model`) applies activation checkpointing and FSDP2 sharding to
the DiT without the model knowing. DeepSpeed ZeRO-3 runs on CPU too (gloo), so the code path a GPU
cluster runs is the one the tests exercise here.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    ModelParallelStrategy,
    Strategy,
)
from torch import nn

from sora_lightning.utils import write_json_atomic

log = logging.getLogger(__name__)
STRATEGIES = ("auto", "ddp", "deepspeed_zero3", "fsdp2")
SHARDED = ("deepspeed_zero3", "fsdp2")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ParallelConfig:
    """What `parallelize_module` applies to the DiT, whatever the strategy."""

    name: str = "auto"
    """Strategy name (one of STRATEGIES)."""
    activation_checkpointing: bool = False
    """Recompute each DiT block in backward (checkpoint_wrapper around every block), trading
    compute for activation memory. The only switch for it: the DiT has none of its own, so a
    checkpoint can never run inside another one (what two switches allowed)."""
    param_dtype: str | None = None
    """FSDP2 only: dtype of the all-gathered parameters in forward/backward (mixed precision);
    the sharded master copy stays float32. DeepSpeed takes `trainer.precision=bf16-mixed` instead."""
    reduce_dtype: str | None = None
    """FSDP2 only: dtype of the gradient reduce-scatter (None: same as param_dtype)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Strategy-specific keys (DeepSpeed ZeRO settings, DDP flags) passed through."""

    def __post_init__(self) -> None:
        if self.name not in STRATEGIES:
            raise ValueError(
                f"unknown strategy {self.name!r}; choose one of conf/strategy/*.yaml {STRATEGIES}"
            )
        for key in ("param_dtype", "reduce_dtype"):
            value = getattr(self, key)
            if value is not None and value not in DTYPES:
                raise ValueError(f"strategy.{key}={value!r} is not one of {sorted(DTYPES)}")

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> ParallelConfig:
        """Known keys become fields; the rest go to `extra` for the strategy itself."""
        known = {
            k: cfg[k]
            for k in ("name", "activation_checkpointing", "param_dtype", "reduce_dtype")
            if k in cfg
        }
        return cls(**known, extra={k: v for k, v in cfg.items() if k not in known})


class CPUCapableDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's DeepSpeedStrategy, minus its refusal of CPU.

    Lightning checks for a CUDA accelerator and for device indices equal to local ranks; on CPU the
    devices carry no index. DeepSpeed itself picks its CPU accelerator (gloo) and shards fine, so
    only those checks are bypassed; on GPU every call goes to the parent unchanged.
    """

    def __init__(self, *args: Any, cpu_shm_comm: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cpu_shm_comm = cpu_shm_comm
        """DeepSpeed's shared-memory CPU collectives JIT-compile a C++ op (~45 s) on first use;
        False keeps plain gloo, which is all a CPU test run needs."""

    def _on_cpu(self) -> bool:
        return not isinstance(self.accelerator, CUDAAccelerator)

    def setup_environment(self) -> None:
        """Skip the CUDA-only check on CPU (DDPStrategy's setup then runs as usual)."""
        if not self._on_cpu():
            super().setup_environment()
            return
        DDPStrategy.setup_environment(self)

    def setup_distributed(self) -> None:
        """Same as the parent without the device-index check, which CPU devices cannot pass."""
        if not self._on_cpu():
            super().setup_distributed()
            return
        from lightning.fabric.utilities.seed import reset_seed

        reset_seed()
        self.set_world_ranks()
        if not self.cpu_shm_comm:
            disable_shm_comm()
        self._init_deepspeed_distributed()

    @property
    def root_device(self) -> torch.device:
        """`cpu:local_rank` on CPU: DeepSpeed reads the rank from the device index."""
        if self.parallel_devices is not None and self.parallel_devices[0].type == "cpu":
            return torch.device("cpu", self.local_rank)
        return super().root_device

    def load_checkpoint(
        self, checkpoint_path: Any, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """A DeepSpeed folder as DeepSpeed loads it; a full checkpoint file (DDP's, or one that
        `train.elastic` converted from another world size or strategy) read here, weights-only.

        Why: ZeRO-3 partitions are fixed to the world size that wrote them, so a run resumed on
        another one comes through a full file, and its optimizer state must not be dropped.
        """
        path = Path(self.broadcast(str(checkpoint_path)))
        self._full_checkpoint = path.is_file()
        if not self._full_checkpoint:
            return super().load_checkpoint(checkpoint_path, weights_only)
        return torch.load(path, map_location="cpu", weights_only=True)

    def load_model_state_dict(self, checkpoint: Any, strict: bool = True) -> None:
        """From a full file: weights into the partitions (EMA included), then the fp32 masters and
        the optimizer moments and step, so training goes on as if never interrupted."""
        if not getattr(self, "_full_checkpoint", False):
            super().load_model_state_dict(checkpoint, strict=strict)
            return
        self.model_to_device()
        self._restore_zero_state(checkpoint, strict=strict)
        load_full_optimizer_state(
            self.deepspeed_engine.optimizer, self.lightning_module, checkpoint
        )


def load_full_optimizer_state(zero_optimizer: Any, module: nn.Module, checkpoint: dict) -> None:
    """Scatter a full (DDP-layout) AdamW state into ZeRO-3's partitions: masters, moments, step, groups.

    The full state is keyed by index; `optimizer_param_names` (written beside it) names each index,
    so each value reaches its own parameter. Without it the mapping is unknown: refused loudly.
    """
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    names = checkpoint.get("optimizer_param_names")
    if not names:
        raise RuntimeError(
            "this full checkpoint lacks optimizer_param_names, so its optimizer state cannot be "
            "placed into ZeRO-3 partitions; resume it under strategy=ddp or fsdp2 (which load it "
            "whole), or write it again with this version"
        )
    params = dict(module.named_parameters())
    weights, state = checkpoint["state_dict"], checkpoint["optimizer_states"][0]
    base = zero_optimizer.optimizer  # torch AdamW over this rank's flat fp32 partitions
    if len(base.param_groups) != len(state["param_groups"]):
        raise RuntimeError(
            f"optimizer has {len(base.param_groups)} parameter groups, the checkpoint "
            f"{len(state['param_groups'])}: not the same configure_optimizers"
        )
    # AdamW creates its state lazily at the first step; ZeRO-3 lists its flat fp32 partitions
    # in the groups only around `step`, so they come from `fp32_partitioned_groups_flat`.
    for sub_group, flat in enumerate(zero_optimizer.fp32_partitioned_groups_flat):
        saved_group = state["param_groups"][zero_optimizer.sub_group_to_group_id[sub_group]]
        saved = [state["state"][i] for i in saved_group["params"] if i in state["state"]]
        if saved:
            base.state[flat] = {
                key: value.clone() if key == "step" else torch.zeros_like(flat)
                for key, value in saved[0].items()
            }
    for group_names, saved_group, group in zip(
        names, state["param_groups"], base.param_groups, strict=True
    ):
        for name, index in zip(group_names, saved_group["params"], strict=True):
            safe_set_full_fp32_param(params[name], weights[name].float())
            for key, value in state["state"].get(index, {}).items():
                if key != "step":
                    safe_set_full_optimizer_state(params[name], value.float(), key)
        group.update({k: v for k, v in saved_group.items() if k != "params"})


def disable_shm_comm() -> None:
    """Make DeepSpeed use plain gloo on CPU instead of JIT-compiling its shm op (~45 s).

    DeepSpeed documents edits to `__compatible_ops__` as persistent; False makes it fall back.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def free_port() -> int:
    """An unused local TCP port for the rendezvous of processes spawned on one machine (tests,
    benchmarks); the OS picks it, so parallel runs never collide on a fixed port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_cpu_deepspeed(rank: int, world_size: int, port: int) -> None:
    """Join a one-machine gloo group through DeepSpeed (spawned test and benchmark workers)."""
    import deepspeed

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    disable_shm_comm()
    deepspeed.init_distributed("gloo")


def deepspeed_config(extra: dict[str, Any]) -> dict[str, Any]:
    """ZeRO-3 config from the yaml; a torch optimizer (no cpu_adam JIT build) is kept by DeepSpeed."""
    zero = {
        "stage": 3,
        "overlap_comm": bool(extra.get("overlap_comm", False)),
        "contiguous_gradients": True,
        "reduce_bucket_size": int(extra.get("reduce_bucket_size", 5e7)),
        "allgather_bucket_size": int(extra.get("allgather_bucket_size", 5e7)),
        "stage3_prefetch_bucket_size": int(extra.get("prefetch_bucket_size", 5e7)),
        # Default 1e5 keeps small tensors whole on every rank; 0 shards everything.
        "stage3_param_persistence_threshold": int(extra.get("param_persistence_threshold", 0)),
        "stage3_max_live_parameters": int(extra.get("max_live_parameters", 1e9)),
    }
    if extra.get("offload_optimizer"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if extra.get("offload_parameters"):
        zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    # A packed batch is one "sample" to DeepSpeed (it only uses the size for throughput logs).
    return {
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "train_micro_batch_size_per_gpu": 1,
        "wall_clock_breakdown": False,
        "steps_per_print": 10**9,
    }


def build_strategy(cfg: dict[str, Any], world_size: int | None = None) -> Strategy | str:
    """`auto` for one process; `ddp`, `deepspeed_zero3` or `fsdp2` across processes (gloo on CPU).

    `world_size` (devices x nodes) sizes the FSDP2 data-parallel mesh: Lightning's "auto" would
    spend the devices on tensor parallelism, which the DiT does not use.
    """
    parallel = ParallelConfig.from_dict(cfg)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if parallel.name == "auto":
        return "auto"
    if parallel.name == "ddp":
        return DDPStrategy(
            process_group_backend=backend,
            find_unused_parameters=bool(parallel.extra.get("find_unused_parameters", False)),
        )
    if parallel.name == "deepspeed_zero3":
        return CPUCapableDeepSpeedStrategy(
            config=deepspeed_config(parallel.extra),
            process_group_backend=backend,
            cpu_shm_comm=bool(parallel.extra.get("cpu_shm_comm", False)),
        )
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(
            f"strategy=fsdp2 needs integer trainer.devices and trainer.num_nodes, got world size {world_size}"
        )
    return ModelParallelStrategy(
        data_parallel_size=world_size, tensor_parallel_size=1, process_group_backend=backend
    )


def strategy_name(strategy: Strategy | str) -> str:
    """The `conf/strategy` name a Lightning strategy was built from (recorded in checkpoints).

    Why: a checkpoint's format follows from it (ZeRO-3 partitions, DCP shards, or one full file),
    and a resume under another strategy or world size has to know which it is reading.
    """
    if isinstance(strategy, DeepSpeedStrategy):
        return "deepspeed_zero3"
    if isinstance(strategy, ModelParallelStrategy):
        return "fsdp2"
    if isinstance(strategy, DDPStrategy):
        return "ddp"
    return "auto"


def apply_activation_checkpointing(blocks: nn.ModuleList) -> None:
    """Wrap every block so its activations are recomputed in backward; state-dict keys are unchanged.

    Idempotent (a wrapped block is not wrapped again), so calling it twice never nests checkpoints.
    Non-reentrant checkpointing (the wrapper's default) also recomputes the sequence-parallel
    all-to-alls inside a block in backward, and passes the packed layout through untouched.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointWrapper,
        checkpoint_wrapper,
    )

    for index, block in enumerate(blocks):
        if not isinstance(block, CheckpointWrapper):
            blocks[index] = checkpoint_wrapper(block)


def shard_dit(dit: nn.Module, ema: nn.Module | None, mesh: Any, parallel: ParallelConfig) -> None:
    """FSDP2: one all-gather unit per DiT block plus the root; EMA sharded alike (never run forward).

    Sharding the EMA with the same mesh gives its parameters the same DTensor placements as the
    model's, so the EMA update is a local lerp of shards with no communication.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    param_dtype = DTYPES[parallel.param_dtype] if parallel.param_dtype else None
    reduce_dtype = DTYPES[parallel.reduce_dtype] if parallel.reduce_dtype else param_dtype
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for block in dit.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(dit, mesh=mesh, mp_policy=policy)
    if ema is not None:
        fully_shard(ema, mesh=mesh)


def parallelize_module(
    dit: nn.Module, ema: nn.Module | None, strategy: Strategy, cfg: dict[str, Any]
) -> None:
    """The `parallelize` hook: activation checkpointing for any strategy, then FSDP2 where chosen."""
    parallel = ParallelConfig.from_dict(cfg)
    if parallel.activation_checkpointing:
        apply_activation_checkpointing(dit.blocks)
    if isinstance(strategy, ModelParallelStrategy):
        mesh = strategy.device_mesh["data_parallel"]
        shard_dit(dit, ema, mesh, parallel)
        log.info("FSDP2: sharded %d DiT blocks over %d ranks", len(dit.blocks), mesh.size())


def parameters_are_sharded(module: nn.Module) -> bool:
    """True when `module`'s parameters are split over ranks (ZeRO-3 partitions, FSDP2 DTensors).

    Then a forward is a collective: every rank has to run it, not only the one that logs.
    """
    return any(hasattr(p, "ds_tensor") or hasattr(p, "to_local") for p in module.parameters())


def local_numel(module: nn.Module) -> int:
    """Parameter elements this rank actually stores (ZeRO-3 partitions, FSDP2 local shards)."""
    total = 0
    for param in module.parameters():
        if hasattr(param, "ds_tensor"):
            total += param.ds_tensor.numel()
        elif hasattr(param, "to_local"):
            total += param.to_local().numel()
        else:
            total += param.numel()
    return total


def full_numel(module: nn.Module) -> int:
    """Parameter elements of the whole (unsharded) model."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())


def gathered_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Full CPU state dict of a module whatever shards it (collective: call on every rank).

    ZeRO-3 partitions are all-gathered for the duration of the copy; FSDP2 DTensors are
    materialised with `full_tensor()`; plain modules are copied as they are.
    """
    params = list(module.parameters())
    if params and hasattr(params[0], "ds_tensor"):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    state = module.state_dict()
    return {
        k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu().clone()
        for k, v in state.items()
    }


def is_sharded_checkpoint(path: Path) -> bool:
    """A DeepSpeed checkpoint folder (`checkpoint/` + `latest`) or a torch DCP folder (`.metadata`)."""
    return path.is_dir() and ((path / "latest").is_file() or (path / ".metadata").is_file())


class ShardReport(Callback):
    """Writes `rank{r}.json` with the DiT parameter elements this rank stores vs the whole model.

    The evidence that a sharded strategy really shards: under ZeRO-3 or FSDP2 over N ranks each
    rank stores about 1/N of the elements (DDP stores all of them).
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Count after the strategy has partitioned the model, before the first step."""
        dit = pl_module.dit
        report = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "strategy": type(trainer.strategy).__name__,
            "local_numel": local_numel(dit),
            "full_numel": full_numel(dit),
        }
        write_json_atomic(self.directory / f"rank{trainer.global_rank}.json", report)
        log.info(
            "rank %d stores %d of %d DiT parameter elements",
            report["rank"],
            report["local_numel"],
            report["full_numel"],
        )
