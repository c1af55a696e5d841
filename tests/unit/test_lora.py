"""Fine-tuning from an export (`model.pretrained`) and LoRA through peft (train/lora.py).

A tiny DiT saved as an export plays the published base; the adapters are given random values
where a test needs them to matter (peft starts lora_B at zero, so a fresh adapter is a no-op).
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import safetensors.torch
import torch
from hydra import compose, initialize_config_module
from torch import Tensor

from sora_lightning.config import CONFIG_MODULE
from sora_lightning.models.dit import DiT, DiTConfig
from sora_lightning.models.patches import seqlens_to_cu
from sora_lightning.train.curriculum import Curriculum, Stage
from sora_lightning.train.dit_module import DiTModule
from sora_lightning.train.lora import (
    LORA_META,
    LORA_WEIGHTS,
    LoraSettings,
    check_finetune,
    is_adapter_key,
    load_lora_dit,
    save_lora_final,
)
from sora_lightning.train.lora_diffusers import LORA_FILE, save_wan_lora
from sora_lightning.train.main import validate
from sora_lightning.train.weights import config_to_dict, save_module

TINY = DiTConfig(
    in_channels=4, hidden_size=32, depth=2, num_heads=2, text_dim=16, attn_backend="sdpa"
)
WAN_LIKE = DiTConfig(  # the shape of what tools/import_weights.py makes (models.wan)
    in_channels=4,
    hidden_size=24,
    depth=2,
    num_heads=2,
    mlp_hidden_size=32,
    text_dim=16,
    qk_norm_across_heads=True,
    use_conditioning=False,
    time_frequency_dim=32,
)
CURRICULUM = Curriculum(stages=[Stage("a", steps=4)]).to_dict()
LORA = {"rank": 4, "alpha": 8.0}


def make_export(root: Path, config: DiTConfig = TINY, seed: int = 3) -> Path:
    """A random-weight DiT saved as an export folder (what `model.pretrained` points at)."""
    torch.manual_seed(seed)
    dit = DiT(config)
    with torch.no_grad():  # no zero-initialised layer may hide a weight that was not loaded
        for param in dit.parameters():
            param.add_(0.05 * torch.randn_like(param))
    save_module(dit, config, root, "dit", {"meta": {"vae_dir": "/nowhere"}})
    return root


def module(export: Path | None, lora: dict | None = LORA, config: DiTConfig = TINY) -> DiTModule:
    return DiTModule(
        config_to_dict(config), CURRICULUM, pretrained=str(export) if export else None, lora=lora
    )


def batch(config: DiTConfig, seed: int = 0) -> tuple[Tensor, ...]:
    """One packed sample of 8 tokens and 3 text tokens."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randn(8, config.patch_dim, generator=generator)
    text = torch.randn(3, config.text_dim, generator=generator)
    return (
        tokens,
        seqlens_to_cu([8]),
        torch.tensor([[2, 2, 2]]),
        torch.tensor([0.7]),
        text,
        seqlens_to_cu([3]),
    )


def randomize_adapters(model: torch.nn.Module, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if is_adapter_key(name):
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))


@pytest.fixture
def export(tmp_path: Path) -> Path:
    return make_export(tmp_path / "export")


