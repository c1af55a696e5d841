"""Wan 2.1's video VAE (diffusers `AutoencoderKLWan`) behind our VAE interface.

Shape legend: B batch, C latent channels (16), T pixel frames, F latent frames, H, W pixel
height/width, h, w latent height/width.

`WanVideoVAE` answers what every caller of `VideoVAE` asks (`config.spatial_factor`,
`config.temporal_factor`, `encode(video).mode()`, `decode(z)`, `encode_chunked`, `decode_chunked`,
`state_dict()`), with the same layouts: pixels [B, 3, T, H, W] in [-1, 1], latents
[B, C, F, h, w]. Two things are Wan's own:
- Latents are normalised per channel with the published `latents_mean`/`latents_std`, as
  `WanPipeline` does before the transformer sees them: `encode` returns the posterior of
  (z - mean) / std and `decode` takes normalised latents, so a Wan DiT reads them unchanged.
- Wan's causal convs only work chunk by chunk: they keep the last frames of each chunk in a
  cache (diffusers' `feat_cache`) and its temporal down/upsamplers treat the first chunk as the
  lone first frame. So frame 0 (latent 0) always goes alone, then chunks follow; without the
  cache the model would not downsample time at all. `encode` and `decode` use diffusers' own
  chunks (4 frames, 1 latent), which gives exactly diffusers' numbers; the loop is ours so each
  chunk is written into one preallocated output (diffusers concatenates as it goes) and the
  cache is local to the call. Working memory is then one chunk plus a two-frame cache per conv,
  flat in clip length (tests/unit/test_wan_vae.py measures it).

Encoding the first 1 + 4k frames gives the first 1 + k latents of the whole clip (the clip-length
rule of `models.vae.is_clip_length`), which `_check_video` enforces with the fix in the message.

diffusers is imported where a model is built, not at module import: it takes about 10 s to import
on two cores, and composing or validating a config needs none of it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from sora_lightning.models.vae import (
    DiagonalGaussian,
    VAEConfig,
    VideoVAE,
    _fill_time,
    blend_tiles,
    reconstruct,
)

if TYPE_CHECKING:
    from diffusers import AutoencoderKLWan

WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
"""Per-channel mean of the published Wan 2.1 VAE's latents (diffusers' `AutoencoderKLWan`
default, the `mean` of Wan's `wan/modules/vae.py`)."""
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip
"""Per-channel standard deviation of the same latents."""

WAN_VAE_KIND = "wan2.1"
"""`kind` of a saved Wan VAE config: how a loader tells it from a `VAEConfig`."""


