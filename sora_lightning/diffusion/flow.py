"""Rectified flow: timesteps, shift, training targets, loss and samplers as pure tensor functions.

Convention (shared with the DiT and the data contract): x_t = (1 - t) * x0 + t * noise, so t = 1 is
pure noise and t = 0 is data; the network predicts the velocity v = noise - x0 = dx_t/dt.
Samplers integrate from t = 1 down to t = 0.

Shape legend: B samples, L packed tokens, P values per token.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from sora_lightning.models.patches import cu_to_sample_index

Velocity = Callable[[Tensor, Tensor], Tensor]
"""velocity(x_t [L, P], t [B]) -> v [L, P]; CFG and packing live inside the closure."""


class PackedTokens(Protocol):
    """What the loss reads of a packed batch (the contract `data.packing.PackedBatch` fulfils)."""

    x: Tensor
    """[L, P] clean tokens of all samples."""
    cu_seqlens: Tensor
    """[B+1] cumulative video-token counts."""
    grid_sizes: Tensor
    """[B, 3] token grid per sample."""
    text: Tensor
    """[S, Dt] text states of all samples."""
    text_cu_seqlens: Tensor
    """[B+1] cumulative text-token counts."""
    cond: Tensor | None
    """[L, P] clean conditioning tokens, or None."""
    cond_mask: Tensor | None
    """[L] 1.0 on clean conditioning tokens, or None."""

    @property
    def num_samples(self) -> int: ...


def frame_cond_mask(num_frames: int, num_cond: int, at_end: bool = False) -> Tensor:
    """[num_frames] float: 1 on the first (or, at_end, the last) num_cond frames, else 0.

    One definition for training masks (`data.packing`) and sampling masks (`diffusion.sampling`),
    so both condition the same frames.
    """
    index = torch.arange(num_frames)
    keep = index >= num_frames - num_cond if at_end else index < num_cond
    return keep.float()


def sample_logit_normal(
    num: int, *, mean: float = 0.0, std: float = 1.0, generator: torch.Generator | None = None
) -> Tensor:
    """Logit-normal t in (0, 1): SD3's choice, it spends training on the mid-noise levels that matter."""
    normal = torch.randn(num, generator=generator) * std + mean
    return torch.sigmoid(normal)


def shift_timesteps(t: Tensor, shift: Tensor | float) -> Tensor:
    """SD3 shift t' = s*t / (1 + (s-1)*t): more noise for larger s, i.e. for samples with more tokens."""
    shift = torch.as_tensor(shift, dtype=t.dtype, device=t.device)
    return shift * t / (1.0 + (shift - 1.0) * t)


