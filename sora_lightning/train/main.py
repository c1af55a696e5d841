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
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from sora_lightning.config import CONFIG_PATH
from sora_lightning.data.datamodule import StreamingVAEDataModule, VAEDataModule
from sora_lightning.data.latent_cache import cache_key, read_cache_meta
from sora_lightning.data.sources import DatasetConfig
from sora_lightning.diffusion.sampling import SamplingConfig, latent_shape
from sora_lightning.launch.slurm import launch_training, preemption_callbacks, train_in_job
from sora_lightning.models.dit import DiT, DiTConfig
from sora_lightning.models.text import TextEncoder
from sora_lightning.models.vae import VideoVAE, clip_lengths_hint, is_clip_length
from sora_lightning.parallel.strategies import (
    SHARDED,
    ShardReport,
    build_strategy,
    gathered_state_dict,
    strategy_name,
)
from sora_lightning.runlock import hold_run_lock
from sora_lightning.train.cache import build_cache, cache_settings, vae_config_for
from sora_lightning.train.callbacks import (
    BadDataMonitor,
    ThroughputMonitor,
    ValidationLoss,
    VideoSampleLogger,
)
from sora_lightning.train.checkpoint import (
    CheckpointConfig,
    build_checkpointing,
    verify_checkpoint,
)
from sora_lightning.train.compile import CompileMonitor
from sora_lightning.train.dit_data import DataLedger, DiTDataModule
from sora_lightning.train.dit_module import DiTModule, FlowConfig
from sora_lightning.train.elastic import TopologyRecorder, resume_checkpoint
from sora_lightning.train.guards import guard_from_config
from sora_lightning.train.lora import check_finetune, save_lora_final
from sora_lightning.train.timing import step_timing
from sora_lightning.train.vae_module import VAEModule
from sora_lightning.train.weights import config_to_dict, load_vae, save_module
from sora_lightning.utils import state_dict_hash

log = logging.getLogger(__name__)
TASKS = ("vae", "cache", "dit")


def validate(cfg: DictConfig) -> None:
    """Reject a bad config before any work starts, naming the key and the fix."""
    if cfg.task not in TASKS:
        raise ValueError(f"task={cfg.task!r} is not one of {TASKS}")
    needs = {
        "vae": ("shards",),
        "cache": ("shards", "vae_dir", "cache_dir"),
        "dit": ("cache_dir", "vae_dir"),
    }
    if cfg.task == "cache" and cfg.cache.get("merge"):
        needs["cache"] = ("cache_dir",)
    for key in needs[cfg.task]:
        if not cfg.data.get(key):
            raise ValueError(
                f"task={cfg.task} needs data.{key}; run the pipeline's earlier steps or set it"
            )
    if cfg.task == "dit":
        try:
            FlowConfig.from_config(OmegaConf.to_container(cfg.dit_train.flow, resolve=True))
        except ValueError as error:
            raise ValueError(f"bad config at `dit_train.flow`: {error}") from error
    for key in ("curriculum", "model.dit", "model.vae", "model.text"):
        _check_node(cfg, key)
    if cfg.task == "dit":  # a base that is not model.dit is refused now, naming the fields
        check_finetune(
            cfg.model.get("pretrained"),
            OmegaConf.to_container(cfg.get("lora"), resolve=True) if cfg.get("lora") else None,
            instantiate(cfg.model.dit, _convert_="all"),
        )
    if cfg.task == "dit":
        _check_conditioning(cfg)
    if cfg.task == "vae" and int(cfg.vae_train.get("crop_tries", 1)) < 1:  # before any work
        raise ValueError(f"vae_train.crop_tries must be >= 1, got {cfg.vae_train.crop_tries}")
    if cfg.task == "vae" and float(cfg.vae_train.get("salience_weight", 0.0)) < 0:
        raise ValueError(
            f"vae_train.salience_weight must be >= 0, got {cfg.vae_train.salience_weight}"
        )
    try:
        SamplingConfig.from_config(cfg.sampling)
    except ValueError as error:
        raise ValueError(f"bad config at `sampling`: {error}") from error
    _check_dataset_and_cache(cfg)


