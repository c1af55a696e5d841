"""One-shot GPU check: flash-attn vs SDPA, bf16 training-step MFU, ZeRO-3 on one GPU, sampling.

    tools/gpu_check.sh                  # on one CUDA GPU; about 5-8 minutes on an H100
    tools/gpu_check.sh --out gpu.json   # also write the JSON to a file
    tools/gpu_check.sh --cpu            # the same code paths at tiny sizes on the CPU (tests)

Why: a lent GPU comes for minutes, so everything worth knowing about the CUDA paths is measured
in one run that never crashes half-way: each part has a time budget, is skipped with a reason
when its dependency is missing (flash-attn, DeepSpeed), records its own error if it fails, and
every result lands in ONE JSON object on stdout (everything else goes to stderr), with a summary
{"ok": bool, ...}; the exit status is 0 exactly when "ok" is true.

Parts:
  attention  flash-attn varlen against per-sample SDPA (`models.layers.attention`) on packed bf16
             batches of samples of different lengths, self- and cross-attention shaped: max abs
             difference of outputs and of the q/k/v gradients, and the time of each backend.
             --cpu: SDPA against a float64 reference instead (flash-attn needs CUDA).
  training   forward+backward+AdamW of the 600m and Wan 1.3B presets at ~8k and ~74k tokens under
             bf16 autocast (what Lightning's bf16-mixed runs), with MFU = 3 x the analytic forward
             FLOPs (`models.stats.dit_forward_flops`) per second over the GPU's peak bf16 dense
             FLOP/s. Activation checkpointing (`parallel.strategies.apply_activation_checkpointing`,
             the training switch) above --checkpoint-above tokens, or after an out-of-memory.
  zero3      a few steps of DeepSpeed ZeRO-3 (bf16) on one rank with the config our
             deepspeed_zero3 strategy builds (`parallel.strategies.deepspeed_config`) against a
             plain bf16-autocast AdamW run from the same weights fitting the same batch: the
             losses must be finite, agree within --zero3-rtol, and move by more than it (so an
             engine that does not update cannot pass). --cpu: gloo, world size 1.
  sampling   a few steps of the sampler (`diffusion.sampling.sample_latents`, CFG) for one video.

STATUS: the CUDA paths of this script have NOT yet been run on a GPU (no GPU was lent when it was
written); only `--cpu` has run (tests/e2e/test_gpu_check.py). Its GPU numbers are pending.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import math
import os
import platform
import signal
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

from sora_lightning.diffusion import flow
from sora_lightning.diffusion.sampling import SamplingConfig, sample_latents
from sora_lightning.models.dit import DiT, DiTConfig
from sora_lightning.models.layers import attention
from sora_lightning.models.patches import seqlens_to_cu
from sora_lightning.models.stats import count_params, dit_forward_flops
from sora_lightning.parallel.strategies import (
    apply_activation_checkpointing,
    deepspeed_config,
    free_port,
    init_cpu_deepspeed,
)
from sora_lightning.train.callbacks import measure_matmul_flops

PRESETS_DIR = Path(__file__).resolve().parents[1] / "conf" / "model" / "dit"
PARTS = ("attention", "training", "zero3", "sampling")
PEAK_BF16_DENSE = (  # (substring of torch.cuda.get_device_name, FLOP/s): vendor dense bf16 peaks
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("A100", 312e12),
)
Grid = tuple[int, int, int]


@dataclass(frozen=True)
class Sizes:
    """Every size one mode runs at: real presets on a GPU, tiny ones on the CPU."""

    self_lengths: tuple[int, ...]
    """Samples of one packed self-attention batch (different lengths, as packing makes them)."""
    text_lengths: tuple[int, ...]
    """Caption lengths of the cross-attention case (queries: `self_lengths`)."""
    heads: int
    head_dim: int
    attention_dtype: torch.dtype
    attention_tol: tuple[float, float]
    """Largest allowed |candidate - baseline| / max |baseline| for outputs and for gradients."""
    train_presets: tuple[str, ...]
    train_grids: dict[str, tuple[Grid, ...]]
    """Token grids (after patching) of each packed training batch, keyed by a label."""
    text_len: int
    zero3_preset: str
    zero3_grids: tuple[Grid, ...]
    sample_preset: str
    sample_latent: tuple[int, int, int, int]
    """(C, F, h, w) latent of the sampled video."""
    budgets_s: dict[str, float] = field(default_factory=dict)


GPU_SIZES = Sizes(
    self_lengths=(7800, 256, 3600, 17, 12000),
    text_lengths=(512, 77, 300, 1, 512),
    heads=12,
    head_dim=128,
    attention_dtype=torch.bfloat16,
    attention_tol=(2e-2, 5e-2),
    train_presets=("600m", "wan2_1_1_3b"),
    # ~8k: a 480x832 17-frame clip packed with an image; ~74k: 81 frames at 704x1280.
    train_grids={"8k": ((5, 30, 52), (1, 16, 16)), "74k": ((21, 44, 80),)},
    text_len=256,
    zero3_preset="600m",
    zero3_grids=((2, 30, 52), (1, 16, 16)),
    sample_preset="wan2_1_1_3b",
    sample_latent=(16, 5, 60, 104),  # 17 frames at 480x832 through Wan's VAE
    budgets_s={"attention": 40, "training": 220, "zero3": 120, "sampling": 50},
)
CPU_SIZES = Sizes(
    self_lengths=(37, 5, 64, 1, 20),
    text_lengths=(7, 3, 12, 1, 9),
    heads=2,
    head_dim=16,
    attention_dtype=torch.float32,
    attention_tol=(1e-4, 1e-4),
    train_presets=("tiny", "demo"),
    train_grids={"64": ((2, 4, 4), (1, 4, 8)), "256": ((4, 8, 8),)},
    text_len=8,
    zero3_preset="tiny",
    zero3_grids=((2, 4, 4), (1, 4, 8)),
    sample_preset="tiny",
    sample_latent=(4, 2, 8, 8),
    budgets_s={"attention": 20, "training": 40, "zero3": 60, "sampling": 20},
)


class Skip(Exception):
    """A part cannot run here (a missing or broken dependency): reported, not a failure."""


class PartTimeout(Exception):
    """A part ran past its budget (raised from SIGALRM between Python bytecodes)."""


@dataclass
class Context:
    """What every part needs: the device, its sizes and the peak the MFU divides by."""

    args: argparse.Namespace
    device: torch.device
    sizes: Sizes
    peak_flops: float | None
    peak_source: str

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast on the device: what Lightning's `bf16-mixed` precision runs."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def sync(self) -> None:
        """Wait for queued kernels, so wall-clock times measure the GPU work."""
        if self.cuda:
            torch.cuda.synchronize(self.device)


# ----------------------------------------------------------------------------------------------
# Helpers


def load_preset(name: str) -> DiTConfig:
    """A conf/model/dit preset as a DiTConfig (its `_target_` is DiTConfig itself)."""
    node = yaml.safe_load((PRESETS_DIR / f"{name}.yaml").read_text())
    node.pop("_target_", None)
    return DiTConfig(**node)


def peak_bf16_flops(device: torch.device, override: float | None) -> tuple[float | None, str]:
    """The MFU denominator: --peak-flops, else the GPU's dense bf16 peak from its name, else (CPU)
    the measured fp32 matmul rate `train.callbacks.measure_matmul_flops` (what training logs)."""
    if override:
        return override, "--peak-flops"
    if device.type != "cuda":
        return measure_matmul_flops(512), "measured fp32 matmul (CPU)"
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_DENSE:
        if key in name:
            return flops, f"dense bf16 peak of {key} ({name})"
    return None, f"unknown GPU {name!r}: pass --peak-flops"


def median_time(ctx: Context, fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    """Median wall time of fn in seconds, synchronised with the device around each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        ctx.sync()
        start = time.perf_counter()
        fn()
        ctx.sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def free_memory(ctx: Context) -> None:
    """Release what the last sub-case held, so the next one starts from an empty device."""
    gc.collect()
    if ctx.cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(ctx.device)


