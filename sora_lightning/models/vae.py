"""Causal 3D convolutional video VAE: an image is a 1-frame video.

Shape legend: B batch, C channels, T pixel frames, F latent frames, H, W pixel height/width,
h, w latent height/width.

Why causal: every op sees only the current and past frames (time padding replicates the first
frame, norms work per frame), so frame 0 is encoded alone like an image and encoding the first
1 + k * temporal_factor frames gives exactly the first 1 + k latents of the whole clip (the
clip-length rule, `is_clip_length`). Images and videos then share one latent space, and a long
clip can be processed chunk by chunk with a small cache of past frames (`encode_chunked` /
`decode_chunked`) at flat memory. Large frames can also be tiled in space with blended overlaps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Past input frames of each causal op, carried from one chunk to the next.
CausalCache = dict[nn.Module, Tensor]


def is_clip_length(num_frames: int, temporal_factor: int) -> bool:
    """Whether a causal VAE of this temporal factor encodes T frames: T = 1 + k * factor, k >= 0.

    The one place of the clip-length rule: frame 0 is encoded alone (an image is a 1-frame clip),
    then every `temporal_factor` frames become one latent frame. Take the factor from the VAE's
    config (`VAEConfig.temporal_factor`), never a literal: the demo VAE is 2x in time, others 4x.
    """
    return num_frames >= 1 and (num_frames - 1) % temporal_factor == 0


def longest_clip_length(num_frames: int, temporal_factor: int) -> int:
    """The longest clip length (`is_clip_length`) of at most `num_frames` (>= 1) frames."""
    if num_frames < 1:
        raise ValueError(f"need at least 1 frame, got {num_frames}")
    return 1 + (num_frames - 1) // temporal_factor * temporal_factor


def clip_lengths_hint(temporal_factor: int) -> str:
    """The rule as error messages show it, e.g. `1 + 4k (1, 5, 9, 13, 17, ...)` for a factor 4."""
    examples = ", ".join(str(1 + temporal_factor * k) for k in range(5))
    return f"1 + {temporal_factor}k ({examples}, ...)"


@dataclass
class VAEConfig:
    """Shape of the causal video VAE; the presets live in conf/model/vae/."""

    in_channels: int = 3
    """Pixel channels (RGB)."""
    latent_channels: int = 4
    """Channels of the latent video the DiT models."""
    base_channels: int = 32
    """Channels of the first (full-resolution) level; level i has base * channel_mults[i]."""
    channel_mults: tuple[int, ...] = (1, 2, 4, 4)
    """Channel multiplier per level; every level but the last halves height and width."""
    temporal_downsample: tuple[bool, ...] = (True, True, False)
    """Per downsampling level, whether it also halves time (causally, frame 0 kept alone)."""
    num_res_blocks: int = 1
    """Residual blocks per level in the encoder and in the decoder."""
    norm_groups: int = 8
    """GroupNorm groups (norm="group" only); must divide every level's channel count."""
    norm: str = "rms"
    """"rms": RMSNorm over channels at each pixel (Wan's choice: no spatial pooling, so colour
    levels survive on flat synthetic frames and spatial tiles compute exactly what the whole frame
    does); "group": GroupNorm over each frame's (C, H, W)."""

    def __post_init__(self) -> None:
        # Hydra hands lists (ListConfig); tuples keep the config hashable and comparable.
        self.channel_mults = tuple(int(m) for m in self.channel_mults)
        self.temporal_downsample = tuple(bool(t) for t in self.temporal_downsample)
        for name in ("in_channels", "latent_channels", "base_channels", "norm_groups"):
            if getattr(self, name) <= 0:
                raise ValueError(f"VAEConfig.{name} must be positive, got {getattr(self, name)}")
        if self.num_res_blocks < 1:
            raise ValueError(f"VAEConfig.num_res_blocks must be >= 1, got {self.num_res_blocks}")
        if not self.channel_mults or min(self.channel_mults) <= 0:
            raise ValueError(f"channel_mults must be positive integers, got {self.channel_mults}")
        if self.norm not in ("rms", "group"):
            raise ValueError(f"VAEConfig.norm must be 'rms' or 'group', got {self.norm!r}")
        if len(self.temporal_downsample) != len(self.channel_mults) - 1:
            raise ValueError(
                f"temporal_downsample needs one entry per downsampling level "
                f"(len(channel_mults) - 1 = {len(self.channel_mults) - 1}), "
                f"got {len(self.temporal_downsample)}"
            )
        for mult in self.channel_mults:
            if self.norm == "group" and (self.base_channels * mult) % self.norm_groups != 0:
                raise ValueError(
                    f"norm_groups={self.norm_groups} does not divide level channels "
                    f"{self.base_channels * mult}; pick a divisor of base_channels"
                )

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent along height and width."""
        return 2 ** (len(self.channel_mults) - 1)

    @property
    def temporal_factor(self) -> int:
        """Pixel frames per latent frame after the first one."""
        return 2 ** sum(self.temporal_downsample)

    def latent_frames(self, num_frames: int) -> int:
        """F for T pixel frames: frame 0 alone, then one latent per temporal_factor frames."""
        factor = self.temporal_factor
        if not is_clip_length(num_frames, factor):
            raise ValueError(
                f"{num_frames} frames cannot be encoded: the causal VAE needs T = "
                f"{clip_lengths_hint(factor)} frames; trim or pad the clip to such a length"
            )
        return 1 + (num_frames - 1) // factor

    def pixel_frames(self, num_latent_frames: int) -> int:
        """T decoded from F latent frames (inverse of `latent_frames`)."""
        if num_latent_frames < 1:
            raise ValueError(f"need at least one latent frame, got {num_latent_frames}")
        return 1 + (num_latent_frames - 1) * self.temporal_factor

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(C, F, h, w) of the latent of a [3, T, H, W] video; validates T, H and W."""
        for name, size in (("height", height), ("width", width)):
            if size <= 0 or size % self.spatial_factor != 0:
                raise ValueError(
                    f"frame {name} {size} is not a positive multiple of the VAE's spatial factor "
                    f"{self.spatial_factor}; resize or crop to a multiple of {self.spatial_factor}"
                )
        latent = (self.latent_frames(num_frames), height // self.spatial_factor)
        return self.latent_channels, latent[0], latent[1], width // self.spatial_factor


def conv3d_via_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: tuple[int, int, int],
    padding: tuple[int, int, int],
) -> Tensor:
    """`F.conv3d` computed as one `F.conv2d` over the kernel's temporal taps stacked as channels.

    Why: for one clip PyTorch's CPU conv3d is im2col `slow_conv3d` (~7-13 GFLOP/s on 2 cores)
    where conv2d's oneDNN path reaches ~40-48 on the same FLOPs: the demo VAE encodes a 17-frame
    64x48 clip 3.5x faster this way. Same function (summation order aside): output frame t of a kernel with kt
    taps reads input frames t*st .. t*st + kt - 1, which become kt channel blocks of one 2D conv.
    Temporal padding must be 0 (CausalConv3d pads the past itself).
    """
    if padding[0] != 0:
        raise ValueError("conv3d_via_conv2d needs temporal padding 0; pad the time axis first")
    batch, channels, frames, height, width = x.shape
    out_channels, _, kt, kh, kw = weight.shape
    st = stride[0]
    num_out = (frames - kt) // st + 1
    if kt == 1 and st == 1:
        taps = x.transpose(1, 2).reshape(batch * frames, channels, height, width)
    else:
        span = st * (num_out - 1) + 1
        taps = torch.stack([x[:, :, k : k + span : st] for k in range(kt)], dim=2)  # B C kt F H W
        taps = taps.permute(0, 3, 1, 2, 4, 5).reshape(batch * num_out, channels * kt, height, width)
    out = F.conv2d(
        taps, weight.reshape(out_channels, -1, kh, kw), bias, stride[1:], padding[1:]
    )  # (B F) C' H' W'
    return out.reshape(batch, num_out, out_channels, *out.shape[-2:]).transpose(1, 2)


