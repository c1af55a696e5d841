"""Per-step scalars go straight to the loggers on logged steps only (train/scalars.py), and the
periodic validation leaves the run's last step to its one end-of-run score."""

from __future__ import annotations

from types import SimpleNamespace

from sora_lightning.train import scalars
from sora_lightning.train.callbacks import ValidationLoss


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[dict[str, float], int]] = []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.calls.append((dict(metrics), step))


def test_write_computes_and_writes_only_on_logged_steps() -> None:
    recorder = Recorder()
    trainer = SimpleNamespace(global_step=0, log_every_n_steps=3, loggers=[recorder])
    computed: list[int] = []

    def values() -> dict[str, float]:
        computed.append(trainer.global_step)
        return {"train/lr": 0.5, "train/samples_per_batch": 4}

    for step in range(7):
        trainer.global_step = step
        scalars.write(trainer, values)
    assert computed == [0, 3, 6]  # the callable (which may .item() or gather) runs when due
    assert [step for _, step in recorder.calls] == [0, 3, 6]
    assert recorder.calls[0][0] == {"train/lr": 0.5, "train/samples_per_batch": 4.0}
    scalars.write(trainer, {"train/x": 1}, step=9)
    assert recorder.calls[-1] == ({"train/x": 1.0}, 9)


def test_validation_runs_every_n_steps_and_once_at_the_end(monkeypatch) -> None:
    scored: list[int] = []
    monkeypatch.setattr(
        ValidationLoss, "_log", lambda self, trainer, module: scored.append(trainer.global_step)
    )
    callback = ValidationLoss(every_n_steps=2, token_budget=64)
    trainer = SimpleNamespace(global_step=0, max_steps=6)
    for step in range(1, 7):
        trainer.global_step = step
        callback.on_train_batch_end(trainer, None)
    callback.on_train_end(trainer, None)
    assert scored == [2, 4, 6]  # step 6 is scored by on_train_end, not twice
