"""The DiT's data: cached latents -> curriculum-shaped packed batches, one per global step.

DiT packs come from one endless stream per curriculum stage (its epochs back to back, each a
seeded permutation), packed by `stream_packs`: a pack may mix the end of one epoch with the start
of the next, so no epoch ends in a part-empty pack, and still no sample is dropped or repeated.
Pack k of a stage is a pure function of (seed, stage, k), whatever the world size: that sequence
is the global sample stream. A global step consumes `world` consecutive packs (data-parallel
ranks; a sequence-parallel group counts once), data rank r taking the r-th; so samples are
counted per pack, and a step's ranks may train on different numbers of samples and tokens.
The resumable state is the global position (`DataPosition`: packs of the stage consumed before a
step), not a per-rank loader state: resumed with another world size, the new ranks go on from
that position, so no pack (and no sample) of the epoch is repeated or missed. Without a resume
the batch of global step s is a pure function of (seed, s, rank), as for every step-indexed
module (`data.datamodule`); the curriculum stage of a batch follows from its step.

Here in train rather than data because the stage of each step comes from the curriculum.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from torch.utils.data import Dataset

from sora_lightning.data.clips import valid_length
from sora_lightning.data.datamodule import StepDataModule, step_rng
from sora_lightning.data.latent_cache import CachedSample, load_cache
from sora_lightning.data.packing import PackedBatch, pack_samples, stream_packs
from sora_lightning.data.shards import BadSampleCounter
from sora_lightning.data.sources import is_held_out
from sora_lightning.data.validation import held_out
from sora_lightning.train.curriculum import Curriculum, Stage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataPosition:
    """Where the global pack stream stood at a global step: world-size-free resumable data state."""

    step: int
    """The global step (the next one to train)."""
    packs: int
    """Packs of that step's curriculum stage consumed before it, by all data ranks together."""

    def to_dict(self) -> dict[str, int]:
        """Plain data for a checkpoint (`DiTDataModule.state_dict`)."""
        return {"step": self.step, "packs": self.packs}


class PackSequence:
    """Random access to a deterministic, endless sequence of packs, generated on demand.

    Steps arrive in increasing order in each process, so only the newest `keep` packs are held
    (memory stays bounded on long runs); asking for an older one regenerates from the start.
    """

    def __init__(self, make: Callable[[], Iterator[list]], keep: int = 4096) -> None:
        self.make, self.keep = make, keep
        self._source: Iterator[list] | None = None
        self._recent: deque[list] = deque()
        self._first = 0  # sequence index of _recent[0]

    def __getitem__(self, index: int) -> list:
        if self._source is None or index < self._first:
            self._source, self._recent, self._first = self.make(), deque(), 0
        while index >= self._first + len(self._recent):
            self._recent.append(next(self._source))
            if len(self._recent) > self.keep:
                self._recent.popleft()
                self._first += 1
        return self._recent[index - self._first]


