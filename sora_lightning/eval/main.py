"""`sora-eval`: generate the held-out prompts and score colour, shape and motion adherence.

Prompt videos and contact sheets are signed (`provenance`) and screened (`safety`) like
sora-sample's; the world benchmark's videos are scored in memory and never written.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

import hydra
from omegaconf import DictConfig

from sora_lightning.config import CONFIG_PATH
from sora_lightning.data.latent_cache import read_cache_meta
from sora_lightning.data.world import eval_prompts, seen_prompts
from sora_lightning.diffusion.sampling import SamplingConfig
from sora_lightning.eval.evaluate import evaluate, headline
from sora_lightning.eval.generic import (
    log_to_tensorboard,
    prompt_videos,
    vae_reconstruction,
    validation_flow_loss,
)
from sora_lightning.sample.expand import build_expander, expander_config, resolve_examples
from sora_lightning.sample.generate import load_generator
from sora_lightning.sample.main import prompts_of
from sora_lightning.sample.provenance import Provenance
from sora_lightning.sample.safety import Safety
from sora_lightning.utils import pick_device, write_json_atomic

PROMPT_SETS = {"held_out": eval_prompts, "seen": seen_prompts}
"""`prompt_set` choices: the held-out triples (the benchmark), or 2 training triples per eval motion."""


def _prompts(name: str) -> list[str]:
    """The prompts of set `name`; an unknown name is rejected before any work."""
    if name not in PROMPT_SETS:
        raise ValueError(f"prompt_set={name!r} is not one of {sorted(PROMPT_SETS)}")
    return PROMPT_SETS[name]()


def run_eval(cfg: DictConfig) -> dict:
    """Write `eval.json` (and TensorBoard) for any data, plus the world's adherence when asked.

    Always (when their inputs are given): the held-out validation flow loss (`cache_dir`), the
    VAE's PSNR/SSIM on held-out clips (`shards`), and each prompt as mp4 + contact sheet. With
    `world=true`: colour/shape/motion adherence on the world's held-out triples.
    """
    prompt_set = cfg.get("prompt_set", "held_out")
    world_prompts = _prompts(prompt_set) if cfg.get("world", True) else []
    settings = SamplingConfig.from_config(cfg.sampling)  # rejects bad sizes before any work
    expansion = resolve_examples(expander_config(cfg), cfg.ckpt)  # a bad expander, before models
    provenance = Provenance.from_config(cfg.get("provenance"))  # a test signature, up front
    safety = Safety.from_config(cfg.get("safety"))
    prompts = prompts_of(cfg)
    safety.screen(prompts)  # refused prompts are named before the model loads
    device = pick_device(cfg.get("device", "auto"))
    generator = load_generator(cfg.ckpt, expander=build_expander(expansion)).to(device)
    out_dir = Path(cfg.out_dir)
    scores: dict = {"settings": {k: v for k, v in asdict(settings).items() if k != "seed"}}
    scores.update(_generic(cfg, generator))
    if prompts:
        scores["prompts"] = prompt_videos(
            generator.generate, prompts, settings, out_dir, safety=safety, provenance=provenance
        )
    if safety.enabled:
        scores["safety"] = safety.report()
        print(safety.summary())
    if world_prompts:
        scores.update(_world(cfg, generator, settings, world_prompts))
        scores["prompt_set"] = prompt_set
    write_json_atomic(out_dir / "eval.json", scores)
    log_to_tensorboard(out_dir, scores, step=int(cfg.get("step", 0)))
    print(headline(scores))
    return scores


def _generic(cfg: DictConfig, generator) -> dict:
    """The scores that need no knowledge of the data: loss and reconstruction."""
    scores: dict = {}
    fraction = float(cfg.get("val_fraction", 0.0))
    if cfg.get("cache_dir"):
        budget = int(cfg.get("val_token_budget", 4096))
        scores.update(validation_flow_loss(generator, cfg.cache_dir, fraction, budget))
        if cfg.get("shards"):
            cache_settings = read_cache_meta(cfg.cache_dir)["settings"]
            limit = int(cfg.get("recon_clips", 16))
            scores.update(
                vae_reconstruction(generator, cfg.shards, fraction, cache_settings, limit)
            )
    return scores


def _world(cfg: DictConfig, generator, settings: SamplingConfig, prompts: list[str]) -> dict:
    """Adherence of the world's held-out prompts, scored by the detector proven on truth."""

    def generate(prompt: str, seed: int):
        return generator.generate(prompt, replace(settings, seed=settings.seed + seed)).frames

    return evaluate(
        generate,
        prompts=prompts,
        num_seeds=cfg.num_seeds,
        truth_clips=cfg.truth_clips,
        reconstruct=generator.reconstruct if cfg.ceiling_clips else None,
        ceiling_clips=cfg.ceiling_clips,
    )


@hydra.main(config_path=CONFIG_PATH, config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_eval(cfg)


if __name__ == "__main__":
    main()
