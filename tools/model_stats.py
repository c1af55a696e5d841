"""Print a DiT preset's parameter count and forward FLOPs for one clip shape, as JSON.

    python tools/model_stats.py --preset 600m --vae default --frames 33 --height 256 --width 256 \
        --text-len 120

Answers sizing questions (memory, step time, MFU denominators) without building the model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from omegaconf import OmegaConf

from sora_lightning.models.dit import DiTConfig
from sora_lightning.models.stats import count_params, dit_forward_flops, latent_token_grid
from sora_lightning.models.vae import VAEConfig

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


def load_vae_preset(preset: str) -> VAEConfig:
    """conf/model/vae/<preset>.yaml (or a path to a YAML) -> VAEConfig: its factors and its
    clip-length rule turn pixel sizes into latent sizes."""
    return VAEConfig(**_load_config("vae", preset))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; pixel sizes are converted through the VAE factors."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="600m", help="name in conf/model/dit or a YAML path")
    parser.add_argument(
        "--frames", type=int, default=33, help="pixel frames T (1 + k x the VAE's temporal factor)"
    )
    parser.add_argument("--height", type=int, default=256, help="pixel height H")
    parser.add_argument("--width", type=int, default=256, help="pixel width W")
    parser.add_argument("--text-len", type=int, default=120, help="caption tokens")
    parser.add_argument(
        "--vae", default="default", help="name in conf/model/vae (8x space, 4x time) or a YAML path"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, object]:
    """Print and return {"params", "flops_forward", "tokens", "token_grid"} for one clip."""
    args = parse_args(argv)
    cfg = load_preset(args.preset)
    try:
        grid = latent_token_grid(
            cfg, load_vae_preset(args.vae), args.frames, args.height, args.width
        )
    except ValueError as error:
        raise SystemExit(str(error)) from None
    stats = {
        "params": count_params(cfg),
        "flops_forward": dit_forward_flops(cfg, [grid], [args.text_len]),
        "tokens": grid[0] * grid[1] * grid[2],
        "token_grid": list(grid),
    }
    print(json.dumps(stats))
    return stats


if __name__ == "__main__":
    main()
