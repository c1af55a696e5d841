"""Fine-tuning the DiT from a published base: `model.pretrained` and LoRA through peft.

Why here: a base's weights and a LoRA are applied to the DiT from outside the model, like
parallelism (DESIGN.md), so `models/dit.py` stays plain torch and every strategy sees one module.

- `model.pretrained=EXPORT` initialises the DiT from EXPORT/dit.safetensors (an export, e.g. one
  written by tools/import_weights.py). EXPORT/dit.json's config must equal the composed
  `model.dit` (runtime-only fields such as `attn_backend` aside): the composed config stays the one
  source of truth that cache settings, the text-width check and checkpoints read, so a preset that
  differs from the weights is refused before any work, naming the fields (`check_pretrained`).
  For Wan 2.1 pick `model/dit=wan2_1_1_3b` or `wan2_1_14b`.
- `lora.rank > 0` injects peft LoRA layers into the Linears `lora.target_modules` names inside
  every DiT block and freezes everything else; `lora.rank=0` is a full fine-tune.
- The EMA covers the adapters only: the frozen base never moves, so its EMA would equal the base;
  averaging lora_A and lora_B separately is what peft-based trainers (diffusers' scripts) do.
  The EMA holds the base's very tensors (`ema_twin`), so the base is in memory once (FSDP2 aside).
- Checkpoints of a LoRA run hold only adapter tensors (DiT and EMA), the optimizer and the loop
  state (`keep_adapters_only`); on resume the base comes from `model.pretrained` again. Under
  DeepSpeed ZeRO-3 the EMA adapters travel in the checkpoint's client state instead, because
  DeepSpeed's frozen-parameter fragments, the only place it would keep them, hold the base too.
- final/ of a LoRA run: `lora.safetensors` (the EMA adapters, peft key names), then `lora.json`
  (written last: DiT config, LoRA settings, the base export's path, sampling meta) and, when the DiT
  is a Wan config, `pytorch_lora_weights.safetensors` for diffusers' `WanPipeline.load_lora_weights`.
  `sora-sample ckpt=RUN/final` loads the base with the adapters merged (`load_lora_dit`), the way it
  loads a full run's final/.
"""

from __future__ import annotations

import copy
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import Tensor, nn

from sora_lightning.models.dit import DiT, DiTConfig
from sora_lightning.train.weights import (
    config_to_dict,
    confined_vae_dir,
    load_dit,
    load_safetensors,
    read_module_meta,
)
from sora_lightning.utils import atomic_path, write_json_atomic

DEFAULT_TARGETS = (
    "self_attn.qkv",
    "self_attn.proj",
    "cross_attn.q",
    "cross_attn.kv",
    "cross_attn.proj",
    "mlp.0",
    "mlp.2",
)
"""The attention and MLP Linears of a DiT block, by their name inside the block."""
RUNTIME_FIELDS = frozenset({"attn_backend"})
"""DiTConfig fields that choose how to compute, not what: they may differ from the export's."""
LORA_WEIGHTS = "lora.safetensors"
LORA_META = "lora.json"
EMA_CLIENT_KEY = "lora_ema"
"""Checkpoint key of the gathered EMA adapters under DeepSpeed ZeRO-3 (module docstring)."""


