"""The DiT's global sample stream: independent of the world size, resumable at any other one.

Each stage's packs form one seeded sequence; a global step consumes `world` consecutive packs.
These tests run the stream at world sizes 1, 2 and 3, and resume it from every position of the
first epochs with a different world size, counting every sample of the epoch: each exactly once.
"""

from __future__ import annotations

import itertools
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from sora_lightning.data.latent_cache import CachedSample
from sora_lightning.data.packing import stream_packs
from sora_lightning.train.curriculum import Curriculum, Stage
from sora_lightning.train.dit_data import DataPosition, DiTDataModule, PackStepDataset

NUM_SAMPLES = 12
STAGE_STEPS = 24  # stage "clips"; then "long" for 6 steps
WORLDS = (1, 2, 3)


def make_dataset(rank: int, world_size: int) -> PackStepDataset:
    """Twelve cached samples of three aspect ratios, images and 9-latent-frame clips."""
    generator = torch.Generator().manual_seed(0)
    samples = []
    for i in range(NUM_SAMPLES):
        frames = 1 if i % 4 == 0 else 9
        height, width = [(4, 4), (4, 6), (6, 4)][i % 3]
        samples.append(
            CachedSample(
                f"s{i}",
                torch.randn(4, frames, height, width, generator=generator),
                {"short": torch.randn(3, 8, generator=generator)},
            )
        )
    curriculum = Curriculum(
        stages=[
            Stage("clips", STAGE_STEPS, frames=(5, 9), token_budget=96),
            Stage("long", 6, frames=(9, 9), token_budget=128),
        ]
    )
    return PackStepDataset(
        samples,
        torch.zeros(2, 8),
        torch.zeros(4),
        torch.ones(4),
        curriculum,
        patch_size=(1, 2, 2),
        spatial_factor=4,
        temporal_factor=4,
        seed=3,
        caption_probs={"short": 1.0},
        text_dropout=0.0,
        rank=rank,
        world_size=world_size,
        pack_window=8,
    )


def tagged_packs(data: PackStepDataset, stage: int, count: int) -> list[list[tuple[int, int, int]]]:
    """The stage's first `count` packs with each item tagged by its epoch: (sample, frames, epoch).

    Packed by the same `stream_packs` call as the dataset (same lengths, ids and window) over the
    same stream, so stripping the tags must give the dataset's own packs (checked by the caller).
    """
    stream = (
        (sample, frames, epoch)
        for epoch in itertools.count()
        for sample, frames in data._epoch_items(stage, epoch)
    )
    window = min(data.pack_window, len(data._epoch_items(stage, 0)))
    packs = stream_packs(
        stream,
        data.curriculum.stages[stage].token_budget,
        length=lambda item: data._tokens(item[0], item[1]),
        sample_id=lambda item: item[0],
        window=window,
    )
    return list(itertools.islice(packs, count))


def consumed(ranks: list[PackStepDataset], steps: range) -> list[tuple[int, int]]:
    """(stage, pack index) of every batch trained at `steps` by all `ranks`, step by step."""
    return [data.pack_index(step) for step in steps for data in ranks]


def epoch_cover(tagged: list[list[tuple[int, int, int]]], epoch: int) -> int:
    """Packs needed until every item of `epoch` has been placed."""
    last = max(k for k, pack in enumerate(tagged) for item in pack if item[2] == epoch)
    return last + 1


@pytest.fixture(scope="module")
def reference() -> tuple[PackStepDataset, list[list[tuple[int, int, int]]]]:
    data = make_dataset(0, 1)
    tagged = tagged_packs(data, 0, STAGE_STEPS * 3)
    for k, pack in enumerate(tagged):
        assert [(i, f) for i, f, _ in pack] == data._packs(0)[k]  # the dataset's own packs
    return data, tagged


