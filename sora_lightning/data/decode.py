"""Media bytes <-> uint8 frames with PyAV (FFmpeg), entirely in memory.

Shards hold media bytes untouched, so every read goes through here: one place decides what
"broken" means. Bad input never hangs and never leaks an FFmpeg exception: it raises
`MediaError` whose `reason` is one of `MEDIA_ERROR_REASONS`, so ingest and the data loader
can count skipped files by cause. What a file is comes from its bytes (FFmpeg's content
probe, never a file name): bytes FFmpeg cannot open and that carry no known media signature
are "unsupported_format" (a PDF, notes, random bytes); broken media of a known container are
"truncated" or "undecodable".

Frames are uint8 numpy arrays [T, H, W, 3] (RGB); an image is a 1-frame video. Colour conversion
(and, with a converter such as `resize.FitFrame`, resizing) goes through one FFmpeg swscale
context per decode call: building a context per frame, as `VideoFrame.to_ndarray` does, cost
about as much as decoding the frame.
"""

from __future__ import annotations

import io
import os
import struct
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np
from av.video.reformatter import VideoReformatter

MEDIA_ERROR_REASONS = (
    "zero_byte",
    "truncated",
    "undecodable",
    "unsupported_codec",
    "no_video_stream",
    "unsupported_format",
)
"""Every `MediaError.reason`; ingest summaries count skipped files by these names."""

_MEDIA_MAGIC = (
    b"\x1aE\xdf\xa3",  # EBML: matroska, webm
    b"RIFF",  # avi, webp (and wav)
    b"FLV",
    b"\x89PNG",
    b"\xff\xd8\xff",  # jpeg
    b"GIF8",
    b"OggS",
    b"0&\xb2u\x8ef\xcf\x11",  # asf, wmv
    b"\x00\x00\x01",  # MPEG start code: program stream, raw MPEG-1/2/4, h264/hevc
    b"\x00\x00\x00\x01",  # Annex-B h264/hevc
    b"II*\x00",  # tiff
    b"MM\x00*",
    b"YUV4MPEG2",
    b"DKIF",  # ivf
    b"\x06\x0e+4",  # mxf
    b"nut/multimedia",
)
"""Leading bytes of media containers: a file with one that FFmpeg cannot open is broken media
("undecodable"), not "unsupported_format". ISO-BMFF and MPEG-TS are recognised in
`_has_media_signature`."""
_ISO_BOXES = (b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip", b"pnot")
"""Top-level boxes a mp4/mov file starts with (bytes 4..8)."""
_TS_PACKET = 188
"""MPEG-TS packet size: a transport stream has a sync byte "G" at 0 and 188."""
_HEAD_BYTES = 2 * _TS_PACKET
"""Leading bytes `sniff_file` hands to `_has_media_signature`."""
_NOT_MEDIA = "FFmpeg cannot open it as media and its bytes start like no media container ({error})"

_IMAGE_FORMATS = ("image2", "image2pipe")
"""FFmpeg demuxers (besides the `*_pipe` family) that read single still images."""

_MAX_FRAMES = 1_000_000
"""Hard stop for decoding loops, so a pathological stream cannot loop forever."""


FrameConverter = Callable[[av.VideoFrame, VideoReformatter], np.ndarray]
"""(decoded frame, the call's reformatter) -> uint8 [H, W, 3] RGB; `rgb_frame` or `resize.FitFrame`."""


def rgb_frame(frame: av.VideoFrame, reformatter: VideoReformatter) -> np.ndarray:
    """A decoded frame as uint8 [H, W, 3] RGB at its coded size (same pixels as `to_ndarray`)."""
    return reformatter.reformat(frame, format="rgb24").to_ndarray()


class MediaError(Exception):
    """Raised for media that cannot be used; `reason` says why in a countable word."""

    def __init__(self, reason: str, message: str) -> None:
        if reason not in MEDIA_ERROR_REASONS:
            raise ValueError(
                f"unknown media error reason {reason!r}; expected one of {MEDIA_ERROR_REASONS}"
            )
        super().__init__(reason, message)  # both in args: the error pickles across processes
        self.reason = reason
        self.message = message

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"


@dataclass(frozen=True)
class MediaInfo:
    """What a file holds, read from container headers (cheap: no pixel decoding)."""

    fps: float
    """Average frame rate; 0.0 for still images."""
    num_frames: int
    """Frames in the first video stream (1 for an image)."""
    width: int
    """Coded picture width in pixels."""
    height: int
    """Coded picture height in pixels."""
    duration: float
    """Seconds; 0.0 for still images."""
    codec: str
    """FFmpeg decoder name, e.g. "h264", "png", "mjpeg"."""
    is_image: bool
    """True for still-image formats (png, jpeg, ...)."""
    container: str = ""
    """FFmpeg's demuxer, e.g. "mp4", "mov", "matroska", "webm", "mpegts", "gif", "png_pipe"
    (ISO-BMFF split into mp4/mov by its brand, matroska/webm by its DocType);
    `shards.member_ext` names the shard member after it."""


def encode_mp4(frames: np.ndarray, fps: int, crf: int = 12) -> bytes:
    """Frames [T, H, W, 3] uint8 -> H.264 mp4 bytes (yuv420p), so synthetic clips look like real ones.

    H and W must be even (yuv420p subsampling). Low `crf` keeps the round trip near lossless.
    Not byte-repeatable on every CPU: on this project's AMD Zen 5 machines about 4% of world
    clips encoded twice in one process came out different (decoded pixels up to ~37 levels
    apart in a few places, mean under 0.2), with one encoder thread and with frames converted
    to yuv420p beforehand alike, so the cause is inside x264 and the rest of a run is keyed on
    what the clips show, not on their bytes.
    """
    _check_frames(frames)
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(
            f"H.264 yuv420p needs even height and width, got {frames.shape[1]}x{frames.shape[2]}"
        )
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height = int(frames.shape[2]), int(frames.shape[1])
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf)}
        for frame in frames:
            container.mux(
                stream.encode(
                    av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
                )
            )
        container.mux(stream.encode(None))
    return buffer.getvalue()


