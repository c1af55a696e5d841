"""The pipeline as named steps with declared inputs and outputs.

Each step is one command (so the local runner and SLURM run the very same thing) that reads the
outputs of its input steps from the run folder. A finished step leaves a manifest of its output
files' hashes; a step whose manifest verifies is skipped on re-run. Steps that work shard by shard
(writing shards, caching latents) also say how to run as P array tasks plus a merge: the SLURM
runner uses that, and the merged outputs equal the single command's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from sora_lightning.data.captioning import CaptionConfig
from sora_lightning.data.sources import DatasetConfig
from sora_lightning.diffusion.sampling import SamplingConfig
from sora_lightning.models.text import TextEncoderConfig
from sora_lightning.sample.expand import ExpanderConfig
from sora_lightning.sample.provenance import ProvenanceConfig
from sora_lightning.sample.safety import SafetyConfig
from sora_lightning.train.weights import read_module_meta
from sora_lightning.utils import file_sha256

Command = Callable[[DictConfig, Path, list[str]], list[str]]
"""(cfg, run_dir, the user's overrides) -> the step's command line."""
PartCommand = Callable[[DictConfig, Path, list[str], int], list[str]]
"""(cfg, run_dir, overrides, num_parts) -> the command of every array task; each task's part
index comes from $SLURM_ARRAY_TASK_ID, which both sharded CLIs read when no part is given."""
MergeCommand = Callable[[DictConfig, Path, list[str]], list[str]]


@dataclass
class Step:
    """One resumable unit of the job."""

    name: str
    inputs: tuple[str, ...]
    """Names of the steps whose outputs this step reads."""
    outputs: tuple[str, ...]
    """Files (relative to the run folder, globs allowed) that prove the step finished."""
    command: Command = field(repr=False)
    part_command: PartCommand | None = field(default=None, repr=False)
    """Set for steps that can run as a job array over parts (with `merge_command` after)."""
    merge_command: MergeCommand | None = field(default=None, repr=False)
    """Combines the parts' files into the step's declared outputs."""

    @property
    def splits_into_parts(self) -> bool:
        return self.part_command is not None and self.merge_command is not None

    @property
    def writes(self) -> str:
        """The top-level name in the run folder that this step writes into (its own folder)."""
        return self.name

    def manifest_path(self, run_dir: Path) -> Path:
        return run_dir / "steps" / f"{self.name}.json"

    def output_files(self, run_dir: Path) -> list[Path]:
        """Existing files matching the declared outputs (each pattern must match at least one)."""
        files: list[Path] = []
        for pattern in self.outputs:
            matches = sorted(run_dir.glob(pattern))
            if not matches:
                return []
            files.extend(m for m in matches if m.is_file())
        return files


PY = [sys.executable, "-m"]


def hydra_value(value: object) -> str:
    """A value quoted for a Hydra command-line override (paths may hold spaces, = or commas)."""
    text = str(value).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{text}'"


def absolute(path: object) -> Path:
    """A user-given path as the absolute path every step process sees (`~` expanded)."""
    return Path(str(path)).expanduser().resolve()


def dataset_config(cfg: DictConfig) -> DatasetConfig:
    """The typed `dataset` node (checked: a bad source or a missing input fails here)."""
    return DatasetConfig.from_config(cfg.dataset)


def shard_spec(cfg: DictConfig, run: Path) -> str:
    """Glob of the shards the VAE and cache read: the run's own, or `dataset=shards` in place."""
    dataset = dataset_config(cfg)
    if dataset.writes_shards:
        return str(run / "shards" / "*.tar")
    return str(absolute(dataset.path))


EXPORT_FILES = ("dit.json", "dit.safetensors", "vae.json", "vae.safetensors")
"""What `model.pretrained=EXPORT` must hold: the DiT it starts from and the VAE it was trained on."""


def pretrained_export(cfg: DictConfig) -> Path | None:
    """`model.pretrained`: the export the DiT fine-tunes from (absolute), or None."""
    value = (cfg.get("model") or {}).get("pretrained")
    return absolute(value) if value else None


def pretrained_vae(cfg: DictConfig) -> Path | None:
    """The VAE folder that replaces the vae step: `vae.pretrained`, else the `model.pretrained`
    export's own VAE (a DiT is fine-tuned on the latents of the VAE it learned); None: the run
    trains one. The one rule for skipping the vae step and for every later step's VAE."""
    value = (cfg.get("vae") or {}).get("pretrained")
    return absolute(value) if value else pretrained_export(cfg)


def vae_dir(cfg: DictConfig, run: Path) -> Path:
    """The VAE every later step uses: `pretrained_vae`, else the one this run trains."""
    return pretrained_vae(cfg) or run / "vae"


def _override_value(value: object) -> str:
    """A JSON-like value (meta.text's fields) as a Hydra override value."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list | tuple):
        return f"[{','.join(_override_value(v) for v in value)}]"
    return hydra_value(value)


def export_text(export: Path) -> dict[str, object]:
    """The text encoder an export's DiT was trained with (dit.json's meta.text), its folder the
    export's own text_encoder/ when it carries one (an export may be moved after import)."""
    meta = read_module_meta(export, "dit").get("meta") or {}
    fields = {f.name for f in dataclasses.fields(TextEncoderConfig)}
    text = {k: v for k, v in (meta.get("text") or {}).items() if k in fields}
    if (export / "text_encoder").is_dir():
        text["path"] = str(export / "text_encoder")
    return text


