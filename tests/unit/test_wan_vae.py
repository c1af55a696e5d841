"""The Wan 2.1 VAE behind our VAE interface computes what diffusers' AutoencoderKLWan computes.

Tiny random-weight model (tests/wan_fixtures.py), float32. Parity is exact here because the
wrapper runs diffusers' own encoder/decoder on the same chunks; only the chunk loop and the
latent normalisation (WanPipeline's) are ours.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.profiler import ProfilerActivity, profile
from wan_fixtures import tiny_wan_vae

from sora_lightning.config import conf_dir
from sora_lightning.models.vae import VAEConfig, VideoVAE
from sora_lightning.models.wan_vae import (
    WanVAEConfig,
    WanVideoVAE,
    build_vae,
    load_diffusers_wan_vae,
    vae_config_from_dict,
)

PRESET = conf_dir() / "model" / "vae" / "wan2_1.yaml"
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convs: thread hand-offs cost more


@pytest.fixture(scope="module")
def reference():
    """diffusers' tiny AutoencoderKLWan and our wrapper around the very same module."""
    model = tiny_wan_vae()
    return model, WanVideoVAE.from_diffusers(model).eval()


def _stats(model) -> tuple[torch.Tensor, torch.Tensor]:
    """WanPipeline's per-channel latent mean and std, shaped [1, C, 1, 1, 1]."""
    mean = torch.tensor(model.config.latents_mean).view(1, -1, 1, 1, 1)
    return mean, torch.tensor(model.config.latents_std).view(1, -1, 1, 1, 1)


def test_preset_is_the_published_wan21_vae() -> None:
    """conf/model/vae/wan2_1.yaml == the dataclass defaults == AutoencoderKLWan's defaults."""
    from diffusers import AutoencoderKLWan

    config = instantiate(OmegaConf.load(PRESET), _convert_="all")
    assert config == WanVAEConfig()
    assert (config.spatial_factor, config.temporal_factor, config.latent_channels) == (8, 4, 16)
    defaults = inspect.signature(AutoencoderKLWan.__init__).parameters
    for name, value in config.diffusers_kwargs().items():
        value = tuple(value) if isinstance(value, list) else value
        default = defaults[name].default
        assert value == (tuple(default) if isinstance(default, list) else default), name
    assert config.latent_shape(81, 480, 832) == (16, 21, 60, 104)


def test_config_round_trips_and_dispatches() -> None:
    """A saved config (JSON lists) comes back equal, and `kind` picks the VAE class."""
    config = WanVAEConfig(base_dim=3, dim_mult=(1, 1, 1, 1), num_res_blocks=1)
    saved = json.loads(json.dumps(dataclasses.asdict(config)))
    assert saved["kind"] == "wan2.1" and WanVAEConfig(**saved) == config
    assert vae_config_from_dict({**saved, "_target_": "x"}) == config
    ours = dataclasses.asdict(VAEConfig())
    assert vae_config_from_dict(ours) == VAEConfig()
    assert isinstance(
        build_vae(VAEConfig(channel_mults=(1, 2), temporal_downsample=(True,))), VideoVAE
    )
    with pytest.raises(ValueError, match="temperal_downsample needs one entry"):
        WanVAEConfig(temperal_downsample=(True,))
    with pytest.raises(ValueError, match="latents_std needs z_dim=4"):
        WanVAEConfig(z_dim=4, latents_mean=(0.0,) * 4)


def test_encode_decode_match_diffusers(reference) -> None:
    """encode = WanPipeline's (mode - mean) / std; decode(z) = vae.decode(z * std + mean)."""
    model, vae = reference
    video = torch.rand(2, 3, 9, 32, 48) * 2 - 1
    mean, std = _stats(model)
    with torch.no_grad():
        posterior = model.encode(video).latent_dist
        expected = (posterior.mode() - mean) / std
        ours = vae.encode(video)
        assert ours.mode().shape == (2, 16, 3, 4, 6)
        assert (ours.mode() - expected).abs().max() <= 1e-6
        assert (ours.std - posterior.std / std).abs().max() <= 1e-6
        decoded = model.decode(expected * std + mean).sample
        assert (vae.decode(expected) - decoded).abs().max() <= 1e-6
        recon, _ = vae(video, sample_posterior=False)
        assert recon.shape == video.shape and (recon - decoded).abs().max() <= 1e-6


