"""Training MFU of a real `sora-train` DiT run against the bare step on the same packs, one process.

    OMP_NUM_THREADS=1 python tools/bench/train_vs_bench.py --cache-dir runs/demo/cache \
        --vae-dir runs/demo/vae --steps 150 --bench-steps 20 [HYDRA_OVERRIDE ...]

Answers "how much of the model's own speed does training keep" (issue 23: at least 0.8x). The
Lightning side is `train(cfg)` itself (experiment=demo by default: the demo's DiT, curriculum,
token budget, callbacks, EMA, logging, progress bar and checkpoints), on a latent cache built by
the pipeline's first steps; previews and validation are off (they are periodic, not per step).
A recorder callback keeps the packs it trained on. The bench side is the bare step on the first
`--bench-steps` of those same packs with a fresh DiT of the same config: flow loss forward,
backward, gradient clipping (as the trainer's `gradient_clip_val`) and AdamW, nothing else; it
runs right after training in the same process (the packs exist only then), after one warm-up step.

Both MFUs are analytic FLOPs (3 x `models.stats.dit_forward_flops` per pack) over time, over the
same matmul peak (`measure_matmul_flops`). Times are CPU time of this process (`--clock
process`, with one torch thread: steadier than wall time on a shared machine) or wall time. The
training step time is the step-time breakdown's mean (`train/timing.py`, first step excluded),
so everything a step costs (data wait, EMA, logging, Lightning's loop) is in it. Prints one JSON
line: `train_mfu`, `bench_mfu`, `ratio` (train / bench) and the breakdown's shares.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch

from sora_lightning.data.packing import PackedBatch
from sora_lightning.diffusion import flow
from sora_lightning.models.dit import DiT, DiTConfig
from sora_lightning.models.stats import dit_forward_flops
from sora_lightning.train.callbacks import measure_matmul_flops

CLOCKS = {"wall": time.perf_counter, "process": time.process_time}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Cache, step counts and any Hydra overrides for the training run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", required=True, help="latent cache (pipeline's cache step)")
    parser.add_argument("--vae-dir", required=True, help="the VAE the cache was built with")
    parser.add_argument("--steps", type=int, default=150, help="training steps of the real run")
    parser.add_argument("--bench-steps", type=int, default=20, help="bare steps on the same packs")
    parser.add_argument("--experiment", default="demo", help="experiment preset of the run")
    parser.add_argument("--run-dir", default=None, help="training run folder (default: a temp)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="process")
    parser.add_argument("--matmul-size", type=int, default=1024, help="side of the peak matmul")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides for sora-train")
    return parser.parse_args(argv)


def pack_flops(config: DiTConfig, batch: PackedBatch) -> int:
    """Training FLOPs of one pack: forward + backward ~ 3 x the analytic forward."""
    grids = [tuple(int(g) for g in row) for row in batch.grid_sizes.tolist()]
    return 3 * dit_forward_flops(config, grids, batch.text_cu_seqlens.diff().tolist())


class PackRecorder(L.Callback):
    """Keeps the FLOPs of every trained pack, and the first `keep` packs themselves."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.packs: list[PackedBatch] = []
        self.flops: list[int] = []
        self.config: DiTConfig | None = None

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.config = pl_module.dit_config
        self.flops.append(pack_flops(self.config, batch))
        if len(self.packs) < self.keep:
            self.packs.append(batch)


