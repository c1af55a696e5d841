"""Streaming reader over raw webdataset shards, split over ranks and workers, exact on resume.

Why this design (sample-level contiguous ranges over a shard-shuffled stream):
- An index pass at setup lists each shard's good keys (the same reader that counts bad samples,
  so the bad-data check runs before step 0). With the counts known, every epoch is planned, not
  discovered: the shards are permuted by (seed, epoch), their good samples concatenated, the
  epoch truncated to a multiple of num_slots = world_size x num_workers, and slot k takes the
  contiguous range [k n, (k + 1) n) with n = N // num_slots. Every rank and every worker gets
  exactly n samples per epoch, whatever the shard sizes: no rank runs dry, all ranks take the
  same number of steps, and at most num_slots - 1 samples (a different tail each epoch) are
  left out of an epoch. A contiguous range touches only about N / num_slots samples' worth of
  shards, so reading stays close to one pass over the data, unlike a strided split.
- Within its range a slot streams the shards with `webdataset` (explicit handling: members stay
  bytes, JSON goes through `json.loads`; nothing is unpickled) and shuffles through a buffer
  seeded by (seed, epoch, slot).
- Position is a pure function of the global step, like the map-style datamodules: a worker's
  stream is its slot's epochs back to back, batch j of a worker is samples [j B, (j + 1) B) of
  it, and the DataLoader hands out workers' batches round-robin, so step s comes from virtual
  worker s % W. On resume at step g, physical worker p plays virtual worker (p + g) % W and
  skips (by reading, not decoding) the samples its earlier batches used. No loader state is
  saved; an interrupted run sees exactly the sample stream of an uninterrupted one, as long as
  seed, shards, batch size, world size and num_workers stay the same (one batch per step).
"""

from __future__ import annotations

import bisect
import itertools
import logging
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from sora_lightning.data.shards import BadSampleCounter, RawSample, iter_shard_samples, raw_sample

log = logging.getLogger(__name__)
_WDS_FIELDS = ("__key__", "__url__", "__local_path__")


@dataclass(frozen=True)
class ShardIndex:
    """Good sample keys of each shard, in file order: what an epoch plan is made of."""

    shards: tuple[str, ...]
    """Shard paths, in the order given."""
    keys: tuple[tuple[str, ...], ...]
    """Good keys per shard."""

    @property
    def num_samples(self) -> int:
        """Good samples over all shards."""
        return sum(len(keys) for keys in self.keys)


def build_index(shards: Sequence[str], stats: BadSampleCounter | None = None) -> ShardIndex:
    """Read every shard once (no decoding), counting bad samples into `stats`."""
    stats = BadSampleCounter() if stats is None else stats
    keys: dict[str, list[str]] = {str(shard): [] for shard in shards}
    for sample in iter_shard_samples([str(s) for s in shards], stats=stats):
        keys[sample.shard].append(sample.key)
    return ShardIndex(tuple(keys), tuple(tuple(k) for k in keys.values()))


def per_slot(num_samples: int, num_slots: int) -> int:
    """Samples each slot takes per epoch (the epoch truncated to a multiple of num_slots)."""
    if num_samples < num_slots:
        raise ValueError(
            f"{num_samples} readable samples cannot feed {num_slots} loader slots "
            "(world size x data.num_workers) with at least one each; lower data.num_workers or "
            "add data"
        )
    return num_samples // num_slots


