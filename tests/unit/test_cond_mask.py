"""Conditioning-frame masks: leading (first frame, first k) and trailing (last k) latent frames."""

from __future__ import annotations

import pytest
import torch

from sora_lightning.data.packing import pack_samples, unpack_latents
from sora_lightning.diffusion.flow import frame_cond_mask

PATCH = (1, 2, 2)


def _pack(cond_frames: list[int]):
    generator = torch.Generator().manual_seed(0)
    latents = [
        torch.randn(4, 3, 4, 2, generator=generator),
        torch.randn(4, 4, 2, 2, generator=generator),
    ]
    texts = [torch.randn(2, 8), torch.randn(3, 8)]
    return latents, pack_samples(latents, texts, PATCH, capacity=64, cond_frames=cond_frames)


def test_frame_mask_first_and_last() -> None:
    assert frame_cond_mask(4, 1).tolist() == [1, 0, 0, 0]
    assert frame_cond_mask(4, 2).tolist() == [1, 1, 0, 0]
    assert frame_cond_mask(4, 2, at_end=True).tolist() == [0, 0, 1, 1]
    assert frame_cond_mask(4, 0, at_end=True).tolist() == [0, 0, 0, 0]


def test_negative_cond_frames_mark_trailing_frames_of_each_sample() -> None:
    latents, batch = _pack([-1, 2])  # last frame of sample 0, first two frames of sample 1
    per_frame_0, per_frame_1 = 2, 1  # tokens per latent frame: (4/2)*(2/2), (2/2)*(2/2)
    expected = torch.cat(
        [
            torch.tensor([0.0] * (2 * per_frame_0) + [1.0] * per_frame_0),
            torch.tensor([1.0] * (2 * per_frame_1) + [0.0] * (2 * per_frame_1)),
        ]
    )
    assert torch.equal(batch.cond_mask, expected)
    cond = unpack_latents(batch.cond, batch, PATCH)
    assert torch.equal(cond[0][:, 2:], latents[0][:, 2:])
    assert torch.count_nonzero(cond[0][:, :2]) == 0
    assert torch.equal(cond[1][:, :2], latents[1][:, :2])
    assert torch.count_nonzero(cond[1][:, 2:]) == 0


def test_trailing_frames_respect_temporal_patch_and_length() -> None:
    with pytest.raises(ValueError, match="temporal patch size 2"):
        pack_samples(
            [torch.randn(4, 4, 2, 2)], [torch.randn(1, 8)], (2, 2, 2), 64, cond_frames=[-1]
        )
    with pytest.raises(ValueError, match="cond_frames=-4"):
        _pack([-4, 0])
