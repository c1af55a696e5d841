"""Our DiT configured as Wan 2.1 computes exactly diffusers' `WanTransformer3DModel`.

Parity is in float32 against tiny random-weight diffusers models (no download). Random weights
everywhere, norm gains included, so every mapped tensor matters. Text: diffusers takes a padded
[B, S, Dt] batch with no text mask (its pipeline pads captions to 512 with zeros and attends to
the padding), so each sample is run through diffusers alone with its own unpadded caption, which
is what our packed text (real tokens, per-sample `text_cu_seqlens`) means.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from torch import Tensor

from sora_lightning.config import CONFIG_MODULE
from sora_lightning.diffusion import flow
from sora_lightning.models.dit import DiT, DiTConfig
from sora_lightning.models.patches import patchify, seqlens_to_cu, token_grid, unpatchify
from sora_lightning.models.wan import convert_wan_transformer, wan_transformer_config

ATOL = 1e-5  # float32; measured max abs diff 4.8e-7 on outputs of magnitude up to ~2
TINY: dict[str, Any] = {
    "num_attention_heads": 2,
    "attention_head_dim": 12,
    "in_channels": 4,
    "out_channels": 4,
    "text_dim": 16,
    "freq_dim": 32,
    "ffn_dim": 32,
    "num_layers": 2,
    "patch_size": (1, 2, 2),
    "rope_max_seq_len": 32,
}
PUBLISHED = {  # the transformer/config.json of Wan-AI's diffusers releases
    "wan2_1_1_3b": {"num_attention_heads": 12, "ffn_dim": 8960, "num_layers": 30},
    "wan2_1_14b": {"num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40},
}
COMMON = {
    "_class_name": "WanTransformer3DModel",
    "attention_head_dim": 128,
    "cross_attn_norm": True,
    "eps": 1e-06,
    "freq_dim": 256,
    "in_channels": 16,
    "out_channels": 16,
    "patch_size": [1, 2, 2],
    "qk_norm": "rms_norm_across_heads",
    "rope_max_seq_len": 1024,
    "text_dim": 4096,
    "image_dim": None,
    "added_kv_proj_dim": None,
}


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random, norm gains around 1, so no mapping hides behind an init value."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1 + 0.2 * noise if "norm" in name else 0.15 * noise)


def wan_pair(seed: int = 0, **overrides: Any) -> tuple[WanTransformer3DModel, DiT]:
    """A random tiny diffusers Wan and our DiT loaded from it through the converter."""
    config = {**TINY, **overrides}
    wan = WanTransformer3DModel(**config).eval()
    randomize(wan, seed)
    dit_config = dataclasses.replace(wan_transformer_config(config), attn_backend="sdpa")
    dit = DiT(dit_config).eval()
    dit.load_state_dict(convert_wan_transformer(wan.state_dict(), dit_config), strict=True)
    return wan, dit


def run_wan(wan: WanTransformer3DModel, latent: Tensor, t: float, text: Tensor) -> Tensor:
    """One sample [C, F, H, W] at flow time t through diffusers -> [C, F, H, W]."""
    timestep = torch.tensor([t], dtype=torch.float32) * 1000.0  # the scheduler's 0..1000 scale
    return wan(latent[None], timestep, text[None], return_dict=False)[0][0]


def pack(latents: list[Tensor], texts: list[Tensor], patch: tuple[int, int, int]) -> Any:
    """Latents [C, F, H, W] and captions [S_i, Dt] of any shapes -> a packed batch (the contract
    `flow.PackedTokens` describes): tokens and text concatenated, with per-sample offsets."""
    tokens = [patchify(lat, patch) for lat in latents]
    return SimpleNamespace(
        x=torch.cat(tokens),
        cu_seqlens=seqlens_to_cu([len(t) for t in tokens]),
        grid_sizes=torch.tensor([token_grid(tuple(lat.shape[1:]), patch) for lat in latents]),
        text=torch.cat(texts),
        text_cu_seqlens=seqlens_to_cu([len(t) for t in texts]),
        cond=None,
        cond_mask=None,
        num_samples=len(latents),
    )


def run_packed(
    dit: DiT, latents: list[Tensor], times: list[float], texts: list[Tensor]
) -> list[Tensor]:
    """Several samples of any shapes in one packed forward -> one [C, F, H, W] per sample."""
    patch, channels = dit.config.patch_size, dit.config.in_channels
    batch = pack(latents, texts, patch)
    out = dit(
        batch.x,
        batch.cu_seqlens,
        batch.grid_sizes,
        torch.tensor(times),
        batch.text,
        batch.text_cu_seqlens,
    )  # [L, P]
    parts = out.split(batch.cu_seqlens.diff().tolist())
    return [unpatchify(p, g, patch, channels) for p, g in zip(parts, batch.grid_sizes, strict=True)]


@pytest.mark.parametrize(
    ("patch_size", "cross_attn_norm", "eps"),
    [((1, 2, 2), True, 1e-6), ((2, 1, 3), False, 1e-3)],
)
@torch.no_grad()
def test_one_sample_matches_diffusers(patch_size, cross_attn_norm, eps) -> None:
    wan, dit = wan_pair(patch_size=patch_size, cross_attn_norm=cross_attn_norm, eps=eps)
    generator = torch.Generator().manual_seed(1)
    latent = torch.randn(4, 4, 4, 6, generator=generator)
    text = torch.randn(7, 16, generator=generator)
    expected = run_wan(wan, latent, 0.7, text)
    (ours,) = run_packed(dit, [latent], [0.7], [text])
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)


@torch.no_grad()
def test_packed_samples_each_match_diffusers_alone() -> None:
    wan, dit = wan_pair(seed=2)
    generator = torch.Generator().manual_seed(3)
    shapes = [(3, 4, 6), (1, 6, 2), (2, 2, 4)]  # (frames, height, width) of latents
    latents = [torch.randn(4, *shape, generator=generator) for shape in shapes]
    texts = [torch.randn(n, 16, generator=generator) for n in (5, 3, 9)]
    times = [0.9, 0.25, 0.5]
    outputs = run_packed(dit, latents, times, texts)
    for latent, t, text, ours in zip(latents, times, texts, outputs, strict=True):
        torch.testing.assert_close(ours, run_wan(wan, latent, t, text), atol=ATOL, rtol=0)


def test_training_loss_is_wan_flow_matching_loss() -> None:
    """Through the training code path (flow.packed_batch_loss, t in [0, 1]): the loss is Wan's
    flow-matching loss (scheduler noising, noise - x0 target), and gradients reach every weight."""
    wan, dit = wan_pair(seed=4)
    generator = torch.Generator().manual_seed(5)
    latents = [torch.randn(4, *shape, generator=generator) for shape in [(2, 4, 4), (1, 2, 6)]]
    noises = [torch.randn(lat.shape, generator=generator) for lat in latents]
    texts = [torch.randn(n, 16, generator=generator) for n in (4, 6)]
    times = torch.tensor([0.8, 0.3])
    batch = pack(latents, texts, dit.config.patch_size)
    noise = pack(noises, texts, dit.config.patch_size).x
    loss = flow.packed_batch_loss(dit, batch, times, noise)
    with torch.no_grad():
        per_sample = [
            (run_wan(wan, s * n + (1 - s) * x0, float(s), text) - (n - x0)).pow(2).mean()
            for x0, n, s, text in zip(latents, noises, times, texts, strict=True)
        ]
    torch.testing.assert_close(loss.detach(), torch.stack(per_sample).mean(), atol=ATOL, rtol=0)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in dit.parameters())


def test_scheduler_conventions_are_ours() -> None:
    """Wan's scheduler: timestep = 1000 * sigma, x_t = (1 - sigma) x0 + sigma noise, and an Euler
    step along the model output, i.e. our t, add_noise and velocity (noise - x0)."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(5)
    x0, noise, velocity = torch.randn(3, 1, 4, 8).unbind(0)
    sigma, sigma_next = scheduler.sigmas[2], scheduler.sigmas[3]
    timestep = scheduler.timesteps[2]
    torch.testing.assert_close(timestep, sigma * 1000)
    noised = scheduler.scale_noise(x0[None], timestep[None], noise[None])[0]
    torch.testing.assert_close(noised, flow.add_noise(x0, noise, sigma.expand(1)))
    stepped = scheduler.step(velocity[None], timestep, noised[None]).prev_sample[0]
    torch.testing.assert_close(stepped, noised + (sigma_next - sigma) * velocity)


