"""Peak memory and time of chunked VAE encode+decode for a short and a long clip, as JSON.

    python tools/bench/vae_memory.py --preset demo --short 17 --long 257 --size 64

Answers "does memory stay flat as the video grows": each clip is encoded with
`VideoVAE.encode_chunked` and decoded with `decode_chunked` (causal cache) in a *fresh
subprocess*, so one case's allocator state cannot leak into the other's. Memory is resident
memory (RSS), which is what torch's CPU allocator actually takes from the OS; the peak is
read from the kernel's high-water mark (VmHWM, reset right before the work through
/proc/self/clear_refs) or, where that is unavailable, from getrusage's ru_maxrss. "working"
memory is the peak minus the RSS just before encoding, with the model, the input clip and a
warmed-up runtime already resident; it includes the latents and the decoded clip, which
necessarily grow with length.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from sora_lightning.utils import peak_rss_bytes, reset_peak_rss, rss_bytes

PRESET_DIR = Path(__file__).resolve().parents[2] / "conf" / "model" / "vae"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Clip sizes and chunking; the defaults run in well under two minutes on two cores."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="demo", help="name in conf/model/vae or a YAML path")
    parser.add_argument(
        "--short",
        type=int,
        default=17,
        help="frames of the short clip (1 + k x the temporal factor)",
    )
    parser.add_argument(
        "--long",
        type=int,
        default=257,
        help="frames of the long clip (1 + k x the temporal factor)",
    )
    parser.add_argument("--size", type=int, default=64, help="frame height and width in pixels")
    parser.add_argument("--chunk-frames", type=int, default=8, help="pixel frames per chunk")
    parser.add_argument("--chunk-latents", type=int, default=2, help="latent frames per chunk")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def load_vae(preset: str) -> Any:
    """conf/model/vae/<preset>.yaml (or a YAML path) -> an eval-mode VideoVAE."""
    from omegaconf import OmegaConf

    from sora_lightning.models.vae import VAEConfig, VideoVAE

    path = Path(preset) if preset.endswith(".yaml") else PRESET_DIR / f"{preset}.yaml"
    if not path.is_file():
        raise SystemExit(f"no VAE preset {preset!r} at {path}")
    fields = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    fields.pop("_target_", None)
    return VideoVAE(VAEConfig(**fields)).eval()


def measure_case(args: argparse.Namespace, frames: int) -> dict[str, Any]:
    """Encode+decode one random clip of `frames` frames; runs inside the worker subprocess."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    vae = load_vae(args.preset)
    video = torch.rand(1, 3, frames, args.size, args.size) * 2 - 1  # B 3 T H W

    def encode_decode(clip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        latents = vae.encode_chunked(clip, args.chunk_frames).mode()  # B C F h w
        return latents, vae.decode_chunked(latents, args.chunk_latents)  # B 3 T H W

    encode_decode(video[:, :, : 1 + args.chunk_frames])  # warm up kernels and thread pools
    gc.collect()
    baseline = rss_bytes()
    reset_worked = reset_peak_rss()
    start, start_cpu = time.perf_counter(), time.process_time()
    latents, recon = encode_decode(video)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    peak = peak_rss_bytes(reset_worked)
    return {
        "frames": frames,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "peak_rss_bytes": peak,
        "baseline_rss_bytes": baseline,
        "working_peak_bytes": peak - baseline,
        "input_bytes": video.numel() * video.element_size(),
        "output_bytes": (latents.numel() + recon.numel()) * recon.element_size(),
        "peak_method": "VmHWM after clear_refs" if reset_worked else "ru_maxrss",
    }


def run_case(args: argparse.Namespace, frames: int) -> dict[str, Any]:
    """Run one case in a fresh interpreter and parse the JSON line it prints."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", str(frames)]
    for name in ("preset", "size", "chunk_frames", "chunk_latents", "threads", "seed"):
        value = getattr(args, name)
        if value is not None:
            argv += [f"--{name.replace('_', '-')}", str(value)]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"worker for {frames} frames failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _working(case: dict[str, Any]) -> int:
    """Working peak of a case, at least one page so tiny cases never divide by zero."""
    return max(case["working_peak_bytes"], resource.getpagesize())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Print and return {"peak_ratio_long_vs_short", "time_ratio", ...} as one JSON line."""
    args = parse_args(argv)
    if args.worker is not None:
        result = measure_case(args, args.worker)
    else:
        short, long = run_case(args, args.short), run_case(args, args.long)
        result = {
            "peak_ratio_long_vs_short": _working(long) / _working(short),
            "time_ratio": long["seconds"] / short["seconds"],
            "cpu_time_ratio": long["cpu_seconds"] / short["cpu_seconds"],
            "frame_ratio": args.long / args.short,
            "total_rss_ratio_long_vs_short": long["peak_rss_bytes"] / short["peak_rss_bytes"],
            "short": short,
            "long": long,
            "config": {k: v for k, v in vars(args).items() if k != "worker"},
        }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
