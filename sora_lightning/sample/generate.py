"""Generation: prompt -> (expanded prompt) -> text states -> latents by the sampler with CFG -> frames.

One `VideoGenerator` serves text-to-video, image-to-video (first frame given) and video extension:
given frames are VAE-encoded and held clean as conditioning tokens, at the start of the new video
(`cond_position="start"`: extend a clip forwards) or at its end (`"end"`: generate what leads up
to a clip). Training conditions the same ways (`Stage.cond_modes`).

Which pixel frames the conditioned latent frames hold (causal VAE with temporal factor 4: latent
frame 0 encodes pixel frame 0 alone, latent j >= 1 encodes pixel frames 4j-3 .. 4j):
- start: a clip of 1 + 4k frames gives latents 0..k; the first min(k+1, F-1) are kept, so the new
  video's first 1 + 4(n-1) pixel frames are the clip's first ones (n conditioned latent frames);
  an image is latent 0, the first pixel frame.
- end: the clip is cut to its last 1 + 4k frames and encoded; its latent 0 (one frame, encoded
  without context) is dropped, and its last n = min(k, F-1) latents 1..k become the new video's
  last n latent frames, i.e. its last 4n pixel frames are the clip's last 4n. An image (or a clip
  shorter than 5 frames) is held still for 5 frames first, so it fills the last 4 pixel frames.
  The clip's latents see only the clip as causal context, while training latents of trailing
  frames saw the whole video before them: a small mismatch that leading frames do not have.
Shape legend: T frames, H, W pixels, C latent channels, F latent frames, N tokens, P patch values.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import av
import numpy as np
import torch
from torch import Tensor

from sora_lightning.data.clips import to_model_range, to_uint8, valid_length
from sora_lightning.data.packing import frame_cond_mask
from sora_lightning.data.world import expand_prompt
from sora_lightning.diffusion import flow
from sora_lightning.models.dit import DiT, DiTConfig
from sora_lightning.models.patches import patchify, seqlens_to_cu, token_grid, unpatchify
from sora_lightning.models.text import TextEncoder, TextEncoderConfig
from sora_lightning.models.vae import VideoVAE
from sora_lightning.train.weights import load_dit, load_vae, torch_load_safe

GENERATOR_NAME = "sora_lightning"
COND_POSITIONS = ("start", "end")


@dataclass
class SampleOptions:
    """What to generate and how hard to think about it."""

    frames: int = 17
    height: int = 48
    width: int = 64
    steps: int = 25
    cfg_scale: float = 5.0
    cfg_interval: tuple[float, float] = (0.0, 1.0)
    """Noise levels t (1 = pure noise) where guidance applies; outside it the conditional
    velocity is used alone (guidance in a limited interval, Kynkaanniemi et al. 2024). Why: at
    high noise the conditional prediction is the caption's mean image, where an object whose
    place is not yet decided averages away. Guidance there amplifies the global difference to
    the unconditional mean (a black background pushed past black), which can erase the object
    before it forms. Default [0, 1]: guidance at every step."""
    sampler: str = "euler"
    shift: float | None = None
    """Fixed sampling shift; None derives it from the token count like training."""
    seed: int = 0
    fps: int = 8
    cond_position: str = "start"
    """Where given frames go: "start" (image-to-video, extension) or "end" (lead-up to a clip)."""
    image_first: bool = False
    """Factorised text-to-video (Emu Video): sample the first frame as an image from the image
    form of the prompt, then the video conditioned on it, as in image-to-video. Only when no
    frames are given."""

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], seed: int) -> SampleOptions:
        """The options a Hydra config names (sample.yaml, eval.yaml); missing keys keep defaults.

        One reader for every entry point, so sampling and evaluation cannot drift apart.
        """
        given = {f.name: cfg[f.name] for f in fields(cls) if f.name != "seed" and f.name in cfg}
        return cls(**given, seed=seed)

    def __post_init__(self) -> None:
        if self.cond_position not in COND_POSITIONS:
            raise ValueError(
                f"cond_position must be one of {COND_POSITIONS}, got {self.cond_position!r}"
            )
        if self.frames < 1 or (self.frames - 1) % 4:
            raise ValueError(f"frames must be 1 + 4k (1, 5, 9, 17, 33, ...), got {self.frames}")
        if self.sampler not in flow.SAMPLERS:
            raise ValueError(
                f"sampler must be one of {sorted(flow.SAMPLERS)}, got {self.sampler!r}"
            )
        if self.steps < 1 or self.height < 1 or self.width < 1:
            raise ValueError("steps, height and width must be positive")
        self.cfg_interval = tuple(float(t) for t in self.cfg_interval)
        if (
            len(self.cfg_interval) != 2
            or not 0.0 <= self.cfg_interval[0] <= self.cfg_interval[1] <= 1.0
        ):
            raise ValueError(
                f"cfg_interval must be [low, high] with 0 <= low <= high <= 1, got "
                f"{list(self.cfg_interval)}"
            )


@dataclass
class GeneratedVideo:
    """Frames plus everything needed to reproduce them."""

    frames: np.ndarray  # uint8 [T, H, W, 3]
    prompt: str
    expanded_prompt: str
    seed: int
    model_hash: str
    options: dict[str, Any] = field(default_factory=dict)


class VideoGenerator:
    """Holds the three networks and the latent normalisation of one trained model."""

    def __init__(
        self,
        dit: DiT,
        vae: VideoVAE,
        text_encoder: TextEncoder,
        latent_mean: Tensor,
        latent_std: Tensor,
        *,
        expand_prompts: bool = True,
        model_hash: str = "",
    ) -> None:
        self.dit, self.vae, self.text_encoder = dit.eval(), vae.eval(), text_encoder
        self.mean, self.std = (
            latent_mean.view(-1, 1, 1, 1).float(),
            latent_std.view(-1, 1, 1, 1).float(),
        )
        self.expand_prompts, self.model_hash = expand_prompts, model_hash
        self.patch = tuple(dit.config.patch_size)
        self.max_text_tokens = text_encoder.config.max_length
        self._null_states: Tensor | None = None

    def encode_prompt(self, prompt: str, num_frames: int | None = None) -> tuple[Tensor, str]:
        """Expand a short prompt to the detailed caption form, then encode (real tokens only).

        num_frames=1 expands to the image form ("An image of ..."); None to the video form.
        """
        if not self.expand_prompts:
            expanded = prompt
        elif num_frames is None:
            expanded = expand_prompt(prompt)
        else:
            expanded = expand_prompt(prompt, num_frames=num_frames)
        encoding = self.text_encoder.encode([expanded])
        if encoding.num_truncated:
            raise ValueError(
                f"prompt too long: it exceeds the text encoder's {self.max_text_tokens} tokens after expansion; shorten it"
            )
        return encoding.states[0][encoding.mask[0]].float(), expanded

    def latent_shape(self, options: SampleOptions) -> tuple[int, int, int, int]:
        """(C, F, h, w) for a requested clip; refuses sizes the model cannot tile."""
        spatial, temporal = self.vae.config.spatial_factor, self.vae.config.temporal_factor
        step = spatial * self.patch[1]
        if options.height % step or options.width % step:
            raise ValueError(
                f"height and width must be multiples of {step} (VAE stride x patch), got {options.height}x{options.width}"
            )
        return (
            self.dit.config.in_channels,
            1 + (options.frames - 1) // temporal,
            options.height // spatial,
            options.width // spatial,
        )

    @torch.no_grad()
    def encode_frames(self, frames: np.ndarray) -> Tensor:
        """uint8 [T, H, W, 3] -> normalised latents [C, F, h, w] for conditioning."""
        return (self._posterior_mean(frames) - self.mean) / self.std

    def _posterior_mean(self, frames: np.ndarray) -> Tensor:
        """uint8 [T, H, W, 3] -> the VAE's posterior mean [C, F, h, w] (not normalised)."""
        return self.vae.encode(to_model_range(frames).unsqueeze(0)).mode()[0]

    def _decode(self, latent: Tensor) -> np.ndarray:
        """Unnormalised latents [C, F, h, w] -> uint8 frames [T, H, W, 3]."""
        return to_uint8(self.vae.decode(latent.unsqueeze(0))[0])

    @torch.no_grad()
    def reconstruct(self, frames: np.ndarray) -> np.ndarray:
        """uint8 [T, H, W, 3] through the VAE (posterior mean) and back: what it can represent."""
        return self._decode(self._posterior_mean(frames))

    @torch.no_grad()
    def generate(
        self, prompt: str, options: SampleOptions, cond_frames: np.ndarray | None = None
    ) -> GeneratedVideo:
        """Sample one video; `cond_frames` (an image or a clip) is kept as given, at the start or
        the end of the video (`options.cond_position`)."""
        latent, expanded = self.generate_latents(prompt, options, cond_frames)
        frames = self._decode(latent * self.std + self.mean)
        return GeneratedVideo(
            frames, prompt, expanded, options.seed, self.model_hash, vars(options).copy()
        )

    @torch.no_grad()
    def generate_latents(
        self, prompt: str, options: SampleOptions, cond_frames: np.ndarray | None = None
    ) -> tuple[Tensor, str]:
        """Normalised latents [C, F, h, w] and the expanded prompt; conditioned latent frames
        equal the encoded given frames exactly (re-imposed after every solver step)."""
        states, expanded = self.encode_prompt(prompt)
        shape = self.latent_shape(options)
        if options.image_first and cond_frames is None and shape[1] > 1:
            image_states, _ = self.encode_prompt(prompt, num_frames=1)
            first = self._solve(image_states, (*shape[:1], 1, *shape[2:]), options, None, None)
            clean, mask = self._clean_tokens(first, shape, num_cond=1, at_end=False)
        else:
            clean, mask = self._conditioning(cond_frames, shape, options.cond_position)
        return self._solve(states, shape, options, clean, mask), expanded

    def _solve(
        self,
        states: Tensor,
        shape: tuple[int, int, int, int],
        options: SampleOptions,
        clean: Tensor | None,
        mask: Tensor | None,
    ) -> Tensor:
        """Integrate the flow from seeded noise to normalised latents [C, F, h, w]."""
        grid = token_grid(shape[1:], self.patch)
        generator = torch.Generator().manual_seed(options.seed)
        noise = patchify(torch.randn(shape, generator=generator), self.patch)  # [N, P]
        velocity = self._velocity_fn(
            grid, states, self._null_text(), clean, mask, options.cfg_scale, options.cfg_interval
        )
        shift = (
            options.shift
            if options.shift is not None
            else float(flow.resolution_shift(torch.tensor(noise.shape[0])))
        )
        schedule = flow.sampling_schedule(options.steps, shift)
        keep = (
            None if mask is None else (lambda x: torch.where(mask.bool().unsqueeze(-1), clean, x))
        )
        tokens = flow.SAMPLERS[options.sampler](
            velocity, keep(noise) if keep else noise, schedule, 1, on_step=keep
        )
        return unpatchify(tokens, grid, self.patch, shape[0])  # [C, F, h, w]

    def _null_text(self) -> Tensor:
        """States of the empty caption (the unconditional branch of CFG), encoded once."""
        if self._null_states is None:
            encoding = self.text_encoder.encode([""])
            self._null_states = encoding.states[0][encoding.mask[0]].float()
        return self._null_states

    def conditioning_latents(self, frames: np.ndarray, position: str = "start") -> Tensor:
        """Normalised latents [C, Fc, h, w] that conditioning at `position` may use (module doc)."""
        if frames.ndim == 3:
            frames = frames[None]  # an image: [1, H, W, 3]
        if position == "start":
            return self.encode_frames(frames)
        temporal = self.vae.config.temporal_factor
        if len(frames) < 1 + temporal:  # hold the first frame so one full latent frame exists
            still = np.repeat(frames[:1], 1 + temporal - len(frames), axis=0)
            frames = np.concatenate([still, frames])
        frames = frames[len(frames) - valid_length(len(frames), temporal) :]
        return self.encode_frames(frames)[:, 1:]  # latent 0 saw one frame without context

    def _conditioning(
        self, frames: np.ndarray | None, shape: tuple[int, ...], position: str = "start"
    ) -> tuple[Tensor | None, Tensor | None]:
        """Clean latent tokens and their mask for the given frames (None for text-to-video)."""
        if frames is None:
            return None, None
        latent = self.conditioning_latents(frames, position)
        if latent.shape[2:] != shape[2:]:
            raise ValueError(
                f"conditioning frames are {frames.shape[-2]}x{frames.shape[-3]}; they must match "
                "the requested size"
            )
        num_cond = min(latent.shape[1], shape[1] - 1)  # at least one frame is generated
        return self._clean_tokens(latent, shape, num_cond, at_end=position == "end")

    def _clean_tokens(
        self, latent: Tensor, shape: tuple[int, ...], num_cond: int, at_end: bool
    ) -> tuple[Tensor, Tensor]:
        """Tokens holding `num_cond` frames of `latent` [C, Fc, h, w] at the start or end of a
        `shape` latent, and the mask of the tokens that stay clean (as in training)."""
        num_frames = shape[1]
        frame_mask = frame_cond_mask(num_frames, num_cond, at_end)  # [F]
        full = torch.zeros(shape)
        if at_end:
            full[:, num_frames - num_cond :] = latent[:, latent.shape[1] - num_cond :]
        else:
            full[:, :num_cond] = latent[:, :num_cond]
        clean = patchify(full, self.patch)  # [N, P]
        mask = patchify(
            frame_mask.view(1, -1, 1, 1).expand(1, *shape[1:]).contiguous(), self.patch
        )[:, 0]
        return clean, (mask > 0).float()

    def _velocity_fn(
        self,
        grid,
        states: Tensor,
        null_states: Tensor,
        clean: Tensor | None,
        mask: Tensor | None,
        cfg_scale: float,
        cfg_interval: tuple[float, float] = (0.0, 1.0),
    ):
        """Closure running conditional and unconditional passes as one packed batch of two
        (the conditional pass alone outside `cfg_interval`)."""
        grids = torch.tensor([grid, grid], dtype=torch.int64)
        captions = [states, null_states]
        texts = {  # copies -> (caption states, their cu_seqlens), built once per video
            n: (torch.cat(captions[:n]), seqlens_to_cu([c.shape[0] for c in captions[:n]]))
            for n in (1, 2)
        }

        def run(x: Tensor, t: Tensor, copies: int) -> Tensor:
            """The DiT on `copies` packed copies of x, one per caption (conditional first)."""
            num = x.shape[0]
            text, text_cu = texts[copies]
            return self.dit(
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


def write_mp4(path: str | Path, video: GeneratedVideo, fps: int) -> Path:
    """H.264 mp4 carrying prompt, expanded prompt, seed, model hash and generator name as metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = video.frames
    with av.open(str(path), "w") as container:
        container.metadata.update(
            {
                "title": video.prompt,
                "comment": json.dumps(
                    {
                        "prompt": video.prompt,
                        "expanded_prompt": video.expanded_prompt,
                        "seed": video.seed,
                        "model_hash": video.model_hash,
                        "generator": GENERATOR_NAME,
                        "options": video.options,
                    }
                ),
            }
        )
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"crf": "12"}
        for frame in frames:
            container.mux(
                stream.encode(
                    av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
                )
            )
        container.mux(stream.encode())
    return path


def _text_encoder(config: dict[str, Any]) -> TextEncoder:
    return TextEncoder(TextEncoderConfig(**config))


def load_generator(
    path: str | Path, *, use_ema: bool = True, expand_prompts: bool = True
) -> VideoGenerator:
    """From an export folder (dit.safetensors + vae.safetensors) or a DiT training checkpoint (.ckpt)."""
    path = Path(path)
    if path.is_dir():
        dit, saved = load_dit(path)
        meta = saved["meta"]
        vae_dir = (
            Path(meta["vae_dir"]) if Path(meta["vae_dir"]).is_absolute() else path / meta["vae_dir"]
        )
        vae = load_vae(vae_dir)
        model_hash = hashlib.sha256((path / "dit.safetensors").read_bytes()).hexdigest()[:16]
    elif path.is_file():
        checkpoint = torch_load_safe(path)
        hparams = checkpoint["hyper_parameters"]
        meta = hparams["meta"]
        dit = DiT(
            DiTConfig(
                **{k: tuple(v) if isinstance(v, list) else v for k, v in hparams["dit"].items()}
            )
        )
        prefix = "ema." if use_ema else "dit."
        dit.load_state_dict(
            {
                k[len(prefix) :]: v
                for k, v in checkpoint["state_dict"].items()
                if k.startswith(prefix)
            }
        )
        vae = load_vae(meta["vae_dir"])
        model_hash = f"{path.name}@{checkpoint.get('global_step', 0)}"
    else:
        raise FileNotFoundError(
            f"{path} is neither an export folder nor a checkpoint file; pass ckpt=RUN/export or a .ckpt"
        )
    return VideoGenerator(
        dit.eval(),
        vae,
        _text_encoder(meta["text"]),
        torch.tensor(meta["latent_mean"]),
        torch.tensor(meta["latent_std"]),
        expand_prompts=expand_prompts,
        model_hash=model_hash,
    )