def text_overrides(cfg: DictConfig) -> list[str]:
    """`model.pretrained`: `model.text` set to the export's text encoder, so the cache and dit
    steps encode captions as the DiT learned them (`++`: not every preset has every field)."""
    export = pretrained_export(cfg)
    if export is None:
        return []
    return [f"++model.text.{k}={_override_value(v)}" for k, v in export_text(export).items()]


def check_pretrained(cfg: DictConfig) -> None:
    """Refuse a `model.pretrained` export that lacks a file the steps read, naming it and the fix
    (before any step runs, not hours later in the dit step)."""
    export = pretrained_export(cfg)
    if export is None:
        return
    fix = (
        f"import one with `python tools/import_weights.py --diffusers WAN_DIFFUSERS_DIR --output "
        f"{export}`, or point model.pretrained at a run's export/ folder"
    )
    missing = [name for name in EXPORT_FILES if not (export / name).is_file()]
    if missing:
        raise ValueError(f"model.pretrained={export} lacks {missing}: {fix}")
    vae = pretrained_vae(cfg)
    if vae != export:
        raise ValueError(
            f"model.pretrained={export} carries its VAE, but vae.pretrained={vae} names another: "
            "the DiT must train on the latents of its own VAE; drop vae.pretrained"
        )
    path = export_text(export).get("path")
    folder = Path(str(path)) if path else None
    if folder is not None and not _is_text_encoder(folder):
        raise ValueError(
            f"model.pretrained={export}: its text encoder {folder} (dit.json meta.text.path) holds "
            f"no config.json (nor text_encoder/config.json and tokenizer/): {fix}, without "
            "--reference-text-encoder so the export carries the encoder"
        )


def _is_text_encoder(folder: Path) -> bool:
    """A model folder, or a diffusers pipeline folder holding text_encoder/ and tokenizer/."""
    nested = (folder / "text_encoder" / "config.json").is_file() and (folder / "tokenizer").is_dir()
    return (folder / "config.json").is_file() or nested


def cache_dir(cfg: DictConfig, run: Path) -> Path:
    """The latent cache later steps read: `cache.reuse`, else the one this run builds."""
    reuse = cfg.cache.get("reuse")
    return absolute(reuse) if reuse else run / "cache"