@dataclass
class LoraSettings:
    """The `lora:` block of conf/train.yaml."""

    rank: int = 0
    """LoRA rank r; 0 trains every weight (a full fine-tune)."""
    alpha: float | None = None
    """Scale numerator: the adapter adds (alpha / rank) B A x; None means alpha = rank (scale 1)."""
    dropout: float = 0.0
    """Dropout on the adapter's input in training."""
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    """Linears inside each DiT block that get adapters, by their name within the block."""

    def __post_init__(self) -> None:
        self.target_modules = tuple(str(name) for name in self.target_modules)
        if self.rank < 0:
            raise ValueError(f"lora.rank must be >= 0 (0: full fine-tune), got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if self.alpha is not None and not self.alpha > 0:
            raise ValueError(f"lora.alpha must be > 0 (or null for alpha = rank), got {self.alpha}")
        if self.rank and not self.target_modules:
            raise ValueError("lora.target_modules is empty: name the block Linears to adapt")

    @classmethod
    def from_config(cls, values: dict[str, Any] | None) -> LoraSettings:
        """Build from the `lora:` block; an unknown key is a ValueError listing the valid ones."""
        values = dict(values or {})
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(
                f"lora has unknown keys {unknown}; valid keys: {sorted(f.name for f in fields(cls))}"
            )
        return cls(**values)

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        """peft's `scaling`: alpha / rank."""
        return (self.alpha if self.alpha is not None else self.rank) / self.rank

    def target_regex(self) -> str:
        """peft matches a string target with `re.fullmatch` over module names: block Linears only
        (a plain suffix list would also hit `time_embed.mlp.0` for "mlp.0")."""
        names = "|".join(re.escape(name) for name in self.target_modules)
        return rf"(?:.*\.)?blocks\.\d+\.(?:{names})"

    def peft_config(self) -> Any:
        from peft import LoraConfig

        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha if self.alpha is not None else self.rank,
            lora_dropout=self.dropout,
            target_modules=self.target_regex(),
        )


def is_adapter_key(key: str) -> bool:
    """A peft adapter tensor (lora_A, lora_B, ...), whatever wrapper prefixes the name carries."""
    return any(part.startswith("lora_") for part in key.split("."))


def apply_lora(dit: nn.Module, settings: LoraSettings) -> nn.Module:
    """Inject peft LoRA layers into `dit` in place and freeze every non-adapter parameter.

    lora_B starts at zero, so the adapted model computes exactly what the base does at step 0.
    """
    from peft import inject_adapter_in_model

    try:
        inject_adapter_in_model(settings.peft_config(), dit)
    except ValueError as error:
        raise ValueError(
            f"lora.target_modules {list(settings.target_modules)} matched no Linear in the DiT's "
            f"blocks ({error}); use names inside a block such as {list(DEFAULT_TARGETS)}"
        ) from error
    for name, param in dit.named_parameters():
        param.requires_grad_(is_adapter_key(name))
    return dit


def pretrained_config(path: str | Path) -> DiTConfig:
    """The DiTConfig an export's dit.json describes (its weights are not read)."""
    meta = read_module_meta(path, "dit")
    try:
        return DiTConfig(**meta["config"])
    except (TypeError, ValueError) as error:
        raise ValueError(f"{Path(path) / 'dit.json'}: not a valid DiTConfig ({error})") from error


def config_differences(export: DiTConfig, model: DiTConfig) -> dict[str, tuple[Any, Any]]:
    """{field: (export's value, model.dit's value)} for every architecture field that differs."""
    ours, theirs = config_to_dict(model), config_to_dict(export)
    return {
        key: (theirs[key], ours[key])
        for key in ours
        if key not in RUNTIME_FIELDS and theirs.get(key) != ours[key]
    }


def check_pretrained(path: str | Path, model: DiTConfig) -> None:
    """Refuse `model.pretrained` unless it is an export whose DiT config equals `model.dit`."""
    missing = [n for n in ("dit.json", "dit.safetensors") if not Path(path, n).is_file()]
    if missing:
        raise ValueError(
            f"model.pretrained={path} lacks {missing}: point it at an export folder (a run's "
            "export/ or tools/import_weights.py's output)"
        )
    differences = config_differences(pretrained_config(path), model)
    if differences:
        listed = ", ".join(
            f"{k}: export {a!r} vs model.dit {b!r}" for k, (a, b) in differences.items()
        )
        raise ValueError(
            f"model.pretrained={path} holds a DiT unlike model.dit ({listed}); compose the "
            "matching preset (e.g. model/dit=wan2_1_1_3b for Wan 2.1 1.3B) or override those fields"
        )