def peak_memory_gib(ctx: Context) -> float | None:
    return round(torch.cuda.max_memory_allocated(ctx.device) / 2**30, 2) if ctx.cuda else None


@torch.no_grad()
def perturb_zero_init(model: nn.Module, std: float = 0.02) -> None:
    """Give adaLN-Zero's zero-initialised tensors small random values: an untrained DiT otherwise
    outputs exactly zero, and a check on it would exercise (and compare) nothing."""
    for param in model.parameters():
        if param.is_floating_point() and not param.any():
            param.normal_(0.0, std)


def build_dit(cfg: DiTConfig, device: torch.device, seed: int = 0) -> DiT:
    """A DiT initialised on the device itself (a 1.3B model initialised on the host is slow)."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = DiT(cfg)
    perturb_zero_init(model)
    return model.train()


def caption_lengths(text_len: int, num_samples: int) -> list[int]:
    """Caption token counts of a packed batch: they differ per sample, as real captions do."""
    return [max(1, text_len - 3 * i) for i in range(num_samples)]


def packed_batch(
    cfg: DiTConfig, grids: tuple[Grid, ...], text_len: int, device: torch.device, seed: int
) -> dict[str, Tensor]:
    """A packed flow-matching batch: clean tokens, noise, per-sample t and caption states."""
    generator = torch.Generator().manual_seed(seed)
    lengths = [f * h * w for f, h, w in grids]
    tokens = sum(lengths)
    texts = caption_lengths(text_len, len(grids))
    batch = {
        "x0": torch.randn(tokens, cfg.patch_dim, generator=generator),
        "noise": torch.randn(tokens, cfg.patch_dim, generator=generator),
        "timesteps": torch.rand(len(grids), generator=generator),
        "text": torch.randn(sum(texts), cfg.text_dim, generator=generator),
        "cu_seqlens": seqlens_to_cu(lengths),
        "grid_sizes": torch.tensor(grids, dtype=torch.int64),
        "text_cu_seqlens": seqlens_to_cu(texts),
    }
    return {name: value.to(device) for name, value in batch.items()}


def flow_matching_loss(model: nn.Module, batch: dict[str, Tensor], dtype: torch.dtype) -> Tensor:
    """Rectified-flow MSE of the DiT on a packed batch; inputs cast to `dtype` (bf16 for an engine
    whose weights are bf16, float32 under autocast, which casts at each matmul)."""
    lengths = batch["cu_seqlens"].diff()
    t_tokens = batch["timesteps"].repeat_interleave(lengths)  # [L]
    x_t = flow.add_noise(batch["x0"], batch["noise"], t_tokens)  # [L, P]
    pred = model(
        x_t.to(dtype),
        batch["cu_seqlens"],
        batch["grid_sizes"],
        batch["timesteps"],
        batch["text"].to(dtype),
        batch["text_cu_seqlens"],
    )  # [L, P]
    return F.mse_loss(pred.float(), flow.velocity_target(batch["x0"], batch["noise"]))


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise PartTimeout in the main thread once `seconds` have passed (a hung collective or a
    slow step then costs one part, not the whole lent machine)."""

    def expire(signum: int, frame: Any) -> None:
        raise PartTimeout(f"ran past its budget of {seconds:.3g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def import_optional(name: str) -> Any:
    """Import an optional dependency or Skip with the reason (any import error: a flash-attn
    wheel built against another torch fails with OSError/RuntimeError, not ImportError)."""
    try:
        return importlib.import_module(name)
    except Exception as error:  # noqa: BLE001 - every way an optional import fails is a skip
        raise Skip(f"{name} is not usable here: {type(error).__name__}: {error}") from None


# ----------------------------------------------------------------------------------------------
# Part 1: attention


def reference_attention(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor) -> Tensor:
    """softmax(Q K^T / sqrt(d)) V per sample in float64: the ground truth on the CPU."""
    outputs = []
    bounds_q, bounds_k = cu_q.tolist(), cu_k.tolist()
    for i in range(len(bounds_q) - 1):
        q_i = q[bounds_q[i] : bounds_q[i + 1]].double().transpose(0, 1)  # [heads, n_q, d]
        k_i = k[bounds_k[i] : bounds_k[i + 1]].double().transpose(0, 1)  # [heads, n_k, d]
        v_i = v[bounds_k[i] : bounds_k[i + 1]].double().transpose(0, 1)
        weights = torch.softmax(q_i @ k_i.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1)
        outputs.append((weights @ v_i).transpose(0, 1))  # [n_q, heads, d]
    return torch.cat(outputs).to(q.dtype)


def attention_case(
    ctx: Context, candidate: Callable, baseline: Callable, lengths_q: tuple, lengths_k: tuple
) -> dict[str, Any]:
    """Outputs, q/k/v gradients and forward / forward+backward times of two backends on one
    packed batch; differences relative to the baseline's largest magnitude."""
    sizes, generator = ctx.sizes, torch.Generator().manual_seed(0)
    shape = (sizes.heads, sizes.head_dim)
    q, k, v, grad_out = (
        torch.randn(sum(n), *shape, generator=generator).to(ctx.device, sizes.attention_dtype)
        for n in (lengths_q, lengths_k, lengths_k, lengths_q)
    )
    cu_q, cu_k = seqlens_to_cu(list(lengths_q)).to(ctx.device), seqlens_to_cu(list(lengths_k))
    cu_k = cu_k.to(ctx.device)
    results: dict[str, dict[str, Any]] = {}
    for name, fn in (("candidate", candidate), ("baseline", baseline)):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = fn(*leaves, cu_q, cu_k)
        out.backward(grad_out)
        grads = [leaf.grad.float() for leaf in leaves]  # before the timed calls accumulate more
        with torch.no_grad():
            forward_s = median_time(ctx, lambda fn=fn: fn(q, k, v, cu_q, cu_k), 3)
        both_s = median_time(ctx, lambda fn=fn, x=leaves: fn(*x, cu_q, cu_k).backward(grad_out), 3)
        results[name] = {
            "out": out.detach().float(),
            "grads": grads,
            "forward_ms": round(forward_s * 1e3, 3),
            "forward_backward_ms": round(both_s * 1e3, 3),
        }
    return compare_attention(ctx, results, lengths_q, lengths_k)


def compare_attention(
    ctx: Context, results: dict[str, dict[str, Any]], lengths_q: tuple, lengths_k: tuple
) -> dict[str, Any]:
    """Max abs differences (and relative to the baseline's max abs) of outputs and gradients."""
    cand, base = results["candidate"], results["baseline"]
    pairs = {"out": (cand["out"], base["out"])}
    for name, grad, base_grad in zip("qkv", cand["grads"], base["grads"], strict=True):
        pairs[f"grad_{name}"] = (grad, base_grad)
    diffs = {name: float((a - b).abs().max()) for name, (a, b) in pairs.items()}
    relative = {
        name: diffs[name] / max(float(b.abs().max()), 1e-30) for name, (_, b) in pairs.items()
    }
    tol_out, tol_grad = ctx.sizes.attention_tol
    ok = relative["out"] <= tol_out and all(relative[f"grad_{n}"] <= tol_grad for n in "qkv")
    return {
        "ok": ok,
        "lengths_q": list(lengths_q),
        "lengths_k": list(lengths_k),
        "max_abs_diff": diffs,
        "relative_diff": {name: float(f"{value:.3g}") for name, value in relative.items()},
        "tolerance": {"out": tol_out, "grad": tol_grad},
        "candidate_ms": {k: cand[k] for k in ("forward_ms", "forward_backward_ms")},
        "baseline_ms": {k: base[k] for k in ("forward_ms", "forward_backward_ms")},
    }


def check_attention(ctx: Context) -> dict[str, Any]:
    """flash-attn vs SDPA (GPU) or SDPA vs float64 reference (CPU) on packed ragged batches."""
    if ctx.cuda:
        candidate = ("flash", lambda *a: attention(*a, backend="flash"))
        baseline = ("sdpa", lambda *a: attention(*a, backend="sdpa"))
    else:
        candidate = ("sdpa", lambda *a: attention(*a, backend="sdpa"))
        baseline = ("float64 reference", reference_attention)
    sizes = ctx.sizes
    cases = {
        "self": attention_case(
            ctx, candidate[1], baseline[1], sizes.self_lengths, sizes.self_lengths
        ),
        "cross": attention_case(
            ctx, candidate[1], baseline[1], sizes.self_lengths, sizes.text_lengths
        ),
    }
    return {
        "ok": all(case["ok"] for case in cases.values()),
        "candidate": candidate[0],
        "baseline": baseline[0],
        "dtype": str(sizes.attention_dtype).removeprefix("torch."),
        "heads": sizes.heads,
        "head_dim": sizes.head_dim,
        "cases": cases,
    }


# ----------------------------------------------------------------------------------------------
# Part 2: training step and MFU


def timed_training(
    ctx: Context, cfg: DiTConfig, grids: tuple[Grid, ...], checkpointing: bool
) -> dict[str, Any]:
    """Median time of forward+backward+AdamW under bf16 autocast; raises OutOfMemoryError."""
    model = build_dit(cfg, ctx.device)
    if checkpointing:
        apply_activation_checkpointing(model.blocks)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=ctx.cuda)
    batch = packed_batch(cfg, grids, ctx.sizes.text_len, ctx.device, seed=0)
    losses: list[Tensor] = []

    def step() -> None:
        with ctx.autocast():
            loss = flow_matching_loss(model, batch, torch.float32)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    step_s = median_time(ctx, step, ctx.args.steps)
    return {
        "step_s": step_s,
        "losses_finite": bool(torch.isfinite(torch.stack(losses)).all()),
        "peak_memory_gib": peak_memory_gib(ctx),
    }


