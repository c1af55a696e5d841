"""Test material for provenance and safety: a certificate chain, tiny videos, tiny classifiers.

Everything is made here, offline: a root CA and an ES256 end-entity certificate with EKU
emailProtection (the chain C2PA accepts by default, FACTS.md), and random-weight BERT/ViT
classifiers whose verdict is fixed by the classifier bias (weights zeroed), saved with their
tokenizer / image processor like a downloaded model folder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sora_lightning.sample.certificates import Chain, make_chain  # noqa: F401 (for the tests)
from sora_lightning.sample.generate import GeneratedVideo

PROMPT = "a red circle moves left"


def tiny_video(prompt: str = PROMPT, seed: int = 3, num_frames: int = 5) -> GeneratedVideo:
    """A 16x16 random clip with a full generation record, as `VideoGenerator.generate` returns."""
    frames = np.random.default_rng(seed).integers(0, 256, (num_frames, 16, 16, 3), dtype=np.uint8)
    options = {"frames": num_frames, "steps": 2, "seed": seed, "cfg_interval": (0.0, 0.7)}
    return GeneratedVideo(
        frames, prompt, f"A video of {prompt}.", seed, "0123456789abcdef", options
    )


def flip_byte(path: Path, marker: bytes, offset: int = 24) -> Path:
    """Change one byte of the media data after `marker` (mdat in mp4, IDAT in PNG), in place."""
    data = bytearray(path.read_bytes())
    index = data.index(marker) + offset
    data[index] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


def _fix_verdict(model, unsafe: bool) -> None:
    """Zero the classifier so every input gets the same logits: unsafe label 1 at ~0.98, or ~0.02."""
    import torch

    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([0.0, 4.0] if unsafe else [4.0, 0.0]))


def text_classifier(folder: Path, *, unsafe: bool) -> Path:
    """A tiny BERT sequence classifier (labels safe/toxic) with its tokenizer, saved to `folder`."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    words = "a an the red blue circle square moves left right knife".split()
    (folder / "vocab.txt").write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words])
    )
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)
    config = BertConfig(
        vocab_size=5 + len(words),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        id2label={0: "safe", 1: "toxic"},
        label2id={"safe": 0, "toxic": 1},
    )
    model = BertForSequenceClassification(config)
    _fix_verdict(model, unsafe)
    model.save_pretrained(folder)
    return folder


def image_classifier(folder: Path, *, unsafe: bool) -> Path:
    """A tiny ViT image classifier (labels normal/nsfw) with its image processor, saved to `folder`."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    config = ViTConfig(
        image_size=16,
        patch_size=8,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        id2label={0: "normal", 1: "nsfw"},
        label2id={"normal": 0, "nsfw": 1},
    )
    model = ViTForImageClassification(config)
    _fix_verdict(model, unsafe)
    model.save_pretrained(folder)
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(folder)
    return folder
