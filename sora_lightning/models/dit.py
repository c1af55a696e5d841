"""Spacetime-patch diffusion transformer (DiT) over packed batches of videos of any shape.

Shape legend: B batch, C latent channels, F latent frames, H, W latent height/width,
L video tokens of a packed batch, S packed text tokens, D hidden, P = C * pt * ph * pw values
per token, Dt text-encoder width.

Design (DiT, PixArt-alpha, Wan): a Linear patch embedding (equal to a Conv3d with
kernel = stride = patch), a caption MLP, a timestep embedder feeding adaLN-single
modulation (one shared projection to 6 vectors per sample plus a learned per-block table, both
zero-initialised: adaLN-Zero), blocks of modulated self-attention with QK-norm and 3D RoPE,
cross-attention to the packed caption tokens, and a modulated MLP; a zero-initialised final
layer makes an untrained model predict zero velocity. Every sample keeps to itself: attention
is varlen over `cu_seqlens` and modulation is gathered per token by sample index.

This layout is Wan 2.1's: with `qk_norm_across_heads`, `use_conditioning=False` and Wan's sizes
(conf/model/dit/wan2_1_*.yaml) the DiT computes exactly diffusers' `WanTransformer3DModel`, whose
weights `models.wan.convert_wan_transformer` maps onto this module, packed batches included.

Sequence parallelism (long videos) is passed in, not built in: given a `SequenceSharding` (from
`sora_lightning.parallel.sequence`), the packed tokens are padded to a multiple of the group size,
each rank embeds, modulates and runs the MLPs of its contiguous token slice only, self-attention
exchanges heads for tokens around the attention (Ulysses), cross-attention reads the full caption
tokens locally, and the per-token outputs [L, P] are gathered at the end, so callers see the same
result as on one rank. The model never imports a communication library.

Activation checkpointing is applied from outside too (`parallel.strategies.parallelize_module`
wraps each block when `strategy.activation_checkpointing` is set): the model has no switch of its
own, so two switches can never nest a checkpoint inside a checkpoint.
"""

from __future__ import annotations

import warnings
from dataclasses import InitVar, dataclass
from typing import NamedTuple, Protocol

import torch
from torch import Tensor, nn

from sora_lightning.models.layers import (
    ATTENTION_BACKENDS,
    RMSNorm,
    RotaryEmbedding3D,
    SinCosPositionEmbedding3D,
    TimestepEmbedder,
    WidthRMSNorm,
    apply_rotary_freqs,
    attention,
    modulate,
    rope_axis_dims,
    rotary_freqs,
    sincos_axis_dims,
)
from sora_lightning.models.patches import cu_to_sample_index

NUM_MODULATIONS = 6  # shift, scale, gate for attention; shift, scale, gate for the MLP
TIME_FREQUENCY_DIM = 256


