"""Can a DiT config learn motion words? Trains it on synthetic moving-disc latents, prints JSON.

    python tools/bench/motion_probe.py                       # demo DiT, MiniLM last layer, ~6 min
    python tools/bench/motion_probe.py --text-layers 0,-1    # token embeddings beside it
    python tools/bench/motion_probe.py --centre-jitter 1     # paths centred +-1 latent px
    python tools/bench/motion_probe.py --tiny                # seconds: the test runs this
    python tools/bench/motion_probe.py --cache runs/demo/cache   # the world's own latents

Why: the demo DiT learns colour and shape but draws every held-out video still, and a full demo
takes 20 minutes, too slow to tell the text path, the architecture and the data budget apart.
This probe removes the VAE and the world's variety: one soft disc in a [4, 9, 12, 16] latent
(the demo's 17-frame 64x48 clip after a 4x-space, 2x-time VAE) moves left, right, up or down
at `--speed` latent pixels per latent frame, or stays still, in one of four colours (a fixed
channel vector each). Captions are the world's detailed captions of that scene ("A video of a
medium red circle on the left that moves slowly to the right, on a black background."), encoded
by the real text encoder; a clip starts anywhere the disc stays MARGIN inside the frame, or, with
`--centre-jitter`, with its path's midpoint within that many latent pixels of the centre (the
world's `dataset.path_spread`). The DiT from `--dit-config` trains with the real flow loss
(`flow.packed_batch_loss`, `--batch` clips a step like the demo's clip stages, AdamW as
`DiTModule`) and every `--eval-every` steps generates each motion from the centred caption
(Euler, shifted schedule, no guidance) and reads the disc's centroid travel over the clip:

- `direction_acc`: share of generated clips whose travel reads as the captioned motion
  (travel under half the true travel reads as "still"); chance 0.2.
- `along_px`: mean travel along the captioned direction over the four translations, and
  `along_ratio` = `along_px` over the same reading of a true clip (1.0: motion fully learned).

`--cache DIR` trains on a demo latent cache instead of discs: its one-object clips that move
left, right, up or down or stay still (`--cache-match REGEX` keeps those whose detailed caption
matches), normalised as the DiT data does, each step `--batch` of them drawn at random, with
their detailed captions (`--caption short`: their short prompts, also when sampling); generated
clips are read the same way (travel of the energy above each frame's median) from centred
captions of the world's colours and shapes. Why: it tells whether the world's data (its variety,
its finite clips, the VAE's latents) or the demo's training loop keeps the demo from learning
what the discs teach in 3,000 clips.
"""

from __future__ import annotations

import argparse
import json
import re
import tarfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import Tensor

from sora_lightning.data import world
from sora_lightning.data.latent_cache import layer_list, read_cache_meta
from sora_lightning.data.packing import pack_samples
from sora_lightning.diffusion import flow
from sora_lightning.models.dit import DiT, DiTConfig
from sora_lightning.models.patches import seqlens_to_cu, token_grid, unpatchify
from sora_lightning.models.text import TextEncoder, TextEncoderConfig

