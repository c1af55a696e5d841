"""How close our Wan 2.1 code comes to diffusers' on each parity test, as one JSON line.

    python tools/bench/wan_parity.py            # about 15 s on one CPU thread

Every case rebuilds what its test in tests/unit compares, from the same tiny random-weight
models (`sora_lightning.models.wan_tiny`, which tests/wan_fixtures.py re-exports) and the same
seeds and inputs, drawn in the test's order, float32 on the CPU, and reports the largest absolute difference, the relative
one (that difference over the reference's largest magnitude) and the tolerance the test asserts:

- dit_one_sample[_patch213]: our DiT converted from a WanTransformer3DModel vs that model, one
  sample (tests/unit/test_wan_dit.py, both parametrisations).
- dit_packed: three samples of different shapes in one packed forward vs each alone in diffusers.
- vae_encode / vae_posterior_std / vae_decode: our VAE wrapper vs AutoencoderKLWan with
  WanPipeline's latent normalisation (test_wan_vae.py).
- sampler_latents / sampler_frames: our guided Euler sampler on the imported export vs
  WanPipeline, same noise, scheduler, 3 steps, guidance 5 (test_wan_pipeline_parity.py).
- lora_diffusers: a peft LoRA on our DiT written in diffusers' Wan layout and loaded by
  WanPipeline.load_lora_weights vs ours (test_export_diffusers.py).
- export_diffusers: a fine-tuned (every weight moved) export written as a diffusers folder and
  loaded by WanPipeline vs ours (test_export_diffusers.py).
- umt5_states_512 / umt5_states_8: our TextEncoder's UMT5 states, zero-padded, vs
  WanPipeline._get_t5_prompt_embeds (test_umt5_text.py).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from sora_lightning.models.dit import DiT
from sora_lightning.models.patches import patchify, seqlens_to_cu, token_grid, unpatchify
from sora_lightning.models.wan import convert_wan_transformer, wan_transformer_config
from sora_lightning.models.wan_tiny import (
    TINY_TRANSFORMER,
    tiny_t5_tokenizer,
    tiny_umt5_encoder,
    tiny_wan_pipeline,
    tiny_wan_transformer,
    tiny_wan_vae,
)

DIT_TINY = {**TINY_TRANSFORMER, "in_channels": 4, "out_channels": 4}
"""test_wan_dit.py's transformer: 4 latent channels."""
PROMPT, STEPS, CFG, SHIFT, FRAMES, SIZE = "a red ball rolls to the left", 3, 5.0, 3.0, 9, 32
LORA_TARGETS = ["qkv", "q", "kv", "proj", "mlp.0", "mlp.2", "final_layer.linear"]
CAPTIONS = [
    "a red ball rolls to the left",
    "two cats sleep on a sofa near the window at sunset and the camera pans right",
]


def difference(ours: Tensor, reference: Tensor, atol: float, test: str) -> dict[str, Any]:
    """Largest |ours - reference|, that over max |reference|, the asserted tolerance."""
    max_abs = (ours.double() - reference.double()).abs().max().item()
    scale = reference.double().abs().max().item()
    return {
        "max_abs": max_abs,
        "max_rel": max_abs / scale if scale else float("inf"),
        "atol": atol,
        "within": max_abs <= atol,
        "test": test,
    }


def worst(cases: list[dict[str, Any]]) -> dict[str, Any]:
    """One entry from several compared tensors: the largest differences among them."""
    return {
        **cases[0],
        "max_abs": max(c["max_abs"] for c in cases),
        "max_rel": max(c["max_rel"] for c in cases),
        "within": all(c["within"] for c in cases),
    }


