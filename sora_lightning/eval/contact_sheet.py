"""Contact sheets: a video's frames as one still image, and an atomic PNG writer.

Why: a grid of frames shows motion, flicker and drift at a glance in any image viewer, in
TensorBoard and in a pull request, for any data, where an mp4 needs a player and a detector
needs the synthetic world. Long clips are sampled uniformly in time (first and last frame
always in), so a sheet stays readable however long the clip.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from sora_lightning.sample.provenance import Provenance, output_path


def sheet_frame_indices(num_frames: int, max_frames: int) -> np.ndarray:
    """Indices of the frames a sheet shows: all, or `max_frames` evenly spaced from first to last."""
    if num_frames < 1 or max_frames < 1:
        raise ValueError(
            f"need num_frames >= 1 and max_frames >= 1, got {num_frames}, {max_frames}"
        )
    if num_frames <= max_frames:
        return np.arange(num_frames)
    return np.round(np.linspace(0, num_frames - 1, max_frames)).astype(np.int64)


def sheet_columns(num_tiles: int, columns: int | None) -> int:
    """Columns of the grid: as asked (at most one per tile), else a near-square ceil(sqrt(n))."""
    if columns is not None and columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    wanted = math.ceil(math.sqrt(num_tiles)) if columns is None else columns
    return min(wanted, num_tiles)


def tile_origin(index: int, columns: int, height: int, width: int, pad: int) -> tuple[int, int]:
    """(row, column) pixel of tile `index`'s top-left corner: tiles in row-major order, `pad`
    pixels around and between them."""
    row, column = divmod(index, columns)
    return pad + row * (height + pad), pad + column * (width + pad)


def contact_sheet(
    frames: np.ndarray, *, max_frames: int = 16, columns: int | None = None, pad: int = 2
) -> np.ndarray:
    """uint8 frames [T, H, W, 3] -> uint8 sheet [rows*(H+pad)+pad, cols*(W+pad)+pad, 3].

    Frames (sampled by `sheet_frame_indices`) fill the grid row by row on a black background;
    the last row may be part empty.
    """
    if not (isinstance(frames, np.ndarray) and frames.dtype == np.uint8 and frames.ndim == 4):
        raise ValueError(
            f"frames must be a uint8 array [T, H, W, 3], got {type(frames).__name__} "
            f"{getattr(frames, 'dtype', None)} {getattr(frames, 'shape', None)}"
        )
    if frames.shape[-1] != 3 or min(frames.shape) < 1:
        raise ValueError(f"frames must be [T, H, W, 3] with T, H, W >= 1, got {frames.shape}")
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    chosen = frames[sheet_frame_indices(frames.shape[0], max_frames)]  # [n, H, W, 3]
    num_tiles, height, width = chosen.shape[:3]
    num_columns = sheet_columns(num_tiles, columns)
    num_rows = math.ceil(num_tiles / num_columns)
    sheet = np.zeros(
        (num_rows * (height + pad) + pad, num_columns * (width + pad) + pad, 3), dtype=np.uint8
    )
    for index, frame in enumerate(chosen):
        top, left = tile_origin(index, num_columns, height, width, pad)
        sheet[top : top + height, left : left + width] = frame
    return sheet


def write_png(
    path: str | Path,
    image: np.ndarray,
    provenance: Provenance | None = None,
    record: Mapping[str, Any] | None = None,
) -> Path:
    """Write uint8 [H, W, 3] (or [H, W]) as a PNG through `utils.atomic_path`.

    Why: a reader (TensorBoard, a pipeline step checking its outputs, a person) never sees half
    a file, and a crash mid-write leaves the previous sheet in place. With `provenance`, the PNG
    is signed with a C2PA manifest holding `record` (sample/provenance.py).
    """
    path = Path(path)
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise ValueError(
            f"image must be uint8 [H, W, 3] or [H, W], got {image.dtype} {image.shape}"
        )
    with output_path(path, provenance, record) as tmp:
        Image.fromarray(np.ascontiguousarray(image)).save(tmp, format="PNG")
    return path