def _check_conditioning(cfg: DictConfig) -> None:
    """A stage that keeps clean frames needs a DiT with the conditioning channel (Wan 2.1's
    text-to-video DiT has none): refused now, not when the stage starts."""
    if cfg.model.dit.get("use_conditioning", True):
        return
    for index, stage in enumerate(cfg.curriculum.stages):
        if float(stage.get("cond_probability", 0.0) or 0.0) > 0:
            raise ValueError(
                f"curriculum.stages.{index}.cond_probability={stage.cond_probability}, but "
                "model.dit.use_conditioning=false (no clean-frame channel, as Wan 2.1 text-to-"
                f"video): set curriculum.stages.{index}.cond_probability=0"
            )


def _check_dataset_and_cache(cfg: DictConfig) -> None:
    """The data source, a pretrained VAE folder and the derived cache settings, checked now."""
    try:
        DatasetConfig.from_config(cfg.dataset)
    except ValueError as error:
        raise ValueError(f"bad config at `dataset`: {error}") from error
    pretrained = cfg.get("vae", {}).get("pretrained")
    if pretrained:
        missing = [n for n in ("vae.json", "vae.safetensors") if not Path(pretrained, n).is_file()]
        if missing:
            raise ValueError(
                f"vae.pretrained={pretrained} lacks {missing}: point it at a trained VAE folder "
                "(a run's vae/ or export/)"
            )
    try:
        cache_settings(cfg)
    except ValueError as error:
        raise ValueError(f"bad config at `cache`: {error}") from error
    _check_clip_lengths(cfg)


def _check_clip_lengths(cfg: DictConfig) -> None:
    """Curriculum stages against the VAE's clip lengths: a stage alone cannot know them."""
    curriculum = instantiate(cfg.curriculum, _convert_="all")
    try:
        curriculum.check_frames(vae_config_for(cfg).temporal_factor)
    except ValueError as error:
        raise ValueError(f"bad config at `curriculum`: {error}") from error


def _check_node(cfg: DictConfig, key: str) -> None:
    """Build one typed config so its `__post_init__` checks run now, with the key in the message."""
    node = OmegaConf.select(cfg, key)
    try:
        instantiate(node, _convert_="all")
    except InstantiationException as error:
        cause = error.__cause__ if error.__cause__ is not None else error
        raise ValueError(f"bad config at `{key}`: {cause}") from error


def expand_shards(spec: Any) -> list[str]:
    """A glob, a list of globs or paths -> sorted existing shard paths (error if none)."""
    patterns = [spec] if isinstance(spec, str) else list(spec)
    paths = sorted({p for pattern in patterns for p in glob.glob(str(pattern))})
    if not paths:
        raise FileNotFoundError(
            f"no shard matches {patterns}; write shards first (tools/make_shards.py)"
        )
    return paths


def _world_size(trainer_kwargs: dict[str, Any]) -> int | None:
    devices, nodes = trainer_kwargs.get("devices"), trainer_kwargs.get("num_nodes", 1)
    return devices * nodes if isinstance(devices, int) and isinstance(nodes, int) else None


def build_trainer(
    cfg: DictConfig, run_dir: Path, max_steps: int, extra_callbacks: list[L.Callback]
) -> L.Trainer:
    """Trainer with TensorBoard, periodic checkpoints (keep last k) and progress bars."""
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_kwargs["max_steps"] = max_steps
    checkpoints, plugins = build_checkpointing(
        CheckpointConfig(**cfg.checkpoint),
        run_dir / "checkpoints",
        sharded=cfg.strategy.name in SHARDED,
    )
    progress = (
        [TQDMProgressBar(refresh_rate=5)] if trainer_kwargs.get("enable_progress_bar", True) else []
    )
    guards = (
        [guard_from_config(cfg.get("nonfinite"), run_dir / "checkpoints")]
        if cfg.task == "dit"
        else []
    )
    profiler, timing = _step_timing(cfg, run_dir, trainer_kwargs)
    callbacks = [
        *checkpoints,
        TopologyRecorder(),  # strategy + world size in every checkpoint, for elastic resume
        *progress,
        *guards,
        *extra_callbacks,
        *timing,
        *preemption_callbacks(),
    ]
    logger = TensorBoardLogger(save_dir=str(run_dir), name="tb", version="")
    return L.Trainer(
        default_root_dir=str(run_dir),
        logger=logger,
        callbacks=callbacks,
        profiler=profiler,
        use_distributed_sampler=False,
        plugins=plugins,
        strategy=build_strategy(OmegaConf.to_container(cfg.strategy), _world_size(trainer_kwargs)),
        **trainer_kwargs,
    )


