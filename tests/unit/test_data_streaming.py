"""Streaming reader: split over slots (ranks x workers), equal steps, seeded shuffle, exact resume."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from sora_lightning.data.shards import BadSampleCounter, write_shards
from sora_lightning.data.streaming import (
    ShardIndex,
    StreamingStepDataset,
    build_index,
    per_slot,
    read_plan,
    slot_plan,
)


def keys_batch(samples: list, step: int, rank: int) -> tuple[int, int, list[str]]:
    return step, rank, [sample.key for sample in samples]


def write(tmp_path: Path, sizes: list[int]) -> list[str]:
    """Shards of the given sizes (uneven on purpose), samples keyed s000, s001, ..."""
    shards, start = [], 0
    for number, size in enumerate(sizes):
        samples = [
            {"__key__": f"s{i:03d}", "png": b"png", "json": {"caption": f"c{i}"}}
            for i in range(start, start + size)
        ]
        shards += write_shards(samples, tmp_path, prefix=f"part{number}")
        start += size
    return [str(path) for path in shards]


@pytest.fixture
def index(tmp_path: Path) -> ShardIndex:
    return build_index(write(tmp_path, [5, 1, 7, 3]))


def test_index_lists_good_keys_per_shard(index: ShardIndex) -> None:
    assert index.num_samples == 16 and [len(k) for k in index.keys] == [5, 1, 7, 3]
    assert index.keys[1] == ("s005",)


@pytest.mark.parametrize("num_slots", [1, 2, 3, 4, 7, 16])
def test_slots_partition_the_truncated_epoch(index: ShardIndex, num_slots: int) -> None:
    for epoch in range(3):
        plans = [slot_plan(index, 0, epoch, slot, num_slots) for slot in range(num_slots)]
        assert {len(plan) for plan in plans} == {16 // num_slots}  # equal steps, nobody empty
        flat = [item for plan in plans for item in plan]
        assert len(flat) == len(set(flat)) == 16 // num_slots * num_slots  # no sample twice


def test_epochs_reorder_shards_and_drop_a_different_tail(index: ShardIndex) -> None:
    epochs = [
        [key for slot in range(3) for _, key in slot_plan(index, 0, epoch, slot, 3)]
        for epoch in range(6)
    ]
    assert len({tuple(keys) for keys in epochs}) > 1
    assert len({frozenset(keys) for keys in epochs}) > 1  # the left-out sample changes
    assert epochs[0] == [k for s in range(3) for _, k in slot_plan(index, 0, 0, s, 3)]


def test_more_slots_than_samples_is_a_clear_error(index: ShardIndex) -> None:
    with pytest.raises(ValueError, match="num_workers"):
        per_slot(index.num_samples, 17)
    with pytest.raises(ValueError, match="num_workers"):
        StreamingStepDataset(index, keys_batch, batch_size=1, num_steps=1, seed=0, world_size=17)


def stream(index: ShardIndex, **kwargs) -> list[tuple[int, int, list[str]]]:
    options = dict(batch_size=3, num_steps=14, seed=0, shuffle_buffer=4) | kwargs
    start = options.pop("start_step", 0)
    data = StreamingStepDataset(index, keys_batch, **options)
    data.start_step = start
    return list(data)


def test_ranks_take_equal_steps_and_disjoint_samples(index: ShardIndex) -> None:
    ranks = [stream(index, rank=rank, world_size=2, num_steps=5) for rank in range(2)]
    assert [len(r) for r in ranks] == [5, 5]
    # 8 samples per rank per epoch, batches of 3: the first two steps of both ranks are in epoch 0
    first = [key for r in ranks for _, _, keys in r[:2] for key in keys]
    assert len(first) == len(set(first)) == 12


def test_shuffle_is_seeded(index: ShardIndex) -> None:
    assert stream(index) == stream(index)
    assert stream(index) != stream(index, seed=1)
    plain = stream(index, shuffle_buffer=0, batch_size=16, num_steps=1)[0][2]  # one whole epoch
    mixed = stream(index, batch_size=16, num_steps=1)[0][2]
    assert len(set(plain)) == 16 and sorted(mixed) == sorted(plain) and mixed != plain


@pytest.mark.parametrize("start", [1, 5, 6, 13])
def test_resume_at_any_step_continues_the_same_stream(index: ShardIndex, start: int) -> None:
    full = stream(index, rank=1, world_size=2)
    assert stream(index, rank=1, world_size=2, start_step=start) == full[start:]


def test_every_epoch_sees_each_sample_at_most_once(index: ShardIndex) -> None:
    keys = [key for _, _, batch in stream(index, num_steps=16) for key in batch]  # 3 epochs
    for epoch in range(3):
        part = keys[epoch * 16 : (epoch + 1) * 16]
        assert sorted(part) == [f"s{i:03d}" for i in range(16)]
    assert list(itertools.islice(keys, 16)) != keys[16:32]  # reshuffled each epoch


def test_bad_samples_are_counted_by_the_index_and_never_streamed(tmp_path: Path) -> None:
    shards = write(tmp_path, [4, 4])
    good = Path(shards[0]).read_bytes()
    Path(shards[1]).write_bytes(good[: len(good) // 2])  # a truncated tar
    samples = [{"__key__": "empty", "mp4": b"", "json": {"caption": "zero-byte video"}}]
    shards += [str(p) for p in write_shards(samples, tmp_path, prefix="zero")]
    stats = BadSampleCounter()
    index = build_index(shards, stats)
    assert stats.counts == {"truncated_tar": 1, "zero_byte": 1}
    assert "zero-000000.tar: empty" in stats.describe()
    streamed = {key for _, _, keys in stream(index, batch_size=1, num_steps=12) for key in keys}
    assert "empty" not in streamed and streamed <= {f"s{i:03d}" for i in range(8)}


def test_a_repeated_key_is_one_sample_in_the_index_and_the_stream(tmp_path: Path) -> None:
    samples = [
        {"__key__": key, "mp4": key.encode(), "json": {"caption": f"{key} {n}"}}
        for n, key in enumerate(["a", "b", "a", "c", "a"])
    ]
    shards = [str(p) for p in write_shards(samples, tmp_path, prefix="dup")]
    stats = BadSampleCounter()
    index = build_index(shards, stats)
    assert stats.counts == {"duplicate_key": 2}
    assert index.num_samples == 3
    plan = slot_plan(index, seed=0, epoch=0, slot=0, num_slots=1)
    streamed = list(read_plan(plan, shuffle_buffer=0, rng_seed=0))
    assert sorted(s.key for s in streamed) == ["a", "b", "c"]
    first = next(s for s in streamed if s.key == "a")
    assert first.meta["caption"] == "a 0"  # the first group, as the index read it
