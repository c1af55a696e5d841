"""Sampling in latent space: the settings, the guided solve from noise, clean conditioning tokens.

Text states in, normalised latents out: text encoding and the VAE stay with the caller
(`sample.generate` for sora-sample and sora-eval, `train.callbacks` for the previews logged while
training), so every video this project generates comes from the one solve below, configured by
one `SamplingConfig` (the Hydra group conf/sampling/).

Conditioning frames are clean latent tokens re-imposed after every solver step, at the start of
the video or at its end (`cond_position`), with the mask training uses (`flow.frame_cond_mask`).
`sample_windows` generalises this to any set of given frames (`LatentPlan`: both ends when
connecting two clips), to editing (SDEdit: given latents noised to `start`, the schedule truncated
there) and to videos longer than the model was trained on: overlapping windows of the trained
length, each conditioned on the last `window_overlap` latent frames already generated.

Shape legend: C latent channels, F latent frames, h, w latent height and width, N tokens of one
video, P values per token, S text tokens, Dt text width.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
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
    window_frames: int | None = None
    """Pixel frames per window of a long video (1 + k x the temporal factor). None: the longest
    clip the model was trained on, where its export records it; a video of at most this many
    frames is sampled in one pass. Why: attention over more frames than training saw drifts."""
    window_overlap: int = 2
    """Latent frames each window after the first takes, clean, from the one before it. Two carry
    motion (a velocity) across the seam where one carries only a pose."""

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
        if self.window_frames is not None and self.window_frames < 1:
            raise ValueError(f"window_frames must be >= 1 or null, got {self.window_frames}")
        if self.window_overlap < 1:
            raise ValueError(f"window_overlap must be >= 1 latent frame, got {self.window_overlap}")
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
    return encoding.states[0][encoding.mask[0]].float().cpu()


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
    *,
    noise: Tensor | None = None,
    init: Tensor | None = None,
    start: float = 1.0,
) -> Tensor:
    """Integrate the flow from seeded noise to normalised latents [C, F, h, w].

    `noise` [C, F, h, w] replaces the seeded draw. With `init` [C, F, h, w] (editing) the solve
    starts from x_start = (1 - start) init + start noise and walks the schedule below `start`.
    """
    patch = tuple(dit.config.patch_size)
    grid = token_grid(shape[1:], patch)
    noise = seeded_noise(shape, config.seed) if noise is None else noise
    x = patchify(noise, patch)  # [N, P]
    if init is not None:
        x = flow.add_noise(patchify(init, patch), x, torch.full(x.shape[:1], float(start)))
    velocity = guided_velocity_fn(
        dit, grid, states, null_states, clean, mask, config.cfg_scale, config.cfg_interval
    )
    shift = (
        config.shift
        if config.shift is not None
        else float(flow.resolution_shift(torch.tensor(x.shape[0])))
    )
    schedule = flow.truncated_schedule(flow.sampling_schedule(config.steps, shift), start)
    keep = None if mask is None else (lambda x: torch.where(mask.bool().unsqueeze(-1), clean, x))
    tokens = flow.SAMPLERS[config.sampler](
        velocity, keep(x) if keep else x, schedule, 1, on_step=keep
    )
    return unpatchify(tokens, grid, patch, shape[0])  # [C, F, h, w]


def seeded_noise(shape: tuple[int, ...], seed: int) -> Tensor:
    """Standard-normal noise [C, F, h, w] of one video, drawn from its seed alone."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def window_noise(shape: tuple[int, ...], seed: int, index: int) -> Tensor:
    """Noise [C, F, h, w] of the `index`-th window of a video. Window 0 draws what a one-pass
    video of its length draws (so a long video opens like the short one of the same seed); later
    windows draw from (seed, index) (`flow.fixed_noise`)."""
    return seeded_noise(shape, seed) if index == 0 else flow.fixed_noise(shape, seed, index)


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
    (the conditional pass alone outside `cfg_interval`).

    The DiT runs where its weights are (a GPU): its inputs go there and its output comes back,
    so the solver's state, noise and given frames stay on the CPU and a seed gives the same
    noise on any device.
    """
    device = next(dit.parameters()).device
    grids = torch.tensor([grid, grid], dtype=torch.int64, device=device)
    captions = [states.to(device), null_states.to(device)]
    texts = {  # copies -> (caption states [S, Dt], their cu_seqlens), built once per video
        n: (torch.cat(captions[:n]), seqlens_to_cu([c.shape[0] for c in captions[:n]]).to(device))
        for n in (1, 2)
    }
    clean = None if clean is None else clean.to(device)
    mask = None if mask is None else mask.to(device)

    def run(x: Tensor, t: Tensor, copies: int) -> Tensor:
        """The DiT on `copies` packed copies of x, one per caption (conditional first)."""
        num = x.shape[0]
        text, text_cu = texts[copies]
        out = dit(
            x.to(device).repeat(copies, 1),
            seqlens_to_cu([num] * copies).to(device),
            grids[:copies],
            t.to(device).repeat(copies).float(),
            text,
            text_cu,
            cond=None if clean is None else clean.repeat(copies, 1),
            cond_mask=None if mask is None else mask.repeat(copies),
        )
        return out.to(x.device, torch.float32)

    def velocity(x: Tensor, t: Tensor) -> Tensor:
        if not cfg_interval[0] <= float(t[0]) <= cfg_interval[1]:
            return run(x, t, 1)
        out = run(x, t, 2)
        return flow.guided_velocity(out[: x.shape[0]], out[x.shape[0] :], cfg_scale)

    return velocity


@dataclass
class LatentPlan:
    """What a request fixes of a video's normalised latents [C, F, h, w] before sampling.

    Text-to-video fixes nothing; image-to-video and extension fix frames at one end, connecting
    two clips frames at both ends (`known`, kept exactly); editing gives every frame (`init`),
    noised to t = `start` and denoised from there.
    """

    shape: tuple[int, int, int, int]
    """(C, F, h, w) of the video."""
    known: Tensor | None = None
    """[C, F, h, w] latents whose `known_mask` frames are kept exactly (conditioning)."""
    known_mask: Tensor | None = None
    """[F] bool: the latent frames given."""
    init: Tensor | None = None
    """[C, F, h, w] latents to edit (SDEdit), or None."""
    start: float = 1.0
    """Noise level the edit starts from: 0 returns `init`, 1 is text-to-video."""

    def __post_init__(self) -> None:
        if (self.known is None) != (self.known_mask is None):
            raise ValueError("known and known_mask must be given together")
        if not 0.0 <= self.start <= 1.0:
            raise ValueError(f"start must be in [0, 1], got {self.start}")
        if self.known_mask is not None and bool(self.known_mask.all()):
            raise ValueError("every latent frame is given: nothing is left to generate")

    @property
    def num_given(self) -> int:
        """Latent frames kept as given."""
        return 0 if self.known_mask is None else int(self.known_mask.sum())


def window_latents(
    config: SamplingConfig, trained_frames: int | None, temporal_factor: int
) -> int | None:
    """Latent frames per window: from `config.window_frames`, else the trained clip length
    (pixel frames); None when neither is known (one pass). Refuses windows with no new frame."""
    frames = config.window_frames if config.window_frames is not None else trained_frames
    if frames is None:
        return None
    if not is_clip_length(frames, temporal_factor):
        raise ValueError(
            f"sampling.window_frames must be {clip_lengths_hint(temporal_factor)} for this VAE, "
            f"got {frames}"
        )
    window = 1 + (frames - 1) // temporal_factor
    if window <= config.window_overlap:
        raise ValueError(
            f"windows of {frames} frames ({window} latent) leave no new frame after "
            f"sampling.window_overlap={config.window_overlap} latent frames; lower the overlap "
            f"or set sampling.window_frames to at least {1 + temporal_factor * config.window_overlap}"
        )
    return window


def window_plan(known: Sequence[bool], window: int | None, overlap: int) -> list[tuple[int, int]]:
    """[begin, end) latent-frame ranges solved in turn, left to right, until every frame is known.

    Each window opens `overlap` known frames before its first unknown one (the seam), is as long
    as `window` (the last one ends flush with the video and so may hold more known frames) and
    keeps every known frame inside it clean. A video of at most `window` frames, or window=None,
    is one window: the whole video.
    """
    done = list(known)
    num_frames = len(done)
    if window is None or window >= num_frames:
        return [] if all(done) else [(0, num_frames)]
    plan = []
    while not all(done):
        first = done.index(False)
        begin = max(0, min(first - overlap, num_frames - window))
        plan.append((begin, begin + window))
        done[begin : begin + window] = [True] * window
    return plan


def frame_tokens(latent: Tensor, frame_mask: Tensor, patch: PatchSize) -> tuple[Tensor, Tensor]:
    """Clean tokens [N, P] holding the `frame_mask` [F] frames of `latent` [C, F, h, w] (zeros
    elsewhere) and the token mask [N]: `conditioning_tokens` for any set of frames."""
    frames = frame_mask.bool().view(1, -1, 1, 1)
    clean = patchify(torch.where(frames, latent, torch.zeros_like(latent)), patch)  # [N, P]
    mask = patchify(frames.expand(1, *latent.shape[1:]).float().contiguous(), patch)[:, 0]
    return clean, (mask > 0).float()


def sample_windows(
    dit: DiT,
    plan: LatentPlan,
    config: SamplingConfig,
    states: Tensor,
    null_states: Tensor,
    *,
    window: int | None = None,
    image_states: Tensor | None = None,
) -> tuple[Tensor, list[tuple[int, int]]]:
    """Normalised latents [C, F, h, w] of one video and the windows that made them.

    A video of at most `window` latent frames is one solve, the same as `sample_latents`; a
    longer one is solved window by window (`window_plan`), each with its own noise
    (`window_noise`), holding the frames already generated clean. Given frames come out exactly
    as given.
    """
    shape = plan.shape
    latent = torch.zeros(shape) if plan.known is None else plan.known.clone().float()
    done = torch.zeros(shape[1], dtype=torch.bool) if plan.known_mask is None else plan.known_mask
    done = done.clone().bool()
    if config.image_first and not done.any() and plan.init is None and shape[1] > 1:
        if image_states is None:
            raise ValueError("image_first needs image_states: the image form of the prompt")
        latent[:, :1] = solve(dit, (shape[0], 1, *shape[2:]), config, image_states, null_states)
        done[0] = True
    patch = tuple(dit.config.patch_size)
    windows = window_plan(done.tolist(), window, config.window_overlap)
    for index, (begin, end) in enumerate(windows):
        given = done[begin:end]
        part = (shape[0], end - begin, *shape[2:])
        clean, mask = (
            frame_tokens(latent[:, begin:end], given, patch) if given.any() else (None, None)
        )
        latent[:, begin:end] = solve(
            dit,
            part,
            config,
            states,
            null_states,
            clean,
            mask,
            noise=window_noise(part, config.seed, index),
            init=None if plan.init is None else plan.init[:, begin:end],
            start=plan.start,
        )
        done[begin:end] = True
    return latent, windows
