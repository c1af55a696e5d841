"""A (fine-tuned) Wan-config export written back as a diffusers folder, and a peft LoRA on our
DiT written as diffusers' Wan LoRA file: both loaded by diffusers and compared with ours."""

from __future__ import annotations

import pytest
import torch
from test_import_wan import tiny_wan_folder
from torch import Tensor

from sora_lightning.models.dit import DiT
from sora_lightning.models.patches import patchify, seqlens_to_cu, token_grid, unpatchify
from sora_lightning.train.export_diffusers import export_to_diffusers
from sora_lightning.train.import_wan import import_wan21
from sora_lightning.train.lora_diffusers import save_wan_lora, wan_lora_state
from sora_lightning.train.weights import load_dit, read_module_meta, save_module

ATOL = 1e-5
LORA_TARGETS = ["qkv", "q", "kv", "proj", "mlp.0", "mlp.2", "final_layer.linear"]


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    return import_wan21(tiny_wan_folder(root), root / "export")


def inputs(seed: int = 1) -> tuple[Tensor, float, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    latent = torch.randn(16, 3, 4, 6, generator=generator)  # [C, F, h, w]
    return latent, 0.6, torch.randn(7, 16, generator=generator)


def run_ours(dit: DiT, latent: Tensor, t: float, text: Tensor) -> Tensor:
    patch = dit.config.patch_size
    grid = token_grid(tuple(latent.shape[1:]), patch)
    tokens = patchify(latent, patch)
    out = dit(
        tokens,
        seqlens_to_cu([len(tokens)]),
        torch.tensor([grid]),
        torch.tensor([t]),
        text,
        seqlens_to_cu([len(text)]),
    )
    return unpatchify(out, grid, patch, latent.shape[0])


def run_wan(transformer, latent: Tensor, t: float, text: Tensor) -> Tensor:
    timestep = torch.tensor([t * 1000.0])
    return transformer(latent[None], timestep, text[None], return_dict=False)[0][0]


@torch.no_grad()
def test_export_writes_back_to_diffusers(export, tmp_path) -> None:
    from diffusers import WanPipeline

    dit, saved = load_dit(export)
    for param in dit.parameters():  # "fine-tune": every weight moves
        param.add_(0.01 * torch.randn_like(param))
    tuned = tmp_path / "tuned"
    tuned.mkdir()
    for name in ("vae.json", "vae.safetensors"):
        (tuned / name).write_bytes((export / name).read_bytes())
    save_module(dit, dit.config, tuned, "dit", {k: v for k, v in saved.items() if k != "config"})
    out = export_to_diffusers(tuned, tmp_path / "diffusers")
    pipe = WanPipeline.from_pretrained(str(out), local_files_only=True)
    assert pipe.scheduler.config.shift == 3.0
    latent, t, text = inputs()
    torch.testing.assert_close(
        run_ours(dit, latent, t, text),
        run_wan(pipe.transformer, latent, t, text),
        atol=ATOL,
        rtol=0,
    )
    ours_vae = read_module_meta(tuned, "vae")["config"]
    assert list(pipe.vae.config.latents_std) == pytest.approx(ours_vae["latents_std"])
    with pytest.raises(FileExistsError):
        export_to_diffusers(tuned, out)


def test_lora_loads_in_diffusers(export, tmp_path) -> None:
    from diffusers import WanPipeline
    from peft import LoraConfig, inject_adapter_in_model

    dit, _ = load_dit(export)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS)
    dit = inject_adapter_in_model(config, dit)
    with torch.no_grad():  # lora_B starts at zero: make the adapter do something
        for name, param in dit.named_parameters():
            if "lora_" in name:
                param.copy_(0.2 * torch.randn_like(param))
    path = save_wan_lora(dit, dit.config, tmp_path / "lora")
    pipe = WanPipeline.from_pretrained(str(export.parent / "Wan-tiny"), local_files_only=True)
    latent, t, text = inputs(2)
    with torch.no_grad():
        base = run_wan(pipe.transformer, latent, t, text)
        pipe.load_lora_weights(str(path.parent))
        theirs = run_wan(pipe.transformer, latent, t, text)
        ours = run_ours(dit, latent, t, text)
    assert (theirs - base).abs().max() > 0.1  # the adapter is loaded and matters
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    assert any("blocks.1.attn1.to_v.lora_B" in key for key in pipe.transformer.state_dict())
    conv_lora = {"patch_embed": (torch.zeros(4, 64), torch.zeros(24, 4))}  # Wan: a Conv3d
    with pytest.raises(ValueError, match="patch_embed"):
        wan_lora_state(conv_lora, dit.config)
