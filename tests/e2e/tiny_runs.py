"""Helpers for e2e tests that train the tiny DiT on the session's tiny cache (see conftest.py)."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_module
from omegaconf import DictConfig

from sora_lightning.config import CONFIG_MODULE


def train_overrides(run_dir: Path, cache_run: Path, *extra: str) -> list[str]:
    """`sora-train` overrides for a deterministic tiny DiT run on `cache_run`'s cache and VAE."""
    return [
        "experiment=tiny",
        "task=dit",
        f"run_dir={run_dir}",
        f"data.cache_dir={cache_run / 'cache'}",
        f"data.vae_dir={cache_run / 'vae'}",
        "trainer.deterministic=true",
        "trainer.enable_progress_bar=false",
        *extra,
    ]


def compose_cfg(run_dir: Path, cache_run: Path, *extra: str) -> DictConfig:
    """The same run as a composed config, for calling `train(cfg)` in-process."""
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        return compose("train", overrides=train_overrides(run_dir, cache_run, *extra))


def scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    """Every (step, value) of a scalar in the run's TensorBoard folder, all event files together."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    return sorted((e.step, e.value) for e in events.Scalars(tag))
