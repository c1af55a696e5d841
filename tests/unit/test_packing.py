"""packing.py: exact pack/unpack, conditioning masks, and planner efficiency vs bucketing."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch

from sora_lightning.data.packing import (
    PackedBatch,
    pack_samples,
    packing_efficiency,
    plan_buckets,
    plan_packs,
    stream_packs,
    unpack_latents,
)

PATCH = (1, 2, 2)
SHAPES = [(4, 3, 4, 6), (4, 1, 6, 4), (4, 5, 2, 2)]  # (C, F, h, w): clip, image, long thin clip


def _batch(cond_frames: list[int] | None = None, patch: tuple[int, int, int] = PATCH) -> tuple:
    latents = [torch.randn(shape) for shape in SHAPES]
    texts = [torch.randn(n, 8) for n in (5, 0, 3)]
    return latents, texts, pack_samples(latents, texts, patch, capacity=64, cond_frames=cond_frames)


def test_pack_unpack_round_trip_is_exact() -> None:
    latents, texts, batch = _batch()
    lengths = [18, 6, 5]  # F * (h/2) * (w/2)
    assert batch.x.shape == (sum(lengths), 4 * 1 * 2 * 2)
    assert batch.cu_seqlens.tolist() == [0, 18, 24, 29] and batch.cu_seqlens.dtype == torch.int32
    assert batch.grid_sizes.tolist() == [[3, 2, 3], [1, 3, 2], [5, 1, 1]]
    assert batch.grid_sizes.dtype == torch.int64
    assert batch.text_cu_seqlens.tolist() == [0, 5, 5, 8] and torch.equal(
        batch.text, torch.cat(texts)
    )
    assert (batch.num_samples, batch.num_tokens, batch.efficiency) == (3, 29, 29 / 64)
    assert batch.timesteps is None and batch.cond is None and batch.cond_mask is None
    for got, want in zip(unpack_latents(batch.x, batch, PATCH), latents, strict=True):
        assert torch.equal(got, want)
    assert [piece.shape[0] for piece in batch.split_tokens(batch.x)] == lengths


def test_cond_mask_marks_leading_frames_of_each_sample() -> None:
    latents, _, batch = _batch(cond_frames=[2, 0, 1])
    mask = batch.cond_mask
    expected = torch.cat(
        [torch.tensor([1.0] * 12 + [0.0] * 6), torch.zeros(6), torch.tensor([1.0] + [0.0] * 4)]
    )
    assert torch.equal(mask, expected)
    assert torch.equal(batch.cond[mask == 1], batch.x[mask == 1])
    assert torch.count_nonzero(batch.cond[mask == 0]) == 0
    first = unpack_latents(batch.cond, batch, PATCH)[0]
    assert torch.equal(first[:, :2], latents[0][:, :2]) and torch.count_nonzero(first[:, 2:]) == 0


def test_cond_frames_must_align_with_temporal_patch() -> None:
    with pytest.raises(ValueError, match="temporal patch size 2"):
        pack_samples([torch.randn(4, 4, 2, 2)], [torch.randn(1, 8)], (2, 2, 2), 64, cond_frames=[1])
    with pytest.raises(ValueError, match="cond_frames"):
        pack_samples([torch.randn(4, 2, 2, 2)], [torch.randn(1, 8)], (1, 2, 2), 64, cond_frames=[3])


def test_oversize_samples_raise_clear_errors() -> None:
    with pytest.raises(
        ValueError, match="sample 1 has 200 tokens, more than the pack capacity 100"
    ):
        plan_packs([10, 200, 5], 100)
    with pytest.raises(ValueError, match="exceed the pack capacity 16"):
        pack_samples([torch.randn(4, 3, 4, 6)], [torch.randn(2, 8)], PATCH, capacity=16)


def test_to_casts_floats_only() -> None:
    _, _, batch = _batch(cond_frames=[1, 1, 1])
    moved = batch.to("cpu", dtype=torch.bfloat16)
    assert isinstance(moved, PackedBatch) and moved.x.dtype == torch.bfloat16
    assert moved.cond_mask.dtype == torch.bfloat16 and moved.cu_seqlens.dtype == torch.int32
    assert moved.grid_sizes.dtype == torch.int64 and batch.x.dtype == torch.float32


def _mixed_shapes(count: int) -> list[tuple[int, int, int]]:
    """Token grids of a mixed-length, mixed-aspect stream (images to 9-frame clips)."""
    rng = np.random.default_rng(0)
    spatial = [(16, 16), (12, 20), (20, 12), (14, 14)]
    return [
        (int(rng.choice([1, 2, 3, 5, 9])), *spatial[rng.integers(len(spatial))])
        for _ in range(count)
    ]


def test_first_fit_packs_mixed_shapes_efficiently_and_beats_bucketing() -> None:
    shapes, capacity = _mixed_shapes(256), 4096
    lengths = [math.prod(shape) for shape in shapes]
    plans = plan_packs(lengths, capacity)
    assert sorted(i for plan in plans for i in plan) == list(range(256))
    assert all(sum(lengths[i] for i in plan) <= capacity for plan in plans)
    assert all(plan == sorted(plan) for plan in plans) and plans == plan_packs(lengths, capacity)
    packed = packing_efficiency(plans, lengths, capacity)
    buckets = plan_buckets(shapes, capacity)
    bucketed = packing_efficiency(buckets, lengths, capacity)
    assert packed >= 0.95
    assert bucketed < packed - 0.1
    assert all(len({shapes[i] for i in plan}) == 1 for plan in buckets)


def test_bounded_open_packs_stay_valid() -> None:
    lengths = [math.prod(shape) for shape in _mixed_shapes(64)]
    plans = plan_packs(lengths, 4096, max_open=2)
    assert sorted(i for plan in plans for i in plan) == list(range(64))
    assert all(sum(lengths[i] for i in plan) <= 4096 for plan in plans)
    assert plan_packs([3, 3, 3], 4, max_open=1) == [[0], [1], [2]]
    assert plan_packs([3, 1, 2, 2], 4) == [[0, 1], [2, 3]]


def _stream(num_epochs: int, num_samples: int = 104) -> list[tuple[int, int, int]]:
    """(stream position, sample id, tokens): epochs of one sample set, each a new permutation
    with new clip lengths, like the DiT data (token grids of crops of many sizes and aspects)."""
    rng = np.random.default_rng(1)
    area = [int(rng.integers(5, 17)) * int(rng.integers(5, 22)) for _ in range(num_samples)]
    items = []
    for _ in range(num_epochs):
        for sample in rng.permutation(num_samples):
            frames = int(rng.choice([1, 3, 5, 9]))
            items.append((len(items), int(sample), frames * area[sample]))
    return items


def _stream_packs(items: list, capacity: int = 4096, window: int = 64) -> list[list]:
    return list(
        stream_packs(
            items, capacity, length=lambda it: it[2], sample_id=lambda it: it[1], window=window
        )
    )


def test_stream_packs_place_every_item_once_across_epochs() -> None:
    items = _stream(8)
    packs = _stream_packs(items)
    flat = [item for pack in packs for item in pack]
    assert sorted(flat) == items  # nothing dropped, nothing repeated, epochs included
    assert all(sum(it[2] for it in pack) <= 4096 for pack in packs)
    assert all(len({it[1] for it in pack}) == len(pack) for pack in packs)  # a sample once per pack
    assert all(pack == sorted(pack) for pack in packs) and packs == _stream_packs(items)
    # Each pack starts with the oldest waiting item, so an item waits at most `window` packs.
    arrival = {item: index for index, item in enumerate(items)}
    emitted = {item: k for k, pack in enumerate(packs) for item in pack}
    emitted_before = np.cumsum([0] + [len(pack) for pack in packs])
    for item in items:
        pack = emitted[item]
        assert arrival[item] < emitted_before[pack] + len(packs[pack]) + 64  # in the window


def test_stream_packs_beat_first_fit_per_epoch() -> None:
    items, epochs = _stream(8), 8
    lengths = [it[2] for it in items]
    real, capacity = sum(lengths), 4096
    streamed = real / (len(_stream_packs(items)) * capacity)
    per_epoch = sum(len(plan_packs(lengths[e * 104 : (e + 1) * 104], capacity)) for e in range(8))
    assert streamed >= 0.97, streamed
    assert streamed > real / (per_epoch * capacity) + 0.01
    assert epochs * 104 == len(items)


def test_stream_packs_hold_window_items_back_and_work_on_endless_streams() -> None:
    def endless():
        position = 0
        while True:
            yield (position, position % 5, 3)
            position += 1

    packs = stream_packs(endless(), 7, length=lambda it: it[2], sample_id=lambda it: it[1])
    first = [next(packs) for _ in range(50)]
    assert all(len(pack) == 2 for pack in first)  # 3 + 3 <= 7 < 9
    emitted = Counter(item for pack in first for item in pack)
    assert max(emitted.values()) == 1 and len(emitted) == 100
    assert max(item[0] for item in emitted) < 100 + 64  # never further ahead than the window


def test_stream_packs_refuse_oversize_items_and_bad_windows() -> None:
    with pytest.raises(ValueError, match="sample 2 has 9 tokens"):
        list(stream_packs([1, 2, 9], 8, length=int, sample_id=id))
    with pytest.raises(ValueError, match="window"):
        list(stream_packs([1], 8, length=int, sample_id=id, window=0))
