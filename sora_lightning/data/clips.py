"""From a raw shard sample to a model-ready clip: decode, pick frames, resize, convert range.

Clip selection follows the causal VAE: clips have 1 + k * temporal_factor frames (the VAE
config's factor: `models.vae.is_clip_length`), images are 1-frame clips.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from sora_lightning.data.decode import decode_video
from sora_lightning.data.resize import FitFrame, fit_resolution, resize_frames
from sora_lightning.data.shards import IMAGE_EXTS, RawSample
from sora_lightning.models.vae import longest_clip_length


def decode_fitted(
    sample: RawSample, *, max_area: int, multiple: int, frame_indices: list[int] | None = None
) -> np.ndarray:
    """A sample's frames (all, or `frame_indices`; an image has frame 0), already fitted.

    Same sizes as `fit_clip` on the decoded frames, but FFmpeg resizes while converting
    from YUV, only the asked frames, so no full-size RGB copy is made (the VAE loaders' path).
    Decoding and resizing stay in the calling thread: the loaders run in DataLoader workers,
    which decode clips in parallel, and FFmpeg's own threads cost more than they save on clips
    this short (measured: about a quarter more CPU per clip).
    """
    if sample.media_ext in IMAGE_EXTS:
        frame_indices = [0]
    fit = FitFrame(max_area=max_area, multiple=multiple)
    return decode_video(sample.media, frame_indices=frame_indices, convert=fit, threads=1)[0]


def valid_length(num_frames: int, temporal_factor: int, max_frames: int | None = None) -> int:
    """Longest 1 + k*temporal_factor frame count that fits in `num_frames` (and `max_frames`).

    `temporal_factor` has no default: it is the VAE's (`VAEConfig.temporal_factor`, 2 for the
    demo VAE, 4 for others), and a guessed one cuts clips the VAE then refuses, or wastes frames.
    """
    limit = num_frames if max_frames is None else min(num_frames, max_frames)
    if limit < 1:
        raise ValueError(f"clip has {num_frames} frames; need at least 1")
    return longest_clip_length(limit, temporal_factor)


def frame_indices(
    num_frames: int,
    *,
    native_fps: float,
    target_fps: float | None,
    length: int,
    temporal_factor: int,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Indices of `length` frames at `target_fps` (by frame selection), from a random start.

    Returns fewer frames (the longest prefix the VAE of `temporal_factor` encodes) if the clip is
    too short at that rate.
    """
    stride = 1.0 if not target_fps or not native_fps else max(1.0, native_fps / target_fps)
    span = int(np.floor((num_frames - 1) / stride)) + 1
    length = min(length, valid_length(span, temporal_factor))
    max_start = num_frames - 1 - int(round((length - 1) * stride))
    start = int(rng.integers(0, max_start + 1)) if rng is not None and max_start > 0 else 0
    return (start + np.round(np.arange(length) * stride)).astype(np.int64)


def fit_clip(frames: np.ndarray, *, max_area: int, multiple: int) -> np.ndarray:
    """Resize to the native aspect ratio under the area cap, sides a multiple of the model stride."""
    height, width = frames.shape[1:3]
    new_w, new_h = fit_resolution(width, height, max_area=max_area, multiple=multiple)
    if (new_w, new_h) == (width, height):
        return frames
    return resize_frames(frames, new_w, new_h)


def to_model_range(frames: np.ndarray) -> Tensor:
    """uint8 [T, H, W, 3] -> float [3, T, H, W] in [-1, 1] (the VAE's input range)."""
    video = torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2).float()
    return video / 127.5 - 1.0


def to_uint8(video: Tensor) -> np.ndarray:
    """float [3, T, H, W] in [-1, 1] -> uint8 [T, H, W, 3] for writing or detecting."""
    frames = ((video.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return frames.permute(1, 2, 3, 0).cpu().numpy()
