"""The held-out split of a latent cache as fixed packed batches, for a validation flow loss.

Why fixed: a validation number compared across checkpoints and runs must come from the same
samples, in the same batches, at the same size, whatever the curriculum stage or world size.
Every held-out sample is used whole (its longest cached clip), with its detailed caption, no
text dropout and no conditioning frames; batches are filled greedily in key order.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import Tensor

from sora_lightning.data.latent_cache import CachedSample, load_cache
from sora_lightning.data.packing import PackedBatch, pack_samples
from sora_lightning.data.sources import is_held_out
from sora_lightning.diffusion import flow
from sora_lightning.models.patches import PatchSize, patchify

CAPTION_ORDER = ("detailed", "short")
"""The caption a validation sample is scored with: the first of these it has, else its first."""


def held_out(samples: list[CachedSample], val_fraction: float) -> list[CachedSample]:
    """The held-out samples (by key), sorted by key so every process sees one order."""
    return sorted((s for s in samples if is_held_out(s.key, val_fraction)), key=lambda s: s.key)


def load_held_out(
    cache_dir: str, val_fraction: float, expected_key: str | None = None
) -> tuple[list[CachedSample], dict]:
    """Held-out samples of a latent cache and its meta (latent mean/std for normalising)."""
    samples, _, meta = load_cache(cache_dir, expected_key)
    return held_out(samples, val_fraction), meta


def _caption(sample: CachedSample) -> Tensor:
    kind = next((k for k in CAPTION_ORDER if k in sample.texts), sorted(sample.texts)[0])
    return sample.texts[kind].float()


def validation_batches(
    samples: list[CachedSample],
    mean: Tensor,
    std: Tensor,
    patch_size: PatchSize,
    token_budget: int,
) -> Iterator[tuple[PackedBatch, list[int]]]:
    """(packed batch, sample ids) over `samples` in order; a sample id is its position.

    A sample longer than `token_budget` gets a batch of its own (never cut: the number must
    cover whole clips).
    """
    scale = (mean.view(-1, 1, 1, 1), std.view(-1, 1, 1, 1))
    pending: list[tuple[int, Tensor, Tensor]] = []
    used = 0
    for index, sample in enumerate(samples):
        latent = ((sample.latent - scale[0]) / scale[1]).float()
        tokens = patchify(latent, patch_size).shape[0]
        if pending and used + tokens > token_budget:
            yield _pack(pending, patch_size)
            pending, used = [], 0
        pending.append((index, latent, _caption(sample)))
        used += tokens
    if pending:
        yield _pack(pending, patch_size)


def _pack(
    pending: list[tuple[int, Tensor, Tensor]], patch_size: PatchSize
) -> tuple[PackedBatch, list[int]]:
    ids = [index for index, _, _ in pending]
    latents = [latent for _, latent, _ in pending]
    texts = [text for _, _, text in pending]
    capacity = sum(patchify(latent, patch_size).shape[0] for latent in latents)
    return pack_samples(latents, texts, patch_size, capacity), ids


def held_out_flow_loss(
    model,
    samples: list[CachedSample],
    mean: Tensor,
    std: Tensor,
    *,
    patch_size: PatchSize,
    token_budget: int,
    seed: int = 0,
    num_timesteps: int = 8,
) -> float:
    """The validation flow loss of `model` (the DiT or its EMA) over held-out `samples`.

    Deterministic (`flow.validation_loss`: fixed t, per-sample fixed noise) and the mean over
    samples, so it compares checkpoints and runs on the same split.
    """
    device = next(model.parameters()).device
    parts = [
        flow.validation_loss(model, batch.to(device), ids, seed=seed, num_timesteps=num_timesteps)
        for batch, ids in validation_batches(samples, mean, std, patch_size, token_budget)
    ]
    return flow.mean_validation_loss(parts)