@pytest.mark.parametrize("world", WORLDS)
def test_steps_consume_the_global_pack_sequence_in_order(world: int, reference) -> None:
    """At any world size the batches of steps 0..n-1 (all ranks) are packs 0..n*world-1 of the
    one global sequence, and each batch holds exactly the samples of its pack."""
    data, _ = reference
    ranks = [make_dataset(rank, world) for rank in range(world)]
    assert consumed(ranks, range(6)) == [(0, k) for k in range(6 * world)]
    for step in range(3):
        for rank, rank_data in enumerate(ranks):
            batch = rank_data[step]
            pack = data._packs(0)[step * world + rank]
            assert batch.num_samples == len(pack)
            expected = torch.tensor([(f, data.samples[i].latent.shape[2] // 2) for i, f in pack])
            assert torch.equal(batch.grid_sizes[:, :2], expected)
    # the next stage starts its own sequence at pack 0 whatever came before
    assert consumed(ranks, range(STAGE_STEPS, STAGE_STEPS + 1)) == [(1, r) for r in range(world)]


def test_a_pack_is_the_same_batch_at_every_world_size() -> None:
    """Captions and conditioning are drawn per pack, so resuming with other ranks trains on the
    very batches the old ranks would have."""
    one, (zero3, one3, two3) = make_dataset(0, 1), [make_dataset(r, 3) for r in range(3)]
    for rank, data in enumerate((zero3, one3, two3)):
        a, b = data[2], one[2 * 3 + rank]  # step 2 of 3 ranks = steps 6, 7, 8 of one rank
        assert torch.equal(a.x, b.x) and torch.equal(a.text, b.text)


@pytest.mark.parametrize(("old", "new"), [(a, b) for a in WORLDS for b in WORLDS if a != b])
def test_resume_at_every_position_with_another_world_size(old: int, new: int, reference) -> None:
    """Train k steps with `old` ranks, resume from the recorded position with `new` ranks, go on
    until epochs 0 and 1 are covered: each of their samples is seen exactly once, for every k."""
    _, tagged = reference
    cover = epoch_cover(tagged, 1)
    old_ranks = [make_dataset(rank, old) for rank in range(old)]
    resume_points = range(0, cover // old + 2)
    for k in resume_points:
        position = old_ranks[0].position(k)
        assert position == DataPosition(k, k * old)
        new_ranks = [make_dataset(rank, new) for rank in range(new)]
        for data in new_ranks:
            data.resume_from(position)
        end = k + max(0, -(-(cover - position.packs) // new))  # steps until `cover` packs
        batches = consumed(old_ranks, range(k)) + consumed(new_ranks, range(k, end))
        assert all(stage == 0 for stage, _ in batches)
        indices = [index for _, index in batches]
        assert indices == list(range(len(indices))), f"k={k}: packs skipped or repeated"
        seen = Counter((epoch, sample) for index in indices for sample, _, epoch in tagged[index])
        for epoch in (0, 1):
            epoch_samples = {i for i, _ in make_dataset(0, 1)._epoch_items(0, epoch)}
            counts = {s: seen[(epoch, s)] for s in range(NUM_SAMPLES)}
            assert counts == {s: int(s in epoch_samples) for s in range(NUM_SAMPLES)}, (
                f"k={k} epoch {epoch}"
            )
        assert max(seen.values()) == 1


def test_two_resumes_and_the_next_stage() -> None:
    """2 ranks for 3 steps, 1 rank for 4, 3 ranks to the end of the stage: one unbroken
    sequence; the next stage then starts at its pack 0 with the current world size."""
    first = [make_dataset(rank, 2) for rank in range(2)]
    second = [make_dataset(0, 1)]
    second[0].resume_from(first[0].position(3))
    third = [make_dataset(rank, 3) for rank in range(3)]
    for data in third:
        data.resume_from(second[0].position(7))
    assert second[0].position(7) == DataPosition(7, 6 + 4)
    batches = (
        consumed(first, range(3))
        + consumed(second, range(3, 7))
        + consumed(third, range(7, STAGE_STEPS))
    )
    assert batches == [(0, k) for k in range(10 + 3 * (STAGE_STEPS - 7))]
    assert consumed(third, range(STAGE_STEPS, STAGE_STEPS + 2)) == [(1, k) for k in range(6)]
    assert third[0].position(STAGE_STEPS + 2) == DataPosition(STAGE_STEPS + 2, 6)


def test_datamodule_state_round_trips_through_a_checkpoint() -> None:
    """What Lightning saves and restores: the global position and the world that wrote it."""

    def module(rank: int, world: int, step: int) -> DiTDataModule:
        dm = DiTDataModule.__new__(DiTDataModule)
        DiTDataModule.__init__(
            dm, "unused", make_dataset(0, 1).curriculum, expected_key=None, patch_size=(1, 2, 2),
            spatial_factor=4, temporal_factor=4, seed=3, caption_probs={}, text_dropout=0.0,
            num_steps=STAGE_STEPS,
        )  # fmt: skip
        dm.trainer = SimpleNamespace(global_step=step, global_rank=rank, world_size=world)
        dm.dataset = make_dataset(rank, world)
        return dm

    saved = module(1, 2, 5).state_dict()
    assert saved == {"step": 5, "packs": 10, "world_size": 2}
    resumed = module(0, 3, 5)
    resumed.load_state_dict(saved)
    assert resumed.dataset.pack_index(5) == (0, 10)
    assert resumed.dataset.pack_index(6) == (0, 13)
    assert resumed.state_dict() == {"step": 5, "packs": 10, "world_size": 3}


def test_sequence_parallel_groups_count_once_across_a_resize() -> None:
    """World 4 with sequence_parallel=2 is 2 data groups (both ranks of a group share a pack);
    resumed on 2 ranks (one group) the stream goes on at the next pack."""

    def ranks(world: int) -> list[PackStepDataset]:
        datasets = [make_dataset(rank, world) for rank in range(world)]
        for data in datasets:
            data.curriculum = Curriculum(
                stages=[
                    Stage("sp", STAGE_STEPS, frames=(5, 9), token_budget=96, sequence_parallel=2)
                ]
            )
        return datasets

    four, two = ranks(4), ranks(2)
    for data in two:
        data.resume_from(four[0].position(3))
    assert four[0].position(3) == DataPosition(3, 6)
    before = [four[r].pack_index(s) for s in range(3) for r in (0, 2)]  # one rank per group
    after = [two[0].pack_index(s) for s in range(3, 6)]
    assert [index for _, index in before + after] == list(range(9))
    assert all(four[r].pack_index(1) == four[r + 1].pack_index(1) for r in (0, 2))
    assert two[0].pack_index(4) == two[1].pack_index(4)