def test_only_adapters_train(export: Path) -> None:
    lora = module(export)
    trainable = [n for n, p in lora.dit.named_parameters() if p.requires_grad]
    assert trainable and all(is_adapter_key(n) for n in trainable)
    adapted = {n.split(".lora_")[0] for n in trainable}
    assert len(adapted) == TINY.depth * len(LoraSettings().target_modules)
    assert not any(n.startswith(("time_embed", "text_embed", "final_layer")) for n in adapted)
    optimizer = lora.configure_optimizers()["optimizer"]
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in lora.dit.parameters() if p.requires_grad}
    full = module(export, lora=None)
    with torch.no_grad():  # lora_B = 0: the adapted model is exactly the base at step 0
        torch.testing.assert_close(lora.dit(*batch(TINY)), full.dit(*batch(TINY)), rtol=0, atol=0)
    before = {n: p.detach().clone() for n, p in lora.dit.named_parameters()}
    lora.dit(*batch(TINY)).square().mean().backward()
    optimizer.step()
    lora._update_ema()
    moved = {n for n, p in lora.dit.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all(is_adapter_key(n) for n in moved)
    ema_moved = {
        n for n, p in lora.ema.named_parameters() if not torch.equal(p, before[n])
    }  # the EMA follows the adapters only
    assert ema_moved and all(is_adapter_key(n) for n in ema_moved)


def test_adapter_only_checkpoint_is_small_and_restores(export: Path) -> None:
    trained = module(export)
    randomize_adapters(trained.dit, seed=1)
    randomize_adapters(trained.ema, seed=2)
    state = trained.state_dict()
    assert state and all(is_adapter_key(k) for k in state)
    assert {k.split(".")[0] for k in state} == {"dit", "ema"}
    buffer = io.BytesIO()
    torch.save({"state_dict": state}, buffer)
    full = io.BytesIO()
    torch.save({"state_dict": module(export, lora=None).state_dict()}, full)
    assert buffer.tell() < 0.5 * full.tell(), (buffer.tell(), full.tell())

    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed = module(export)  # the base comes from model.pretrained again
    resumed.on_load_checkpoint(checkpoint)
    resumed.load_state_dict(checkpoint["state_dict"], strict=resumed.strict_loading)
    for (name, want), have in zip(
        trained.state_dict(keep_vars=True).items(), resumed.state_dict().values(), strict=True
    ):
        assert torch.equal(want, have), name
    with torch.no_grad():
        torch.testing.assert_close(
            resumed.dit(*batch(TINY)), trained.dit(*batch(TINY)), rtol=0, atol=0
        )


def test_full_checkpoint_refused_by_a_lora_run(export: Path) -> None:
    full = {"state_dict": module(export, lora=None).state_dict()}
    with pytest.raises(ValueError, match="LoRA adapters"):
        module(export).on_load_checkpoint(full)


def test_full_finetune_starts_from_the_exports_exact_weights(export: Path) -> None:
    saved = safetensors.torch.load_file(str(export / "dit.safetensors"))
    tuned = module(export, lora=None)
    for part in (tuned.dit, tuned.ema):
        state = part.state_dict()
        assert state.keys() == saved.keys()
        assert all(torch.equal(state[k], saved[k]) for k in saved)
    assert all(p.requires_grad for p in tuned.dit.parameters())
    scratch = module(None, lora=None)
    assert not torch.equal(
        scratch.dit.state_dict()["blocks.0.mlp.0.weight"], saved["blocks.0.mlp.0.weight"]
    )


def test_mismatched_base_refused_naming_fields(export: Path) -> None:
    other = DiTConfig(**{**config_to_dict(TINY), "depth": 3, "hidden_size": 48, "num_heads": 4})
    with pytest.raises(
        ValueError, match=r"hidden_size: export 32 vs model.dit 48.*depth: export 2 vs model.dit 3"
    ):
        check_finetune(str(export), None, other)
    with pytest.raises(ValueError, match="depth"):
        module(export, config=other)
    runtime_only = DiTConfig(**{**config_to_dict(TINY), "attn_backend": "auto"})
    check_finetune(str(export), LORA, runtime_only)  # how attention runs is not the model
    with pytest.raises(ValueError, match="model.pretrained"):
        check_finetune(None, LORA, TINY)
    with pytest.raises(ValueError, match="lacks"):
        check_finetune(str(export.parent), None, TINY)
    with pytest.raises(ValueError, match="unknown keys"):
        LoraSettings.from_config({"rank": 4, "ranks": 2})


def test_sora_train_refuses_a_mismatch_before_any_work(export: Path, tmp_path: Path) -> None:
    """The composed tiny preset (64 wide, MiniLM text) is not the export's DiT."""
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "experiment=tiny",
                "task=dit",
                f"run_dir={tmp_path / 'run'}",
                f"data.cache_dir={tmp_path / 'cache'}",
                f"data.vae_dir={tmp_path / 'vae'}",
                f"model.pretrained={export}",
                "lora.rank=4",
            ],
        )
    with pytest.raises(ValueError, match=r"hidden_size: export 32 vs model.dit 64"):
        validate(cfg)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("config", [TINY, WAN_LIKE], ids=["ours", "wan"])
def test_final_folder_merges_into_the_base(tmp_path: Path, config: DiTConfig) -> None:
    export = make_export(tmp_path / "export", config)
    trained = module(export, config=config)
    randomize_adapters(trained.ema)
    final = tmp_path / "final"
    save_lora_final(trained.ema, trained.lora, export, final, {"meta": {"vae_dir": "/vae"}})
    merged, meta = load_lora_dit(final)
    assert meta["meta"]["vae_dir"] == "/vae" and meta["lora"]["rank"] == 4
    with torch.no_grad():
        torch.testing.assert_close(
            merged(*batch(config)), trained.ema(*batch(config)), rtol=1e-5, atol=1e-5
        )
    assert (final / LORA_META).is_file()
    adapters = safetensors.torch.load_file(str(final / LORA_WEIGHTS))
    assert all(is_adapter_key(k) for k in adapters) and len(adapters) == 2 * 2 * 7
    assert (final / LORA_FILE).is_file() == (config is WAN_LIKE)
    if config is WAN_LIKE:  # built from tensors alone, it matches lora_diffusers on the model
        save_wan_lora(trained.ema, config, tmp_path / "reference")
        ours = safetensors.torch.load_file(str(final / LORA_FILE))
        reference = safetensors.torch.load_file(str(tmp_path / "reference" / LORA_FILE))
        assert ours.keys() == reference.keys()
        assert all(torch.equal(ours[k], reference[k]) for k in reference)
