"""Causal video VAE: shapes, exact causality, chunked == whole, tiling, validation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

from sora_lightning.config import conf_dir
from sora_lightning.models.vae import (
    DiagonalGaussian,
    FrameConv3d,
    VAEConfig,
    VideoVAE,
    conv3d_via_conv2d,
)

CONF_DIR = conf_dir() / "model" / "vae"


def tiny_config() -> VAEConfig:
    """4x space, 4x time, a few channels: what conf/model/vae/tiny.yaml holds."""
    return VAEConfig(
        latent_channels=4,
        base_channels=8,
        channel_mults=(1, 2, 2),
        temporal_downsample=(True, True),
        norm_groups=4,
    )


@pytest.fixture
def vae() -> VideoVAE:
    torch.set_num_threads(2)
    return VideoVAE(tiny_config()).eval()


def smooth_video(frames: int, size: int, batch: int = 1) -> torch.Tensor:
    """Moving sinusoid patterns in [-1, 1]: image-like content with stationary statistics."""
    axis = torch.linspace(0.0, 1.0, size)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    clips = []
    for sample in range(batch):
        per_frame = [
            torch.stack(
                [
                    torch.sin(40 * xx + t + sample),
                    torch.cos(35 * yy - t),
                    torch.sin(30 * (xx + yy) + 2 * t),
                ]
            )
            for t in range(frames)
        ]
        clips.append(torch.stack(per_frame, dim=1))
    return torch.stack(clips)


@pytest.mark.parametrize("frames", [1, 5, 9])
def test_shapes(vae: VideoVAE, frames: int) -> None:
    video = torch.rand(2, 3, frames, 16, 24) * 2 - 1
    recon, posterior = vae(video)
    latent_frames = 1 + (frames - 1) // 4
    assert posterior.mean.shape == (2, 4, latent_frames, 4, 6)
    assert posterior.sample().shape == posterior.mode().shape == posterior.mean.shape
    assert recon.shape == video.shape
    assert posterior.kl().shape == (2,)
    assert vae.config.latent_shape(frames, 16, 24) == (4, latent_frames, 4, 6)


def test_config_factors_and_latent_frames() -> None:
    config = VAEConfig()
    assert (config.spatial_factor, config.temporal_factor) == (8, 4)
    assert [config.latent_frames(t) for t in (1, 5, 9, 17, 33)] == [1, 2, 3, 5, 9]
    assert config.pixel_frames(3) == 9
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        config.latent_frames(8)


def test_encoding_is_causal(vae: VideoVAE) -> None:
    """Encoding the first 1 + 4k frames gives exactly the first 1 + k latents."""
    video = torch.rand(1, 3, 13, 16, 16) * 2 - 1
    with torch.no_grad():
        whole = vae.encode(video)
        for k in range(3):
            prefix = vae.encode(video[:, :, : 1 + 4 * k])
            torch.testing.assert_close(prefix.mean, whole.mean[:, :, : 1 + k], rtol=0, atol=1e-5)
            torch.testing.assert_close(
                prefix.logvar, whole.logvar[:, :, : 1 + k], rtol=0, atol=1e-5
            )
        changed_future = video.clone()
        changed_future[:, :, 5:] = torch.rand_like(changed_future[:, :, 5:])
        again = vae.encode(changed_future).mean
    torch.testing.assert_close(again[:, :, :2], whole.mean[:, :, :2], rtol=0, atol=1e-5)
    assert (again[:, :, 2:] - whole.mean[:, :, 2:]).abs().max() > 1e-3


def test_decoding_is_causal(vae: VideoVAE) -> None:
    """Decoding a latent prefix gives the prefix of the decoded frames."""
    z = torch.randn(1, 4, 4, 4, 4)
    with torch.no_grad():
        whole = vae.decode(z)
        assert whole.shape == (1, 3, 13, 16, 16)
        for num_latents in (1, 2, 3):
            prefix = vae.decode(z[:, :, :num_latents])
            num_frames = 1 + 4 * (num_latents - 1)
            torch.testing.assert_close(prefix, whole[:, :, :num_frames], rtol=0, atol=1e-5)


def test_gradients_reach_every_parameter(vae: VideoVAE) -> None:
    vae.train()
    video = torch.rand(1, 3, 5, 8, 8) * 2 - 1
    recon, posterior = vae(video)
    loss = (recon - video).abs().mean() + 1e-3 * posterior.kl().mean()
    loss.backward()
    for name, param in vae.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


def test_diagonal_gaussian() -> None:
    mean = torch.zeros(2, 3, 1, 2, 2)
    standard = DiagonalGaussian(mean, torch.zeros_like(mean))
    torch.testing.assert_close(standard.kl(), torch.zeros(2))
    shifted = DiagonalGaussian(mean + 1.0, torch.full_like(mean, 100.0))
    assert shifted.logvar.max() == 20.0  # clamped
    draws = [standard.sample(torch.Generator().manual_seed(1)) for _ in range(2)]
    torch.testing.assert_close(draws[0], draws[1])
    assert not torch.equal(draws[0], standard.mode())
    offset = DiagonalGaussian(mean + 1.0, torch.zeros_like(mean))
    torch.testing.assert_close(offset.kl(), torch.full((2,), 0.5 * 12))


def test_bad_shapes_raise(vae: VideoVAE) -> None:
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        vae.encode(torch.zeros(1, 3, 4, 16, 16))
    with pytest.raises(ValueError, match="height 18 .* multiple of 4"):
        vae.encode(torch.zeros(1, 3, 1, 18, 16))
    with pytest.raises(ValueError, match="width 10"):
        vae.encode(torch.zeros(1, 3, 5, 16, 10))
    with pytest.raises(ValueError, match="expected a video"):
        vae.encode(torch.zeros(3, 5, 16, 16))
    with pytest.raises(ValueError, match="expected latents"):
        vae.decode(torch.zeros(1, 3, 2, 4, 4))


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="temporal_downsample"):
        VAEConfig(channel_mults=(1, 2), temporal_downsample=(True, True))
    with pytest.raises(ValueError, match="norm_groups"):
        VAEConfig(base_channels=12, norm_groups=8, norm="group")
    with pytest.raises(ValueError, match="norm"):
        VAEConfig(norm="batch")


def test_chunked_equals_whole(vae: VideoVAE) -> None:
    video = torch.rand(1, 3, 17, 16, 16) * 2 - 1
    with torch.no_grad():
        whole = vae.encode(video)
        chunked = vae.encode_chunked(video, chunk_frames=4)
        torch.testing.assert_close(chunked.mean, whole.mean, rtol=0, atol=1e-5)
        torch.testing.assert_close(chunked.logvar, whole.logvar, rtol=0, atol=1e-5)
        uneven = vae.encode_chunked(video, chunk_frames=12)  # 13 frames, then 4
        torch.testing.assert_close(uneven.mean, whole.mean, rtol=0, atol=1e-5)
        one_tile = vae.encode_chunked(video, chunk_frames=4, tile_size=16, tile_overlap=8)
        torch.testing.assert_close(one_tile.mean, whole.mean, rtol=0, atol=1e-5)
        decoded = vae.decode(whole.mean)
        for chunk_latents in (1, 2, 5):
            piecewise = vae.decode_chunked(whole.mean, chunk_latents=chunk_latents)
            torch.testing.assert_close(piecewise, decoded, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="chunk_frames"):
        vae.encode_chunked(video, chunk_frames=6)


def test_tiled_close_to_whole(vae: VideoVAE) -> None:
    """Blended tiles stay close to the untiled result and beat tiles that merely abut.

    Tiling is approximate only through zero padding at tile borders (the default per-pixel
    RMSNorm pools nothing over space; GroupNorm would see each tile's statistics only and gives
    ~11% error, which is why it is not the default).
    """
    video = smooth_video(frames=1, size=96)
    with torch.no_grad():
        whole = vae.encode(video).mean
        tiled = vae.encode_chunked(video, 4, tile_size=64, tile_overlap=32).mean
        abutting = vae.encode_chunked(video, 4, tile_size=48, tile_overlap=0).mean
        assert tiled.shape == whole.shape
        error = (tiled - whole).abs().mean() / whole.std()
        assert error < 0.05
        assert error < 0.7 * (abutting - whole).abs().mean() / whole.std()

        decoded = vae.decode(whole)
        tiled_decoded = vae.decode_chunked(whole, 2, tile_size=64, tile_overlap=32)
        assert tiled_decoded.shape == decoded.shape
        assert (tiled_decoded - decoded).abs().mean() / decoded.std() < 0.08
    with pytest.raises(ValueError, match="tile_size"):
        vae.encode_chunked(video, 4, tile_size=30, tile_overlap=8)


@pytest.mark.parametrize("preset", ["tiny", "demo", "default"])
def test_presets_factors(preset: str) -> None:
    config = instantiate(OmegaConf.load(CONF_DIR / f"{preset}.yaml"))
    assert isinstance(config, VAEConfig)
    assert config.temporal_factor == (2 if preset == "demo" else 4)
    assert config.spatial_factor == (8 if preset == "default" else 4)
    if preset == "tiny":
        assert config == tiny_config()
    if preset == "default":
        assert (config.latent_channels, config.base_channels) == (16, 128)
    assert config.latent_frames(9) == (5 if preset == "demo" else 3)


@pytest.mark.parametrize(
    ("kernel", "stride", "padding"),
    [
        ((3, 3, 3), (1, 1, 1), (0, 1, 1)),  # causal 3x3x3
        ((3, 1, 1), (2, 1, 1), (0, 0, 0)),  # temporal downsample
        ((1, 3, 3), (1, 2, 2), (0, 1, 1)),  # spatial downsample
        ((1, 1, 1), (1, 1, 1), (0, 0, 0)),  # channel projection
    ],
)
def test_conv3d_via_conv2d_is_conv3d(kernel, stride, padding) -> None:
    """The CPU single-clip path computes F.conv3d's function, forward and backward (float64)."""
    x = torch.randn(1, 5, 9, 12, 10, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 5, *kernel, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)
    reference = F.conv3d(x, weight, bias, stride, padding)
    ours = conv3d_via_conv2d(x, weight, bias, stride, padding)
    assert ours.shape == reference.shape
    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)
    grads_ref = torch.autograd.grad(reference.square().sum(), [x, weight, bias])
    grads_ours = torch.autograd.grad(ours.square().sum(), [x, weight, bias])
    for ours_grad, ref_grad in zip(grads_ours, grads_ref, strict=True):
        torch.testing.assert_close(ours_grad, ref_grad, rtol=1e-10, atol=1e-9)