def load_pretrained(dit: DiT, path: str | Path) -> None:
    """Copy an export's DiT weights into `dit` (cast to its dtype); every key must fit."""
    check_pretrained(path, dit.config)
    file = Path(path) / "dit.safetensors"
    try:
        dit.load_state_dict(load_safetensors(file))
    except RuntimeError as error:
        raise ValueError(f"{file} does not fit its dit.json's model: {error}") from error


def keep_adapters_only(module: nn.Module) -> None:
    """Make `module.state_dict()` (and so every checkpoint and DCP save/load plan) hold only
    adapter tensors; loading then needs `strict_loading = False` for the missing base keys."""

    def drop_base(_: nn.Module, state: dict[str, Tensor], prefix: str, *args: Any) -> None:
        for key in [k for k in state if k.startswith(prefix) and not is_adapter_key(k)]:
            del state[key]

    module.register_state_dict_post_hook(drop_base)


def ema_twin(dit: nn.Module) -> nn.Module:
    """The EMA of `dit`: a deep copy in eval mode whose *frozen* parameters are `dit`'s own.

    Why: a frozen parameter's average is the parameter itself at every step, so a copy of it
    only doubles memory (under LoRA the whole base: 26.9 GiB of bf16 for Wan 14B). Trainable
    parameters (all of them in a full fine-tune, the adapters under LoRA) and buffers are copied.
    The shared tensors are one `nn.Parameter` object in both trees, so DDP broadcasts and ZeRO-3
    partitions them once (`module.parameters()` lists them once) and either tree's forward
    gathers them. FSDP2's `fully_shard` swaps each sharded module's parameters for new DTensors,
    so `parallel.strategies.shard_dit` sharding the EMA after the DiT gives it its own sharded
    copy of the base again there: one FSDP2 state per parameter, and an EMA forward needs its
    base all-gathered by its own state.
    """
    frozen = {id(param): param for param in dit.parameters() if not param.requires_grad}
    return copy.deepcopy(dit, frozen).requires_grad_(False).eval()


def _adapter_params(module: nn.Module) -> dict[str, nn.Parameter]:
    """Adapter parameters by name, activation-checkpoint wrappers left out of the names."""
    return {
        name.replace("_checkpoint_wrapped_module.", ""): param
        for name, param in module.named_parameters()
        if is_adapter_key(name)
    }


def adapter_state(module: nn.Module) -> dict[str, Tensor]:
    """Full CPU copies of `module`'s adapter tensors, gathered under ZeRO-3 (collective there)."""
    params = _adapter_params(module)
    if any(hasattr(p, "ds_tensor") for p in params.values()):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
            return {name: p.detach().cpu().clone() for name, p in params.items()}
    return {
        name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu().clone()
        for name, p in params.items()
    }


def load_adapter_state(module: nn.Module, state: dict[str, Tensor]) -> None:
    """Copy full adapter tensors into `module` (plain or ZeRO-3 partitioned); every one must be there."""
    params = _adapter_params(module)
    if params.keys() != state.keys():
        missing, extra = sorted(params.keys() - state.keys()), sorted(state.keys() - params.keys())
        raise ValueError(
            f"adapter state does not fit: missing {missing[:4]}, unexpected {extra[:4]}"
        )
    if any(hasattr(p, "ds_tensor") for p in params.values()):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0):
            _copy(params, state)
        return
    _copy(params, state)


@torch.no_grad()
def _copy(params: dict[str, Tensor], state: dict[str, Tensor]) -> None:
    for name, param in params.items():
        param.copy_(state[name])


def is_wan_config(config: DiTConfig) -> bool:
    """A DiT that `models.wan` maps to diffusers' WanTransformer3DModel (what the importer makes)."""
    return (
        config.qk_norm
        and config.qk_norm_across_heads
        and not config.use_conditioning
        and not config.pooled_text
        and not config.abs_pos_embed
    )


