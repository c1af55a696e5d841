"""Per-step scalars written straight to the loggers, once per `log_every_n_steps`.

Why: every `LightningModule.log` call costs about 1 ms of CPU on Lightning's bookkeeping
(`_ResultMetric.to` on each call), whether or not that step is written, which was 1-2% of a demo
step for the ten scalars a DiT step logged (docs/performance.md). Scalars that only TensorBoard
reads go through here instead: nothing happens on steps that are not written, and the tags and
cadence are the ones `self.log` would give. Values a progress bar or `callback_metrics` needs
(`train/loss`) keep `self.log`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import lightning as L


def due(trainer: L.Trainer, step: int | None = None) -> bool:
    """Whether `step` (default: the trainer's global step) is one the loggers write."""
    step = trainer.global_step if step is None else step
    return step % max(1, trainer.log_every_n_steps) == 0


def write(
    trainer: L.Trainer,
    metrics: Mapping[str, float] | Callable[[], Mapping[str, float]],
    step: int | None = None,
) -> None:
    """Write `metrics` (or what the callable returns, only computed when due) to every logger
    at `step`, when that step is due. Loggers write on global rank 0 only (`rank_zero_only`),
    but a callable runs on every rank, so it may hold collectives (a DTensor's `full_tensor`)."""
    step = trainer.global_step if step is None else step
    if not due(trainer, step):
        return
    values = metrics() if callable(metrics) else metrics
    for logger in trainer.loggers:
        logger.log_metrics({key: float(value) for key, value in values.items()}, step=step)
