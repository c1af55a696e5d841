"""Every config in conf/ composes, and every `_target_` in it instantiates (a bad preset fails here)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from omegaconf import OmegaConf

from sora_lightning.config import CONFIG_MODULE, conf_dir
from sora_lightning.diffusion.sampling import SamplingConfig
from sora_lightning.train.main import validate

CONF_DIR = conf_dir()  # the installed sora_lightning.conf package (conf/ in an editable install)

GROUPS = [
    "dataset",
    "model",  # whole published models (conf/model/*.yaml): dit, vae and text together
    "model/vae",
    "model/dit",
    "model/text",
    "curriculum",
    "strategy",
    "launcher",
    "sampling",
    "experiment",
]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("group", GROUPS)
def test_group_has_presets(group: str) -> None:
    assert options(group), f"conf/{group} is empty"


@pytest.mark.parametrize(("group", "option"), [(g, o) for g in GROUPS for o in options(g)])
def test_every_preset_composes_and_instantiates(group: str, option: str) -> None:
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        cfg = compose("train", overrides=[f"{group}={option}"])
    for node in (cfg.model.vae, cfg.model.dit, cfg.model.text, cfg.curriculum):
        assert instantiate(node, _convert_="all") is not None
    assert OmegaConf.to_yaml(cfg)


@pytest.mark.parametrize("name", ["train", "pipeline", "sample", "eval"])
def test_primary_configs_compose(name: str) -> None:
    overrides = ["ckpt=x"] if name in ("sample", "eval") else ["experiment=demo"]
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        cfg = compose(name, overrides=overrides)
    assert cfg


def test_pipeline_experiment_overrides_pipeline_keys() -> None:
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        cfg = compose("pipeline", overrides=["experiment=tiny"])
    assert cfg.run_dir == "runs/tiny" and cfg.dataset.clips < 100


def test_bad_config_rejected_before_work() -> None:
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        cfg = compose("train", overrides=["task=vae"])
    with pytest.raises(ValueError, match="data.shards"):
        validate(cfg)
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        cfg = compose(
            "train", overrides=["curriculum.stages.0.frames=[2,3]", "task=vae", "data.shards=x"]
        )
    with pytest.raises(ValueError, match="curriculum.*stage 'images'.*1 \\+ 2k"):  # demo VAE: 2x
        validate(cfg)
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        cfg = compose("train", overrides=["task=vae", "data.shards=x", "vae_train.crop_tries=0"])
    with pytest.raises(ValueError, match="vae_train.crop_tries must be >= 1, got 0"):
        validate(cfg)
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        overrides = ["task=vae", "data.shards=x", "vae_train.salience_weight=-1"]
        cfg = compose("train", overrides=overrides)
    with pytest.raises(ValueError, match="vae_train.salience_weight must be >= 0, got -1"):
        validate(cfg)


def test_all_yaml_files_are_covered() -> None:
    covered = {CONF_DIR / f"{n}.yaml" for n in ("train", "pipeline", "sample", "eval")}
    covered |= {CONF_DIR / g / f"{o}.yaml" for g in GROUPS for o in options(g)}
    covered |= {CONF_DIR / g / "default.yaml" for g in ("provenance", "safety")}  # sample/eval
    covered |= {CONF_DIR / "caption" / "default.yaml"}  # pipeline; tests/unit/test_captioning.py
    covered |= set((CONF_DIR / "prompt_expander").glob("*.yaml"))  # tests/unit/test_expand.py
    assert set(Path(CONF_DIR).rglob("*.yaml")) <= covered


@pytest.mark.parametrize("name", ["sample", "eval"])
def test_sampling_entry_points_read_their_options_the_same_way(name: str) -> None:
    """sora-sample and sora-eval build SamplingConfig through one reader from `sampling`."""
    overrides = [
        "ckpt=x",
        "sampling.frames=9",
        "sampling.shift=3.0",
        "sampling.cfg_interval=[0,0.7]",
    ]
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        cfg = compose(name, overrides=[*overrides, "sampling.seed=7"])
    options = SamplingConfig.from_config(cfg.sampling)
    assert (options.frames, options.shift, options.seed) == (9, 3.0, 7)
    assert options.cfg_interval == (0.0, 0.7)
    assert options.cfg_scale == cfg.sampling.cfg_scale and options.sampler == cfg.sampling.sampler
    assert SamplingConfig.from_config({"steps": 3}) == SamplingConfig(steps=3)
    with pytest.raises(ValueError, match="frames must be >= 1"):
        SamplingConfig.from_config({"frames": 0})
    with pytest.raises(ValueError, match="unknown sampling keys \\['frame'\\]"):
        SamplingConfig.from_config({"frame": 9})


def test_one_sampling_config_for_every_entry_point() -> None:
    """Training previews, sora-sample, sora-eval and the pipeline compose the same `sampling`
    node, whose defaults are SamplingConfig's, and an experiment overrides it in one place."""
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        nodes = {
            name: compose(name, overrides=["ckpt=x"] if name in ("sample", "eval") else [])
            for name in ("train", "pipeline", "sample", "eval")
        }
        tiny = compose("pipeline", overrides=["experiment=tiny"])
    configs = {name: SamplingConfig.from_config(cfg.sampling) for name, cfg in nodes.items()}
    assert all(config == SamplingConfig() for config in configs.values()), configs
    assert SamplingConfig.from_config(tiny.sampling).frames == 5
    for cfg in nodes.values():  # no stray copies of sampling keys elsewhere in the config
        stray = {"frames", "steps", "cfg_scale"} & set(cfg) | {
            f"{node}.{key}"
            for node in ("samples", "eval", "dit_train")
            for key in ("frames", "steps", "cfg_scale", "sample_options")
            if key in cfg.get(node, {})
        }
        assert not stray


