"""LightningDataModules whose batch for global step s is a pure function of (seed, s, rank).

Why step-indexed, map-style datasets: resuming at step k needs no replay, no sampler state and no
RNG state; it is exact with any number of workers; every rank takes the same number of steps. A
`StepSampler` simply starts at the trainer's restored global step.

Here: the plumbing (`StepDataModule`, `StepSampler`, `step_rng`) and the VAE's raw-clip crops,
held in memory or streamed. The DiT's curriculum-shaped packs of cached latents need the
curriculum, so they live with training: `train.dit_data`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from sora_lightning.data.clips import (
    decode_fitted,
    frame_indices,
    to_model_range,
    valid_length,
)
from sora_lightning.data.decode import MediaError
from sora_lightning.data.shards import BadSampleCounter, RawSample, load_samples
from sora_lightning.data.sources import is_held_out
from sora_lightning.data.streaming import (
    ShardIndex,
    StartAtStepLoader,
    StreamingStepDataset,
    build_index,
)

log = logging.getLogger(__name__)


def step_rng(*keys: int) -> np.random.Generator:
    """An RNG owned by one (seed, step, rank, ...) tuple: reproducible without saved state."""
    return np.random.default_rng([int(k) for k in keys])


class StepSampler(Sampler[int]):
    """Yields global step indices from the trainer's current step, so resume continues in place."""

    def __init__(self, start_fn, num_steps: int) -> None:
        self.start_fn = start_fn
        self.num_steps = num_steps

    def __iter__(self) -> Iterator[int]:
        return iter(range(int(self.start_fn()), self.num_steps))

    def __len__(self) -> int:
        return max(0, self.num_steps - int(self.start_fn()))


class VAEStepDataset(Dataset):
    """Random crops of raw clips and images for VAE training (clip lengths of the VAE's
    `temporal_factor`, same shape per step)."""

    def __init__(
        self,
        samples: list[RawSample],
        *,
        batch_size: int,
        crop: int,
        frame_choices: tuple[int, ...],
        max_area: int,
        multiple: int,
        seed: int,
        temporal_factor: int,
        rank: int = 0,
        crop_tries: int = 1,
    ) -> None:
        if not samples:
            raise ValueError("VAE training needs at least one readable sample; check data.shards")
        self.samples, self.batch_size, self.crop = samples, batch_size, crop
        self.frame_choices, self.max_area, self.multiple = frame_choices, max_area, multiple
        self.seed, self.rank, self.temporal_factor = seed, rank, temporal_factor
        self.crop_tries = crop_tries
        self._frames = lru_cache(maxsize=4096)(self._decode)

    def _decode(self, index: int) -> np.ndarray:
        return decode_fitted(self.samples[index], max_area=self.max_area, multiple=self.multiple)

    def __len__(self) -> int:
        return 1 << 40

    def __getitem__(self, step: int) -> Tensor:
        rng = step_rng(self.seed, step, self.rank, 11)
        length = int(rng.choice(self.frame_choices))
        crops = [
            self._crop(int(rng.integers(len(self.samples))), length, rng)
            for _ in range(self.batch_size)
        ]
        return torch.stack(crops)  # [B, 3, T, crop, crop]

    def _crop(self, index: int, length: int, rng: np.random.Generator) -> Tensor:
        frames = self._frames(index)
        factor = self.temporal_factor
        num = valid_length(len(frames), factor)
        idx = frame_indices(
            num, native_fps=0.0, target_fps=None, length=length, temporal_factor=factor, rng=rng
        )
        return crop_window(frames[idx], length, self.crop, rng, self.crop_tries)


def crop_window(
    clip: np.ndarray, length: int, crop: int, rng: np.random.Generator, tries: int = 1
) -> Tensor:
    """A random crop x crop window of a clip, padded to `length` frames, in model range.

    With `tries` > 1, that many random windows are drawn and the one whose pixels vary most is
    kept. Why: on footage with flat backgrounds (the world, screen recordings, studio shots)
    most random crops hold no object at all, and the VAE learns edges and hue only from the rest.
    """
    if len(clip) < length:  # short clip: repeat the last frame so every crop in the batch shares T
        clip = np.concatenate([clip, np.repeat(clip[-1:], length - len(clip), axis=0)])
    best, best_spread = None, -1.0
    for _ in range(tries):
        top = int(rng.integers(0, clip.shape[1] - crop + 1))
        left = int(rng.integers(0, clip.shape[2] - crop + 1))
        window = clip[:, top : top + crop, left : left + crop]
        spread = float(window.std()) if tries > 1 else 0.0
        if spread > best_spread:
            best, best_spread = window, spread
    return to_model_range(best)


