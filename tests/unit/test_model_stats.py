"""Analytic parameter and FLOP counts agree with the real model and torch's FLOP counter."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from sora_lightning.models.dit import DiT, DiTConfig
from sora_lightning.models.patches import seqlens_to_cu
from sora_lightning.models.stats import count_params, dit_forward_flops, latent_token_grid
from sora_lightning.models.vae import VAEConfig

ROOT = Path(__file__).resolve().parents[2]
TINY = DiTConfig(hidden_size=48, depth=2, num_heads=4, text_dim=32, attn_backend="sdpa")
VARIANTS = {
    "tiny": TINY,
    "plain": replace(TINY, use_conditioning=False, qk_norm=False, in_channels=3),
    "wide_mlp": replace(TINY, mlp_hidden_size=72, patch_size=(2, 1, 1), depth=1),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def load_tool():
    spec = importlib.util.spec_from_file_location("model_stats", ROOT / "tools" / "model_stats.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_count_params_matches_model(name: str) -> None:
    cfg = VARIANTS[name]
    assert count_params(cfg) == sum(p.numel() for p in DiT(cfg).parameters())


def test_count_params_matches_meta_600m() -> None:
    cfg = load_tool().load_preset("600m")
    model = DiT.from_config_on_meta(cfg)
    assert count_params(cfg) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("name", "grids", "text_lens"),
    [
        ("tiny", [(2, 3, 4)], [6]),
        ("tiny", [(1, 4, 4), (3, 2, 5), (2, 2, 2)], [4, 0, 9]),
        ("plain", [(4, 3, 3), (1, 1, 7)], [12, 3]),
        ("wide_mlp", [(2, 5, 3), (6, 1, 1)], [1, 20]),
    ],
)
def test_forward_flops_match_flop_counter(name: str, grids, text_lens) -> None:
    cfg = VARIANTS[name]
    model = DiT(cfg).eval()
    lengths = [f * h * w for f, h, w in grids]
    inputs = {
        "x": torch.randn(sum(lengths), cfg.patch_dim),
        "cu_seqlens": seqlens_to_cu(lengths),
        "grid_sizes": torch.tensor(grids),
        "timesteps": torch.rand(len(grids)),
        "text": torch.randn(sum(text_lens), cfg.text_dim),
        "text_cu_seqlens": seqlens_to_cu(text_lens),
    }
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(**inputs)
    measured = counter.get_total_flops()
    counted_attention = sum(
        v for op, v in counter.get_flop_counts()["Global"].items() if "attention" in str(op)
    )
    assert counted_attention > 0, "the SDPA path must be visible to FlopCounterMode"
    assert dit_forward_flops(cfg, grids, text_lens) == pytest.approx(measured, rel=0.02)


def test_latent_token_grid_follows_vae_and_patch() -> None:
    cfg = DiTConfig(in_channels=16, hidden_size=64, num_heads=4)
    vae = VAEConfig()  # 8x space, 4x time
    assert latent_token_grid(cfg, vae, 33, 256, 192) == (9, 16, 12)
    assert latent_token_grid(cfg, vae, 1, 64, 64) == (1, 4, 4)
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        latent_token_grid(cfg, vae, 32, 256, 256)
    with pytest.raises(ValueError, match="multiple"):
        latent_token_grid(cfg, vae, 33, 264, 256)  # 33 latent rows do not split into 2-row patches


def test_latent_token_grid_takes_the_vaes_own_temporal_factor() -> None:
    """The demo VAE is 2x in time: 17 frames are 9 latent frames there, and 19 frames fit."""
    cfg = DiTConfig(in_channels=4, hidden_size=64, num_heads=4)
    demo = VAEConfig(channel_mults=[1, 2, 2], temporal_downsample=[True, False])
    assert latent_token_grid(cfg, demo, 17, 64, 64) == (9, 8, 8)
    assert latent_token_grid(cfg, demo, 19, 64, 64)[0] == 10
    with pytest.raises(ValueError, match="1 \\+ 2k"):
        latent_token_grid(cfg, demo, 18, 64, 64)


def test_cli_prints_json(capsys: pytest.CaptureFixture[str]) -> None:
    tool = load_tool()
    argv = "--preset 600m --frames 33 --height 256 --width 256 --text-len 120".split()
    stats = tool.main(argv)
    printed = json.loads(capsys.readouterr().out)
    assert printed == stats and printed["tokens"] == 9 * 16 * 16
    cfg = tool.load_preset("600m")
    assert printed["params"] == count_params(cfg) and 0.55e9 < printed["params"] < 0.65e9
    assert printed["flops_forward"] == dit_forward_flops(cfg, [(9, 16, 16)], [120])
    with pytest.raises(SystemExit):
        tool.main(["--preset", "no_such_preset"])
    demo = tool.main(argv[:2] + ["--vae", "demo", "--frames", "17", "--height", "64"])
    assert demo["token_grid"] == [9, 8, 32]  # demo VAE: 2x time, 4x space
    with pytest.raises(SystemExit, match="1 \\+ 2k"):
        tool.main(["--vae", "demo", "--frames", "16"])
