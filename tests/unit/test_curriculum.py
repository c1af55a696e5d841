"""Curriculum stage lookup, LR schedule and validation."""

from __future__ import annotations

import pytest

from sora_lightning.train.curriculum import Curriculum, Stage


def make() -> Curriculum:
    return Curriculum(
        stages=[Stage("a", 3, lr=1.0), Stage("b", 2, frames=(5, 9), lr=0.5)], warmup_steps=2
    )


def test_stage_at_boundaries() -> None:
    c = make()
    assert [c.stage_at(s) for s in range(6)] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert c.total_steps == 5 and c.stage_start(1) == 3


def test_lr_warmup_then_stage_lr_and_decay() -> None:
    c = make()
    assert c.lr_at(0) == pytest.approx(0.5) and c.lr_at(1) == pytest.approx(1.0)
    assert c.lr_at(3) == pytest.approx(0.5)  # start of final stage: no decay yet
    assert c.lr_at(4) < 0.5


@pytest.mark.parametrize(
    "kwargs", [dict(frames=(2, 5)), dict(frames=(9, 5)), dict(steps=-1), dict(image_fraction=2.0)]
)
def test_bad_stage_rejected(kwargs) -> None:
    args = dict(name="x", steps=1) | kwargs
    with pytest.raises(ValueError):
        Stage(**args)


def test_duplicate_names_rejected() -> None:
    with pytest.raises(ValueError, match="unique"):
        Curriculum(stages=[Stage("a", 1), Stage("a", 1)])
