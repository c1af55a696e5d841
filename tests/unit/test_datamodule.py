"""Step-indexed DiT data: deterministic per (seed, step, rank), curriculum-shaped, rank-disjoint."""

from __future__ import annotations

import itertools
import pickle
from collections import Counter

import numpy as np
import torch

from sora_lightning.data.latent_cache import CachedSample
from sora_lightning.train.curriculum import Curriculum, Stage
from sora_lightning.train.dit_data import PackStepDataset


def make_dataset(rank: int = 0, world_size: int = 1, seed: int = 0) -> PackStepDataset:
    generator = torch.Generator().manual_seed(0)
    samples = []
    for i in range(12):
        frames = (
            1 if i % 4 == 0 else 9
        )  # images are 1-latent-frame samples; clips 9 latent frames (33 px frames)
        height, width = [(4, 4), (4, 6), (6, 4)][i % 3]
        samples.append(
            CachedSample(
                f"s{i}",
                torch.randn(4, frames, height, width, generator=generator),
                {
                    "detailed": torch.randn(5, 8, generator=generator),
                    "short": torch.randn(3, 8, generator=generator),
                },
            )
        )
    curriculum = Curriculum(
        stages=[
            Stage("img", 3, frames=(1, 1), token_budget=12),
            Stage("vid", 3, frames=(5, 9), token_budget=128, cond_probability=0.5),
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
        seed=seed,
        caption_probs={"detailed": 0.8, "short": 0.2},
        text_dropout=0.1,
        rank=rank,
        world_size=world_size,
    )


def test_same_step_same_batch_even_from_a_fresh_dataset() -> None:
    first, second = make_dataset()[4], make_dataset()[4]
    assert torch.equal(first.x, second.x) and torch.equal(first.text, second.text)
    assert torch.equal(first.cu_seqlens, second.cu_seqlens)


def test_curriculum_shapes_batches() -> None:
    data = make_dataset()
    image_batch, video_batch = data[0], data[3]
    assert image_batch.grid_sizes[:, 0].max() == 1
    assert video_batch.grid_sizes[:, 0].max() > 1
    assert image_batch.num_tokens <= 12 and video_batch.num_tokens <= 128


def test_ranks_take_different_packs_of_the_same_plan() -> None:
    rank0, rank1 = make_dataset(0, 2), make_dataset(1, 2)
    for stage in range(2):
        packs = [rank0._packs(stage)[k] for k in range(4)]
        assert packs == [rank1._packs(stage)[k] for k in range(4)]  # one plan for all ranks
    for step in range(2):
        assert rank0.pack_for(step)[1] == rank0._packs(0)[2 * step]
        assert rank1.pack_for(step)[1] == rank1._packs(0)[2 * step + 1]


def test_packs_carry_samples_across_epochs_without_dropping_or_repeating() -> None:
    """The packs of a stage hold the stage's stream (epoch after epoch) exactly: after P packs,
    the stream's first (placed + window) items are the placed ones plus the `window` still
    waiting, so no sample of an epoch is dropped or trained on twice."""
    data = make_dataset()
    for stage, budget in ((0, 12), (1, 128)):
        packs = [data._packs(stage)[k] for k in range(60)]
        placed = Counter(item for pack in packs for item in pack)
        stream = list(itertools.islice(data._stage_stream(stage), sum(placed.values()) + 12))
        waiting = Counter(stream) - placed
        assert not placed - Counter(stream) and sum(waiting.values()) == 12
        assert all(len({i for i, _ in pack}) == len(pack) for pack in packs)
        assert all(sum(data._tokens(i, f) for i, f in pack) <= budget for pack in packs)
        assert sum(placed.values()) > 3 * 12  # several epochs' worth
    assert sorted(i for i, _ in data._epoch_items(1, 0)) == list(range(12))


def test_pack_sequence_regenerates_older_packs_and_pickles() -> None:
    data = make_dataset()
    packs = data._packs(1)
    packs.keep = 3
    ahead = [packs[k] for k in range(10)]
    assert packs[0] == ahead[0] and packs[9] == ahead[9]  # behind the kept window: regenerated
    clone = pickle.loads(pickle.dumps(data))  # spawned DataLoader workers get a copy like this
    assert clone.pack_for(7)[1] == data.pack_for(7)[1]


def test_two_ranks_two_workers_resume_exactly() -> None:
    """The step-indexed loader (StepSampler) resumed at step k with 2 workers on each of 2 ranks
    yields exactly the uninterrupted batches from k on: 0 missing, 0 repeated, across the
    curriculum's stage (and so plan epoch) boundary at step 3."""
    from torch.utils.data import DataLoader

    from sora_lightning.data.datamodule import StepSampler

    def batches(rank: int, start: int) -> list[list[int]]:
        data = make_dataset(rank, 2)
        loader = DataLoader(
            data,
            sampler=StepSampler(lambda: start, 6),
            batch_size=None,
            collate_fn=lambda batch: batch,
            num_workers=2,
            multiprocessing_context="fork",
        )
        return [batch.cu_seqlens.tolist() + batch.x.flatten()[:8].tolist() for batch in loader]

    for rank in range(2):
        full = batches(rank, 0)
        assert len(full) == 6
        assert batches(rank, 3) == full[3:]
        assert batches(rank, 5) == full[5:]


def test_crop_tries_keeps_the_most_varied_window_and_one_try_is_unchanged() -> None:
    """A flat clip with one small object: more tries find the object more often."""
    from sora_lightning.data.datamodule import crop_window

    clip = np.zeros((1, 64, 64, 3), np.uint8)
    clip[:, 50:58, 50:58] = 255  # an object in one corner

    def hits(tries: int) -> int:
        rng = np.random.default_rng(0)
        return sum(float(crop_window(clip, 1, 16, rng, tries).max()) > 0 for _ in range(200))

    assert hits(8) > 2 * hits(1)
    one, default = np.random.default_rng(3), np.random.default_rng(3)
    assert torch.equal(crop_window(clip, 1, 16, one, 1), crop_window(clip, 1, 16, default))
