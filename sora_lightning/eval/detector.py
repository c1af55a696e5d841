"""Adherence detector: reads colour, shape and motion of the single object in a world clip.

Why: prompt adherence of a text-to-video model trained on the embedded world
(`sora_lightning.data.world`) is measured by detecting what a generated clip shows and comparing
it with the prompt. The detector is classical image analysis (no learned weights), so it is
trustworthy only if it reads rendered ground truth almost perfectly:
`detector_accuracy_on_truth` checks that, and the evaluator refuses to report without it.

Robust to VAE blur, noise and H.264 artefacts: a half-contrast threshold (so anti-aliased or
blurred edges split evenly), the largest connected component, medians rather than means, and
shape from third/fourth cumulants of soft coverage (blur leaves them unchanged). Slow
translations need about 9 frames or more to be told from "still".
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from sora_lightning.data.world import (
    COLOURS,
    EVAL_MOTIONS,
    RESOLUTIONS,
    SHAPES,
    Scene,
    render,
    sample_scene,
)

NONE = "none"
"""Label for every attribute when no object is found."""
CHANCE: dict[str, float] = {
    "colour": 1 / len(COLOURS),
    "shape": 1 / len(SHAPES),
    "motion": 1 / len(EVAL_MOTIONS),
}
"""Accuracy of uniform guessing, the floor a generator must beat."""

_MIN_CONTRAST = 50.0  # RGB distance from the background that counts as "object" at all
_MIN_PIXELS = 4  # smaller masks are noise
_MOVE_THRESHOLD = 0.06  # centroid travel, as a fraction of min(H, W), that counts as moving
_GROW_RATIO = 1.5  # last/first area ratio that counts as growing (truth: 1.6^2 = 2.56)
_SHRINK_RATIO = 0.67  # ... as shrinking (truth: 0.55^2 = 0.30)
_TRIANGLE_MIN_SKEW = 0.2  # |vertical skewness|: triangle ~0.55 (0.35 after H.264), others ~0
_SQUARE_MAX_RATIO = 0.7  # diagonal/axis 4th cumulant: square 0.5, circle 1.0, after H.264 too
_MARGIN = 2  # pixels around the mask's bounding box that still count for the moments
_ALPHA_FLOOR = 0.1  # soft coverage below this is treated as background noise


@dataclass(frozen=True)
class Detection:
    """What the detector read from a clip; "none" everywhere when no object was found."""

    colour: str
    """A key of world.COLOURS, or "none"."""
    shape: str
    """One of world.SHAPES, or "none"."""
    motion: str
    """One of world.EVAL_MOTIONS, or "none"."""


@dataclass(frozen=True)
class _Views:
    """What the attribute readers share about one clip."""

    masks: np.ndarray
    """[T, H, W] bool: the object's largest component per frame (half-contrast threshold)."""
    distance: np.ndarray
    """[T, H, W] RGB distance of each pixel from the background colour."""
    contrast: float
    """Typical distance of object pixels from the background."""
    noise: float
    """Distance that background pixels reach by noise alone (99th percentile on the border)."""


def _border(frames: np.ndarray) -> np.ndarray:
    """All border pixels [N, 3] of all frames (objects stay off the border)."""
    return np.concatenate(
        [
            frames[:, 0].reshape(-1, 3),
            frames[:, -1].reshape(-1, 3),
            frames[:, :, 0].reshape(-1, 3),
            frames[:, :, -1].reshape(-1, 3),
        ]
    ).astype(np.float32)


def _largest_components(masks: np.ndarray) -> np.ndarray:
    """Keep each frame's largest 8-connected component of masks [T, H, W] (drops noise specks)."""
    try:
        from scipy import ndimage
    except ImportError:  # scipy is optional: thresholds alone are enough on clean clips
        return masks
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True  # connect within a frame, never across frames
    labels, count = ndimage.label(masks, structure=structure)
    if count <= 1:
        return masks
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    # Labels follow scan order and never span frames, so frame t owns a contiguous label block.
    last = np.maximum.accumulate(labels.reshape(len(masks), -1).max(axis=1))
    first = np.concatenate([[0], last[:-1]])
    keep = np.zeros(count + 1, dtype=bool)
    for low, high in zip(first, last, strict=True):
        if high > low:
            keep[low + 1 + int(np.argmax(sizes[low + 1 : high + 1]))] = True
    return keep[labels]


