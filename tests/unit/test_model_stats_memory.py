"""The memory plan's counters agree with the model: Linears and LoRA sizes with the module tree
and peft, the Wan presets with their published parameter counts, activations with the tensors
autograd really saves (bf16, attention saving only its inputs as flash attention does)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from test_model_stats import load_tool
from torch import nn
from torch.utils.checkpoint import checkpoint

import sora_lightning.models.dit as dit_module
from sora_lightning.models.dit import DiT, DiTConfig
from sora_lightning.models.patches import seqlens_to_cu
from sora_lightning.models.stats import (
    activation_bytes,
    count_params,
    linear_shapes,
    lora_params,
    state_bytes,
)
from sora_lightning.parallel.strategies import apply_activation_checkpointing
from sora_lightning.train.lora import LoraSettings

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = DiTConfig(
    hidden_size=64, depth=2, num_heads=4, mlp_hidden_size=96, text_dim=32, attn_backend="sdpa"
)
WIDE = replace(TINY, hidden_size=128, depth=3, num_heads=8, mlp_hidden_size=200)
TRAINED = LoraSettings(rank=4).target_regex()
"""What `lora.rank>0` adapts by default: every attention and MLP Linear of the blocks."""
SUFFIXES = ["qkv", "proj", "q", "kv", "mlp.0", "mlp.2"]
"""The same names as a peft list: "mlp.0" also matches the time embedder's `time_embed.mlp.0`."""
PUBLISHED = {"wan2_1_1_3b": 1_418_996_800, "wan2_1_14b": 14_288_491_584}


@pytest.mark.parametrize("cfg", [TINY, replace(TINY, pooled_text=True, use_conditioning=False)])
def test_linear_shapes_are_the_module_tree(cfg: DiTConfig) -> None:
    model = DiT(cfg)
    real = {
        name: (module.in_features, module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
    }
    assert linear_shapes(cfg) == real


@pytest.mark.parametrize(("targets", "per_block"), [(TRAINED, 7), (SUFFIXES, 7), (["kv"], 1)])
def test_lora_params_are_what_peft_adds(targets, per_block: int) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=4, lora_alpha=4, target_modules=targets)
    model = inject_adapter_in_model(config, DiT(TINY))
    added = sum(p.numel() for name, p in model.named_parameters() if "lora_" in name)
    assert lora_params(TINY, 4, targets) == added
    wrapped = {
        name.split(".lora_A")[0] for name, _ in model.named_parameters() if ".lora_A" in name
    }
    assert sum(name.startswith("blocks.0.") for name in wrapped) == per_block
    assert ("time_embed.mlp.0" in wrapped) == (targets == SUFFIXES)
    with pytest.raises(ValueError, match="match no Linear"):
        lora_params(TINY, 4, ["to_q"])  # diffusers' names are not ours


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_wan_presets_count_the_published_parameters(preset: str) -> None:
    cfg = load_tool().load_preset(preset)
    assert count_params(cfg) == PUBLISHED[preset]
    assert sum(i * o + o for i, o in linear_shapes(cfg).values()) < PUBLISHED[preset]


