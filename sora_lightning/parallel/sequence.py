"""Sequence parallelism for long videos: DeepSpeed-Ulysses all-to-all over attention heads.

A packed batch's video tokens [L, ...] are split along L over the ranks of a sequence-parallel
group, so every per-token activation (MLP, norms, projections) costs 1/N per rank. Attention needs
all tokens of a sample, so before it an all-to-all trades the token split for a head split
([L/N, heads, hd] -> [L, heads/N, hd]), varlen attention runs on whole sequences for a subset of
heads, and a second all-to-all trades back.

Why DeepSpeed's `DistributedAttention` fits packed varlen batches although it knows nothing of
them: it only moves [seq, batch, heads, hd] tensors and passes every extra argument through to the
local attention. We feed it the packed layout as [tokens, batch=1, heads, head_dim] and hand the
global `cu_seqlens` through, so the varlen attention inside sees whole samples for its heads and
packed samples keep to themselves exactly as on one rank. What it does not do is ours: padding
L to a multiple of N (`pad_packed`: a padding segment that only attends to itself, outputs
dropped), the per-rank RoPE and modulation slices (models/dit.py `shard_layout`), and the final
gather of the per-token outputs (`SequenceParallel.gather`).

Gradients: every rank of a group computes the same loss from the gathered output, and the gather's
backward keeps only the local slice, so each rank's parameter gradient is its tokens' share and the
group's gradient is the *sum* over its ranks. Data-parallel strategies average over all W ranks,
so the training step multiplies its loss by N (see `DiTModule.training_step`).

`DiTModule` builds one `SequenceParallel` per degree used by the curriculum (groups of N
consecutive ranks, which share one packed batch: the data-parallel rank is rank // N).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from sora_lightning.models.layers import attention


def check_sequence_parallel(degree: int, world_size: int, num_heads: int, where: str = "") -> None:
    """ValueError naming the fix when a degree cannot split this world or these heads."""
    if degree < 1:
        raise ValueError(f"{where}sequence_parallel must be >= 1, got {degree}")
    if world_size % degree != 0:
        raise ValueError(
            f"{where}sequence_parallel={degree} does not divide the world size {world_size} "
            "(trainer.devices x trainer.num_nodes); use a divisor of it"
        )
    if num_heads % degree != 0:
        raise ValueError(
            f"{where}sequence_parallel={degree} does not divide the DiT's {num_heads} attention "
            "heads (Ulysses splits heads over the group)"
        )


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


class _GatherTokens(torch.autograd.Function):
    """All-gather along dim 0; backward keeps this rank's slice (every rank has the same loss)."""

    @staticmethod
    def forward(ctx, local: Tensor, group: dist.ProcessGroup, rank: int, world: int) -> Tensor:
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local.contiguous(), group=group)
        ctx.rank, ctx.num = rank, local.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:
        start = ctx.rank * ctx.num
        return grad[start : start + ctx.num].contiguous(), None, None, None


def _ensure_deepspeed_comm() -> None:
    """DistributedAttention talks through deepspeed.comm; wrap an existing torch group in it.

    Under Lightning DDP/FSDP torch.distributed is up but DeepSpeed's backend is not. On CPU the
    shm op is turned off first so it is not JIT-compiled (~45 s) for nothing.
    """
    import deepspeed.comm as ds_comm

    if ds_comm.is_initialized():
        return
    if not torch.cuda.is_available():  # as strategies.disable_shm_comm, without importing Lightning
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    ds_comm.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)


class SequenceParallel:
    """One rank's view of a sequence-parallel group: what `DiT.forward(sequence=...)` needs."""

    def __init__(self, group: dist.ProcessGroup, backend: str = "auto") -> None:
        _ensure_deepspeed_comm()
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.attention = UlyssesAttention(group, backend)

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int
    ) -> Tensor:
        """Local q, k, v [L/N, heads, hd] with global padded cu_seqlens -> [L/N, heads, hd]."""
        return self.attention(q, k, v, cu_seqlens, max_seqlen)

    def gather(self, tokens: Tensor) -> Tensor:
        """Local [L/N, ...] -> [L_padded, ...] on every rank of the group."""
        return _GatherTokens.apply(tokens, self.group, self.rank, self.world_size)


def build_sequence_groups(
    degrees: list[int], world_size: int, rank: int, backend: str = "auto"
) -> dict[int, SequenceParallel]:
    """{degree: this rank's SequenceParallel} for every degree > 1, groups of consecutive ranks.

    Consecutive ranks share a node on a cluster, where the all-to-all is fastest. Every rank must
    call this with the same degrees: creating a process group is collective.
    """
    groups: dict[int, SequenceParallel] = {}
    wanted = sorted({d for d in degrees if d > 1})
    if wanted:
        _ensure_deepspeed_comm()  # once, on every rank, before any group exists
    for degree in wanted:
        if world_size % degree:
            raise ValueError(f"sequence_parallel={degree} does not divide world size {world_size}")
        for start in range(0, world_size, degree):
            group = dist.new_group(list(range(start, start + degree)))
            if start <= rank < start + degree:
                groups[degree] = SequenceParallel(group, backend)
    return groups
