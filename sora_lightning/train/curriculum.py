"""Declarative curriculum: an ordered list of stages inside one job, no relaunch between them.

The stage of a step is a pure function of the global step, so a resumed run lands in the same
stage at the same step, and the data pipeline and LR schedule can both ask "where am I?".
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from sora_lightning.models.vae import clip_lengths_hint, is_clip_length

COND_MODES = ("first_frame", "first_frames", "last_frames")
"""How a conditioned sample keeps frames clean: image-to-video, extension forwards, extension
backwards (generating what leads up to a clip)."""


@dataclass
class Stage:
    """One phase of training: what the data looks like and how hard we push the optimizer."""

    name: str
    """Shown in logs and checkpoints, e.g. "images-64px"."""
    steps: int
    """Optimizer steps spent in this stage."""
    frames: tuple[int, int] = (1, 1)
    """Inclusive range of pixel frames per sample; (1, 1) means images. Both ends must be clip
    lengths of the VAE (1 + k x its temporal factor), which `Curriculum.check_frames` checks once
    the VAE is known: a stage alone cannot know the factor (2x for the demo VAE, 4x for others)."""
    image_fraction: float = 0.0
    """Share of samples trained as single frames (images) in a video stage."""
    max_area: int = 256 * 256
    """Pixel area cap per sample; native aspect ratio is kept under it."""
    fps: float | None = None
    """Target frame rate for clip selection; None keeps the native rate."""
    token_budget: int = 1024
    """Video tokens per packed sequence (per step and data-parallel group: the N ranks of a
    sequence-parallel group share one sequence and each holds budget / N of it)."""
    lr: float = 1e-4
    """Peak learning rate of the stage."""
    shift: float | None = None
    """Timestep shift; None derives it from each sample's token count (SD3 resolution shift)."""
    image_shift: float | None = None
    """Timestep shift of the single-frame samples of a joint image+video stage; None: as `shift`.
    Why: clips need noisy levels to learn motion (shift 4 in the demo) while images learn shape
    at mid noise, and one stage trains both."""
    sequence_parallel: int = 1
    """Ranks that share one packed sequence (Ulysses all-to-all over heads); 1 disables it. Groups
    of this many consecutive ranks train on the same batch, so the world size must divide by it
    (and the DiT's heads too); data parallelism runs across the world_size / N groups."""
    cond_probability: float = 0.0
    """Chance that a video sample keeps some latent frames clean as conditioning (no loss there)."""
    cond_modes: dict[str, float] = field(
        default_factory=lambda: {"first_frame": 1.0, "first_frames": 1.0, "last_frames": 1.0}
    )
    """Relative weights of the conditioning modes (COND_MODES) when a sample is conditioned:
    the first latent frame, the first k, or the last k (k uniform in 1..F-1)."""

    def __post_init__(self) -> None:
        self.frames = tuple(int(f) for f in self.frames)  # type: ignore[assignment]
        lo, hi = self.frames
        if self.steps < 0:
            raise ValueError(f"stage {self.name!r}: steps must be >= 0, got {self.steps}")
        if not 1 <= lo <= hi:
            raise ValueError(
                f"stage {self.name!r}: frames must satisfy 1 <= min <= max, got {self.frames}"
            )
        if not 0.0 <= self.image_fraction <= 1.0 or not 0.0 <= self.cond_probability <= 1.0:
            raise ValueError(
                f"stage {self.name!r}: image_fraction and cond_probability must be in [0, 1]"
            )
        if self.token_budget < 1 or self.lr <= 0 or self.max_area < 64:
            raise ValueError(f"stage {self.name!r}: token_budget, lr and max_area must be positive")
        if self.sequence_parallel < 1:
            raise ValueError(f"stage {self.name!r}: sequence_parallel must be >= 1")
        for name, value in (("shift", self.shift), ("image_shift", self.image_shift)):
            if value is not None and not value > 0:
                raise ValueError(
                    f"stage {self.name!r}: {name} must be > 0 (or null for the token-count "
                    f"shift), got {value}"
                )
        self._check_cond_modes()

    def _check_cond_modes(self) -> None:
        self.cond_modes = {str(k): float(v) for k, v in dict(self.cond_modes).items()}
        unknown = sorted(set(self.cond_modes) - set(COND_MODES))
        if unknown:
            raise ValueError(f"stage {self.name!r}: cond_modes {unknown} not in {COND_MODES}")
        weights = list(self.cond_modes.values())
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(
                f"stage {self.name!r}: cond_modes weights must be >= 0 with a positive sum, "
                f"got {self.cond_modes}"
            )

    def draw_cond_frames(self, num_frames: int, rng: np.random.Generator) -> int:
        """Conditioning latent frames of one sample: k > 0 the first k, k < 0 the last |k|, 0 none.

        Draws nothing for single frames (an image has nothing to generate around a given frame).
        """
        if num_frames < 2 or not rng.random() < self.cond_probability:
            return 0
        modes = list(self.cond_modes)
        weights = np.array([self.cond_modes[m] for m in modes], dtype=np.float64)
        mode = modes[int(rng.choice(len(modes), p=weights / weights.sum()))]
        if mode == "first_frame":
            return 1
        count = int(rng.integers(1, num_frames))
        return -count if mode == "last_frames" else count

    def check_frames(self, temporal_factor: int) -> None:
        """Raise ValueError, naming this stage, unless both ends of `frames` are clip lengths of a
        VAE with this temporal factor (`models.vae.is_clip_length`)."""
        bad = [f for f in self.frames if not is_clip_length(f, temporal_factor)]
        if bad:
            raise ValueError(
                f"stage {self.name!r}: frames {self.frames} do not fit the VAE, which encodes "
                f"clips of {clip_lengths_hint(temporal_factor)} frames (not {bad})"
            )

    def clip_lengths(self, temporal_factor: int) -> list[int]:
        """Every clip length of this stage's frame range for a VAE of this temporal factor."""
        self.check_frames(temporal_factor)
        low, high = self.frames
        return list(range(low, high + 1, temporal_factor))

    @property
    def is_image_stage(self) -> bool:
        """True when every sample is a single frame."""
        return self.frames == (1, 1)


