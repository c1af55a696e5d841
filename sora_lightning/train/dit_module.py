"""LightningModule that trains the DiT with rectified flow on packed, curriculum-shaped batches.

`training_step` stays short: noise and timesteps come from an RNG keyed by (seed, step, data rank),
so a resumed run draws exactly the noise of an uninterrupted one; the math lives in `diffusion/flow`.

Sequence parallelism follows the curriculum: a stage with `sequence_parallel=N` makes groups of N
consecutive ranks share one packed batch (same data, same noise: both keyed by the data-parallel
rank = rank // N) and split its tokens inside the DiT (`parallel/sequence.py`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch import Tensor

from sora_lightning.data.packing import PackedBatch
from sora_lightning.diffusion import flow
from sora_lightning.models.dit import DiT, DiTConfig, SequenceSharding
from sora_lightning.parallel.sequence import build_sequence_groups, check_sequence_parallel
from sora_lightning.parallel.strategies import parallelize_module
from sora_lightning.train import scalars
from sora_lightning.train.compile import check_strategy, compile_blocks
from sora_lightning.train.curriculum import Curriculum, Stage
from sora_lightning.train.lora import (
    EMA_CLIENT_KEY,
    LoraSettings,
    adapter_state,
    apply_lora,
    ema_twin,
    keep_adapters_only,
    load_adapter_state,
    load_pretrained,
)
from sora_lightning.train.timing import EMA_ACTION, LOG_ACTION


@dataclass
class FlowConfig:
    """How training timesteps are drawn."""

    logit_mean: float = 0.0
    logit_std: float = 1.0
    resolution_shift: bool = True
    """Shift t by each sample's token count when the stage sets no fixed shift."""
    motion_weight: float = 0.0
    """> 0: tokens that change between latent frames weigh up to 1 + this (`flow.motion_weights`)."""

    def __post_init__(self) -> None:
        if not self.logit_std > 0:
            raise ValueError(f"logit_std must be > 0, got {self.logit_std}")
        number = isinstance(self.motion_weight, int | float) and not isinstance(
            self.motion_weight, bool
        )
        if not number or self.motion_weight < 0:
            raise ValueError(f"motion_weight must be a number >= 0, got {self.motion_weight!r}")

    @classmethod
    def from_config(cls, values: dict[str, Any] | None) -> FlowConfig:
        """Build from `dit_train.flow`; an unknown key is a ValueError listing the valid ones
        (a bare TypeError would not say which config node holds it)."""
        values = dict(values or {})
        unknown = sorted(set(values) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(
                f"dit_train.flow has unknown keys {unknown}; valid keys: "
                f"{sorted(cls.__dataclass_fields__)}"
            )
        return cls(**values)


def noise_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """A generator owned by one training step on one data rank (resume needs no saved RNG state)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 1009 + rank)


class DiTModule(L.LightningModule):
    """DiT + EMA + curriculum-driven LR; batches are `PackedBatch`es of normalised latents."""

    def __init__(
        self,
        dit: dict[str, Any],
        curriculum: dict[str, Any],
        *,
        seed: int = 0,
        flow_cfg: dict[str, Any] | None = None,
        weight_decay: float = 0.0,
        ema_decay: float = 0.999,
        meta: dict[str, Any] | None = None,
        parallel: dict[str, Any] | None = None,
        compile: bool = False,
        pretrained: str | None = None,
        lora: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.dit_config = DiTConfig(**dit)  # the config turns YAML/JSON lists into tuples
        self.dit = DiT(self.dit_config)
        self.lora = self._init_weights(pretrained, LoraSettings.from_config(lora))
        self.ema = ema_twin(self.dit)  # LoRA: shares the frozen base, copies the adapters
        self.curriculum = Curriculum(**curriculum)
        if meta and meta.get("temporal_factor"):  # the VAE the latents come from
            self.curriculum.check_frames(int(meta["temporal_factor"]))
        self.flow_cfg = FlowConfig.from_config(flow_cfg)
        self._step_skipped = False
        self._parallelized = False
        self._sequence_groups: dict[int, SequenceSharding] = {}

    def _init_weights(self, pretrained: str | None, lora: LoraSettings) -> LoraSettings:
        """Base weights from `model.pretrained`, then peft adapters (train/lora.py).

        Here, not in `configure_model`: under ZeRO-3 that hook runs inside `deepspeed.zero.Init`,
        which would partition peft's new Linears as they are built, so peft's init (lora_B = 0)
        would write into empty shards. Checkpoints of a LoRA run then hold adapters only.
        """
        if pretrained:
            load_pretrained(self.dit, pretrained)
        if lora.enabled:
            if not pretrained:
                raise ValueError("lora.rank > 0 adapts a base: set model.pretrained=EXPORT")
            apply_lora(self.dit, lora)
            keep_adapters_only(self)
            self.strict_loading = False  # the frozen base comes from model.pretrained
        return lora

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """ZeRO-3 + LoRA: the EMA adapters in the client state (train/lora.py says why)."""
        if self.lora.enabled and _zero3(self.ema):
            checkpoint[EMA_CLIENT_KEY] = adapter_state(self.ema)  # collective: every rank is here

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A LoRA run resumes only from a checkpoint of the same adapters (a full one is refused)."""
        if not self.lora.enabled:
            return
        if EMA_CLIENT_KEY in checkpoint:
            load_adapter_state(self.ema, checkpoint[EMA_CLIENT_KEY])
        saved = checkpoint.get("state_dict")
        if saved:  # plain .ckpt (DCP and ZeRO-3 load through the module's own keys)
            expected = set(self.state_dict())
            if set(saved) != expected:
                raise ValueError(
                    "the checkpoint does not hold this run's LoRA adapters (a full fine-tune, or "
                    f"other lora settings): unexpected {sorted(set(saved) - expected)[:3]}, "
                    f"missing {sorted(expected - set(saved))[:3]}"
                )

    def setup(self, stage: str) -> None:
        """Check every stage's sequence-parallel degree against the world, then build its groups.

        Here because the process group exists by now and group creation is collective.
        """
        world_size = self.trainer.world_size if self._trainer is not None else 1
        strategy = self.trainer.strategy if self._trainer is not None else None
        if self.lora.enabled and hasattr(strategy, "exclude_frozen_parameters"):
            # ZeRO-3 would save the frozen base as fragments; it comes from model.pretrained
            strategy.exclude_frozen_parameters = True
        degrees = [s.sequence_parallel for s in self.curriculum.stages]
        for item in self.curriculum.stages:
            check_sequence_parallel(
                item.sequence_parallel,
                world_size,
                self.dit_config.num_heads,
                where=f"curriculum stage {item.name!r}: ",
            )
        if not self._sequence_groups and max(degrees) > 1:
            self._sequence_groups = build_sequence_groups(
                degrees, world_size, self.global_rank, self.dit_config.attn_backend
            )

    def _stage(self) -> Stage:
        return self.curriculum.stages[self.curriculum.stage_at(self.global_step)[0]]

    def configure_model(self) -> None:
        """Parallelism and compilation from outside the model: activation checkpointing, FSDP2
        sharding (strategy config), then `torch.compile` per block (`dit_train.compile`)."""
        if not self._parallelized:
            parallelize_module(
                self.dit, self.ema, self.trainer.strategy, self.hparams.parallel or {}
            )
            if self.hparams.get("compile", False):
                check_strategy(self.trainer.strategy)
                compile_blocks(self.dit)  # the EMA only samples: left eager
            self._parallelized = True

    def _profile(self, action: str) -> contextlib.AbstractContextManager:
        """A profiler section of the step-time breakdown (train/timing.py), when a Trainer runs us."""
        return self.trainer.profiler.profile(action) if self._trainer else contextlib.nullcontext()

    def _timesteps(self, batch: PackedBatch, generator: torch.Generator) -> Tensor:
        t = flow.sample_logit_normal(
            batch.num_samples,
            mean=self.flow_cfg.logit_mean,
            std=self.flow_cfg.logit_std,
            generator=generator,
        )
        stage = self._stage()
        derived = stage.shift is None and self.flow_cfg.resolution_shift
        if stage.shift is None and stage.image_shift is None and not derived:
            return t
        shift = 1.0 if stage.shift is None and not derived else stage.shift
        frames = batch.grid_sizes[:, 0]  # latent frames per sample: 1 is an image
        shifts = flow.training_shift(batch.cu_seqlens.diff(), frames, shift, stage.image_shift)
        return flow.shift_timesteps(t, shifts)

    def training_step(self, batch: PackedBatch, batch_idx: int) -> Tensor | None:
        degree = self._stage().sequence_parallel
        data_rank = self.global_rank // degree  # a sequence-parallel group draws one noise
        generator = noise_generator(self.hparams.seed, self.global_step, data_rank)
        timesteps = self._timesteps(batch, generator).to(self.device)  # [B]
        noise = torch.randn(batch.x.shape, generator=generator).to(batch.x)  # [L, P]
        sequence = self._sequence_groups.get(degree)
        loss = flow.packed_batch_loss(
            self.dit,
            batch,
            timesteps,
            noise,
            motion_weight=self.flow_cfg.motion_weight,
            sequence=sequence,
        )
        # a skipped step logs its NaN: Lightning would repeat the last good value
        with self._profile(LOG_ACTION):
            self._log_step(loss, batch, degree)
        if not self._all_finite(loss):
            # counted, and acted on after K in a row, by train.guards.NonFiniteGuard
            self._step_skipped = True
            return None  # skip backward, the optimizer update and the EMA update on every rank
        # Each of the N ranks of a sequence group holds its tokens' share of the group gradient
        # and the strategy averages over all ranks: x N makes that the mean over data groups.
        return loss * degree

    def _all_finite(self, loss: Tensor) -> bool:
        """Decide together: one rank's NaN must skip the step everywhere, or DDP hangs."""
        bad = torch.tensor(0.0 if torch.isfinite(loss) else 1.0, device=self.device)
        bad = (
            self.trainer.strategy.reduce(bad, reduce_op="max")
            if self.trainer.world_size > 1
            else bad
        )
        return bool(bad.item() == 0.0)

    def _log_step(self, loss: Tensor, batch: PackedBatch, degree: int = 1) -> None:
        """`train/loss` and `train/stage` through `self.log` (progress bar, `callback_metrics`);
        the rest straight to the loggers on logged steps only (train/scalars.py says why)."""
        stage_index, _ = self.curriculum.stage_at(self.global_step)
        name = self.curriculum.stages[stage_index].name
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=batch.num_samples)
        self.log("train/stage", float(stage_index), prog_bar=True)
        scalars.write(
            self.trainer,
            lambda: {
                f"train/loss_{name}": loss.detach().item(),
                "train/sequence_parallel": degree,
                "train/packing_efficiency": batch.efficiency,
                "train/samples_per_batch": batch.num_samples,
                "train/lr": self.trainer.optimizers[0].param_groups[0]["lr"],
            },
        )

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """One gradient norm a step serves clipping and `train/grad_norm` (the pre-clip norm).

        Norm clipping of plain tensors clips with it (`clip_grads_with_norm_`: the same math as
        `clip_grad_norm_`, without computing the norm twice); without clipping the norm is only
        computed on the steps the loggers write. Sharded gradients (DTensor norms) and other
        algorithms take Lightning's own path. No gradients (ZeRO-3 clips inside DeepSpeed): nothing.
        """
        params = [p for p in self.dit.parameters() if p.grad is not None]
        by_norm = bool(gradient_clip_val) and gradient_clip_algorithm in (None, "norm")
        logged = self._trainer is not None and scalars.due(self.trainer)
        norm = None
        if params and (by_norm or logged):
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if norm is not None and logged:
            full = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # every rank
            scalars.write(self.trainer, {"train/grad_norm": full.item()})
        if not gradient_clip_val:  # the hook gets the trainer's value: none set, no clipping
            return
        if by_norm and norm is not None and not hasattr(norm, "full_tensor"):
            torch.nn.utils.clip_grads_with_norm_(params, gradient_clip_val, norm)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """EMA right after the update and before any callback runs: a checkpoint written in
        `on_train_batch_end` must already hold this step's EMA, or a run resumed from it drifts."""
        self._step_skipped = False
        super().optimizer_step(*args, **kwargs)
        if not self._step_skipped:
            with self._profile(EMA_ACTION):
                self._update_ema()

    def lr_scheduler_step(self, scheduler: Any, metric: Any = None) -> None:
        """A step skipped for a non-finite loss is no schedule step either: the LR schedule
        counts applied updates (data and noise still follow the global step)."""
        if self._step_skipped:
            return
        super().lr_scheduler_step(scheduler, metric)

    @torch.no_grad()
    def _update_ema(self) -> None:
        """EMA with a warmup so early steps are not dominated by the random init.

        One `_foreach_lerp_` over every tensor: a Python loop of per-parameter lerps pays the
        op dispatch once per parameter (~100 here) each step.
        """
        decay = min(self.hparams.ema_decay, (1 + self.global_step) / (10 + self.global_step))
        if hasattr(self.ema, "reshard"):  # FSDP2 leaves a root unsharded after a no-grad forward
            self.ema.reshard()  # (validation, previews): the lerp needs its DTensor shards
        targets, sources = [], []
        for ema_param, param in zip(self.ema.parameters(), self.dit.parameters(), strict=True):
            if not param.requires_grad:  # LoRA: the frozen base, identical in both
                continue
            if hasattr(param, "ds_tensor"):  # ZeRO-3: both partitioned alike, the local shards
                targets.append(ema_param.ds_tensor)
                sources.append(param.ds_tensor.to(ema_param.ds_tensor.dtype))
            else:  # plain tensors, or FSDP2 DTensors with matching placements (local lerp)
                targets.append(ema_param)
                sources.append(param.detach())
        torch._foreach_lerp_(targets, sources, 1.0 - decay)

    def configure_optimizers(self) -> dict[str, Any]:
        base_lr = max(s.lr for s in self.curriculum.stages)
        decay, no_decay = [], []
        for name, param in self.dit.named_parameters():
            if not param.requires_grad:  # LoRA: only the adapters train
                continue
            (no_decay if param.ndim < 2 or "norm" in name else decay).append(param)
        groups = [
            {"params": decay, "weight_decay": self.hparams.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        groups = [g for g in groups if g["params"]]  # LoRA has no 1-D weights; ZeRO-3 drops empties
        optimizer = torch.optim.AdamW(
            groups,
            lr=base_lr,
            betas=(0.9, 0.99),
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: self.curriculum.lr_at(step) / base_lr
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def _zero3(module: torch.nn.Module) -> bool:
    """Parameters partitioned by DeepSpeed ZeRO-3."""
    return any(hasattr(p, "ds_tensor") for p in module.parameters())
