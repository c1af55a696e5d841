"""`model=wan2_1_1_3b` / `model=wan2_1_14b`: one choice selects Wan's DiT, VAE and UMT5 together.

The top-level `model` group (conf/model/*.yaml) overrides the three sub-groups; `model/dit=...`
still works on its own and beats the preset, and the preset beats an experiment's model choices
(an experiment keeps its curriculum, run_dir and the rest).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from sora_lightning.config import CONFIG_MODULE

WAN = {
    "wan2_1_1_3b": {"model/dit": "wan2_1_1_3b", "model/vae": "wan2_1", "model/text": "umt5"},
    "wan2_1_14b": {"model/dit": "wan2_1_14b", "model/vae": "wan2_1", "model/text": "umt5"},
}


def compose_model(*overrides: str, name: str = "train"):
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        return compose(name, overrides=list(overrides))


def model_node(cfg) -> dict:
    return {key: OmegaConf.to_container(cfg.model[key]) for key in ("dit", "vae", "text")}


@pytest.mark.parametrize("preset", sorted(WAN))
@pytest.mark.parametrize("name", ["train", "pipeline"])
def test_model_preset_selects_the_three_groups(preset: str, name: str) -> None:
    chosen = compose_model(f"model={preset}", name=name)
    by_group = compose_model(*(f"{g}={o}" for g, o in WAN[preset].items()), name=name)
    assert model_node(chosen) == model_node(by_group)
    assert chosen.model.vae.kind == "wan2.1" and chosen.model.text.model_type == "umt5"
    assert chosen.model.dit.text_dim == 4096  # UMT5-XXL's width, which the DiT reads


def test_default_model_is_unchanged_and_sub_groups_still_work() -> None:
    default = compose_model()
    assert default.model.dit.hidden_size != 1536 and "kind" not in default.model.vae
    tiny = compose_model("model/dit=tiny")
    assert tiny.model.dit == compose_model("experiment=tiny").model.dit
    mixed = compose_model("model=wan2_1_1_3b", "model/dit=wan2_1_14b")  # the sub-group wins
    assert mixed.model.dit.hidden_size == 5120 and mixed.model.vae.kind == "wan2.1"
    field = compose_model("model=wan2_1_14b", "model.dit.depth=2")
    assert (field.model.dit.depth, field.model.dit.hidden_size) == (2, 5120)


@pytest.mark.parametrize("order", [0, 1])
def test_model_preset_wins_over_an_experiments_models(order: int) -> None:
    overrides = ["experiment=tiny", "model=wan2_1_1_3b"]
    cfg = compose_model(*(overrides if order == 0 else overrides[::-1]), name="pipeline")
    assert model_node(cfg) == model_node(compose_model("model=wan2_1_1_3b", name="pipeline"))
    assert cfg.run_dir == "runs/tiny"
    assert cfg.curriculum == compose_model("experiment=tiny").curriculum


def test_unknown_model_names_the_choices() -> None:
    with pytest.raises(Exception, match="wan2_1_14b"):
        compose_model("model=wan2_2")


@pytest.mark.slow  # a process start (~8 s here); the compose tests above parse the same overrides
def test_command_line_spelling() -> None:
    """What a user types: sora-train (the same module) with `model=` and no `+`."""
    command = [sys.executable, "-m", "sora_lightning.train.main", "model=wan2_1_14b"]
    result = subprocess.run(
        [*command, "--cfg", "job", "--package", "model"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    printed = OmegaConf.create(result.stdout)
    assert printed.dit.hidden_size == 5120 and printed.text.model_type == "umt5"


def test_a_conditioning_stage_on_wan_text_to_video_is_refused_before_work() -> None:
    from sora_lightning.train.main import validate

    overrides = ["model=wan2_1_1_3b", "task=dit", "data.cache_dir=c", "data.vae_dir=v"]
    with pytest.raises(ValueError, match=r"curriculum.stages.1.cond_probability=0"):
        validate(compose_model(*overrides))  # the demo curriculum keeps frames in stage 1
    stages = [f"curriculum.stages.{i}.cond_probability=0" for i in (1, 2)]
    validate(compose_model(*overrides, *stages))
