"""Sequence parallelism for long videos: DeepSpeed-Ulysses all-to-all over attention heads.

A packed batch's video tokens [L, ...] are split along L over the ranks of a sequence-parallel
group, so every per-token activation (MLP, norms, projections) costs 1/N per rank. Attention needs
all tokens of a sample, so before it an all-to-all trades the token split for a head split
([L/N, heads, hd] -> [L, heads/N, hd]), varlen attention runs on whole sequences for a subset of
heads, and a second all-to-all trades back. DeepSpeed's `DistributedAttention` does the exchanges
(with autograd); we feed it the packed layout as [tokens, batch=1, heads, head_dim].

Packed samples keep to themselves exactly as on one rank: the attention inside sees the global
`cu_seqlens`. `pad_packed` appends a padding segment so L divides by N; the padding segment only
attends to itself and its outputs are dropped.

Status: the layer is tested standalone (outputs and gradients equal the single-rank run); the DiT
does not yet split its tokens over a sequence-parallel group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from sora_lightning.models.layers import attention


def pad_packed(cu_seqlens: Tensor, world_size: int) -> tuple[Tensor, int]:
    """cu_seqlens with a trailing padding segment so the token count divides by `world_size`.

    Returns (cu_seqlens [B+1] or [B+2], number of padding tokens). The padding is explicit and
    counted, as a segment of its own, so no real sample ever sees it.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be positive, got {world_size}")
    total = int(cu_seqlens[-1])
    pad = (-total) % world_size
    if pad == 0:
        return cu_seqlens, 0
    return torch.cat([cu_seqlens, cu_seqlens.new_tensor([total + pad])]), pad


def shard_tokens(x: Tensor, world_size: int, rank: int) -> Tensor:
    """This rank's contiguous slice of the packed token axis (dim 0); L must divide by world_size."""
    if x.shape[0] % world_size != 0:
        raise ValueError(
            f"{x.shape[0]} tokens do not split over {world_size} ranks; pad with pad_packed first"
        )
    return x.chunk(world_size, dim=0)[rank]


class _PackedAttention(nn.Module):
    """The local attention DistributedAttention calls: [L, 1, heads/N, hd] in and out."""

    def __init__(self, backend: str) -> None:
        super().__init__()
        self.backend = backend

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int | None
    ) -> Tensor:
        out = attention(
            q.squeeze(1),
            k.squeeze(1),
            v.squeeze(1),
            cu_seqlens,
            cu_seqlens,
            max_seqlen,
            max_seqlen,
            backend=self.backend,
        )  # [L, heads/N, hd]
        return out.unsqueeze(1)


class UlyssesAttention(nn.Module):
    """Self-attention over a packed batch whose tokens are split across a sequence-parallel group.

    Each rank passes its token slice q, k, v [L/N, heads, hd] and the global (padded) cu_seqlens;
    it gets back its slice of the output [L/N, heads, hd], identical to the matching rows of
    single-rank attention. heads must divide by N.
    """

    def __init__(self, group: dist.ProcessGroup | None = None, backend: str = "auto") -> None:
        super().__init__()
        from deepspeed.sequence.layer import DistributedAttention

        self.group = group if group is not None else dist.group.WORLD
        self.inner = DistributedAttention(
            _PackedAttention(backend), self.group, scatter_idx=2, gather_idx=0
        )

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int | None = None
    ) -> Tensor:
        """q, k, v [L/N, heads, hd] (this rank's tokens) -> [L/N, heads, hd]."""
        world_size = dist.get_world_size(self.group)
        if q.shape[1] % world_size != 0:
            raise ValueError(
                f"{q.shape[1]} heads do not split over a sequence-parallel group of {world_size}"
            )
        if q.shape[0] * world_size != int(cu_seqlens[-1]):
            raise ValueError(
                f"{q.shape[0]} local tokens x {world_size} ranks != cu_seqlens total "
                f"{int(cu_seqlens[-1])}; pad with pad_packed and split with shard_tokens"
            )
        out = self.inner(
            q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), 1, None, cu_seqlens, max_seqlen
        )
        return out.squeeze(1)  # [L/N, heads, hd]
