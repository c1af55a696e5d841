"""Rectified-flow math against closed forms."""

from __future__ import annotations

import pytest
import torch

from sora_lightning.diffusion import flow


def test_shift_is_identity_at_one_and_monotone() -> None:
    t = torch.linspace(0, 1, 11)
    assert torch.allclose(flow.shift_timesteps(t, 1.0), t)
    shifted = flow.shift_timesteps(t, 3.0)
    assert torch.all(shifted >= t) and shifted[0] == 0 and shifted[-1] == 1


def test_resolution_shift_grows_with_tokens() -> None:
    shifts = flow.resolution_shift(torch.tensor([256, 1024, 4096]))
    assert torch.all(shifts[1:] > shifts[:-1])
    assert abs(float(shifts[0]) - torch.exp(torch.tensor(0.5)).item()) < 1e-6


def test_euler_recovers_data_with_exact_velocity() -> None:
    x0, noise = torch.randn(7, 4), torch.randn(7, 4)
    out = flow.euler_sample(lambda x, t: noise - x0, noise, flow.sampling_schedule(5, shift=2.0), 1)
    assert torch.allclose(out, x0, atol=1e-5)
    out_heun = flow.heun_sample(lambda x, t: noise - x0, noise, flow.sampling_schedule(3), 1)
    assert torch.allclose(out_heun, x0, atol=1e-5)


def test_add_noise_endpoints() -> None:
    x0, noise = torch.randn(3, 2), torch.randn(3, 2)
    assert torch.allclose(flow.add_noise(x0, noise, torch.zeros(3)), x0)
    assert torch.allclose(flow.add_noise(x0, noise, torch.ones(3)), noise)


def test_flow_loss_weighs_samples_equally_and_masks() -> None:
    pred = torch.zeros(4, 1)
    target = torch.tensor([[1.0], [1.0], [1.0], [3.0]])
    index = torch.tensor([0, 0, 0, 1])
    assert torch.isclose(flow.flow_loss(pred, target, index, 2), torch.tensor((1.0 + 9.0) / 2))
    mask = torch.tensor([1.0, 1.0, 1.0, 0.0])
    assert torch.isclose(flow.flow_loss(pred, target, index, 2, loss_mask=mask), torch.tensor(1.0))


def test_guidance_scale_one_is_conditional() -> None:
    cond, uncond = torch.randn(5), torch.randn(5)
    assert torch.allclose(flow.guided_velocity(cond, uncond, 1.0), cond)
    assert torch.allclose(flow.guided_velocity(cond, uncond, 0.0), uncond)


def test_cosine_warmup_shape() -> None:
    values = [flow.cosine_warmup_lr(s, warmup_steps=10, total_steps=100) for s in range(100)]
    assert values[0] == 0.1 and values[9] == 1.0 and values[-1] < 0.2


def test_training_shift_gives_images_their_own_shift_in_a_joint_stage() -> None:
    tokens, frames = torch.tensor([48, 240, 48]), torch.tensor([1, 5, 1])
    derived = flow.resolution_shift(tokens)
    assert torch.equal(flow.training_shift(tokens, frames, None), derived)
    assert flow.training_shift(tokens, frames, 4.0).tolist() == [4.0, 4.0, 4.0]
    assert flow.training_shift(tokens, frames, 4.0, image_shift=1.6).tolist() == pytest.approx(
        [1.6, 4.0, 1.6]
    )
    mixed = flow.training_shift(tokens, frames, None, image_shift=2.0)
    assert mixed[0] == 2.0 and mixed[1] == derived[1]


def _moving_square(frames: int, step: int) -> torch.Tensor:
    """[1, frames, 8, 8] latent: a 2x2 block of ones moving `step` px right per frame."""
    latent = torch.zeros(1, frames, 8, 8)
    for frame in range(frames):
        latent[0, frame, 3:5, 1 + frame * step : 3 + frame * step] = 1.0
    return latent


def test_motion_weights_lean_on_moving_tokens_only() -> None:
    """A moving block's tokens weigh more than the background's; a still clip and an image weigh 1
    everywhere; strength 0 is the plain loss; weights never pass 1 + strength."""
    from sora_lightning.data.packing import pack_samples

    latents = [_moving_square(3, 2), _moving_square(3, 0), _moving_square(1, 0)]
    batch = pack_samples(latents, [torch.zeros(2, 4)] * 3, (1, 1, 1), 10**9)
    weights = flow.motion_weights(batch.x, batch.cu_seqlens, batch.grid_sizes, 4.0)
    moving, still, image = weights.split(batch.cu_seqlens.diff().tolist())
    assert torch.equal(still, torch.ones_like(still)) and torch.equal(image, torch.ones_like(image))
    grid = moving.view(3, 8, 8)
    assert grid[:, 3:5].max() == 5.0 and grid[:, :3].max() == 1.0  # on the path vs off it
    assert weights.max() <= 5.0 and weights.min() == 1.0
    assert torch.equal(
        flow.motion_weights(batch.x, batch.cu_seqlens, batch.grid_sizes, 0.0),
        torch.ones(batch.x.shape[0]),
    )
    with pytest.raises(ValueError, match="strength"):
        flow.motion_weights(batch.x, batch.cu_seqlens, batch.grid_sizes, -1.0)


def test_motion_weight_changes_only_clip_losses() -> None:
    """Through packed_batch_loss: an image-only batch's loss is the same with and without the
    weight; a moving clip's loss is a different weighted mean."""
    from sora_lightning.data.packing import pack_samples

    def model(x_t: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return torch.zeros_like(x_t)

    for latents, same in (([_moving_square(1, 0)] * 2, True), ([_moving_square(3, 2)], False)):
        batch = pack_samples(latents, [torch.zeros(2, 4)] * len(latents), (1, 1, 1), 10**9)
        t = torch.full((len(latents),), 0.5)
        noise = torch.randn(batch.x.shape, generator=torch.Generator().manual_seed(0))
        plain = flow.packed_batch_loss(model, batch, t, noise)
        weighted = flow.packed_batch_loss(model, batch, t, noise, motion_weight=4.0)
        assert torch.isclose(plain, weighted) == same
