"""A LoRA fine-tune (`model.pretrained=EXPORT lora.rank=4`) under DDP, DeepSpeed ZeRO-3 and FSDP2,
two real processes each (gloo on CPU), through `sora-train`.

The base is the tiny DiT preset saved as an export. Each strategy runs 4 steps uninterrupted and
again from the step-2 checkpoint alone (the base comes from `model.pretrained` again): the resumed
run must log the same losses and end with bit-identical EMA adapters. Checkpoints hold adapters,
not the base, in each format (.ckpt, DCP folder, ZeRO-3 folder); `sora-sample ckpt=RUN/final`
samples with the adapters merged into the base.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from tiny_runs import scalars

from sora_lightning.config import CONFIG_MODULE
from sora_lightning.models.dit import DiT
from sora_lightning.train.export import _load_zero3, read_dcp_metadata
from sora_lightning.train.lora import EMA_CLIENT_KEY, LORA_META, LORA_WEIGHTS, is_adapter_key
from sora_lightning.train.weights import save_module

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
BIN = Path(sys.executable).parent
STEPS = 4
STRATEGIES = ("ddp", "deepspeed_zero3", "fsdp2")


def run(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(args, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, (
        f"{args} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    )
    return result


@pytest.fixture(scope="module")
def base(tiny_cache_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny DiT preset with random weights (none zero), saved as the export a fine-tune
    starts from."""
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        cfg = compose("train", overrides=["experiment=tiny"])
    torch.manual_seed(7)
    dit = DiT(instantiate(cfg.model.dit, _convert_="all"))
    with torch.no_grad():  # a fresh DiT's zero-initialised gates would pass the blocks no gradient
        for param in dit.parameters():
            param.add_(0.05 * torch.randn_like(param))
    export = tmp_path_factory.mktemp("lora") / "base"
    save_module(dit, dit.config, export, "dit", {"meta": {}})
    return export


def train(cache_run: Path, base: Path, run_dir: Path, strategy: str) -> Path:
    run(
        [
            str(BIN / "sora-train"),
            "experiment=tiny",
            "task=dit",
            f"run_dir={run_dir}",
            f"data.cache_dir={cache_run / 'cache'}",
            f"data.vae_dir={cache_run / 'vae'}",
            f"model.pretrained={base}",
            "lora.rank=4",
            "trainer.devices=2",
            f"strategy={strategy}",
            f"trainer.max_steps={STEPS}",
            "checkpoint.every_n_steps=2",
            "checkpoint.keep_last=3",
            "dit_train.sample_every_n_steps=0",
            "trainer.deterministic=true",
            "trainer.enable_progress_bar=false",
        ]
    )
    return run_dir


@pytest.fixture(scope="module")
def runs(tiny_cache_run: Path, base: Path) -> dict[str, tuple[Path, Path]]:
    """strategy -> (uninterrupted run, run resumed from the other's step-2 checkpoint)."""
    out = {}
    for strategy in STRATEGIES:
        whole = train(tiny_cache_run, base, base.parent / strategy, strategy)
        resumed = base.parent / f"{strategy}_resumed"
        shutil.copytree(
            whole / "checkpoints",
            resumed / "checkpoints",
            ignore=shutil.ignore_patterns(f"step={STEPS}.*"),
        )
        out[strategy] = (whole, train(tiny_cache_run, base, resumed, strategy))
    return out


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_resume_gives_bit_identical_adapters(
    runs: dict[str, tuple[Path, Path]], strategy: str
) -> None:
    whole, resumed = runs[strategy]
    expected = safetensors.torch.load_file(str(whole / "final" / LORA_WEIGHTS))
    actual = safetensors.torch.load_file(str(resumed / "final" / LORA_WEIGHTS))
    assert expected.keys() == actual.keys() and all(is_adapter_key(k) for k in expected)
    for key in expected:
        assert torch.equal(expected[key], actual[key]), f"{key} differs after resume"
    assert any(".lora_B." in k and expected[k].abs().max() > 0 for k in expected), "nothing trained"
    losses = dict(scalars(whole, "train/loss"))
    assert sorted(losses) == list(range(STEPS))
    for step, value in scalars(resumed, "train/loss"):
        assert value == losses[step], f"step {step}: {value!r} != {losses[step]!r}"


def saved_model_keys(checkpoint: Path) -> list[str]:
    """Names of the model tensors a checkpoint holds: .ckpt file, DCP folder or ZeRO-3 folder."""
    if checkpoint.is_file():
        return list(torch.load(checkpoint, weights_only=True)["state_dict"])
    if (checkpoint / ".metadata").is_file():
        names = read_dcp_metadata(checkpoint).state_dict_metadata
        return [k.removeprefix("state_dict.") for k in names if k.startswith("state_dict.")]
    state, extras = _load_zero3(checkpoint)  # the optimizer's fp32 partitions + frozen fragments
    assert extras[EMA_CLIENT_KEY] and all(is_adapter_key(k) for k in extras[EMA_CLIENT_KEY])
    return list(state)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_checkpoints_hold_adapters_not_the_base(
    runs: dict[str, tuple[Path, Path]], base: Path, strategy: str
) -> None:
    checkpoint = runs[strategy][0] / "checkpoints" / f"step={STEPS}.ckpt"
    keys = saved_model_keys(checkpoint)
    assert keys and all(is_adapter_key(k) for k in keys), [k for k in keys if not is_adapter_key(k)]
    # adapters of the DiT and the EMA with AdamW's two moments, plus per-tensor overhead
    assert tree_bytes(checkpoint) < (base / "dit.safetensors").stat().st_size


def test_sora_sample_loads_base_plus_adapters(runs: dict[str, tuple[Path, Path]]) -> None:
    final = runs["ddp"][0] / "final"
    assert (final / LORA_META).is_file() and not (final / "dit.safetensors").exists()
    out = final.parent / "samples"
    run(
        [
            str(BIN / "sora-sample"),
            f"ckpt={final}",
            f"out_dir={out}",
            "prompts=['a red circle moves left']",
            "sampling.frames=5",
            "sampling.height=16",
            "sampling.width=16",
            "sampling.steps=2",
        ]
    )
    assert (out / "000.mp4").stat().st_size > 0
