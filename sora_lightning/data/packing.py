"""Token-budget packing of latent videos of different shapes (NaViT-style).

Why: clips of different lengths, sizes and aspect ratios train together without padding or
cropping. Each sample's spacetime patches are concatenated along one token axis and
`cu_seqlens` keeps samples apart in attention. Padding never enters `x`; the unused part of a
pack's token budget (`capacity`) is reported as `1 - efficiency`.

Shape legend: C channels, F latent frames, h, w latent height/width, N tokens of one sample,
L tokens of a packed batch, P = C * pt * ph * pw values per token, S text tokens, Dt text width.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass, fields, replace
from typing import TypeVar

import torch
from torch import Tensor

from sora_lightning.diffusion.flow import frame_cond_mask
from sora_lightning.models.patches import PatchSize, patchify, seqlens_to_cu, token_grid, unpatchify

Item = TypeVar("Item")


@dataclass
class PackedBatch:
    """One packed DiT input (the shared contract) plus what is needed to undo the packing."""

    x: Tensor
    """[L, P] patchified latents of all samples, (f, i, j) row-major within each sample."""
    cu_seqlens: Tensor
    """[B+1] int32 cumulative video-token counts."""
    grid_sizes: Tensor
    """[B, 3] int64 token grid (F/pt, h/ph, w/pw) per sample."""
    text: Tensor
    """[S, Dt] text-encoder states of all samples, real tokens only."""
    text_cu_seqlens: Tensor
    """[B+1] int32 cumulative text-token counts."""
    latent_shapes: list[tuple[int, int, int, int]]
    """(C, F, h, w) per sample, for unpacking."""
    capacity: int
    """Token budget of this pack; `efficiency` is measured against it."""
    timesteps: Tensor | None = None
    """[B] float in [0, 1]; None until the trainer samples them."""
    cond: Tensor | None = None
    """[L, P] clean conditioning tokens (zeros where cond_mask is 0), or None."""
    cond_mask: Tensor | None = None
    """[L] float, 1.0 on clean conditioning tokens, or None."""

    @property
    def num_tokens(self) -> int:
        """Real video tokens L."""
        return int(self.x.shape[0])

    @property
    def num_samples(self) -> int:
        """Samples B."""
        return len(self.latent_shapes)

    @property
    def efficiency(self) -> float:
        """Real tokens / capacity: how much of the token budget carries data."""
        return self.num_tokens / self.capacity

    def to(self, device: torch.device | str, *, dtype: torch.dtype | None = None) -> PackedBatch:
        """Copy to `device`; `dtype` (if given) applies to floating tensors only, never to offsets."""
        moved = {}
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, Tensor):
                cast = dtype if dtype is not None and value.is_floating_point() else None
                value = value.to(device=device, dtype=cast, non_blocking=True)
            moved[item.name] = value
        return replace(self, **moved)

    def split_tokens(self, tokens: Tensor) -> list[Tensor]:
        """[L, ...] -> per-sample [N_i, ...] views, e.g. to compute a per-sample loss."""
        if tokens.shape[0] != self.num_tokens:
            raise ValueError(f"expected {self.num_tokens} tokens, got {tokens.shape[0]}")
        lengths = (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).tolist()
        return list(torch.split(tokens, lengths))


def pack_samples(
    latents: Sequence[Tensor],
    texts: Sequence[Tensor],
    patch_size: PatchSize,
    capacity: int,
    cond_frames: Sequence[int] | None = None,
) -> PackedBatch:
    """Latents [C, F, h, w] and text states [S_i, Dt] -> one PackedBatch of at most `capacity` tokens.

    cond_frames[i] latent frames of sample i are clean conditioning, counted like a Python slice:
    k > 0 keeps the first k (image-to-video, extension forwards), k < 0 the last |k| (generating
    what leads up to a given clip), 0 none. `cond` holds their tokens and `cond_mask` is 1 there.
    """
    if not latents or len(latents) != len(texts):
        raise ValueError(
            f"need one text per latent and at least one sample, got {len(latents)} and {len(texts)}"
        )
    if cond_frames is not None and len(cond_frames) != len(latents):
        raise ValueError(f"cond_frames has {len(cond_frames)} entries for {len(latents)} samples")
    tokens = [patchify(latent, patch_size) for latent in latents]  # each [N_i, P]
    lengths = [t.shape[0] for t in tokens]
    if sum(lengths) > capacity:
        raise ValueError(f"{sum(lengths)} tokens ({lengths}) exceed the pack capacity {capacity}")
    grids = [token_grid(tuple(latent.shape[1:]), patch_size) for latent in latents]
    x = torch.cat(tokens)  # L P
    cond, cond_mask = None, None
    if cond_frames is not None and any(cond_frames):  # none drawn: as a model without the channel
        cond_mask = _cond_mask(grids, patch_size, cond_frames).to(x.device)  # L
        cond = x * cond_mask[:, None].to(x.dtype)  # L P
    return PackedBatch(
        x=x,
        cu_seqlens=seqlens_to_cu(lengths).to(x.device),
        grid_sizes=torch.tensor(grids, dtype=torch.int64, device=x.device).reshape(-1, 3),
        text=torch.cat(list(texts)),
        text_cu_seqlens=seqlens_to_cu([t.shape[0] for t in texts]).to(x.device),
        latent_shapes=[tuple(int(s) for s in latent.shape) for latent in latents],
        capacity=int(capacity),
        cond=cond,
        cond_mask=cond_mask,
    )


def _cond_mask(
    grids: list[tuple[int, int, int]], patch_size: PatchSize, cond_frames: Sequence[int]
) -> Tensor:
    """[L] float mask: 1 on tokens of each sample's leading (k > 0) or trailing (k < 0) frames."""
    masks = []
    for (gf, gh, gw), frames in zip(grids, cond_frames, strict=True):
        count = abs(int(frames))
        if count % patch_size[0] or count > gf * patch_size[0]:
            raise ValueError(
                f"cond_frames={frames} must have |k| <= {gf * patch_size[0]} and be a multiple of "
                f"the temporal patch size {patch_size[0]}"
            )
        masks.append(
            frame_cond_mask(gf, count // patch_size[0], frames < 0).repeat_interleave(gh * gw)
        )
    return torch.cat(masks)


def unpack_latents(tokens: Tensor, batch: PackedBatch, patch_size: PatchSize) -> list[Tensor]:
    """[L, P] (e.g. the DiT's prediction) -> per-sample latents [C, F, h, w]: inverse of packing."""
    pieces = batch.split_tokens(tokens)
    return [
        unpatchify(piece, tuple(grid.tolist()), patch_size, shape[0])
        for piece, grid, shape in zip(pieces, batch.grid_sizes, batch.latent_shapes, strict=True)
    ]


def plan_packs(
    lengths: Sequence[int], capacity: int, *, max_open: int | None = None
) -> list[list[int]]:
    """First-fit: each sample (in stream order) goes to the first open pack with room.

    Returns packs as lists of sample indices, ordered by their first sample. `max_open` bounds
    the packs held open (a streaming loader's buffer): opening one more closes the fullest.
    Deterministic; a sample longer than `capacity` raises ValueError.
    """
    _check_lengths(lengths, capacity)
    if max_open is not None and max_open < 1:
        raise ValueError(f"max_open must be >= 1, got {max_open}")
    open_packs: list[tuple[list[int], int]] = []  # (indices, free tokens)
    closed: list[list[int]] = []
    for index, length in enumerate(lengths):
        slot = next((k for k, (_, free) in enumerate(open_packs) if free >= length), None)
        if slot is None:
            if max_open is not None and len(open_packs) >= max_open:
                fullest = min(range(len(open_packs)), key=lambda k: (open_packs[k][1], k))
                closed.append(open_packs.pop(fullest)[0])
            open_packs.append(([], capacity))
            slot = len(open_packs) - 1
        members, free = open_packs[slot]
        members.append(index)
        open_packs[slot] = (members, free - length)
    closed.extend(members for members, _ in open_packs)
    return sorted(closed, key=lambda members: members[0])


def stream_packs(
    items: Iterable[Item],
    capacity: int,
    *,
    length: Callable[[Item], int],
    sample_id: Callable[[Item], Hashable],
    window: int = 64,
) -> Iterator[list[Item]]:
    """Packs of a (possibly endless) sample stream: oldest item first, then best-fit decreasing.

    Why: planning one epoch at a time leaves each epoch's last packs part empty, and first fit in
    stream order leaves gaps that a later, smaller sample could have filled. Here a lookahead of
    `window` items is kept; each pack starts with the oldest waiting item (so no item waits more
    than `window` packs) and is then filled with the largest waiting items that still fit, the
    window refilled from the stream as items leave. Items cross epoch boundaries freely: every
    stream item lands in exactly one pack (none dropped, none repeated), and a pack never holds
    two items with the same `sample_id` (copies of one sample from consecutive epochs).
    Deterministic: the same stream gives the same packs. Items within a pack keep stream order.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    source = iter(enumerate(items))
    waiting: list[tuple[int, Item, int]] = []  # (stream position, item, tokens), oldest first
    while _refill(waiting, source, window, capacity, length):
        first = waiting.pop(0)
        _refill(waiting, source, window, capacity, length)
        members, free = [first], capacity - first[2]
        taken = {sample_id(first[1])}
        while (pick := _best_fit(waiting, free, taken, sample_id)) is not None:
            chosen = waiting.pop(pick)
            members.append(chosen)
            free -= chosen[2]
            taken.add(sample_id(chosen[1]))
            _refill(waiting, source, window, capacity, length)
        yield [item for _, item, _ in sorted(members, key=lambda member: member[0])]


def _refill(
    waiting: list, source: Iterator, window: int, capacity: int, length: Callable[[Item], int]
) -> bool:
    """Top the lookahead up to `window` items; False once stream and lookahead are both empty."""
    while len(waiting) < window:
        position, item = next(source, (None, None))
        if position is None:
            break
        tokens = int(length(item))
        _check_lengths([tokens], capacity, first_index=position)
        waiting.append((position, item, tokens))
    return bool(waiting)


def _best_fit(
    waiting: list, free: int, taken: set, sample_id: Callable[[Item], Hashable]
) -> int | None:
    """Index of the largest waiting item (oldest on ties) that fits `free` and is not in the pack."""
    best, best_tokens = None, 0
    for index, (_, item, tokens) in enumerate(waiting):
        if best_tokens < tokens <= free and sample_id(item) not in taken:
            best, best_tokens = index, tokens
    return best


def plan_buckets(shapes: Sequence[tuple[int, ...]], capacity: int) -> list[list[int]]:
    """Open-Sora-style bucketing: batches of identical shapes only, as many per batch as fit.

    `shapes` are token grids (their product is the sample's token count). The baseline that
    `plan_packs` is measured against.
    """
    lengths = [math.prod(shape) for shape in shapes]
    _check_lengths(lengths, capacity)
    buckets: dict[tuple[int, ...], list[int]] = {}
    for index, shape in enumerate(shapes):
        buckets.setdefault(tuple(shape), []).append(index)
    plans = []
    for shape, members in buckets.items():
        per_batch = capacity // math.prod(shape)
        plans.extend(
            members[start : start + per_batch] for start in range(0, len(members), per_batch)
        )
    return plans


def packing_efficiency(
    plans: Sequence[Sequence[int]], lengths: Sequence[int], capacity: int
) -> float:
    """Real tokens / (number of packs x capacity) over a whole plan."""
    if not plans:
        return 0.0
    return sum(lengths[i] for plan in plans for i in plan) / (len(plans) * capacity)


def _check_lengths(lengths: Sequence[int], capacity: int, first_index: int = 0) -> None:
    if capacity < 1:
        raise ValueError(f"capacity must be positive, got {capacity}")
    for index, length in enumerate(lengths, start=first_index):
        if length < 1:
            raise ValueError(f"sample {index} has {length} tokens; every sample needs at least one")
        if length > capacity:
            raise ValueError(
                f"sample {index} has {length} tokens, more than the pack capacity {capacity}; "
                "raise capacity or lower the stage's resolution/frames"
            )