@dataclass
class DiTConfig:
    """Size and options of a DiT; presets live in conf/model/dit/*.yaml."""

    in_channels: int = 4
    """Latent channels C of the VAE the model is trained on."""
    patch_size: tuple[int, int, int] = (1, 2, 2)
    """Spacetime patch (pt, ph, pw) in latent units; one token per patch."""
    hidden_size: int = 384
    """Transformer width D."""
    depth: int = 12
    """Number of transformer blocks."""
    num_heads: int = 6
    """Attention heads; head_dim = hidden_size / num_heads."""
    mlp_ratio: float = 4.0
    """MLP hidden width as a multiple of D (ignored when mlp_hidden_size is set)."""
    mlp_hidden_size: int | None = None
    """Explicit MLP hidden width, for presets copied from published models (Wan uses 8960)."""
    text_dim: int = 384
    """Width Dt of the text-encoder states (384 for MiniLM, 4096 for T5-XXL)."""
    qk_norm: bool = True
    """RMSNorm on queries and keys, which keeps attention logits bounded in long runs."""
    use_conditioning: bool = True
    """Add the clean-conditioning channel (image-to-video, extension): the patch embedding
    reads concat(x, cond * mask, mask), i.e. 2P + 1 features per token."""
    activation_checkpointing: InitVar[bool | None] = None
    """Retired: not a field any more (not saved, not read). Accepted so configs saved before still
    load; True only warns. Recomputing blocks in backward is `strategy.activation_checkpointing`,
    applied from outside the model (`parallel.strategies.parallelize_module`)."""
    attn_backend: str = "auto"
    """"auto", "flash" (flash-attn varlen, CUDA) or "sdpa" (per-sample PyTorch SDPA)."""
    rope_theta: float = 10000.0
    """Base of the 3D rotary frequencies."""
    pooled_text: bool = False
    """Also add the caption's mean-pooled states, through an MLP, to the timestep embedding
    (SD3's pooled vector): every block's adaLN then sees the whole caption from step 0, a global
    path that the demo's colour adherence learns through in 1200 CPU steps where cross-attention
    alone often collapsed. Off by default so checkpoints saved without it still load."""
    abs_pos_embed: bool = False
    """Also add a fixed 3D sin-cos embedding of each token's absolute (frame, row, column) to the
    patch embedding (DiT, CogVideoX-2B). RoPE alone leaves a token to find which frame it is in
    through attention: frames whose tokens are equal get equal outputs. It does not by itself make
    the CPU demo learn motion (README). Parameter-free; off by default for older checkpoints."""
    qk_norm_across_heads: bool = False
    """Normalise queries and keys over the full width D (gain [D]) instead of per head (gain
    [head_dim]): Wan's `rms_norm_across_heads`, needed to run Wan's weights exactly."""
    cross_attn_norm: bool = True
    """Affine LayerNorm on the tokens entering cross-attention (Wan's `cross_attn_norm`); False
    feeds them in unnormalised, for models trained that way."""
    norm_eps: float = 1e-6
    """Epsilon of every LayerNorm and QK RMSNorm (Wan's `eps`)."""
    time_frequency_dim: int = TIME_FREQUENCY_DIM
    """Width of the sinusoidal timestep features fed to the time MLP (Wan's `freq_dim`)."""
    timestep_scale: float = 1000.0
    """The model receives flow time t in [0, 1] (t = 1 noise) and embeds t * timestep_scale:
    1000 is both DiT's range and Wan's 0..1000 timestep, so training code never rescales."""

    def __post_init__(self, activation_checkpointing: bool | None) -> None:
        if activation_checkpointing:
            warnings.warn(
                "DiTConfig.activation_checkpointing is retired and ignored: set "
                "strategy.activation_checkpointing=true to recompute DiT blocks in training",
                UserWarning,
                stacklevel=3,
            )
        self.patch_size = tuple(int(p) for p in self.patch_size)  # YAML gives a list
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"patch_size must be three positive ints, got {self.patch_size}")
        for name in ("in_channels", "hidden_size", "depth", "num_heads", "text_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads != 0:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        try:
            rope_axis_dims(self.head_dim)
        except ValueError as error:
            raise ValueError(f"head_dim {self.head_dim} does not suit 3D RoPE: {error}") from None
        if self.abs_pos_embed:
            sincos_axis_dims(self.hidden_size)  # raises on a width it cannot split
        if self.mlp_dim < 1:
            raise ValueError(f"MLP width must be positive, got {self.mlp_dim}")
        if self.attn_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attn_backend {self.attn_backend!r} not in {ATTENTION_BACKENDS}")
        if self.qk_norm_across_heads and not self.qk_norm:
            raise ValueError("qk_norm_across_heads needs qk_norm=True")
        for name in ("norm_eps", "time_frequency_dim", "timestep_scale"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.num_heads

    @property
    def mlp_dim(self) -> int:
        """Hidden width of each block's MLP."""
        return self.mlp_hidden_size or int(self.hidden_size * self.mlp_ratio)

    @property
    def patch_dim(self) -> int:
        """P: values per token in and out (C * pt * ph * pw)."""
        pt, ph, pw = self.patch_size
        return self.in_channels * pt * ph * pw

    @property
    def embed_in_dim(self) -> int:
        """Features per token fed to the patch embedding (2P + 1 with the conditioning channel)."""
        return 2 * self.patch_dim + 1 if self.use_conditioning else self.patch_dim


class SequenceSharding(Protocol):
    """What the DiT needs from a sequence-parallel group; `parallel.sequence.SequenceParallel`.

    Every rank of the group passes the same full packed batch; the DiT asks for its token slice,
    attends through `attend` and hands its output slice to `gather`.
    """

    world_size: int
    rank: int

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int
    ) -> Tensor:
        """Local q, k, v [L/N, heads, hd] with global padded cu_seqlens -> [L/N, heads, hd]."""
        ...

    def gather(self, tokens: Tensor) -> Tensor:
        """Local [L/N, ...] -> [L_padded, ...] on every rank; backward keeps the local slice."""
        ...


class PackedLayout(NamedTuple):
    """Per-batch bookkeeping every block needs: who owns which token, and RoPE angles.

    Without sequence parallelism L_local = L and both offset tensors are `cu_seqlens`. With it,
    the self-attention offsets are global (padded to a multiple of the group, the padding its own
    segment) while cross-attention runs on this rank's queries only (`query_cu_seqlens`).
    """

    sample_index: Tensor  # [L_local] sample of each local video token
    cu_seqlens: Tensor  # [B+1] self-attention offsets ([B+2] with a padding segment)
    text_cu_seqlens: Tensor  # [B+1] (or [B+2], the padding segment has no text)
    max_seqlen: int
    max_text_seqlen: int
    rope_freqs: Tensor  # [L_local, 1, head_dim/2] complex rotations, built once per forward
    query_cu_seqlens: Tensor  # cross-attention offsets of the local tokens, same length as text's
    max_query_seqlen: int
    sharding: SequenceSharding | None = None


def _max_length(cu_seqlens: Tensor) -> int:
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0


def mean_per_segment(tokens: Tensor, cu_seqlens: Tensor) -> Tensor:
    """Packed [S, Dt] with [B+1] offsets -> [B, Dt] mean of each segment (0 for an empty one).

    The mean over a caption's token states is how MiniLM-style encoders pool a sentence.
    """
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(tokens.dtype)  # [B]
    index = cu_to_sample_index(cu_seqlens)  # [S]
    sums = tokens.new_zeros(lengths.numel(), tokens.shape[1]).index_add_(0, index, tokens)
    return sums / lengths.clamp(min=1)[:, None]  # [B, Dt]


def make_qk_norm(cfg: DiTConfig) -> nn.Module:
    """The norm an attention layer applies to its [L, heads, head_dim] queries or keys."""
    if not cfg.qk_norm:
        return nn.Identity()
    if cfg.qk_norm_across_heads:
        return WidthRMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
    return RMSNorm(cfg.head_dim, eps=cfg.norm_eps)


def per_token(values: Tensor, sample_index: Tensor) -> Tensor:
    """Per-sample values [B, k, D] -> values for each token, broadcastable to [L, k, D].

    One sample needs no gather: its [k, D] broadcasts over the tokens, which saves an
    [L, k, D] copy forward and a scatter-add backward in every block.
    """
    if values.shape[0] == 1:
        return values[0]  # [k, D]
    return values.index_select(0, sample_index)  # [L, k, D]


class SelfAttention(nn.Module):
    """Attention among one sample's video tokens, positions given by 3D RoPE."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.q_norm = make_qk_norm(cfg)
        self.k_norm = make_qk_norm(cfg)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: Tensor, layout: PackedLayout) -> Tensor:
        """[L, D] -> [L, D]."""
        qkv = self.qkv(x).unflatten(-1, (3, self.config.num_heads, self.config.head_dim))
        q, k, v = qkv.unbind(1)  # each [L, heads, head_dim]
        q = apply_rotary_freqs(self.q_norm(q), layout.rope_freqs)
        k = apply_rotary_freqs(self.k_norm(k), layout.rope_freqs)
        cu, max_len = layout.cu_seqlens, layout.max_seqlen
        if layout.sharding is not None:  # Ulysses: whole sequences for heads/N heads inside
            out = layout.sharding.attend(q, k, v, cu, max_len)  # [L/N, heads, head_dim]
        else:
            out = attention(q, k, v, cu, cu, max_len, max_len, backend=self.config.attn_backend)
        return self.proj(out.flatten(1))


class CrossAttention(nn.Module):
    """Video tokens of sample i read the caption tokens of sample i (no positions needed)."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.q = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.kv = nn.Linear(cfg.hidden_size, 2 * cfg.hidden_size)
        self.q_norm = make_qk_norm(cfg)
        self.k_norm = make_qk_norm(cfg)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: Tensor, context: Tensor, layout: PackedLayout) -> Tensor:
        """[L, D], [S, D] -> [L, D]."""
        heads, head_dim = self.config.num_heads, self.config.head_dim
        q = self.q_norm(self.q(x).unflatten(-1, (heads, head_dim)))  # [L, heads, head_dim]
        k, v = self.kv(context).unflatten(-1, (2, heads, head_dim)).unbind(1)  # [S, heads, hd]
        out = attention(
            q,
            self.k_norm(k),
            v,
            layout.query_cu_seqlens,
            layout.text_cu_seqlens,
            layout.max_query_seqlen,
            layout.max_text_seqlen,
            backend=self.config.attn_backend,
        )
        return self.proj(out.flatten(1))


