"""Analytic parameter and FLOP counts of the DiT, for sizing runs and computing MFU.

Plain Python (no tensors): it answers "how big / how expensive is preset X at shape Y" for a
14B model without building it. Tests hold it equal to `sum(p.numel())` and to
`torch.utils.flop_counter.FlopCounterMode` on real forwards, so it cannot drift from dit.py.
"""

from __future__ import annotations

from collections.abc import Sequence

from sora_lightning.models.dit import NUM_MODULATIONS, DiTConfig
from sora_lightning.models.patches import token_grid
from sora_lightning.models.vae import VAEConfig


def _linear_params(in_dim: int, out_dim: int) -> int:
    return in_dim * out_dim + out_dim


def _block_params(cfg: DiTConfig) -> int:
    hidden = cfg.hidden_size
    qk_width = hidden if cfg.qk_norm_across_heads else cfg.head_dim
    qk_norm = 2 * qk_width if cfg.qk_norm else 0
    self_attn = _linear_params(hidden, 3 * hidden) + _linear_params(hidden, hidden) + qk_norm
    cross_norm = 2 * hidden if cfg.cross_attn_norm else 0
    cross_attn = (
        _linear_params(hidden, hidden)
        + _linear_params(hidden, 2 * hidden)
        + _linear_params(hidden, hidden)
        + qk_norm
    )
    mlp = _linear_params(hidden, cfg.mlp_dim) + _linear_params(cfg.mlp_dim, hidden)
    return NUM_MODULATIONS * hidden + self_attn + cross_norm + cross_attn + mlp


def count_params(cfg: DiTConfig) -> int:
    """Exact number of parameters of `DiT(cfg)`, computed from the config alone."""
    hidden = cfg.hidden_size
    embeddings = (
        _linear_params(cfg.embed_in_dim, hidden)
        + _linear_params(cfg.text_dim, hidden)
        + _linear_params(hidden, hidden)
        + _linear_params(cfg.time_frequency_dim, hidden)
        + _linear_params(hidden, hidden)
        + _linear_params(hidden, NUM_MODULATIONS * hidden)
    )
    if cfg.pooled_text:
        embeddings += _linear_params(cfg.text_dim, hidden) + _linear_params(hidden, hidden)
    final = 2 * hidden + _linear_params(hidden, cfg.patch_dim)
    return embeddings + cfg.depth * _block_params(cfg) + final


def _matmul_flops(rows: int, in_dim: int, out_dim: int) -> int:
    return 2 * rows * in_dim * out_dim


def dit_forward_flops(
    cfg: DiTConfig, grids: Sequence[tuple[int, int, int]], text_lens: Sequence[int]
) -> int:
    """Forward FLOPs (2 x multiply-accumulates) of one packed batch; elementwise ops excluded.

    grids are per-sample *token* grids (after patching); text_lens the caption token counts.
    Attention costs QK^T and AV per sample: 4 * n_q * n_k * D for self and cross attention.
    """
    if len(grids) != len(text_lens):
        raise ValueError(f"{len(grids)} grids but {len(text_lens)} text lengths")
    hidden, mlp_dim = cfg.hidden_size, cfg.mlp_dim
    video_lens = [frames * height * width for frames, height, width in grids]
    tokens, text_tokens, batch = sum(video_lens), sum(text_lens), len(grids)
    embeddings = (
        _matmul_flops(tokens, cfg.embed_in_dim, hidden)
        + _matmul_flops(text_tokens, cfg.text_dim, hidden)
        + _matmul_flops(text_tokens, hidden, hidden)
        + _matmul_flops(batch, cfg.time_frequency_dim, hidden)
        + _matmul_flops(batch, hidden, hidden)
        + _matmul_flops(batch, hidden, NUM_MODULATIONS * hidden)
    )
    if cfg.pooled_text:
        pooled_mlp = _matmul_flops(batch, cfg.text_dim, hidden) + _matmul_flops(
            batch, hidden, hidden
        )
        embeddings += pooled_mlp
    block_linear = (
        _matmul_flops(tokens, hidden, 3 * hidden)  # self-attention qkv
        + 2 * _matmul_flops(tokens, hidden, hidden)  # self-attention out, cross-attention q
        + _matmul_flops(text_tokens, hidden, 2 * hidden)  # cross-attention kv
        + _matmul_flops(tokens, hidden, hidden)  # cross-attention out
        + 2 * _matmul_flops(tokens, hidden, mlp_dim)  # MLP
    )
    self_scores = sum(4 * n * n * hidden for n in video_lens)
    cross_scores = sum(4 * n * s * hidden for n, s in zip(video_lens, text_lens, strict=True))
    final = _matmul_flops(tokens, hidden, cfg.patch_dim)
    return embeddings + cfg.depth * (block_linear + self_scores + cross_scores) + final


def latent_token_grid(
    cfg: DiTConfig, vae: VAEConfig, frames: int, height: int, width: int
) -> tuple[int, int, int]:
    """Pixel clip (T, H, W) -> DiT token grid, through the VAE's factors and the patch size.

    Takes the VAE's config, not loose factors, so the clip-length rule and the factors are
    the VAE's own (`VAEConfig.latent_shape` raises on a clip the VAE cannot encode).
    """
    _, *latent = vae.latent_shape(frames, height, width)
    return token_grid(tuple(latent), cfg.patch_size)