@dataclass
class Curriculum:
    """Ordered stages plus the schedule shape shared by all of them."""

    stages: list[Stage] = field(default_factory=list)
    warmup_steps: int = 100
    """Linear warmup at the start of the run (and only there)."""
    final_decay: bool = True
    """Cosine-decay the LR to 10% over the last stage."""

    def __post_init__(self) -> None:
        self.stages = [s if isinstance(s, Stage) else Stage(**s) for s in self.stages]
        if not self.stages:
            raise ValueError("curriculum needs at least one stage")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"curriculum stage names must be unique, got {names}")

    def check_frames(self, temporal_factor: int) -> None:
        """Raise ValueError naming the first stage whose frames the VAE cannot encode.

        Call it wherever the curriculum meets its VAE (training a DiT, building its cache): the
        stages themselves only know frames >= 1.
        """
        for stage in self.stages:
            stage.check_frames(temporal_factor)

    @property
    def total_steps(self) -> int:
        """Steps of all stages together: the default trainer.max_steps."""
        return sum(s.steps for s in self.stages)

    def stage_at(self, step: int) -> tuple[int, int]:
        """(stage index, step within stage) of a global step; steps past the end stay in the last."""
        start = 0
        for index, stage in enumerate(self.stages):
            if step < start + stage.steps:
                return index, step - start
            start += stage.steps
        last = len(self.stages) - 1
        return last, step - (start - self.stages[last].steps)

    def stage_start(self, index: int) -> int:
        """Global step at which stage `index` begins."""
        return sum(s.steps for s in self.stages[:index])

    def lr_at(self, step: int) -> float:
        """Stage LR x warmup x (cosine decay in the final stage)."""
        index, in_stage = self.stage_at(step)
        stage = self.stages[index]
        lr = stage.lr * min(1.0, (step + 1) / max(1, self.warmup_steps))
        if self.final_decay and index == len(self.stages) - 1 and stage.steps > 0:
            progress = min(1.0, in_stage / stage.steps)
            lr *= 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))
        return lr

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for hparams and checkpoints (no pickled classes)."""
        return asdict(self)