def _step_timing(
    cfg: DictConfig, run_dir: Path, trainer_kwargs: dict[str, Any]
) -> tuple[Any, list[L.Callback]]:
    """Step-time breakdown (`timing`, train/timing.py) unless `trainer.profiler` names another."""
    if trainer_kwargs.get("profiler") is not None:
        log.info("trainer.profiler is set: no step-time breakdown this run")
        return trainer_kwargs.pop("profiler"), []
    trainer_kwargs.pop("profiler", None)
    compiled = cfg.task == "dit" and cfg.dit_train.get("compile", False)
    compile_monitor = [CompileMonitor()] if compiled else []
    profiler, monitor = step_timing(
        OmegaConf.to_container(cfg.get("timing"), resolve=True) if cfg.get("timing") else None,
        run_dir / "step_time.json",
        extra=compile_monitor[0].summary if compiled else None,
    )
    return profiler, [monitor, *compile_monitor]


def _fit(
    trainer: L.Trainer,
    module: L.LightningModule,
    datamodule: L.LightningDataModule,
    run_dir: Path,
    resume_from: str | None = None,
) -> None:
    """Fit from the requested checkpoint or the newest that verifies (weights_only), then save the final one."""
    sharded = trainer.strategy.__class__.__name__ in (
        "CPUCapableDeepSpeedStrategy",
        "ModelParallelStrategy",
    )
    # Any format, converted when this strategy or world size cannot load it (train/elastic.py);
    # files load through AtomicCheckpointIO (verified, weights_only), folders through their own I/O.
    resume = resume_checkpoint(
        resume_from, run_dir / "checkpoints", strategy_name(trainer.strategy), trainer.world_size
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume) if resume else None)
    final = run_dir / "checkpoints" / f"step={trainer.global_step}.ckpt"
    missing = (
        sharded or verify_checkpoint(final) is not None
    )  # never overwrite a good one (keep_last=1 would lose it)
    if trainer.strategy.broadcast(
        missing, src=0
    ):  # rank 0 decides: save_checkpoint has a barrier inside
        trainer.save_checkpoint(final)


def _vae_datamodule(cfg: DictConfig, steps: int) -> VAEDataModule:
    """data.loader=memory: shards held in memory, map-style; stream: webdataset streaming."""
    hp, loader = cfg.vae_train, cfg.data.get("loader", "memory")
    vae = vae_config_for(cfg)
    bad = [t for t in hp.frame_choices if not is_clip_length(t, vae.temporal_factor)]
    if bad:
        raise ValueError(
            f"vae_train.frame_choices {bad} cannot be encoded: the VAE takes clips of "
            f"{clip_lengths_hint(vae.temporal_factor)} frames"
        )
    settings = cache_settings(cfg, vae)
    kwargs = dict(
        batch_size=hp.batch_size,
        crop=hp.crop,
        frame_choices=tuple(hp.frame_choices),
        max_area=settings.max_area,
        multiple=settings.multiple,
        seed=cfg.seed,
        temporal_factor=vae.temporal_factor,
        num_steps=steps,
        num_workers=cfg.data.num_workers,
        val_fraction=cfg.dataset.val_fraction,
        crop_tries=int(hp.get("crop_tries", 1)),
    )
    shards = expand_shards(cfg.data.shards)
    if loader == "stream":
        return StreamingVAEDataModule(
            shards, shuffle_buffer=cfg.data.get("shuffle_buffer", 64), **kwargs
        )
    if loader != "memory":
        raise ValueError(f"data.loader={loader!r} is not one of memory, stream")
    return VAEDataModule(shards, **kwargs)