def _views(frames: np.ndarray) -> _Views:
    """Background (median border colour), distance map, object masks, contrast and noise level."""
    border = _border(frames)
    background = np.median(border, axis=0)
    noise = float(np.percentile(np.linalg.norm(border - background, axis=-1), 99))
    distance = np.linalg.norm(frames.astype(np.float32) - background, axis=-1)
    coarse = distance > _MIN_CONTRAST
    if not coarse.any():
        return _Views(coarse, distance, _MIN_CONTRAST, noise)
    contrast = float(np.percentile(distance[coarse], 90))
    # Half of the object's contrast: blurred or anti-aliased edges split evenly in and out.
    masks = _largest_components(distance > max(_MIN_CONTRAST, 0.5 * contrast))
    return _Views(masks, distance, contrast, noise)


def _colour(frames: np.ndarray, masks: np.ndarray, distance: np.ndarray) -> str:
    """Nearest palette colour to the median of the object's high-contrast core pixels."""
    inside = distance[masks]
    core = masks & (distance >= np.percentile(inside, 50))
    median = np.median(frames[core].astype(np.float32), axis=0)
    names = list(COLOURS)
    palette = np.asarray([COLOURS[name] for name in names], dtype=np.float32)
    return names[int(np.argmin(np.linalg.norm(palette - median, axis=1)))]


def _cumulants(weights: np.ndarray, values: np.ndarray) -> tuple[float, float, float]:
    """Second, third and fourth cumulants of `values` under normalised `weights`."""
    centred = values - (weights * values).sum()
    moments = [(weights * centred**power).sum() for power in (2, 3, 4)]
    return moments[0], moments[1], moments[2] - 3.0 * moments[0] ** 2


def _shape_features(alpha: np.ndarray) -> tuple[float, float]:
    """(vertical skewness, diagonal/axis fourth-cumulant ratio) of a soft coverage map [H, W].

    Why cumulants: blur (VAE, codec) adds a symmetric kernel, and cumulants of a convolution add,
    so the third and fourth cumulants survive blur unchanged. Truth: a triangle (apex up) has
    skewness ~-0.55, circles and squares ~0; a square's fourth cumulant along the diagonals is
    half that along the axes (ratio 0.5), a circle's is isotropic (ratio 1).
    """
    grid_y, grid_x = np.mgrid[0 : alpha.shape[0], 0 : alpha.shape[1]].astype(np.float64)
    weights = alpha / alpha.sum()
    var_y, third_y, fourth_y = _cumulants(weights, grid_y)
    fourth_x = _cumulants(weights, grid_x)[2]
    fourth_u = _cumulants(weights, (grid_x + grid_y) / np.sqrt(2.0))[2]
    fourth_v = _cumulants(weights, (grid_x - grid_y) / np.sqrt(2.0))[2]
    skew = third_y / max(var_y, 1e-9) ** 1.5
    axis = fourth_x + fourth_y
    ratio = (fourth_u + fourth_v) / axis if axis < -1e-9 else 1.0
    return float(skew), float(ratio)


def _soft_window(views: _Views, index: int) -> np.ndarray:
    """Soft coverage (distance / contrast, clipped) in the mask's bounding box plus a margin."""
    mask = views.masks[index]
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    top, left = max(rows[0] - _MARGIN, 0), max(cols[0] - _MARGIN, 0)
    bottom, right = rows[-1] + _MARGIN + 1, cols[-1] + _MARGIN + 1
    alpha = np.clip(views.distance[index, top:bottom, left:right] / views.contrast, 0.0, 1.0)
    # Noise and codec ringing far from the object would skew the moments.
    alpha[alpha < max(_ALPHA_FLOOR, views.noise / views.contrast)] = 0.0
    return alpha


def _shape(views: _Views, areas: np.ndarray) -> str:
    """Shape from blur-robust moments of the (up to) three largest views of the object."""
    largest = [index for index in np.argsort(areas)[::-1][:3] if areas[index] > 0]
    features = [_shape_features(_soft_window(views, index)) for index in largest]
    skew, ratio = np.median(np.asarray(features), axis=0)
    if abs(skew) > _TRIANGLE_MIN_SKEW:
        return "triangle"
    return "square" if ratio < _SQUARE_MAX_RATIO else "circle"


