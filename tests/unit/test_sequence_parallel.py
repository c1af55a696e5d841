"""Ulysses sequence parallelism: 2 gloo processes equal the single-rank run on a packed batch.

The test spawns two real processes (torch.multiprocessing); each holds half of the packed tokens,
runs `UlyssesAttention` (DeepSpeed's all-to-all), and backpropagates a fixed weighted sum. Outputs
and q/k/v gradients must match single-process attention within fp32 tolerance, and the per-rank
activations (inputs, and the head-split tensors inside) must be half of the single-rank ones.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from sora_lightning.models.layers import attention
from sora_lightning.parallel.sequence import pad_packed, shard_tokens

WORLD_SIZE = 2
HEADS, HEAD_DIM = 4, 8
SEQLENS = [7, 12, 5]  # 24 tokens, three samples of different lengths


def _inputs() -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    total = sum(SEQLENS)
    q, k, v, weight = (torch.randn(total, HEADS, HEAD_DIM, generator=generator) for _ in range(4))
    cu = torch.tensor([0, *torch.tensor(SEQLENS).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, weight, cu


def _worker(rank: int, port: int, out_dir: str) -> None:
    from sora_lightning.parallel.strategies import init_cpu_deepspeed

    init_cpu_deepspeed(rank, WORLD_SIZE, port)  # plain gloo, no JIT build
    from sora_lightning.parallel.sequence import UlyssesAttention

    q, k, v, weight, cu = _inputs()
    local = [shard_tokens(t, WORLD_SIZE, rank).clone().requires_grad_(True) for t in (q, k, v)]
    out = UlyssesAttention(backend="sdpa")(*local, cu, max(SEQLENS))
    (out * shard_tokens(weight, WORLD_SIZE, rank)).sum().backward()
    torch.save(
        {"out": out.detach(), "grads": [t.grad for t in local], "local_numel": local[0].numel()},
        Path(out_dir) / f"rank{rank}.pt",
    )
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def sharded_results(tmp_path_factory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("ulysses")
    mp.spawn(_worker, args=(_free_port(), str(out_dir)), nprocs=WORLD_SIZE, join=True)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]


def _reference() -> tuple[torch.Tensor, list[torch.Tensor]]:
    q, k, v, weight, cu = _inputs()
    full = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = attention(*full, cu, cu, backend="sdpa")
    (out * weight).sum().backward()
    return out.detach(), [t.grad for t in full]


@pytest.mark.slow
def test_output_and_gradients_equal_single_rank(sharded_results: list[dict]) -> None:
    out, grads = _reference()
    torch.testing.assert_close(
        torch.cat([r["out"] for r in sharded_results]), out, rtol=1e-5, atol=1e-5
    )
    for index, name in enumerate("qkv"):
        sharded = torch.cat([r["grads"][index] for r in sharded_results])
        torch.testing.assert_close(sharded, grads[index], rtol=1e-5, atol=1e-5, msg=f"grad {name}")
    assert grads[1].abs().sum() > 0  # gradients flow through both all-to-alls


@pytest.mark.slow
def test_per_rank_activations_are_halved(sharded_results: list[dict]) -> None:
    single_rank = sum(SEQLENS) * HEADS * HEAD_DIM
    for result in sharded_results:
        assert result["local_numel"] * WORLD_SIZE == single_rank
        # inside attention each rank holds all tokens for HEADS / WORLD_SIZE heads: also half
        assert result["out"].numel() * WORLD_SIZE == single_rank


def test_pad_packed_makes_tokens_divisible_with_a_separate_segment() -> None:
    cu = torch.tensor([0, 7, 13], dtype=torch.int32)
    padded, pad = pad_packed(cu, 4)
    assert pad == 3 and padded.tolist() == [0, 7, 13, 16]
    same, none = pad_packed(torch.tensor([0, 8], dtype=torch.int32), 4)
    assert none == 0 and same.tolist() == [0, 8]
    with pytest.raises(ValueError, match="pad_packed"):
        shard_tokens(torch.zeros(13, 2), 4, 0)