class MLP(nn.Sequential):
    """Pointwise feed-forward D -> mlp_dim -> D with tanh-GELU (as DiT)."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__(
            nn.Linear(cfg.hidden_size, cfg.mlp_dim),
            nn.GELU(approximate="tanh"),
            nn.Linear(cfg.mlp_dim, cfg.hidden_size),
        )


class DiTBlock(nn.Module):
    """Modulated self-attention, cross-attention to text, modulated MLP; gates start at zero."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        eps = cfg.norm_eps
        self.norm_attn = nn.LayerNorm(cfg.hidden_size, elementwise_affine=False, eps=eps)
        self.self_attn = SelfAttention(cfg)
        self.norm_cross = (
            nn.LayerNorm(cfg.hidden_size, eps=eps) if cfg.cross_attn_norm else nn.Identity()
        )
        self.cross_attn = CrossAttention(cfg)
        self.norm_mlp = nn.LayerNorm(cfg.hidden_size, elementwise_affine=False, eps=eps)
        self.mlp = MLP(cfg)
        # adaLN-single: this block's learned offset to the shared per-sample modulation.
        self.modulation = nn.Parameter(torch.zeros(NUM_MODULATIONS, cfg.hidden_size))

    def forward(self, x: Tensor, context: Tensor, time_mod: Tensor, layout: PackedLayout) -> Tensor:
        """x [L, D], context [S, D], time_mod [B, 6, D] -> [L, D]."""
        mods = per_token(time_mod + self.modulation, layout.sample_index)  # [L or 1, 6, D]
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mods.unbind(-2)  # each [L, D]
        attn_in = modulate(self.norm_attn(x), shift_a, scale_a)  # [L, D]
        x = torch.addcmul(x, gate_a, self.self_attn(attn_in, layout))  # [L, D]
        x = x + self.cross_attn(self.norm_cross(x), context, layout)  # [L, D]
        mlp_in = modulate(self.norm_mlp(x), shift_m, scale_m)  # [L, D]
        return torch.addcmul(x, gate_m, self.mlp(mlp_in))  # [L, D]