def training_case(ctx: Context, preset: str, grids: tuple[Grid, ...]) -> dict[str, Any]:
    """One preset at one token count: time, MFU, memory; checkpointing where the tokens need it."""
    cfg = load_preset(preset)
    tokens = sum(f * h * w for f, h, w in grids)
    mode = ctx.args.checkpointing
    checkpointing = mode == "on" or (mode == "auto" and tokens > ctx.args.checkpoint_above)
    oom_without = False
    try:
        timing = timed_training(ctx, cfg, grids, checkpointing)
    except torch.OutOfMemoryError:
        if checkpointing or mode != "auto":
            raise
        oom_without = True
    if oom_without:  # retried outside the except block, so the failed step's tensors are freed
        free_memory(ctx)
        checkpointing = True
        timing = timed_training(ctx, cfg, grids, checkpointing)
    flops = 3 * dit_forward_flops(cfg, list(grids), caption_lengths(ctx.sizes.text_len, len(grids)))
    achieved = flops / timing["step_s"]
    return {
        "ok": timing["losses_finite"],
        "params": count_params(cfg),
        "video_tokens": tokens,
        "grids": [list(grid) for grid in grids],
        "activation_checkpointing": checkpointing,
        "oom_without_checkpointing": oom_without,
        "step_s": round(timing["step_s"], 4),
        "tokens_per_s": round(tokens / timing["step_s"], 1),
        "train_flops_per_step": flops,
        "achieved_flops_per_s": achieved,
        "mfu": round(achieved / ctx.peak_flops, 4) if ctx.peak_flops else None,
        "peak_memory_gib": timing["peak_memory_gib"],
    }