@dataclass
class WanVAEConfig:
    """Shape of a Wan 2.1 VAE, named as diffusers' `AutoencoderKLWan` names it (conf/model/vae/)."""

    kind: str = WAN_VAE_KIND
    """Always "wan2.1"; saved with the config so `vae_config_from_dict` can dispatch on it."""
    base_dim: int = 96
    """Channels of the first (full-resolution) level."""
    z_dim: int = 16
    """Latent channels."""
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    """Channel multiplier per level; every level but the last halves height and width."""
    num_res_blocks: int = 2
    """Residual blocks per encoder level (the decoder has one more)."""
    attn_scales: tuple[float, ...] = ()
    """Scales with spatial attention in the levels (none in Wan 2.1)."""
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    """Per downsampling level (diffusers' spelling), whether it also halves time."""
    latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
    """Per-channel latent mean subtracted by `encode` (added back by `decode`)."""
    latents_std: tuple[float, ...] = WAN21_LATENTS_STD
    """Per-channel latent standard deviation divided out by `encode`."""

    def __post_init__(self) -> None:
        # Hydra and JSON hand lists; tuples keep the config hashable and comparable.
        self.dim_mult = tuple(int(m) for m in self.dim_mult)
        self.attn_scales = tuple(float(s) for s in self.attn_scales)
        self.temperal_downsample = tuple(bool(t) for t in self.temperal_downsample)
        self.latents_mean = tuple(float(m) for m in self.latents_mean)
        self.latents_std = tuple(float(s) for s in self.latents_std)
        if self.kind != WAN_VAE_KIND:
            raise ValueError(f"WanVAEConfig.kind must be {WAN_VAE_KIND!r}, got {self.kind!r}")
        for name in ("base_dim", "z_dim", "num_res_blocks"):
            if getattr(self, name) < 1:
                raise ValueError(f"WanVAEConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not self.dim_mult or min(self.dim_mult) < 1:
            raise ValueError(f"dim_mult must be positive integers, got {list(self.dim_mult)}")
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"temperal_downsample needs one entry per downsampling level "
                f"(len(dim_mult) - 1 = {len(self.dim_mult) - 1}), got "
                f"{len(self.temperal_downsample)}"
            )
        for name in ("latents_mean", "latents_std"):
            if len(getattr(self, name)) != self.z_dim:
                raise ValueError(
                    f"WanVAEConfig.{name} needs z_dim={self.z_dim} values, "
                    f"got {len(getattr(self, name))}"
                )
        if min(self.latents_std) <= 0:
            raise ValueError("WanVAEConfig.latents_std must be positive")

    in_channels = 3
    """Pixel channels (RGB); Wan 2.1 has no other."""

    @property
    def latent_channels(self) -> int:
        """C, the channels of the latent video the DiT models."""
        return self.z_dim

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent along height and width."""
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_factor(self) -> int:
        """Pixel frames per latent frame after the first one."""
        return 2 ** sum(self.temperal_downsample)

    # The clip-length and shape rules are the causal VAE's, read through the properties above.
    latent_frames = VAEConfig.latent_frames
    pixel_frames = VAEConfig.pixel_frames
    latent_shape = VAEConfig.latent_shape

    def diffusers_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `AutoencoderKLWan` building this VAE."""
        return {
            "base_dim": self.base_dim,
            "z_dim": self.z_dim,
            "dim_mult": list(self.dim_mult),
            "num_res_blocks": self.num_res_blocks,
            "attn_scales": list(self.attn_scales),
            "temperal_downsample": list(self.temperal_downsample),
            "latents_mean": list(self.latents_mean),
            "latents_std": list(self.latents_std),
            "scale_factor_spatial": self.spatial_factor,
            "scale_factor_temporal": self.temporal_factor,
        }

    @classmethod
    def from_diffusers(cls, config: Any) -> WanVAEConfig:
        """The config of an `AutoencoderKLWan` (its `.config`); refuses what Wan 2.1 lacks."""
        unsupported = {
            "is_residual": (config.get("is_residual", False), False),
            "patch_size": (config.get("patch_size"), None),
            "decoder_base_dim": (config.get("decoder_base_dim"), (None, config["base_dim"])),
            "in_channels": (config.get("in_channels", 3), 3),
            "out_channels": (config.get("out_channels", 3), 3),
        }
        for name, (value, allowed) in unsupported.items():
            if value not in (allowed if isinstance(allowed, tuple) else (allowed,)):
                raise ValueError(
                    f"AutoencoderKLWan with {name}={value!r} is not a Wan 2.1 VAE (the Wan 2.2 "
                    f"VAE is not supported); expected {name}={allowed!r}"
                )
        names = ("base_dim", "z_dim", "dim_mult", "num_res_blocks", "attn_scales")
        return cls(
            **{name: config[name] for name in names},
            temperal_downsample=config["temperal_downsample"],
            latents_mean=config["latents_mean"],
            latents_std=config["latents_std"],
        )