def test_chunked_equals_whole_and_tiles_blend(reference) -> None:
    _, vae = reference
    video = torch.rand(1, 3, 13, 48, 48) * 2 - 1
    with torch.no_grad():
        latents = vae.encode(video).mode()  # 1 16 4 6 6
        decoded = vae.decode(latents)
        assert (vae.encode_chunked(video, 8).mode() - latents).abs().max() <= 1e-5
        assert (vae.decode_chunked(latents, 2) - decoded).abs().max() <= 1e-5
        tiled = vae.encode_chunked(video, 4, tile_size=32, tile_overlap=16).mode()
        tiled_decoded = vae.decode_chunked(latents, 1, tile_size=32, tile_overlap=16)
    assert tiled.shape == latents.shape and tiled_decoded.shape == decoded.shape
    assert (tiled - latents).abs().mean() / latents.std() < 0.15  # attention sees one tile
    assert (tiled_decoded - decoded).abs().mean() / decoded.std() < 0.3
    with pytest.raises(ValueError, match="multiple of the temporal factor 4"):
        vae.encode_chunked(video, 6)
    with pytest.raises(ValueError, match="tile_size"):
        vae.decode_chunked(latents, 1, tile_size=20)


def test_clip_length_rule_and_causality(reference) -> None:
    """1 + 4k frames only, with the fix in the message; a prefix encodes to a prefix."""
    _, vae = reference
    video = torch.rand(1, 3, 9, 16, 16) * 2 - 1
    with pytest.raises(ValueError, match=r"T = 1 \+ 4k \(1, 5, 9, 13, 17, ...\)"):
        vae.encode(video[:, :, :8])
    with pytest.raises(ValueError, match="multiple of the VAE's spatial factor 8"):
        vae.encode(video[..., :12])
    with pytest.raises(ValueError, match=r"expected latents \[B, 16, F, h, w\]"):
        vae.decode(torch.zeros(1, 4, 2, 2, 2))
    with torch.no_grad():
        whole = vae.encode(video).mode()
        assert (vae.encode(video[:, :, :5]).mode() - whole[:, :, :2]).abs().max() <= 1e-6
        assert vae.decode(whole[:, :, :1]).shape[2] == 1  # an image is a one-frame clip


def _peak_tensor_bytes(fn) -> int:
    """Peak of live bytes in torch's CPU allocator while fn runs (profiler's per-op records)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def test_memory_flat_in_clip_length(reference) -> None:
    """Working memory (peak minus the output, which must grow) is the same for 9 and 33 frames.

    Measured from the profiler's allocation records, so allocator caching and the OS cannot blur
    it. (diffusers' own loop is flat too, but holds the output twice while it concatenates the
    last chunk: at 32x32 and 33 frames it peaks 0.17 MiB above this loop.)
    """
    _, vae = reference
    working = {}
    for frames in (9, 33):
        video = torch.rand(1, 3, frames, 32, 32) * 2 - 1
        latents = torch.randn(1, 16, 1 + (frames - 1) // 4, 4, 4)
        with torch.no_grad():
            enc = _peak_tensor_bytes(lambda v=video: vae.encode(v).mode())
            dec = _peak_tensor_bytes(lambda z=latents: vae.decode(z))
        working[frames] = (enc - latents.numel() * 8, dec - video.numel() * 4)  # mean + logvar
    for short, long in zip(working[9], working[33], strict=True):
        assert long <= short * 1.05 + 16 * 1024, working


def test_saved_and_published_folders_load(reference, tmp_path: Path) -> None:
    """Our format (state dict + config JSON with `kind`) and a diffusers folder load the same VAE."""
    from sora_lightning.train.weights import config_to_dict

    model, vae = reference
    state = vae.state_dict()
    assert {"latents_mean", "latents_std"} <= set(state)  # in the hash that keys latent caches
    rebuilt = build_vae(vae_config_from_dict(json.loads(json.dumps(config_to_dict(vae.config)))))
    rebuilt.load_state_dict(state)
    model.save_pretrained(tmp_path / "Wan-tiny" / "vae")
    published = load_diffusers_wan_vae(tmp_path / "Wan-tiny")  # the pipeline folder
    video = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    with torch.no_grad():
        expected = vae.encode(video).mode()
        for other in (rebuilt.eval(), published):
            assert isinstance(other, WanVideoVAE) and other.config == vae.config
            assert (other.encode(video).mode() - expected).abs().max() <= 1e-6
    with pytest.raises(FileNotFoundError, match="holds no config.json"):
        load_diffusers_wan_vae(tmp_path)


def test_wan22_vae_is_refused(reference) -> None:
    model, _ = reference
    for change in ({"is_residual": True}, {"patch_size": 2}, {"decoder_base_dim": 8}):
        with pytest.raises(ValueError, match="not a Wan 2.1 VAE"):
            WanVAEConfig.from_diffusers({**model.config, **change})
