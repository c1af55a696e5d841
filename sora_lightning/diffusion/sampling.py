"""Sampling in latent space: the settings, the guided solve from noise, clean conditioning tokens.

Text states in, normalised latents out: text encoding and the VAE stay with the caller
(`sample.generate` for sora-sample and sora-eval, `train.callbacks` for the previews logged while
training), so every video this project generates comes from the one solve below, configured by
one `SamplingConfig` (the Hydra group conf/sampling/).

Conditioning frames are clean latent tokens re-imposed after every solver step, at the start of
the video or at its end (`cond_position`), with the mask training uses (`flow.frame_cond_mask`).

Shape legend: C latent channels, F latent frames, h, w latent height and width, N tokens of one
video, P values per token, S text tokens, Dt text width.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import Tensor

from sora_lightning.diffusion import flow
from sora_lightning.models.dit import DiT
from sora_lightning.models.patches import PatchSize, patchify, seqlens_to_cu, token_grid, unpatchify
from sora_lightning.models.text import TextEncoder
from sora_lightning.models.vae import clip_lengths_hint, is_clip_length

COND_POSITIONS = ("start", "end")


@dataclass
class SamplingConfig:
    """What to generate and how hard to think about it (conf/sampling/*.yaml)."""

    frames: int = 17
    """Pixel frames: 1 + k x the VAE's temporal factor (1 is an image; `latent_shape` checks)."""
    height: int = 48
    width: int = 64
    steps: int = 20
    """Solver steps from noise to data."""
    cfg_scale: float = 5.0
    """Classifier-free guidance scale; 1 is the conditional prediction alone."""
    cfg_interval: tuple[float, float] = (0.0, 1.0)
    """Noise levels t (1 = pure noise) where guidance applies; outside it the conditional
    velocity is used alone (guidance in a limited interval, Kynkaanniemi et al. 2024). Why: at
    high noise the conditional prediction is the caption's mean image, where an object whose
    place is not yet decided averages away. Guidance there amplifies the global difference to
    the unconditional mean (a black background pushed past black), which can erase the object
    before it forms. Default [0, 1]: guidance at every step."""
    sampler: str = "euler"
    """A key of `flow.SAMPLERS`: euler or heun."""
    shift: float | None = None
    """Fixed sampling shift; None derives it from the token count like training."""
    seed: int = 0
    """Noise seed of each prompt; training previews use seed + the prompt's index, and sora-eval's
    world benchmark seed + k for its k-th seed of a prompt."""
    fps: int = 8
    """Frame rate written into mp4s and preview GIFs."""
    cond_position: str = "start"
    """Where given frames go: "start" (image-to-video, extension) or "end" (lead-up to a clip)."""
    image_first: bool = False
    """Factorised text-to-video (Emu Video): sample the first frame as an image from the image
    form of the prompt, then the video conditioned on it, as in image-to-video. Only when no
    frames are given."""

    @classmethod
    def from_config(cls, node: Mapping[str, Any]) -> SamplingConfig:
        """The `sampling` node of a composed config; a key that is not a field is refused.

        One reader for every entry point, so previews, sampling and evaluation cannot drift apart.
        """
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(node) - names)
        if unknown:
            raise ValueError(f"unknown sampling keys {unknown}; known: {sorted(names)}")
        return cls(**{key: node[key] for key in node})

    def as_overrides(self, prefix: str = "sampling") -> list[str]:
        """`prefix.key=value` for every field, in Hydra's override grammar (values as JSON), so
        another process composes the same config: the pipeline's samples and eval steps."""
        return [
            f"{prefix}.{key}={json.dumps(value, separators=(',', ':'))}"
            for key, value in asdict(self).items()
        ]

    def __post_init__(self) -> None:
        if self.cond_position not in COND_POSITIONS:
            raise ValueError(
                f"cond_position must be one of {COND_POSITIONS}, got {self.cond_position!r}"
            )
        if self.frames < 1:
            raise ValueError(f"frames must be >= 1, got {self.frames}")
        if self.sampler not in flow.SAMPLERS:
            raise ValueError(
                f"sampler must be one of {sorted(flow.SAMPLERS)}, got {self.sampler!r}"
            )
        if self.steps < 1 or self.height < 1 or self.width < 1 or self.fps < 1:
            raise ValueError("steps, height, width and fps must be positive")
        self.cfg_interval = tuple(float(t) for t in self.cfg_interval)
        if (
            len(self.cfg_interval) != 2
            or not 0.0 <= self.cfg_interval[0] <= self.cfg_interval[1] <= 1.0
        ):
            raise ValueError(
                f"cfg_interval must be [low, high] with 0 <= low <= high <= 1, got "
                f"{list(self.cfg_interval)}"
            )


def text_states(text_encoder: TextEncoder, caption: str) -> Tensor:
    """[S, Dt] float states of the caption's real tokens; refuses a caption the encoder would cut."""
    encoding = text_encoder.encode([caption])
    if encoding.num_truncated:
        raise ValueError(
            f"prompt too long: it exceeds the text encoder's {text_encoder.config.max_length} "
            "tokens after expansion; shorten it"
        )
    return encoding.states[0][encoding.mask[0]].float()


def latent_shape(
    config: SamplingConfig,
    *,
    channels: int,
    spatial_factor: int,
    temporal_factor: int,
    patch: PatchSize,
) -> tuple[int, int, int, int]:
    """(C, F, h, w) of the requested clip; refuses sizes the VAE and patch cannot tile."""
    if not is_clip_length(config.frames, temporal_factor):
        raise ValueError(
            f"frames must be {clip_lengths_hint(temporal_factor)} for this VAE, got {config.frames}"
        )
    step = spatial_factor * patch[1]
    if config.height % step or config.width % step:
        raise ValueError(
            f"height and width must be multiples of {step} (VAE stride x patch), got "
            f"{config.height}x{config.width}"
        )
    return (
        channels,
        1 + (config.frames - 1) // temporal_factor,
        config.height // spatial_factor,
        config.width // spatial_factor,
    )


def sample_latents(
    dit: DiT,
    shape: tuple[int, int, int, int],
    config: SamplingConfig,
    states: Tensor,
    null_states: Tensor,
    *,
    image_states: Tensor | None = None,
    clean: Tensor | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """Normalised latents [C, F, h, w] of one video: text-to-video, or conditioned on `clean`
    tokens where `mask` is 1 (kept exactly). With `config.image_first` and no conditioning, the
    first frame is sampled from `image_states` (the prompt's image form) and then held clean."""
    if config.image_first and clean is None and shape[1] > 1:
        if image_states is None:
            raise ValueError("image_first needs image_states: the image form of the prompt")
        first = solve(dit, (shape[0], 1, *shape[2:]), config, image_states, null_states)
        patch = tuple(dit.config.patch_size)
        clean, mask = conditioning_tokens(first, shape, patch, num_cond=1, at_end=False)
    return solve(dit, shape, config, states, null_states, clean, mask)


def solve(
    dit: DiT,
    shape: tuple[int, int, int, int],
    config: SamplingConfig,
    states: Tensor,
    null_states: Tensor,
    clean: Tensor | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """Integrate the flow from seeded noise to normalised latents [C, F, h, w]."""
    patch = tuple(dit.config.patch_size)
    grid = token_grid(shape[1:], patch)
    generator = torch.Generator().manual_seed(config.seed)
    noise = patchify(torch.randn(shape, generator=generator), patch)  # [N, P]
    velocity = guided_velocity_fn(
        dit, grid, states, null_states, clean, mask, config.cfg_scale, config.cfg_interval
    )
    shift = (
        config.shift
        if config.shift is not None
        else float(flow.resolution_shift(torch.tensor(noise.shape[0])))
    )
    schedule = flow.sampling_schedule(config.steps, shift)
    keep = None if mask is None else (lambda x: torch.where(mask.bool().unsqueeze(-1), clean, x))
    tokens = flow.SAMPLERS[config.sampler](
        velocity, keep(noise) if keep else noise, schedule, 1, on_step=keep
    )
    return unpatchify(tokens, grid, patch, shape[0])  # [C, F, h, w]


def conditioning_tokens(
    latent: Tensor, shape: tuple[int, ...], patch: PatchSize, num_cond: int, at_end: bool
) -> tuple[Tensor, Tensor]:
    """Tokens [N, P] holding `num_cond` frames of `latent` [C, Fc, h, w] at the start or end of a
    `shape` latent, and the mask [N] of the tokens that stay clean (as in training)."""
    num_frames = shape[1]
    frame_mask = flow.frame_cond_mask(num_frames, num_cond, at_end)  # [F]
    full = torch.zeros(shape)
    if at_end:
        full[:, num_frames - num_cond :] = latent[:, latent.shape[1] - num_cond :]
    else:
        full[:, :num_cond] = latent[:, :num_cond]
    clean = patchify(full, patch)  # [N, P]
    mask = patchify(frame_mask.view(1, -1, 1, 1).expand(1, *shape[1:]).contiguous(), patch)[:, 0]
    return clean, (mask > 0).float()


def guided_velocity_fn(
    dit: DiT,
    grid: tuple[int, int, int],
    states: Tensor,
    null_states: Tensor,
    clean: Tensor | None,
    mask: Tensor | None,
    cfg_scale: float,
    cfg_interval: tuple[float, float] = (0.0, 1.0),
) -> flow.Velocity:
    """Closure running conditional and unconditional passes as one packed batch of two
    (the conditional pass alone outside `cfg_interval`)."""
    grids = torch.tensor([grid, grid], dtype=torch.int64)
    captions = [states, null_states]
    texts = {  # copies -> (caption states [S, Dt], their cu_seqlens), built once per video
        n: (torch.cat(captions[:n]), seqlens_to_cu([c.shape[0] for c in captions[:n]]))
        for n in (1, 2)
    }

    def run(x: Tensor, t: Tensor, copies: int) -> Tensor:
        """The DiT on `copies` packed copies of x, one per caption (conditional first)."""
        num = x.shape[0]
        text, text_cu = texts[copies]
        return dit(
            x.repeat(copies, 1),
            seqlens_to_cu([num] * copies),
            grids[:copies],
            t.repeat(copies).float(),
            text,
            text_cu,
            cond=None if clean is None else clean.repeat(copies, 1),
            cond_mask=None if mask is None else mask.repeat(copies),
        )

    def velocity(x: Tensor, t: Tensor) -> Tensor:
        if not cfg_interval[0] <= float(t[0]) <= cfg_interval[1]:
            return run(x, t, 1)
        out = run(x, t, 2)
        return flow.guided_velocity(out[: x.shape[0]], out[x.shape[0] :], cfg_scale)

    return velocity
