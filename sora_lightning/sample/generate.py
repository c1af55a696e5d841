"""Generation: prompt -> (expanded prompt) -> text states -> latents by the sampler with CFG -> frames.

One `VideoGenerator` serves text-to-video, image-to-video (first frame given) and video extension:
given frames are VAE-encoded and held clean as conditioning tokens, at the start of the new video
(`cond_position="start"`: extend a clip forwards) or at its end (`"end"`: generate what leads up
to a clip). Training conditions the same ways (`Stage.cond_modes`). The solve in latent space,
with its settings (`SamplingConfig`), is `diffusion.sampling`, shared with training previews;
this module adds the text encoder, the VAE, loading weights and writing mp4s.

Which pixel frames the conditioned latent frames hold (causal VAE with temporal factor f, taken
from the VAE's config: latent frame 0 encodes pixel frame 0 alone, latent j >= 1 encodes pixel
frames f(j-1)+1 .. fj):
- start: a clip of 1 + fk frames gives latents 0..k; the first min(k+1, F-1) are kept, so the new
  video's first 1 + f(n-1) pixel frames are the clip's first ones (n conditioned latent frames);
  an image is latent 0, the first pixel frame.
- end: the clip is cut to its last 1 + fk frames and encoded; its latent 0 (one frame, encoded
  without context) is dropped, and its last n = min(k, F-1) latents 1..k become the new video's
  last n latent frames, i.e. its last fn pixel frames are the clip's last fn. An image (or a clip
  shorter than 1 + f frames) is held still for 1 + f frames first, so it fills the last f frames.
  The clip's latents see only the clip as causal context, while training latents of trailing
  frames saw the whole video before them: a small mismatch that leading frames do not have.
Shape legend: T frames, H, W pixels, C latent channels, F latent frames, N tokens, P patch values.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import av
import numpy as np
import torch
from torch import Tensor

from sora_lightning.data.clips import to_model_range, to_uint8, valid_length
from sora_lightning.data.world import expand_prompt
from sora_lightning.diffusion.sampling import (
    SamplingConfig,
    conditioning_tokens,
    latent_shape,
    sample_latents,
    text_states,
)
from sora_lightning.models.dit import DiT, DiTConfig
from sora_lightning.models.text import TextEncoder, TextEncoderConfig
from sora_lightning.models.vae import VideoVAE
from sora_lightning.train.weights import load_dit, load_vae, torch_load_safe

GENERATOR_NAME = "sora_lightning"


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
        return text_states(self.text_encoder, expanded), expanded

    def latent_shape(self, config: SamplingConfig) -> tuple[int, int, int, int]:
        """(C, F, h, w) for a requested clip; refuses sizes the model cannot tile."""
        return latent_shape(
            config,
            channels=self.dit.config.in_channels,
            spatial_factor=self.vae.config.spatial_factor,
            temporal_factor=self.vae.config.temporal_factor,
            patch=self.patch,
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
        self, prompt: str, config: SamplingConfig, cond_frames: np.ndarray | None = None
    ) -> GeneratedVideo:
        """Sample one video; `cond_frames` (an image or a clip) is kept as given, at the start or
        the end of the video (`config.cond_position`)."""
        latent, expanded = self.generate_latents(prompt, config, cond_frames)
        frames = self._decode(latent * self.std + self.mean)
        return GeneratedVideo(
            frames, prompt, expanded, config.seed, self.model_hash, asdict(config)
        )

    @torch.no_grad()
    def generate_latents(
        self, prompt: str, config: SamplingConfig, cond_frames: np.ndarray | None = None
    ) -> tuple[Tensor, str]:
        """Normalised latents [C, F, h, w] and the expanded prompt; conditioned latent frames
        equal the encoded given frames exactly (re-imposed after every solver step)."""
        states, expanded = self.encode_prompt(prompt)
        shape = self.latent_shape(config)
        image_states = None
        if config.image_first and cond_frames is None and shape[1] > 1:
            image_states, _ = self.encode_prompt(prompt, num_frames=1)
        clean, mask = self._conditioning(cond_frames, shape, config.cond_position)
        latent = sample_latents(
            self.dit,
            shape,
            config,
            states,
            self._null_text(),
            image_states=image_states,
            clean=clean,
            mask=mask,
        )
        return latent, expanded

    def _null_text(self) -> Tensor:
        """States of the empty caption (the unconditional branch of CFG), encoded once."""
        if self._null_states is None:
            self._null_states = text_states(self.text_encoder, "")
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
        return conditioning_tokens(latent, shape, self.patch, num_cond, at_end=position == "end")


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