def test_sampling_overrides_reproduce_the_config() -> None:
    """The pipeline passes `sampling` to its sample and eval steps as command-line overrides."""
    config = SamplingConfig(frames=9, shift=2.5, cfg_interval=(0.1, 0.7), sampler="heun")
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        cfg = compose("sample", overrides=["ckpt=x", *config.as_overrides()])
    assert SamplingConfig.from_config(cfg.sampling) == config


def test_bad_sampling_rejected_at_validation() -> None:
    overrides = ["task=dit", "data.cache_dir=c", "data.vae_dir=v", "sampling.sampler=ddim"]
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    with pytest.raises(ValueError, match="bad config at `sampling`.*ddim"):
        validate(cfg)


def test_eval_prompt_sets_and_a_bad_name_fails_before_loading(tmp_path: Path) -> None:
    from sora_lightning.data.world import eval_prompts, seen_prompts
    from sora_lightning.eval.main import _prompts, run_eval

    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        cfg = compose("eval", overrides=[f"ckpt={tmp_path / 'missing'}"])
        seen = compose("eval", overrides=["ckpt=x", "prompt_set=seen"])
        bad = compose("eval", overrides=[f"ckpt={tmp_path / 'missing'}", "prompt_set=unseen"])
    assert (
        _prompts(cfg.prompt_set) == eval_prompts() and _prompts(seen.prompt_set) == seen_prompts()
    )
    with pytest.raises(ValueError, match="prompt_set='unseen' is not one of"):
        run_eval(bad)  # before the (missing) checkpoint is looked at


def test_training_timestep_config_names_flow_config_fields() -> None:
    """dit_train.flow reaches DiTModule as FlowConfig(**flow): every key must be a field."""
    from sora_lightning.train.dit_module import FlowConfig

    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        cfg = compose("train", overrides=["experiment=demo", "dit_train.flow.logit_mean=-0.5"])
    flow = FlowConfig(**OmegaConf.to_container(cfg.dit_train.flow))
    assert flow.logit_mean == -0.5 and flow == FlowConfig(logit_mean=-0.5)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("+dit_train.flow.logit_mena=-0.5", "logit_mena"),
        ("dit_train.flow.logit_std=0", "logit_std"),
        ("dit_train.flow.motion_weight=-1", "motion_weight"),
        ("dit_train.flow.motion_weight=abc", "motion_weight"),
    ],
)
def test_bad_flow_config_rejected_at_validation(override: str, message: str) -> None:
    """A typo under dit_train.flow fails before any model or data loads, naming the node."""
    overrides = ["task=dit", "data.cache_dir=c", "data.vae_dir=v", override]
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    with pytest.raises(ValueError, match=f"dit_train.flow.*{message}"):
        validate(cfg)


def test_dit_text_dim_must_match_text_layers(tmp_path: Path) -> None:
    """Two text layers widen the states to 768: a 384-d DiT is refused before the VAE loads."""
    from sora_lightning.train.main import train_dit

    overrides = ["task=dit", "data.cache_dir=c", "data.vae_dir=v", "model.text.layers=[0,-1]"]
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    with pytest.raises(ValueError, match="model.dit.text_dim=768"):
        train_dit(cfg, tmp_path)
