"""`sora-train`: trains the VAE (task=vae) or the DiT (task=dit) from a Hydra config.

`train(cfg)` is separate from the `@hydra.main` entry point so tests call it directly. Re-running
the same command with the same `run_dir` resumes from the newest checkpoint that loads.
"""

from __future__ import annotations

import glob
import logging
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from sora_lightning.data.datamodule import DiTDataModule, VAEDataModule
from sora_lightning.data.latent_cache import CacheSettings, cache_key, read_cache_meta
from sora_lightning.models.text import TextEncoder
from sora_lightning.parallel.strategies import build_strategy
from sora_lightning.train.callbacks import ThroughputMonitor, VideoSampleLogger
from sora_lightning.train.checkpoint import find_resume_checkpoint
from sora_lightning.train.dit_module import DiTModule
from sora_lightning.train.vae_module import VAEModule
from sora_lightning.train.weights import config_to_dict, load_vae, save_module
from sora_lightning.utils import state_dict_hash

log = logging.getLogger(__name__)
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
TASKS = ("vae", "dit")


def validate(cfg: DictConfig) -> None:
    """Reject a bad config before any work starts, naming the key and the fix."""
    if cfg.task not in TASKS:
        raise ValueError(f"task={cfg.task!r} is not one of {TASKS}")
    if cfg.task == "vae" and not cfg.data.shards:
        raise ValueError("task=vae needs data.shards (a glob or list of webdataset .tar files)")
    if cfg.task == "dit":
        for key in ("cache_dir", "vae_dir"):
            if not cfg.data.get(key):
                raise ValueError(f"task=dit needs data.{key}; run the pipeline's earlier steps or set it")
    instantiate(cfg.curriculum, _convert_="all")  # raises ValueError on a bad stage
    instantiate(cfg.model.dit, _convert_="all")
    instantiate(cfg.model.vae, _convert_="all")


def expand_shards(spec: Any) -> list[str]:
    """A glob, a list of globs or paths -> sorted existing shard paths (error if none)."""
    patterns = [spec] if isinstance(spec, str) else list(spec)
    paths = sorted({p for pattern in patterns for p in glob.glob(str(pattern))})
    if not paths:
        raise FileNotFoundError(f"no shard matches {patterns}; write shards first (tools/make_shards.py)")
    return paths


def build_trainer(cfg: DictConfig, run_dir: Path, max_steps: int, extra_callbacks: list[L.Callback]) -> L.Trainer:
    """Trainer with TensorBoard, periodic checkpoints (keep last k) and progress bars."""
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_kwargs["max_steps"] = max_steps
    checkpoints = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="{step}", monitor="step", mode="max",
                                  every_n_train_steps=cfg.checkpoint.every_n_steps, save_top_k=cfg.checkpoint.keep_last)
    callbacks = [checkpoints, LearningRateMonitor(logging_interval="step"), TQDMProgressBar(refresh_rate=5), *extra_callbacks]
    logger = TensorBoardLogger(save_dir=str(run_dir), name="tb", version="")
    return L.Trainer(default_root_dir=str(run_dir), logger=logger, callbacks=callbacks, use_distributed_sampler=False,
                     strategy=build_strategy(OmegaConf.to_container(cfg.strategy)), **trainer_kwargs)


def _fit(trainer: L.Trainer, module: L.LightningModule, datamodule: L.LightningDataModule, run_dir: Path) -> None:
    resume = find_resume_checkpoint(run_dir / "checkpoints")
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume) if resume else None)
    trainer.save_checkpoint(run_dir / "checkpoints" / f"step={trainer.global_step}.ckpt")


