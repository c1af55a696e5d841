"""Tiny random-weight vision-language models saved to a folder, as a user's model would be.

Why: no weights download here, and recaptioning must be tested through the very loading path a
user's model takes (`AutoModelForImageTextToText.from_pretrained(path)`, its tokenizer and its
preprocessor_config.json). So the folder is built from configs: a byte-level BPE tokenizer with
the Qwen2-VL special tokens and a chat template of the same shape as Qwen's, a tiny
Qwen2-VL / Qwen2.5-VL model whose token ids match that tokenizer, and the processor settings.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""The layout of Qwen2-VL's template: one placeholder per image or video, expanded by the
processor (here: the adapter) into as many pad tokens as the vision tower gives."""

CORPUS = [
    "a red circle moves left across a grey background",
    "a blue square grows slowly while a green triangle moves up",
    "describe this video in detail: the objects, their colours, how they move",
    "the camera is still; a yellow triangle drifts to the right and shrinks",
    "a magenta square moves quickly toward the top of the frame",
]


def build_qwen_tokenizer(directory: Path) -> object:
    """A byte-level BPE tokenizer with Qwen2-VL's special tokens and chat template, saved."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=list(QWEN_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(CORPUS * 20, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        padding_side="left",
    )
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    tokenizer.save_pretrained(directory)
    return tokenizer


def _text_config(vocab_size: int, tokenizer: object) -> dict:
    return {
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [1, 1, 2],
        },
        "bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
        "pad_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    }


def _vision_config(family: str) -> dict:
    common = {"depth": 1, "num_heads": 2, "patch_size": 14, "spatial_merge_size": 2}
    common["temporal_patch_size"] = 2
    if family == "qwen2_vl":
        return {**common, "embed_dim": 32, "hidden_size": 32, "mlp_ratio": 2}
    return {
        **common,
        "hidden_size": 32,
        "intermediate_size": 64,
        "out_hidden_size": 32,
        "window_size": 56,
        "fullatt_block_indexes": [0],
        "tokens_per_second": 2,
    }


def build_tiny_qwen_vl(directory: Path, family: str = "qwen2_vl", seed: int = 0) -> Path:
    """Save a tiny random Qwen2-VL (`family="qwen2_vl"`) or Qwen2.5-VL ("qwen2_5_vl") folder."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
    )

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_qwen_tokenizer(directory)
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in QWEN_SPECIAL_TOKENS}
    config_class, model_class = {
        "qwen2_vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration),
        "qwen2_5_vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration),
    }[family]
    config = config_class(
        text_config=_text_config(len(tokenizer), tokenizer),
        vision_config=_vision_config(family),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    model = model_class(config).eval()
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.save_pretrained(directory)
    processor = {
        "image_processor_type": "Qwen2VLImageProcessor",
        "patch_size": 14,
        "merge_size": 2,
        "temporal_patch_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "min_pixels": 56 * 56,
        "max_pixels": 28 * 28 * 1280,
    }
    (directory / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))
    return directory


LLAVA_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>")
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'video' %}<video>\n"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""The layout of LLaVA-OneVision's processor template (chat_template.json in published folders)."""


def build_tiny_llava_onevision(directory: Path, seed: int = 0) -> Path:
    """Save a tiny random LLaVA-OneVision folder: SigLIP tower on 56-pixel frames, Qwen2 text.

    The chat template is saved as the processor's chat_template.json (as published folders
    keep it) while the tokenizer keeps none, so the adapter must read the processor's.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        PreTrainedTokenizerFast,
    )

    directory.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=list(LLAVA_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(CORPUS * 20, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tokenizer.save_pretrained(directory)
    (directory / "chat_template.json").write_text(
        json.dumps({"chat_template": LLAVA_CHAT_TEMPLATE})
    )
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in LLAVA_SPECIAL_TOKENS}
    vision = {
        "model_type": "siglip_vision_model",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "patch_size": 14,
        "image_size": 56,
        "vision_use_head": False,
    }
    text = {
        "model_type": "qwen2",
        **{
            k: v
            for k, v in _text_config(len(tokenizer), tokenizer).items()
            if k != "rope_parameters"
        },
    }
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=ids["<image>"],
        video_token_index=ids["<video>"],
        image_grid_pinpoints=[[56, 56]],
    )
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.save_pretrained(directory)
    processor = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    (directory / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))
    return directory
