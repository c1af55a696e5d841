"""The DiT on packed batches: per-sample isolation, zero init, training signal, presets, checkpointing."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from sora_lightning.config import conf_dir
from sora_lightning.models.dit import DiT, DiTConfig, mean_per_segment
from sora_lightning.models.layers import SinCosPositionEmbedding3D
from sora_lightning.models.patches import seqlens_to_cu
from sora_lightning.models.stats import count_params

CONF_DIR = conf_dir() / "model" / "dit"
GRIDS = [(2, 3, 4), (1, 2, 2), (3, 2, 3)]
TEXT_LENS = [5, 3, 7]


pytestmark = pytest.mark.usefixtures("one_thread")


def load_config(name: str) -> DiTConfig:
    return instantiate(OmegaConf.load(CONF_DIR / f"{name}.yaml"))


@pytest.fixture
def tiny_cfg() -> DiTConfig:
    cfg = load_config("tiny")
    cfg.attn_backend = "sdpa"
    return cfg


def perturbed_model(cfg: DiTConfig) -> DiT:
    """Tiny DiT with every parameter nudged off its init, so zero-init paths carry signal."""
    model = DiT(cfg)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model


def make_batch(cfg: DiTConfig, grids=GRIDS, text_lens=TEXT_LENS) -> dict[str, torch.Tensor]:
    lengths = [f * h * w for f, h, w in grids]
    num_tokens = sum(lengths)
    return {
        "x": torch.randn(num_tokens, cfg.patch_dim),
        "cu_seqlens": seqlens_to_cu(lengths),
        "grid_sizes": torch.tensor(grids, dtype=torch.int64),
        "timesteps": torch.rand(len(grids)),
        "text": torch.randn(sum(text_lens), cfg.text_dim),
        "text_cu_seqlens": seqlens_to_cu(text_lens),
        "cond": torch.randn(num_tokens, cfg.patch_dim),
        "cond_mask": (torch.rand(num_tokens) < 0.3).float(),
    }


def sample_slice(batch: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    """Sample i of a packed batch as a batch of one."""
    start, end = batch["cu_seqlens"][i : i + 2].tolist()
    t_start, t_end = batch["text_cu_seqlens"][i : i + 2].tolist()
    return {
        "x": batch["x"][start:end],
        "cu_seqlens": seqlens_to_cu([end - start]),
        "grid_sizes": batch["grid_sizes"][i : i + 1],
        "timesteps": batch["timesteps"][i : i + 1],
        "text": batch["text"][t_start:t_end],
        "text_cu_seqlens": seqlens_to_cu([t_end - t_start]),
        "cond": batch["cond"][start:end],
        "cond_mask": batch["cond_mask"][start:end],
    }


def test_packed_batch_equals_each_sample_alone(tiny_cfg: DiTConfig) -> None:
    model = perturbed_model(tiny_cfg).eval()
    batch = make_batch(tiny_cfg)
    with torch.no_grad():
        packed = model(**batch)
        alone = torch.cat([model(**sample_slice(batch, i)) for i in range(len(GRIDS))])
    assert packed.shape == batch["x"].shape and packed.abs().max() > 1e-3
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("field", ["x", "text", "timesteps", "cond"])
def test_perturbing_one_sample_leaves_others_exactly_unchanged(
    tiny_cfg: DiTConfig, field: str
) -> None:
    model = perturbed_model(tiny_cfg).eval()
    batch = make_batch(tiny_cfg)
    changed = {k: v.clone() for k, v in batch.items()}
    cu = batch["text_cu_seqlens"] if field == "text" else batch["cu_seqlens"]
    if field == "timesteps":
        changed["timesteps"][1] = 1.0 - changed["timesteps"][1]
    else:
        start, end = cu[1:3].tolist()  # sample 1
        changed[field][start:end] += torch.randn_like(changed[field][start:end])
        changed["cond_mask"][batch["cu_seqlens"][1] : batch["cu_seqlens"][2]] = 1.0
    with torch.no_grad():
        base, other = model(**batch), model(**changed)
    start, end = batch["cu_seqlens"][1:3].tolist()
    assert torch.equal(base[:start], other[:start]) and torch.equal(base[end:], other[end:])
    assert not torch.allclose(base[start:end], other[start:end])


def test_untrained_model_predicts_zero(tiny_cfg: DiTConfig) -> None:
    out = DiT(tiny_cfg)(**make_batch(tiny_cfg))
    assert torch.count_nonzero(out) == 0


def test_training_signal_reaches_every_parameter(tiny_cfg: DiTConfig) -> None:
    model = DiT(tiny_cfg).train()
    batch = make_batch(tiny_cfg)
    target = torch.randn_like(batch["x"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):  # zero-init: output layer first, then gates, then everything
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(**batch), target).backward()
        optimizer.step()
    silent = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert not silent, f"no gradient reached {silent}"
    with torch.no_grad():
        assert model(**batch).abs().max() > 0


def test_conditioning_none_equals_empty_mask(tiny_cfg: DiTConfig) -> None:
    model = perturbed_model(tiny_cfg).eval()
    batch = make_batch(tiny_cfg)
    without = {k: v for k, v in batch.items() if k not in ("cond", "cond_mask")}
    empty = dict(batch, cond_mask=torch.zeros_like(batch["cond_mask"]))
    with torch.no_grad():
        torch.testing.assert_close(model(**without), model(**empty), atol=0, rtol=0)


@pytest.mark.parametrize("preset", sorted(p.stem for p in CONF_DIR.glob("*.yaml")))
def test_every_preset_builds_on_meta_with_exact_param_count(preset: str) -> None:
    cfg = load_config(preset)
    assert isinstance(cfg, DiTConfig)
    model = DiT.from_config_on_meta(cfg)
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == count_params(cfg)


def test_known_preset_sizes() -> None:
    assert 0.55e9 < count_params(load_config("600m")) < 0.65e9
    assert 1.3e9 < count_params(load_config("1_3b")) < 1.5e9
    assert 13.5e9 < count_params(load_config("14b")) < 14.5e9


def _gradients_and_saved_bytes(model: DiT, batch: dict[str, torch.Tensor]) -> tuple[list, int]:
    """Parameter gradients of one backward, and the activation bytes autograd saved for it."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.untyped_storage().data_ptr() not in params:
            saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    model.zero_grad()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = model(**batch)
    out.square().sum().backward()
    return [p.grad.clone() for p in model.parameters()], sum(saved.values())