def seeded(*keys: int) -> int:
    """One 63-bit seed from a tuple of ints (numpy's SeedSequence mixing)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint64)[0] >> 1)


def slot_plan(index: ShardIndex, seed: int, epoch: int, slot: int, num_slots: int) -> list:
    """(shard, key) pairs slot `slot` reads in `epoch`, in stream (pre-shuffle) order."""
    n = per_slot(index.num_samples, num_slots)
    order = np.random.default_rng([seed, epoch, 5]).permutation(len(index.shards))
    ends = list(itertools.accumulate(len(index.keys[i]) for i in order))
    start, stop = slot * n, (slot + 1) * n
    plan = []
    position = bisect.bisect_right(ends, start)
    while start < stop:
        shard = int(order[position])
        offset = start - (ends[position] - len(index.keys[shard]))
        take = index.keys[shard][offset : offset + stop - start]
        plan += [(index.shards[shard], key) for key in take]
        start += len(take)
        position += 1
    return plan


def read_plan(
    plan: list[tuple[str, str]], *, shuffle_buffer: int, rng_seed: int
) -> Iterator[RawSample]:
    """Stream the planned samples with webdataset, buffer-shuffled; error if any is missing."""
    wanted, met = set(plan), set()

    def first_of_wanted(sample: dict[str, Any]) -> bool:
        """Planned, and the key's first group in its shard (a repeat is the index's duplicate_key)."""
        name = (sample["__url__"], sample["__key__"])
        first = name not in met
        met.add(name)
        return first and name in wanted

    urls = list(dict.fromkeys(shard for shard, _ in plan))
    stages = [
        wds.SimpleShardList(urls),
        wds.tarfile_to_samples(handler=wds.warn_and_continue),
        wds.select(first_of_wanted),
        wds.map(_to_raw),
    ]
    if shuffle_buffer > 1:
        rng = random.Random(rng_seed)
        stages.append(wds.shuffle(shuffle_buffer, shuffle_buffer, rng=rng))
    samples = wds.DataPipeline(*stages)
    count = 0
    for sample in samples:
        count += 1
        yield sample
    if count != len(plan):
        raise RuntimeError(
            f"read {count} of {len(plan)} planned samples from {urls}: the shards changed since "
            "the index was built at setup; restart the run"
        )


def _to_raw(sample: dict[str, Any]) -> RawSample:
    members = {ext: value for ext, value in sample.items() if ext not in _WDS_FIELDS}
    raw = raw_sample(sample["__key__"], sample["__url__"], members, BadSampleCounter())
    if raw is None:  # the index saw it good: the bytes changed under us
        raise RuntimeError(f"sample {sample['__key__']} of {sample['__url__']} is no longer valid")
    return raw


class StreamingStepDataset(IterableDataset):
    """Batches of raw samples from the shards; the batch of step s on a rank is fixed by (seed, s).

    `make_batch(samples, step, rank)` turns B raw samples into the model's batch (decoding there,
    in the worker). `start_step` is set by `StartAtStepLoader` before workers start.
    """

    def __init__(
        self,
        index: ShardIndex,
        make_batch: Callable[[list[RawSample], int, int], Any],
        *,
        batch_size: int,
        num_steps: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = 64,
    ) -> None:
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"need batch_size >= 1 and 0 <= rank < world_size, got {batch_size}, {rank}, {world_size}"
            )
        per_slot(index.num_samples, world_size)  # fail at setup, not in a worker
        self.index, self.make_batch, self.batch_size = index, make_batch, batch_size
        self.num_steps, self.seed, self.rank, self.world_size = num_steps, seed, rank, world_size
        self.shuffle_buffer, self.start_step = shuffle_buffer, 0

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        virtual = (worker + self.start_step) % num_workers
        first = max(0, -(-(self.start_step - virtual) // num_workers))  # ceil division
        stream = self.slot_stream(
            self.rank * num_workers + virtual,
            self.world_size * num_workers,
            first * self.batch_size,
        )
        for local in itertools.count(first):
            step = local * num_workers + virtual
            if step >= self.num_steps:
                return
            yield self.make_batch(list(itertools.islice(stream, self.batch_size)), step, self.rank)

    def slot_stream(self, slot: int, num_slots: int, skip: int = 0) -> Iterator[RawSample]:
        """The slot's samples, epoch after epoch, from position `skip` on (skipped ones not decoded)."""
        first_epoch, offset = divmod(skip, per_slot(self.index.num_samples, num_slots))
        for epoch in itertools.count(first_epoch):
            plan = slot_plan(self.index, self.seed, epoch, slot, num_slots)
            samples = read_plan(
                plan,
                shuffle_buffer=self.shuffle_buffer,
                rng_seed=seeded(self.seed, epoch, slot, num_slots),
            )
            yield from itertools.islice(samples, offset, None)
            offset = 0


class StartAtStepLoader(DataLoader):
    """A DataLoader that tells its dataset the trainer's step just before workers start.

    Workers are created (and the dataset copied into them) inside `__iter__`, after Lightning
    has restored the checkpoint, so the step read here is the resumed one.
    """

    def __init__(
        self, dataset: StreamingStepDataset, start_fn: Callable[[], int], **kwargs
    ) -> None:
        super().__init__(dataset, batch_size=None, **kwargs)
        self.start_fn = start_fn

    def __iter__(self):
        self.dataset.start_step = int(self.start_fn())
        return super().__iter__()
