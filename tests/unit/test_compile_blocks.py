"""Regional torch.compile of the DiT (train/compile.py): same outputs and gradients as eager,
no recompiles when the pack's token count changes, state-dict keys untouched."""

from __future__ import annotations

import copy

import pytest
import torch

from sora_lightning.models import layers
from sora_lightning.models.dit import DiT, DiTConfig
from sora_lightning.models.patches import patchify, seqlens_to_cu, token_grid
from sora_lightning.train.compile import (
    check_strategy,
    compile_blocks,
    compile_counters,
    keep_attention_eager,
)

PATCH = (1, 2, 2)
TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}  # fp32: inductor reorders sums, nothing more


def tiny_dit() -> DiT:
    torch.manual_seed(0)
    config = DiTConfig(
        in_channels=4, patch_size=PATCH, hidden_size=32, depth=2, num_heads=2, text_dim=16
    )
    dit = DiT(config)
    with torch.no_grad():  # zero-initialised gates would hide the blocks from the comparison
        for param in dit.parameters():
            param.add_(0.02 * torch.randn_like(param))
    return dit


def make_pack(sides: list[tuple[int, int, int]], text_lens: list[int], seed: int) -> dict:
    """A packed batch of latents with latent (frames, height, width) `sides`."""
    generator = torch.Generator().manual_seed(seed)
    latents = [torch.randn(4, *side, generator=generator) for side in sides]
    grids = [token_grid(side, PATCH) for side in sides]
    return {
        "x": torch.cat([patchify(latent, PATCH) for latent in latents]),
        "cu_seqlens": seqlens_to_cu([f * h * w for f, h, w in grids]),
        "grid_sizes": torch.tensor(grids),
        "timesteps": torch.rand(len(sides), generator=generator),
        "text": torch.randn(sum(text_lens), 16, generator=generator),
        "text_cu_seqlens": seqlens_to_cu(text_lens),
    }


PACKS = [  # token counts 28, 22, 40; 2 or 3 samples; captions of different lengths
    make_pack([(1, 4, 6), (1, 4, 8)], [3, 5], seed=1),
    make_pack([(1, 6, 4), (1, 2, 4), (1, 4, 4)], [2, 4, 1], seed=2),
    make_pack([(2, 4, 6), (1, 4, 8)], [6, 3], seed=3),
]


def loss_and_grads(dit: DiT, pack: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    out = dit(**pack)
    out.square().mean().backward()
    grads = {name: p.grad.clone() for name, p in dit.named_parameters()}
    dit.zero_grad(set_to_none=True)
    return out.detach(), grads


def test_compiled_blocks_match_eager_and_never_recompile_on_new_lengths() -> None:
    eager = tiny_dit()
    compiled = copy.deepcopy(eager)
    assert compile_blocks(compiled) == 2
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # compiled in place
    for index, pack in enumerate(PACKS):
        if index == 1:
            frames_after_first = compile_counters()["compile"]["frames_compiled"]
        want, want_grads = loss_and_grads(eager, pack)
        got, got_grads = loss_and_grads(compiled, pack)
        torch.testing.assert_close(got, want, **TOLERANCE)
        for name, grad in want_grads.items():
            torch.testing.assert_close(got_grads[name], grad, **TOLERANCE, msg=name)
    recompiles = compile_counters()["compile"]["frames_compiled"] - frames_after_first
    assert recompiles == 0


def test_attention_loop_is_left_to_eager_once() -> None:
    keep_attention_eager()
    wrapped = layers._sdpa_per_sample
    keep_attention_eager()
    assert layers._sdpa_per_sample is wrapped and wrapped._torchdynamo_disable


def test_sharded_strategies_are_refused() -> None:
    class ModelParallelStrategy:  # the name is what counts
        pass

    with pytest.raises(ValueError, match="strategy=auto or ddp"):
        check_strategy(ModelParallelStrategy())
    check_strategy(object())
