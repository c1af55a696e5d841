"""Evaluation for any data: held-out flow loss, VAE reconstruction, prompts you can look at.

Why: the world's detector only reads the world's shapes. A researcher training on their own
videos needs numbers that mean something for any data (a deterministic validation loss on the
held-out split, the VAE's PSNR/SSIM on held-out clips) and pictures a person can judge (each
prompt as an mp4 and a contact sheet of its frames). All of it goes to eval.json and TensorBoard.
"""

from __future__ import annotations

import glob
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sora_lightning.data.clips import decode_fitted, valid_length
from sora_lightning.data.shards import iter_shard_samples
from sora_lightning.data.sources import is_held_out
from sora_lightning.data.validation import held_out_flow_loss, load_held_out
from sora_lightning.diffusion.sampling import SamplingConfig
from sora_lightning.eval.contact_sheet import contact_sheet, write_png
from sora_lightning.eval.reconstruction import reconstruction_metrics
from sora_lightning.sample.generate import VideoGenerator, write_mp4
from sora_lightning.sample.provenance import Provenance, generation_record
from sora_lightning.sample.safety import Safety


def validation_flow_loss(
    generator: VideoGenerator, cache_dir: str, val_fraction: float, token_budget: int
) -> dict[str, Any]:
    """`val_flow_loss` of the loaded DiT on the cache's held-out split (as logged in training)."""
    samples, meta = load_held_out(cache_dir, val_fraction)
    if not samples:
        return {"val_flow_loss": None, "val_samples": 0}
    loss = held_out_flow_loss(
        generator.dit,
        samples,
        torch.tensor(meta["latent_mean"]),
        torch.tensor(meta["latent_std"]),
        patch_size=generator.patch,
        token_budget=token_budget,
    )
    return {"val_flow_loss": loss, "val_samples": len(samples)}


def held_out_clips(
    shards: str, val_fraction: float, settings: dict, temporal_factor: int, limit: int
) -> Iterator[np.ndarray]:
    """Up to `limit` held-out raw clips, fitted like the cache fits them (area, multiple, frames)."""
    paths = sorted(glob.glob(shards))
    count = 0
    for sample in iter_shard_samples(paths):
        if count >= limit:
            return
        if not is_held_out(sample.key, val_fraction):
            continue
        frames = decode_fitted(sample, max_area=settings["max_area"], multiple=settings["multiple"])
        length = valid_length(len(frames), temporal_factor, settings["max_frames"])
        count += 1
        yield frames[:length]


def vae_reconstruction(
    generator: VideoGenerator, shards: str, val_fraction: float, settings: dict, limit: int
) -> dict[str, Any]:
    """PSNR/SSIM of the VAE on held-out clips (`vae_psnr`, `vae_ssim`, `vae_clips`)."""
    clips = list(
        held_out_clips(shards, val_fraction, settings, generator.vae.config.temporal_factor, limit)
    )
    if not clips:
        return {"vae_psnr": None, "vae_ssim": None, "vae_clips": 0}
    metrics = reconstruction_metrics(generator.reconstruct, clips)
    return {"vae_psnr": metrics["psnr"], "vae_ssim": metrics["ssim"], "vae_clips": len(clips)}


def prompt_videos(
    generate: Callable[[str, SamplingConfig], Any],
    prompts: list[str],
    config: SamplingConfig,
    out_dir: Path,
    *,
    safety: Safety | None = None,
    provenance: Provenance | None = None,
) -> list[dict[str, Any]]:
    """Each prompt to `samples/NNN.mp4` plus `samples/NNN.png`, a contact sheet of its frames.

    With `safety`, a refused prompt is not generated and a flagged video is withheld (its record
    says why, no file is written); with `provenance`, both files are signed.
    """
    records = []
    for index, prompt in enumerate(prompts):
        refused = safety.refusal(prompt) if safety else None
        if refused:
            records.append({"prompt": prompt, "refused": refused})
            continue
        video = generate(prompt, config)
        review = safety.review(video) if safety else None
        if review and review.withheld:
            records.append(
                {
                    "prompt": prompt,
                    "expanded_prompt": video.expanded_prompt,
                    "withheld": review.withheld,
                }
            )
            continue
        record = generation_record(video, safety=review.record if review else None)
        stem = out_dir / "samples" / f"{index:03d}"
        mp4 = write_mp4(stem.with_suffix(".mp4"), video, config.fps, provenance, record)
        png = write_png(stem.with_suffix(".png"), contact_sheet(video.frames), provenance, record)
        records.append(
            {
                "prompt": prompt,
                "expanded_prompt": video.expanded_prompt,
                "mp4": mp4.name,
                "contact_sheet": png.name,
            }
        )
    return records


def log_to_tensorboard(out_dir: Path, scores: dict[str, Any], step: int) -> None:
    """Scalars `eval/<name>` and each prompt's contact sheet under `eval/prompt_NNN`."""
    from PIL import Image
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(out_dir / "tb")) as writer:
        for name, value in scores.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                writer.add_scalar(f"eval/{name}", value, step)
        for index, record in enumerate(scores.get("prompts", [])):
            if "contact_sheet" not in record:  # refused or withheld: nothing was written
                continue
            sheet = np.asarray(Image.open(out_dir / "samples" / record["contact_sheet"]))
            writer.add_image(f"eval/prompt_{index:03d}", sheet, step, dataformats="HWC")
