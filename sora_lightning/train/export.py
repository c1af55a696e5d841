"""Export a trained model as one folder of safetensors + JSON that `sora-sample` loads.

Usage: python -m sora_lightning.train.export --dit RUN/dit/final --vae RUN/vae --output RUN/export
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from sora_lightning.train.weights import load_dit, load_vae, read_module_meta, save_module


def export_bundle(dit_dir: str | Path, vae_dir: str | Path, output: str | Path) -> Path:
    """Copy DiT (EMA) and VAE weights into one self-contained folder, re-pointing the VAE path."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    dit, meta = load_dit(dit_dir)
    vae = load_vae(vae_dir)
    extra = {k: v for k, v in meta.items() if k != "config"}
    extra["meta"] = {**extra.get("meta", {}), "vae_dir": "."}
    save_module(dit, dit.config, output, "dit", extra)
    save_module(vae, vae.config, output, "vae", {k: v for k, v in read_module_meta(vae_dir, "vae").items() if k != "config"})
    shutil.copy(Path(dit_dir) / "dit.json", output / "dit.source.json")
    return output


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dit", required=True, help="folder with dit.safetensors + dit.json")
    parser.add_argument("--vae", required=True, help="folder with vae.safetensors + vae.json")
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    print(f"exported to {export_bundle(args.dit, args.vae, args.output)}")


if __name__ == "__main__":
    main()
