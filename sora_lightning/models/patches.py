"""Spacetime patches: the bridge between latent videos and packed DiT tokens.

Shape legend: C channels, F latent frames, H, W latent height/width, N tokens of one sample,
P = C * pt * ph * pw values per token, L tokens of a packed batch.

Token order inside a sample is (f, i, j) row-major over the token grid, which is what the
3D RoPE and unpatchify assume.
"""

from __future__ import annotations

import torch
from torch import Tensor

PatchSize = tuple[int, int, int]


def token_grid(latent_shape: tuple[int, int, int], patch_size: PatchSize) -> tuple[int, int, int]:
    """Token grid (F', H', W') of a latent (F, H, W); sizes must divide evenly so nothing is lost."""
    grid = []
    for size, patch, name in zip(
        latent_shape, patch_size, ("frames", "height", "width"), strict=True
    ):
        if size % patch != 0:
            raise ValueError(
                f"latent {name} {size} is not a multiple of patch size {patch}; "
                "resize the clip to a multiple of (VAE stride x patch size)"
            )
        grid.append(size // patch)
    return grid[0], grid[1], grid[2]


def patchify(latent: Tensor, patch_size: PatchSize) -> Tensor:
    """[C, F, H, W] -> [N, P]: cut one latent video into non-overlapping spacetime patches."""
    channels, frames, height, width = latent.shape
    pt, ph, pw = patch_size
    gf, gh, gw = token_grid((frames, height, width), patch_size)
    x = latent.reshape(channels, gf, pt, gh, ph, gw, pw)
    x = x.permute(1, 3, 5, 0, 2, 4, 6)  # gf gh gw C pt ph pw
    return x.reshape(gf * gh * gw, channels * pt * ph * pw)


def unpatchify(
    tokens: Tensor, grid: tuple[int, int, int], patch_size: PatchSize, channels: int
) -> Tensor:
    """[N, P] -> [C, F, H, W]: the exact inverse of `patchify` for one sample's grid."""
    gf, gh, gw = (int(g) for g in grid)
    pt, ph, pw = patch_size
    if tokens.shape[0] != gf * gh * gw:
        raise ValueError(f"{tokens.shape[0]} tokens do not fill grid {(gf, gh, gw)}")
    x = tokens.reshape(gf, gh, gw, channels, pt, ph, pw)
    x = x.permute(3, 0, 4, 1, 5, 2, 6)  # C gf pt gh ph gw pw
    return x.reshape(channels, gf * pt, gh * ph, gw * pw)


def seqlens_to_cu(seqlens: Tensor | list[int]) -> Tensor:
    """Lengths [B] -> cumulative offsets [B+1] (int32), the varlen attention convention."""
    lengths = torch.as_tensor(seqlens, dtype=torch.int32)
    return torch.nn.functional.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))


def cu_to_sample_index(cu_seqlens: Tensor) -> Tensor:
    """[B+1] offsets -> [L] index of the sample each token belongs to (for per-sample modulation)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=cu_seqlens.device), lengths)