def encode_png(frame: np.ndarray) -> bytes:
    """One frame [H, W, 3] uint8 -> PNG bytes (lossless), for image samples in shards."""
    _check_frames(frame[None])
    context = av.CodecContext.create("png", "w")
    context.width, context.height = int(frame.shape[1]), int(frame.shape[0])
    context.pix_fmt = "rgb24"
    packets = context.encode(
        av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
    )
    packets += context.encode(None)
    return b"".join(bytes(packet) for packet in packets)


def probe(data: bytes) -> MediaInfo:
    """Read headers of in-memory media; raises `MediaError` for anything unusable."""
    with _open(data) as container:
        stream = _video_stream(container)
        is_image = _is_image(container)
        fps = 0.0 if is_image else _fps(stream)
        num_frames = 1 if is_image else (stream.frames or _count_packets(data))
        return MediaInfo(
            fps=fps,
            num_frames=int(num_frames),
            width=int(stream.codec_context.width),
            height=int(stream.codec_context.height),
            duration=0.0 if is_image else _duration(container, stream, num_frames, fps),
            codec=stream.codec_context.name,
            is_image=is_image,
            container=_container_name(container, data),
        )


def sniff_file(path: str | os.PathLike) -> None:
    """Refuse a file on disk that is no video/image media at all, reading only what FFmpeg needs.

    Raises `MediaError` ("zero_byte", "unsupported_format", "no_video_stream",
    "unsupported_codec") with the reason `probe` would give for the whole file's bytes, so a
    large non-media file (an archive, a document) is refused without reading it whole. Returns
    None for anything that may be media, broken or not: `check_media` on the bytes decides.
    FFmpeg reads the file through an unnamed handle, so the file name plays no part.
    """
    with open(path, "rb") as handle:
        head = handle.read(_HEAD_BYTES)
        if not head:
            raise MediaError("zero_byte", "the file is empty")
        handle.seek(0)
        try:
            container = av.open(_Unnamed(handle), mode="r")
        except (av.FFmpegError, ValueError, OSError) as error:
            if _has_media_signature(head):
                return
            raise MediaError("unsupported_format", _NOT_MEDIA.format(error=error)) from error
        with container:
            _video_stream(container)


class _Unnamed:
    """A file handle without a `name`: PyAV would pass the name on, and FFmpeg's probe would
    then trust its extension."""

    def __init__(self, handle: io.BufferedReader) -> None:
        self._handle = handle

    def read(self, size: int = -1) -> bytes:
        return self._handle.read(size)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._handle.seek(offset, whence)

    def tell(self) -> int:
        return self._handle.tell()


