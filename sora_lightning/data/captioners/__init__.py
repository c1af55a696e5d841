"""Vision-language model adapters for recaptioning (`data/captioning.py`), one per model family.

Why adapters: every VLM family packs frames into its own tokens (Qwen2-VL cuts 14-pixel patches
merged 2x2 with two frames per temporal patch; LLaVA-OneVision pools whole frames), and some
processors need packages that are not installed everywhere (Qwen2-VL's video processor needs
torchvision). An adapter turns already-decoded clips into the model's inputs and its output ids
into text; everything else (shards, batching, resuming) is the same for every family.
"""

from __future__ import annotations

import json
from pathlib import Path

from sora_lightning.data.captioners.base import Clip, VLMAdapter
from sora_lightning.data.captioners.llava_onevision import LlavaOnevisionAdapter
from sora_lightning.data.captioners.qwen import QwenVLAdapter

ADAPTERS: dict[str, type[QwenVLAdapter] | type[LlavaOnevisionAdapter]] = {
    **{family: QwenVLAdapter for family in QwenVLAdapter.FAMILIES},
    **{family: LlavaOnevisionAdapter for family in LlavaOnevisionAdapter.FAMILIES},
}
"""config.json `model_type` -> the adapter that captions with it."""


def model_family(model_dir: str | Path) -> str:
    """The `model_type` in a model folder's config.json (what picks its adapter)."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: caption.model must be a local Hugging Face model folder "
            "(config.json, weights, tokenizer, preprocessor_config.json)"
        )
    return str(json.loads(path.read_text(encoding="utf-8")).get("model_type", ""))


def load_adapter(model_dir: str | Path, dtype: str = "auto", device: str = "auto") -> VLMAdapter:
    """The adapter of the model in `model_dir`, loaded; an unknown family is refused by name."""
    family = model_family(model_dir)
    if family not in ADAPTERS:
        raise ValueError(
            f"caption.model={model_dir} is a {family!r} model; recaptioning knows {sorted(ADAPTERS)}"
            " (add an adapter in sora_lightning/data/captioners/)"
        )
    return ADAPTERS[family].load(model_dir, dtype=dtype, device=device)


__all__ = ["ADAPTERS", "Clip", "VLMAdapter", "load_adapter", "model_family"]
