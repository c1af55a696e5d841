"""The clip-length rule T = 1 + k * temporal_factor comes from the VAE's config, never a literal 4."""

from __future__ import annotations

import dataclasses
import inspect

import numpy as np
import pytest

from sora_lightning.data.clips import frame_indices, valid_length
from sora_lightning.models.dit import DiTConfig
from sora_lightning.models.vae import (
    VAEConfig,
    clip_lengths_hint,
    is_clip_length,
    longest_clip_length,
)
from sora_lightning.train.dit_module import DiTModule

DEMO = VAEConfig(channel_mults=(1, 2, 2), temporal_downsample=(True, False))  # 2x in time
FULL = VAEConfig()  # 4x in time


def test_rule_follows_the_factor() -> None:
    assert (DEMO.temporal_factor, FULL.temporal_factor) == (2, 4)
    assert [t for t in range(1, 12) if is_clip_length(t, 2)] == [1, 3, 5, 7, 9, 11]
    assert [t for t in range(1, 12) if is_clip_length(t, 4)] == [1, 5, 9]
    assert not is_clip_length(0, 4)
    assert [longest_clip_length(t, 4) for t in (1, 4, 5, 8, 9)] == [1, 1, 5, 5, 9]
    assert clip_lengths_hint(2) == "1 + 2k (1, 3, 5, 7, 9, ...)"


def test_vae_config_uses_the_rule() -> None:
    assert DEMO.latent_frames(7) == 4 and DEMO.pixel_frames(4) == 7
    with pytest.raises(ValueError, match=r"1 \+ 4k \(1, 5, 9, 13, 17, \.\.\.\)"):
        FULL.latent_frames(7)


def test_valid_length_has_no_default_factor() -> None:
    """A caller that forgets the VAE's factor fails at once instead of cutting 1 + 4k clips."""
    factor = inspect.signature(valid_length).parameters["temporal_factor"]
    assert factor.default is inspect.Parameter.empty
    assert valid_length(8, DEMO.temporal_factor) == 7
    assert valid_length(8, FULL.temporal_factor) == 5
    assert valid_length(40, DEMO.temporal_factor, max_frames=17) == 17
    with pytest.raises(ValueError, match="at least 1"):
        valid_length(0, 2)


def test_frame_indices_cut_short_clips_to_the_vaes_lengths() -> None:
    """8 frames at half the rate span 4: the longest clip of a 2x VAE is 3, of a 4x VAE 1."""
    picks = {
        factor: frame_indices(
            8, native_fps=24.0, target_fps=12.0, length=9, temporal_factor=factor
        ).tolist()
        for factor in (2, 4)
    }
    assert picks == {2: [0, 2, 4], 4: [0]}
    rng = np.random.default_rng(0)
    drawn = frame_indices(20, native_fps=0.0, target_fps=None, length=7, temporal_factor=2, rng=rng)
    assert len(drawn) == 7 and np.all(np.diff(drawn) == 1)


def test_dit_training_refuses_a_curriculum_its_vae_cannot_encode() -> None:
    """DiTModule checks the stages against the temporal factor of the VAE its latents come from."""
    dit = dataclasses.asdict(DiTConfig(hidden_size=32, depth=1, num_heads=2, text_dim=8))
    curriculum = {"stages": [{"name": "clips", "steps": 1, "frames": [3, 7]}]}
    DiTModule(dit, curriculum, meta={"temporal_factor": DEMO.temporal_factor})
    with pytest.raises(ValueError, match=r"stage 'clips'.*1 \+ 4k"):
        DiTModule(dit, curriculum, meta={"temporal_factor": FULL.temporal_factor})