def decode_video(
    data: bytes,
    *,
    frame_indices: Sequence[int] | None = None,
    convert: FrameConverter = rgb_frame,
    threads: int = 0,
) -> tuple[np.ndarray, float]:
    """Media bytes -> (frames [T, H, W, 3] uint8, fps).

    With `frame_indices`, frames come back in the order asked (repeats allowed), decoding stops
    after the largest index and only the asked frames are converted, so a short clip from a long
    video stays cheap. `convert` turns each kept frame into RGB (e.g. resized by FFmpeg).
    `threads` is the decoder's thread count: 0 lets FFmpeg choose (frame + slice threads, the
    fastest wall clock for one long decode); 1 decodes in the calling thread, the least CPU per
    clip, for DataLoader workers that already decode clips in parallel (see `_video_stream`).
    """
    wanted = None if frame_indices is None else [int(i) for i in frame_indices]
    if wanted is not None and (not wanted or min(wanted) < 0):
        raise ValueError(
            f"frame_indices must be a non-empty list of non-negative ints, got {frame_indices}"
        )
    with _open(data) as container:
        stream = _video_stream(container, threads=threads)
        fps = 0.0 if _is_image(container) else _fps(stream)
        declared = int(stream.frames or 0)
        keep = None if wanted is None else set(wanted)
        decoded: dict[int, np.ndarray] = {}
        stop = None if wanted is None else max(wanted) + 1
        num_decoded = 0
        reformatter = VideoReformatter()  # one swscale context for every frame of the clip
        for index, frame in _decode_frames(container, stream, data, stop):
            num_decoded = index + 1
            if keep is None or index in keep:
                decoded[index] = convert(frame, reformatter)
    _check_complete(data, num_decoded, declared if wanted is None else 0)
    if wanted is None:
        return np.stack([decoded[i] for i in range(num_decoded)]), fps
    missing = [i for i in wanted if i not in decoded]
    if missing:
        if declared > max(missing):
            raise MediaError(
                "truncated",
                f"stream declares {declared} frames but decoding stopped at {num_decoded}",
            )
        raise ValueError(
            f"frame indices {missing[:5]} out of range for a video of {num_decoded} frames"
        )
    return np.stack([decoded[i] for i in wanted]), fps


def decode_image(data: bytes) -> np.ndarray:
    """Image bytes -> [1, H, W, 3] uint8 (for a video: its first frame)."""
    frames, _ = decode_video(data, frame_indices=[0])
    return frames


def check_media(data: bytes) -> MediaInfo:
    """Probe and decode every frame (without colour conversion) so ingest rejects broken files early.

    Stricter than `decode_video`: a file whose byte structure is cut short is refused even when
    every frame still decodes. Returns the probed info with `num_frames` replaced by the count
    actually decoded.
    """
    info = probe(data)
    if _looks_truncated(data):
        raise MediaError("truncated", "the container structure ends before its last box/chunk")
    with _open(data) as container:
        stream = _video_stream(container)
        num_decoded = sum(1 for _ in _decode_frames(container, stream, data, None))
    _check_complete(data, num_decoded, 0 if info.is_image else info.num_frames)
    if info.is_image:
        return info
    duration = num_decoded / info.fps if info.fps > 0 else info.duration
    return MediaInfo(**{**info.__dict__, "num_frames": num_decoded, "duration": duration})


def _check_frames(frames: np.ndarray) -> None:
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8:
        raise ValueError(
            f"frames must be a uint8 numpy array, got {type(frames).__name__} {getattr(frames, 'dtype', '')}"
        )
    if frames.ndim != 4 or frames.shape[-1] != 3 or min(frames.shape) < 1:
        raise ValueError(
            f"frames must be [T, H, W, 3] with T, H, W >= 1, got {tuple(frames.shape)}"
        )


@contextmanager
def _open(data: bytes) -> Iterator[av.container.InputContainer]:
    """Open in-memory media, mapping every FFmpeg failure to a `MediaError` reason."""
    if len(data) == 0:
        raise MediaError("zero_byte", "the file is empty")
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except (av.FFmpegError, ValueError, OSError) as error:
        if not _has_media_signature(data):
            raise MediaError("unsupported_format", _NOT_MEDIA.format(error=error)) from error
        reason = "truncated" if _looks_truncated(data) else "undecodable"
        raise MediaError(reason, f"FFmpeg cannot open it ({error})") from error
    try:
        yield container
    finally:
        container.close()


def _video_stream(container: av.container.InputContainer, threads: int = 0) -> av.VideoStream:
    """The first video stream, set to decode with `threads` threads (0: FFmpeg's choice).

    FFmpeg's choice (cores + 1 threads) is frame threading: each thread gets its own decoder
    copy and output lags by one frame per thread, so a short clip pays thread start-up and
    decodes frames past the last one wanted. On the VAE loader's clips (1-17 frames of short
    videos) that cost about a quarter more CPU than decoding in the calling thread.
    """
    if not container.streams.video:
        kinds = sorted({stream.type for stream in container.streams})
        if not kinds:
            raise MediaError(
                "unsupported_format", f"FFmpeg reads it as {container.format.name} with no streams"
            )
        raise MediaError(
            "no_video_stream", f"container {container.format.name} has streams {kinds} but no video"
        )
    stream = container.streams.video[0]
    context = stream.codec_context
    if context is None or not context.name or context.name == "none":
        raise MediaError("unsupported_codec", "FFmpeg has no decoder for the video stream")
    try:
        av.Codec(context.name, "r")
    except (av.FFmpegError, ValueError) as error:
        raise MediaError("unsupported_codec", f"no decoder for codec {context.name!r}") from error
    stream.thread_type = "AUTO"
    stream.codec_context.thread_count = threads
    return stream


