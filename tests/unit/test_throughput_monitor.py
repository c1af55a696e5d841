"""ThroughputMonitor writes its scalars to the loggers itself, every `log_every_n_steps` steps,
instead of through `self.log` (whose per-call bookkeeping cost ~1 ms a metric on CPU)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch

from sora_lightning.train.callbacks import ThroughputMonitor


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[dict[str, float], int]] = []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.calls.append((dict(metrics), step))


class NoLog:
    def log_dict(self, *args: Any, **kwargs: Any) -> None:
        raise AssertionError("ThroughputMonitor must not go through self.log")

    log = log_dict


def test_throughput_monitor_logs_every_n_steps_straight_to_loggers() -> None:
    recorder = Recorder()
    trainer = SimpleNamespace(global_step=0, log_every_n_steps=2, loggers=[recorder])
    monitor = ThroughputMonitor(peak_flops=1e9)
    batch = torch.zeros(2, 3, 1, 4, 4)  # a VAE batch: [B, 3, T, H, W]
    for step in range(1, 5):
        trainer.global_step = step
        monitor.on_train_batch_start(trainer, NoLog(), batch, step)
        monitor.on_train_batch_end(trainer, NoLog(), None, batch, step)
    assert [step for _, step in recorder.calls] == [2, 4]
    metrics = recorder.calls[-1][0]
    assert {"train/tokens_per_s", "train/samples_per_s", "train/data_wait_fraction"} <= set(metrics)
    assert metrics["train/samples_per_s"] > 0
