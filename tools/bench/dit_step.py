"""Forward+backward throughput of our DiT against diffusers' Wan transformer, same shape, on CPU.

    python tools/bench/dit_step.py --hidden 256 --depth 4 --heads 4 --frames 5 --height 24 \
        --width 24 --text-len 32 --batch 1 --iters 5

Answers "is our packed DiT as fast as a well-known peer at the same size, and how close to the
machine's matmul peak does it run". Both models get the same latent video (ours packed into
tokens, Wan's as [B, C, F, H, W] with patch (1, 2, 2)), the same caption length and the same
width, depth, heads and MLP width; steps alternate between the two so a busy machine slows both
alike. Sizes are *latent* sizes (frames, height, width after the VAE). Prints one JSON line.
"""

from __future__ import annotations

import argparse
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
    return parser.parse_args(argv)


def build_models(args: argparse.Namespace) -> tuple[DiT, nn.Module]:
    """Our DiT and a WanTransformer3DModel with the same width, depth, heads and MLP width."""
    from diffusers import WanTransformer3DModel

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
    peer = WanTransformer3DModel(
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
    return ours.train(), peer.train()


def make_inputs(args: argparse.Namespace) -> dict[str, Any]:
    """One latent batch and caption states, in Wan's layout and in our packed layout."""
    generator = torch.Generator().manual_seed(args.seed)
    shape = (args.batch, args.channels, args.frames, args.height, args.width)
    latents = torch.randn(shape, generator=generator)  # B C F H W
    text = torch.randn(args.batch, args.text_len, args.text_dim, generator=generator)  # B S Dt
    timesteps = torch.rand(args.batch, generator=generator)  # [B] in [0, 1]
    grid = token_grid((args.frames, args.height, args.width), PATCH)
    tokens_per_sample = grid[0] * grid[1] * grid[2]
    packed = {
        "x": torch.cat([patchify(latent, PATCH) for latent in latents]),  # [L, P]
        "cu_seqlens": seqlens_to_cu([tokens_per_sample] * args.batch),
        "grid_sizes": torch.tensor([grid] * args.batch, dtype=torch.int64),
        "timesteps": timesteps,
        "text": text.flatten(0, 1),  # [S, Dt]
        "text_cu_seqlens": seqlens_to_cu([args.text_len] * args.batch),
    }
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
) -> dict[str, float]:
    """Median step time of each callable; they take turns so background load hits all alike."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(iters):
        for name, step in steps.items():
            times[name].append(step())
    return {name: statistics.median(values) for name, values in times.items()}


def matmul_flops_per_s(
    size: int = 2048, repeats: int = 5, clock: Callable[[], float] = time.perf_counter
) -> float:
    """Peak-ish fp32 FLOP rate of this machine: median of a few large square matmuls."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)  # warm the BLAS threads
    times = []
    for _ in range(repeats):
        start = clock()
        torch.mm(a, b)
        times.append(clock() - start)
    return 2 * size**3 / statistics.median(times)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build both models, time them and return the JSON-ready result."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    ours, peer = build_models(args)
    inputs = make_inputs(args)
    clock = time.process_time if args.clock == "process" else time.perf_counter
    peak = matmul_flops_per_s(args.matmul_size, clock=clock)
    medians = time_alternating(
        {
            "ours": lambda: train_step(ours, inputs["ours"], clock),
            "peer": lambda: train_step(peer, inputs["peer"], clock),
        },
        args.warmup,
        args.iters,
    )
    flops = 3 * dit_forward_flops(
        ours.config, [inputs["grid"]] * args.batch, [args.text_len] * args.batch
    )
    tokens = inputs["tokens"]
    return {
        "ours_tokens_per_s": tokens / medians["ours"],
        "peer_tokens_per_s": tokens / medians["peer"],
        "ratio": medians["peer"] / medians["ours"],
        "mfu": flops / medians["ours"] / peak,
        "peer_mfu": flops / medians["peer"] / peak,
        "ours_step_s": medians["ours"],
        "peer_step_s": medians["peer"],
        "matmul_flops_per_s": peak,
        "train_flops_per_step": flops,
        "params_ours": sum(p.numel() for p in ours.parameters()),
        "params_peer": sum(p.numel() for p in peer.parameters()),
        "peer": "diffusers.WanTransformer3DModel",
        "video_tokens": tokens,
        "token_grid": list(inputs["grid"]),
        "threads": torch.get_num_threads(),
        "config": {**vars(args), "mlp": ours.config.mlp_dim, "ours": asdict(ours.config)},
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Print and return the benchmark result as one JSON line."""
    result = run(parse_args(argv))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
