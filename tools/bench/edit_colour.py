"""Editing a world clip's colour by prompt (SDEdit): what the detector reads, per edit strength.

    python tools/bench/edit_colour.py --ckpt runs/demo/export              # 16 clips x 5 strengths
    python tools/bench/edit_colour.py --ckpt runs/demo/export --clips 4 --strengths 0,0.6
    python tools/bench/edit_colour.py --tiny --clips 2 --strengths 0,1 --steps 2   # the test

Each clip is a rendered single-object world clip (held-out and seen triples alike, eval motions,
the sampling size); its prompt names another colour and the clip's own shape and motion. For
every strength s the clip is edited with `video=` semantics (`Given(edit_strength=s)`) and the
detector reads the result: `target_colour` is the fraction now in the prompt's colour,
`kept_shape` / `kept_motion` the fractions whose shape / motion stayed the clip's. s = 0 must
return the VAE's reconstruction of the clip (`max_pixel_gap_at_0`: the largest pixel difference
from it, 0-255); s = 1 is text-to-video with the edit prompt. One JSON line on stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from sora_lightning.data.world import (  # noqa: E402
    COLOURS,
    EVAL_MOTIONS,
    RESOLUTIONS,
    Scene,
    render,
    sample_scene,
    short_prompt,
)
from sora_lightning.diffusion.sampling import SamplingConfig  # noqa: E402
from sora_lightning.eval.detector import detect  # noqa: E402
from sora_lightning.sample.generate import Given, VideoGenerator  # noqa: E402


def edit_cases(num_clips: int, seed: int, config: SamplingConfig) -> list[tuple[Scene, str]]:
    """(clip scene, edit prompt) pairs: the prompt names another colour, same shape and motion."""
    sizes = {size: name for name, size in RESOLUTIONS.items()}
    resolution = sizes.get((config.width, config.height))
    if resolution is None:
        raise SystemExit(
            f"no world resolution is {config.width}x{config.height}: pass one of {sizes}"
        )
    rng = np.random.default_rng(seed)
    cases = []
    for _ in range(num_clips):
        scene = sample_scene(
            rng,
            num_frames=config.frames,
            resolution=resolution,
            max_objects=1,
            split="all",
            motions=EVAL_MOTIONS,
        )
        obj = scene.objects[0]
        target = str(rng.choice([c for c in COLOURS if c != obj.colour]))
        edited = dataclasses.replace(scene, objects=(dataclasses.replace(obj, colour=target),))
        cases.append((scene, short_prompt(edited)))
    return cases


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", help="export folder or .ckpt of a world model")
    source.add_argument("--tiny", action="store_true", help="random tiny models (tests)")
    parser.add_argument("--clips", type=int, default=16)
    parser.add_argument("--strengths", default="0,0.4,0.6,0.8,1.0")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    return parser.parse_args(argv)


def load(args: argparse.Namespace) -> VideoGenerator:
    """The model under test: an export, or long_video.py's tiny random models (--tiny)."""
    spec = importlib.util.spec_from_file_location(
        "long_video", Path(__file__).with_name("long_video.py")
    )
    long_video = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(long_video)
    return long_video.load(args)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    config = SamplingConfig(steps=args.steps, seed=args.seed)
    generator = load(args)
    cases = edit_cases(args.clips, args.seed, config)
    results, largest_at_0, start = {}, 0.0, time.perf_counter()
    for strength in [float(s) for s in args.strengths.split(",")]:
        hits = {"target_colour": 0, "kept_shape": 0, "kept_motion": 0}
        for scene, prompt in cases:
            clip = render(scene)
            video = generator.generate(prompt, config, Given(frames=clip, edit_strength=strength))
            found, truth = detect(video.frames), scene.objects[0]
            hits["target_colour"] += found.colour == prompt.split()[1]
            hits["kept_shape"] += found.shape == truth.shape
            hits["kept_motion"] += found.motion == truth.motion
            if strength == 0.0:
                reference = generator.reconstruct(clip).astype(np.int16)
                gap = np.abs(video.frames.astype(np.int16) - reference).max()
                largest_at_0 = max(largest_at_0, float(gap))
        results[str(strength)] = {k: v / len(cases) for k, v in hits.items()}
    record = {
        "model": args.ckpt or "tiny random",
        "clips": len(cases),
        "steps": args.steps,
        "by_strength": results,
        "max_pixel_gap_at_0": largest_at_0,
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(record))
    return record


if __name__ == "__main__":
    main()