def test_activation_checkpointing_from_outside_gives_same_gradients(tiny_cfg: DiTConfig) -> None:
    """The one switch (strategy.activation_checkpointing, applied by parallelize_module) gives the
    gradients of the plain model while saving less for backward; the EMA is never wrapped."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    from sora_lightning.parallel.strategies import parallelize_module

    model = perturbed_model(tiny_cfg).train()
    wrapped, ema = copy.deepcopy(model), copy.deepcopy(model)
    parallelize_module(wrapped, ema, None, {"activation_checkpointing": True})
    assert all(isinstance(block, CheckpointWrapper) for block in wrapped.blocks)
    assert not any(isinstance(block, CheckpointWrapper) for block in ema.blocks)
    batch = make_batch(tiny_cfg)
    plain_grads, plain_bytes = _gradients_and_saved_bytes(model, batch)
    recomputed_grads, recomputed_bytes = _gradients_and_saved_bytes(wrapped, batch)
    for plain, recomputed in zip(plain_grads, recomputed_grads, strict=True):
        torch.testing.assert_close(plain, recomputed, atol=1e-6, rtol=1e-5)
    assert recomputed_bytes < 0.7 * plain_bytes, (recomputed_bytes, plain_bytes)


def test_activation_checkpointing_never_nests_and_keeps_state_dict_keys(
    tiny_cfg: DiTConfig,
) -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    from sora_lightning.parallel.strategies import apply_activation_checkpointing

    model = DiT(tiny_cfg)
    keys = list(model.state_dict())
    apply_activation_checkpointing(model.blocks)
    apply_activation_checkpointing(model.blocks)  # a second call (or a second switch) is a no-op
    for block in model.blocks:
        assert isinstance(block, CheckpointWrapper)
        assert not any(
            isinstance(m, CheckpointWrapper) for m in block._checkpoint_wrapped_module.modules()
        )
    assert list(model.state_dict()) == keys
    DiT(tiny_cfg).load_state_dict(model.state_dict())


def test_retired_model_switch_loads_old_configs_but_does_nothing(tiny_cfg: DiTConfig) -> None:
    """Configs saved with DiTConfig.activation_checkpointing still load; the key is not kept."""
    values = dataclasses.asdict(tiny_cfg)
    assert "activation_checkpointing" not in values
    assert DiTConfig(**values, activation_checkpointing=False) == tiny_cfg
    with pytest.warns(UserWarning, match="strategy.activation_checkpointing"):
        old = DiTConfig(**values, activation_checkpointing=True)
    assert old == tiny_cfg and not hasattr(DiT(old).blocks[0], "_checkpoint_wrapped_module")


def test_invalid_configs_and_inputs_raise(tiny_cfg: DiTConfig) -> None:
    with pytest.raises(ValueError, match="divisible"):
        DiTConfig(hidden_size=64, num_heads=5)
    with pytest.raises(ValueError, match="RoPE"):
        DiTConfig(hidden_size=12, num_heads=4)  # head_dim 3
    with pytest.raises(ValueError, match="attn_backend"):
        DiTConfig(hidden_size=64, num_heads=4, attn_backend="magic")
    with pytest.raises(ValueError, match="sin-cos"):
        DiTConfig(hidden_size=6, num_heads=1, abs_pos_embed=True)  # fine for RoPE, too narrow here
    model = DiT(tiny_cfg)
    batch = make_batch(tiny_cfg)
    with pytest.raises(ValueError, match="grid_sizes cover"):
        model(**dict(batch, grid_sizes=batch["grid_sizes"] + 1))
    with pytest.raises(ValueError, match="together"):
        model(**dict(batch, cond=None))


def test_bf16_autocast_runs_and_tracks_fp32(tiny_cfg: DiTConfig) -> None:
    model = perturbed_model(tiny_cfg)
    batch = make_batch(tiny_cfg)
    reference = model(**batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**batch)
    out.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())
    assert (out.float() - reference).abs().max() < 0.05 * reference.abs().max()


def test_meta_model_materializes_and_initializes(tiny_cfg: DiTConfig) -> None:
    model = DiT.from_config_on_meta(tiny_cfg).to_empty(device="cpu")
    model.init_weights()
    assert not any(p.is_meta for p in model.parameters())
    assert all(p.isfinite().all() for p in model.parameters())
    assert torch.count_nonzero(model(**make_batch(tiny_cfg))) == 0
    assert model.blocks[0].self_attn.qkv.weight.std() > 0  # really initialised, not left empty


def test_mean_per_segment_matches_per_caption_means() -> None:
    tokens = torch.randn(9, 4, dtype=torch.float64)
    pooled = mean_per_segment(tokens, seqlens_to_cu([2, 0, 7]))
    expected = torch.stack(
        [tokens[:2].mean(0), torch.zeros(4, dtype=torch.float64), tokens[2:].mean(0)]
    )
    torch.testing.assert_close(pooled, expected, atol=1e-12, rtol=0)


def test_pooled_text_reaches_output_without_cross_attention(tiny_cfg: DiTConfig) -> None:
    """The pooled path alone carries the caption: cut cross-attention and text still matters."""
    model = perturbed_model(tiny_cfg).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.cross_attn.proj.weight.zero_()
            block.cross_attn.proj.bias.zero_()
    batch = make_batch(tiny_cfg)
    other = dict(batch, text=batch["text"] + 1.0)
    with torch.no_grad():
        assert not torch.allclose(model(**batch), model(**other))
        model.pooled_text_embed = None  # the same model without its pooled path ignores text
        torch.testing.assert_close(model(**batch), model(**other), atol=0, rtol=0)


def test_config_without_pooled_text_loads_old_checkpoints() -> None:
    """dit.json files written before `pooled_text` or `abs_pos_embed` existed build the model
    they were saved from."""
    cfg = DiTConfig(hidden_size=64, depth=2, num_heads=4)
    assert not cfg.pooled_text and DiT(cfg).pooled_text_embed is None
    assert not cfg.abs_pos_embed and DiT(cfg).abs_pos is None


def test_abs_pos_embedding_is_the_sincos_of_each_tokens_grid_position() -> None:
    """Row f*H*W + i*W + j holds [sin, cos](f * w_t), then (i * w_h), then (j * w_w), per sample."""
    embed = SinCosPositionEmbedding3D(16)
    dims = embed.axis_dims
    assert dims == (4, 6, 6) and sum(dims) == 16
    grids = [(3, 2, 4), (1, 3, 2)]
    table = embed(torch.tensor(grids))
    rows = []
    for frames, height, width in grids:
        for f, i, j in itertools.product(range(frames), range(height), range(width)):
            row = []
            for position, dim in zip((f, i, j), dims, strict=True):
                freqs = [10000.0 ** (-k / dim) for k in range(0, dim, 2)]
                row += [math.sin(position * w) for w in freqs] + [
                    math.cos(position * w) for w in freqs
                ]
            rows.append(row)
    torch.testing.assert_close(table, torch.tensor(rows), atol=1e-6, rtol=0)


@pytest.mark.parametrize("abs_pos", [False, True])
def test_only_abs_pos_tells_the_frames_of_a_still_clip_apart(
    tiny_cfg: DiTConfig, abs_pos: bool
) -> None:
    """Every token the same: RoPE alone rotates queries and keys but averages identical values, so
    each frame gets the same output; the absolute embedding gives each frame its own."""
    tiny_cfg.abs_pos_embed = abs_pos
    model = perturbed_model(tiny_cfg).eval()
    grid = (4, 2, 3)
    num_tokens = grid[0] * grid[1] * grid[2]
    with torch.no_grad():
        out = model(
            torch.ones(num_tokens, tiny_cfg.patch_dim),
            seqlens_to_cu([num_tokens]),
            torch.tensor([grid]),
            torch.tensor([0.5]),
            torch.randn(5, tiny_cfg.text_dim),
            seqlens_to_cu([5]),
        )
    frames = out.view(grid[0], -1, tiny_cfg.patch_dim)
    spread = (frames - frames[:1]).abs().max()
    assert spread > 1e-3 if abs_pos else spread < 1e-5
