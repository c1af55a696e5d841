"""Wan 2.1's text-to-video transformer (diffusers `WanTransformer3DModel`) as a configured DiT.

Shape legend: D hidden, C latent channels, (pt, ph, pw) patch, P = C * pt * ph * pw values per
token, N block index.

Our DiT already has Wan's layout (adaLN-single with a per-block table, cross-attention, tanh-GELU
MLP, 3D RoPE splitting head_dim over (t, h, w) as Wan does); what differs are options (QK RMSNorm
over the full width, no conditioning channel, eps, sinusoid width), set by
`wan_transformer_config`, and how weights are stored, mapped by `convert_wan_transformer`:
- Wan's Conv3d patch embedding (kernel = stride = patch) is our Linear over patchified tokens; its
  weight [D, C, pt, ph, pw] flattens in the (c, pt, ph, pw) order of `patches.patchify`.
- Wan's `proj_out` writes each token's values in (pt, ph, pw, c) order (diffusers' unpatchify),
  ours in (c, pt, ph, pw): its rows are permuted.
- Wan's separate to_q/to_k/to_v are the rows of our fused qkv (self) and kv (cross) projections.
Nothing else is converted because the conventions agree: Wan's scheduler noises
x_t = s * noise + (1 - s) * x0 and the transformer predicts noise - x0 at timestep 1000 * s, which
is our flow's x_t, velocity and t (diffusion/flow.py) with `timestep_scale` 1000.

Captions: Wan's pipeline pads the T5 states to 512 tokens with zeros and the transformer attends
to that padding (it takes no text mask). Packed text carries real tokens only, so to reproduce a
published checkpoint's outputs exactly, pack each caption padded to 512 the same way.

Plain torch: no I/O and no diffusers import; reading files is `tools/import_weights.py`'s job.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from sora_lightning.models.dit import DiTConfig

WAN_DEFAULTS: dict[str, Any] = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 40,
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 13824,
    "num_layers": 40,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "image_dim": None,
    "added_kv_proj_dim": None,
    "rope_max_seq_len": 1024,
    "pos_embed_seq_len": None,
}
"""`WanTransformer3DModel.__init__` defaults (diffusers 0.42): what a config.json may omit."""

_IMAGE_KEYS = ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len")  # image-to-video only

Make = Callable[[list[Tensor]], Tensor]
"""Builds one of our tensors from the diffusers tensors it is made of."""
Rule = tuple[str, tuple[str, ...], Make]
"""(our key, the diffusers keys it is made of, how to make it)."""


def wan_transformer_config(diffusers_config: Mapping[str, Any]) -> DiTConfig:
    """A diffusers transformer config.json (as a dict) -> the DiTConfig that computes it exactly.

    Keys starting with "_" (class name, version) are ignored, a key we do not know raises, and
    image-to-video parts (image_dim, added_kv_proj_dim) raise rather than being silently dropped.
    `rope_max_seq_len` is not needed: our RoPE angles have no length limit.
    """
    unknown = sorted(k for k in diffusers_config if not k.startswith("_") and k not in WAN_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown WanTransformer3DModel config keys: {unknown}")
    wan = {**WAN_DEFAULTS, **{k: v for k, v in diffusers_config.items() if k in WAN_DEFAULTS}}
    out_channels = wan["out_channels"] or wan["in_channels"]
    if out_channels != wan["in_channels"]:
        raise ValueError(f"in_channels {wan['in_channels']} != out_channels {out_channels}")
    for key in _IMAGE_KEYS:
        if wan[key] is not None:
            raise ValueError(f"{key}={wan[key]}: Wan's image-to-video parts are not reproduced")
    if wan["qk_norm"] != "rms_norm_across_heads":
        raise ValueError(f"qk_norm {wan['qk_norm']!r}: only 'rms_norm_across_heads' is reproduced")
    return DiTConfig(
        in_channels=wan["in_channels"],
        patch_size=tuple(wan["patch_size"]),
        hidden_size=wan["num_attention_heads"] * wan["attention_head_dim"],
        depth=wan["num_layers"],
        num_heads=wan["num_attention_heads"],
        mlp_hidden_size=wan["ffn_dim"],
        text_dim=wan["text_dim"],
        qk_norm=True,
        qk_norm_across_heads=True,
        cross_attn_norm=bool(wan["cross_attn_norm"]),
        norm_eps=float(wan["eps"]),
        time_frequency_dim=wan["freq_dim"],
        timestep_scale=1000.0,
        use_conditioning=False,
        pooled_text=False,
        abs_pos_embed=False,
    )


def _take(parts: list[Tensor]) -> Tensor:
    return parts[0]


def _concat(parts: list[Tensor]) -> Tensor:
    return torch.cat(parts, dim=0)


def _squeeze(parts: list[Tensor]) -> Tensor:
    """A scale_shift_table [1, k, D] -> our modulation table [k, D]."""
    return parts[0].reshape(parts[0].shape[1:])


def _flatten_conv(parts: list[Tensor]) -> Tensor:
    """Conv3d weight [D, C, pt, ph, pw] -> Linear weight [D, P], (c, pt, ph, pw) as patchify."""
    return parts[0].flatten(1)


def _output_rows(patch: tuple[int, int, int]) -> Make:
    """proj_out rows (or bias) in Wan's (pt, ph, pw, c) order -> ours, (c, pt, ph, pw)."""

    def reorder(parts: list[Tensor]) -> Tensor:
        rows = parts[0]  # [P, D] or [P]
        grid = rows.reshape(*patch, -1, *rows.shape[1:])  # [pt, ph, pw, C, (D)]
        return grid.movedim(3, 0).reshape(rows.shape)

    return reorder


