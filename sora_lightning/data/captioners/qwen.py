"""Qwen2-VL and Qwen2.5-VL: clips -> patches, grids and a chat prompt -> generated captions.

Why our own patching: transformers' Qwen2-VL video processor needs torchvision, which is not
installed everywhere (its PyPI wheel is CUDA-linked). The patching is a fixed reshape (the one
in `Qwen2VLVideoProcessor.patchify`), done here in numpy on frames already resized at decode
time; a test checks it against transformers' PIL image processor. Shape legend: T frames,
H W pixels, C colour channels, p patch side, m merge side, tp frames per temporal patch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sora_lightning.data.captioners.base import Clip, chat_template, instruction_for, load_vlm

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MODALITY = {"text": 0, "image": 1, "video": 2}
"""`mm_token_type_ids` values (transformers 5 needs them to place the 3D rotary positions)."""


@dataclass(frozen=True)
class QwenVision:
    """The processor settings that shape a Qwen-VL model's visual tokens."""

    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD

    @classmethod
    def from_folder(cls, model_dir: Path) -> QwenVision:
        """preprocessor_config.json (video_preprocessor_config.json first) of the model folder."""
        for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
            path = model_dir / name
            if path.is_file():
                values = json.loads(path.read_text(encoding="utf-8"))
                known = {k: values[k] for k in cls.__dataclass_fields__ if k in values}
                for key in ("image_mean", "image_std"):
                    if key in known:
                        known[key] = tuple(float(v) for v in known[key])
                return cls(**known)
        return cls()

    @property
    def multiple(self) -> int:
        """Frame sides must split into merged patches."""
        return self.patch_size * self.merge_size

    def patchify(self, frames: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
        """uint8 [T, H, W, C] -> float32 [t*h*w, C*tp*p*p] and its grid (t, h, w) in patches.

        T is padded with the last frame to a multiple of tp (an image becomes tp equal frames),
        as transformers' Qwen2-VL processors do.
        """
        tp, p, m = self.temporal_patch_size, self.patch_size, self.merge_size
        pixels = frames.astype(np.float32) * np.float32(1 / 255)
        mean = np.asarray(self.image_mean, dtype=np.float32)
        std = np.asarray(self.image_std, dtype=np.float32)
        pixels = ((pixels - mean) / std).transpose(0, 3, 1, 2)  # T C H W
        if pad := -len(pixels) % tp:
            pixels = np.concatenate([pixels, np.repeat(pixels[-1:], pad, axis=0)])
        num_t, channels, height, width = pixels.shape
        grid = (num_t // tp, height // p, width // p)
        patches = pixels.reshape(grid[0], tp, channels, grid[1] // m, m, p, grid[2] // m, m, p)
        patches = patches.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)  # t h/m w/m m m C tp p p
        return patches.reshape(grid[0] * grid[1] * grid[2], -1), grid


class QwenVLAdapter:
    """Captions with a Qwen2-VL or Qwen2.5-VL model from a local folder."""

    FAMILIES = ("qwen2_vl", "qwen2_5_vl")

    def __init__(
        self, model: torch.nn.Module, tokenizer, vision: QwenVision, family: str, template=None
    ) -> None:
        self.model, self.tokenizer, self.vision, self.family = model, tokenizer, vision, family
        self.template: str | None = template
        self.multiple = vision.multiple
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.pad_ids = {kind: self._token_id(f"<|{kind}_pad|>") for kind in ("image", "video")}

    @classmethod
    def load(
        cls, model_dir: str | Path, dtype: str = "auto", device: str = "auto"
    ) -> QwenVLAdapter:
        """Model, tokenizer and processor settings from `model_dir`; nothing is downloaded."""
        model_dir = Path(model_dir)
        model, tokenizer = load_vlm(model_dir, dtype, device)
        family = str(model.config.model_type)
        vision, template = QwenVision.from_folder(model_dir), chat_template(model_dir)
        return cls(model, tokenizer, vision, family, template)

    def _token_id(self, token: str) -> int:
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == self.tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer of this {self.family} model has no {token} token")
        return int(token_id)

    def _prompt(self, clip: Clip, instruction: str, num_tokens: int) -> str:
        """The chat prompt with the clip's placeholder expanded to its number of visual tokens."""
        kind = "image" if clip.is_image else "video"
        messages = [
            {"role": "user", "content": [{"type": kind}, {"type": "text", "text": instruction}]}
        ]
        text = self.tokenizer.apply_chat_template(
            messages, chat_template=self.template, tokenize=False, add_generation_prompt=True
        )
        pad = f"<|{kind}_pad|>"
        if text.count(pad) != 1:
            raise ValueError(
                f"the chat template of this {self.family} model gave {text.count(pad)} {pad} "
                "placeholders for one clip, expected 1"
            )
        return text.replace(pad, pad * num_tokens)

    def inputs(self, clips: list[Clip], instruction: str) -> dict[str, torch.Tensor]:
        """The model's keyword inputs for a batch of clips (images and videos may mix)."""
        merge = self.vision.merge_size**2
        pixels: dict[str, list[np.ndarray]] = {"image": [], "video": []}
        grids: dict[str, list[tuple[int, int, int]]] = {"image": [], "video": []}
        seconds, prompts = [], []
        for clip in clips:
            kind = "image" if clip.is_image else "video"
            patches, grid = self.vision.patchify(clip.frames)
            pixels[kind].append(patches)
            grids[kind].append(grid)
            if kind == "video":
                fps = clip.sampled_fps or 1.0
                seconds.append(self.vision.temporal_patch_size / fps)
            text = instruction_for(instruction, clip)
            prompts.append(self._prompt(clip, text, int(np.prod(grid)) // merge))
        batch = dict(self.tokenizer(prompts, return_tensors="pt", padding=True))
        ids = batch["input_ids"]
        token_types = torch.zeros_like(ids)
        for kind, token_id in self.pad_ids.items():
            token_types[ids == token_id] = MODALITY[kind]
        batch["mm_token_type_ids"] = token_types
        names = {
            "image": ("pixel_values", "image_grid_thw"),
            "video": ("pixel_values_videos", "video_grid_thw"),
        }
        for kind, (values, grid) in names.items():
            if pixels[kind]:
                batch[values] = torch.from_numpy(np.concatenate(pixels[kind])).to(self.dtype)
                batch[grid] = torch.tensor(grids[kind], dtype=torch.long)
        if seconds and self.family == "qwen2_5_vl":
            batch["second_per_grid_ts"] = torch.tensor(seconds, dtype=torch.float32)
        return {k: v.to(self.device) for k, v in batch.items()}

    @torch.inference_mode()
    def caption(self, clips: list[Clip], instruction: str, max_new_tokens: int) -> list[str]:
        """Greedy captions of a batch of clips, special tokens and surrounding spaces removed."""
        batch = self.inputs(clips, instruction)
        out = self.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
        new = out[:, batch["input_ids"].shape[1] :]
        return [text.strip() for text in self.tokenizer.batch_decode(new, skip_special_tokens=True)]
