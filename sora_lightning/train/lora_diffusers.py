"""A peft LoRA on our DiT as diffusers' Wan LoRA file (`WanPipeline.load_lora_weights`).

Our attention fuses projections Wan keeps apart: self-attention's `qkv` is Wan's to_q/to_k/to_v
stacked by output rows, cross-attention's `kv` its to_k/to_v. A LoRA on a fused Linear adds
B @ A x; its rows split like the weight's, so each of Wan's Linears gets the shared lora_A and its
own block of lora_B rows (rank unchanged). proj_out's rows are permuted as its weight is.

diffusers infers each module's rank from lora_B and, with no alphas in the file, uses
lora_alpha = rank (scale 1), so each module's peft scaling (alpha / r, rsLoRA included) is
folded into lora_B. DoRA and LoRA biases have no such mapping and are refused, as are LoRAs on
modules Wan has no Linear for (the patch embedding is a Conv3d there).

Keys written: `transformer.blocks.N.attn1.to_q.lora_A.weight`, ... in
`pytorch_lora_weights.safetensors`.
"""

from __future__ import annotations

from pathlib import Path

import safetensors.torch
from torch import Tensor, nn

from sora_lightning.models import wan
from sora_lightning.models.dit import DiTConfig
from sora_lightning.train.export_diffusers import _wan_output_rows

LORA_FILE = "pytorch_lora_weights.safetensors"


def _linear_rules(config: DiTConfig) -> dict[str, tuple[tuple[str, ...], object]]:
    """Our Linear module name -> (the diffusers Linear modules it is made of, how)."""
    rules = wan._rules(config.depth, config.cross_attn_norm, config.patch_size)
    return {
        ours[: -len(".weight")]: (tuple(s[: -len(".weight")] for s in sources), make)
        for ours, sources, make in rules
        if ours.endswith(".weight") and make is not wan._squeeze
    }


def lora_layers(model: nn.Module, adapter: str = "default") -> dict[str, tuple[Tensor, Tensor]]:
    """{our module name: (lora_A [r, in], scaled lora_B [out, r])} of a peft-injected DiT."""
    layers = {}
    for name, module in model.named_modules():
        if not hasattr(module, "lora_A") or adapter not in getattr(module, "lora_A", {}):
            continue
        if getattr(module, "use_dora", {}).get(adapter):
            raise ValueError(f"{name}: DoRA adapters have no diffusers Wan LoRA layout")
        lora_b = module.lora_B[adapter]
        if getattr(lora_b, "bias", None) is not None:
            raise ValueError(f"{name}: LoRA with a bias (lora_bias=True) is not supported")
        scale = float(module.scaling[adapter])
        name = name.removeprefix("base_model.model.")  # a PeftModel wraps the DiT
        layers[name] = (module.lora_A[adapter].weight.detach(), lora_b.weight.detach() * scale)
    if not layers:
        raise ValueError(f"the model holds no LoRA adapter named {adapter!r}")
    return layers


def wan_lora_state(
    layers: dict[str, tuple[Tensor, Tensor]], config: DiTConfig
) -> dict[str, Tensor]:
    """Our LoRA layers (`lora_layers`) -> diffusers keys `transformer.<wan module>.lora_A/B.weight`."""
    rules = _linear_rules(config)
    out: dict[str, Tensor] = {}
    for name, (lora_a, lora_b) in layers.items():
        if name not in rules or rules[name][1] is wan._flatten_conv:
            raise ValueError(
                f"LoRA on {name!r} has no diffusers Wan equivalent; target the attention "
                "(qkv, q, kv, proj), MLP, text/time embedding or final_layer.linear Linears"
            )
        sources, make = rules[name]
        if getattr(make, "__name__", "") == "reorder":  # proj_out: permute rows like the weight
            parts = [_wan_output_rows(lora_b, config.patch_size)]
        else:
            parts = list(lora_b.chunk(len(sources), dim=0))
        for source, part in zip(sources, parts, strict=True):
            out[f"transformer.{source}.lora_A.weight"] = lora_a.clone()
            out[f"transformer.{source}.lora_B.weight"] = part.clone()
    return out


def save_wan_lora(
    model: nn.Module, config: DiTConfig, output: str | Path, adapter: str = "default"
) -> Path:
    """Write the peft LoRA `adapter` of our DiT as output/pytorch_lora_weights.safetensors."""
    state = wan_lora_state(lora_layers(model, adapter), config)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    path = output / LORA_FILE
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    safetensors.torch.save_file(state, str(path), metadata={"format": "pt"})
    return path
