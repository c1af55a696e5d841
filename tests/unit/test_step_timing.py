"""The step-time breakdown: Lightning's profiler actions filed by category, exclusive of nesting,
summarised in TensorBoard metrics, a log line and step_time.json."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import Logger
from torch.utils.data import DataLoader, Dataset

from sora_lightning.train.timing import (
    CATEGORIES,
    EMA_ACTION,
    LOG_ACTION,
    StepTimeProfiler,
    callback_category,
    describe,
    step_timing,
)


class FakeClock:
    """A clock that moves only when told: exact expected numbers."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Previews(L.Callback):
    time_category = "previews"


def _timed(
    profiler: StepTimeProfiler, clock: FakeClock, action: str, seconds: float, *inner
) -> None:
    """Run `action` for `seconds` of its own time around the nested (action, seconds, ...) calls."""
    profiler.start(action)
    clock.advance(seconds)
    for child in inner:
        _timed(profiler, clock, *child)
    profiler.stop(action)


def _one_step(profiler: StepTimeProfiler, clock: FakeClock) -> None:
    _timed(profiler, clock, "[_TrainingEpochLoop].train_dataloader_next", 0.1)
    _timed(
        profiler,
        clock,
        "[LightningModule]M.optimizer_step",
        0.5,  # the optimizer's own time
        ("[Strategy]S.training_step", 1.0, (LOG_ACTION, 0.05)),
        ("[Strategy]S.backward", 2.0, ("[Callback]Previews.on_after_backward", 0.01)),
        (EMA_ACTION, 0.2),
    )
    _timed(profiler, clock, "[Callback]Previews.on_train_batch_end", 0.3)
    _timed(profiler, clock, "[Callback]Unknown.on_train_batch_end", 0.04)
    _timed(profiler, clock, "[LightningModule]M.on_train_batch_end", 0.0)
    clock.advance(0.02)  # Lightning's metric flush after the last hook


def test_nested_actions_count_once_each_in_their_own_category() -> None:
    clock = FakeClock()
    profiler = StepTimeProfiler(clock)
    profiler.assign_callbacks([Previews()])
    profiler.start("run_training_epoch")  # spans every step: filed nowhere
    _one_step(profiler, clock)
    _one_step(profiler, clock)
    profiler.finish_step()  # as at the end of training: closes at the last hook
    profiler.stop("run_training_epoch")
    assert len(profiler.steps) == 2
    first = dict(zip((*CATEGORIES, "step"), profiler.steps[0], strict=True))
    expected = {
        "data": 0.1,
        "forward": 1.0,
        "backward": 2.0,
        "optimizer": 0.5,
        "ema": 0.2,
        "logging": 0.05 + 0.02,
        "previews": 0.01 + 0.3,
        "other": 0.04,
        "step": 4.22,
    }
    for name, seconds in expected.items():
        assert first[name] == pytest.approx(seconds), name
    assert profiler.steps[1][-1] == pytest.approx(4.2)  # the last step has no flush tail
    summary = profiler.summarize(skip_first=1)
    assert summary["steps"] == 1 and summary["first_steps_s"] == [4.22]
    assert summary["largest"] == "backward"
    assert summary["largest_overhead"] == "previews"
    assert sum(summary["fraction"].values()) == pytest.approx(1.0)
    assert summary["overhead_fraction"] == pytest.approx(1 - 3.5 / 4.2)
    assert "largest cost: backward" in describe(summary)


def test_callback_category_by_attribute_then_lightning_type() -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar

    assert callback_category(Previews()) == "previews"
    assert callback_category(ModelCheckpoint()) == "checkpoint"
    assert callback_category(TQDMProgressBar()) == "logging"
    assert callback_category(L.Callback()) == "other"
    bad = L.Callback()
    bad.time_category = "naps"
    with pytest.raises(ValueError, match="naps"):
        callback_category(bad)


def test_config_rejects_unknown_keys_and_clocks(tmp_path: Path) -> None:
    profiler, monitor = step_timing({"clock": "process", "every_n_steps": 3}, tmp_path / "t.json")
    assert profiler.clock is time.process_time and monitor.every_n_steps == 3
    with pytest.raises(ValueError, match="clock"):
        step_timing({"clock": "sundial"}, tmp_path / "t.json")
    with pytest.raises(ValueError, match="unknown keys"):
        step_timing({"every_n_step": 3}, tmp_path / "t.json")


class SlowData(Dataset):
    def __len__(self) -> int:
        return 1000

    def __getitem__(self, index: int) -> torch.Tensor:
        time.sleep(0.01)
        return torch.randn(4)


class Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self.layer(batch).square().mean()
        self.log("train/loss", loss)
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        with self.trainer.profiler.profile(EMA_ACTION):
            time.sleep(0.005)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class SlowPreviews(Previews):
    def on_train_batch_end(self, *args: Any) -> None:
        time.sleep(0.02)


class Recorder(Logger):
    """Keeps every logged metric: what TensorBoard would get."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: list[tuple[int, dict[str, float]]] = []

    name, version = "recorder", 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.append((step, dict(metrics)))

    def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
        pass


def test_a_real_fit_logs_means_and_writes_the_summary(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    profiler, monitor = step_timing({"every_n_steps": 3}, tmp_path / "step_time.json")
    recorder = Recorder()
    trainer = L.Trainer(
        max_steps=7,
        accelerator="cpu",
        logger=recorder,
        callbacks=[SlowPreviews(), monitor],
        profiler=profiler,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=1,
    )
    with caplog.at_level("INFO", logger="sora_lightning.train.timing"):
        trainer.fit(Tiny(), DataLoader(SlowData(), batch_size=2))
    summary = json.loads((tmp_path / "step_time.json").read_text())
    assert summary == json.loads(json.dumps(monitor.summary))
    assert summary["steps"] == 6 and len(summary["first_steps_s"]) == 1
    per_step = {k: v / summary["steps"] for k, v in summary["seconds"].items()}
    assert per_step["data"] >= 0.02  # two samples of 10 ms each
    assert per_step["previews"] >= 0.02 and per_step["ema"] >= 0.005
    assert per_step["forward"] > 0 and per_step["backward"] > 0 and per_step["optimizer"] > 0
    assert summary["largest"] in ("data", "previews")
    assert sum(summary["fraction"].values()) == pytest.approx(1.0)
    assert any("largest cost" in r.getMessage() for r in caplog.records)
    timed = [(step, m) for step, m in recorder.metrics if "time/step" in m]
    assert [step for step, _ in timed] == [3, 6]  # every 3 steps, the first step left out
    assert set(timed[0][1]) == {f"time/{c}" for c in (*CATEGORIES, "step", "overhead_fraction")}
    assert timed[0][1]["time/previews"] >= 0.02
