"""Forward+backward throughput of our DiT against diffusers' Wan transformer, same shape, on CPU.

    python tools/bench/dit_step.py --hidden 256 --depth 4 --heads 4 --frames 5 --height 24 \
        --width 24 --text-len 32 --batch 1 --iters 5
    python tools/bench/dit_step.py --compile ...   # also our DiT with compiled blocks
    python tools/bench/dit_step.py --mixed 8 ...   # ours only, on 8 packs of mixed shapes

Answers "is our packed DiT as fast as a well-known peer at the same size, and how close to the
machine's matmul peak does it run". Both models get the same latent video (ours packed into
tokens, Wan's as [B, C, F, H, W] with patch (1, 2, 2)), the same caption length and the same
width, depth, heads and MLP width; steps alternate between the two so a busy machine slows both
alike. Sizes are *latent* sizes (frames, height, width after the VAE). Prints one JSON line.

`--compile` adds our DiT with every block compiled as training compiles it (`dit_train.compile`,
`train/compile.py`), same weights: its step time, speed-up over eager, the compile time (first
call minus a compiled step) and Dynamo's recompiles during the timed steps. `--mixed N` gives
ours N different packs instead of one batch of equal samples, as training does: heights and
widths vary by one patch row/column, caption lengths by up to +-25%, so token counts change every
step and the per-sample attention path runs; Wan cannot take such packs and is left out.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from sora_lightning.models.dit import DiT, DiTConfig
from sora_lightning.models.patches import patchify, seqlens_to_cu, token_grid
from sora_lightning.models.stats import dit_forward_flops
from sora_lightning.train.callbacks import measure_matmul_flops
from sora_lightning.train.compile import compile_blocks, compile_counters

PATCH = (1, 2, 2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Model and input sizes; the defaults finish in well under two minutes on two cores."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256, help="transformer width D")
    parser.add_argument("--depth", type=int, default=4, help="transformer blocks")
    parser.add_argument("--heads", type=int, default=4, help="attention heads")
    parser.add_argument("--mlp", type=int, default=None, help="MLP width (default 4 x hidden)")
    parser.add_argument("--channels", type=int, default=16, help="latent channels C")
    parser.add_argument("--frames", type=int, default=5, help="latent frames F")
    parser.add_argument("--height", type=int, default=24, help="latent height")
    parser.add_argument("--width", type=int, default=24, help="latent width")
    parser.add_argument("--text-len", type=int, default=32, help="caption tokens per sample")
    parser.add_argument("--text-dim", type=int, default=384, help="text-encoder width Dt")
    parser.add_argument("--batch", type=int, default=1, help="samples (ours packed, Wan batched)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per model")
    parser.add_argument("--iters", type=int, default=5, help="timed steps per model")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument(
        "--matmul-size", type=int, default=2048, help="side of the square matmul for peak FLOP/s"
    )
    parser.add_argument(
        "--clock",
        choices=("wall", "process"),
        default="wall",
        help="wall: elapsed time; process: this process's CPU time (steadier on a busy machine, "
        "meaningful with --threads 1)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--compile", action="store_true", help="also time ours with compiled blocks (per block)"
    )
    parser.add_argument(
        "--mixed", type=int, default=0, help="N > 0: ours only, N packs of mixed sample shapes"
    )
    return parser.parse_args(argv)


def build_models(args: argparse.Namespace, peer: bool = True) -> tuple[DiT, nn.Module | None]:
    """Our DiT and (unless `peer` is False) a WanTransformer3DModel with the same width, depth,
    heads and MLP width."""
    mlp = args.mlp or 4 * args.hidden
    ours = DiT(
        DiTConfig(
            in_channels=args.channels,
            patch_size=PATCH,
            hidden_size=args.hidden,
            depth=args.depth,
            num_heads=args.heads,
            mlp_hidden_size=mlp,
            text_dim=args.text_dim,
            qk_norm=True,
            use_conditioning=False,  # Wan's text-to-video model has no conditioning channel
            attn_backend="sdpa",
        )
    )
    if not peer:
        return ours.train(), None
    from diffusers import WanTransformer3DModel

    wan = WanTransformer3DModel(
        patch_size=PATCH,
        num_attention_heads=args.heads,
        attention_head_dim=args.hidden // args.heads,
        in_channels=args.channels,
        out_channels=args.channels,
        text_dim=args.text_dim,
        ffn_dim=mlp,
        num_layers=args.depth,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
    )
    return ours.train(), wan.train()


def pack(latents: list[torch.Tensor], texts: list[torch.Tensor], timesteps: torch.Tensor) -> dict:
    """Latents [C, F, H, W] and caption states [S_i, Dt] -> our packed DiT inputs."""
    grids = [token_grid(tuple(latent.shape[1:]), PATCH) for latent in latents]
    return {
        "x": torch.cat([patchify(latent, PATCH) for latent in latents]),  # [L, P]
        "cu_seqlens": seqlens_to_cu([f * h * w for f, h, w in grids]),
        "grid_sizes": torch.tensor(grids, dtype=torch.int64),
        "timesteps": timesteps,
        "text": torch.cat(texts),  # [S, Dt]
        "text_cu_seqlens": seqlens_to_cu([text.shape[0] for text in texts]),
    }


def mixed_packs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """`args.mixed` packs of `args.batch` samples whose sizes and caption lengths vary (see doc)."""
    generator = torch.Generator().manual_seed(args.seed + 1)
    sides = [(0, 0), (-PATCH[1], PATCH[2]), (PATCH[1], -PATCH[2]), (0, -PATCH[2])]
    packs = []
    for _ in range(args.mixed):
        latents, texts = [], []
        for _ in range(args.batch):
            dh, dw = sides[int(torch.randint(len(sides), (1,), generator=generator))]
            shape = (args.channels, args.frames, args.height + dh, args.width + dw)
            spread = max(1, args.text_len // 4)
            length = args.text_len + int(
                torch.randint(-spread, spread + 1, (1,), generator=generator)
            )
            latents.append(torch.randn(shape, generator=generator))
            texts.append(torch.randn(max(1, length), args.text_dim, generator=generator))
        packs.append(pack(latents, texts, torch.rand(args.batch, generator=generator)))
    return packs


def make_inputs(args: argparse.Namespace) -> dict[str, Any]:
    """One latent batch and caption states, in Wan's layout and in our packed layout."""
    generator = torch.Generator().manual_seed(args.seed)
    shape = (args.batch, args.channels, args.frames, args.height, args.width)
    latents = torch.randn(shape, generator=generator)  # B C F H W
    text = torch.randn(args.batch, args.text_len, args.text_dim, generator=generator)  # B S Dt
    timesteps = torch.rand(args.batch, generator=generator)  # [B] in [0, 1]
    grid = token_grid((args.frames, args.height, args.width), PATCH)
    tokens_per_sample = grid[0] * grid[1] * grid[2]
    packed = pack(list(latents), list(text), timesteps)
    wan = {
        "hidden_states": latents,
        "timestep": timesteps * 1000.0,  # Wan's timesteps live on [0, 1000]
        "encoder_hidden_states": text,
        "return_dict": False,
    }
    return {"ours": packed, "peer": wan, "grid": grid, "tokens": tokens_per_sample * args.batch}


