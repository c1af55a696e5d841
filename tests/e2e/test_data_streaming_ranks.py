"""Streaming reader end to end: 2 real ranks (gloo), real DataLoader workers, interrupt and resume.

Each rank streams sample keys through `StartAtStepLoader` (the loader the VAE datamodule uses),
once uninterrupted and once stopped at step K and restarted at K, with 0 and 2 workers. The
resumed stream must equal the uninterrupted one on every rank (0 missing, 0 repeated), both
ranks must take the same number of steps, and every complete epoch must hold each sample of the
epoch exactly once over all ranks and workers. The streams cross two epoch boundaries.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from sora_lightning.data.shards import write_shards
from sora_lightning.data.streaming import (
    StartAtStepLoader,
    StreamingStepDataset,
    build_index,
    per_slot,
)
from sora_lightning.parallel.strategies import free_port

pytestmark = pytest.mark.e2e
WORLD, BATCH, STEPS, STOP_AT = 2, 2, 9, 5  # odd stop: worker roles rotate
SIZES = [5, 2, 6, 4]  # 17 samples in uneven shards: 4 slots x 4 per epoch, one left out


def keys_batch(samples: list, step: int, rank: int) -> list[str]:
    return [sample.key for sample in samples]


def same(batch: list[str]) -> list[str]:
    return batch


def _write(root: Path) -> list[str]:
    shards, start = [], 0
    for number, size in enumerate(SIZES):
        samples = [
            {"__key__": f"k{i:03d}", "png": b"png", "json": {"caption": "c"}}
            for i in range(start, start + size)
        ]
        shards += write_shards(samples, root, prefix=f"p{number}")
        start += size
    return [str(path) for path in shards]


def _stream(shards: list[str], rank: int, workers: int, start: int, stop: int) -> list:
    data = StreamingStepDataset(
        build_index(shards),
        keys_batch,
        batch_size=BATCH,
        num_steps=STEPS,
        seed=3,
        rank=rank,
        world_size=WORLD,
        shuffle_buffer=3,
    )
    context = "fork" if workers else None  # fork: fast worker start; spawn would re-import torch
    loader = StartAtStepLoader(
        data, lambda: start, num_workers=workers, collate_fn=same, multiprocessing_context=context
    )
    batches = []
    for batch in loader:  # an interrupted run stops early, like a killed job
        batches.append(batch)
        if start + len(batches) == stop:
            break
    return batches


def _rank_main(rank: int, shards: list[str], port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        results = {}
        for workers in (0, 2):
            full = _stream(shards, rank, workers, 0, STEPS)
            resumed = _stream(shards, rank, workers, 0, STOP_AT)
            resumed += _stream(shards, rank, workers, STOP_AT, STEPS)
            results[workers] = (full, resumed)
        gathered = [None] * WORLD
        dist.all_gather_object(gathered, results)
        if rank == 0:
            out.update(enumerate(gathered))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def streams(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], dict]:
    shards = _write(tmp_path_factory.mktemp("stream-shards"))
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank_main, args=(shards, free_port(), out), nprocs=WORLD, join=True)
        return shards, dict(out)


@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_stream_equals_uninterrupted(streams: tuple, workers: int) -> None:
    _, by_rank = streams
    for rank in range(WORLD):
        full, resumed = by_rank[rank][workers]
        assert len(full) == STEPS  # every rank takes all steps
        assert resumed == full, f"rank {rank}, {workers} workers"


@pytest.mark.parametrize("workers", [0, 2])
def test_each_epoch_holds_every_sample_once(streams: tuple, workers: int) -> None:
    """Rebuild each slot's stream from the step -> (virtual worker, local batch) rule."""
    shards, by_rank = streams
    slots = WORLD * max(workers, 1)
    per = per_slot(sum(SIZES), slots)
    slot_keys: dict[int, list[str]] = {}
    for rank in range(WORLD):
        for step, batch in enumerate(by_rank[rank][workers][0]):
            slot = rank * max(workers, 1) + step % max(workers, 1)
            slot_keys.setdefault(slot, []).extend(batch)
    complete = min(len(keys) for keys in slot_keys.values()) // per
    assert complete >= 2  # the streams cross at least two epoch boundaries
    for epoch in range(complete):
        seen = [key for keys in slot_keys.values() for key in keys[epoch * per : (epoch + 1) * per]]
        assert len(seen) == len(set(seen)) == per * slots, f"epoch {epoch}"