def _decode_frames(
    container: av.container.InputContainer, stream: av.VideoStream, data: bytes, stop: int | None
) -> Iterator[tuple[int, av.VideoFrame]]:
    """Yield (index, frame) until the stream ends or `stop` frames; errors become `MediaError`."""
    limit = _MAX_FRAMES if stop is None else min(stop, _MAX_FRAMES)
    index = -1
    try:
        for index, frame in enumerate(container.decode(stream)):
            yield index, frame
            if index + 1 >= limit:
                return
    except (av.FFmpegError, ValueError, OSError) as error:
        if index >= 0 or _looks_truncated(data):
            raise MediaError(
                "truncated", f"decoding failed after {index + 1} frames ({error})"
            ) from error
        raise MediaError("undecodable", f"no frame decodes ({error})") from error


def _check_complete(data: bytes, num_decoded: int, declared: int) -> None:
    """Zero frames is never fine; fewer than declared is truncation when the bytes look cut."""
    if num_decoded == 0:
        reason = "truncated" if declared > 0 or _looks_truncated(data) else "undecodable"
        raise MediaError(reason, "no frame could be decoded")
    if num_decoded < declared and _looks_truncated(data):
        raise MediaError(
            "truncated", f"stream declares {declared} frames, only {num_decoded} decode"
        )


def _is_image(container: av.container.InputContainer) -> bool:
    name = container.format.name
    return name.endswith("_pipe") or name in _IMAGE_FORMATS


def _fps(stream: av.VideoStream) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else 0.0


def _duration(
    container: av.container.InputContainer, stream: av.VideoStream, num_frames: int, fps: float
) -> float:
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / av.time_base
    return num_frames / fps if fps > 0 else 0.0


def _count_packets(data: bytes) -> int:
    """Frame count for containers that do not store it (mkv, webm, avi): demux, don't decode."""
    with _open(data) as container:
        stream = container.streams.video[0]
        try:
            return sum(1 for packet in container.demux(stream) if packet.size > 0)
        except av.FFmpegError as error:
            raise MediaError("truncated", f"demuxing failed ({error})") from error


def _has_media_signature(data: bytes) -> bool:
    """Do the leading bytes belong to a media container (so a failure to open means breakage)?"""
    if data.startswith(_MEDIA_MAGIC) or data[4:8] in _ISO_BOXES:
        return True
    return data[:1] == data[_TS_PACKET : _TS_PACKET + 1] == b"G"  # MPEG-TS sync bytes


def _container_name(container: av.container.InputContainer, data: bytes) -> str:
    """FFmpeg's demuxer name, with its shared ISO-BMFF and matroska demuxers split by brand."""
    name = container.format.name
    if name.startswith("mov,"):
        brand = str(container.metadata.get("major_brand", "")).strip()
        return "mov" if data[4:8] != b"ftyp" or brand == "qt" else "mp4"
    if name.startswith("matroska"):
        return "webm" if b"\x42\x82\x84webm" in data[:64] else "matroska"
    return name


def _looks_truncated(data: bytes) -> bool:
    """Does the byte structure say the file was cut short (rather than being garbage)?"""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return b"IEND" not in data[-16:]
    if data.startswith(b"\xff\xd8"):
        return not data.rstrip(b"\x00").endswith(b"\xff\xd9")
    if data[4:8] == b"ftyp":
        return _iso_box_overruns(data)
    return False


def _iso_box_overruns(data: bytes) -> bool:
    """Walk top-level ISO-BMFF (mp4/mov) boxes: a box reaching past the end means truncation."""
    offset = 0
    while offset + 8 <= len(data):
        size = struct.unpack(">I", data[offset : offset + 4])[0]
        if size == 1:
            if offset + 16 > len(data):
                return True
            size = struct.unpack(">Q", data[offset + 8 : offset + 16])[0]
        elif size == 0:
            return False
        if size < 8:
            return False
        offset += size
    return offset > len(data) or 0 < len(data) - offset < 8