def check_training(ctx: Context, deadline: float) -> dict[str, Any]:
    """Every preset x token count. A case that fails is recorded and the next one runs; none
    starts after `deadline`, and one cut by the part's budget keeps the cases done before it."""
    cases: dict[str, Any] = {}
    for preset in ctx.sizes.train_presets:
        for label, grids in ctx.sizes.train_grids.items():
            name = f"{preset}@{label}"
            if time.monotonic() > deadline or any("timeout" in c for c in cases.values()):
                cases[name] = {"skipped": "the part's time budget is spent"}
                continue
            try:
                cases[name] = training_case(ctx, preset, grids)
            except PartTimeout as error:
                cases[name] = {"ok": False, "timeout": str(error)}
            except Exception as error:  # noqa: BLE001 - one case's failure is its own result
                cases[name] = {"ok": False, "error": f"{type(error).__name__}: {error}"}
            free_memory(ctx)
    run = [case for case in cases.values() if "skipped" not in case]
    return {
        "ok": bool(run) and all(case["ok"] for case in run),
        "precision": "bf16 autocast, fp32 weights, AdamW",
        "peak_flops": ctx.peak_flops,
        "peak_source": ctx.peak_source,
        "mfu_formula": "3 x models.stats.dit_forward_flops / step_s / peak_flops",
        "cases": cases,
    }