def run_ours(dit: DiT, latents: list[Tensor], times: list[float], texts: list[Tensor]) -> list:
    """Samples [C, F, H, W] of any shapes in one packed forward -> one output per sample."""
    patch, channels = dit.config.patch_size, dit.config.in_channels
    tokens = [patchify(lat, patch) for lat in latents]
    grids = torch.tensor([token_grid(tuple(lat.shape[1:]), patch) for lat in latents])
    cu_seqlens = seqlens_to_cu([len(t) for t in tokens])
    text_cu = seqlens_to_cu([len(t) for t in texts])
    out = dit(torch.cat(tokens), cu_seqlens, grids, torch.tensor(times), torch.cat(texts), text_cu)
    parts = out.split(cu_seqlens.diff().tolist())
    return [unpatchify(p, g, patch, channels) for p, g in zip(parts, grids, strict=True)]


def run_wan(transformer: Any, latent: Tensor, t: float, text: Tensor) -> Tensor:
    """One sample [C, F, H, W] at flow time t through diffusers (timestep on its 0..1000 scale)."""
    timestep = torch.tensor([t * 1000.0])
    return transformer(latent[None], timestep, text[None], return_dict=False)[0][0]


def dit_pair(seed: int, **overrides: Any) -> tuple[Any, DiT]:
    config = {**DIT_TINY, **overrides}
    wan = tiny_wan_transformer(seed, **config)
    dit_config = dataclasses.replace(wan_transformer_config(config), attn_backend="sdpa")
    dit = DiT(dit_config).eval()
    dit.load_state_dict(convert_wan_transformer(wan.state_dict(), dit_config), strict=True)
    return wan, dit


def dit_one_sample(**overrides: Any) -> dict[str, Any]:
    wan, dit = dit_pair(0, **overrides)
    generator = torch.Generator().manual_seed(1)
    latent = torch.randn(4, 4, 4, 6, generator=generator)
    text = torch.randn(7, 16, generator=generator)
    (ours,) = run_ours(dit, [latent], [0.7], [text])
    test = "tests/unit/test_wan_dit.py::test_one_sample_matches_diffusers"
    return difference(ours, run_wan(wan, latent, 0.7, text), 1e-5, test)


def dit_packed() -> dict[str, Any]:
    wan, dit = dit_pair(2)
    generator = torch.Generator().manual_seed(3)
    latents = [torch.randn(4, *s, generator=generator) for s in [(3, 4, 6), (1, 6, 2), (2, 2, 4)]]
    texts = [torch.randn(n, 16, generator=generator) for n in (5, 3, 9)]
    times = [0.9, 0.25, 0.5]
    test = "tests/unit/test_wan_dit.py::test_packed_samples_each_match_diffusers_alone"
    outputs = run_ours(dit, latents, times, texts)
    return worst(
        [
            difference(ours, run_wan(wan, lat, t, text), 1e-5, test)
            for lat, t, text, ours in zip(latents, times, texts, outputs, strict=True)
        ]
    )


