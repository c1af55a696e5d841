"""Ulysses sequence parallelism: 2 gloo processes equal the single-rank run on a packed batch.

The test spawns two real processes (torch.multiprocessing); each holds half of the packed tokens,
runs `UlyssesAttention` (DeepSpeed's all-to-all), and backpropagates a fixed weighted sum. Outputs
and q/k/v gradients must match single-process attention within fp32 tolerance, and the per-rank
activations (inputs, and the head-split tensors inside) must be half of the single-rank ones.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from sora_lightning.data.latent_cache import CachedSample
from sora_lightning.models.layers import attention
from sora_lightning.parallel.sequence import check_sequence_parallel, pad_packed, shard_tokens
from sora_lightning.parallel.strategies import free_port
from sora_lightning.train.curriculum import Curriculum, Stage
from sora_lightning.train.dit_data import PackStepDataset

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


@pytest.fixture(scope="module")
def sharded_results(tmp_path_factory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("ulysses")
    mp.spawn(_worker, args=(free_port(), str(out_dir)), nprocs=WORLD_SIZE, join=True)
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


def _pack_dataset(rank: int, world_size: int) -> PackStepDataset:
    generator = torch.Generator().manual_seed(0)
    samples = [
        CachedSample(
            f"s{i}", torch.randn(4, 3, 4, 4, generator=generator), {"short": torch.ones(2, 8)}
        )
        for i in range(8)
    ]
    curriculum = Curriculum(
        stages=[
            Stage("dp", 2, frames=(5, 9), token_budget=48, cond_probability=0.5),
            Stage(
                "sp", 2, frames=(5, 9), token_budget=48, cond_probability=0.5, sequence_parallel=2
            ),
        ]
    )
    return PackStepDataset(
        samples,
        torch.zeros(1, 8),
        torch.zeros(4),
        torch.ones(4),
        curriculum,
        patch_size=(1, 2, 2),
        spatial_factor=4,
        temporal_factor=4,
        seed=0,
        caption_probs={"short": 1.0},
        text_dropout=0.0,
        rank=rank,
        world_size=world_size,
    )


def test_ranks_of_a_sequence_group_get_the_same_batch() -> None:
    ranks = [_pack_dataset(rank, 4) for rank in range(4)]
    for step in (0, 1):  # sequence_parallel=1: four different packs
        packs = [tuple(data.pack_for(step)[1]) for data in ranks]
        assert len(set(packs)) == 4
    for step in (2, 3):  # sequence_parallel=2: ranks {0,1} and {2,3} share, the groups differ
        batches = [data[step] for data in ranks]
        for a, b in ((0, 1), (2, 3)):
            assert torch.equal(batches[a].x, batches[b].x)
            assert torch.equal(batches[a].cond_mask, batches[b].cond_mask)
        assert ranks[0].pack_for(step)[1] != ranks[2].pack_for(step)[1]


def test_config_errors_name_the_stage_and_the_fix() -> None:
    check_sequence_parallel(2, 4, 8)
    with pytest.raises(ValueError, match="stage 'long'.*does not divide the world size 3"):
        check_sequence_parallel(2, 3, 8, where="stage 'long': ")
    with pytest.raises(ValueError, match="4 attention heads"):
        check_sequence_parallel(8, 8, 4)
