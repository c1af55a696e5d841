"""Print a DiT preset's parameter count and forward FLOPs for one clip shape, as JSON.

    python tools/model_stats.py --preset 600m --vae default --frames 33 --height 256 --width 256 \
        --text-len 120

Answers sizing questions (memory, step time, MFU denominators) without building the model.
`--memory` prints instead the training-memory plan per GPU (parameters, gradients, AdamW state,
activations) for presets x clips x full/LoRA x GPU counts x activation checkpointing off/on:

    python tools/model_stats.py --memory --presets wan2_1_1_3b wan2_1_14b \
        --clips 17x480x832 81x480x832 81x720x1280 --gpus 1 8 --lora-rank 32

The assumptions (bf16 mixed precision, AdamW, ZeRO-3/FSDP2 full sharding, what activations
count) are printed with the numbers: docs/wan-finetune-memory-2026-12-07.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from omegaconf import OmegaConf

from sora_lightning.models.dit import DiTConfig
from sora_lightning.models.stats import (
    ACTIVATION_BYTES,
    STRATEGY_BYTES,
    activation_bytes,
    count_params,
    dit_forward_flops,
    latent_token_grid,
    lora_params,
    lora_targets,
    state_bytes,
)
from sora_lightning.models.vae import VAEConfig
from sora_lightning.models.wan_vae import WanVAEConfig, vae_config_from_dict
from sora_lightning.train.lora import DEFAULT_TARGETS, LoraSettings

MODEL_CONF = Path(__file__).resolve().parents[1] / "conf" / "model"
PRESET_DIR = MODEL_CONF / "dit"


def _load_config(group: str, preset: str) -> dict:
    """Fields of conf/model/<group>/<preset>.yaml (or of a path to a YAML), without `_target_`."""
    folder = MODEL_CONF / group
    path = Path(preset) if preset.endswith(".yaml") else folder / f"{preset}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in folder.glob("*.yaml"))
        raise SystemExit(f"no {group} preset {preset!r}; known presets: {known}")
    fields = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    fields.pop("_target_", None)
    return fields


def load_preset(preset: str) -> DiTConfig:
    """conf/model/dit/<preset>.yaml (or a path to a YAML) -> DiTConfig."""
    return DiTConfig(**_load_config("dit", preset))


def load_vae_preset(preset: str) -> VAEConfig | WanVAEConfig:
    """conf/model/vae/<preset>.yaml (or a path to a YAML) -> its config (ours or Wan's): its
    factors and its clip-length rule turn pixel sizes into latent sizes."""
    return vae_config_from_dict(_load_config("vae", preset))


GIB = 2**30
MEMORY_PRESETS = ["wan2_1_1_3b", "wan2_1_14b"]
MEMORY_CLIPS = ["17x480x832", "81x480x832", "81x720x1280"]  # 7,800 / 32,760 / 75,600 tokens
WAN_TEXT_TOKENS = 512  # WanPipeline pads every caption to 512 UMT5 tokens: the upper bound


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; pixel sizes are converted through the VAE factors."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="600m", help="name in conf/model/dit or a YAML path")
    parser.add_argument(
        "--frames", type=int, default=33, help="pixel frames T (1 + k x the VAE's temporal factor)"
    )
    parser.add_argument("--height", type=int, default=256, help="pixel height H")
    parser.add_argument("--width", type=int, default=256, help="pixel width W")
    parser.add_argument("--text-len", type=int, default=None, help="caption tokens (120; 512)")
    parser.add_argument(
        "--vae", default=None, help="name in conf/model/vae or a YAML path (default; wan2_1)"
    )
    memory = parser.add_argument_group("--memory: the training-memory plan (values: defaults)")
    memory.add_argument("--memory", action="store_true", help="print the memory plan instead")
    memory.add_argument("--presets", nargs="+", default=MEMORY_PRESETS, help="DiT presets")
    memory.add_argument("--clips", nargs="+", default=MEMORY_CLIPS, help="TxHxW pixel clips")
    memory.add_argument("--gpus", nargs="+", type=int, default=[1, 8], help="GPUs sharding")
    memory.add_argument("--lora-rank", type=int, default=32, help="LoRA rank (0: no LoRA rows)")
    memory.add_argument(
        "--lora-targets",
        default=",".join(DEFAULT_TARGETS),
        help="Linears inside each block, comma-separated, as train.yaml's lora.target_modules",
    )
    memory.add_argument("--strategy", choices=sorted(STRATEGY_BYTES), default="zero3")
    memory.add_argument("--no-ema", action="store_true", help="leave out the EMA")
    memory.add_argument(
        "--markdown", action="store_true", help="print the rows as a Markdown table (GiB)"
    )
    return parser.parse_args(argv)


def parse_clip(text: str) -> tuple[int, int, int]:
    """ "81x480x832" -> (frames, height, width)."""
    try:
        frames, height, width = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--clips takes FRAMESxHEIGHTxWIDTH, got {text!r}") from None
    return frames, height, width


def parse_targets(text: str) -> str:
    """The peft regex training builds from these `lora.target_modules` (block Linears only)."""
    names = tuple(name for name in text.split(",") if name)
    return LoraSettings(rank=1, target_modules=names).target_regex()


def memory_rows(args: argparse.Namespace) -> list[dict[str, object]]:
    """One row per preset x clip x (full, LoRA) x GPU count x checkpointing off/on."""
    vae = load_vae_preset(args.vae or "wan2_1")
    text_tokens = args.text_len or WAN_TEXT_TOKENS
    targets = parse_targets(args.lora_targets)
    rows = []
    for preset in args.presets:
        cfg = load_preset(preset)
        adapters = lora_params(cfg, args.lora_rank, targets) if args.lora_rank else 0
        per_block = sum(name.startswith("blocks.0.") for name in lora_targets(cfg, targets))
        modes = [("full", 0)] + ([("lora", args.lora_rank)] if args.lora_rank else [])
        for clip in args.clips:
            grid = latent_token_grid(cfg, vae, *parse_clip(clip))
            tokens = grid[0] * grid[1] * grid[2]
            for mode, rank in modes:
                for gpus in args.gpus:
                    for checkpointing in (False, True):
                        state = state_bytes(
                            cfg, gpus, args.strategy, adapters if rank else 0, not args.no_ema
                        )
                        acts = activation_bytes(
                            cfg,
                            tokens,
                            text_tokens,
                            checkpointing=checkpointing,
                            lora_rank=rank,
                            lora_targets_per_block=per_block if rank else 0,
                        )
                        parts = {
                            "params": state.params,
                            "grads": state.grads,
                            "optimizer": state.optimizer,
                            "ema": state.ema,
                            "activations": acts.total,
                        }
                        parts["total"] = sum(parts.values())
                        rows.append(
                            {
                                "preset": preset,
                                "clip": clip,
                                "tokens": tokens,
                                "mode": mode,
                                "gpus": gpus,
                                "checkpointing": checkpointing,
                                "bytes": parts,
                                "gib": {k: round(v / GIB, 2) for k, v in parts.items()},
                            }
                        )
    return rows


def markdown_table(rows: list[dict]) -> str:
    """The rows as a Markdown table in GiB per GPU (docs/wan-finetune-memory-*.md)."""
    head = "| model | clip (tokens) | mode | GPUs | ckpt | params | grads | optim | EMA | acts | total |"
    lines = [head, "|" + "---|" * 11]
    for row in rows:
        gib = row["gib"]
        cells = [
            row["preset"],
            f"{row['clip']} ({row['tokens']:,})",
            row["mode"],
            str(row["gpus"]),
            "on" if row["checkpointing"] else "off",
            *(
                f"{gib[k]:.1f}"
                for k in ("params", "grads", "optimizer", "ema", "activations", "total")
            ),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def memory_plan(args: argparse.Namespace) -> dict[str, object]:
    """The rows plus the parameter counts and the assumptions behind every number."""
    targets = parse_targets(args.lora_targets)
    models = {}
    for preset in args.presets:
        cfg = load_preset(preset)
        models[preset] = {
            "params": count_params(cfg),
            "lora_params": lora_params(cfg, args.lora_rank, targets) if args.lora_rank else 0,
            "lora_linears": len(lora_targets(cfg, targets)),
        }
    weight, grad, optimizer = STRATEGY_BYTES[args.strategy]
    assumptions = {
        "precision": "bf16 mixed precision, AdamW",
        "strategy": f"{args.strategy}: every parameter sharded over the GPUs (ZeRO-3 / FSDP2)",
        "bytes_per_trainable_param": {"weights": weight, "grads": grad, "optimizer": optimizer},
        "frozen_params": "LoRA: the base in bf16 (2 bytes), no gradient or optimizer state",
        "gathered": "on >1 GPU, params adds the bf16 copies of 2 blocks (computing + prefetched)",
        "ema": "none"
        if args.no_ema
        else "stored like the DiT's weights: the whole DiT in a full fine-tune; under LoRA the "
        "adapters only (it shares the frozen base), a copy of the base too under fsdp2",
        "activations": (
            f"saved for backward, {ACTIVATION_BYTES}-byte, one clip per GPU, attention saving "
            "O(tokens) (flash/cuDNN); checkpointing: each block's input plus one block rebuilt; "
            "not counted: backward's transient gradients, allocator slack, the VAE and text "
            "encoder (cached latents and text states)"
        ),
        "text_tokens": args.text_len or WAN_TEXT_TOKENS,
        "lora": {
            "rank": args.lora_rank,
            "target_modules": args.lora_targets.split(","),
            "peft_regex": targets,
            "dropout": 0.0,
        },
    }
    return {"assumptions": assumptions, "models": models, "rows": memory_rows(args)}


def main(argv: list[str] | None = None) -> dict[str, object]:
    """Print and return {"params", "flops_forward", "tokens", "token_grid"} for one clip, or
    with --memory the memory plan."""
    args = parse_args(argv)
    if args.memory:
        try:
            plan = memory_plan(args)
        except ValueError as error:
            raise SystemExit(str(error)) from None
        print(markdown_table(plan["rows"]) if args.markdown else json.dumps(plan, indent=1))
        return plan
    cfg = load_preset(args.preset)
    text_len = 120 if args.text_len is None else args.text_len
    try:
        grid = latent_token_grid(
            cfg, load_vae_preset(args.vae or "default"), args.frames, args.height, args.width
        )
    except ValueError as error:
        raise SystemExit(str(error)) from None
    stats = {
        "params": count_params(cfg),
        "flops_forward": dit_forward_flops(cfg, [grid], [text_len]),
        "tokens": grid[0] * grid[1] * grid[2],
        "token_grid": list(grid),
    }
    print(json.dumps(stats))
    return stats


if __name__ == "__main__":
    main()
