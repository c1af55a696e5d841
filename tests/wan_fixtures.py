"""Tiny random-weight Wan 2.1 parts, built offline from configs (diffusers 0.42, transformers 5).

The builders live in `sora_lightning.models.wan_tiny`, so tools/bench/wan_parity.py builds the
very models these tests compare (a tool may not import tests/); they are re-exported here for the
tests. Reusable by any test that needs a Wan part:

    vae = tiny_wan_vae()                    # diffusers AutoencoderKLWan, 8x space, 4x time
    folder = tiny_umt5_folder(tmp_path)     # config.json + weights + tokenizer files
"""

from __future__ import annotations

from pathlib import Path

from sora_lightning.models.wan_tiny import (
    SENTENCES,
    TINY_TRANSFORMER,
    TINY_UMT5,
    TINY_WAN_VAE,
    randomize,
    tiny_t5_tokenizer,
    tiny_umt5_encoder,
    tiny_wan_pipeline,
    tiny_wan_transformer,
    tiny_wan_vae,
)

__all__ = [
    "SENTENCES",
    "TINY_TRANSFORMER",
    "TINY_UMT5",
    "TINY_WAN_VAE",
    "randomize",
    "tiny_t5_tokenizer",
    "tiny_umt5_encoder",
    "tiny_umt5_folder",
    "tiny_wan_pipeline",
    "tiny_wan_transformer",
    "tiny_wan_vae",
]


def tiny_umt5_folder(root: Path, seed: int = 0) -> Path:
    """Save a tiny UMT5 encoder and its tokenizer into `root/umt5` (a local model folder)."""
    folder = Path(root) / "umt5"
    tiny_umt5_encoder(seed).save_pretrained(folder)
    tiny_t5_tokenizer().save_pretrained(folder)
    return folder