class WanVideoVAE(nn.Module):
    """Wan 2.1 VAE: [B, 3, T, H, W] in [-1, 1] <-> normalised latents [B, 16, F, H/8, W/8]."""

    def __init__(self, config: WanVAEConfig, model: AutoencoderKLWan | None = None) -> None:
        super().__init__()
        from diffusers import AutoencoderKLWan
        from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

        self.config = config
        self.model = model if model is not None else AutoencoderKLWan(**config.diffusers_kwargs())
        # Saved with the weights, so the state-dict hash that keys latent caches covers them.
        self.register_buffer("latents_mean", torch.tensor(config.latents_mean).view(-1, 1, 1, 1))
        self.register_buffer("latents_std", torch.tensor(config.latents_std).view(-1, 1, 1, 1))
        self._num_convs = {  # cache slots: one per causal conv of each half
            part: sum(isinstance(m, WanCausalConv3d) for m in getattr(self.model, part).modules())
            for part in ("encoder", "decoder")
        }

    @classmethod
    def from_diffusers(cls, model: AutoencoderKLWan) -> WanVideoVAE:
        """Wrap a built or loaded `AutoencoderKLWan` (its weights are used, not copied)."""
        return cls(WanVAEConfig.from_diffusers(model.config), model)

    def encode(self, video: Tensor) -> DiagonalGaussian:
        """[B, 3, T, H, W] -> posterior over normalised latents [B, C, F, H/s, W/s]."""
        self._check_video(video)
        return self._normalised(self._encode_moments(video, self.config.temporal_factor))

    def decode(self, z: Tensor) -> Tensor:
        """Normalised latents [B, C, F, h, w] -> [B, 3, 1 + tf(F-1), h*s, w*s] in [-1, 1]."""
        self._check_latent(z)
        return self._decode_pixels(z, chunk_latents=1)

    def forward(
        self,
        video: Tensor,
        sample_posterior: bool = True,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, DiagonalGaussian]:
        """Reconstruct a clip; returns (recon [B, 3, T, H, W], posterior), as `VideoVAE` does."""
        return reconstruct(self, video, sample_posterior, generator)

    @torch.no_grad()
    def encode_chunked(
        self,
        video: Tensor,
        chunk_frames: int,
        tile_size: int | None = None,
        tile_overlap: int = 0,
    ) -> DiagonalGaussian:
        """`encode` with chunk_frames frames per chunk after frame 0 (which Wan encodes alone),
        optionally in overlapping spatial tiles of tile_size pixels blended across tile_overlap.

        Chunking is exact up to float rounding; tiling is approximate (the middle block's
        attention sees one tile of each frame only).
        """
        self._check_video(video)
        factor = self.config.temporal_factor
        if chunk_frames < factor or chunk_frames % factor != 0:
            raise ValueError(
                f"chunk_frames={chunk_frames} must be a positive multiple of the temporal "
                f"factor {factor} so chunks end on latent-frame boundaries"
            )
        moments = self._tiled(
            lambda tile: self._encode_moments(tile, chunk_frames),
            video,
            tile_size,
            tile_overlap,
            encoding=True,
        )
        return self._normalised(moments)

    @torch.no_grad()
    def decode_chunked(
        self,
        z: Tensor,
        chunk_latents: int,
        tile_size: int | None = None,
        tile_overlap: int = 0,
    ) -> Tensor:
        """`decode` with chunk_latents latent frames per chunk after latent 0 (decoded alone),
        optionally in spatial tiles (sizes in output pixels, blended approximately)."""
        self._check_latent(z)
        if chunk_latents < 1:
            raise ValueError(f"chunk_latents must be >= 1, got {chunk_latents}")
        return self._tiled(
            lambda tile: self._decode_pixels(tile, chunk_latents),
            z,
            tile_size,
            tile_overlap,
            encoding=False,
        )

    def _encode_moments(self, video: Tensor, chunk_frames: int) -> Tensor:
        """[B, 3, T, H, W] -> raw moments [B, 2C, F, h, w]: frame 0, then chunk_frames at once."""
        video = video.to(self.model.dtype)
        cache: list[Any] = [None] * self._num_convs["encoder"]
        num_frames = video.shape[2]
        starts = [0, *range(1, num_frames, chunk_frames)]
        ends = [*starts[1:], num_frames]
        chunks = (
            self.model.quant_conv(  # B 2C f h w
                self.model.encoder(video[:, :, a:b], feat_cache=cache, feat_idx=[0])
            )
            for a, b in zip(starts, ends, strict=True)
        )
        return _fill_time(chunks, self.config.latent_frames(num_frames))

    def _decode_pixels(self, z: Tensor, chunk_latents: int) -> Tensor:
        """Normalised [B, C, F, h, w] -> pixels [B, 3, T, H, W]: latent 0, then chunk_latents."""
        raw = z.to(self.latents_std) * self.latents_std + self.latents_mean  # B C F h w
        raw = raw.to(self.model.dtype)
        cache: list[Any] = [None] * self._num_convs["decoder"]
        starts = [0, *range(1, raw.shape[2], chunk_latents)]
        ends = [*starts[1:], raw.shape[2]]

        def decode_chunk(a: int, b: int) -> Tensor:
            x = self.model.post_quant_conv(raw[:, :, a:b])  # B C f h w
            x = self.model.decoder(x, feat_cache=cache, feat_idx=[0], first_chunk=a == 0)
            return x.clamp(-1.0, 1.0)  # B 3 t H W, clamped as diffusers' decode does

        chunks = (decode_chunk(a, b) for a, b in zip(starts, ends, strict=True))
        return _fill_time(chunks, self.config.pixel_frames(raw.shape[2]))

    def _normalised(self, moments: Tensor) -> DiagonalGaussian:
        """Posterior of the raw moments, shifted and scaled per channel like WanPipeline's."""
        raw = DiagonalGaussian.from_moments(moments.float())  # B C F h w each
        mean = (raw.mean - self.latents_mean) / self.latents_std
        return DiagonalGaussian(mean, raw.logvar - 2.0 * torch.log(self.latents_std))

    def _tiled(
        self,
        fn: Callable[[Tensor], Tensor],
        x: Tensor,
        tile_size: int | None,
        tile_overlap: int,
        encoding: bool,
    ) -> Tensor:
        """Apply fn to overlapping spatial tiles of x and blend; sizes are in pixels."""
        if tile_size is None:
            return fn(x)
        factor = self.config.spatial_factor
        if tile_size % factor or tile_overlap % factor or not 0 <= tile_overlap < tile_size:
            raise ValueError(
                f"tile_size={tile_size} and tile_overlap={tile_overlap} must be multiples of the "
                f"spatial factor {factor} with 0 <= tile_overlap < tile_size"
            )
        scales = (factor, 1) if encoding else (1, factor)
        return blend_tiles(fn, x, tile_size // factor, tile_overlap // factor, *scales)

    # Input checks are VideoVAE's: they read only `self.config`.
    _check_video = VideoVAE._check_video
    _check_latent = VideoVAE._check_latent


def vae_config_from_dict(values: dict[str, Any]) -> VAEConfig | WanVAEConfig:
    """A saved or composed VAE config (`vae.json`'s "config", a YAML node without `_target_`)
    -> `WanVAEConfig` when its kind says so, else our `VAEConfig`."""
    values = {key: value for key, value in values.items() if key != "_target_"}
    if values.get("kind") == WAN_VAE_KIND:
        return WanVAEConfig(**values)
    return VAEConfig(**values)


def build_vae(config: VAEConfig | WanVAEConfig) -> VideoVAE | WanVideoVAE:
    """The VAE module of a config (random weights; load a state dict next)."""
    return WanVideoVAE(config) if isinstance(config, WanVAEConfig) else VideoVAE(config)


def load_diffusers_wan_vae(directory: str | Path) -> WanVideoVAE:
    """A published diffusers Wan 2.1 VAE from a local folder, float32, in eval mode.

    `directory` is the VAE folder (config.json + diffusion_pytorch_model.safetensors) or a whole
    pipeline folder holding it as `vae/` (e.g. Wan2.1-T2V-1.3B-Diffusers). Nothing downloads.
    """
    from diffusers import AutoencoderKLWan

    path = Path(directory).expanduser()
    if (path / "vae" / "config.json").is_file():
        path = path / "vae"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path} holds no config.json: point at a diffusers Wan VAE folder (or the pipeline "
            "folder holding it as vae/), e.g. Wan2.1-T2V-1.3B-Diffusers"
        )
    # float32 as diffusers' Wan examples load it; cast the module afterwards to run it in bf16.
    model = AutoencoderKLWan.from_pretrained(
        str(path), local_files_only=True, torch_dtype=torch.float32
    )
    return WanVideoVAE.from_diffusers(model).eval()
