"""What every VLM adapter takes and gives: decoded clips in, one caption per clip out."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from sora_lightning.utils import pick_device


@dataclass
class Clip:
    """One sample's frames, sampled and resized by the caller (`captioning.read_clip`)."""

    key: str
    """Sample key in its shard."""
    frames: np.ndarray
    """uint8 [T, H, W, 3] RGB; H and W are multiples of the adapter's `multiple`."""
    is_image: bool
    """A still image (one frame), captioned as an image rather than a video."""
    sampled_fps: float = 0.0
    """Frames per second of the sampled frames (Qwen2.5-VL spaces video time positions by it)."""
    indices: tuple[int, ...] = ()
    """Which frames of the clip were sampled (the world captioner reads motion per frame by them)."""
    total_frames: int = 0
    """Frames in the whole clip (1 for an image; 0: not known)."""
    hint: str = ""
    """The sample's own caption under `caption.hint_field` ("" without one): what the source
    says (web alt-text names the subject), shown to the captioner as `{hint}`."""


HINT = "{hint}"
"""Where an instruction takes the clip's hint (`Clip.hint`)."""


def instruction_for(instruction: str, clip: Clip) -> str:
    """The instruction for one clip: `{hint}` replaced by its hint (plain replace, so other
    braces in an instruction stay as written)."""
    return instruction.replace(HINT, clip.hint)


class VLMAdapter(Protocol):
    """A loaded vision-language model that captions batches of clips."""

    family: str
    """config.json `model_type`."""
    multiple: int
    """Frame sides must be multiples of this (the model's pixel stride)."""
    dtype: torch.dtype
    device: torch.device

    def caption(self, clips: list[Clip], instruction: str, max_new_tokens: int) -> list[str]:
        """One caption per clip, in order (greedy decoding: a rerun gives the same text)."""
        ...


def load_vlm(model_dir: Path, dtype: str, device: str) -> tuple[torch.nn.Module, Any]:
    """A VLM folder's model (on `device`, in eval mode) and its left-padding tokenizer; nothing is
    downloaded. Left padding: generation continues every row of a batch at the same position."""
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    where = pick_device(device)
    model = AutoModelForImageTextToText.from_pretrained(
        model_dir, dtype=resolve_dtype(dtype, where), local_files_only=True
    )
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    tokenizer.padding_side = "left"
    return model.to(where).eval(), tokenizer


DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """ "auto": bf16 on a GPU (half the memory, full speed), fp32 on a CPU (bf16 is slow there)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"caption.dtype={dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def chat_template(model_dir: Path) -> str | None:
    """The processor's chat template of a model folder (chat_template.jinja or .json), if any.

    Why: published VLM folders keep the template that places images and videos with the
    processor; the tokenizer's own template may be a text-only one. None: the tokenizer's.
    """
    jinja, packed = model_dir / "chat_template.jinja", model_dir / "chat_template.json"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    if packed.is_file():
        return json.loads(packed.read_text(encoding="utf-8")).get("chat_template")
    return None