def resolution_shift(
    num_tokens: Tensor,
    *,
    base_tokens: int = 256,
    max_tokens: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> Tensor:
    """Shift factor exp(mu), mu linear in token count (SD3/Flux): big videos need noisier schedules
    because more tokens average away the same per-token noise."""
    num_tokens = torch.as_tensor(num_tokens, dtype=torch.float64)
    slope = (max_shift - base_shift) / (max_tokens - base_tokens)
    mu = base_shift + slope * (num_tokens - base_tokens)
    return torch.exp(mu).float()


def training_shift(
    num_tokens: Tensor,
    num_frames: Tensor,
    shift: float | None,
    image_shift: float | None = None,
) -> Tensor:
    """Per-sample shift [B]: `shift` (None: the token-count `resolution_shift`), and `image_shift`
    for single-frame samples when given, so a joint image+video stage noises each kind its way."""
    derived = resolution_shift(num_tokens)
    shifts = derived if shift is None else torch.full_like(derived, float(shift))
    if image_shift is not None:
        shifts = torch.where(torch.as_tensor(num_frames) == 1, float(image_shift), shifts)
    return shifts


def add_noise(x0: Tensor, noise: Tensor, t_tokens: Tensor) -> Tensor:
    """x_t = (1 - t) x0 + t noise with a per-token t [L] (each token carries its sample's t)."""
    t = t_tokens.to(x0.dtype).unsqueeze(-1)
    return (1.0 - t) * x0 + t * noise


def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
    """The rectified-flow regression target v = noise - x0 (constant along the straight path)."""
    return noise - x0


def flow_loss(
    pred: Tensor,
    target: Tensor,
    sample_index: Tensor,
    num_samples: int,
    loss_mask: Tensor | None = None,
    sample_weights: Tensor | None = None,
) -> Tensor:
    """MSE averaged per sample, then over samples, so a long video and an image weigh the same.

    loss_mask [L] (1 = token is generated, 0 = clean conditioning) keeps conditioning frames out.
    """
    per_token = (pred.float() - target.float()).pow(2).mean(dim=-1)
    mask = torch.ones_like(per_token) if loss_mask is None else loss_mask.float()
    sums = torch.zeros(num_samples, device=pred.device).index_add_(
        0, sample_index, per_token * mask
    )
    counts = torch.zeros(num_samples, device=pred.device).index_add_(0, sample_index, mask)
    valid = counts > 0
    per_sample = sums[valid] / counts[valid]
    if sample_weights is not None:
        weights = sample_weights[valid].float()
        return (per_sample * weights).sum() / weights.sum().clamp_min(1e-12)
    return per_sample.mean()


def motion_weights(x: Tensor, cu_seqlens: Tensor, grid_sizes: Tensor, strength: float) -> Tensor:
    """[L] loss weight of each clean token: 1 + strength x min(1, its change), where its change
    is the RMS difference from the same place in the neighbouring latent frames (the larger of
    before and after). Images (one frame) and still places weigh 1.

    Why: in a clip of small objects on a plain background, the tokens where something moves are
    a few percent of the loss, so the loss barely asks for motion; this leans on them the way
    `vae_train.salience_weight` leans on object pixels. Fed to `flow_loss` as a mask, each
    sample's loss stays a weighted mean (its weights normalise to mean 1 within the sample).
    """
    if strength < 0:
        raise ValueError(f"motion weight strength must be >= 0, got {strength}")
    weights = torch.ones(x.shape[0], dtype=torch.float32, device=x.device)
    if strength == 0:
        return weights
    for index, (frames, height, width) in enumerate(grid_sizes.tolist()):
        if frames < 2:
            continue
        start, end = int(cu_seqlens[index]), int(cu_seqlens[index + 1])
        tokens = x[start:end].detach().float().view(frames, height * width, -1)
        step = (tokens[1:] - tokens[:-1]).pow(2).mean(-1).sqrt()  # [F-1, HW]
        change = torch.maximum(torch.cat([step[:1], step]), torch.cat([step, step[-1:]]))
        weights[start:end] = 1.0 + strength * change.clamp(max=1.0).flatten()
    return weights


def packed_batch_loss(
    model: Callable[..., Tensor],
    batch: PackedTokens,
    timesteps: Tensor,
    noise: Tensor,
    motion_weight: float = 0.0,
    **model_kwargs: Any,
) -> Tensor:
    """Training loss of one packed batch: noise the tokens (conditioning tokens stay clean),
    predict the velocity, per-sample MSE over the generated tokens only.

    `model` is the DiT (or any callable with its signature); `model_kwargs` go to it as given,
    e.g. `sequence=` for sequence parallelism, where every rank gets the full prediction back
    and computes this same loss. Here rather than in the LightningModule so a test can run
    exactly the training step's math without Lightning. `motion_weight` > 0 weighs each
    generated token by `motion_weights` (0: the plain per-sample mean).
    """
    sample_index = cu_to_sample_index(batch.cu_seqlens)  # [L]
    cond_mask = (
        batch.cond_mask
        if batch.cond_mask is not None
        else torch.zeros_like(sample_index, dtype=batch.x.dtype)
    )
    x_t = add_noise(batch.x, noise, timesteps[sample_index])  # [L, P]
    x_t = torch.where(cond_mask.bool().unsqueeze(-1), batch.x, x_t)  # clean conditioning frames
    pred = model(
        x_t,
        batch.cu_seqlens,
        batch.grid_sizes,
        timesteps,
        batch.text,
        batch.text_cu_seqlens,
        cond=batch.cond,
        cond_mask=batch.cond_mask,
        **model_kwargs,
    )  # [L, P]
    target = velocity_target(batch.x, noise)
    loss_mask = 1.0 - cond_mask
    if motion_weight:
        loss_mask = loss_mask * motion_weights(
            batch.x, batch.cu_seqlens, batch.grid_sizes, motion_weight
        ).to(loss_mask)
    return flow_loss(pred, target, sample_index, batch.num_samples, loss_mask=loss_mask)


def validation_timesteps(num: int) -> Tensor:
    """[num] fixed t: the midpoints (i + 0.5) / num of `num` equal bins of (0, 1).

    Why: a validation loss compared across checkpoints and runs must not move with a random draw
    or with the training schedule (logit-normal, resolution shift). Averaging over these t is the
    midpoint rule for the loss integrated over uniform t, and it never evaluates the endpoints.
    """
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    return ((torch.arange(num, dtype=torch.float64) + 0.5) / num).float()


def _noise_seed(seed: int, index: int) -> int:
    """A 63-bit generator seed from (seed, index); hashed so nearby pairs never collide."""
    if index < 0:
        raise ValueError(f"sample index must be >= 0, got {index}")
    digest = hashlib.sha256(f"{int(seed)}:{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def fixed_noise(shape: Sequence[int], seed: int, index: int) -> Tensor:
    """Standard-normal float32 noise (on the CPU) owned by one sample, keyed by (seed, index).

    Why: a generator per sample rather than per batch gives a sample the same noise whichever
    batch it lands in and wherever in it, so its validation loss depends only on the model.
    """
    generator = torch.Generator().manual_seed(_noise_seed(seed, index))
    return torch.randn(tuple(int(size) for size in shape), generator=generator)


def validation_noise(batch: PackedTokens, sample_ids: Sequence[int], seed: int) -> Tensor:
    """[L, P] noise of a packed batch: each sample's `fixed_noise` [N_i, P], in pack order."""
    if len(sample_ids) != batch.num_samples:
        raise ValueError(f"{len(sample_ids)} sample ids for {batch.num_samples} samples")
    lengths = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).tolist()
    width = batch.x.shape[-1]
    pieces = [
        fixed_noise((length, width), seed, int(sample_id))
        for length, sample_id in zip(lengths, sample_ids, strict=True)
    ]
    return torch.cat(pieces).to(batch.x)  # [L, P]


def scored_samples(batch: PackedTokens) -> int:
    """Samples with at least one generated token: the ones `flow_loss` averages over."""
    if batch.cond_mask is None:
        return batch.num_samples
    generated = torch.zeros(batch.num_samples, device=batch.cond_mask.device).index_add_(
        0, cu_to_sample_index(batch.cu_seqlens), 1.0 - batch.cond_mask.float()
    )
    return int((generated > 0).sum())


@torch.no_grad()
def validation_loss(
    model: Callable[..., Tensor],
    batch: PackedTokens,
    sample_ids: Sequence[int],
    *,
    seed: int = 0,
    num_timesteps: int = 8,
    **model_kwargs: Any,
) -> tuple[Tensor, int]:
    """Deterministic flow-matching loss of one packed batch of clean latents.

    Why: the training loss draws t and noise at random (and shifts t per stage), so on held-out
    data it cannot tell two checkpoints apart. Here every sample is scored at the same
    `validation_timesteps(num_timesteps)`, unshifted, with its own `fixed_noise` keyed by
    (seed, sample_ids[i]), through the training step's own math: `packed_batch_loss` (noising,
    clean conditioning frames, per-sample MSE over generated tokens, samples weighed equally).

    `sample_ids` are stable ids of the batch's samples (e.g. their position in the validation
    set); `model` and `model_kwargs` are what `packed_batch_loss` takes (the DiT or its EMA, in
    eval mode). Returns (mean over this batch's scored samples of their mean over the timesteps,
    number of scored samples); `mean_validation_loss` weighs batches by that count, so the total
    does not depend on how the samples were grouped into batches.
    """
    noise = validation_noise(batch, sample_ids, seed)  # [L, P]
    losses = [
        packed_batch_loss(
            model, batch, t.repeat(batch.num_samples).to(batch.x.device), noise, **model_kwargs
        )
        for t in validation_timesteps(num_timesteps)
    ]
    return torch.stack(losses).mean(), scored_samples(batch)


def mean_validation_loss(parts: Iterable[tuple[Tensor | float, int]]) -> float:
    """Sample-weighted mean of `validation_loss` results, accumulated in float64.

    Why: weighing each batch's mean by its scored-sample count makes the number the mean over
    samples, however they were batched. Batches with no scored sample (loss NaN) are skipped.
    """
    total, count = 0.0, 0
    for loss, num_scored in parts:
        if num_scored > 0:
            total += float(loss) * num_scored
            count += num_scored
    if count == 0:
        raise ValueError("no batch had a scored sample (every token was conditioning)")
    return total / count


def sampling_schedule(num_steps: int, shift: float = 1.0) -> Tensor:
    """Timesteps [num_steps + 1] from 1 to 0, shifted like training so big samples start noisier."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    t = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    return shift_timesteps(t, shift).float()


def _solve(
    step: Callable[[Tensor, Tensor, Tensor], Tensor],
    noise: Tensor,
    schedule: Tensor,
    on_step: Callable[[Tensor], Tensor] | None,
) -> Tensor:
    """Walk the schedule from noise: x <- step(x, t_cur, t_next), then `on_step` re-imposes conditioning."""
    x = noise
    for t_cur, t_next in zip(schedule[:-1], schedule[1:], strict=True):
        x = step(x, t_cur, t_next)
        x = on_step(x) if on_step is not None else x
    return x


def euler_sample(
    velocity: Velocity,
    noise: Tensor,
    schedule: Tensor,
    num_samples: int,
    on_step: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """First-order ODE solve x_{t_next} = x_t + (t_next - t) v. `on_step` re-imposes conditioning."""

    def step(x: Tensor, t_cur: Tensor, t_next: Tensor) -> Tensor:
        return x + (t_next - t_cur) * velocity(x, t_cur.repeat(num_samples))

    return _solve(step, noise, schedule, on_step)


def heun_sample(
    velocity: Velocity,
    noise: Tensor,
    schedule: Tensor,
    num_samples: int,
    on_step: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Second-order (Heun) solve: averages the slopes at both ends; the last step falls back to Euler."""

    def step(x: Tensor, t_cur: Tensor, t_next: Tensor) -> Tensor:
        v_cur = velocity(x, t_cur.repeat(num_samples))
        x_euler = x + (t_next - t_cur) * v_cur
        if float(t_next) > 0.0:
            v_next = velocity(x_euler, t_next.repeat(num_samples))
            return x + (t_next - t_cur) * 0.5 * (v_cur + v_next)
        return x_euler

    return _solve(step, noise, schedule, on_step)


SAMPLERS: dict[str, Callable[..., Tensor]] = {"euler": euler_sample, "heun": heun_sample}


def guided_velocity(v_cond: Tensor, v_uncond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance: push the prediction away from the unconditional one."""
    return v_uncond + scale * (v_cond - v_uncond)


def cosine_warmup_lr(
    step: int, *, warmup_steps: int, total_steps: int, min_ratio: float = 0.1
) -> float:
    """LR multiplier: linear warmup, then cosine decay to `min_ratio` at `total_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def truncated_schedule(schedule: Tensor, start: float) -> Tensor:
    """The part of a sampling schedule (1 -> 0) below `start`, opened by `start` itself.

    Why: SDEdit-style editing starts from data noised to t = start, so it solves only the rest of
    the path with the same steps text-to-video takes there. start >= schedule[0] keeps the whole
    schedule (editing at 1 is text-to-video); start = 0 leaves [0]: no step, the data unchanged.
    """
    if not 0.0 <= start <= 1.0:
        raise ValueError(f"start must be in [0, 1], got {start}")
    if start >= float(schedule[0]):
        return schedule
    return torch.cat([schedule.new_tensor([start]), schedule[schedule < start]])
