"""Curriculum stage lookup, LR schedule, validation and conditioning-frame draws."""

from __future__ import annotations

import numpy as np
import pytest

from sora_lightning.train.curriculum import COND_MODES, Curriculum, Stage


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
    "kwargs", [dict(frames=(0, 5)), dict(frames=(9, 5)), dict(steps=-1), dict(image_fraction=2.0)]
)
def test_bad_stage_rejected(kwargs) -> None:
    args = dict(name="x", steps=1) | kwargs
    with pytest.raises(ValueError):
        Stage(**args)


@pytest.mark.parametrize("shift", [0.0, -4.0])
def test_non_positive_shift_rejected(shift: float) -> None:
    """A shift <= 0 would map every training timestep to 0 or out of [0, 1]."""
    with pytest.raises(ValueError, match="shift must be > 0"):
        Stage(name="x", steps=1, shift=shift)
    assert Stage(name="x", steps=1, shift=4.0).shift == 4.0


def test_duplicate_names_rejected() -> None:
    with pytest.raises(ValueError, match="unique"):
        Curriculum(stages=[Stage("a", 1), Stage("a", 1)])


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(sequence_parallel=0),
        dict(cond_modes={"middle_frames": 1.0}),
        dict(cond_modes={"first_frame": -1.0}),
        dict(cond_modes={"first_frame": 0.0}),
    ],
)
def test_bad_parallel_and_cond_settings_rejected(kwargs) -> None:
    with pytest.raises(ValueError, match="sequence_parallel|cond_modes"):
        Stage(name="x", steps=1, **kwargs)


def test_cond_frames_drawn_per_mode() -> None:
    rng = np.random.default_rng(0)
    draws = {
        mode: [
            Stage("x", 1, cond_probability=1.0, cond_modes={mode: 1.0}).draw_cond_frames(5, rng)
            for _ in range(200)
        ]
        for mode in COND_MODES
    }
    assert set(draws["first_frame"]) == {1}
    assert set(draws["first_frames"]) == {1, 2, 3, 4}
    assert set(draws["last_frames"]) == {-1, -2, -3, -4}
    default = Stage("x", 1, cond_probability=1.0)  # all three modes by default
    mixed = [default.draw_cond_frames(5, rng) for _ in range(300)]
    assert min(mixed) < 0 < max(mixed) and mixed.count(1) > mixed.count(2)
    never = Stage("x", 1, cond_probability=0.0)
    assert {never.draw_cond_frames(5, rng) for _ in range(50)} == {0}
    assert default.draw_cond_frames(1, rng) == 0  # an image has nothing to generate around


def test_stage_frames_are_checked_against_the_vaes_temporal_factor() -> None:
    """A stage alone only knows frames >= 1; the VAE's factor decides which lengths are clips."""
    curriculum = Curriculum(stages=[Stage("img", 1), Stage("short", 1, frames=(3, 7))])
    curriculum.check_frames(2)  # the demo VAE (2x in time): 3, 5, 7 are clips
    assert curriculum.stages[1].clip_lengths(2) == [3, 5, 7]
    with pytest.raises(
        ValueError, match=r"stage 'short'.*1 \+ 4k \(1, 5, 9, 13, 17, \.\.\.\).*\[3, 7\]"
    ):
        curriculum.check_frames(4)
    assert make().stages[1].clip_lengths(4) == [5, 9]