def test_converter_names_missing_and_unexpected_keys() -> None:
    wan = WanTransformer3DModel(**TINY)
    state = wan.state_dict()
    for key in ("blocks.1.attn1.norm_q.weight", "proj_out.bias", "blocks.0.norm2.weight"):
        broken = {k: v for k, v in state.items() if k != key}
        with pytest.raises(ValueError, match=f"missing.*{key}"):
            convert_wan_transformer(broken)
    extra = {**state, "blocks.0.attn2.add_k_proj.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="unexpected.*blocks.0.attn2.add_k_proj.weight"):
        convert_wan_transformer(extra)
    no_last_block = {k: v for k, v in state.items() if not k.startswith("blocks.1.")}
    config = wan_transformer_config(TINY)
    with pytest.raises(ValueError, match="missing.*blocks.1.attn1.to_q.weight"):
        convert_wan_transformer(no_last_block, config)
    assert convert_wan_transformer(state).keys() == DiT(config).state_dict().keys()


def test_config_rejects_what_it_cannot_reproduce() -> None:
    for bad, match in (
        ({"image_dim": 1280}, "image_dim"),
        ({"qk_norm": "rms_norm"}, "qk_norm"),
        ({"out_channels": 8}, "out_channels"),
        ({"window_size": [-1, -1]}, "window_size"),
    ):
        with pytest.raises(ValueError, match=match):
            wan_transformer_config({**TINY, **bad})
    with pytest.raises(ValueError, match="qk_norm_across_heads needs qk_norm"):
        DiTConfig(qk_norm=False, qk_norm_across_heads=True)


def wan_param_count(hidden: int, ffn: int, depth: int, text_dim: int, out_dim: int) -> int:
    """Wan 2.1 T2V parameters: embeddings, blocks, head (freq_dim 256, biases everywhere)."""
    linear = lambda i, o: i * o + o  # noqa: E731
    attention = 4 * linear(hidden, hidden) + 2 * hidden  # q, k, v, out + QK norms over D
    block = 6 * hidden + 2 * attention + 2 * hidden + linear(hidden, ffn) + linear(ffn, hidden)
    embeddings = linear(out_dim, hidden) + linear(text_dim, hidden) + linear(hidden, hidden)
    embeddings += linear(256, hidden) + linear(hidden, hidden) + linear(hidden, 6 * hidden)
    return embeddings + depth * block + 2 * hidden + linear(hidden, out_dim)


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_presets_are_the_published_configs(preset: str) -> None:
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        cfg = compose("train", overrides=[f"model/dit={preset}"])
    config = instantiate(cfg.model.dit, _convert_="all")
    published = {**COMMON, **PUBLISHED[preset]}
    assert config == wan_transformer_config(published)
    with torch.device("meta"):
        wan = WanTransformer3DModel(**{k: v for k, v in published.items() if k[0] != "_"})
    ours = sum(p.numel() for p in DiT.from_config_on_meta(config).parameters())
    theirs = sum(p.numel() for p in wan.parameters())
    hidden = config.hidden_size
    formula = wan_param_count(hidden, config.mlp_dim, config.depth, 4096, 64)
    assert ours == theirs == formula
    assert (1.3e9 < ours < 1.5e9) if preset == "wan2_1_1_3b" else (13.5e9 < ours < 14.5e9)
