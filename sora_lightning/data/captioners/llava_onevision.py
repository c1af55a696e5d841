"""LLaVA-OneVision: clips -> square frames and a chat prompt -> generated captions.

Why our own preprocessing: transformers' LLaVA-OneVision video processor needs torchvision. A
video's frames are each resized to the vision tower's square input (as that processor does),
rescaled and normalised; the model pools each frame's patch grid 2x and appends one newline
feature, so a video of T frames takes T * ceil(g/2)^2 + 1 tokens (g = image_size / patch_size).
Images go through the same video path as one-frame clips (no anyres tiling): one code path, and
a still image needs no tiles for a caption.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sora_lightning.data.captioners.base import (
    Clip,
    chat_template,
    instruction_for,
    load_vlm,
)


class LlavaOnevisionAdapter:
    """Captions with a LLaVA-OneVision model from a local folder."""

    FAMILIES = ("llava_onevision",)
    multiple = 1
    """Any decoded size: every frame is resized to the tower's square input here."""

    def __init__(self, model: torch.nn.Module, tokenizer, model_dir: Path) -> None:
        self.model, self.tokenizer, self.family = model, tokenizer, "llava_onevision"
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        vision = model.config.vision_config
        self.side = int(vision.image_size)
        self.tokens_per_frame = math.ceil(self.side / vision.patch_size / 2) ** 2
        values = {}
        for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
            if (model_dir / name).is_file():
                values = json.loads((model_dir / name).read_text(encoding="utf-8"))
                break
        self.mean = np.asarray(values.get("image_mean", (0.5, 0.5, 0.5)), dtype=np.float32)
        self.std = np.asarray(values.get("image_std", (0.5, 0.5, 0.5)), dtype=np.float32)
        self.template = chat_template(model_dir)

    @classmethod
    def load(
        cls, model_dir: str | Path, dtype: str = "auto", device: str = "auto"
    ) -> LlavaOnevisionAdapter:
        """Model and tokenizer from `model_dir`; nothing is downloaded."""
        model_dir = Path(model_dir)
        model, tokenizer = load_vlm(model_dir, dtype, device)
        return cls(model, tokenizer, model_dir)

    def pixels(self, frames: np.ndarray) -> np.ndarray:
        """uint8 [T, H, W, 3] -> float32 [T, 3, side, side], resized bicubic and normalised."""
        size = (self.side, self.side)
        resized = np.stack(
            [np.asarray(Image.fromarray(f).resize(size, Image.Resampling.BICUBIC)) for f in frames]
        )
        values = resized.astype(np.float32) * np.float32(1 / 255)
        return ((values - self.mean) / self.std).transpose(0, 3, 1, 2)

    def _prompt(self, instruction: str, num_frames: int) -> str:
        messages = [
            {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": instruction}]}
        ]
        text = self.tokenizer.apply_chat_template(
            messages, chat_template=self.template, tokenize=False, add_generation_prompt=True
        )
        if text.count("<video>") != 1:
            raise ValueError(
                f"the chat template of this LLaVA-OneVision model gave {text.count('<video>')} "
                "<video> placeholders for one clip, expected 1"
            )
        return text.replace("<video>", "<video>" * (num_frames * self.tokens_per_frame + 1))

    def inputs(self, clips: list[Clip], instruction: str) -> dict[str, torch.Tensor]:
        """The model's inputs for clips of one frame count (a video batch is one 5-D tensor)."""
        if len({len(clip.frames) for clip in clips}) != 1:
            raise ValueError("one LLaVA-OneVision batch takes clips of one frame count")
        prompts = [self._prompt(instruction_for(instruction, c), len(c.frames)) for c in clips]
        batch = dict(self.tokenizer(prompts, return_tensors="pt", padding=True))
        videos = np.stack([self.pixels(clip.frames) for clip in clips])
        batch["pixel_values_videos"] = torch.from_numpy(videos).to(self.dtype)
        return {k: v.to(self.device) for k, v in batch.items()}

    @torch.inference_mode()
    def caption(self, clips: list[Clip], instruction: str, max_new_tokens: int) -> list[str]:
        """Greedy captions; clips are grouped by frame count, answers come back in order."""
        captions: dict[int, str] = {}
        groups: dict[int, list[int]] = {}
        for index, clip in enumerate(clips):
            groups.setdefault(len(clip.frames), []).append(index)
        for indices in groups.values():
            batch = self.inputs([clips[i] for i in indices], instruction)
            out = self.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
            new = out[:, batch["input_ids"].shape[1] :]
            texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
            captions.update(zip(indices, (t.strip() for t in texts), strict=True))
        return [captions[i] for i in range(len(clips))]