class FrameConv3d(nn.Conv3d):
    """An `nn.Conv3d` (same parameters, same state-dict keys) that avoids CPU's slow conv3d.

    PyTorch runs a CPU conv3d through oneDNN only for batches > 1; a single clip (encoding a
    cache, decoding a sample) falls back to im2col `slow_conv3d`, 3-4x slower. There the same
    function is computed by `conv3d_via_conv2d`, whose batch is frames. Batched training and
    CUDA keep the native kernel (measured faster). Only zero temporal padding (causal convs pad
    the past themselves).
    """

    def forward(self, x: Tensor) -> Tensor:
        """[B, C, T, H, W] -> [B, C', T', H', W'], exactly `nn.Conv3d.forward`'s function."""
        native = x.is_cuda or x.shape[0] > 1 or self.padding[0] != 0
        if native or self.groups != 1 or self.dilation != (1, 1, 1) or self.padding_mode != "zeros":
            return super().forward(x)
        return conv3d_via_conv2d(x, self.weight, self.bias, self.stride, self.padding)


class CausalConv3d(nn.Module):
    """3D conv whose output frame t sees only input frames <= t (past padded by frame 0).

    With a cache, the padded input's unused tail is kept so the next chunk continues exactly
    where this one stopped, whatever the temporal stride.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, int, int] = (3, 3, 3),
        time_stride: int = 1,
    ) -> None:
        super().__init__()
        kt, kh, kw = kernel_size
        self.time_kernel, self.time_stride = kt, time_stride
        self.conv = FrameConv3d(
            in_channels, out_channels, kernel_size, (time_stride, 1, 1), (0, kh // 2, kw // 2)
        )

    def forward(self, x: Tensor, cache: CausalCache | None = None) -> Tensor:
        """[B, C, T, H, W] -> [B, C', T', H, W]; T' = T (stride 1) or 1 + (T-1)/2 (stride 2)."""
        past = cache.get(self) if cache is not None else None
        if past is None:  # start of the clip: replicate frame 0 into the past
            past = x[:, :, :1].expand(-1, -1, self.time_kernel - 1, -1, -1)
        x = torch.cat([past, x], dim=2)
        num_out = max(0, (x.shape[2] - self.time_kernel) // self.time_stride + 1)
        if cache is not None:
            cache[self] = x[
                :, :, num_out * self.time_stride :
            ].clone()  # not a view: frees the chunk
        if num_out == 0:
            raise ValueError("chunk too short for this causal conv; use longer chunks")
        return self.conv(x)


class FrameGroupNorm(nn.GroupNorm):
    """GroupNorm over (C, H, W) of each frame alone: pooling over time would leak the future."""

    def forward(self, x: Tensor) -> Tensor:
        """[B, C, T, H, W] -> same shape, statistics per (sample, frame, group)."""
        b, c, t, h, w = x.shape
        frames = x.transpose(1, 2).reshape(b * t, c, h, w)
        frames = super().forward(frames)
        return frames.reshape(b, t, c, h, w).transpose(1, 2)


class ChannelRMSNorm(nn.Module):
    """RMSNorm over channels at every (frame, pixel): touches neither time nor space."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels, 1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        """[B, C, T, H, W] -> same shape."""
        scale = torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + self.eps)
        return x * scale * self.weight


def make_norm(norm: str, norm_groups: int, channels: int) -> nn.Module:
    """The configured per-frame normalisation for `channels` channels."""
    return ChannelRMSNorm(channels) if norm == "rms" else FrameGroupNorm(norm_groups, channels)


class ResBlock3D(nn.Module):
    """Pre-norm residual block of two causal 3x3x3 convs."""

    def __init__(
        self, in_channels: int, out_channels: int, norm_groups: int, norm: str = "rms"
    ) -> None:
        super().__init__()
        self.norm1 = make_norm(norm, norm_groups, in_channels)
        self.conv1 = CausalConv3d(in_channels, out_channels)
        self.norm2 = make_norm(norm, norm_groups, out_channels)
        self.conv2 = CausalConv3d(out_channels, out_channels)
        self.skip = (
            FrameConv3d(in_channels, out_channels, 1)
            if in_channels != out_channels
            else nn.Identity()
        )

    def forward(self, x: Tensor, cache: CausalCache | None = None) -> Tensor:
        """[B, Cin, T, H, W] -> [B, Cout, T, H, W]."""
        h = self.conv1(F.silu(self.norm1(x)), cache)
        h = self.conv2(F.silu(self.norm2(h)), cache)
        return self.skip(x) + h


class Downsample(nn.Module):
    """Halve H and W per frame (stride-2 conv); optionally halve time causally.

    The temporal conv (kernel 3, stride 2, past padded by frame 0) maps frame 0 alone to output
    0 and frames (2j-2, 2j-1, 2j) to output j, so no output sees a later frame.
    """

    def __init__(self, channels: int, temporal: bool) -> None:
        super().__init__()
        self.spatial = FrameConv3d(channels, channels, (1, 3, 3), (1, 2, 2), (0, 1, 1))
        self.temporal = (
            CausalConv3d(channels, channels, (3, 1, 1), time_stride=2) if temporal else None
        )

    def forward(self, x: Tensor, cache: CausalCache | None = None) -> Tensor:
        """[B, C, T, H, W] -> [B, C, T or 1 + (T-1)/2, H/2, W/2]."""
        x = self.spatial(x)
        if self.temporal is not None:
            x = self.temporal(x, cache)
        return x


class Upsample(nn.Module):
    """Mirror of Downsample: frame 0 stays alone, others repeat x2 in time, then 2x in space."""

    def __init__(self, channels: int, temporal: bool) -> None:
        super().__init__()
        self.temporal = CausalConv3d(channels, channels, (3, 1, 1)) if temporal else None
        self.spatial = FrameConv3d(channels, channels, (1, 3, 3), padding=(0, 1, 1))

    def forward(self, x: Tensor, cache: CausalCache | None = None) -> Tensor:
        """[B, C, F, h, w] -> [B, C, F or 1 + 2(F-1), 2h, 2w]."""
        if self.temporal is not None:
            x = self.temporal(self._repeat_frames(x, cache), cache)
        x = F.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest")
        return self.spatial(x)

    def _repeat_frames(self, x: Tensor, cache: CausalCache | None) -> Tensor:
        """Repeat every frame twice except the clip's very first one."""
        first_chunk = cache is None or self not in cache
        if cache is not None:
            cache[self] = x.new_empty(0)  # marks that frame 0 has been emitted
        doubled = x.repeat_interleave(2, dim=2)
        return doubled[:, :, 1:] if first_chunk else doubled


class Encoder(nn.Module):
    """Pixels [B, 3, T, H, W] -> moments [B, 2C, F, h, w] (mean and log-variance)."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        channels = [config.base_channels * m for m in config.channel_mults]
        self.conv_in = CausalConv3d(config.in_channels, channels[0])
        blocks: list[nn.Module] = []
        current = channels[0]
        for level, width in enumerate(channels):
            for _ in range(config.num_res_blocks):
                blocks.append(ResBlock3D(current, width, config.norm_groups, config.norm))
                current = width
            if level < len(channels) - 1:
                blocks.append(Downsample(current, config.temporal_downsample[level]))
        blocks.append(ResBlock3D(current, current, config.norm_groups, config.norm))
        self.blocks = nn.ModuleList(blocks)
        self.norm_out = make_norm(config.norm, config.norm_groups, current)
        self.conv_out = CausalConv3d(current, 2 * config.latent_channels)

    def forward(self, video: Tensor, cache: CausalCache | None = None) -> Tensor:
        """[B, 3, T, H, W] -> [B, 2C, F, h, w]."""
        x = self.conv_in(video, cache)  # B C0 T H W
        for block in self.blocks:
            x = block(x, cache)  # down to B Cn F h w
        return self.conv_out(F.silu(self.norm_out(x)), cache)  # B 2C F h w


class Decoder(nn.Module):
    """Latents [B, C, F, h, w] -> pixels [B, 3, T, H, W]."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        channels = [config.base_channels * m for m in config.channel_mults]
        current = channels[-1]
        self.conv_in = CausalConv3d(config.latent_channels, current)
        blocks: list[nn.Module] = [ResBlock3D(current, current, config.norm_groups, config.norm)]
        for level in reversed(range(len(channels))):
            for _ in range(config.num_res_blocks):
                blocks.append(ResBlock3D(current, channels[level], config.norm_groups, config.norm))
                current = channels[level]
            if level > 0:
                blocks.append(Upsample(current, config.temporal_downsample[level - 1]))
        self.blocks = nn.ModuleList(blocks)
        self.norm_out = make_norm(config.norm, config.norm_groups, current)
        self.conv_out = CausalConv3d(current, config.in_channels)

    def forward(self, z: Tensor, cache: CausalCache | None = None) -> Tensor:
        """[B, C, F, h, w] -> [B, 3, T, H, W]."""
        x = self.conv_in(z, cache)  # B Cn F h w
        for block in self.blocks:
            x = block(x, cache)  # up to B C0 T H W
        return self.conv_out(F.silu(self.norm_out(x)), cache)  # B 3 T H W


class DiagonalGaussian:
    """Posterior N(mean, exp(logvar)) over latents [B, C, F, h, w]."""

    def __init__(self, mean: Tensor, logvar: Tensor) -> None:
        self.mean = mean
        # Clamped so exp() neither overflows nor collapses the std to zero early in training.
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    @classmethod
    def from_moments(cls, moments: Tensor) -> DiagonalGaussian:
        """Split encoder output [B, 2C, F, h, w] into mean and log-variance."""
        mean, logvar = moments.chunk(2, dim=1)
        return cls(mean, logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """A reparameterised draw (gradients flow to mean and logvar)."""
        noise = torch.randn(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + self.std * noise

    def mode(self) -> Tensor:
        """The most likely latent: deterministic encodings for caching and evaluation."""
        return self.mean

    def kl(self) -> Tensor:
        """KL(q || N(0, I)) per sample [B], summed over C, F, h, w; averaging is the caller's."""
        per_element = self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar
        return 0.5 * per_element.flatten(1).sum(dim=1)


def reconstruct(
    vae: nn.Module, video: Tensor, sample_posterior: bool, generator: torch.Generator | None
) -> tuple[Tensor, DiagonalGaussian]:
    """Encode, take a posterior sample (or its mode), decode: every VAE's `forward`, one place.
    Returns (recon [B, 3, T, H, W], posterior)."""
    posterior = vae.encode(video)  # B C F h w
    z = posterior.sample(generator) if sample_posterior else posterior.mode()
    return vae.decode(z), posterior  # B 3 T H W


class VideoVAE(nn.Module):
    """Causal video VAE: encode [B, 3, T, H, W] in [-1, 1] to a posterior, decode latents back."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    def encode(self, video: Tensor) -> DiagonalGaussian:
        """[B, 3, T, H, W] -> posterior over [B, C, F, H/s, W/s]."""
        self._check_video(video)
        return DiagonalGaussian.from_moments(self.encoder(video))

    def decode(self, z: Tensor) -> Tensor:
        """[B, C, F, h, w] -> [B, 3, 1 + tf(F-1), h*s, w*s]."""
        self._check_latent(z)
        return self.decoder(z)

    def forward(
        self,
        video: Tensor,
        sample_posterior: bool = True,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, DiagonalGaussian]:
        """Reconstruct a clip; returns (recon [B, 3, T, H, W], posterior) for the VAE losses."""
        return reconstruct(self, video, sample_posterior, generator)

    @torch.no_grad()
    def encode_chunked(
        self,
        video: Tensor,
        chunk_frames: int,
        tile_size: int | None = None,
        tile_overlap: int = 0,
    ) -> DiagonalGaussian:
        """Encode a long or large clip at bounded memory (inference only, no gradients).

        Frames go through in chunks (the first chunk is 1 + chunk_frames frames, then
        chunk_frames each) with each causal op's past carried over, so the result equals
        `encode` up to float rounding. With tile_size (pixels) the frames are also cut into
        overlapping spatial tiles whose latents are blended linearly across tile_overlap
        pixels; tiling is approximate because the per-frame norms see one tile only.
        """
        self._check_video(video)
        factor = self.config.temporal_factor
        if chunk_frames < factor or chunk_frames % factor != 0:
            raise ValueError(
                f"chunk_frames={chunk_frames} must be a positive multiple of the temporal "
                f"factor {factor} so chunks end on latent-frame boundaries"
            )

        def encode_tile(tile: Tensor) -> Tensor:
            starts = [0, *range(1 + chunk_frames, tile.shape[2], chunk_frames)]
            ends = [*starts[1:], tile.shape[2]]
            cache: CausalCache = {}
            chunks = (
                self.encoder(tile[:, :, a:b], cache) for a, b in zip(starts, ends, strict=True)
            )
            return _fill_time(chunks, 1 + (tile.shape[2] - 1) // factor)

        moments = self._tiled(encode_tile, video, tile_size, tile_overlap, encoding=True)
        return DiagonalGaussian.from_moments(moments)

    @torch.no_grad()
    def decode_chunked(
        self,
        z: Tensor,
        chunk_latents: int,
        tile_size: int | None = None,
        tile_overlap: int = 0,
    ) -> Tensor:
        """Decode chunk_latents latent frames at a time (and optionally in spatial tiles).

        Chunking is exact (equals `decode` up to float rounding); tile_size and tile_overlap
        are in output pixels and blend overlapping tiles linearly, approximately.
        """
        self._check_latent(z)
        if chunk_latents < 1:
            raise ValueError(f"chunk_latents must be >= 1, got {chunk_latents}")

        def decode_tile(tile: Tensor) -> Tensor:
            cache: CausalCache = {}
            chunks = (
                self.decoder(tile[:, :, start : start + chunk_latents], cache)
                for start in range(0, tile.shape[2], chunk_latents)
            )
            return _fill_time(chunks, self.config.pixel_frames(tile.shape[2]))

        return self._tiled(decode_tile, z, tile_size, tile_overlap, encoding=False)

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
        in_scale, out_scale = (factor, 1) if encoding else (1, factor)
        return blend_tiles(
            fn,
            x,
            tile_size // factor,
            tile_overlap // factor,
            in_scale=in_scale,
            out_scale=out_scale,
        )

    def _check_video(self, video: Tensor) -> None:
        """Fail early with the fix, instead of deep inside a conv."""
        if video.ndim != 5 or video.shape[1] != self.config.in_channels:
            raise ValueError(
                f"expected a video [B, {self.config.in_channels}, T, H, W], got {tuple(video.shape)}"
            )
        self.config.latent_shape(video.shape[2], video.shape[3], video.shape[4])

    def _check_latent(self, z: Tensor) -> None:
        """Latents must be [B, C, F, h, w] with this VAE's latent channels."""
        if z.ndim != 5 or z.shape[1] != self.config.latent_channels or z.shape[2] < 1:
            raise ValueError(
                f"expected latents [B, {self.config.latent_channels}, F, h, w], got {tuple(z.shape)}"
            )


def _fill_time(chunks: Iterable[Tensor], num_frames: int) -> Tensor:
    """Write consecutive time chunks into one preallocated tensor, so a long clip's output is
    held once instead of as a list of parts plus their concatenation."""
    out: Tensor | None = None
    position = 0
    for chunk in chunks:
        if out is None:
            out = chunk.new_empty((*chunk.shape[:2], num_frames, *chunk.shape[3:]))
        out[:, :, position : position + chunk.shape[2]] = chunk
        position += chunk.shape[2]
        del chunk
    assert out is not None and position == num_frames, "chunks did not cover the clip"
    return out


def blend_tiles(
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    tile: int,
    overlap: int,
    in_scale: int,
    out_scale: int,
) -> Tensor:
    """Run fn on overlapping tiles of x [..., H, W] and blend the outputs with linear ramps.

    tile and overlap count cells of a common grid (the latent grid); one cell is in_scale input
    pixels and out_scale output pixels. Every output pixel ends up a weighted mean of the tiles
    covering it, so seams fade out instead of showing.
    """
    grid_h, grid_w = x.shape[-2] // in_scale, x.shape[-1] // in_scale
    out: Tensor | None = None
    weight = x.new_zeros(grid_h * out_scale, grid_w * out_scale)
    for top in _tile_starts(grid_h, tile, tile - overlap):
        for left in _tile_starts(grid_w, tile, tile - overlap):
            size_h, size_w = min(tile, grid_h), min(tile, grid_w)
            rows = slice(top * in_scale, (top + size_h) * in_scale)
            cols = slice(left * in_scale, (left + size_w) * in_scale)
            piece = fn(x[..., rows, cols])
            ramp_h = _edge_ramp(
                size_h * out_scale, overlap * out_scale, top > 0, top + size_h < grid_h
            )
            ramp_w = _edge_ramp(
                size_w * out_scale, overlap * out_scale, left > 0, left + size_w < grid_w
            )
            mask = torch.outer(ramp_h, ramp_w).to(piece)
            if out is None:
                out = piece.new_zeros(*piece.shape[:-2], *weight.shape)
            out_rows = slice(top * out_scale, (top + size_h) * out_scale)
            out_cols = slice(left * out_scale, (left + size_w) * out_scale)
            out[..., out_rows, out_cols] += piece * mask
            weight[out_rows, out_cols] += mask.to(weight)
    assert out is not None  # at least one tile always exists
    return out / weight.to(out)


def _tile_starts(size: int, tile: int, stride: int) -> list[int]:
    """Tile offsets covering [0, size): regular steps, the last one flush with the end."""
    if size <= tile:
        return [0]
    return [*range(0, size - tile, stride), size - tile]


def _edge_ramp(length: int, overlap: int, fade_start: bool, fade_end: bool) -> Tensor:
    """Weights 1 inside a tile, rising linearly (never to 0) across overlaps with neighbours."""
    weights = torch.ones(length)
    if overlap > 0:
        ramp = torch.arange(1, overlap + 1, dtype=torch.float32) / (overlap + 1)
        if fade_start:
            weights[:overlap] = torch.minimum(weights[:overlap], ramp)
        if fade_end:
            weights[-overlap:] = torch.minimum(weights[-overlap:], ramp.flip(0))
    return weights
