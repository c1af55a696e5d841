"""Sequence-parallel DiT: 2 gloo processes equal the single-rank training step on a packed batch.

Two real processes (torch.multiprocessing spawn) share one packed video batch (three samples of
different grids, an odd token count so the padding path runs, leading and trailing conditioning
frames). Each rank computes the training loss of `DiTModule` (`flow.packed_batch_loss`) with its
half of the tokens (Ulysses attention inside), backpropagates, and sums its parameter gradients
over the group (what `loss * N` under DDP's mean does in training). Loss and every gradient must equal the single-rank
run within fp32 tolerance (also with activation checkpointing, which re-runs the all-to-alls in
backward), and the bytes autograd saves for backward per rank must shrink.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from sora_lightning.data.packing import PackedBatch, pack_samples
from sora_lightning.diffusion.flow import packed_batch_loss
from sora_lightning.models.dit import DiT, DiTConfig
from sora_lightning.parallel.strategies import free_port, parallelize_module

pytestmark = pytest.mark.e2e
WORLD_SIZE = 2
PATCH = (1, 2, 2)
# (C, F, h, w) latents: 48 + 30 + 15 = 93 tokens, odd so one padding token is needed
LATENT_SHAPES = [(4, 3, 8, 8), (4, 2, 6, 10), (4, 1, 6, 10)]
TEXT_LENS = [5, 3, 7]
COND = [1, -1, 0]  # first frame clean, last frame clean, none
LOSS_RTOL, GRAD_RTOL, GRAD_ATOL = 1e-5, 1e-4, 1e-5


def _config() -> DiTConfig:
    return DiTConfig(
        in_channels=4,
        patch_size=PATCH,
        hidden_size=64,
        depth=2,
        num_heads=4,
        attn_backend="sdpa",
        abs_pos_embed=True,  # its table is sharded (and padded) like the tokens
    )


def _model(activation_checkpointing: bool = False) -> DiT:
    """Tiny DiT with every parameter nudged off its zero init, so every gradient carries signal.

    Checkpointing is applied from outside, as training does (`parallelize_module`).
    """
    torch.manual_seed(0)
    model = DiT(_config())
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    parallelize_module(model, None, None, {"activation_checkpointing": activation_checkpointing})
    return model


def _inputs() -> tuple[PackedBatch, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    latents = [torch.randn(shape, generator=generator) for shape in LATENT_SHAPES]
    texts = [torch.randn(n, 384, generator=generator) for n in TEXT_LENS]
    batch = pack_samples(latents, texts, PATCH, capacity=256, cond_frames=COND)
    timesteps = torch.rand(len(LATENT_SHAPES), generator=generator)
    noise = torch.randn(batch.x.shape, generator=generator)
    return batch, timesteps, noise


def _saved_bytes(run) -> tuple[object, int]:
    """Result of run() and the bytes of activation storage autograd saves (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in _PARAMS}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = run()
    return result, sum(storages.values())


_PARAMS: list[torch.Tensor] = []


def _step(model: DiT, sequence=None) -> dict:
    """Loss, saved-activation bytes and parameter gradients of one training step."""
    _PARAMS[:] = list(model.parameters())
    batch, timesteps, noise = _inputs()
    model.zero_grad()
    loss, saved = _saved_bytes(
        lambda: packed_batch_loss(model, batch, timesteps, noise, sequence=sequence)
    )
    loss.backward()
    grads = {  # names as in the state dict: without the checkpoint wrapper's prefix
        name.replace("_checkpoint_wrapped_module.", ""): p.grad.detach().clone()
        for name, p in model.named_parameters()
    }
    return {"loss": loss.detach(), "saved_bytes": saved, "grads": grads}


def _worker(rank: int, port: int, out_dir: str) -> None:
    from sora_lightning.parallel.sequence import build_sequence_groups

    torch.set_num_threads(1)
    # A plain torch gloo group, as Lightning's DDP makes: SequenceParallel wraps it for DeepSpeed.
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE
    )
    sequence = build_sequence_groups([WORLD_SIZE], WORLD_SIZE, rank, "sdpa")[WORLD_SIZE]
    results = {}
    for recompute in (False, True):  # checkpointed blocks redo the all-to-alls in backward
        result = _step(_model(recompute), sequence)
        for grad in result["grads"].values():  # the group's gradient: the sum of rank shares
            torch.distributed.all_reduce(grad, group=sequence.group)
        results["checkpointed" if recompute else "plain"] = result
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("sp_dit")
    mp.spawn(_worker, args=(free_port(), str(out_dir)), nprocs=WORLD_SIZE, join=True)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]


@pytest.fixture(scope="module")
def sharded(sharded_runs: list[dict]) -> list[dict]:
    return [run["plain"] for run in sharded_runs]


@pytest.fixture(scope="module")
def single() -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _step(_model())
    finally:
        torch.set_num_threads(threads)


def test_loss_and_gradients_equal_single_rank(sharded: list[dict], single: dict) -> None:
    for result in sharded:
        torch.testing.assert_close(result["loss"], single["loss"], rtol=LOSS_RTOL, atol=1e-7)
        for name, grad in single["grads"].items():
            torch.testing.assert_close(
                result["grads"][name], grad, rtol=GRAD_RTOL, atol=GRAD_ATOL, msg=name
            )
    assert all(g.abs().sum() > 0 for g in single["grads"].values())
    worst = max(
        float((r["grads"][n] - g).abs().max()) for r in sharded for n, g in single["grads"].items()
    )
    print(f"loss {float(single['loss']):.6f}, worst |grad diff| {worst:.2e}")


def test_per_rank_activation_memory_shrinks(sharded: list[dict], single: dict) -> None:
    ratios = [r["saved_bytes"] / single["saved_bytes"] for r in sharded]
    print(f"saved activation bytes: sp=1 {single['saved_bytes']}, sp=2 per rank ratios {ratios}")
    assert max(ratios) < 0.6, ratios


def test_activation_checkpointing_under_sequence_parallel(
    sharded_runs: list[dict], single: dict
) -> None:
    for run in sharded_runs:
        result = run["checkpointed"]
        torch.testing.assert_close(result["loss"], single["loss"], rtol=LOSS_RTOL, atol=1e-7)
        for name, grad in single["grads"].items():
            torch.testing.assert_close(
                result["grads"][name], grad, rtol=GRAD_RTOL, atol=GRAD_ATOL, msg=name
            )
