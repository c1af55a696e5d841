"""Our sampler on an imported Wan export reproduces diffusers' `WanPipeline` video.

Same tiny random-weight folder, same initial noise (passed to WanPipeline as `latents=`),
FlowMatchEulerDiscreteScheduler(shift=3), 3 steps, guidance 5 with the empty negative prompt,
float32. Two things must be matched for the numbers to agree (measured below, on these tiny
weights):
- Text: WanPipeline pads every caption's UMT5 states to 512 tokens with zeros and its
  transformer attends to the padding (zero states become a constant token after the text
  embedder). Our packed text carries real tokens only, so the captions are padded here to 512
  with zero states (`pad_states`); without it the final latents differ by up to 1.0.
- Schedule: diffusers' Euler schedule is shift(linspace(1, shift(1/1000), steps)) then 0 (its
  low end is shifted twice), ours shift(linspace(1, 0, steps + 1)); `diffusers_schedule` is the
  former. With ours the final latents differ by up to 0.95.
Matched, the final latents agree to 3.0e-6 and the decoded frames to 1.2e-7 (tolerance 1e-5).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_import_wan import tiny_wan_folder
from torch import Tensor

from sora_lightning.diffusion import flow
from sora_lightning.diffusion.sampling import guided_velocity_fn, text_states
from sora_lightning.models.patches import patchify, token_grid, unpatchify
from sora_lightning.sample import generate
from sora_lightning.train.import_wan import import_wan21, load_export_vae

PROMPT = "a red ball rolls to the left"
STEPS, CFG, SHIFT = 3, 5.0, 3.0
FRAMES, SIZE = 9, 32  # latents [16, 3, 4, 4]: 12 tokens with patch (1, 2, 2)
ATOL = 1e-5


def diffusers_schedule(steps: int, shift: float, num_train_timesteps: int = 1000) -> Tensor:
    """FlowMatchEulerDiscreteScheduler's sigmas (fixed shift): [steps + 1], from 1 to 0."""
    shifted = lambda t: shift * t / (1 + (shift - 1) * t)  # noqa: E731
    sigma_min = shifted(np.float64(1.0 / num_train_timesteps))
    sigmas = shifted(np.linspace(1.0, sigma_min, steps))
    return torch.cat([torch.from_numpy(sigmas).float(), torch.zeros(1)])


def pad_states(states: Tensor, length: int = 512) -> Tensor:
    """[S, Dt] real-token states -> [length, Dt] with zero rows, as WanPipeline pads them."""
    return torch.cat([states, states.new_zeros(length - states.shape[0], states.shape[1])])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from diffusers import WanPipeline

    root = tmp_path_factory.mktemp("parity")
    folder = tiny_wan_folder(root)
    export = import_wan21(folder, root / "export")
    pipe = WanPipeline.from_pretrained(str(folder), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    patch = pytest.MonkeyPatch()
    patch.setattr(generate, "load_vae", load_export_vae)  # until train.weights.load_vae dispatches
    generator = generate.load_generator(export, expand_prompts=False)
    patch.undo()
    noise = torch.randn(1, 16, 1 + (FRAMES - 1) // 4, SIZE // 8, SIZE // 8)
    return pipe, generator, noise


def run_pipeline(pipe, noise: Tensor, output_type: str) -> Tensor:
    out = pipe(
        PROMPT,
        height=SIZE,
        width=SIZE,
        num_frames=FRAMES,
        num_inference_steps=STEPS,
        guidance_scale=CFG,
        latents=noise.clone(),
        output_type=output_type,
    )
    return torch.as_tensor(np.asarray(out.frames))


def run_ours(generator, noise: Tensor, schedule: Tensor, pad: bool) -> Tensor:
    """Our guided Euler solve on the imported DiT -> normalised latents [C, F, h, w]."""
    dit, encoder = generator.dit, generator.text_encoder
    states, null = text_states(encoder, PROMPT), text_states(encoder, "")
    if pad:
        states, null = pad_states(states), pad_states(null)
    patch = tuple(dit.config.patch_size)
    grid = token_grid(tuple(noise.shape[2:]), patch)
    velocity = guided_velocity_fn(dit, grid, states, null, None, None, CFG)
    with torch.no_grad():
        tokens = flow.euler_sample(velocity, patchify(noise[0], patch), schedule, 1)
    return unpatchify(tokens, grid, patch, noise.shape[1])


def test_sampler_reproduces_wan_pipeline(setup) -> None:
    pipe, generator, noise = setup
    expected = run_pipeline(pipe, noise, "latent")[0]  # [C, F, h, w], normalised
    schedule = diffusers_schedule(STEPS, SHIFT)
    pipe.scheduler.set_timesteps(STEPS)
    torch.testing.assert_close(schedule, pipe.scheduler.sigmas, atol=1e-7, rtol=0)
    ours = run_ours(generator, noise, schedule, pad=True)
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)
    unpadded = (run_ours(generator, noise, schedule, pad=False) - expected).abs().max()
    uniform = run_ours(generator, noise, flow.sampling_schedule(STEPS, SHIFT), pad=True)
    assert unpadded > 1e-3 and (uniform - expected).abs().max() > 1e-3  # both matter

    frames = run_pipeline(pipe, noise, "np")[0].float()  # [T, H, W, 3] in [0, 1]
    with torch.no_grad():
        decoded = generator.vae.decode(ours[None])[0]  # [3, T, H, W] in [-1, 1]
    torch.testing.assert_close((decoded.permute(1, 2, 3, 0) + 1) / 2, frames, atol=ATOL, rtol=0)
