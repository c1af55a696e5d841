"""Per-rank bytes of parameters + gradients + optimizer state: DeepSpeed ZeRO-3 over 2 ranks vs DDP.

Two gloo processes train the same DiT for two steps with each strategy (torch AdamW), then every
rank sums the bytes of the distinct storages it holds for parameters, gradients and optimizer
state (DDP's communication buckets are left out, which favours DDP). Two precisions:
  bf16  (default; how ZeRO-3 runs on clusters): DeepSpeed bf16 partitions + fp32 master partitions
        vs DDP with fp32 weights under bf16 autocast.
  fp32: both in fp32. DeepSpeed 0.19 keeps a redundant fp32 master copy of its fp32 partitions
        (stage3.py compares a tensor's torch.device with the string "cpu"/"cuda:0", never equal),
        so ZeRO-3 holds 2.5 of DDP's 4 model-sized buffers per rank: 0.625 at best.
Prints JSON {"zero3_vs_ddp_bytes_ratio": <bf16 ratio>, "fp32_zero3_vs_ddp_bytes_ratio": ..., ...}.

Usage: python tools/bench/zero3_memory.py [--hidden 256 --depth 4 --heads 4] [--output FILE]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor

from sora_lightning.models.dit import DiT, DiTConfig
from sora_lightning.parallel.strategies import deepspeed_config, free_port, init_cpu_deepspeed

WORLD_SIZE = 2


def storage_bytes(tensors: Iterable[Tensor | None]) -> int:
    """Bytes of the distinct storages behind `tensors` (views of one buffer count once)."""
    seen: dict[int, int] = {}
    for tensor in tensors:
        if tensor is not None and tensor.numel() > 0:
            storage = tensor.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def optimizer_state_tensors(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """Every tensor in a torch optimizer's per-parameter state (Adam moments, step counters)."""
    return [
        v for state in optimizer.state.values() for v in state.values() if isinstance(v, Tensor)
    ]


def packed_batch(cfg: DiTConfig, rank: int) -> tuple[Tensor, ...]:
    """A packed batch of two videos of different shapes (and different data on each rank)."""
    generator = torch.Generator().manual_seed(rank)
    grid_sizes = torch.tensor([[1, 8, 8], [2, 8, 6]])
    lengths = grid_sizes.prod(1)
    cu_seqlens = torch.cat([torch.zeros(1), lengths.cumsum(0)]).to(torch.int32)
    text_cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    x = torch.randn(int(lengths.sum()), cfg.patch_dim, generator=generator)
    text = torch.randn(12, cfg.text_dim, generator=generator)
    return x, cu_seqlens, grid_sizes, torch.rand(2, generator=generator), text, text_cu


def _steps(
    model: torch.nn.Module, backward, step, cfg: DiTConfig, rank: int, dtype: torch.dtype
) -> None:
    for _ in range(2):
        batch = [t.to(dtype) if t.is_floating_point() else t for t in packed_batch(cfg, rank)]
        loss = model(*batch).float().pow(2).mean()
        backward(loss)
        step()


def measure_ddp(cfg: DiTConfig, rank: int, bf16: bool) -> dict[str, int]:
    """Whole model, whole gradients and whole Adam state on every rank (bf16: autocast, fp32 weights)."""
    model = torch.nn.parallel.DistributedDataParallel(DiT(cfg))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        _steps(model, lambda loss: loss.backward(), optimizer.step, cfg, rank, torch.float32)
    params = list(model.parameters())
    return {
        "params": storage_bytes(params),
        "grads": storage_bytes(p.grad for p in params),
        "optimizer": storage_bytes(optimizer_state_tensors(optimizer)),
    }


def measure_zero3(cfg: DiTConfig, rank: int, bf16: bool) -> dict[str, int]:
    """Partitions only: parameter shards (+ fp32 master shards), the gradient partition, Adam state."""
    import deepspeed

    model = DiT(cfg)
    config = {
        **deepspeed_config({}),
        "train_micro_batch_size_per_gpu": 1,
        "bf16": {"enabled": bf16},
    }
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=torch.optim.AdamW(model.parameters(), lr=1e-4),
        config=config,
        dist_init_required=False,
    )
    _steps(
        engine, engine.backward, engine.step, cfg, rank, torch.bfloat16 if bf16 else torch.float32
    )
    zero = engine.optimizer
    params = [p.ds_tensor for p in engine.module.parameters()] + list(
        zero.fp32_partitioned_groups_flat
    )
    grads = [getattr(zero, "grad_partitions_flat_buffer", None)]
    grads += [t.grad for t in zero.fp32_partitioned_groups_flat] + [
        p.grad for p in engine.module.parameters()
    ]
    return {
        "params": storage_bytes(params),
        "grads": storage_bytes(grads),
        "optimizer": storage_bytes(optimizer_state_tensors(zero.optimizer)),
    }


def _worker(rank: int, port: int, cfg: DiTConfig, out_dir: str) -> None:
    init_cpu_deepspeed(rank, WORLD_SIZE, port)  # plain gloo, no JIT build
    torch.manual_seed(0)
    result = {
        f"{name}_{precision}": measure(cfg, rank, precision == "bf16")
        for precision in ("bf16", "fp32")
        for name, measure in (("ddp", measure_ddp), ("zero3", measure_zero3))
    }
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def run(cfg: DiTConfig) -> dict:
    """Spawn the two ranks, collect their byte counts, and form the ratio of the larger rank's totals."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(free_port(), cfg, out_dir), nprocs=WORLD_SIZE, join=True)
        ranks = [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(WORLD_SIZE)]
    totals = {name: max(sum(r[name].values()) for r in ranks) for name in ranks[0]}
    numel = sum(p.numel() for p in DiT.from_config_on_meta(cfg).parameters())
    return {
        "zero3_vs_ddp_bytes_ratio": round(totals["zero3_bf16"] / totals["ddp_bf16"], 4),
        "fp32_zero3_vs_ddp_bytes_ratio": round(totals["zero3_fp32"] / totals["ddp_fp32"], 4),
        "precision": "bf16 (ZeRO-3 bf16 + fp32 master; DDP fp32 weights + bf16 autocast)",
        "world_size": WORLD_SIZE,
        "per_rank_total_bytes": totals,
        "per_rank": ranks,
        "model": {"parameters": numel, "hidden_size": cfg.hidden_size, "depth": cfg.depth},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--output", help="also write the JSON here")
    args = parser.parse_args(argv)
    cfg = DiTConfig(
        hidden_size=args.hidden, depth=args.depth, num_heads=args.heads, attn_backend="sdpa"
    )
    result = json.dumps(run(cfg), indent=2)
    print(result)
    if args.output:
        Path(args.output).write_text(result + "\n")


if __name__ == "__main__":
    main()
