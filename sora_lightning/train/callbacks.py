"""Training callbacks: throughput/MFU with data-wait fraction, preview videos in TensorBoard, bad-data
accounting and the held-out validation loss."""

from __future__ import annotations

import io
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import lightning as L
import numpy as np
import torch
from PIL import Image
from tensorboard.compat.proto.summary_pb2 import Summary
from torch import Tensor

from sora_lightning.data.clips import to_uint8
from sora_lightning.data.validation import held_out_flow_loss
from sora_lightning.data.world import expand_prompt
from sora_lightning.diffusion.sampling import (
    SamplingConfig,
    latent_shape,
    sample_latents,
    text_states,
)
from sora_lightning.models.text import TextEncoder, TextEncoderConfig
from sora_lightning.models.vae import VideoVAE
from sora_lightning.parallel.strategies import parameters_are_sharded
from sora_lightning.train import scalars
from sora_lightning.train.weights import load_vae

log = logging.getLogger(__name__)


def measure_matmul_flops(
    size: int = 2048, repeats: int = 3, clock: Callable[[], float] = time.perf_counter
) -> float:
    """Achievable fp32 matmul FLOP/s on this machine now: the denominator of our MFU.

    The median of a few large square matmuls; `tools/bench/dit_step.py` measures its MFU with
    this same function, so training's `train/mfu` and the benchmark's compare.
    """
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)  # warm the BLAS threads
    times = []
    for _ in range(repeats):
        start = clock()
        torch.mm(a, b)
        times.append(clock() - start)
    return 2 * size**3 / statistics.median(times)


class ThroughputMonitor(L.Callback):
    """Logs tokens/s, samples/s, MFU (analytic FLOPs / measured peak) and the time spent waiting on data."""

    time_category = "logging"  # where train/timing.py files its hooks

    def __init__(self, peak_flops: float | None = None) -> None:
        self.peak_flops = peak_flops
        self._batch_start = 0.0
        self._last_end: float | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.peak_flops is None:
            self.peak_flops = measure_matmul_flops()
        log.info("matmul peak measured at %.1f GFLOP/s", self.peak_flops / 1e9)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch_start = time.perf_counter()

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        now = time.perf_counter()
        compute = now - self._batch_start
        total = compute if self._last_end is None else now - self._last_end
        self._last_end = now
        tokens, samples, flops = _batch_counts(pl_module, batch)
        metrics = {
            "train/tokens_per_s": tokens / total,
            "train/samples_per_s": samples / total,
            "train/data_wait_fraction": max(0.0, 1.0 - compute / total),
        }
        if flops and self.peak_flops:
            metrics["train/mfu"] = (
                3.0 * flops / total / self.peak_flops
            )  # forward + backward ~ 3x forward
        scalars.write(trainer, metrics)  # not `self.log`: train/scalars.py says why