# ----------------------------------------------------------------------------------------------
# Part 3: ZeRO-3 on one rank against a plain run


def plain_losses(
    ctx: Context, cfg: DiTConfig, state: dict[str, Tensor], batches: list[dict[str, Tensor]]
) -> list[float]:
    """Losses of bf16-autocast AdamW from `state` (fp32 weights): the run ZeRO-3 must match."""
    model = build_dit(cfg, ctx.device)
    model.load_state_dict(state)
    optimizer = torch.optim.AdamW(model.parameters(), lr=ctx.args.zero3_lr)
    losses = []
    for batch in batches:
        with ctx.autocast():
            loss = flow_matching_loss(model, batch, torch.float32)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def init_single_rank(ctx: Context, deepspeed: Any) -> None:
    """A world of one: NCCL on the GPU; gloo without DeepSpeed's JIT-built shm op on the CPU."""
    if not ctx.cuda:
        init_cpu_deepspeed(0, 1, free_port())
        return
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
    )
    torch.cuda.set_device(ctx.device)
    deepspeed.init_distributed("nccl")


def zero3_losses(
    ctx: Context, cfg: DiTConfig, state: dict[str, Tensor], batches: list[dict[str, Tensor]]
) -> tuple[list[float], dict[str, int]]:
    """Losses of a DeepSpeed ZeRO-3 bf16 engine (torch AdamW, no JIT-built optimizer) from
    `state`, and how many parameter elements the rank's partitions hold (all of them: one rank)."""
    deepspeed = import_optional("deepspeed")
    import torch.distributed as dist

    threads = torch.get_num_threads()
    init_single_rank(ctx, deepspeed)
    try:
        model = build_dit(cfg, ctx.device)
        model.load_state_dict(state)
        config = {**deepspeed_config({}), "bf16": {"enabled": True}}
        optimizer = torch.optim.AdamW(model.parameters(), lr=ctx.args.zero3_lr)
        engine, *_ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=config, dist_init_required=False
        )
        losses = []
        for batch in batches:
            loss = flow_matching_loss(engine, batch, torch.bfloat16)
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        partitioned = sum(p.ds_tensor.numel() for p in engine.module.parameters())
        full = sum(p.ds_numel for p in engine.module.parameters())
        if hasattr(engine, "destroy"):
            engine.destroy()
        return losses, {"partitioned_numel": partitioned, "full_numel": full}
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        torch.set_num_threads(threads)