class FinalLayer(nn.Module):
    """Modulated norm and a zero-initialised projection back to patch values."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(cfg.hidden_size, elementwise_affine=False, eps=cfg.norm_eps)
        self.modulation = nn.Parameter(torch.zeros(2, cfg.hidden_size))
        self.linear = nn.Linear(cfg.hidden_size, cfg.patch_dim)

    def forward(self, x: Tensor, time_emb: Tensor, sample_index: Tensor) -> Tensor:
        """x [L, D], time_emb [B, D] -> [L, P]."""
        shift, scale = per_token(time_emb[:, None] + self.modulation, sample_index).unbind(-2)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """Velocity model v(x_t, t, text) over a packed batch of videos of any shapes.

    Build big models without allocating memory with `DiT.from_config_on_meta(cfg)` (or
    `with torch.device("meta"): DiT(cfg)`), then `to_empty(device=...)` and `init_weights()`.
    """

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.config = cfg
        hidden = cfg.hidden_size
        self.patch_embed = nn.Linear(cfg.embed_in_dim, hidden)
        self.text_embed = nn.Sequential(
            nn.Linear(cfg.text_dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, hidden)
        )
        self.time_embed = TimestepEmbedder(hidden, cfg.time_frequency_dim, cfg.timestep_scale)
        self.pooled_text_embed = (
            nn.Sequential(nn.Linear(cfg.text_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
            if cfg.pooled_text
            else None
        )
        self.time_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, NUM_MODULATIONS * hidden))
        self.rope = RotaryEmbedding3D(cfg.head_dim, cfg.rope_theta)
        self.abs_pos = SinCosPositionEmbedding3D(hidden) if cfg.abs_pos_embed else None
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(cfg)
        self.init_weights()

    @classmethod
    def from_config_on_meta(cls, cfg: DiTConfig) -> DiT:
        """A parameter-free skeleton (meta tensors) for counting or sharding before allocation."""
        with torch.device("meta"):
            return cls(cfg)

    @torch.no_grad()
    def init_weights(self) -> None:
        """DiT initialisation; modulation and output start at zero so every block is identity.

        Public so a model materialised from the meta device can be initialised in place.
        """
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm) and module.weight is not None:
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm | TimestepEmbedder):
                module.reset_parameters()
        pooled = self.pooled_text_embed
        pooled_layers = () if pooled is None else (pooled[0], pooled[2])
        for layer in (self.text_embed[0], self.text_embed[2], *pooled_layers):
            nn.init.normal_(layer.weight, std=0.02)
        zero_init = [self.time_modulation[1], self.final_layer.linear]
        for tensor in [p for m in zero_init for p in m.parameters()] + [
            self.final_layer.modulation
        ]:
            nn.init.zeros_(tensor)
        for block in self.blocks:
            nn.init.zeros_(block.modulation)

    def forward(
        self,
        x: Tensor,
        cu_seqlens: Tensor,
        grid_sizes: Tensor,
        timesteps: Tensor,
        text: Tensor,
        text_cu_seqlens: Tensor,
        cond: Tensor | None = None,
        cond_mask: Tensor | None = None,
        sequence: SequenceSharding | None = None,
    ) -> Tensor:
        """Packed noisy tokens x [L, P] -> predicted velocity [L, P] (contract in common docs).

        With `sequence` every rank of the group passes the same batch and gets the same [L, P]
        back, having computed only its 1/N of the per-token activations.
        """
        layout = self._layout(x, cu_seqlens, grid_sizes, timesteps, text, text_cu_seqlens, sequence)
        local = (local_tokens(t, sequence) for t in (x, cond, cond_mask))
        tokens = self.patch_embed(self._embed_inputs(*local))  # [L_local, D]
        if self.abs_pos is not None:
            tokens = tokens + local_tokens(self.abs_pos(grid_sizes).to(tokens), sequence)
        context = self.text_embed(text)  # [S, D]
        time_emb = self.time_embed(timesteps)  # [B, D]
        if self.pooled_text_embed is not None:
            pooled = mean_per_segment(text, text_cu_seqlens)  # [B, Dt]
            time_emb = time_emb + self.pooled_text_embed(pooled.to(time_emb.dtype))  # [B, D]
        time_mod = self.time_modulation(time_emb).unflatten(1, (NUM_MODULATIONS, -1))  # [B, 6, D]
        for block in self.blocks:
            tokens = block(tokens, context, time_mod, layout)  # [L_local, D]
        out = self.final_layer(tokens, time_emb, layout.sample_index)  # [L_local, P]
        return out if sequence is None else sequence.gather(out)[: x.shape[0]]  # [L, P]

    def _embed_inputs(self, x: Tensor, cond: Tensor | None, cond_mask: Tensor | None) -> Tensor:
        """[L, P] -> [L, 2P+1]: noisy tokens, clean conditioning tokens and their mask."""
        if not self.config.use_conditioning:
            if cond is not None or cond_mask is not None:
                raise ValueError("cond given but DiTConfig.use_conditioning is False")
            return x
        if (cond is None) != (cond_mask is None):
            raise ValueError("cond and cond_mask must be given together")
        if cond is None or cond_mask is None:
            return torch.cat([x, torch.zeros_like(x), x.new_zeros(x.shape[0], 1)], dim=1)
        if cond.shape != x.shape or cond_mask.shape != x.shape[:1]:
            raise ValueError(
                f"cond {tuple(cond.shape)} / cond_mask {tuple(cond_mask.shape)} "
                f"do not match x {tuple(x.shape)}"
            )
        mask = cond_mask.to(x.dtype)[:, None]  # [L, 1]
        return torch.cat([x, cond.to(x.dtype) * mask, mask], dim=1)

    def _layout(
        self,
        x: Tensor,
        cu_seqlens: Tensor,
        grid_sizes: Tensor,
        timesteps: Tensor,
        text: Tensor,
        text_cu_seqlens: Tensor,
        sequence: SequenceSharding | None = None,
    ) -> PackedLayout:
        """Check the packed inputs agree with each other and precompute per-batch bookkeeping."""
        num_samples = cu_seqlens.numel() - 1
        if x.ndim != 2 or x.shape[1] != self.config.patch_dim:
            raise ValueError(f"x must be [L, {self.config.patch_dim}], got {tuple(x.shape)}")
        if text.ndim != 2 or text.shape[1] != self.config.text_dim:
            raise ValueError(f"text must be [S, {self.config.text_dim}], got {tuple(text.shape)}")
        shapes_ok = (
            grid_sizes.shape == (num_samples, 3)
            and timesteps.shape == (num_samples,)
            and text_cu_seqlens.shape == (num_samples + 1,)
        )
        if not shapes_ok:
            raise ValueError(
                f"{num_samples} samples in cu_seqlens but grid_sizes {tuple(grid_sizes.shape)}, "
                f"timesteps {tuple(timesteps.shape)}, text_cu_seqlens {tuple(text_cu_seqlens.shape)}"
            )
        rope_cos, rope_sin = self.rope(grid_sizes)  # [L, head_dim/2] each
        if rope_cos.shape[0] != x.shape[0] or int(cu_seqlens[-1]) != x.shape[0]:
            raise ValueError(
                f"x has {x.shape[0]} tokens, cu_seqlens ends at {int(cu_seqlens[-1])}, "
                f"grid_sizes cover {rope_cos.shape[0]}"
            )
        sample_index = cu_to_sample_index(cu_seqlens)  # [L]
        rope_freqs = rotary_freqs(rope_cos, rope_sin).to(x.device)  # [L, 1, head_dim/2]
        if sequence is not None:
            return shard_layout(sample_index, cu_seqlens, text_cu_seqlens, rope_freqs, sequence)
        max_seqlen = _max_length(cu_seqlens)
        return PackedLayout(
            sample_index=sample_index,
            cu_seqlens=cu_seqlens,
            text_cu_seqlens=text_cu_seqlens,
            max_seqlen=max_seqlen,
            max_text_seqlen=_max_length(text_cu_seqlens),
            rope_freqs=rope_freqs,
            query_cu_seqlens=cu_seqlens,
            max_query_seqlen=max_seqlen,
        )


def _padding(num_tokens: int, world_size: int) -> int:
    """Tokens appended so a packed batch splits evenly over a sequence-parallel group."""
    return (-num_tokens) % world_size


def local_tokens(tokens: Tensor | None, sequence: SequenceSharding | None) -> Tensor | None:
    """This rank's contiguous slice of a packed [L, ...] tensor, zero-padded to a multiple of N.

    Contiguous slices keep the all-to-all a plain concatenation in rank order.
    """
    if tokens is None or sequence is None:
        return tokens
    pad = _padding(tokens.shape[0], sequence.world_size)
    if pad:
        tokens = torch.cat([tokens, tokens.new_zeros(pad, *tokens.shape[1:])])
    return tokens.chunk(sequence.world_size)[sequence.rank]


def shard_layout(
    sample_index: Tensor,
    cu_seqlens: Tensor,
    text_cu_seqlens: Tensor,
    rope_freqs: Tensor,
    sequence: SequenceSharding,
) -> PackedLayout:
    """The layout of one rank's token slice; global offsets for self-attention.

    The padding (if any) is a segment of its own in self-attention, has zero text tokens (so its
    cross-attention output is zero), rotates by angle 0 and borrows the last sample's modulation;
    its outputs are dropped after the gather, so it never touches a real token.
    """
    total = int(cu_seqlens[-1])
    pad = _padding(total, sequence.world_size)
    if pad:
        cu_seqlens = torch.cat([cu_seqlens, cu_seqlens.new_tensor([total + pad])])
        text_cu_seqlens = torch.cat([text_cu_seqlens, text_cu_seqlens[-1:]])
        last = sample_index.new_full((pad,), cu_seqlens.numel() - 3)
        sample_index = torch.cat([sample_index, last])
        rope_freqs = torch.cat([rope_freqs, rope_freqs.new_ones(pad, *rope_freqs.shape[1:])])
    per_rank = (total + pad) // sequence.world_size
    start = sequence.rank * per_rank
    query_cu = cu_seqlens.clamp(start, start + per_rank) - start  # local queries per sample
    return PackedLayout(
        sample_index=sample_index[start : start + per_rank],
        cu_seqlens=cu_seqlens,
        text_cu_seqlens=text_cu_seqlens,
        max_seqlen=_max_length(cu_seqlens),
        max_text_seqlen=_max_length(text_cu_seqlens),
        rope_freqs=rope_freqs[start : start + per_rank].clone(),  # frees the full table
        query_cu_seqlens=query_cu,
        max_query_seqlen=_max_length(query_cu),
        sharding=sequence,
    )