def _shards(cfg: DictConfig, run: Path, _: list[str]) -> list[str]:
    dataset = dataset_config(cfg)
    out = ["--output", str(run / "shards")]
    if not dataset.writes_shards:
        return [*PY, "sora_lightning.data.sources", "--index-shards", str(dataset.path), *out]
    common = [*out, "--max-count", str(dataset.shard_max_count), "--workers", str(dataset.workers)]
    common += ["--overwrite"]  # safe: the run folder's shards/ is the pipeline's own (ownership.py)
    common += [] if dataset.full_decode else ["--quick"]
    source = {
        "world": ["--world-clips", str(dataset.clips), "--world-images", str(dataset.images)],
        "folder": ["--input", str(absolute(dataset.path))],
        "manifest": ["--manifest", str(absolute(dataset.path))],
    }[dataset.name]
    seed = ["--seed", str(dataset.seed)] if dataset.name == "world" else []
    if dataset.name == "world":
        seed += ["--world-max-objects", str(dataset.max_objects)]
        seed += ["--world-speed-scale", str(dataset.speed_scale)]
        if dataset.path_spread is not None:  # the default run's command (and step hash) stays
            seed += ["--world-path-spread", str(dataset.path_spread)]
        if dataset.captions != "full":  # the default run's command (and step hash) stays as it was
            seed += ["--world-captions", dataset.captions]
            seed += ["--world-labelled-fraction", str(dataset.labelled_fraction)]
        if dataset.clip_lengths:
            seed += ["--world-clip-lengths", ",".join(map(str, dataset.clip_lengths))]
    return [*PY, "sora_lightning.data.ingest", *source, *seed, *common]


def _shards_part(cfg: DictConfig, run: Path, _: list[str], num_parts: int) -> list[str]:
    return [*_shards(cfg, run, []), "--no-progress", "--num-parts", str(num_parts)]


def _shards_merge(cfg: DictConfig, run: Path, _: list[str]) -> list[str]:
    return [*PY, "sora_lightning.data.ingest", "--merge-summaries", "--output", str(run / "shards")]


def caption_config(cfg: DictConfig) -> CaptionConfig:
    """The typed `caption` node (recaptioning off when the config has none)."""
    return CaptionConfig.from_config(cfg.get("caption"))


def _captions_dir(cfg: DictConfig, run: Path) -> list[str]:
    """The cache and dit steps read the caption step's captions (their cache key covers them)."""
    if not caption_config(cfg).enabled:
        return []
    return [f"data.captions_dir={hydra_value(run / 'caption')}"]


def _caption(cfg: DictConfig, run: Path, _: list[str]) -> list[str]:
    """The VLM captions every shard into RUN/caption (sidecar files: shards stay untouched)."""
    out = ["--shards", shard_spec(cfg, run), "--output", str(run / "caption")]
    return [*PY, "sora_lightning.data.captioning", *out, *caption_config(cfg).as_args()]


def _caption_part(cfg: DictConfig, run: Path, _: list[str], num_parts: int) -> list[str]:
    return [*_caption(cfg, run, []), "--num-parts", str(num_parts)]


def _caption_merge(cfg: DictConfig, run: Path, _: list[str]) -> list[str]:
    return [*_caption(cfg, run, []), "--merge"]


def _train(overrides: list[str], *args: str) -> list[str]:
    return [*PY, "sora_lightning.train.main", *overrides, *args]


def _vae(cfg: DictConfig, run: Path, overrides: list[str]) -> list[str]:
    shards = hydra_value(shard_spec(cfg, run))
    return _train(
        overrides, "task=vae", f"run_dir={hydra_value(run / 'vae')}", f"data.shards={shards}"
    )


def _cache(cfg: DictConfig, run: Path, overrides: list[str]) -> list[str]:
    return _train(
        overrides,
        "task=cache",
        f"data.shards={hydra_value(shard_spec(cfg, run))}",
        f"data.vae_dir={hydra_value(vae_dir(cfg, run))}",
        f"data.cache_dir={hydra_value(run / 'cache')}",
        *_captions_dir(cfg, run),
        *text_overrides(cfg),
    )


def _cache_part(cfg: DictConfig, run: Path, overrides: list[str], num_parts: int) -> list[str]:
    return [*_cache(cfg, run, overrides), f"cache.num_parts={num_parts}"]


def _cache_merge(cfg: DictConfig, run: Path, overrides: list[str]) -> list[str]:
    return [*_cache(cfg, run, overrides), "cache.merge=true"]


def _dit(cfg: DictConfig, run: Path, overrides: list[str]) -> list[str]:
    return _train(
        overrides,
        "task=dit",
        f"run_dir={hydra_value(run / 'dit')}",
        *_captions_dir(cfg, run),
        f"data.cache_dir={hydra_value(cache_dir(cfg, run))}",
        f"data.vae_dir={hydra_value(vae_dir(cfg, run))}",
        *text_overrides(cfg),
    )