def save_lora_final(
    ema: nn.Module,
    settings: LoraSettings,
    pretrained: str | Path,
    output: str | Path,
    extra: dict[str, Any],
    *,
    write: bool = True,
) -> Path:
    """final/ of a LoRA run from the EMA DiT (collective under sharding: call on every rank).

    `lora.safetensors` first, the diffusers Wan file next, `lora.json` last: its presence means
    the folder is complete.
    """
    state = adapter_state(ema)
    output = Path(output)
    if not write:
        return output / LORA_WEIGHTS
    output.mkdir(parents=True, exist_ok=True)
    with atomic_path(output / LORA_WEIGHTS) as tmp:
        safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    config = pretrained_config(pretrained)
    if is_wan_config(config):
        save_wan_file(state, settings, config, output)
    meta = {
        "config": config_to_dict(config),
        "lora": asdict(settings),
        "base": str(Path(pretrained).resolve()),
        **extra,
    }
    write_json_atomic(output / LORA_META, meta)
    return output / LORA_WEIGHTS


def adapter_pairs(adapters: dict[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
    """{adapted module name: (lora_A [r, in], lora_B [out, r])} of a flat adapter state."""
    return {
        key.split(".lora_A.")[0]: (lora_a, adapters[key.replace(".lora_A.", ".lora_B.")])
        for key, lora_a in adapters.items()
        if ".lora_A." in key
    }


def save_wan_file(
    adapters: dict[str, Tensor], settings: LoraSettings, config: DiTConfig, output: Path
) -> Path:
    """diffusers' Wan LoRA file (`lora_diffusers`), scale folded into lora_B, built from the
    tensors alone: no second (possibly 14B) DiT is built to hold them."""
    from sora_lightning.train.lora_diffusers import LORA_FILE, wan_lora_state

    layers = {name: (a, b * settings.scale) for name, (a, b) in adapter_pairs(adapters).items()}
    state = {k: v.contiguous() for k, v in wan_lora_state(layers, config).items()}
    with atomic_path(output / LORA_FILE) as tmp:
        safetensors.torch.save_file(state, str(tmp), metadata={"format": "pt"})
    return output / LORA_FILE


def merge_adapters(dit: DiT, adapters: dict[str, Tensor], scale: float) -> DiT:
    """W += scale * B @ A for every adapted Linear of a plain DiT, in place; returns it."""
    state = dit.state_dict()
    with torch.no_grad():
        for module, (lora_a, lora_b) in adapter_pairs(adapters).items():
            weight = state[f"{module}.weight"]
            weight.add_((scale * lora_b.double() @ lora_a.double()).to(weight.dtype))
    return dit


def load_lora_dit(directory: str | Path) -> tuple[DiT, dict[str, Any]]:
    """The base export's DiT with a LoRA final/'s adapters merged, and final/'s metadata.

    The base must still hold the DiT the adapters were trained on (its config is checked).
    """
    directory = Path(directory)
    meta = read_module_meta(directory, "lora")
    settings = LoraSettings.from_config(meta["lora"])
    dit, _ = load_dit(meta["base"])
    differences = config_differences(dit.config, DiTConfig(**meta["config"]))
    if differences:
        raise ValueError(f"{meta['base']} no longer holds the base of {directory}: {differences}")
    inner = meta.get("meta")
    if isinstance(inner, dict) and "vae_dir" in inner:  # as `load_dit` checks a final/'s
        inner["vae_dir"] = confined_vae_dir(directory, inner["vae_dir"], directory / LORA_META)
    adapters = load_safetensors(directory / LORA_WEIGHTS)
    return merge_adapters(dit, adapters, settings.scale).eval(), meta


def check_finetune(
    pretrained: str | None, lora: dict[str, Any] | None, model: DiTConfig
) -> LoraSettings:
    """`model.pretrained` and `lora` checked before any work (sora-train's `validate`)."""
    settings = LoraSettings.from_config(lora)
    if settings.enabled and not pretrained:
        raise ValueError(
            f"lora.rank={settings.rank} adapts a base model: set model.pretrained=EXPORT "
            "(or lora.rank=0 to train from scratch)"
        )
    if pretrained:
        check_pretrained(pretrained, model)
    return settings