def check_zero3(ctx: Context) -> dict[str, Any]:
    """ZeRO-3 and plain AdamW from the same weights on the same batch: finite losses that agree
    within rtol while the plain run's loss moves by more than rtol (else the check is blind)."""
    cfg = load_preset(ctx.sizes.zero3_preset)
    state = {
        k: v.detach().cpu().clone() for k, v in build_dit(cfg, ctx.device).state_dict().items()
    }
    free_memory(ctx)
    # One batch, repeated: fitting it moves the loss by several percent in a few steps, so an
    # engine that failed to update (or updated wrongly) cannot pass for a correct one.
    batch = packed_batch(cfg, ctx.sizes.zero3_grids, ctx.sizes.text_len, ctx.device, seed=0)
    batches = [batch] * ctx.args.zero3_steps
    plain = plain_losses(ctx, cfg, state, batches)
    free_memory(ctx)
    zero3, numel = zero3_losses(ctx, cfg, state, batches)
    relative = [abs(z - p) / max(abs(p), 1e-12) for z, p in zip(zero3, plain, strict=True)]
    finite = all(math.isfinite(x) for x in plain + zero3)
    movement = abs(plain[-1] - plain[0]) / max(abs(plain[0]), 1e-12)
    return {
        "ok": finite and max(relative) <= ctx.args.zero3_rtol < movement,
        "preset": ctx.sizes.zero3_preset,
        "steps": len(batches),
        "plain_losses": plain,
        "zero3_losses": zero3,
        "max_relative_diff": float(f"{max(relative):.3g}"),
        "rtol": ctx.args.zero3_rtol,
        "plain_relative_movement": float(f"{movement:.3g}"),  # must exceed rtol to mean anything
        "precision": "ZeRO-3 bf16 (fp32 master) vs bf16 autocast over fp32 weights",
        **numel,
    }