def test_state_bytes_follow_the_stated_assumptions() -> None:
    params = count_params(TINY)
    one = state_bytes(TINY, 1)
    assert (one.params, one.grads, one.optimizer) == (2 * params, 2 * params, 12 * params)
    fsdp = state_bytes(TINY, 1, "fsdp2")
    assert (fsdp.params, fsdp.grads, fsdp.optimizer) == (4 * params, 4 * params, 8 * params)
    eight = state_bytes(TINY, 8)
    block = count_params(TINY) - count_params(replace(TINY, depth=1))
    assert eight.params == -(-2 * params // 8) + 2 * 2 * block  # 2 blocks gathered in bf16
    assert eight.optimizer == -(-12 * params // 8)
    assert one.ema == one.params and fsdp.ema == fsdp.params and eight.ema == -(-2 * params // 8)
    lora = state_bytes(TINY, 1, adapter_params=1000)
    assert (lora.params, lora.grads, lora.optimizer) == (2 * params + 2000, 2000, 12000)
    assert lora.ema == 2000  # the adapters: the EMA shares the frozen base (train/lora.py)
    assert state_bytes(TINY, 1, "fsdp2", adapter_params=1000).ema == 2 * params + 4000  # a copy
    assert state_bytes(TINY, 1, ema=False).total == 16 * params
    with pytest.raises(ValueError, match="strategy"):
        state_bytes(TINY, 1, "zero2")


def saved_bytes(model: nn.Module, cfg: DiTConfig, lengths: list[int], text_len: int) -> int:
    """Bytes of the distinct storages autograd saves in one bf16 forward (weights excluded)."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    bf16 = torch.bfloat16
    inputs = {
        "x": torch.randn(sum(lengths), cfg.patch_dim, dtype=bf16),
        "cu_seqlens": seqlens_to_cu(lengths),
        "grid_sizes": torch.tensor([(1, 1, n) for n in lengths]),
        "timesteps": torch.rand(len(lengths)),
        "text": torch.randn(text_len * len(lengths), cfg.text_dim, dtype=bf16),
        "text_cu_seqlens": seqlens_to_cu([text_len] * len(lengths)),
    }
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(**inputs)
    return sum(saved.values())


@pytest.fixture
def flash_like(monkeypatch: pytest.MonkeyPatch) -> None:
    """Attention that keeps only q, k, v (recomputed in backward), like flash attention's O(L)
    instead of the CPU math path's [L, L] probabilities; its log-sum-exp is the one difference."""
    attention = dit_module.attention

    def recomputed(q, k, v, *args, **kwargs):
        return checkpoint(attention, q, k, v, *args, use_reentrant=False, **kwargs)

    monkeypatch.setattr(dit_module, "attention", recomputed)


@pytest.mark.usefixtures("flash_like")
@pytest.mark.parametrize(
    ("cfg", "lengths"),
    [(TINY, [1024]), (WIDE, [1024]), (TINY, [512, 512])],
    ids=["tiny", "wide", "tiny-two-clips"],
)
def test_activations_are_what_autograd_saves(cfg: DiTConfig, lengths: list[int]) -> None:
    measured = saved_bytes(DiT(cfg).to(torch.bfloat16), cfg, lengths, 16)
    counted = activation_bytes(cfg, sum(lengths), 16 * len(lengths), samples=len(lengths))
    assert counted.recompute == 0
    assert counted.stored == pytest.approx(measured, rel=0.02)
    if len(lengths) == 1:  # packing two clips keeps per-token modulation: not counted once
        assert activation_bytes(cfg, 1024, 16, samples=2).stored > counted.stored


@pytest.mark.usefixtures("flash_like")
@pytest.mark.parametrize("cfg", [TINY, WIDE], ids=["tiny", "wide"])
def test_checkpointed_blocks_keep_their_inputs(cfg: DiTConfig) -> None:
    model = DiT(cfg).to(torch.bfloat16)
    apply_activation_checkpointing(model.blocks)
    measured = saved_bytes(model, cfg, [1024], 16)
    counted = activation_bytes(cfg, 1024, 16, checkpointing=True)
    rope_table = 4 * cfg.head_dim * 1024  # held by the checkpoint, not through autograd's hooks
    assert counted.stored == pytest.approx(measured + rope_table, rel=0.01)
    full, block_input = activation_bytes(cfg, 1024, 16), 2 * cfg.hidden_size * 1024
    assert counted.recompute == (full.stored - counted.stored) // cfg.depth + block_input


@pytest.mark.usefixtures("flash_like")
@pytest.mark.parametrize("rank", [8, 32])
def test_lora_activations_are_what_autograd_saves(rank: int) -> None:
    from peft import inject_adapter_in_model

    model = inject_adapter_in_model(LoraSettings(rank=rank).peft_config(), DiT(WIDE))
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
    measured = saved_bytes(model.to(torch.bfloat16), WIDE, [1024], 16)
    counted = activation_bytes(WIDE, 1024, 16, lora_rank=rank, lora_targets_per_block=7)
    assert counted.stored == pytest.approx(measured, rel=0.03)


def test_memory_plan_cli(capsys: pytest.CaptureFixture[str]) -> None:
    tool = load_tool()
    argv = ["--memory", "--clips", "81x480x832", "--gpus", "1", "8", "--lora-rank", "32"]
    plan = tool.main(argv)
    assert json.loads(capsys.readouterr().out) == plan
    assert {k: v["params"] for k, v in plan["models"].items()} == PUBLISHED
    rows = {(r["preset"], r["mode"], r["gpus"], r["checkpointing"]): r for r in plan["rows"]}
    assert len(rows) == len(plan["rows"]) == 2 * 2 * 2 * 2
    assert all(r["tokens"] == 21 * 30 * 52 for r in plan["rows"])  # 81x480x832 at 4x8x8, 1x2x2
    full, lora = rows["wan2_1_14b", "full", 8, True], rows["wan2_1_14b", "lora", 8, True]
    assert lora["bytes"]["optimizer"] < full["bytes"]["optimizer"] / 50
    assert (
        rows["wan2_1_14b", "full", 1, False]["bytes"]["optimizer"] == 12 * PUBLISHED["wan2_1_14b"]
    )
    for row in plan["rows"]:
        parts = row["bytes"]
        assert parts["total"] == sum(v for k, v in parts.items() if k != "total")
    tool.main([*argv, "--markdown"])
    assert capsys.readouterr().out.count("\n| wan2_1_") == 16
    with pytest.raises(SystemExit, match="match no Linear"):
        tool.main(["--memory", "--lora-targets", "to_q,to_k"])  # diffusers' names, not ours