@dataclass(frozen=True)
class VAECrops:
    """Streaming VAE batches: decode only the frames a crop needs, resized by FFmpeg, then crop.

    Picklable (a frozen dataclass), so DataLoader workers run it. A sample that fails to decode
    is logged with shard and key and replaced by another sample of the same batch, so the batch
    keeps its size and the step stays on every rank.
    """

    crop: int
    frame_choices: tuple[int, ...]
    max_area: int
    multiple: int
    seed: int
    temporal_factor: int
    """The VAE's (`VAEConfig.temporal_factor`): clips are cut to its lengths."""
    crop_tries: int = 1
    """Random windows drawn per crop; the most varied is kept (`crop_window`)."""

    def __call__(self, samples: list[RawSample], step: int, rank: int) -> Tensor:
        rng = step_rng(self.seed, step, rank, 11)
        length = int(rng.choice(self.frame_choices))
        clips: list[np.ndarray | None] = [self._clip(sample, length, rng) for sample in samples]
        good = [clip for clip in clips if clip is not None]
        if not good:
            raise RuntimeError(
                f"no sample of step {step}'s batch decodes: {[(s.shard, s.key) for s in samples]}"
            )
        crops = [
            crop_window(
                clip if clip is not None else good[0], length, self.crop, rng, self.crop_tries
            )
            for clip in clips
        ]
        return torch.stack(crops)  # [B, 3, T, crop, crop]

    def _clip(self, sample: RawSample, length: int, rng: np.random.Generator) -> np.ndarray | None:
        """`length` frames (or fewer: a short clip) from a random start, fitted to the area cap."""
        factor = self.temporal_factor
        num = (
            valid_length(int(sample.meta.get("frames") or 1), factor) if not sample.is_image else 1
        )
        idx = frame_indices(
            num, native_fps=0.0, target_fps=None, length=length, temporal_factor=factor, rng=rng
        )
        try:
            return decode_fitted(
                sample, max_area=self.max_area, multiple=self.multiple, frame_indices=idx.tolist()
            )
        except (MediaError, ValueError) as error:
            log.warning("skipping sample %r in %s at decode: %s", sample.key, sample.shard, error)
            return None


def training_split(index: ShardIndex, val_fraction: float) -> ShardIndex:
    """The index without held-out keys (`sources.is_held_out`): they are never trained on."""
    keys = tuple(tuple(k for k in keys if not is_held_out(k, val_fraction)) for keys in index.keys)
    return ShardIndex(index.shards, keys)


def _identity(batch):
    return batch


class StepDataModule(L.LightningDataModule):
    """Shared plumbing: a step-indexed dataset behind a sampler that starts at the global step
    (the VAE modules here, the DiT's in `train.dit_data`)."""

    def __init__(self, num_workers: int = 0) -> None:
        super().__init__()
        self.num_workers = num_workers
        self.dataset: Dataset | None = None
        self.num_steps = 0
        self.bad_samples = BadSampleCounter()
        """Samples skipped while loading (read by `BadDataMonitor` before step 0)."""

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _current_step(self) -> int:
        return self.trainer.global_step if self.trainer is not None else 0

    def train_dataloader(self) -> DataLoader:
        sampler = StepSampler(self._current_step, self.num_steps)
        return DataLoader(
            self.dataset,
            sampler=sampler,
            batch_size=None,
            collate_fn=_identity,
            num_workers=self.num_workers,
            persistent_workers=False,
        )


class VAEDataModule(StepDataModule):
    """Raw shards -> random crops for the VAE."""

    def __init__(
        self,
        shards: list[str],
        *,
        batch_size: int,
        crop: int,
        frame_choices: tuple[int, ...],
        max_area: int,
        multiple: int,
        seed: int,
        temporal_factor: int,
        num_steps: int,
        num_workers: int = 0,
        val_fraction: float = 0.0,
        crop_tries: int = 1,
    ) -> None:
        super().__init__(num_workers)
        self.val_fraction = val_fraction
        self.shards, self.kwargs = (
            shards,
            dict(
                batch_size=batch_size,
                crop=crop,
                frame_choices=tuple(frame_choices),
                max_area=max_area,
                multiple=multiple,
                seed=seed,
                temporal_factor=temporal_factor,
                crop_tries=crop_tries,
            ),
        )
        self.num_steps = num_steps

    def setup(self, stage: str | None = None) -> None:
        rank, _ = self._rank_world()
        self.bad_samples = BadSampleCounter()
        samples = load_samples(self.shards, stats=self.bad_samples)
        samples = [s for s in samples if not is_held_out(s.key, self.val_fraction)]
        self.dataset = VAEStepDataset(samples, rank=rank, **self.kwargs)


class StreamingVAEDataModule(VAEDataModule):
    """Raw shards streamed (not held in memory) -> random crops for the VAE; `data.loader=stream`.

    See `streaming.py` for the split over ranks and workers and the exact resume.
    """

    def __init__(self, shards: list[str], *, shuffle_buffer: int = 64, **kwargs) -> None:
        super().__init__(shards, **kwargs)
        self.shuffle_buffer = shuffle_buffer

    def setup(self, stage: str | None = None) -> None:
        rank, world = self._rank_world()
        self.bad_samples = BadSampleCounter()
        index = training_split(build_index(self.shards, self.bad_samples), self.val_fraction)
        options = dict(self.kwargs)
        batch_size = options.pop("batch_size")
        self.dataset = StreamingStepDataset(
            index,
            VAECrops(**options),
            batch_size=batch_size,
            num_steps=self.num_steps,
            seed=options["seed"],
            rank=rank,
            world_size=world,
            shuffle_buffer=self.shuffle_buffer,
        )
        log.info("VAE data: streaming %d samples of %d shards", index.num_samples, len(self.shards))

    def train_dataloader(self) -> DataLoader:
        return StartAtStepLoader(
            self.dataset,
            self._current_step,
            collate_fn=_identity,
            num_workers=self.num_workers,
            persistent_workers=False,
        )
