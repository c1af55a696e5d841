"""Reconstruction quality of a video autoencoder on any clips: PSNR and SSIM.

Why: the VAE bounds what the DiT can show (a detail the decoder cannot reproduce is lost before
diffusion starts), and measuring it needs only clips, no captions and no synthetic world. Each
clip's frames are scored as one batch of images against their reconstruction; clips may differ
in length and size, so every clip is scored on its own and the means are taken over clips.

PSNR is over all pixels of a clip (one MSE per clip, data range 255); a clip reconstructed
exactly has PSNR +inf, and so then has the mean. SSIM uses the standard Gaussian window
(11 x 11, sigma 1.5) and, for frames smaller than 11 pixels on a side, the largest odd window
that fits with sigma scaled alike (e.g. 7 x 7, sigma 1.5 * 7 / 11), recorded per clip and
counted in `ssim_reduced_window`; frames under 3 pixels on a side get no SSIM, counted in
`ssim_skipped` (their mean SSIM is over the other clips, NaN if there are none).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

Reconstruct = Callable[[np.ndarray], np.ndarray]
"""reconstruct(frames uint8 [T, H, W, 3]) -> uint8 [T, H, W, 3], e.g. VAE encode then decode."""

DATA_RANGE = 255.0
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
MIN_SSIM_WINDOW = 3
PIXELS_PER_CHUNK = 1 << 21
"""Frames scored at once: bounds memory (SSIM holds ~a dozen float64 copies) for long HD clips."""


def ssim_window(height: int, width: int) -> tuple[int, float] | None:
    """(window size, Gaussian sigma) for frames of this size, or None when none fits.

    The standard 11 / 1.5 where it fits; else the largest odd size <= min(height, width), sigma
    scaled by the same ratio (torchmetrics derives the window from sigma as 2*int(3.5*sigma+0.5)+1,
    which for these sigmas gives back the size).
    """
    size = min(SSIM_WINDOW, height, width)
    size -= 1 - size % 2  # largest odd <= size
    if size < MIN_SSIM_WINDOW:
        return None
    return size, SSIM_SIGMA * size / SSIM_WINDOW


def _as_images(frames: np.ndarray) -> Tensor:
    """uint8 [T, H, W, 3] -> float64 [T, 3, H, W] in 0..255 (float64 so SSIM(x, x) is 1)."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).double()


def _check_clip(frames: Any, index: int, what: str) -> None:
    if not (
        isinstance(frames, np.ndarray)
        and frames.dtype == np.uint8
        and frames.ndim == 4
        and frames.shape[-1] == 3
        and min(frames.shape) > 0
    ):
        raise ValueError(
            f"clip {index}: {what} must be uint8 [T, H, W, 3] with T, H, W >= 1, got "
            f"{type(frames).__name__} {getattr(frames, 'dtype', None)} "
            f"{getattr(frames, 'shape', None)}"
        )


def clip_metrics(original: np.ndarray, reconstructed: np.ndarray) -> dict[str, Any]:
    """PSNR (dB) and SSIM of one clip against its reconstruction, plus the SSIM window used.

    torchmetrics' metric objects accumulate over chunks of frames (summed squared error for PSNR,
    per-frame SSIM for its mean), so a long clip gives the number one batch of all its frames would.
    """
    num_frames, height, width = original.shape[:3]
    window = ssim_window(height, width)
    psnr = PeakSignalNoiseRatio(data_range=DATA_RANGE).set_dtype(torch.float64)
    ssim = None
    if window is not None:
        ssim = StructuralSimilarityIndexMeasure(sigma=window[1], data_range=DATA_RANGE)
        ssim = ssim.set_dtype(torch.float64)
    step = max(1, PIXELS_PER_CHUNK // (height * width))
    for start in range(0, num_frames, step):
        target = _as_images(original[start : start + step])  # [t, 3, H, W]
        preds = _as_images(reconstructed[start : start + step])
        psnr.update(preds, target)
        if ssim is not None:
            ssim.update(preds, target)
    return {
        "psnr": float(psnr.compute()),
        "ssim": math.nan if ssim is None else float(ssim.compute()),
        "ssim_window": None if window is None else window[0],
        "shape": [int(num_frames), int(height), int(width)],
    }


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else math.nan


def reconstruction_metrics(reconstruct: Reconstruct, clips: Iterable[np.ndarray]) -> dict[str, Any]:
    """Mean PSNR (dB) and SSIM of `reconstruct` over `clips` (uint8 [T, H, W, 3], any sizes).

    Returns {"psnr", "ssim"} (means over clips; SSIM over the clips that have one),
    "num_clips", "ssim_reduced_window" and "ssim_skipped" (counts, see the module docstring)
    and "per_clip": one {"psnr", "ssim", "ssim_window", "shape"} per clip, in order.
    A reconstruction of another shape or dtype than its clip is a ValueError naming the clip.
    """
    per_clip = []
    for index, frames in enumerate(clips):
        _check_clip(frames, index, "the clip")
        output = reconstruct(frames)
        _check_clip(output, index, "reconstruct(clip)")
        if output.shape != frames.shape:
            raise ValueError(
                f"clip {index}: reconstruct returned shape {output.shape} for {frames.shape}"
            )
        per_clip.append(clip_metrics(frames, output))
    if not per_clip:
        raise ValueError("no clips to score")
    windows = [record["ssim_window"] for record in per_clip]
    return {
        "psnr": _mean([record["psnr"] for record in per_clip]),
        "ssim": _mean([record["ssim"] for record in per_clip if record["ssim_window"]]),
        "num_clips": len(per_clip),
        "ssim_reduced_window": sum(1 for w in windows if w is not None and w < SSIM_WINDOW),
        "ssim_skipped": sum(1 for w in windows if w is None),
        "per_clip": per_clip,
    }
