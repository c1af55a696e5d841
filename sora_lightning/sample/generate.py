"""Generation: prompt -> (expanded prompt) -> text states -> latents by the sampler with CFG -> frames.

One `VideoGenerator` serves every request (`Given` says what it brings besides the prompt):
- text-to-video; image-to-video and extension: given frames are VAE-encoded and held clean as
  conditioning, at the start of the new video (`cond_position="start"`: extend a clip forwards)
  or at its end (`"end"`: generate what leads up to a clip), as training conditions
  (`Stage.cond_modes`);
- editing (SDEdit, Meng et al. 2022): a clip's latents noised to t = edit_strength, then solved
  from there to 0 with the new prompt; 0 returns the clip, 1 is text-to-video;
- connecting two clips: the first's last `connect_frames` latent frames open the new video and
  the second's first ones close it, both held clean in one mask;
- long videos: more frames than the model was trained on are sampled in overlapping windows of
  the trained length (`diffusion.sampling.sample_windows`) and decoded chunk by chunk through
  the causal VAE, so memory does not grow with length beyond the frames themselves.
The solve in latent space, with its settings (`SamplingConfig`), is `diffusion.sampling`, shared
with training previews; this module adds the text encoder, the VAE, loading weights and writing
mp4s.

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
- connect (n = connect_frames): the first clip's last 1 + f(n-1) frames are encoded as a clip of
  their own (its latent 0 is its first frame alone, like an image) and open the new video, so its
  first 1 + f(n-1) pixel frames are those; the second clip's first 1 + fn frames are encoded and,
  as with `end`, latent 0 dropped: the new video's last fn pixel frames are its frames 1 .. fn.
  Played in a row: first clip, new video from its pixel frame 1 + f(n-1), second clip from its
  frame 1 + fn.
- edit: the clip's first `frames` frames are encoded whole; every latent frame is regenerated.
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
from omegaconf import OmegaConf
from torch import Tensor

from sora_lightning.data.clips import to_model_range, to_uint8, valid_length
from sora_lightning.diffusion import flow
from sora_lightning.diffusion.sampling import (
    LatentPlan,
    SamplingConfig,
    frame_tokens,
    latent_shape,
    sample_windows,
    text_states,
    window_latents,
)
from sora_lightning.models.dit import DiT, DiTConfig
from sora_lightning.models.text import TextEncoder, TextEncoderConfig
from sora_lightning.models.vae import CausalCache, VideoVAE, clip_lengths_hint, is_clip_length
from sora_lightning.sample.expand import NoExpander, PromptExpander, WorldExpander
from sora_lightning.sample.provenance import Provenance, generation_record, output_path
from sora_lightning.train.lora import LORA_META, LORA_WEIGHTS, load_lora_dit
from sora_lightning.train.weights import load_dit, load_vae, read_module_meta, torch_load_safe

GENERATOR_NAME = "sora_lightning"
VAE_CHUNK_LATENTS = 8
"""Latent frames the VAE encodes or decodes at a time in clips longer than this (causal cache):
memory then stays that of one chunk, whatever the length."""


@dataclass
class GeneratedVideo:
    """Frames plus everything needed to reproduce them."""

    frames: np.ndarray  # uint8 [T, H, W, 3]
    prompt: str
    expanded_prompt: str
    seed: int
    model_hash: str
    options: dict[str, Any] = field(default_factory=dict)
    windows: list[tuple[int, int]] = field(default_factory=list)
    """[begin, end) latent frames of each solve; one window unless the video was sampled long."""
    prompt_expander: dict[str, Any] = field(default_factory=dict)
    """What expanded the prompt (`PromptExpander.record`: name, model hash for llm)."""


@dataclass
class Given:
    """What a request brings besides the prompt; frames are uint8 [T, H, W, 3] (an image T = 1).

    `check` refuses every combination that cannot work, with its fix, before a model loads.
    """

    frames: np.ndarray | None = None
    """image= or video=: held at `cond_position`, edited (edit_strength) or connected from."""
    is_image: bool = False
    """`frames` came from image= (an image cannot be edited as a video)."""
    end_frames: np.ndarray | None = None
    """video_end=: the clip a connecting video leads into."""
    edit_strength: float | None = None
    """SDEdit: the noise level `frames` (a clip) is noised to before denoising with the prompt."""
    connect_frames: int = 1
    """Latent frames of each clip held when connecting (at the start and at the end)."""

    def __post_init__(self) -> None:
        for name in ("frames", "end_frames"):  # an image [H, W, 3] is a 1-frame clip
            frames = getattr(self, name)
            if frames is not None and frames.ndim == 3:
                setattr(self, name, frames[None])

    @property
    def mode(self) -> str:
        """text | image | extend | edit | connect."""
        if self.frames is None:
            return "text"
        if self.edit_strength is not None:
            return "edit"
        if self.end_frames is not None:
            return "connect"
        return "image" if self.is_image or len(self.frames) == 1 else "extend"

    def record(self) -> dict[str, Any]:
        """What a written file records of the request (its options)."""
        extra: dict[str, Any] = {"mode": self.mode}
        if self.mode == "edit":
            extra["edit_strength"] = self.edit_strength
        if self.mode == "connect":
            extra["connect_frames"] = self.connect_frames
        return extra

    def check(self, config: SamplingConfig, temporal_factor: int | None = None) -> None:
        """Refuse what cannot work; with the VAE's temporal factor also the frame counts."""
        self._check_combination(config)
        for name, frames in (
            ("image=" if self.is_image else "video=", self.frames),
            ("video_end=", self.end_frames),
        ):
            if frames is not None and frames.shape[-3:-1] != (config.height, config.width):
                height, width = frames.shape[-3:-1]
                raise ValueError(
                    f"{name} is {width}x{height} but the request is {config.width}x"
                    f"{config.height}: resize the clip, or pass sampling.width={width} "
                    f"sampling.height={height}"
                )
        if temporal_factor is not None:
            self._check_lengths(config, temporal_factor)

    def _check_combination(self, config: SamplingConfig) -> None:
        editing, connecting = self.edit_strength is not None, self.end_frames is not None
        if editing and not 0.0 <= self.edit_strength <= 1.0:
            raise ValueError(
                f"edit_strength must be in [0, 1] (0 returns the clip, 1 ignores it), got "
                f"{self.edit_strength}"
            )
        if (editing or connecting) and self.frames is None:
            raise ValueError(
                "edit_strength needs video=CLIP, the clip to edit"
                if editing
                else "video_end= needs video=CLIP (or image=), what the new video starts from"
            )
        if editing and self.is_image:
            raise ValueError(
                "edit_strength edits a clip given as video=...; image= is image-to-video. "
                "Pass the clip as video= (an image file works: video=IMAGE sampling.frames=1)"
            )
        if editing and connecting:
            raise ValueError("edit_strength and video_end= cannot be combined: edit or connect")
        if connecting and self.connect_frames < 1:
            raise ValueError(f"connect_frames must be >= 1, got {self.connect_frames}")
        if (editing or connecting) and config.cond_position != "start":
            raise ValueError(
                "sampling.cond_position=end places extension frames; editing and connecting "
                "fix where the given frames go: leave it at start"
            )

    def _check_lengths(self, config: SamplingConfig, factor: int) -> None:
        if not is_clip_length(config.frames, factor):
            raise ValueError(
                f"frames must be {clip_lengths_hint(factor)} for this VAE, got {config.frames}"
            )
        if self.mode == "edit" and len(self.frames) < config.frames:
            raise ValueError(
                f"video= has {len(self.frames)} frames, fewer than the sampling.frames="
                f"{config.frames} to edit; pass sampling.frames="
                f"{valid_length(len(self.frames), factor)}"
            )
        if self.mode == "connect":
            self._check_connect(config, factor)

    def _check_connect(self, config: SamplingConfig, factor: int) -> None:
        held = self.connect_frames
        num_latent = 1 + (config.frames - 1) // factor
        if num_latent < 2 * held + 1:
            raise ValueError(
                f"sampling.frames={config.frames} is {num_latent} latent frames; connecting holds "
                f"connect_frames={held} at each end and must generate at least one between: "
                f"pass sampling.frames >= {1 + 2 * held * factor}"
            )
        if len(self.frames) < 1 + factor * (held - 1):
            raise ValueError(
                f"video= has {len(self.frames)} frames; connect_frames={held} needs its last "
                f"{1 + factor * (held - 1)}"
            )
        if len(self.end_frames) != 1 and len(self.end_frames) < 1 + factor * held:
            raise ValueError(
                f"video_end= has {len(self.end_frames)} frames; connect_frames={held} needs its "
                f"first {1 + factor * held} (or one image)"
            )


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
        expander: PromptExpander | None = None,
        model_hash: str = "",
        trained_frames: int | None = None,
    ) -> None:
        """`expander` rewrites prompts (sample/expand.py); None: the world's rules, or none with
        `expand_prompts=False` (a shorthand for `expander=NoExpander()`)."""
        self.dit, self.vae, self.text_encoder = dit.eval(), vae.eval(), text_encoder
        self.mean, self.std = (
            latent_mean.view(-1, 1, 1, 1).float(),
            latent_std.view(-1, 1, 1, 1).float(),
        )
        if expander is None:
            expander = WorldExpander() if expand_prompts else NoExpander()
        self.expander, self.model_hash = expander, model_hash
        self.trained_frames = trained_frames
        """Longest clip (pixel frames) the model was trained on: the default window length."""
        self.patch = tuple(dit.config.patch_size)
        self._null_states: Tensor | None = None

    def encode_prompt(self, prompt: str, num_frames: int | None = None) -> tuple[Tensor, str]:
        """Expand a short prompt to the detailed caption form, then encode (real tokens only).

        num_frames=1 expands to the image form ("An image of ...") where the expander has one;
        None to the video form.
        """
        expanded = self.expander.expand(prompt, num_frames)
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
        """uint8 [T, H, W, 3] -> the VAE's posterior mean [C, F, h, w] (not normalised); a long
        clip goes through in chunks with the causal cache."""
        video = to_model_range(frames).unsqueeze(0).to(self.device)
        chunk = VAE_CHUNK_LATENTS * self.vae.config.temporal_factor
        if len(frames) <= 1 + chunk:
            return self.vae.encode(video).mode()[0].float().cpu()
        return self.vae.encode_chunked(video, chunk_frames=chunk).mode()[0].float().cpu()

    def _decode(self, latent: Tensor) -> np.ndarray:
        """Unnormalised latents [C, F, h, w] -> uint8 frames [T, H, W, 3]; a long video is
        decoded `VAE_CHUNK_LATENTS` at a time (causal cache, exact like `decode_chunked`), each
        chunk stored as uint8 at once so no float copy of the whole video is ever held."""
        latent = latent.to(self.device)
        if latent.shape[1] <= VAE_CHUNK_LATENTS:
            return to_uint8(self.vae.decode(latent.unsqueeze(0))[0])
        frames: np.ndarray | None = None
        cache: CausalCache = {}
        position = 0
        for begin in range(0, latent.shape[1], VAE_CHUNK_LATENTS):
            part = to_uint8(
                self.vae.decoder(latent[None, :, begin : begin + VAE_CHUNK_LATENTS], cache)[0]
            )
            if frames is None:
                num_frames = self.vae.config.pixel_frames(latent.shape[1])
                frames = np.empty((num_frames, *part.shape[1:]), dtype=np.uint8)
            frames[position : position + len(part)] = part
            position += len(part)
        assert frames is not None and position == len(frames), "chunks did not cover the video"
        return frames

    @property
    def device(self) -> torch.device:
        """Where the VAE runs (the DiT's inputs follow its own weights, `guided_velocity_fn`)."""
        return next(self.vae.parameters()).device

    def to(self, device: str | torch.device) -> VideoGenerator:
        """Move the DiT, the VAE and the text encoder to `device` (sampling state stays on the
        CPU: the same seed gives the same noise everywhere); returns self."""
        self.dit.to(device)
        self.vae.to(device)
        self.text_encoder.to(device)
        return self

    @torch.no_grad()
    def reconstruct(self, frames: np.ndarray) -> np.ndarray:
        """uint8 [T, H, W, 3] through the VAE (posterior mean) and back: what it can represent."""
        return self._decode(self._posterior_mean(frames))

    @torch.no_grad()
    def generate(
        self, prompt: str, config: SamplingConfig, given: Given | np.ndarray | None = None
    ) -> GeneratedVideo:
        """Sample one video. `given` is the request's media (`Given`), or frames alone (an image
        or a clip) to keep as given at the start or the end (`config.cond_position`)."""
        given = as_given(given)
        latent, expanded, windows = self._sample(prompt, config, given)
        frames = self._decode(latent * self.std + self.mean)
        options = asdict(config) | given.record()
        if len(windows) > 1:
            options["windows"] = [list(window) for window in windows]
        return GeneratedVideo(
            frames,
            prompt,
            expanded,
            config.seed,
            self.model_hash,
            options,
            windows,
            self.expander.record(),
        )

    @torch.no_grad()
    def generate_latents(
        self, prompt: str, config: SamplingConfig, given: Given | np.ndarray | None = None
    ) -> tuple[Tensor, str]:
        """Normalised latents [C, F, h, w] and the expanded prompt; given latent frames equal
        the encoded given frames exactly (re-imposed after every solver step)."""
        latent, expanded, _ = self._sample(prompt, config, as_given(given))
        return latent, expanded

    def _sample(
        self, prompt: str, config: SamplingConfig, given: Given
    ) -> tuple[Tensor, str, list[tuple[int, int]]]:
        """Normalised latents, the expanded prompt and the solved windows of one request."""
        plan = self.plan(given, config)
        window = self.window(config)
        if not self.dit.config.use_conditioning and (plan.num_given or _is_long(plan, window)):
            raise ValueError(
                "this model has no conditioning channel (DiTConfig.use_conditioning=false): it "
                "cannot hold given frames, nor sample past its trained length in windows; "
                f"pass sampling.window_frames={config.frames} to sample in one pass"
            )
        states, expanded = self.encode_prompt(prompt)
        image_states = None
        if config.image_first and given.frames is None and plan.shape[1] > 1:
            image_states, _ = self.encode_prompt(prompt, num_frames=1)
        latent, windows = sample_windows(
            self.dit,
            plan,
            config,
            states,
            self._null_text(),
            window=window,
            image_states=image_states,
        )
        return latent, expanded, windows

    def window(self, config: SamplingConfig) -> int | None:
        """Latent frames per window (None: one pass, the trained length being unknown)."""
        return window_latents(config, self.trained_frames, self.vae.config.temporal_factor)

    def plan(self, given: Given, config: SamplingConfig) -> LatentPlan:
        """The latents a request fixes before sampling (`LatentPlan`), checked first."""
        shape = self.latent_shape(config)
        given.check(config, self.vae.config.temporal_factor)
        if given.mode == "text":
            return LatentPlan(shape)
        if given.mode == "edit":
            clip = self.encode_frames(given.frames[: config.frames])
            return LatentPlan(shape, init=clip, start=float(given.edit_strength))
        if given.mode == "connect":
            return self._connect_plan(given, shape)
        return self._held(given.frames, shape, config.cond_position)

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

    def _held(self, frames: np.ndarray, shape: tuple[int, ...], position: str) -> LatentPlan:
        """Image-to-video and extension: the given frames at the start or the end (module doc)."""
        latent = self.conditioning_latents(frames, position)
        if latent.shape[2:] != shape[2:]:
            raise ValueError(
                f"conditioning frames are {frames.shape[-2]}x{frames.shape[-3]}; they must match "
                "the requested size"
            )
        num_cond = min(latent.shape[1], shape[1] - 1)  # at least one frame is generated
        at_end = position == "end"
        mask = flow.frame_cond_mask(shape[1], num_cond, at_end).bool()  # [F]
        known = torch.zeros(shape)
        known[:, mask] = latent[:, latent.shape[1] - num_cond :] if at_end else latent[:, :num_cond]
        return LatentPlan(tuple(shape), known=known, known_mask=mask)

    def _connect_plan(self, given: Given, shape: tuple[int, ...]) -> LatentPlan:
        """The first clip's last `connect_frames` latents open the video, the second's first
        close it (pixel-frame mapping in the module doc)."""
        held, factor = given.connect_frames, self.vae.config.temporal_factor
        opening = self.encode_frames(given.frames[len(given.frames) - 1 - factor * (held - 1) :])
        closing = self.conditioning_latents(given.end_frames[: 1 + factor * held], "end")
        known, mask = torch.zeros(shape), torch.zeros(shape[1], dtype=torch.bool)
        known[:, :held], known[:, shape[1] - held :] = opening, closing[:, -held:]
        mask[:held] = mask[shape[1] - held :] = True
        return LatentPlan(tuple(shape), known=known, known_mask=mask)

    def _conditioning(
        self, frames: np.ndarray | None, shape: tuple[int, ...], position: str = "start"
    ) -> tuple[Tensor | None, Tensor | None]:
        """Clean latent tokens and their mask for the given frames (None for text-to-video)."""
        if frames is None:
            return None, None
        plan = self._held(frames, shape, position)
        return frame_tokens(plan.known, plan.known_mask, self.patch)