def train_step(
    model: nn.Module, inputs: dict[str, Any], clock: Callable[[], float] = time.perf_counter
) -> float:
    """One forward+backward (loss = mean square of the output); returns its time in s."""
    start = clock()
    out = model(**inputs)
    out = out[0] if isinstance(out, tuple) else out
    out.float().square().mean().backward()
    elapsed = clock() - start
    model.zero_grad(set_to_none=True)
    return elapsed


def time_alternating(
    steps: dict[str, Callable[[], float]], warmup: int, iters: int
) -> tuple[dict[str, float], int]:
    """Median step time of each callable (they take turns so background load hits all alike),
    and how many frames Dynamo compiled during the timed steps (recompiles, 0 if none)."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    before = compile_counters()["compile"]["frames_compiled"]
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(iters):
        for name, step in steps.items():
            times[name].append(step())
    after = compile_counters()["compile"]["frames_compiled"]
    return {name: statistics.median(values) for name, values in times.items()}, after - before


def cycle(model: nn.Module, packs: list[dict[str, Any]], clock: Callable[[], float]):
    """A step callable that trains on the next pack each call."""
    packs_iter = itertools.cycle(packs)
    return lambda: train_step(model, next(packs_iter), clock)


def time_compiled(
    ours: DiT, packs: list[dict[str, Any]], clock: Callable[[], float]
) -> tuple[Callable[[], float], float]:
    """A copy of ours with compiled blocks (same weights), and its first step's time (compiles)."""
    compiled = copy.deepcopy(ours)
    compile_blocks(compiled)
    return cycle(compiled, packs, clock), train_step(compiled, packs[0], clock)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build the models, time them and return the JSON-ready result."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    ours, peer = build_models(args, peer=not args.mixed)
    inputs = make_inputs(args)
    packs = mixed_packs(args) if args.mixed else [inputs["ours"]]
    clock = time.process_time if args.clock == "process" else time.perf_counter
    peak = measure_matmul_flops(args.matmul_size, clock=clock)
    steps = {"ours": cycle(ours, packs, clock)}
    if peer is not None:
        steps["peer"] = lambda: train_step(peer, inputs["peer"], clock)
    if args.compile:
        steps["compiled"], first_compiled_s = time_compiled(ours, packs, clock)
    medians, frames_during_timing = time_alternating(steps, args.warmup, args.iters)
    grids = [[tuple(g) for g in p["grid_sizes"].tolist()] for p in packs]
    text_lens = [p["text_cu_seqlens"].diff().tolist() for p in packs]
    flops = 3 * statistics.mean(
        dit_forward_flops(ours.config, g, t) for g, t in zip(grids, text_lens, strict=True)
    )
    tokens = statistics.mean(int(p["cu_seqlens"][-1]) for p in packs)
    result = {
        "ours_tokens_per_s": tokens / medians["ours"],
        "mfu": flops / medians["ours"] / peak,
        "ours_step_s": medians["ours"],
        "matmul_flops_per_s": peak,
        "train_flops_per_step": flops,
        "params_ours": sum(p.numel() for p in ours.parameters()),
        "video_tokens": tokens,
        "packs": len(packs),
        "token_grid": list(inputs["grid"]),
        "threads": torch.get_num_threads(),
        "config": {**vars(args), "mlp": ours.config.mlp_dim, "ours": asdict(ours.config)},
    }
    if peer is not None:
        result.update(
            peer_tokens_per_s=tokens / medians["peer"],
            ratio=medians["peer"] / medians["ours"],
            peer_mfu=flops / medians["peer"] / peak,
            peer_step_s=medians["peer"],
            params_peer=sum(p.numel() for p in peer.parameters()),
            peer="diffusers.WanTransformer3DModel",
        )
    if args.compile:
        result.update(
            compiled_step_s=medians["compiled"],
            compiled_mfu=flops / medians["compiled"] / peak,
            compile_speedup=medians["ours"] / medians["compiled"],
            compile_s=first_compiled_s - medians["compiled"],
            recompiles_during_timing=frames_during_timing,
            **compile_counters(),
        )
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Print and return the benchmark result as one JSON line."""
    result = run(parse_args(argv))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