def train_vae(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Train the VAE on raw shards; writes run_dir/vae.safetensors + vae.json."""
    vae_cfg = instantiate(cfg.model.vae, _convert_="all")
    hp = cfg.vae_train
    steps = cfg.trainer.get("max_steps") or hp.steps
    module = VAEModule(config_to_dict(vae_cfg), lr=hp.lr, warmup_steps=hp.warmup_steps, total_steps=steps,
                       l1_weight=hp.l1_weight, mse_weight=hp.mse_weight, kl_weight=hp.kl_weight)
    datamodule = VAEDataModule(expand_shards(cfg.data.shards), batch_size=hp.batch_size, crop=hp.crop,
                               frame_choices=tuple(hp.frame_choices), max_area=cfg.cache.max_area,
                               multiple=cfg.cache.multiple, seed=cfg.seed, num_steps=steps, num_workers=cfg.data.num_workers)
    trainer = build_trainer(cfg, run_dir, steps, [ThroughputMonitor()])
    _fit(trainer, module, datamodule, run_dir)
    save_module(module.vae, vae_cfg, run_dir, "vae", {"steps": trainer.global_step})
    return {"task": "vae", "steps": trainer.global_step, "weights": str(run_dir / "vae.safetensors"),
            "final_loss": float(trainer.callback_metrics.get("train/loss", float("nan")))}


def _dit_meta(cfg: DictConfig, vae_dir: str, text: TextEncoder, cache_meta: dict) -> dict[str, Any]:
    vae = load_vae(vae_dir)
    return {"vae_dir": str(Path(vae_dir).resolve()), "text": OmegaConf.to_container(cfg.model.text, resolve=True),
            "latent_mean": cache_meta["latent_mean"], "latent_std": cache_meta["latent_std"],
            "spatial_factor": vae.config.spatial_factor, "temporal_factor": vae.config.temporal_factor,
            "cache_key": cache_meta["key"], "vae_hash": state_dict_hash(vae.state_dict())}


def train_dit(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Train the DiT on a latent cache through the curriculum; writes run_dir/final/dit.safetensors (EMA)."""
    dit_cfg = instantiate(cfg.model.dit, _convert_="all")
    curriculum = instantiate(cfg.curriculum, _convert_="all")
    text_cfg = instantiate(cfg.model.text, _convert_="all")
    text = TextEncoder(text_cfg)
    vae = load_vae(cfg.data.vae_dir)
    expected = cache_key(state_dict_hash(vae.state_dict()), text.weights_hash(), CacheSettings(**cfg.cache))
    cache_meta = read_cache_meta(cfg.data.cache_dir, expected)
    meta = _dit_meta(cfg, cfg.data.vae_dir, text, cache_meta)
    meta["text"] = config_to_dict(text_cfg)
    steps = cfg.trainer.get("max_steps") or curriculum.total_steps
    hp = cfg.dit_train
    module = DiTModule(config_to_dict(dit_cfg), curriculum.to_dict(), seed=cfg.seed, weight_decay=hp.weight_decay,
                       ema_decay=hp.ema_decay, meta=meta)
    datamodule = DiTDataModule(cfg.data.cache_dir, curriculum, expected_key=expected, patch_size=dit_cfg.patch_size,
                               spatial_factor=vae.config.spatial_factor, temporal_factor=vae.config.temporal_factor,
                               seed=cfg.seed, caption_probs=dict(cfg.data.caption_probs),
                               text_dropout=cfg.data.text_dropout, num_steps=steps, num_workers=cfg.data.num_workers)
    samples = VideoSampleLogger(list(hp.sample_prompts), every_n_steps=hp.sample_every_n_steps, **hp.sample_options)
    trainer = build_trainer(cfg, run_dir, steps, [ThroughputMonitor(), samples])
    _fit(trainer, module, datamodule, run_dir)
    save_module(module.ema, dit_cfg, run_dir / "final", "dit", {"meta": meta, "steps": trainer.global_step})
    return {"task": "dit", "steps": trainer.global_step, "weights": str(run_dir / "final" / "dit.safetensors"),
            "final_loss": float(trainer.callback_metrics.get("train/loss", float("nan")))}


def train(cfg: DictConfig) -> dict[str, Any]:
    """Validate, seed, and train the configured task in `cfg.run_dir`; returns a summary."""
    validate(cfg)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    L.seed_everything(cfg.seed, workers=True)
    return train_vae(cfg, run_dir) if cfg.task == "vae" else train_dit(cfg, run_dir)


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Console entry point `sora-train`."""
    summary = train(cfg)
    print(summary)


if __name__ == "__main__":
    main()