class PackStepDataset(Dataset):
    """Packed DiT batches from cached latents, shaped by the curriculum stage of each step.

    `pack_window` is the packer's lookahead in samples (capped at the stage's samples per epoch):
    larger fills packs better; a sample waits at most that many packs.
    """

    def __init__(
        self,
        samples: list[CachedSample],
        null_text: Tensor,
        latent_mean: Tensor,
        latent_std: Tensor,
        curriculum: Curriculum,
        *,
        patch_size: tuple[int, int, int],
        spatial_factor: int,
        temporal_factor: int,
        seed: int,
        caption_probs: dict[str, float],
        text_dropout: float,
        rank: int = 0,
        world_size: int = 1,
        pack_window: int = 64,
    ) -> None:
        if not samples:
            raise ValueError("the latent cache is empty")
        self.samples, self.null_text, self.curriculum = samples, null_text, curriculum
        self.mean, self.std = latent_mean.view(-1, 1, 1, 1), latent_std.view(-1, 1, 1, 1)
        self.patch, self.spatial, self.temporal = tuple(patch_size), spatial_factor, temporal_factor
        self.seed, self.caption_probs, self.text_dropout = seed, caption_probs, text_dropout
        self.rank, self.world_size = rank, world_size
        self.pack_window = pack_window
        self._plans: dict[int, PackSequence] = {}
        self.resumed_at: DataPosition | None = None
        """Set on a resume (`resume_from`); None: every step of a stage consumed `world` packs."""

    def __len__(self) -> int:
        return 1 << 40

    def _epoch_items(self, stage_index: int, epoch: int) -> list[tuple[int, int]]:
        """(sample id, latent frames) of one pass over the data in one stage, in stream order."""
        stage = self.curriculum.stages[stage_index]
        rng = step_rng(self.seed, stage_index, epoch, 7)
        chosen = [
            (int(i), f)
            for i in rng.permutation(len(self.samples))
            if (f := self._frames_for(int(i), stage, rng))
        ]
        if not chosen:
            raise ValueError(
                f"stage {stage.name!r}: no cached sample fits (area cap {stage.max_area}); cache at a smaller size"
            )
        return chosen

    def _stage_stream(self, stage_index: int) -> Iterator[tuple[int, int]]:
        """The stage's epochs back to back: packs carry samples across epoch boundaries."""
        for epoch in itertools.count():
            yield from self._epoch_items(stage_index, epoch)

    def _packs(self, stage_index: int) -> PackSequence:
        """The stage's packs in order, generated lazily (shared by all ranks: same seed, same plan)."""
        if stage_index not in self._plans:
            stage = self.curriculum.stages[stage_index]
            window = min(self.pack_window, len(self._epoch_items(stage_index, 0)))
            self._plans[stage_index] = PackSequence(
                lambda: stream_packs(
                    self._stage_stream(stage_index),
                    stage.token_budget,
                    length=lambda item: self._tokens(*item),
                    sample_id=lambda item: item[0],
                    window=window,
                )
            )
        return self._plans[stage_index]

    def __getstate__(self) -> dict:
        """Live pack generators do not pickle (spawned workers): workers rebuild them."""
        return {**self.__dict__, "_plans": {}}

    def _frames_for(self, index: int, stage: Stage, rng: np.random.Generator) -> int:
        """Latent frames this sample contributes in `stage` (0 = excluded by the area cap)."""
        _, frames, height, width = self.samples[index].latent.shape
        if height * width * self.spatial**2 > stage.max_area:
            return 0
        native = 1 + (frames - 1) * self.temporal
        if stage.is_image_stage or frames == 1 or rng.random() < stage.image_fraction:
            return 1
        choices = [t for t in stage.clip_lengths(self.temporal) if t <= native]
        pixel_frames = int(rng.choice(choices)) if choices else valid_length(native, self.temporal)
        return 1 + (pixel_frames - 1) // self.temporal

    def _tokens(self, index: int, frames: int) -> int:
        _, _, height, width = self.samples[index].latent.shape
        return (frames // self.patch[0]) * (height // self.patch[1]) * (width // self.patch[2])

    def data_rank(self, stage: Stage) -> tuple[int, int]:
        """(rank, world) among data-parallel groups: a sequence-parallel group shares one batch."""
        degree = stage.sequence_parallel
        return self.rank // degree, max(1, self.world_size // degree)

    def packs_before(self, step: int) -> int:
        """Packs of `step`'s stage that all data ranks consumed before it (the global position).

        From the resume position when `step` lies in its stage (steps since then consumed
        `world` packs each at the current world size), else `world` per step since the stage began.
        """
        stage_index, in_stage = self.curriculum.stage_at(step)
        world = self.data_rank(self.curriculum.stages[stage_index])[1]
        anchor = self.resumed_at
        if anchor is not None and step >= anchor.step:
            anchor_stage, anchor_in_stage = self.curriculum.stage_at(anchor.step)
            if anchor_stage == stage_index:
                return anchor.packs + (in_stage - anchor_in_stage) * world
        return in_stage * world

    def position(self, step: int) -> DataPosition:
        """The resumable data state at global `step`: what a checkpoint written there records."""
        return DataPosition(step, self.packs_before(step))

    def resume_from(self, position: DataPosition) -> None:
        """Continue the global stream at `position`, whatever world size consumed it so far."""
        self.resumed_at = position

    def pack_index(self, step: int) -> tuple[int, int]:
        """(stage index, index in the stage's global pack sequence) this rank trains on at `step`."""
        stage_index, _ = self.curriculum.stage_at(step)
        rank, _ = self.data_rank(self.curriculum.stages[stage_index])
        return stage_index, self.packs_before(step) + rank

    def pack_for(self, step: int) -> tuple[Stage, list[tuple[int, int]]]:
        """The (sample, frames) list this rank trains on at global `step`."""
        stage_index, index = self.pack_index(step)
        return self.curriculum.stages[stage_index], self._packs(stage_index)[index]

    def __getitem__(self, step: int) -> PackedBatch:
        stage, items = self.pack_for(step)
        # Keyed by the pack, not (step, rank): a pack gets the same captions and conditioning
        # frames at any world size, so a resume with other ranks trains on the same batches.
        rng = step_rng(self.seed, *self.pack_index(step), 3)
        latents, texts, cond = [], [], []
        for index, frames in items:
            sample = self.samples[index]
            latent = (
                sample.latent[:, :frames] - self.mean
            ) / self.std  # causal prefix = shorter clip
            latents.append(latent.float())
            texts.append(self._caption(sample, rng))
            cond.append(stage.draw_cond_frames(frames, rng))  # first / first k / last k
        return pack_samples(latents, texts, self.patch, stage.token_budget, cond_frames=cond)

    def _caption(self, sample: CachedSample, rng: np.random.Generator) -> Tensor:
        """Pick a caption form, or the empty caption (text dropout) so CFG has an unconditional model."""
        if rng.random() < self.text_dropout:
            return self.null_text.float()
        kinds = [k for k in self.caption_probs if k in sample.texts] or sorted(sample.texts)
        weights = np.array([self.caption_probs.get(k, 1.0) for k in kinds], dtype=np.float64)
        if weights.sum() <= 0:  # only forms weighted 0 (a clip the captioner skipped): any of them
            weights = np.ones_like(weights)
        kind = kinds[int(rng.choice(len(kinds), p=weights / weights.sum()))]
        return sample.texts[kind].float()


class DiTDataModule(StepDataModule):
    """Cached latents -> curriculum-shaped packed batches for the DiT."""

    def __init__(
        self,
        cache_dir: str,
        curriculum: Curriculum,
        *,
        expected_key: str | None,
        patch_size,
        spatial_factor: int,
        temporal_factor: int,
        seed: int,
        caption_probs: dict[str, float],
        text_dropout: float,
        num_steps: int,
        num_workers: int = 0,
        val_fraction: float = 0.0,
    ) -> None:
        super().__init__(num_workers)
        self.cache_dir, self.expected_key, self.curriculum = cache_dir, expected_key, curriculum
        self.val_fraction = val_fraction
        self.kwargs = dict(
            patch_size=tuple(patch_size),
            spatial_factor=spatial_factor,
            temporal_factor=temporal_factor,
            seed=seed,
            caption_probs=dict(caption_probs),
            text_dropout=text_dropout,
        )
        self.num_steps = num_steps
        self.meta: dict = {}
        self.val_samples: list[CachedSample] = []

    def setup(self, stage: str | None = None) -> None:
        rank, world = self._rank_world()
        samples, null_text, self.meta = load_cache(self.cache_dir, self.expected_key)
        self.val_samples = held_out(samples, self.val_fraction)  # scored by ValidationLoss
        samples = [s for s in samples if not is_held_out(s.key, self.val_fraction)]
        if not samples:
            raise ValueError(
                f"every sample of {self.cache_dir} is held out (dataset.val_fraction="
                f"{self.val_fraction}); lower it or add data"
            )
        # Skips happened when the cache was written (raw shards -> latents); they count here too.
        self.bad_samples = BadSampleCounter.from_counts(
            self.meta.get("skipped", {}), len(samples), f"latent cache {self.cache_dir}"
        )
        mean, std = torch.tensor(self.meta["latent_mean"]), torch.tensor(self.meta["latent_std"])
        self.dataset = PackStepDataset(
            samples,
            null_text,
            mean,
            std,
            self.curriculum,
            rank=rank,
            world_size=world,
            **self.kwargs,
        )
        log.info("DiT data: %d cached samples from %s", len(samples), self.cache_dir)

    def state_dict(self) -> dict[str, Any]:
        """The global stream position at the trainer's step (saved in every checkpoint).

        World-size-free: a run resumed with other ranks (or another strategy) goes on from it.
        """
        if self.dataset is None or self.trainer is None:
            return {}
        position = self.dataset.position(self.trainer.global_step)
        return {**position.to_dict(), "world_size": self._rank_world()[1]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Lightning calls this after `setup` on a resume: continue the stream where it stood."""
        if not state_dict or self.dataset is None:
            return
        position = DataPosition(int(state_dict["step"]), int(state_dict["packs"]))
        self.dataset.resume_from(position)
        saved_world, world = state_dict.get("world_size"), self._rank_world()[1]
        if saved_world is not None and int(saved_world) != world:
            log.warning(
                "DiT data: checkpoint written by %s ranks, resumed by %d: the global stream goes "
                "on at step %d after %d packs of the stage",
                saved_world,
                world,
                position.step,
                position.packs,
            )


class DataLedger(Callback):
    """Appends what each rank trains on to `<directory>/rank{r}.jsonl`, one line per step.

    Why: the evidence that a resume, on any world size or strategy, neither repeats nor skips a
    pack; the elastic-resume tests count samples from it. Each line holds the step, world size,
    stage, global pack index, the pack's sample keys and frames, and the frames of the batch the
    loader really delivered (they must agree). Off by default: `+dit_train.data_ledger=true`.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Before the step: the global step is the one this batch trains."""
        dataset = trainer.datamodule.dataset
        step = trainer.global_step
        stage, index = dataset.pack_index(step)
        items = dataset.pack_for(step)[1]
        record = {
            "step": step,
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "stage": stage,
            "pack": index,
            "samples": [dataset.samples[i].key for i, _ in items],
            "frames": [frames for _, frames in items],
            "batch_frames": [int(shape[1]) for shape in batch.latent_shapes],
        }
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / f"rank{trainer.global_rank}.jsonl", "a") as ledger:
            ledger.write(json.dumps(record) + "\n")