# ----------------------------------------------------------------------------------------------
# Part 4: sampling


class OnDevice(nn.Module):
    """The DiT under bf16 autocast on the device. The sampler keeps its state on the CPU and
    sends each call's inputs to where the DiT's weights are (`guided_velocity_fn`), so moving
    them here is a no-op kept for direct calls; the velocity comes back as float32."""

    def __init__(self, dit: DiT, ctx: Context) -> None:
        super().__init__()
        self.dit, self.ctx, self.config = dit, ctx, dit.config

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        def move(value: Any) -> Any:
            return value.to(self.ctx.device) if isinstance(value, Tensor) else value

        with self.ctx.autocast():
            out = self.dit(*map(move, args), **{k: move(v) for k, v in kwargs.items()})
        return out.float().cpu()


def check_sampling(ctx: Context) -> dict[str, Any]:
    """A few sampler steps with classifier-free guidance for one video; finite latents, seconds."""
    cfg = load_preset(ctx.sizes.sample_preset)
    dit = OnDevice(build_dit(cfg, ctx.device).eval(), ctx)
    generator = torch.Generator().manual_seed(0)
    states = torch.randn(ctx.sizes.text_len, cfg.text_dim, generator=generator)
    null_states = torch.zeros(1, cfg.text_dim)
    config = SamplingConfig(steps=ctx.args.sample_steps, cfg_scale=5.0, seed=0)
    latents: list[Tensor] = []

    def sample() -> None:
        latents.append(sample_latents(dit, ctx.sizes.sample_latent, config, states, null_states))

    with torch.inference_mode():
        seconds = median_time(ctx, sample, repeats=1, warmup=1)  # warm-up: kernels, RoPE tables
    latent = latents[-1]
    _, frames, height, width = ctx.sizes.sample_latent
    patch = cfg.patch_size
    return {
        "ok": bool(torch.isfinite(latent).all()) and tuple(latent.shape) == ctx.sizes.sample_latent,
        "preset": ctx.sizes.sample_preset,
        "latent_shape": list(latent.shape),
        "video_tokens": frames * height * width // (patch[0] * patch[1] * patch[2]),
        "steps": config.steps,
        "cfg_scale": config.cfg_scale,
        "seconds": round(seconds, 3),
        "seconds_per_step": round(seconds / config.steps, 4),
        "peak_memory_gib": peak_memory_gib(ctx),
    }


# ----------------------------------------------------------------------------------------------
# Driver


def required_modules(ctx: Context, name: str) -> list[str]:
    """Optional packages a part cannot run without (flash-attn only matters on a GPU)."""
    if name == "attention" and ctx.cuda:
        return ["flash_attn"]
    return ["deepspeed"] if name == "zero3" else []


def run_part(ctx: Context, name: str) -> dict[str, Any]:
    """One part under its budget; a Skip or any error becomes the part's result, never a crash."""
    budget = ctx.sizes.budgets_s[name] * ctx.args.budget_scale
    start = time.monotonic()
    try:
        for module in required_modules(ctx, name):  # before the clock: a skip is never a timeout
            import_optional(module)
        with time_limit(budget):
            if name == "training":
                result = check_training(ctx, deadline=start + 0.6 * budget)
            else:
                result = {
                    "attention": check_attention,
                    "zero3": check_zero3,
                    "sampling": check_sampling,
                }[name](ctx)
        result["status"] = "ok" if result["ok"] else "failed"
    except Skip as reason:
        result = {"status": "skipped", "reason": str(reason)}
    except Exception as error:  # noqa: BLE001 - the JSON must come out whatever a part does
        traceback.print_exc()  # the whole trace on stderr; its tail in the JSON
        result = {
            "status": "failed",
            "ok": False,
            "error": f"{type(error).__name__}: {error}",
            "where": traceback.format_exc(limit=-3).splitlines()[-8:],
        }
    finally:
        free_memory(ctx)
    result["seconds"] = round(time.monotonic() - start, 2)
    result["budget_s"] = budget
    return result