def _prompt_source(cfg: DictConfig, run: Path) -> list[str]:
    """samples.prompts, else the dataset's own example prompts, else held-out captions."""
    prompts = cfg.samples.get("prompts") or dataset_config(cfg).prompts
    if prompts:
        return [f"prompts=[{','.join(hydra_value(p) for p in prompts)}]"]
    return [
        f"prompts_from_cache={hydra_value(cache_dir(cfg, run))}",
        f"num_prompts={cfg.samples.get('num_prompts', 4)}",
        f"val_fraction={dataset_config(cfg).val_fraction}",
    ]


def prompt_expander(cfg: DictConfig, run: Path) -> ExpanderConfig:
    """The samples and eval steps' prompt expander: `prompt_expander` as chosen; unset, the
    world's rules for dataset=world and none for other data (the world's grammar means nothing to
    their captions). An llm expander given no examples is shown the run's own training captions."""
    node = cfg.get("prompt_expander")
    if node is None:
        return ExpanderConfig(name="world" if dataset_config(cfg).name == "world" else "none")
    config = ExpanderConfig.from_config(OmegaConf.to_container(node, resolve=True))
    if config.name == "llm" and not config.examples and not config.examples_from_cache:
        fraction = dataset_config(cfg).val_fraction
        config = replace(
            config, examples_from_cache=str(cache_dir(cfg, run)), val_fraction=fraction
        )
    return config


def _expand(cfg: DictConfig, run: Path) -> list[str]:
    """`prompt_expander` as overrides for sora-sample and sora-eval (one rule for both steps)."""
    return prompt_expander(cfg, run).as_overrides()


def _samples(cfg: DictConfig, run: Path, _: list[str]) -> list[str]:
    """sora-sample with the run's `sampling` node, every field passed on (checked here first)."""
    return [
        *PY,
        "sora_lightning.sample.main",
        f"ckpt={hydra_value(run / 'dit' / 'final')}",
        f"out_dir={hydra_value(run / 'samples')}",
        *_prompt_source(cfg, run),
        *_expand(cfg, run),
        *SamplingConfig.from_config(cfg.sampling).as_overrides(),
        *_signing(cfg),
    ]


def _eval(cfg: DictConfig, run: Path, _: list[str]) -> list[str]:
    """sora-eval with the same `sampling` node as the samples step, plus `eval.num_seeds`."""
    dataset = dataset_config(cfg)
    return [
        *PY,
        "sora_lightning.eval.main",
        f"ckpt={hydra_value(run / 'dit' / 'final')}",
        f"out_dir={hydra_value(run / 'eval')}",
        f"cache_dir={hydra_value(cache_dir(cfg, run))}",
        f"shards={hydra_value(shard_spec(cfg, run))}",
        f"val_fraction={dataset.val_fraction}",
        f"world={str(dataset.name == 'world').lower()}",
        *_prompt_source(cfg, run),
        *_expand(cfg, run),
        *SamplingConfig.from_config(cfg.sampling).as_overrides(),
        f"num_seeds={cfg.eval.num_seeds}",
        *_signing(cfg),
    ]


def _signing(cfg: DictConfig) -> list[str]:
    """The run's `provenance` and `safety` nodes, passed on so samples and eval sign and screen."""
    provenance = ProvenanceConfig.from_config(cfg.get("provenance")).as_overrides()
    return [*provenance, *SafetyConfig.from_config(cfg.get("safety")).as_overrides()]


def _export(cfg: DictConfig, run: Path, _: list[str]) -> list[str]:
    """export/ carries the DiT's text encoder (a fine-tune's: the imported export's text_encoder/)
    unless `export.copy_text_encoder=false`, which keeps its path (train/export.py)."""
    carry = (cfg.get("export") or {}).get("copy_text_encoder", True)
    return [
        *PY,
        "sora_lightning.train.export",
        "--dit",
        str(run / "dit" / "final"),
        "--vae",
        str(vae_dir(cfg, run)),
        "--output",
        str(run / "export"),
        *([] if carry else ["--reference-text-encoder"]),  # the default command stays as it was
    ]


