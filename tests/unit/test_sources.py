"""Data sources, the held-out split, step fitting and run-folder ownership (no training)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from sora_lightning.data.sources import DatasetConfig, is_held_out
from sora_lightning.pipeline.ownership import NotOurs, RunFolder
from sora_lightning.pipeline.steps import steps_for
from sora_lightning.train.cache import cache_settings
from sora_lightning.train.main import validate


def compose_pipeline(*overrides: str):
    with initialize_config_module("sora_lightning.conf", version_base="1.3"):
        return compose("pipeline", overrides=["experiment=tiny", *overrides])


def test_held_out_split_is_by_key_stable_and_near_the_fraction() -> None:
    keys = [f"clip_{i:05d}" for i in range(4000)]
    held = [k for k in keys if is_held_out(k, 0.1)]
    assert 0.08 < len(held) / len(keys) < 0.12
    assert held == [k for k in keys if is_held_out(k, 0.1)]  # a pure function of the key
    assert set(held) <= {k for k in keys if is_held_out(k, 0.2)}  # grows, never reshuffles
    assert not any(is_held_out(k, 0.0) for k in keys)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"name": "youtube"}, "is not one of"),
        ({"name": "folder", "path": "/no/such/folder"}, "is not a folder"),
        ({"name": "manifest", "path": "/no/such.csv"}, "is not a file"),
        ({"name": "shards", "path": "/no/such/*.tar"}, "matches no file"),
        ({"name": "world", "val_fraction": 1.0}, "val_fraction"),
        ({"name": "world", "colour": 1}, "unknown dataset keys"),
    ],
)
def test_bad_dataset_config_is_named(values: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DatasetConfig.from_config(values)


def test_bad_dataset_is_rejected_by_validate_before_work(tmp_path: Path) -> None:
    cfg = compose_pipeline("dataset=folder", f"dataset.path={tmp_path / 'missing'}")
    with pytest.raises(ValueError, match="bad config at `dataset`"):
        validate(OmegaConf.merge(cfg, {"task": "vae", "data": {"shards": "x"}}))


def test_cache_settings_are_derived_from_the_models() -> None:
    settings = cache_settings(compose_pipeline())
    assert (settings.multiple, settings.max_frames) == (8, 17)  # 4x VAE x 2x2 patch; curriculum
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        cache_settings(compose_pipeline("cache.max_frames=16"))
    with pytest.raises(ValueError, match="multiple of VAE spatial factor"):
        cache_settings(compose_pipeline("cache.multiple=12"))


def test_steps_follow_the_source_and_a_pretrained_vae(tmp_path: Path) -> None:
    (tmp_path / "a.tar").write_bytes(b"")
    vae = tmp_path / "vae"
    vae.mkdir()
    cfg = compose_pipeline(
        "dataset=shards", f"dataset.path={tmp_path}/*.tar", f"+vae.pretrained={vae}"
    )
    steps = {s.name: s for s in steps_for(cfg)}
    assert "vae" not in steps and steps["cache"].inputs == ("shards",)
    assert steps["shards"].outputs == ("shards/summary.json",)
    command = steps["cache"].command(cfg, tmp_path / "run", [])
    assert f"data.vae_dir='{vae.resolve()}'" in command


def test_run_folder_refuses_what_it_did_not_write(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "shards").mkdir(parents=True)
    (run / "shards" / "mine.tar").write_bytes(b"user data")
    (run / "empty").mkdir()
    with pytest.raises(NotOurs, match="mine.tar"):
        RunFolder(run).claim(["shards", "vae"])
    assert (run / "shards" / "mine.tar").read_bytes() == b"user data"
    RunFolder(run).claim(["vae", "empty", "logs"])  # absent or empty: claimed
    (run / "vae").mkdir()
    (run / "vae" / "vae.json").write_text("{}")
    RunFolder(run).claim(["vae"])  # ours now: may be rewritten
    assert RunFolder(run).owned() == {"vae", "empty", "logs"}
