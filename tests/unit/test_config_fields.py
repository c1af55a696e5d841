"""Configs normalise their own fields: a dict from YAML or JSON (lists, not tuples) goes straight in."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from sora_lightning.models.dit import DiTConfig
from sora_lightning.models.text import TextEncoderConfig
from sora_lightning.models.vae import VAEConfig
from sora_lightning.train.curriculum import Curriculum, Stage

CONFIGS = {
    "vae": VAEConfig(channel_mults=(1, 2, 2), temporal_downsample=(True, False)),
    "dit": DiTConfig(patch_size=(1, 2, 2), hidden_size=64, num_heads=4),
    "text": TextEncoderConfig(layers=(0, -1)),
    "stage": Stage("clips", 2, frames=(5, 9)),
}


def _through_json(config: Any) -> dict[str, Any]:
    """The dict a saved config comes back as: every tuple is a list."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_saved_dict_goes_straight_back_in(name: str) -> None:
    config = CONFIGS[name]
    loaded = type(config)(**_through_json(config))
    assert loaded == config
    tuple_fields = [f.name for f in dataclasses.fields(config) if "tuple" in str(f.type)]
    assert tuple_fields and all(isinstance(getattr(loaded, f), tuple) for f in tuple_fields)


def test_curriculum_takes_stage_dicts() -> None:
    curriculum = Curriculum(stages=[_through_json(CONFIGS["stage"])], warmup_steps=1)
    assert curriculum.stages == [CONFIGS["stage"]]
    assert Curriculum(**json.loads(json.dumps(curriculum.to_dict()))) == curriculum
