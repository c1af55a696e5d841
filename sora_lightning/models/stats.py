"""Analytic parameter, FLOP and training-memory counts of the DiT, for sizing runs and MFU.

Plain Python (no tensors): it answers "how big / how expensive / how much memory is preset X at
shape Y" for a 14B model without building it. Tests hold it equal to `sum(p.numel())`, to
`torch.utils.flop_counter.FlopCounterMode` on real forwards, to peft's LoRA sizes and to the
tensors autograd saves for backward, so it cannot drift from dit.py.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

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


# ----------------------------------------------------------------------------------------------
# Training memory per GPU: parameters, gradients, optimizer state, activations (bf16 mixed
# precision, AdamW, parameters sharded over every GPU as ZeRO-3 and FSDP2 do).

ACTIVATION_BYTES = 2
"""bf16 activations under bf16 mixed precision."""
STAT_BYTES = 4
"""A float32 per-token statistic (norm mean / reciprocal RMS)."""


def linear_shapes(cfg: DiTConfig) -> dict[str, tuple[int, int]]:
    """Every `nn.Linear` of `DiT(cfg)` by module name -> (in_features, out_features): what LoRA
    can target. Tests hold it equal to the real module tree."""
    hidden, mlp = cfg.hidden_size, cfg.mlp_dim
    shapes = {
        "patch_embed": (cfg.embed_in_dim, hidden),
        "text_embed.0": (cfg.text_dim, hidden),
        "text_embed.2": (hidden, hidden),
        "time_embed.mlp.0": (cfg.time_frequency_dim, hidden),
        "time_embed.mlp.2": (hidden, hidden),
    }
    if cfg.pooled_text:
        shapes |= {"pooled_text_embed.0": (cfg.text_dim, hidden)}
        shapes |= {"pooled_text_embed.2": (hidden, hidden)}
    shapes["time_modulation.1"] = (hidden, NUM_MODULATIONS * hidden)
    block = {
        "self_attn.qkv": (hidden, 3 * hidden),
        "self_attn.proj": (hidden, hidden),
        "cross_attn.q": (hidden, hidden),
        "cross_attn.kv": (hidden, 2 * hidden),
        "cross_attn.proj": (hidden, hidden),
        "mlp.0": (hidden, mlp),
        "mlp.2": (mlp, hidden),
    }
    for index in range(cfg.depth):
        shapes |= {f"blocks.{index}.{name}": shape for name, shape in block.items()}
    shapes["final_layer.linear"] = (hidden, cfg.patch_dim)
    return shapes


def targets_module(name: str, targets: str | Sequence[str]) -> bool:
    """peft's rule for `target_modules`: a string is a regex the whole name must match; a list
    entry matches the name itself or its end after a dot (so "mlp.0" also hits
    `time_embed.mlp.0`: training's `LoraSettings.target_regex` keeps to the blocks)."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == target or name.endswith(f".{target}") for target in targets)


def lora_targets(cfg: DiTConfig, targets: str | Sequence[str]) -> dict[str, tuple[int, int]]:
    """The Linears a peft LoRA with these `target_modules` wraps; none matching is an error."""
    chosen = {n: s for n, s in linear_shapes(cfg).items() if targets_module(n, targets)}
    if not chosen:
        raise ValueError(f"LoRA target_modules {targets!r} match no Linear of the DiT")
    return chosen


def lora_params(cfg: DiTConfig, rank: int, targets: str | Sequence[str]) -> int:
    """Parameters a LoRA of `rank` adds: A [rank, in] and B [out, rank] per targeted Linear."""
    return sum(rank * (fan_in + fan_out) for fan_in, fan_out in lora_targets(cfg, targets).values())


@dataclass(frozen=True)
class StateBytes:
    """Per-GPU bytes of the model's state; parameters are sharded over `num_gpus`."""

    params: int
    """Sharded weights (frozen ones in bf16) plus, on more than one GPU, the bf16 copies of the
    two blocks gathered at a time (the one computing and the one prefetched)."""
    grads: int
    optimizer: int
    ema: int = 0
    """The EMA (train/lora.py `ema_twin`), sharded and stored like the DiT's own weights: a
    copy of the whole DiT in a full fine-tune; under LoRA the adapters only, since it shares the
    frozen base with the DiT, except under FSDP2, whose sharding gives it its own base again."""

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.ema


STRATEGY_BYTES = {  # bytes per trainable parameter: (weights, gradients, optimizer state)
    "zero3": (2, 2, 12),  # DeepSpeed bf16: bf16 weights and grads; fp32 master, exp_avg, exp_avg_sq
    "fsdp2": (4, 4, 8),  # MixedPrecisionPolicy(bf16): fp32 sharded weights (the master) and grads
}


def state_bytes(
    cfg: DiTConfig,
    num_gpus: int,
    strategy: str = "zero3",
    adapter_params: int = 0,
    ema: bool = True,
) -> StateBytes:
    """Parameters, gradients and AdamW state per GPU under bf16 mixed precision.

    Every parameter is sharded over `num_gpus` (ZeRO-3 / FSDP2 full sharding). Full
    fine-tuning (`adapter_params` 0) trains all of the DiT; LoRA trains only its adapters, and
    the frozen base is held in bf16 with no gradient or optimizer state. Both strategies keep
    16 bytes per trainable parameter, split differently (STRATEGY_BYTES).
    """
    if strategy not in STRATEGY_BYTES or num_gpus < 1:
        raise ValueError(f"strategy must be one of {sorted(STRATEGY_BYTES)} and num_gpus >= 1")
    weight, grad, optimizer = STRATEGY_BYTES[strategy]
    base = count_params(cfg)
    trainable, frozen = (adapter_params, base) if adapter_params else (base, 0)
    gathered = 2 * ACTIVATION_BYTES * _block_params(cfg) if num_gpus > 1 else 0
    sharded = _ceil_div(weight * trainable + ACTIVATION_BYTES * frozen, num_gpus)
    ema_copies_base = strategy == "fsdp2" or not frozen  # else it shares the frozen base
    ema_bytes = sharded if ema_copies_base else _ceil_div(weight * trainable, num_gpus)
    return StateBytes(
        params=sharded + gathered,
        grads=_ceil_div(grad * trainable, num_gpus),
        optimizer=_ceil_div(optimizer * trainable, num_gpus),
        ema=ema_bytes if ema else 0,
    )


def _ceil_div(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


def _block_activation_bytes(
    cfg: DiTConfig, tokens: int, text_tokens: int, samples: int, frozen: bool
) -> int:
    """Bytes one block keeps for backward (bf16, memory-efficient attention), by the op that
    saves them; tests hold the sum to the tensors autograd really saves. A frozen base (LoRA)
    keeps less: no copies for the gradients of norm gains and modulation."""
    hidden, act = cfg.hidden_size, ACTIVATION_BYTES
    # fp32 RMSNorm on q and k: its input, and its normed output for the gain's gradient
    qk_norm = (1 if frozen else 2) * STAT_BYTES * hidden if cfg.qk_norm else 0
    # for the modulation's gradient: the two normed inputs of `modulate`, the two gated outputs
    modulation = 0 if frozen else act * hidden * 4
    # norm_attn input, qkv input; qkv output (kept whole by the v view); rotated q, k; output
    self_attn = act * hidden * (2 + 3 + 2 + 1) + 2 * qk_norm
    cross_attn = act * hidden * (2 + 1 + 1) + qk_norm  # norm input, q input; normed q; output
    mlp = act * hidden * 2 + act * cfg.mlp_dim * 2  # norm and MLP inputs; GELU in, GELU out
    stats = STAT_BYTES * (6 + (3 if cfg.qk_norm else 0))  # norm means and reciprocal RMS
    lse = STAT_BYTES * cfg.num_heads * 2  # attention log-sum-exp, self and cross
    video = modulation + self_attn + cross_attn + mlp + stats + lse
    if samples > 1:  # per-token modulation [L, 6, D] and the two (1 + scale) [L, D]
        video += act * hidden * (NUM_MODULATIONS + 2)
    text = act * hidden * 3 + qk_norm  # kv output, k norm, normed k
    return tokens * video + text_tokens * text


def _outside_activation_bytes(cfg: DiTConfig, tokens: int, text_tokens: int, frozen: bool) -> int:
    """Bytes saved outside the blocks: embeddings, the RoPE table every block shares, the final
    layer (frozen, it keeps only its norm's input)."""
    hidden, act = cfg.hidden_size, ACTIVATION_BYTES
    embed = 0 if frozen else act * cfg.embed_in_dim  # patch embedding input
    rope = STAT_BYTES * cfg.head_dim  # complex64 table [L, head_dim / 2]
    final = act * hidden * (1 if frozen else 3) + STAT_BYTES * 2  # norm in, normed, Linear in
    per_text = act * cfg.text_dim + act * hidden * 3  # text MLP input, GELU in/out, shared context
    return tokens * (embed + rope + final) + text_tokens * per_text


@dataclass(frozen=True)
class ActivationBytes:
    """Activations kept for backward on one GPU for one packed sequence."""

    stored: int
    """Held from forward to backward: every block's saved tensors, or with activation
    checkpointing only each block's input [L, D] (plus what lives outside the blocks)."""
    recompute: int
    """With checkpointing, one block's saved tensors rebuilt during its backward; else 0."""

    @property
    def total(self) -> int:
        return self.stored + self.recompute


def activation_bytes(
    cfg: DiTConfig,
    tokens: int,
    text_tokens: int,
    *,
    samples: int = 1,
    checkpointing: bool = False,
    lora_rank: int = 0,
    lora_targets_per_block: int = 0,
) -> ActivationBytes:
    """Analytic activation memory of a forward pass over `tokens` video tokens in `samples`
    clips with `text_tokens` caption tokens, bf16, attention saving O(L) (flash / cuDNN).

    Counts what autograd saves (the listing in `_block_activation_bytes`), not transient
    buffers: the backward's own gradients and the allocator's slack come on top. A LoRA adapter
    with dropout 0 saves its [L, rank] down-projection per targeted Linear; the input it saves
    is the one the Linear already kept.
    """
    frozen = lora_rank > 0
    block = _block_activation_bytes(cfg, tokens, text_tokens, samples, frozen)
    block += ACTIVATION_BYTES * lora_rank * lora_targets_per_block * tokens
    outside = _outside_activation_bytes(cfg, tokens, text_tokens, frozen)
    if not checkpointing:
        return ActivationBytes(stored=cfg.depth * block + outside, recompute=0)
    inputs = ACTIVATION_BYTES * cfg.hidden_size * tokens
    return ActivationBytes(stored=cfg.depth * inputs + outside, recompute=block)