def environment(ctx: Context) -> dict[str, Any]:
    """Versions and the device, so a number in the JSON can be traced to what produced it."""
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("flash_attn", "deepspeed"):
        try:
            versions[name] = importlib.import_module(name).__version__
        except Exception:  # noqa: BLE001 - missing or broken: reported as absent
            versions[name] = None
    device = torch.cuda.get_device_name(ctx.device) if ctx.cuda else platform.processor() or "cpu"
    return {
        **versions,
        "cuda": torch.version.cuda,
        "device": device,
        "mode": "cpu" if ctx.device.type == "cpu" else "gpu",
    }


def summarize(parts: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """ok: at least one part ran and none failed; skipped parts are listed with their reasons."""
    failed = [name for name, part in parts.items() if part["status"] == "failed"]
    passed = [name for name, part in parts.items() if part["status"] == "ok"]
    skipped = {name: part["reason"] for name, part in parts.items() if part["status"] == "skipped"}
    return {
        "ok": bool(passed) and not failed,
        "passed": passed,
        "failed": failed,
        "skipped": skipped,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="tiny sizes on the CPU (plumbing test)")
    parser.add_argument(
        "--parts", default=",".join(PARTS), help=f"comma-separated subset of {PARTS}"
    )
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument(
        "--peak-flops", type=float, help="MFU denominator in FLOP/s (default: from the GPU's name)"
    )
    parser.add_argument(
        "--steps", type=int, default=3, help="timed training steps per case (after 1 warm-up)"
    )
    parser.add_argument(
        "--checkpointing",
        choices=("auto", "on", "off"),
        default="auto",
        help="auto: above --checkpoint-above tokens, or after an out-of-memory",
    )
    parser.add_argument(
        "--checkpoint-above", type=int, help="token count (default 32768 GPU, 128 CPU)"
    )
    parser.add_argument("--zero3-steps", type=int, default=4)
    parser.add_argument(
        "--zero3-lr",
        type=float,
        help="AdamW lr of the ZeRO-3 comparison (default 1e-3 CPU tiny, 3e-4 GPU 600m: a smaller "
        "first step for a 28-block model, still enough to move the loss past the rtol)",
    )
    parser.add_argument(
        "--zero3-rtol", type=float, default=2e-2, help="ZeRO-3 vs plain loss, relative"
    )
    parser.add_argument("--sample-steps", type=int, default=4)
    parser.add_argument(
        "--budget-scale", type=float, default=1.0, help="multiply every part's time budget"
    )
    args = parser.parse_args(argv)
    unknown = set(args.parts.split(",")) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; choose from {PARTS}")
    if args.checkpoint_above is None:
        args.checkpoint_above = 128 if args.cpu else 32768
    if args.zero3_lr is None:
        args.zero3_lr = 1e-3 if args.cpu else 3e-4
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every requested part in order, then the summary: the JSON-ready result."""
    if not args.cpu and not torch.cuda.is_available():
        return {
            "summary": {"ok": False, "error": "no CUDA device; run with --cpu for the tiny check"}
        }
    device = torch.device("cpu") if args.cpu else torch.device("cuda", torch.cuda.current_device())
    peak, source = peak_bf16_flops(device, args.peak_flops)
    ctx = Context(args, device, CPU_SIZES if args.cpu else GPU_SIZES, peak, source)
    start = time.monotonic()
    parts = {name: run_part(ctx, name) for name in PARTS if name in args.parts.split(",")}
    return {
        "summary": {**summarize(parts), "seconds": round(time.monotonic() - start, 1)},
        "environment": environment(ctx),
        "parts": parts,
        "gpu_paths_verified": False,  # set True in this file once a GPU run has confirmed them
    }


def main(argv: list[str] | None = None) -> int:
    """Print the one JSON object on the real stdout; every other write (DeepSpeed's logger,
    NCCL's C-level warnings) is sent to stderr by pointing file descriptor 1 there."""
    args = parse_args(argv)
    sys.stdout.flush()
    json_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    result = run(args)
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    json_out.write(text + "\n")
    json_out.flush()
    return 0 if result["summary"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
