"""Elastic resume's pure parts: ZeRO-3 partition merging, optimizer re-keying, resume decisions.

The multi-process runs are in tests/e2e/test_elastic_resume.py; these check the conversions on
tensors laid out by hand the way DeepSpeed and torch lay them out.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch import nn

from sora_lightning.train.checkpoint import CheckpointError, verify_checkpoint, write_manifest
from sora_lightning.train.elastic import (
    Topology,
    TopologyRecorder,
    merge_zero3_partitions,
    newest_checkpoint,
    optimizer_by_name,
    prepare_resume,
)


def zero3_partitions(tensors: dict[str, torch.Tensor], world: int) -> list[torch.Tensor]:
    """Each rank's flat partition as ZeRO-3 builds it: ceil(numel / world) of every parameter."""
    ranks: list[list[torch.Tensor]] = [[] for _ in range(world)]
    for tensor in tensors.values():
        part = math.ceil(tensor.numel() / world)
        padded = torch.cat([tensor.flatten(), torch.zeros(part * world - tensor.numel())])
        for rank in range(world):
            ranks[rank].append(padded[rank * part : (rank + 1) * part])
    return [torch.cat(pieces) for pieces in ranks]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_zero3_partitions_merge_back_to_whole_tensors(world: int) -> None:
    generator = torch.Generator().manual_seed(world)
    tensors = {
        name: torch.randn(shape, generator=generator)
        for name, shape in (("a", (3, 5)), ("b", (7,)), ("c", (2, 2)), ("d", (1,)))
    }
    shapes = {name: tensor.shape for name, tensor in tensors.items()}
    merged = merge_zero3_partitions(zero3_partitions(tensors, world), shapes)
    assert merged.keys() == tensors.keys()
    assert all(torch.equal(merged[name], tensors[name]) for name in tensors)
    with pytest.raises(CheckpointError, match="partitions hold"):
        merge_zero3_partitions(zero3_partitions(tensors, world), {"a": shapes["a"]})


class Grouped(nn.Module):
    """Parameters whose optimizer groups (weights with decay first) differ from their order."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(3, 4)
        self.norm = nn.LayerNorm(4)
        self.second = nn.Linear(4, 2)

    def optimizer(self) -> torch.optim.Optimizer:
        decay = [p for p in self.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.parameters() if p.ndim < 2]
        return torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}])


def trained() -> tuple[Grouped, torch.optim.Optimizer, dict]:
    """A model after one AdamW step, and the checkpoint TopologyRecorder completes for it."""
    torch.manual_seed(0)
    model = Grouped()
    optimizer = model.optimizer()
    model.second(model.norm(model.first(torch.randn(5, 3)))).sum().backward()
    optimizer.step()
    checkpoint = {"state_dict": model.state_dict(), "optimizer_states": [optimizer.state_dict()]}
    trainer = SimpleNamespace(strategy=DDPStrategy(), world_size=2, optimizers=[optimizer])
    TopologyRecorder().on_save_checkpoint(trainer, model, checkpoint)
    return model, optimizer, checkpoint


def test_recorder_names_every_optimizer_index_by_group() -> None:
    _, _, checkpoint = trained()
    assert checkpoint["topology"] == {"strategy": "ddp", "world_size": 2}
    assert checkpoint["optimizer_param_names"] == [
        ["first.weight", "second.weight"],
        ["first.bias", "norm.weight", "norm.bias", "second.bias"],
    ]


def test_optimizer_state_keyed_by_name_lands_on_its_own_parameter() -> None:
    """Index 1 is `second.weight` (group order), not `first.bias` (named_parameters order)."""
    model, optimizer, checkpoint = trained()
    renamed = optimizer_by_name(checkpoint, Path("ckpt"))["optimizer_states"][0]
    params = dict(model.named_parameters())
    assert set(renamed["state"]) == set(params)
    for name, state in renamed["state"].items():
        assert torch.equal(state["exp_avg"], optimizer.state[params[name]]["exp_avg"]), name
    assert renamed["param_groups"][0]["params"] == ["first.weight", "second.weight"]
    del checkpoint["optimizer_param_names"]
    with pytest.raises(CheckpointError, match="cannot be given to FSDP2"):
        optimizer_by_name(checkpoint, Path("ckpt"))


def test_a_full_file_loads_as_it_is_except_under_fsdp2(tmp_path: Path) -> None:
    """DDP (any world size) and ZeRO-3 take the file itself; FSDP2 gets a renamed copy, made
    once, with a manifest that verifies, in checkpoints/converted/by_name/."""
    _, _, checkpoint = trained()
    path = tmp_path / "step=3.ckpt"
    torch.save(checkpoint, path)
    write_manifest(path, checkpoint)
    assert prepare_resume(path, Topology("ddp", 1)) == path
    assert prepare_resume(path, Topology("deepspeed_zero3", 3)) == path
    converted = prepare_resume(path, Topology("fsdp2", 2))
    assert converted == tmp_path / "converted" / "by_name" / "step=3.ckpt"
    assert verify_checkpoint(converted) is None
    loaded = torch.load(converted, weights_only=True)
    assert "second.weight" in loaded["optimizer_states"][0]["state"]
    mtime = converted.stat().st_mtime_ns
    assert prepare_resume(path, Topology("fsdp2", 4)) == converted  # reused, not rewritten
    assert converted.stat().st_mtime_ns == mtime


def test_the_newest_checkpoint_of_any_format_is_found(tmp_path: Path) -> None:
    """A DDP run after a ZeRO-3 one must see the ZeRO-3 folder, not start fresh."""
    _, _, checkpoint = trained()
    for step in (2, 6):
        torch.save(checkpoint, tmp_path / f"step={step}.ckpt")
        write_manifest(tmp_path / f"step={step}.ckpt", checkpoint)
    (tmp_path / "step=4.ckpt").mkdir()
    (tmp_path / "step=4.ckpt" / "latest").write_text("checkpoint")
    (tmp_path / "step=8.ckpt").mkdir()  # a folder DeepSpeed never finished: no `latest`
    assert newest_checkpoint(tmp_path) == tmp_path / "step=6.ckpt"
    (tmp_path / "step=6.manifest.json").unlink()  # the write did not finish: does not count
    assert newest_checkpoint(tmp_path) == tmp_path / "step=4.ckpt"