def test_frame_conv3d_matches_native_for_one_and_many_clips() -> None:
    """FrameConv3d keeps nn.Conv3d's parameters and function whichever path a batch takes."""
    conv = FrameConv3d(3, 6, (3, 3, 3), padding=(0, 1, 1)).double()
    assert set(conv.state_dict()) == {"weight", "bias"}
    for batch in (1, 2):
        x = torch.randn(batch, 3, 7, 8, 8, dtype=torch.float64)
        torch.testing.assert_close(conv(x), torch.nn.Conv3d.forward(conv, x))
    with pytest.raises(ValueError, match="temporal padding 0"):
        conv3d_via_conv2d(x, conv.weight, conv.bias, (1, 1, 1), (1, 1, 1))


def test_salience_weights_pixels_unlike_their_frame_and_zero_is_the_plain_loss() -> None:
    """A small object on a plain background weighs 1 + strength times a background pixel (mean
    weight 1); strength 0 gives the unweighted L1 + MSE."""
    from sora_lightning.train.vae_module import salience, vae_loss

    target = torch.full((1, 3, 2, 32, 32), -0.8)
    target[:, 0, :, 4:6, 4:6] = 0.8  # a small red square on a dark frame
    weight = salience(target, 4.0)
    assert weight.shape == (1, 1, 2, 32, 32) and weight.mean().item() == pytest.approx(1.0)
    assert weight[0, 0, 0, 5, 5] / weight[0, 0, 0, 20, 20] == pytest.approx(5.0, rel=0.1)
    recon = target + 0.1 * torch.randn_like(target)
    kl = torch.zeros(1)
    plain = vae_loss(recon, target, kl, 1, l1_weight=1.0, mse_weight=1.0, kl_weight=0.0)
    assert plain["l1"] == pytest.approx((recon - target).abs().mean().item())
    weighted = vae_loss(
        recon, target, kl, 1, l1_weight=1.0, mse_weight=1.0, kl_weight=0.0, salience_weight=4.0
    )
    assert weighted["l1"] == pytest.approx((weight * (recon - target).abs()).mean().item())
