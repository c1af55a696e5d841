"""LightningModule that trains the causal video VAE: reconstruction + KL, terms configurable.

Posterior samples draw their noise from a generator keyed by (seed, global step, rank), like the
DiT's flow noise, so a run resumed from a checkpoint draws exactly the noise of an uninterrupted
one without any RNG state in the checkpoint.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor

from sora_lightning.diffusion.flow import cosine_warmup_lr
from sora_lightning.models.vae import VAEConfig, VideoVAE
from sora_lightning.train.dit_module import noise_generator


def posterior_generator(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    """The posterior-noise RNG of one step on one rank, on `device` (the draw happens there).

    Same (seed, step, rank) keying as the DiT's `noise_generator`, so both tasks resume alike.
    """
    return torch.Generator(device=device).manual_seed(
        noise_generator(seed, step, rank).initial_seed()
    )


def vae_loss(
    recon: Tensor,
    target: Tensor,
    kl_per_sample: Tensor,
    num_latent: int,
    *,
    l1_weight: float,
    mse_weight: float,
    kl_weight: float,
    salience_weight: float = 0.0,
) -> dict[str, Tensor]:
    """Weighted reconstruction and KL terms; KL is per latent element so its weight is size-independent.

    `salience_weight` > 0 weights each pixel's error by `salience` (mean 1 over the batch)."""
    weight = salience(target, salience_weight) if salience_weight > 0 else None
    error = (recon - target).abs()
    l1 = error.mean() if weight is None else (weight * error).mean()
    mse = error.pow(2).mean() if weight is None else (weight * error.pow(2)).mean()
    kl = kl_per_sample.mean() / num_latent
    total = l1_weight * l1 + mse_weight * mse + kl_weight * kl
    return {"loss": total, "l1": l1, "mse": mse, "kl": kl}


SALIENCE_SCALE = 0.5
"""Distance (model range [-1, 1], RGB norm) from the frame's mean colour at which a pixel counts
as fully salient: half a world object's typical contrast with its background."""


def salience(target: Tensor, strength: float) -> Tensor:
    """Per-pixel weights [B, 1, T, H, W], mean 1: 1 + strength * s, s the pixel's RGB distance
    from its frame's mean colour over SALIENCE_SCALE (at most 1). Why: objects on a plain
    background (the world's) are a few percent of the pixels, so a mean loss barely moves when
    they change hue; the demo VAE decoded red as orange at every size (docs/demo-vae-2026-12-07.md)."""
    mean = target.mean(dim=(-2, -1), keepdim=True)
    distance = (target - mean).norm(dim=1, keepdim=True)
    weight = 1 + strength * (distance / SALIENCE_SCALE).clamp(max=1)
    return weight / weight.mean()


class VAEModule(L.LightningModule):
    """Wraps VideoVAE with its loss, AdamW and a warmup + cosine schedule."""

    def __init__(
        self,
        vae: dict[str, Any],
        *,
        lr: float = 3e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 50,
        total_steps: int = 1000,
        l1_weight: float = 1.0,
        mse_weight: float = 1.0,
        kl_weight: float = 1e-4,
        sample_posterior: bool = True,
        seed: int = 0,
        salience_weight: float = 0.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.vae = VideoVAE(VAEConfig(**vae))  # the config turns YAML/JSON lists into tuples

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        generator = posterior_generator(
            self.hparams.seed, self.global_step, self.global_rank, batch.device
        )
        recon, posterior = self.vae(
            batch, sample_posterior=self.hparams.sample_posterior, generator=generator
        )  # [B, 3, T, H, W]
        num_latent = posterior.mean[0].numel()
        terms = vae_loss(
            recon,
            batch,
            posterior.kl(),
            num_latent,
            l1_weight=self.hparams.l1_weight,
            mse_weight=self.hparams.mse_weight,
            kl_weight=self.hparams.kl_weight,
            salience_weight=self.hparams.get("salience_weight", 0.0),
        )
        self.log_dict({f"vae/{k}": v.detach() for k, v in terms.items()}, prog_bar=False)
        self.log("train/loss", terms["loss"].detach(), prog_bar=True)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        return terms["loss"]

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        optimizer = torch.optim.AdamW(
            self.vae.parameters(), lr=hp.lr, betas=(0.9, 0.99), weight_decay=hp.weight_decay
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: cosine_warmup_lr(
                step, warmup_steps=hp.warmup_steps, total_steps=hp.total_steps
            ),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
