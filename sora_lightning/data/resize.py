"""Native-aspect resizing under an area cap (NaViT / Sora style: no square crops).

The model sees every clip at its own aspect ratio; only the few pixels needed to make each
side a multiple of the model stride (VAE factor x patch size) are cropped.

Two ways to the same sizes: `resize_frames` (torch, on decoded RGB frames; the latent cache's
path) and `FitFrame` (FFmpeg's swscale at decode time, in the same pass as the YUV -> RGB
conversion, so the full-size RGB frame is never made; the VAE loaders' path). Both scale to
cover with an antialiased bilinear filter and crop the same centre window; their pixels differ
by rounding (PSNR about 40 dB on real video, tested).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import av
import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 (the torch convention)
from av.video.reformatter import VideoReformatter
from torch import Tensor

_CHUNK_FRAMES = 16
"""Frames resized at once: bounds the float32 working copy of long, large videos."""

ONE_SWS_THREAD = {"threads": 1} if int(av.__version__.split(".")[0]) >= 17 else {}
"""`reformat` keyword for a single-threaded swscale. PyAV 17 made swscale slice-threaded by
default; on frames this small the threads cost about half as much CPU again as the scaling
itself (same pixels). Older PyAV has no such keyword and scales in one thread anyway."""


def fit_resolution(width: int, height: int, *, max_area: int, multiple: int) -> tuple[int, int]:
    """Target (w, h): native aspect ratio, w*h <= max_area, never upscaled, sides multiples of `multiple`.

    The scale is min(1, sqrt(max_area / area)); each scaled side is rounded down to a multiple,
    so `resize_frames` crops fewer than `multiple` pixels per side.
    """
    if width < 1 or height < 1:
        raise ValueError(f"width and height must be positive, got {width}x{height}")
    if max_area < 1 or multiple < 1:
        raise ValueError(f"max_area and multiple must be positive, got {max_area}, {multiple}")
    scale = min(1.0, math.sqrt(max_area / (width * height)))
    # The epsilon keeps exact multiples (e.g. 640 * 0.5 = 320) from flooring one step down.
    new_w = int(width * scale + 1e-6) // multiple * multiple
    new_h = int(height * scale + 1e-6) // multiple * multiple
    if new_w == 0 or new_h == 0:
        raise ValueError(
            f"a {width}x{height} frame under max_area={max_area} is smaller than multiple={multiple} "
            "along one side; raise max_area or drop this sample"
        )
    return new_w, new_h


def resize_frames(frames: np.ndarray | Tensor, width: int, height: int) -> np.ndarray | Tensor:
    """uint8 [T, H, W, 3] -> uint8 [T, height, width, 3]: scale to cover, centre-crop the rest.

    Bilinear with antialiasing (so downscaling does not alias); numpy in -> numpy out,
    torch in -> torch out.
    """
    as_numpy = isinstance(frames, np.ndarray)
    video = torch.from_numpy(np.ascontiguousarray(frames)) if as_numpy else frames
    if video.dtype != torch.uint8 or video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(
            f"frames must be uint8 [T, H, W, 3], got {video.dtype} {tuple(video.shape)}"
        )
    if width < 1 or height < 1:
        raise ValueError(f"target size must be positive, got {width}x{height}")
    src_h, src_w = int(video.shape[1]), int(video.shape[2])
    cover_w, cover_h = _cover_size(src_w, src_h, width, height)
    top, left = (cover_h - height) // 2, (cover_w - width) // 2
    chunks = []
    for chunk in video.split(_CHUNK_FRAMES):
        if (cover_w, cover_h) != (src_w, src_h):
            pixels = chunk.permute(0, 3, 1, 2).float()  # T 3 H W
            pixels = F.interpolate(
                pixels,
                size=(cover_h, cover_w),
                mode="bilinear",
                antialias=True,
                align_corners=False,
            )
            chunk = pixels.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
        chunks.append(chunk[:, top : top + height, left : left + width])
    out = torch.cat(chunks).contiguous()
    return out.numpy() if as_numpy else out


def _cover_size(src_w: int, src_h: int, width: int, height: int) -> tuple[int, int]:
    """Smallest aspect-preserving size that covers (width, height)."""
    scale = max(width / src_w, height / src_h)
    return max(width, int(src_w * scale + 1e-6)), max(height, int(src_h * scale + 1e-6))


@dataclass(frozen=True)
class FitFrame:
    """Decode-time `fit_resolution` + cover resize + centre crop of one frame, by swscale.

    A `decode.FrameConverter`: `decode_video(data, convert=FitFrame(max_area, multiple))`.
    swscale's BILINEAR widens its filter when shrinking, like torch's `antialias=True`, so it
    does not alias. Picklable (a frozen dataclass), so DataLoader workers can hold it.
    """

    max_area: int
    """Pixel area cap of the fitted frame."""
    multiple: int
    """Both fitted sides are multiples of this (the model stride)."""

    def __call__(self, frame: av.VideoFrame, reformatter: VideoReformatter) -> np.ndarray:
        src_w, src_h = int(frame.width), int(frame.height)
        width, height = fit_resolution(src_w, src_h, max_area=self.max_area, multiple=self.multiple)
        cover_w, cover_h = _cover_size(src_w, src_h, width, height)
        if (cover_w, cover_h) == (src_w, src_h):
            rgb = reformatter.reformat(frame, format="rgb24", **ONE_SWS_THREAD).to_ndarray()
        else:
            rgb = reformatter.reformat(
                frame,
                width=cover_w,
                height=cover_h,
                format="rgb24",
                interpolation="BILINEAR",
                **ONE_SWS_THREAD,
            ).to_ndarray()  # cover_h cover_w 3
        top, left = (cover_h - height) // 2, (cover_w - width) // 2
        return rgb[top : top + height, left : left + width]