def _motion(masks: np.ndarray, areas: np.ndarray) -> str:
    """Motion from the centroid trajectory, else the area ratio, else still."""
    present = np.flatnonzero(areas >= _MIN_PIXELS)
    if len(present) < 2:
        return "still"
    height, width = masks.shape[1:]
    grid_y, grid_x = np.mgrid[0:height, 0:width]
    centroids = (
        np.stack([[(grid_x * masks[i]).sum(), (grid_y * masks[i]).sum()] for i in present])
        / areas[present, None]
    )
    ends = max(1, len(present) // 6)  # average a few frames at each end against jitter
    delta_x, delta_y = (centroids[-ends:].mean(0) - centroids[:ends].mean(0)) / min(height, width)
    if max(abs(delta_x), abs(delta_y)) >= _MOVE_THRESHOLD:
        if abs(delta_x) >= abs(delta_y):
            return "right" if delta_x > 0 else "left"
        return "down" if delta_y > 0 else "up"
    ratio = areas[present[-ends:]].mean() / areas[present[:ends]].mean()
    if ratio >= _GROW_RATIO:
        return "grow"
    return "shrink" if ratio <= _SHRINK_RATIO else "still"


def detect(frames: np.ndarray) -> Detection:
    """Read colour, shape and motion of the (single) object in uint8 frames [T, H, W, 3]."""
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames [T, H, W, 3], got shape {frames.shape}")
    views = _views(frames)
    areas = views.masks.sum(axis=(1, 2)).astype(np.float64)
    if areas.max(initial=0) < _MIN_PIXELS:
        return Detection(NONE, NONE, NONE)
    return Detection(
        colour=_colour(frames, views.masks, views.distance),
        shape=_shape(views, areas),
        motion=_motion(views.masks, areas),
    )


def truth_clips(
    num_clips: int, seed: int = 0, num_frames: int = 17
) -> Iterator[tuple[Scene, np.ndarray]]:
    """Yield (scene, frames) of random single-object world clips with eval motions.

    Colour, shape, motion, size, speed, background and resolution all vary.
    """
    rng = np.random.default_rng(seed)
    resolutions = list(RESOLUTIONS)
    for index in range(num_clips):
        scene = sample_scene(
            rng,
            num_frames=num_frames,
            resolution=resolutions[index % len(resolutions)],
            max_objects=1,
            split="all",
            motions=EVAL_MOTIONS,
        )
        yield scene, render(scene)


def accuracy_on_clips(
    clips: Iterable[tuple[Scene, np.ndarray]],
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
) -> dict[str, float]:
    """Detector accuracy over (scene, frames) pairs; `transform` maps frames first (e.g. a codec)."""
    hits = {"colour": 0, "shape": 0, "motion": 0}
    total = 0
    for scene, frames in clips:
        found = detect(frames if transform is None else transform(frames))
        truth = scene.objects[0]
        hits["colour"] += found.colour == truth.colour
        hits["shape"] += found.shape == truth.shape
        hits["motion"] += found.motion == truth.motion
        total += 1
    return {f"{name}_acc": count / max(total, 1) for name, count in hits.items()}


def detector_accuracy_on_truth(
    num_clips: int = 200, seed: int = 0, num_frames: int = 17
) -> dict[str, float]:
    """Accuracy of `detect` on rendered ground truth: {"colour_acc", "shape_acc", "motion_acc"}.

    Why: an adherence number is only meaningful if the detector reads true clips correctly.
    """
    if num_clips < 1:
        raise ValueError(f"num_clips must be >= 1, got {num_clips}")
    if num_frames < 2:
        raise ValueError(f"num_frames must be >= 2 to see motion, got {num_frames}")
    return accuracy_on_clips(truth_clips(num_clips, seed, num_frames))


__all__ = [
    "CHANCE",
    "Detection",
    "NONE",
    "accuracy_on_clips",
    "detect",
    "detector_accuracy_on_truth",
    "truth_clips",
]