def vae_cases() -> dict[str, dict[str, Any]]:
    from sora_lightning.models.wan_vae import WanVideoVAE

    model = tiny_wan_vae()  # seeds the global RNG: the test's input is the next draw
    vae = WanVideoVAE.from_diffusers(model).eval()
    video = torch.rand(2, 3, 9, 32, 48) * 2 - 1
    mean = torch.tensor(model.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(model.config.latents_std).view(1, -1, 1, 1, 1)
    posterior = model.encode(video).latent_dist
    expected = (posterior.mode() - mean) / std
    ours = vae.encode(video)
    test = "tests/unit/test_wan_vae.py::test_encode_decode_match_diffusers"
    return {
        "vae_encode": difference(ours.mode(), expected, 1e-6, test),
        "vae_posterior_std": difference(ours.std, posterior.std / std, 1e-6, test),
        "vae_decode": difference(
            vae.decode(expected), model.decode(expected * std + mean).sample, 1e-6, test
        ),
    }


def diffusers_schedule(steps: int, shift: float) -> Tensor:
    """FlowMatchEulerDiscreteScheduler's sigmas (test_wan_pipeline_parity.py says why)."""
    shifted = lambda t: shift * t / (1 + (shift - 1) * t)  # noqa: E731
    sigmas = shifted(np.linspace(1.0, shifted(np.float64(1.0 / 1000)), steps))
    return torch.cat([torch.from_numpy(sigmas).float(), torch.zeros(1)])


def pad_states(states: Tensor, length: int = 512) -> Tensor:
    """Real-token states [S, Dt] -> [length, Dt] with zero rows, as WanPipeline pads them."""
    return torch.cat([states, states.new_zeros(length - states.shape[0], states.shape[1])])


def sampler_cases(folder: Path, export: Path) -> dict[str, dict[str, Any]]:
    from diffusers import WanPipeline

    from sora_lightning.diffusion import flow
    from sora_lightning.diffusion.sampling import guided_velocity_fn, text_states
    from sora_lightning.sample import generate

    pipe = WanPipeline.from_pretrained(str(folder), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    generator = generate.load_generator(export, expand_prompts=False)
    noise = torch.randn(1, 16, 1 + (FRAMES - 1) // 4, SIZE // 8, SIZE // 8)

    def pipeline(output_type: str) -> Tensor:
        kwargs = {"height": SIZE, "width": SIZE, "num_frames": FRAMES, "guidance_scale": CFG}
        out = pipe(
            PROMPT,
            num_inference_steps=STEPS,
            latents=noise.clone(),
            output_type=output_type,
            **kwargs,
        )
        return torch.as_tensor(np.asarray(out.frames))[0]

    dit, encoder = generator.dit, generator.text_encoder
    states = pad_states(text_states(encoder, PROMPT))
    null = pad_states(text_states(encoder, ""))
    patch = tuple(dit.config.patch_size)
    grid = token_grid(tuple(noise.shape[2:]), patch)
    velocity = guided_velocity_fn(dit, grid, states, null, None, None, CFG)
    schedule = diffusers_schedule(STEPS, SHIFT)
    tokens = flow.euler_sample(velocity, patchify(noise[0], patch), schedule, 1)
    ours = unpatchify(tokens, grid, patch, noise.shape[1])
    decoded = (generator.vae.decode(ours[None])[0].permute(1, 2, 3, 0) + 1) / 2
    test = "tests/unit/test_wan_pipeline_parity.py::test_sampler_reproduces_wan_pipeline"
    return {
        "sampler_latents": difference(ours, pipeline("latent"), 1e-5, test),
        "sampler_frames": difference(decoded, pipeline("np").float(), 1e-5, test),
    }


def export_inputs(seed: int) -> tuple[Tensor, float, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    latent = torch.randn(16, 3, 4, 6, generator=generator)  # [C, F, h, w]
    return latent, 0.6, torch.randn(7, 16, generator=generator)


def lora_case(folder: Path, export: Path, root: Path) -> dict[str, Any]:
    from diffusers import WanPipeline
    from peft import LoraConfig, inject_adapter_in_model

    from sora_lightning.train.lora_diffusers import save_wan_lora
    from sora_lightning.train.weights import load_dit

    torch.manual_seed(0)  # the test's autouse seed: the draws below come in its order
    dit, _ = load_dit(export)
    dit = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS), dit)
    for name, param in dit.named_parameters():  # lora_B starts at zero: make it matter
        if "lora_" in name:
            param.data.copy_(0.2 * torch.randn_like(param))
    path = save_wan_lora(dit, dit.config, root / "lora")
    pipe = WanPipeline.from_pretrained(str(folder), local_files_only=True)
    pipe.load_lora_weights(str(path.parent))
    latent, t, text = export_inputs(2)
    (ours,) = run_ours(dit, [latent], [t], [text])
    test = "tests/unit/test_export_diffusers.py::test_lora_loads_in_diffusers"
    return difference(ours, run_wan(pipe.transformer, latent, t, text), 1e-5, test)


def export_case(export: Path, root: Path) -> dict[str, Any]:
    from diffusers import WanPipeline

    from sora_lightning.train.export_diffusers import export_to_diffusers
    from sora_lightning.train.weights import load_dit, save_module

    torch.manual_seed(0)  # the test's autouse seed: the draws below come in its order
    dit, saved = load_dit(export)
    for param in dit.parameters():  # "fine-tune": every weight moves
        param.data.add_(0.01 * torch.randn_like(param))
    tuned = root / "tuned"
    tuned.mkdir()
    for name in ("vae.json", "vae.safetensors"):
        (tuned / name).write_bytes((export / name).read_bytes())
    save_module(dit, dit.config, tuned, "dit", {k: v for k, v in saved.items() if k != "config"})
    out = export_to_diffusers(tuned, root / "diffusers")
    pipe = WanPipeline.from_pretrained(str(out), local_files_only=True)
    latent, t, text = export_inputs(1)
    (ours,) = run_ours(dit, [latent], [t], [text])
    test = "tests/unit/test_export_diffusers.py::test_export_writes_back_to_diffusers"
    return difference(ours, run_wan(pipe.transformer, latent, t, text), 1e-5, test)


def umt5_case(root: Path, max_length: int) -> dict[str, Any]:
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    from sora_lightning.models.text import TextEncoder, TextEncoderConfig

    folder = root / "umt5"
    if not folder.is_dir():
        tiny_umt5_encoder().save_pretrained(folder)
        tiny_t5_tokenizer().save_pretrained(folder)
    config = TextEncoderConfig(path=str(folder), max_length=max_length, model_type="umt5")
    encoder = TextEncoder(config)
    ours = encoder.encode(CAPTIONS).states
    pipe = WanPipeline(
        tokenizer=encoder.tokenizer,
        text_encoder=encoder.model,
        transformer=None,
        vae=None,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )
    wan = pipe._get_t5_prompt_embeds(CAPTIONS, max_sequence_length=max_length, device="cpu")
    padded = F.pad(ours, (0, 0, 0, max_length - ours.shape[1]))
    test = f"tests/unit/test_umt5_text.py::test_states_equal_wan_pipeline[{max_length}]"
    return difference(padded, wan, 1e-5, test)


GROUPS = ("dit", "vae", "sampler", "lora", "export", "umt5")
"""Groups of cases (`--groups`); sampler, lora and export share one saved tiny Wan folder."""


def measure(groups: tuple[str, ...] = GROUPS) -> dict[str, dict[str, Any]]:
    """The cases of `groups`, in the order of the module docstring."""
    from sora_lightning.train.import_wan import import_wan21

    results: dict[str, dict[str, Any]] = {}
    with torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if "dit" in groups:
            results["dit_one_sample"] = dit_one_sample()
            results["dit_one_sample_patch213"] = dit_one_sample(
                patch_size=(2, 1, 3), cross_attn_norm=False, eps=1e-3
            )
            results["dit_packed"] = dit_packed()
        if "vae" in groups:
            results.update(vae_cases())
        if {"sampler", "lora", "export"} & set(groups):
            folder = root / "Wan-tiny"
            torch.manual_seed(0)  # the sampler's noise follows these builds, as in its test
            tiny_wan_pipeline().save_pretrained(folder)
            export = import_wan21(folder, root / "export")
            if "sampler" in groups:
                results.update(sampler_cases(folder, export))
            if "lora" in groups:
                results["lora_diffusers"] = lora_case(folder, export, root)
            if "export" in groups:
                results["export_diffusers"] = export_case(export, root)
        if "umt5" in groups:
            for length in (512, 8):
                results[f"umt5_states_{length}"] = umt5_case(root, length)
    return results


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Whatever the libraries print while the cases run (DeepSpeed's accelerator notice, blank
    lines, from Python or C) goes to stderr, so stdout holds the one JSON line."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument(
        "--groups", default=",".join(GROUPS), help=f"comma-separated subset of {GROUPS}"
    )
    args = parser.parse_args(argv)
    groups = tuple(name for name in args.groups.split(",") if name)
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown or not groups:
        parser.error(f"--groups takes names from {GROUPS}, got {args.groups!r}")
    torch.set_num_threads(args.threads)
    with stdout_to_stderr():
        cases = measure(groups)
    result = {
        "cases": cases,
        "all_within_tolerance": all(case["within"] for case in cases.values()),
        "dtype": "float32",
        "device": "cpu",
        "torch": torch.__version__,
        "diffusers": __import__("diffusers").__version__,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