def bare_step(
    dit: DiT, optimizer: torch.optim.Optimizer, batch: PackedBatch, generator: torch.Generator
) -> None:
    """What a training step must do and nothing more: loss, backward, clip, AdamW."""
    timesteps = flow.sample_logit_normal(batch.num_samples, generator=generator)
    noise = torch.randn(batch.x.shape, generator=generator)
    flow.packed_batch_loss(dit, batch, timesteps, noise).backward()
    torch.nn.utils.clip_grad_norm_(dit.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def time_bare_steps(
    dit: DiT,
    optimizer: torch.optim.Optimizer,
    packs: Sequence[PackedBatch],
    clock: Callable[[], float],
    seed: int = 0,
) -> list[float]:
    """Seconds of the bare step on each pack in turn."""
    generator = torch.Generator().manual_seed(seed)
    times = []
    for batch in packs:
        start = clock()
        bare_step(dit, optimizer, batch, generator)
        times.append(clock() - start)
    return times


def bench_model(config: DiTConfig, lr: float = 1e-3) -> tuple[DiT, torch.optim.Optimizer]:
    """A fresh DiT of the run's config and AdamW as training configures it (betas 0.9, 0.99)."""
    dit = DiT(config).train()
    return dit, torch.optim.AdamW(dit.parameters(), lr=lr, betas=(0.9, 0.99))


def run_training(args: argparse.Namespace, recorder: PackRecorder, run_dir: Path) -> dict:
    """`train(cfg)` of the composed run with the recorder added; returns its step_time.json."""
    from hydra import compose, initialize_config_module

    from sora_lightning.config import CONFIG_MODULE
    from sora_lightning.train import main as train_main

    overrides = [
        f"experiment={args.experiment}",
        "task=dit",
        f"run_dir={run_dir}",
        f"data.cache_dir={args.cache_dir}",
        f"data.vae_dir={args.vae_dir}",
        f"trainer.max_steps={args.steps}",
        f"timing.clock={args.clock}",
        f"seed={args.seed}",
        "dit_train.sample_every_n_steps=0",
        "dit_train.val_every_n_steps=0",
        *args.overrides,
    ]
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    build_trainer = train_main.build_trainer

    def with_recorder(cfg_, run_dir_, max_steps, extra):  # noqa: ANN001, ANN202
        return build_trainer(cfg_, run_dir_, max_steps, [*extra, recorder])

    train_main.build_trainer = with_recorder
    try:
        train_main.train(cfg)
    finally:
        train_main.build_trainer = build_trainer
    return json.loads((run_dir / "step_time.json").read_text())


def compare(
    summary: dict[str, Any],
    train_flops: Sequence[int],
    bench_times: Sequence[float],
    bench_flops: Sequence[int],
    peak: float,
) -> dict[str, Any]:
    """Both MFUs and their ratio; training skips the steps the breakdown skipped (the first)."""
    skipped = len(summary.get("first_steps_s", []))
    train_step = summary["mean_step_s"]
    train_mfu = statistics.mean(train_flops[skipped:]) / train_step / peak
    bench_mfu = sum(bench_flops) / sum(bench_times) / peak
    compute = sum(summary["seconds"][name] for name in ("forward", "backward", "optimizer"))
    return {
        "train_mfu": train_mfu,
        "bench_mfu": bench_mfu,
        "ratio": train_mfu / bench_mfu,
        "train_step_s": train_step,
        "train_compute_step_s": compute / summary["steps"],
        "bench_step_s": statistics.mean(bench_times),
        "overhead_fraction": summary["overhead_fraction"],
        "fraction": summary["fraction"],
        "train_flops_per_step": statistics.mean(train_flops[skipped:]),
        "bench_flops_per_step": statistics.mean(bench_flops),
        "matmul_flops_per_s": peak,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The training run, then the bare steps on its packs; returns the JSON-ready comparison."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    clock = CLOCKS[args.clock]
    peak = measure_matmul_flops(args.matmul_size, clock=clock)
    recorder = PackRecorder(keep=args.bench_steps)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(args.run_dir or tmp)
        summary = run_training(args, recorder, run_dir)
    dit, optimizer = bench_model(recorder.config)
    packs = recorder.packs
    time_bare_steps(dit, optimizer, packs[:1], clock)  # warm-up, as training's first step
    times = time_bare_steps(dit, optimizer, packs, clock, args.seed)
    result = compare(
        summary, recorder.flops, times, [pack_flops(recorder.config, p) for p in packs], peak
    )
    result.update(
        steps=args.steps,
        bench_steps=len(packs),
        threads=torch.get_num_threads(),
        clock=args.clock,
        experiment=args.experiment,
        overrides=args.overrides,
    )
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Print and return the comparison as one JSON line."""
    result = run(parse_args(argv))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