def _bad_data_monitor(cfg: DictConfig) -> BadDataMonitor:
    return BadDataMonitor(cfg.data.get("max_bad_fraction", 0.05))


def train_vae(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Train the VAE on raw shards; writes run_dir/vae.safetensors + vae.json."""
    vae_cfg = instantiate(cfg.model.vae, _convert_="all")
    hp = cfg.vae_train
    steps = cfg.trainer.get("max_steps") or hp.steps
    module = VAEModule(
        config_to_dict(vae_cfg),
        lr=hp.lr,
        warmup_steps=hp.warmup_steps,
        total_steps=steps,
        l1_weight=hp.l1_weight,
        mse_weight=hp.mse_weight,
        kl_weight=hp.kl_weight,
        sample_posterior=hp.get("sample_posterior", True),
        seed=cfg.seed,
        salience_weight=float(hp.get("salience_weight", 0.0)),
    )
    datamodule = _vae_datamodule(cfg, steps)
    trainer = build_trainer(cfg, run_dir, steps, [ThroughputMonitor(), _bad_data_monitor(cfg)])
    _fit(trainer, module, datamodule, run_dir, cfg.checkpoint.get("resume_from"))
    save_module(module.vae, vae_cfg, run_dir, "vae", {"steps": trainer.global_step})
    return {
        "task": "vae",
        "steps": trainer.global_step,
        "weights": str(run_dir / "vae.safetensors"),
        "final_loss": float(trainer.callback_metrics.get("train/loss", float("nan"))),
    }


def _dit_meta(
    vae_dir: str, vae: VideoVAE, vae_hash: str, text_cfg: Any, cache_meta: dict
) -> dict[str, Any]:
    """What sampling needs besides the DiT weights: where the VAE is, the text encoder, latent stats."""
    return {
        "vae_dir": str(Path(vae_dir).resolve()),
        "text": config_to_dict(text_cfg),
        "latent_mean": cache_meta["latent_mean"],
        "latent_std": cache_meta["latent_std"],
        "spatial_factor": vae.config.spatial_factor,
        "temporal_factor": vae.config.temporal_factor,
        "cache_key": cache_meta["key"],
        "vae_hash": vae_hash,
    }


def _preview_logger(cfg: DictConfig, dit_cfg: DiTConfig, vae: VideoVAE) -> VideoSampleLogger:
    """Preview videos as `sampling` says; a size the models cannot tile fails now, not mid-run."""
    sampling = SamplingConfig.from_config(cfg.sampling)
    hp = cfg.dit_train
    if hp.sample_every_n_steps > 0:
        try:
            latent_shape(
                sampling,
                channels=dit_cfg.in_channels,
                spatial_factor=vae.config.spatial_factor,
                temporal_factor=vae.config.temporal_factor,
                patch=tuple(dit_cfg.patch_size),
            )
        except ValueError as error:
            raise ValueError(f"bad config at `sampling` for previews: {error}") from error
    return VideoSampleLogger(
        list(hp.sample_prompts), every_n_steps=hp.sample_every_n_steps, sampling=sampling
    )


def train_dit(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Train the DiT on a latent cache through the curriculum; writes run_dir/final/dit.safetensors (EMA)."""
    dit_cfg = instantiate(cfg.model.dit, _convert_="all")
    curriculum = instantiate(cfg.curriculum, _convert_="all")
    text_cfg = instantiate(cfg.model.text, _convert_="all")
    text = TextEncoder(text_cfg)
    if dit_cfg.text_dim != text.hidden_size:
        raise ValueError(
            f"model.dit.text_dim={dit_cfg.text_dim} but the text encoder gives {text.hidden_size}-d "
            f"states (hidden size x model.text.layers {list(text_cfg.layers)}); set "
            f"model.dit.text_dim={text.hidden_size}"
        )
    vae = load_vae(cfg.data.vae_dir)
    vae_hash = state_dict_hash(vae.state_dict())
    expected = cache_key(vae_hash, text.states_hash(), cache_settings(cfg, vae.config))
    cache_meta = read_cache_meta(cfg.data.cache_dir, expected)
    meta = _dit_meta(cfg.data.vae_dir, vae, vae_hash, text_cfg, cache_meta)
    steps = cfg.trainer.get("max_steps") or curriculum.total_steps
    hp = cfg.dit_train
    module = DiTModule(
        config_to_dict(dit_cfg),
        curriculum.to_dict(),
        seed=cfg.seed,
        flow_cfg=OmegaConf.to_container(hp.flow, resolve=True),
        weight_decay=hp.weight_decay,
        ema_decay=hp.ema_decay,
        meta=meta,
        parallel=OmegaConf.to_container(cfg.strategy, resolve=True),
        compile=bool(hp.get("compile", False)),
        pretrained=cfg.model.get("pretrained"),
        lora=OmegaConf.to_container(cfg.lora, resolve=True) if cfg.get("lora") else None,
    )
    datamodule = DiTDataModule(
        cfg.data.cache_dir,
        curriculum,
        expected_key=expected,
        patch_size=dit_cfg.patch_size,
        spatial_factor=vae.config.spatial_factor,
        temporal_factor=vae.config.temporal_factor,
        seed=cfg.seed,
        caption_probs=dict(cfg.data.caption_probs),
        text_dropout=cfg.data.text_dropout,
        num_steps=steps,
        num_workers=cfg.data.num_workers,
        val_fraction=cfg.dataset.val_fraction,
    )
    samples = _preview_logger(cfg, dit_cfg, vae)
    trainer = build_trainer(
        cfg,
        run_dir,
        steps,
        [
            ThroughputMonitor(),
            samples,
            ValidationLoss(
                hp.get("val_every_n_steps", 0),
                max(stage.token_budget for stage in curriculum.stages),
                seed=cfg.seed,
            ),
            ShardReport(run_dir / "sharding"),
            *([DataLedger(run_dir / "data_ledger")] if hp.get("data_ledger") else []),
            _bad_data_monitor(cfg),
        ],
    )
    _fit(trainer, module, datamodule, run_dir, cfg.checkpoint.get("resume_from"))
    extra = {"meta": meta, "steps": trainer.global_step}
    if module.lora.enabled:  # adapters only; `sora-sample ckpt=RUN/final` merges them into the base
        weights = save_lora_final(
            module.ema,
            module.lora,
            cfg.model.pretrained,
            run_dir / "final",
            extra,
            write=trainer.is_global_zero,
        )
    else:
        ema = DiT(dit_cfg)  # gathered from ZeRO-3 partitions / FSDP2 shards (else a copy)
        ema.load_state_dict(gathered_state_dict(module.ema))
        weights = run_dir / "final" / "dit.safetensors"
        if trainer.is_global_zero:
            save_module(ema, dit_cfg, run_dir / "final", "dit", extra)
    return {
        "task": "dit",
        "steps": trainer.global_step,
        "weights": str(weights),
        "final_loss": float(trainer.callback_metrics.get("train/loss", float("nan"))),
    }


def train(cfg: DictConfig) -> dict[str, Any]:
    """Validate, seed, and train the configured task in `cfg.run_dir`; returns a summary."""
    validate(cfg)
    if cfg.task == "cache":  # writes only into data.cache_dir
        return build_cache(cfg)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with hold_run_lock(run_dir, "sora-train"):  # a second run on run_dir is refused, naming us
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        L.seed_everything(cfg.seed, workers=True)
        return train_vae(cfg, run_dir) if cfg.task == "vae" else train_dit(cfg, run_dir)


@hydra.main(config_path=CONFIG_PATH, config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Console entry point `sora-train`."""
    if cfg.launcher.name == "slurm":
        validate(cfg)  # before anything is queued
        summary = launch_training(cfg, train)
    elif cfg.launcher.name == "local":
        summary = train_in_job(cfg, train)  # SIGTERM/SIGUSR2: checkpoint at a step, exit
    else:
        raise ValueError(f"launcher={cfg.launcher.name!r} is not one of local, slurm")
    print(summary)


if __name__ == "__main__":
    main()