STEPS: tuple[Step, ...] = (
    Step(
        "shards",
        (),
        ("shards/summary.json", "shards/*.tar"),
        _shards,
        _shards_part,
        _shards_merge,
    ),
    Step(
        "caption",
        ("shards",),
        ("caption/meta.json", "caption/*.jsonl"),
        _caption,
        _caption_part,
        _caption_merge,
    ),
    Step("vae", ("shards",), ("vae/vae.safetensors", "vae/vae.json"), _vae),
    Step(
        "cache",
        ("shards", "vae"),
        ("cache/meta.json", "cache/latents-*.tar"),
        _cache,
        _cache_part,
        _cache_merge,
    ),
    Step("dit", ("cache", "vae"), ("dit/final/dit.safetensors", "dit/final/dit.json"), _dit),
    Step("samples", ("dit",), ("samples/*.mp4",), _samples),
    Step("eval", ("dit", "cache"), ("eval/eval.json",), _eval),
    Step("export", ("dit", "vae"), ("export/dit.safetensors", "export/vae.safetensors"), _export),
)
"""Every step in pipeline order, before `steps_for` fits them to a config."""
LORA_OUTPUTS = ("dit/final/lora.safetensors", "dit/final/lora.json")
"""A LoRA run's final/: the adapters and their base export's path (train/lora.py)."""


TRAINING_KEYS = ("dataset", "model", "vae", "cache", "curriculum", "seed", "trainer", "strategy")
CONFIG_KEYS: dict[str, tuple[str, ...]] = {
    "shards": ("dataset",),
    "vae": (*TRAINING_KEYS, "vae_train", "checkpoint"),
    "caption": ("dataset", "caption"),
    "cache": (*TRAINING_KEYS, "caption"),
    "dit": (*TRAINING_KEYS, "dit_train", "checkpoint", "nonfinite", "data", "caption", "lora"),
    "samples": ("samples", "sampling", "provenance", "safety", "prompt_expander"),
    "eval": ("eval", "samples", "sampling", "provenance", "safety", "prompt_expander"),
    "export": (),
}
"""The config keys each step's outputs depend on: a finished step whose recorded values of these
differ from the current config is not silently reused (`pipeline.runner.config_changes`)."""


def config_fingerprint(step: Step, cfg: DictConfig) -> dict[str, str]:
    """sha256 of each of the step's CONFIG_KEYS, resolved, as recorded in its manifest."""
    prints = {}
    for key in CONFIG_KEYS[step.name]:
        value = OmegaConf.to_yaml(OmegaConf.create({"v": cfg.get(key)}), resolve=True)
        prints[key] = hashlib.sha256(value.encode()).hexdigest()[:16]
    return prints


def steps_for(cfg: DictConfig | None) -> tuple[Step, ...]:
    """The steps as this config runs them.

    `dataset=shards` reads existing shards in place, so its shards step writes only the index;
    `vae.pretrained=DIR` or `model.pretrained=EXPORT` drops the vae step (later steps read DIR or
    EXPORT instead: `pretrained_vae`); `cache.reuse=DIR` makes the cache step only check DIR's key;
    the caption step runs only with `caption.enabled`, and then the cache step waits for it;
    `lora.rank>0` makes the dit step's final/ the adapters (sampled and exported merged).
    """
    if cfg is None:
        return STEPS
    steps = []
    pretrained = pretrained_vae(cfg) is not None
    recaption = caption_config(cfg).enabled
    for step in STEPS:
        if (step.name == "vae" and pretrained) or (step.name == "caption" and not recaption):
            continue
        if step.name == "cache" and recaption:
            step = replace(step, inputs=(*step.inputs, "caption"))
        if step.name == "shards" and not dataset_config(cfg).writes_shards:
            step = replace(step, outputs=("shards/summary.json",), part_command=None)
            step = replace(step, merge_command=None)
        if step.name == "cache" and cfg.cache.get("reuse"):
            step = replace(step, outputs=("cache/reused.json",), part_command=None)
            step = replace(step, merge_command=None)
        if pretrained and "vae" in step.inputs:
            step = replace(step, inputs=tuple(i for i in step.inputs if i != "vae"))
        if step.name == "dit" and (cfg.get("lora") or {}).get("rank"):
            step = replace(step, outputs=LORA_OUTPUTS)
        steps.append(step)
    return tuple(steps)


def hash_outputs(step: Step, run_dir: Path) -> dict[str, str]:
    """Relative path -> sha256 of every output file of a finished step."""
    return {str(p.relative_to(run_dir)): file_sha256(p) for p in step.output_files(run_dir)}
