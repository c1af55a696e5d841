"""Print a DiT preset's parameter count and forward FLOPs for one clip shape, as JSON.

    python tools/model_stats.py --preset 600m --frames 33 --height 256 --width 256 --text-len 120

Answers sizing questions (memory, step time, MFU denominators) without building the model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from omegaconf import OmegaConf

from sora_lightning.models.dit import DiTConfig
from sora_lightning.models.stats import count_params, dit_forward_flops, latent_token_grid

PRESET_DIR = Path(__file__).resolve().parents[1] / "conf" / "model" / "dit"


def load_preset(preset: str) -> DiTConfig:
    """conf/model/dit/<preset>.yaml (or a path to a YAML) -> DiTConfig."""
    path = Path(preset) if preset.endswith(".yaml") else PRESET_DIR / f"{preset}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
        raise SystemExit(f"no DiT preset {preset!r}; known presets: {known}")
    fields = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    fields.pop("_target_", None)
    return DiTConfig(**fields)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; pixel sizes are converted through the VAE factors."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="600m", help="name in conf/model/dit or a YAML path")
    parser.add_argument("--frames", type=int, default=33, help="pixel frames T (1 + 4k)")
    parser.add_argument("--height", type=int, default=256, help="pixel height H")
    parser.add_argument("--width", type=int, default=256, help="pixel width W")
    parser.add_argument("--text-len", type=int, default=120, help="caption tokens")
    parser.add_argument("--vae-spatial", type=int, default=8, help="VAE spatial downsampling")
    parser.add_argument("--vae-temporal", type=int, default=4, help="VAE temporal downsampling")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, object]:
    """Print and return {"params", "flops_forward", "tokens", "token_grid"} for one clip."""
    args = parse_args(argv)
    cfg = load_preset(args.preset)
    try:
        grid = latent_token_grid(
            cfg, args.frames, args.height, args.width, args.vae_temporal, args.vae_spatial
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