ROOT = Path(__file__).resolve().parents[2]
MOTIONS = ("left", "right", "up", "down", "still")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
COLOURS = {  # latent channel vector of each disc colour
    "red": (1.5, -1.0, 0.5, 1.0),
    "blue": (-1.0, 1.5, 1.0, -0.5),
    "green": (0.5, 1.0, -1.5, 1.0),
    "yellow": (1.0, 1.0, 1.0, -1.5),
}
DISC_RADIUS = 2.2  # latent pixels: a medium world object at 64x48 through a 4x-space VAE
MARGIN = 3.0  # latent pixels kept between the disc's centre and the border


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dit-config", default=str(ROOT / "conf/model/dit/demo.yaml"))
    parser.add_argument(
        "--text-layers", type=layer_list, default=(-1,), help="TextEncoderConfig.layers, e.g. 0,-1"
    )
    parser.add_argument("--steps", type=int, default=2000, help="training steps")
    parser.add_argument("--batch", type=int, default=3, help="clips per step")
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--eval-seeds", type=int, default=4, help="generated clips per motion")
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--speed", type=float, default=0.6, help="latent px per latent frame")
    parser.add_argument("--frames", type=int, default=9, help="latent frames")
    parser.add_argument("--height", type=int, default=12, help="latent height")
    parser.add_argument("--width", type=int, default=16, help="latent width")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--shift", type=float, default=4.0, help="timestep shift, train and sample")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument(
        "--centre-jitter",
        type=float,
        default=None,
        help="latent px the path's midpoint may lie from the centre (default: anywhere it fits)",
    )
    parser.add_argument("--cache", default=None, help="a latent cache: train on its world clips")
    parser.add_argument("--cache-match", default=None, help="regex on the detailed caption")
    parser.add_argument(
        "--motion-weight", type=float, default=0.0, help="flow loss motion_weight (0: plain)"
    )
    parser.add_argument(
        "--caption", choices=("detailed", "short"), default="detailed", help="caption form"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="tiny DiT, a few steps (for tests)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.steps, args.eval_every, args.eval_seeds, args.sample_steps = 4, 2, 1, 2
    for name in ("steps", "batch", "eval_every", "eval_seeds", "sample_steps", "frames"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for motion in DIRECTIONS:  # every translation must fit before anything loads
        try:
            random_start(np.random.default_rng(0), motion, args)
        except ValueError as error:
            parser.error(str(error))
    return args


def disc_latent(colour: str, motion: str, start: tuple[float, float], args: Any) -> Tensor:
    """[4, F, H, W] latent of one soft disc moving from `start` (latent px) at `args.speed`."""
    dir_x, dir_y = DIRECTIONS.get(motion, (0, 0))
    grid_y, grid_x = np.mgrid[0 : args.height, 0 : args.width] + 0.5
    latent = np.zeros((4, args.frames, args.height, args.width), np.float32)
    for frame in range(args.frames):
        centre_x = start[0] + dir_x * args.speed * frame
        centre_y = start[1] + dir_y * args.speed * frame
        radius = np.hypot(grid_x - centre_x, grid_y - centre_y)
        coverage = 1.0 / (1.0 + np.exp((radius - DISC_RADIUS) / 0.4))
        latent[:, frame] = np.asarray(COLOURS[colour])[:, None, None] * coverage
    return torch.from_numpy(latent)


def caption(
    colour: str, motion: str, start: tuple[float, float], args: Any, shape: str = "circle"
) -> str:
    """The world's caption of the same scene (`--caption`: detailed, with position words from the
    start point, or the short prompt)."""
    x0, y0 = start[0] / args.width, start[1] / args.height
    obj = world.ObjectSpec(shape, colour, "medium", motion, "slow", x0, y0)
    scene = world.Scene((obj,), "black", 64, 48, 17, world.FPS)
    return world.short_prompt(scene) if args.caption == "short" else world.detailed_caption(scene)


def random_start(rng: np.random.Generator, motion: str, args: Any) -> tuple[float, float]:
    """A start point that keeps the disc's centre MARGIN inside the frame for the whole clip, or,
    with `--centre-jitter`, puts the path's midpoint that close to the frame's centre."""
    travel = args.speed * (args.frames - 1)
    dir_x, dir_y = DIRECTIONS.get(motion, (0, 0))
    low_x, high_x = MARGIN + max(0, -dir_x) * travel, args.width - MARGIN - max(0, dir_x) * travel
    low_y, high_y = MARGIN + max(0, -dir_y) * travel, args.height - MARGIN - max(0, dir_y) * travel
    if high_x < low_x or high_y < low_y:
        raise ValueError(
            f"--speed {args.speed} moves the disc out of a {args.width}x{args.height} latent"
        )
    if args.centre_jitter is None:
        return float(rng.uniform(low_x, high_x)), float(rng.uniform(low_y, high_y))
    jitter = args.centre_jitter
    start_x = args.width / 2 - dir_x * travel / 2 + rng.uniform(-jitter, jitter)
    start_y = args.height / 2 - dir_y * travel / 2 + rng.uniform(-jitter, jitter)
    return float(start_x), float(start_y)


class Captions:
    """Caption -> text states [S, Dt], encoded once each (the probe reuses few captions)."""

    def __init__(self, encoder: TextEncoder) -> None:
        self.encoder = encoder
        self.cache: dict[str, Tensor] = {}

    @torch.no_grad()
    def __call__(self, text: str) -> Tensor:
        if text not in self.cache:
            encoded = self.encoder.encode([text])
            self.cache[text] = encoded.states[0][encoded.mask[0]]
        return self.cache[text]


def world_clips(args: Any) -> list[tuple[Tensor, str, str, bool]]:
    """(latent [C, F, h, w] normalised by the cache's mean/std, `--caption` text, motion, slow) of the
    cache's one-object clips of at least `--frames` latent frames that translate or stay still."""
    meta = read_cache_meta(args.cache)
    mean = torch.tensor(meta["latent_mean"]).view(-1, 1, 1, 1)
    std = torch.tensor(meta["latent_std"]).view(-1, 1, 1, 1)
    records: dict[str, dict[str, bytes]] = {}
    for shard in meta["shards"]:
        with tarfile.open(Path(args.cache) / shard) as archive:
            for member in archive.getmembers():
                key, ext = member.name.rsplit(".", 1)
                records.setdefault(key, {})[ext] = archive.extractfile(member).read()
    clips = []
    for record in records.values():
        captions = json.loads(record["json"])["captions"]
        objects = world.parse_prompt(captions.get("short", "")) or []
        motion = objects[0]["motion"] if len(objects) == 1 else None
        if motion not in MOTIONS or (
            args.cache_match and not re.search(args.cache_match, captions["detailed"])
        ):
            continue
        latent = safetensors.torch.load(record["safetensors"])["latent"]
        if latent.shape[1] >= args.frames:
            slow = "slowly" in captions["detailed"]
            clips.append(
                ((latent[:, : args.frames] - mean) / std, captions[args.caption], motion, slow)
            )
    if not clips:
        raise ValueError(
            f"--cache {args.cache}: no one-object clip of >= {args.frames} latent frames"
        )
    return clips


def travel(latent: Tensor) -> tuple[float, float]:
    """Centroid (x, y) travel of the latent's energy above each frame's per-channel median,
    last two frames against the first two."""
    flat = latent.flatten(2)  # [C, F, H*W]
    energy = (flat - flat.median(dim=2, keepdim=True).values).pow(2).sum(0)
    energy = energy.view(latent.shape[1:])  # [F, H, W]
    frames, height, width = energy.shape
    grid_y, grid_x = torch.meshgrid(
        torch.arange(height, dtype=torch.float32),
        torch.arange(width, dtype=torch.float32),
        indexing="ij",
    )
    total = energy.sum((1, 2)).clamp_min(1e-6)
    centre_x = (energy * grid_x).sum((1, 2)) / total
    centre_y = (energy * grid_y).sum((1, 2)) / total
    ends = min(2, frames // 2)
    return (
        float(centre_x[-ends:].mean() - centre_x[:ends].mean()),
        float(centre_y[-ends:].mean() - centre_y[:ends].mean()),
    )


def read_motion(delta: tuple[float, float], true_travel: float) -> str:
    """The motion a centroid travel reads as; under half the true travel is "still"."""
    delta_x, delta_y = delta
    if max(abs(delta_x), abs(delta_y)) < 0.5 * true_travel:
        return "still"
    if abs(delta_x) >= abs(delta_y):
        return "right" if delta_x > 0 else "left"
    return "down" if delta_y > 0 else "up"


def build_dit(args: Any, text_dim: int) -> DiT:
    """The DiT of `--dit-config` (a conf/model/dit preset) with the encoder's text width."""
    preset = OmegaConf.load(args.dit_config)
    if preset.get("_target_") != f"{DiTConfig.__module__}.{DiTConfig.__name__}":
        raise ValueError(
            f"--dit-config {args.dit_config} is not a DiT preset; pass one of conf/model/dit/*.yaml"
        )
    tiny = {"hidden_size": 32, "depth": 1, "num_heads": 2} if args.tiny else {}
    return DiT(instantiate(preset, text_dim=text_dim, **tiny))


@torch.no_grad()
def generate(dit: DiT, states: Tensor, args: Any, generator: torch.Generator) -> Tensor:
    """[4, F, H, W] latent generated for one caption (Euler, shifted schedule, no guidance)."""
    patch = tuple(dit.config.patch_size)
    grid = token_grid((args.frames, args.height, args.width), patch)
    num_tokens = grid[0] * grid[1] * grid[2]
    cu_seqlens = seqlens_to_cu([num_tokens])
    text_cu = seqlens_to_cu([states.shape[0]])
    grid_sizes = torch.tensor([grid])

    def velocity(x: Tensor, t: Tensor) -> Tensor:
        return dit(x, cu_seqlens, grid_sizes, t, states, text_cu)

    noise = torch.randn(num_tokens, dit.config.patch_dim, generator=generator)
    schedule = flow.sampling_schedule(args.sample_steps, args.shift)
    tokens = flow.euler_sample(velocity, noise, schedule, num_samples=1)
    return unpatchify(tokens, grid, patch, dit.config.in_channels)


def evaluate(dit: DiT, captions: Captions, args: Any, true_travel: float) -> dict[str, Any]:
    """Direction accuracy and travel along the captioned direction of generated clips."""
    dit.eval()
    generator = torch.Generator().manual_seed(args.seed + 1234)
    centre = (args.width / 2, args.height / 2)
    hits, along, mean_travel = 0, [], {}
    colours = list(world.COLOURS) if args.cache else list(COLOURS)
    for motion in MOTIONS:
        deltas = []
        for index in range(args.eval_seeds):
            colour = colours[(index + MOTIONS.index(motion)) % len(colours)]
            shape = world.SHAPES[index % len(world.SHAPES)] if args.cache else "circle"
            states = captions(caption(colour, motion, centre, args, shape))
            deltas.append(travel(generate(dit, states, args, generator)))
            hits += read_motion(deltas[-1], true_travel) == motion
            if motion in DIRECTIONS:
                along.append(float(np.dot(deltas[-1], DIRECTIONS[motion])))
        mean_travel[motion] = [round(float(v), 3) for v in np.mean(deltas, axis=0)]
    dit.train()
    along_px = float(np.mean(along))
    return {
        "direction_acc": hits / (len(MOTIONS) * args.eval_seeds),
        "along_px": round(along_px, 3),
        "along_ratio": round(along_px / true_travel, 3),
        "mean_travel": mean_travel,
    }


def train_step(dit: DiT, optimizer: torch.optim.Optimizer, batch: list, args: Any) -> float:
    """One step of the real flow loss on `batch` [(latent, states)] packed like the DiT data."""
    latents, texts = zip(*batch, strict=True)
    packed = pack_samples(list(latents), list(texts), tuple(dit.config.patch_size), 10**9)
    timesteps = flow.shift_timesteps(flow.sample_logit_normal(len(batch)), args.shift)
    loss = flow.packed_batch_loss(
        dit, packed, timesteps, torch.randn_like(packed.x), motion_weight=args.motion_weight
    )
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(dit.parameters(), 1.0)
    optimizer.step()
    return float(loss.detach())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    layers = args.text_layers
    encoder = TextEncoder(TextEncoderConfig(layers=layers))
    captions = Captions(encoder)
    dit = build_dit(args, encoder.hidden_size)
    optimizer = torch.optim.AdamW(dit.parameters(), lr=args.lr, betas=(0.9, 0.99))
    pool = world_clips(args) if args.cache else []
    if pool:
        right = [(travel(latent)[0], slow) for latent, _, m, slow in pool if m == "right"]
        if not right:
            raise ValueError(f"--cache {args.cache}: no one-object clip moves right to read travel")
        true_travel = float(np.median([x for x, slow in right if slow] or [x for x, _ in right]))
    else:
        start_point = random_start(np.random.default_rng(0), "right", args)
        true_travel = travel(disc_latent("red", "right", start_point, args))[0]
    curve, losses, started = [], [], time.perf_counter()
    for step in range(1, args.steps + 1):
        batch = []
        for index in rng.integers(len(pool), size=args.batch) if pool else ():
            latent, text, _, _ = pool[int(index)]
            batch.append((latent, captions(text)))
        for _ in range(0 if pool else args.batch):
            colour, motion = str(rng.choice(list(COLOURS))), str(rng.choice(MOTIONS))
            start = random_start(rng, motion, args)
            batch.append(
                (
                    disc_latent(colour, motion, start, args),
                    captions(caption(colour, motion, start, args)),
                )
            )
        losses.append(train_step(dit, optimizer, batch, args))
        if step % args.eval_every == 0 or step == args.steps:
            point = {"step": step, "loss": round(float(np.mean(losses[-100:])), 5)}
            curve.append(point | evaluate(dit, captions, args, true_travel))
    result = {
        "text_layers": list(layers),
        "dit_config": str(args.dit_config),
        "centre_jitter": args.centre_jitter,
        "cache": args.cache,
        "cache_match": args.cache_match,
        "motion_weight": args.motion_weight,
        "caption": args.caption,
        "pool_clips": len(pool),
        "steps": args.steps,
        "clips_seen": args.steps * args.batch,
        "true_along_px": round(true_travel, 3),
        "chance": 1 / len(MOTIONS),
        "final": curve[-1],
        "curve": curve,
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
