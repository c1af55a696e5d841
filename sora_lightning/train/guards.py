"""Non-finite loss guard: count skipped steps, and after K in a row roll back or stop. Never a hang.

The module decides whether a step is skipped (`DiTModule.training_step` all-reduces "is the loss
finite?" so every rank agrees, and returns None: no backward, no optimizer update, no EMA update).
This callback sees that decision (Lightning hands `on_train_batch_end` an empty output for a
skipped step), which is the same on every rank, so every rank counts the same streak and takes
the same action at the same step: nobody waits on a collective the others never enter.

Rollback reloads the model (with its EMA), the optimizer state and the LR schedule from the
newest verified checkpoint written before the streak began, in place, and training continues at
the next step.
The global step and the data position keep moving forward: batches and noise are functions of
the global step, so the run skips the window of data that went bad (PaLM's recipe: restart from
before the spike and skip the batches around it) instead of replaying it. A skipped step is no
schedule step (`DiTModule.lr_scheduler_step`): the LR schedule counts applied updates.

`inject_at_steps` poisons the batch of those global steps with a NaN (on global rank 0 only, so
the cross-rank decision is exercised too). It exists for tests and fire drills; leave it empty.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
from torch import Tensor

from sora_lightning.train.checkpoint import scan_checkpoints

log = logging.getLogger(__name__)
ACTIONS = ("rollback", "stop")


class NonFiniteLossError(RuntimeError):
    """Training stopped on purpose after too many non-finite losses; the message says what to do."""


@dataclass
class NonFiniteConfig:
    """The `nonfinite:` block of conf/train.yaml."""

    max_consecutive: int = 3
    """Skipped (non-finite) steps in a row that trigger `action`."""
    action: str = "rollback"
    """`rollback`: reload the last good checkpoint in place and continue; `stop`: raise with a message."""
    max_rollbacks: int = 3
    """Rollbacks allowed in one run before the guard stops anyway (a persistent fault must not loop)."""
    inject_at_steps: list[int] = field(default_factory=list)
    """Testing only: global steps whose batch gets a NaN on rank 0. Empty in any real run."""

    def __post_init__(self) -> None:
        self.inject_at_steps = [int(s) for s in self.inject_at_steps]
        if self.max_consecutive < 1:
            raise ValueError(f"nonfinite.max_consecutive must be >= 1, got {self.max_consecutive}")
        if self.action not in ACTIONS:
            raise ValueError(f"nonfinite.action={self.action!r} is not one of {ACTIONS}")
        if self.max_rollbacks < 0:
            raise ValueError(f"nonfinite.max_rollbacks must be >= 0, got {self.max_rollbacks}")
        if any(s < 0 for s in self.inject_at_steps):
            raise ValueError(
                f"nonfinite.inject_at_steps must be global steps >= 0, got {self.inject_at_steps}"
            )


def poison_batch(batch: Any) -> None:
    """Put one NaN into the batch's input tensor in place (a `PackedBatch`'s `x`, or a plain tensor)."""
    target = batch.x if hasattr(batch, "x") else batch
    if not isinstance(target, Tensor) or not target.is_floating_point():
        raise TypeError(f"cannot inject a NaN into a batch of type {type(batch).__name__}")
    target.view(-1)[0] = float("nan")


def was_skipped(outputs: Any) -> bool:
    """True when the module skipped the step: `training_step` returned None (Lightning passes `{}`)."""
    if outputs is None:
        return True
    if isinstance(outputs, dict):
        return outputs.get("loss") is None
    return False


class NonFiniteGuard(L.Callback):
    """Counts skipped steps (`train/nonfinite_skipped`, cumulative) and rolls back or stops after K in a row."""

    def __init__(self, config: NonFiniteConfig, checkpoint_dir: str | Path | None) -> None:
        self.config = config
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.skipped_total = 0
        self.consecutive = 0
        self.streak_start = -1
        self.rollbacks = 0

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step in self.config.inject_at_steps and trainer.is_global_zero:
            log.warning(
                "nonfinite.inject_at_steps: poisoning the batch of step %d with a NaN",
                trainer.global_step,
            )
            poison_batch(batch)

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        step = trainer.global_step - 1  # the step that just ran (global_step counts it already)
        if was_skipped(outputs):
            self.skipped_total += 1
            self.streak_start = step if self.consecutive == 0 else self.streak_start
            self.consecutive += 1
            log.warning(
                "non-finite loss at step %d: step skipped on every rank (%d in a row, %d in total)",
                step,
                self.consecutive,
                self.skipped_total,
            )
        else:
            self.consecutive = 0
        pl_module.log("train/nonfinite_skipped", float(self.skipped_total))
        pl_module.log("train/nonfinite_rollbacks", float(self.rollbacks))
        if self.consecutive >= self.config.max_consecutive:
            self._act(trainer, pl_module, step)

    def _act(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        streak = (
            f"{self.consecutive} consecutive non-finite losses (steps {self.streak_start}..{step})"
        )
        if self.config.action == "stop":
            raise NonFiniteLossError(
                f"{streak}; nonfinite.action=stop. Check the data of those steps, lower "
                "the LR, or set nonfinite.action=rollback. The run resumes from its newest "
                "verified checkpoint when restarted."
            )
        if self.rollbacks >= self.config.max_rollbacks:
            raise NonFiniteLossError(
                f"{streak} after {self.rollbacks} rollbacks (nonfinite.max_rollbacks="
                f"{self.config.max_rollbacks}): the fault persists; stopping instead of looping."
            )
        target = self._rollback_target(trainer)
        if target is None:
            raise NonFiniteLossError(
                f"{streak}; no verified checkpoint from before step {self.streak_start} in "
                f"{self.checkpoint_dir} to roll back to, so stopping."
            )
        self._load_in_place(trainer, target)
        self.rollbacks += 1
        self.consecutive = 0
        log.warning(
            "%s: rolled back model, EMA and optimizer to %s; continuing at step %d (rollback %d of %d)",
            streak,
            target,
            trainer.global_step,
            self.rollbacks,
            self.config.max_rollbacks,
        )

    def _rollback_target(self, trainer: L.Trainer) -> Path | None:
        """Newest verified checkpoint from before the streak (weights that had not produced a NaN yet).

        Chosen on rank 0 and broadcast, so every rank loads the same file.
        """
        choice = ""
        if trainer.is_global_zero and self.checkpoint_dir is not None:
            good = [
                s
                for s in scan_checkpoints(self.checkpoint_dir)
                if s.ok and s.step < self.streak_start
            ]
            choice = str(good[0].path) if good else ""
        choice = trainer.strategy.broadcast(choice, src=0)
        return Path(choice) if choice else None

    @staticmethod
    def _load_in_place(trainer: L.Trainer, path: Path) -> None:
        """Model + EMA + optimizer state + LR schedule from `path` (verified, weights_only).

        The schedule comes back too: it counts applied updates, and the rolled-back ones are undone.
        """
        checkpoint = trainer.strategy.load_checkpoint(path)
        # a LoRA run's checkpoints hold its adapters only (the frozen base is not in them)
        strict = trainer.lightning_module.strict_loading
        trainer.strategy.load_model_state_dict(checkpoint, strict=strict)
        trainer.strategy.load_optimizer_state_dict(checkpoint)
        states = checkpoint.get("lr_schedulers", [])
        for config, state in zip(trainer.lr_scheduler_configs, states, strict=True):
            config.scheduler.load_state_dict(state)
        for optimizer in trainer.optimizers:
            optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        """Counters travel with the checkpoint so the cumulative count survives a resume."""
        return {
            "skipped_total": self.skipped_total,
            "consecutive": self.consecutive,
            "streak_start": self.streak_start,
            "rollbacks": self.rollbacks,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_total = int(state_dict.get("skipped_total", 0))
        self.consecutive = int(state_dict.get("consecutive", 0))
        self.streak_start = int(state_dict.get("streak_start", -1))
        self.rollbacks = int(state_dict.get("rollbacks", 0))


def guard_from_config(
    config: dict[str, Any] | None, checkpoint_dir: str | Path | None
) -> NonFiniteGuard:
    """The guard for `sora-train` from the `nonfinite:` block (defaults when the block is absent)."""
    return NonFiniteGuard(NonFiniteConfig(**(config or {})), checkpoint_dir)