def _batch_counts(pl_module: L.LightningModule, batch: Any) -> tuple[int, int, int]:
    """(tokens, samples, forward FLOPs) of a batch, whichever model is being trained."""
    if hasattr(batch, "cu_seqlens"):
        from sora_lightning.models.stats import dit_forward_flops

        grids = [tuple(int(g) for g in row) for row in batch.grid_sizes.tolist()]
        text_lens = batch.text_cu_seqlens.diff().tolist()
        flops = dit_forward_flops(pl_module.dit_config, grids, text_lens)
        return int(batch.cu_seqlens[-1]), batch.num_samples, flops
    return int(batch[0].numel() // 3 * batch.shape[0]), int(batch.shape[0]), 0


def gif_summary(tag: str, frames: np.ndarray, fps: int) -> Summary:
    """An animated GIF as a TensorBoard image summary: plays in the Images tab, no moviepy needed."""
    images = [Image.fromarray(frame) for frame in frames]
    buffer = io.BytesIO()
    images[0].save(
        buffer,
        format="GIF",
        save_all=True,
        append_images=images[1:],
        duration=int(1000 / fps),
        loop=0,
    )
    height, width = frames.shape[1:3]
    image = Summary.Image(
        height=height, width=width, colorspace=3, encoded_image_string=buffer.getvalue()
    )
    return Summary(value=[Summary.Value(tag=tag, image=image)])


class VideoSampleLogger(L.Callback):
    """Every N steps, samples fixed prompts with the EMA weights and logs them as playable videos.

    Sampled by `diffusion.sampling` with the run's `sampling` config, the same solve and settings
    as `sora-sample`; prompt i uses seed `sampling.seed + i`.
    """

    time_category = "previews"  # where train/timing.py files its hooks

    def __init__(self, prompts: list[str], *, every_n_steps: int, sampling: SamplingConfig) -> None:
        self.prompts, self.every_n_steps, self.sampling = list(prompts), every_n_steps, sampling
        self._parts: _PreviewParts | None = None

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        step = trainer.global_step
        if self.every_n_steps <= 0 or step % self.every_n_steps:
            return
        sharded = parameters_are_sharded(pl_module.ema)
        if not (trainer.is_global_zero or sharded):
            return
        self.log_samples(trainer, pl_module, step)
        if sharded and hasattr(pl_module.ema, "reshard"):
            # FSDP2 leaves a root module unsharded after a forward (it expects a backward); the
            # EMA update needs its DTensor shards back.
            pl_module.ema.reshard()

    def log_samples(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        """Generate every prompt; only global rank 0 writes.

        With sharded EMA weights (ZeRO-3, FSDP2) each forward gathers parameters collectively,
        so every rank must run the same forwards in step (same prompts, seeds and step counts),
        or rank 0 would wait forever for the others.
        """
        writer = trainer.logger.experiment if trainer.is_global_zero and trainer.logger else None
        for index, prompt in enumerate(self.prompts):
            config = replace(self.sampling, seed=self.sampling.seed + index)
            frames = self.render(pl_module, prompt, config)
            if writer is None:
                continue
            summary = gif_summary(f"samples/{index}", frames, config.fps)
            writer._get_file_writer().add_summary(
                summary, step
            )  # SummaryWriter has no public raw-summary API
            writer.add_text(f"samples/{index}_prompt", prompt, step)
        if writer is not None:
            writer.flush()

    @torch.no_grad()
    def render(
        self, pl_module: L.LightningModule, prompt: str, config: SamplingConfig
    ) -> np.ndarray:
        """uint8 frames [T, H, W, 3] of one prompt from the EMA DiT (the world's prompt expander
        applies, as in `sora-sample`; other captions pass through it unchanged)."""
        parts = self._get_parts(pl_module)
        dit = pl_module.ema
        shape = latent_shape(
            config,
            channels=dit.config.in_channels,
            spatial_factor=parts.vae.config.spatial_factor,
            temporal_factor=parts.vae.config.temporal_factor,
            patch=tuple(dit.config.patch_size),
        )
        states = text_states(parts.text, expand_prompt(prompt))
        image = None
        if config.image_first:
            image = text_states(parts.text, expand_prompt(prompt, num_frames=1))
        latent = sample_latents(dit, shape, config, states, parts.null_states, image_states=image)
        return to_uint8(parts.vae.decode((latent * parts.std + parts.mean).unsqueeze(0))[0])

    def _get_parts(self, pl_module: L.LightningModule) -> _PreviewParts:
        """VAE, text encoder and latent statistics of the run, loaded once."""
        if self._parts is None:
            meta = pl_module.hparams.meta
            text = TextEncoder(TextEncoderConfig(**meta["text"]))
            self._parts = _PreviewParts(
                vae=load_vae(meta["vae_dir"]),
                text=text,
                null_states=text_states(text, ""),
                mean=torch.tensor(meta["latent_mean"]).view(-1, 1, 1, 1).float(),
                std=torch.tensor(meta["latent_std"]).view(-1, 1, 1, 1).float(),
            )
        return self._parts


@dataclass
class _PreviewParts:
    """What previews need besides the EMA DiT: decoder, text encoder, latent statistics."""

    vae: VideoVAE
    text: TextEncoder
    null_states: Tensor  # [S, Dt] the empty caption: CFG's unconditional branch
    mean: Tensor  # [C, 1, 1, 1]
    std: Tensor  # [C, 1, 1, 1]


class BadDataMonitor(L.Callback):
    """Before step 0: logs skipped samples per reason and aborts when too much data is bad.

    Reads the datamodule's `bad_samples` (a `BadSampleCounter` filled while its setup read the
    raw shards, or rebuilt from the latent cache's record of skips). Scalars
    `data/bad/<reason>` and `data/bad_fraction` go to TensorBoard; the text log names each
    reason's first shards and keys (every skip was already logged with its shard and key).
    A run whose data is mostly broken stops here with the places to fix instead of training on
    the rest.
    """

    def __init__(self, max_bad_fraction: float = 0.05) -> None:
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"data.max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        self.max_bad_fraction = max_bad_fraction

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        stats = getattr(trainer.datamodule, "bad_samples", None)
        if stats is None:
            return
        metrics = {f"data/bad/{reason}": float(n) for reason, n in sorted(stats.counts.items())}
        metrics["data/bad_fraction"] = stats.fraction()
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        if stats.bad:
            log.warning(
                "data: %d of %d samples skipped (%.2f%%): %s",
                stats.bad,
                stats.seen,
                100 * stats.fraction(),
                stats.describe(),
            )
        stats.check(self.max_bad_fraction)  # RuntimeError naming reasons, shards and keys


class ValidationLoss(L.Callback):
    """Every `every_n_steps` steps and at the end: the EMA DiT's flow loss on the held-out split.

    Why: the training loss is drawn at random t and noise and moves with the curriculum stage,
    so it cannot say whether a run improves on data it never saw. This number is deterministic
    (`data.validation.held_out_flow_loss`) and the same as `sora-eval`'s `val_flow_loss` for the
    same weights, so training curves and evaluations line up. Every rank computes it on the
    same batches (a sharded EMA needs every rank in its forward); rank 0 logs `val/flow_loss`.
    """

    time_category = "validation"  # where train/timing.py files its hooks

    def __init__(self, every_n_steps: int, token_budget: int, seed: int = 0) -> None:
        if every_n_steps < 0 or token_budget < 1:
            raise ValueError("dit_train.val_every_n_steps must be >= 0 and token budget >= 1")
        self.every_n_steps, self.token_budget, self.seed = every_n_steps, token_budget, seed
        self._last_step = -1

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any
    ) -> None:
        step = trainer.global_step
        if step == trainer.max_steps:  # the run's last step: on_train_end scores it, once
            return
        if self.every_n_steps and step % self.every_n_steps == 0:
            self._log(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.every_n_steps:
            self._log(trainer, pl_module)

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = trainer.datamodule
        samples = getattr(datamodule, "val_samples", [])
        if not samples or trainer.global_step == self._last_step:
            return
        self._last_step = trainer.global_step
        meta = datamodule.meta
        loss = held_out_flow_loss(
            pl_module.ema,
            samples,
            torch.tensor(meta["latent_mean"]),
            torch.tensor(meta["latent_std"]),
            patch_size=tuple(pl_module.dit_config.patch_size),
            token_budget=self.token_budget,
            seed=self.seed,
        )
        for logger in trainer.loggers:
            logger.log_metrics({"val/flow_loss": loss}, step=trainer.global_step)
        log.info(
            "step %d: val/flow_loss %.5f on %d held-out samples",
            trainer.global_step,
            loss,
            len(samples),
        )