def as_given(given: Given | np.ndarray | None) -> Given:
    """A request's `Given`; bare frames are an image or clip held at `cond_position`."""
    return given if isinstance(given, Given) else Given(frames=given)


def _is_long(plan: LatentPlan, window: int | None) -> bool:
    """Whether the plan is sampled in more than one window."""
    return window is not None and plan.shape[1] > window


def write_mp4(
    path: str | Path,
    video: GeneratedVideo,
    fps: int,
    provenance: Provenance | None = None,
    record: dict[str, Any] | None = None,
) -> Path:
    """H.264 mp4 carrying prompt, expanded prompt, seed, model hash and generator name as metadata.

    Written atomically; with `provenance`, signed with a C2PA manifest holding `record` (default:
    `generation_record(video)`), and no file appears if signing fails.
    """
    path = Path(path)
    record = generation_record(video) if record is None else record
    with output_path(path, provenance, record) as tmp:
        _encode_mp4(tmp, video, fps)
    return path


def _encode_mp4(path: Path, video: GeneratedVideo, fps: int) -> None:
    frames = video.frames
    with av.open(str(path), "w", format="mp4") as container:  # a temp name has no .mp4 suffix
        container.metadata.update(
            {
                "title": video.prompt,
                "comment": json.dumps(
                    {
                        "prompt": video.prompt,
                        "expanded_prompt": video.expanded_prompt,
                        "prompt_expander": video.prompt_expander,
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


def _text_encoder(config: dict[str, Any]) -> TextEncoder:
    return TextEncoder(TextEncoderConfig(**config))


@dataclass(frozen=True)
class ModelInfo:
    """What a request is checked against before any weights load (an export's JSON)."""

    channels: int
    spatial_factor: int
    temporal_factor: int
    patch: tuple[int, int, int]
    trained_frames: int | None

    def latent_shape(self, config: SamplingConfig) -> tuple[int, int, int, int]:
        """`latent_shape` of the model: refuses frame counts and sizes it cannot take."""
        return latent_shape(
            config,
            channels=self.channels,
            spatial_factor=self.spatial_factor,
            temporal_factor=self.temporal_factor,
            patch=self.patch,
        )


def read_model_info(path: str | Path) -> ModelInfo | None:
    """The model's sizes from an export folder's dit.json, without loading weights; None for a
    training checkpoint or an export that does not record its VAE's factors."""
    path = Path(path)
    if not path.is_dir():
        return None
    saved = read_module_meta(path, "lora" if (path / LORA_META).is_file() else "dit")  # LoRA final/
    meta, config = saved.get("meta") or {}, saved["config"]
    if "temporal_factor" not in meta or "spatial_factor" not in meta:
        return None
    return ModelInfo(
        channels=int(config.get("in_channels", 4)),
        spatial_factor=int(meta["spatial_factor"]),
        temporal_factor=int(meta["temporal_factor"]),
        patch=tuple(int(p) for p in config.get("patch_size", (1, 2, 2))),
        trained_frames=trained_frames(meta, folder=path),
    )


def trained_frames(
    meta: dict[str, Any],
    curriculum: dict[str, Any] | None = None,
    folder: Path | None = None,
) -> int | None:
    """Longest clip (pixel frames) the model was trained on, where something records it.

    In order: the DiT metadata's `trained_frames`; the curriculum of a training checkpoint's
    hyperparameters; for an export inside a pipeline run (RUN/export), the curriculum in the
    DiT run's RUN/dit/config.yaml. None otherwise (then `sampling.window_frames` says it).
    """
    if meta.get("trained_frames"):
        return int(meta["trained_frames"])
    if curriculum is None and folder is not None:
        run_config = folder.resolve().parent / "dit" / "config.yaml"
        if run_config.is_file():
            node = OmegaConf.load(run_config).get("curriculum")
            curriculum = None if node is None else OmegaConf.to_container(node)
    stages = (curriculum or {}).get("stages") or []
    lengths = [int(stage["frames"][1]) for stage in stages if stage.get("frames")]
    return max(lengths) if lengths else None


def load_generator(
    path: str | Path,
    *,
    use_ema: bool = True,
    expand_prompts: bool = True,
    expander: PromptExpander | None = None,
) -> VideoGenerator:
    """From an export folder (dit.safetensors + vae.safetensors) or a DiT training checkpoint (.ckpt).

    `expander` (sample/expand.py `build_expander`) rewrites prompts; None: as `VideoGenerator`.
    """
    path = Path(path)
    if path.is_dir():
        lora = (path / LORA_META).is_file()  # a LoRA run's final/: base + adapters, merged
        dit, saved = load_lora_dit(path) if lora else load_dit(path)
        meta = saved["meta"]
        vae_dir = (
            Path(meta["vae_dir"]) if Path(meta["vae_dir"]).is_absolute() else path / meta["vae_dir"]
        )
        vae = load_vae(vae_dir)
        weights = path / (LORA_WEIGHTS if lora else "dit.safetensors")
        model_hash = hashlib.sha256(weights.read_bytes()).hexdigest()[:16]
        longest = trained_frames(meta, folder=path)
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
        longest = trained_frames(meta, hparams.get("curriculum"))
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
        expander=expander,
        model_hash=model_hash,
        trained_frames=longest,
    )
