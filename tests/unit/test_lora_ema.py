"""The EMA of a LoRA run holds the frozen base once: it shares the DiT's tensors (`ema_twin`).

Only the adapters are averaged, so the EMA's base would always equal the DiT's; these tests hold
that the two trees really share those tensors (same storage), keep distinct adapters, compute what
a full copy computes, and checkpoint and resume bit-exactly. Under FSDP2 the EMA is sharded into
its own copy of the base (train/lora.py `ema_twin` says why): checked on a one-rank gloo mesh.
Under DeepSpeed ZeRO-3 the shared tensors are partitioned once and gathered by either tree (slow
test, two processes); tests/e2e/test_lora_strategies.py resumes LoRA runs bit-exactly under DDP,
ZeRO-3 and FSDP2 through sora-train.
"""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_lora import TINY, batch, make_export, module, randomize_adapters

from sora_lightning.parallel.strategies import (
    ParallelConfig,
    deepspeed_config,
    free_port,
    init_cpu_deepspeed,
    shard_dit,
)
from sora_lightning.train.lora import adapter_state, is_adapter_key, load_adapter_state

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def export(tmp_path: Path) -> Path:
    return make_export(tmp_path / "export")


def pairs(lightning_module) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, DiT parameter, EMA parameter) in the order the EMA update zips them."""
    return [
        (name, param, ema)
        for (name, param), ema in zip(
            lightning_module.dit.named_parameters(),
            lightning_module.ema.parameters(),
            strict=True,
        )
    ]


def test_ema_shares_the_base_and_copies_the_adapters(export: Path) -> None:
    lora = module(export)
    base = [(n, p, e) for n, p, e in pairs(lora) if not is_adapter_key(n)]
    adapters = [(n, p, e) for n, p, e in pairs(lora) if is_adapter_key(n)]
    assert base and adapters
    for name, param, ema in base:
        assert ema is param and ema.data_ptr() == param.data_ptr(), name
    for name, param, ema in adapters:
        assert ema.data_ptr() != param.data_ptr() and torch.equal(ema, param), name
        assert param.requires_grad and not ema.requires_grad, name
    assert not lora.ema.training and lora.dit.training
    # the Lightning module (what DDP and ZeRO-3 wrap) lists the base once: base + 2 x adapters
    numel = lambda items: sum(p.numel() for _, p, _ in items)  # noqa: E731
    assert sum(p.numel() for p in lora.parameters()) == numel(base) + 2 * numel(adapters)


def test_full_finetune_ema_is_a_copy(export: Path) -> None:
    full = module(export, lora=None)
    for name, param, ema in pairs(full):
        assert ema.data_ptr() != param.data_ptr() and torch.equal(ema, param), name


def test_shared_ema_computes_what_a_full_copy_computes(export: Path) -> None:
    lora = module(export)
    randomize_adapters(lora.dit, seed=1)
    randomize_adapters(lora.ema, seed=2)
    copied = copy.deepcopy(lora.ema)  # the former EMA: every tensor its own
    shared = zip(copied.parameters(), lora.ema.parameters(), strict=True)
    assert all(c.data_ptr() != e.data_ptr() for c, e in shared)
    with torch.no_grad():
        ours, theirs = lora.ema(*batch(TINY)), copied(*batch(TINY))
        assert not torch.equal(ours, lora.dit(*batch(TINY)))  # the EMA's adapters are its own
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def train_step(lightning_module, optimizer, seed: int) -> None:
    optimizer.zero_grad()
    lightning_module.dit(*batch(TINY, seed)).square().mean().backward()
    optimizer.step()
    lightning_module._update_ema()


def test_update_checkpoint_and_resume_are_bit_exact(export: Path) -> None:
    trained = module(export)
    randomize_adapters(trained.dit, seed=3)  # lora_B = 0 would leave lora_A without a gradient
    optimizer = torch.optim.AdamW([p for p in trained.dit.parameters() if p.requires_grad], lr=1e-2)
    base = {n: p.detach().clone() for n, p, _ in pairs(trained) if not is_adapter_key(n)}
    for step in range(2):
        train_step(trained, optimizer, seed=step)
    for name, param, ema in pairs(trained):
        if is_adapter_key(name):  # averaged: behind the adapters, never equal to them
            assert not torch.equal(ema, param), name
        else:  # the base never moved, and is still one tensor
            assert ema is param and torch.equal(param, base[name]), name

    buffer = io.BytesIO()
    torch.save({"state_dict": trained.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    assert checkpoint["state_dict"] and all(is_adapter_key(k) for k in checkpoint["state_dict"])
    resumed = module(export)
    resumed.on_load_checkpoint(checkpoint)
    resumed.load_state_dict(checkpoint["state_dict"], strict=resumed.strict_loading)
    for (name, param, ema), (_, want, want_ema) in zip(pairs(resumed), pairs(trained), strict=True):
        assert torch.equal(param, want) and torch.equal(ema, want_ema), name
        assert (ema is param) == (not is_adapter_key(name)), name
    with torch.no_grad():
        torch.testing.assert_close(
            resumed.ema(*batch(TINY)), trained.ema(*batch(TINY)), rtol=0, atol=0
        )


@pytest.fixture
def one_rank_group():
    """A one-process gloo group (FSDP2 needs a device mesh), torn down after the test."""
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    yield
    dist.destroy_process_group()


def test_fsdp2_gives_the_ema_its_own_sharded_base(export: Path, one_rank_group) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    lora = module(export)
    randomize_adapters(lora.dit, seed=4)
    shard_dit(lora.dit, lora.ema, init_device_mesh("cpu", (1,)), ParallelConfig(name="fsdp2"))
    for name, param, ema in pairs(lora):
        assert hasattr(param, "to_local") and hasattr(ema, "to_local"), name
        assert ema.to_local().data_ptr() != param.to_local().data_ptr(), name
        assert torch.equal(ema.to_local(), param.to_local()) != is_adapter_key(name), name
    lora._update_ema()  # a local lerp of matching shards, the base skipped
    with torch.no_grad():
        out = lora.ema(*batch(TINY))
    assert out.shape == batch(TINY)[0].shape and torch.isfinite(out).all()


def _zero3_worker(rank: int, port: int, export: str, out: str) -> None:
    """One of two ZeRO-3 ranks: three steps, then the EMA's and the DiT's forwards."""
    import deepspeed

    init_cpu_deepspeed(rank, 2, port)
    lora = module(Path(export))
    randomize_adapters(lora.dit, seed=3)
    trainable = [p for p in lora.dit.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(
        model=lora,
        optimizer=torch.optim.AdamW(trainable, lr=1e-2),
        config=deepspeed_config({}),
        dist_init_required=False,
    )
    shared = all((e is p) != is_adapter_key(n) for n, p, e in pairs(lora))
    for step in range(3):
        engine.backward(lora.dit(*batch(TINY, step)).square().mean())
        engine.step()
        lora._update_ema()
    with torch.no_grad():  # collective forwards: every rank runs them
        before, ema, after = (part(*batch(TINY, 9)) for part in (lora.dit, lora.ema, lora.dit))
    ema_adapters, dit_adapters = adapter_state(lora.ema), adapter_state(lora.dit)
    if rank == 0:  # the same adapters on a plain (unpartitioned) module
        plain = module(Path(export))
        load_adapter_state(plain.ema, ema_adapters)
        load_adapter_state(plain.dit, dit_adapters)
        with torch.no_grad():
            plain_ema, plain_dit = plain.ema(*batch(TINY, 9)), plain.dit(*batch(TINY, 9))
        report = {
            "shared": shared,
            "partitioned": all(hasattr(p, "ds_tensor") for p in lora.parameters()),
            "ema_vs_plain": (ema - plain_ema).abs().max().item(),
            "dit_vs_plain": (before - plain_dit).abs().max().item(),
            "dit_after_ema_forward": (after - before).abs().max().item(),
            "ema_vs_dit": (ema - before).abs().max().item(),
        }
        Path(out).write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow  # two DeepSpeed processes: about a minute on 2 busy cores
@pytest.mark.e2e
def test_zero3_partitions_the_shared_base_once(export: Path, tmp_path: Path) -> None:
    pytest.importorskip("deepspeed")
    out = tmp_path / "zero3.json"
    mp.spawn(_zero3_worker, args=(free_port(), str(export), str(out)), nprocs=2, join=True)
    report = json.loads(out.read_text())
    assert report["shared"] and report["partitioned"]
    assert report["ema_vs_plain"] == report["dit_vs_plain"] == 0.0
    assert report["dit_after_ema_forward"] == 0.0  # the EMA's gathers leave the DiT intact
    assert report["ema_vs_dit"] > 1e-4  # the EMA's adapters are its own