def _linear(
    ours: str, wan: tuple[str, ...], weight: Make = _concat, bias: Make = _concat
) -> list[Rule]:
    """Rules for one Linear made of one or more diffusers Linears stacked by output rows."""
    return [
        (f"{ours}.weight", tuple(f"{name}.weight" for name in wan), weight),
        (f"{ours}.bias", tuple(f"{name}.bias" for name in wan), bias),
    ]


def _block_rules(n: int, cross_attn_norm: bool) -> list[Rule]:
    """The rules of block n: attn1 -> self_attn, attn2 -> cross_attn, ffn -> mlp."""
    ours = wan = f"blocks.{n}"  # same block prefix on both sides
    rules: list[Rule] = [(f"{ours}.modulation", (f"{wan}.scale_shift_table",), _squeeze)]
    for attn, mine in (("attn1", "self_attn"), ("attn2", "cross_attn")):
        for norm in ("q", "k"):
            rules.append(
                (f"{ours}.{mine}.{norm}_norm.weight", (f"{wan}.{attn}.norm_{norm}.weight",), _take)
            )
        rules += _linear(f"{ours}.{mine}.proj", (f"{wan}.{attn}.to_out.0",))
    rules += _linear(f"{ours}.self_attn.qkv", tuple(f"{wan}.attn1.to_{p}" for p in "qkv"))
    rules += _linear(f"{ours}.cross_attn.q", (f"{wan}.attn2.to_q",))
    rules += _linear(f"{ours}.cross_attn.kv", (f"{wan}.attn2.to_k", f"{wan}.attn2.to_v"))
    if cross_attn_norm:
        rules += _linear(f"{ours}.norm_cross", (f"{wan}.norm2",))
    rules += _linear(f"{ours}.mlp.0", (f"{wan}.ffn.net.0.proj",))
    rules += _linear(f"{ours}.mlp.2", (f"{wan}.ffn.net.2",))
    return rules


def _rules(depth: int, cross_attn_norm: bool, patch: tuple[int, int, int]) -> list[Rule]:
    """Every key of our DiT and the diffusers keys it comes from."""
    embedder = "condition_embedder"
    rules: list[Rule] = [
        *_linear("patch_embed", ("patch_embedding",), weight=_flatten_conv),
        *_linear("text_embed.0", (f"{embedder}.text_embedder.linear_1",)),
        *_linear("text_embed.2", (f"{embedder}.text_embedder.linear_2",)),
        *_linear("time_embed.mlp.0", (f"{embedder}.time_embedder.linear_1",)),
        *_linear("time_embed.mlp.2", (f"{embedder}.time_embedder.linear_2",)),
        *_linear("time_modulation.1", (f"{embedder}.time_proj",)),
    ]
    for n in range(depth):
        rules += _block_rules(n, cross_attn_norm)
    rules.append(("final_layer.modulation", ("scale_shift_table",), _squeeze))
    reorder = _output_rows(patch)
    return rules + _linear("final_layer.linear", ("proj_out",), weight=reorder, bias=reorder)


def _infer_structure(state_dict: Mapping[str, Tensor]) -> tuple[int, bool]:
    """(depth, cross_attn_norm) of a diffusers state dict, read from its block keys."""
    blocks = [re.match(r"blocks\.(\d+)\.", key) for key in state_dict]
    depth = 1 + max((int(m.group(1)) for m in blocks if m), default=-1)
    cross_attn_norm = any(re.fullmatch(r"blocks\.\d+\.norm2\.weight", key) for key in state_dict)
    return depth, cross_attn_norm


def convert_wan_transformer(
    state_dict: Mapping[str, Tensor], config: DiTConfig | None = None
) -> dict[str, Tensor]:
    """diffusers `WanTransformer3DModel` state dict -> our `DiT` state dict (dtypes kept).

    Every diffusers key must be used and every key we need present: either mistake raises a
    ValueError naming the key. Depth and cross_attn_norm are read from the keys, or taken from
    `config` when given (then a missing last block is named too).
    """
    if "patch_embedding.weight" not in state_dict:
        raise ValueError("missing WanTransformer3DModel key: patch_embedding.weight")
    depth, cross_attn_norm = _infer_structure(state_dict)
    if config is not None:
        depth, cross_attn_norm = config.depth, config.cross_attn_norm
    pt, ph, pw = state_dict["patch_embedding.weight"].shape[2:]  # Conv3d [D, C, pt, ph, pw]
    rules = _rules(depth, cross_attn_norm, (pt, ph, pw))
    needed = {name for _, sources, _ in rules for name in sources}
    missing = sorted(needed - set(state_dict))
    unexpected = sorted(set(state_dict) - needed)
    if missing:
        raise ValueError(f"missing WanTransformer3DModel keys: {missing}")
    if unexpected:
        raise ValueError(f"unexpected WanTransformer3DModel keys: {unexpected}")
    return {ours: make([state_dict[name] for name in sources]) for ours, sources, make in rules}
