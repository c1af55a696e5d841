"""Tiny random-weight Wan 2.1 parts, built offline from configs (diffusers 0.42, transformers 5).

Nothing downloads: the VAE and the UMT5 encoder are built from small configs, the tokenizer is a
byte-level BPE trained with `tokenizers` on a few sentences, with T5's special tokens (`<pad>` 0,
`</s>` 1 appended to every caption, `<unk>` 2). Reusable by any test that needs a Wan part:

    vae = tiny_wan_vae()                    # diffusers AutoencoderKLWan, 8x space, 4x time
    folder = tiny_umt5_folder(tmp_path)     # config.json + weights + tokenizer files
"""

from __future__ import annotations

from pathlib import Path

import torch

TINY_WAN_VAE = {
    "base_dim": 3,
    "z_dim": 16,
    "dim_mult": [1, 1, 1, 1],
    "num_res_blocks": 1,
    "temperal_downsample": [False, True, True],
}
"""The smallest AutoencoderKLWan that keeps the published shape: 8x space, 4x time, 16 channels."""

TINY_UMT5 = {
    "vocab_size": 200,
    "d_model": 16,
    "d_kv": 8,
    "d_ff": 32,
    "num_layers": 2,
    "num_heads": 2,
    "relative_attention_num_buckets": 8,
}
"""A two-layer UMT5 encoder of width 16 (the real umt5-xxl is 4096 wide, 24 layers)."""

SENTENCES = [
    "a red ball rolls to the left across a wooden table",
    "two cats sleep on a sofa near the window at sunset",
    "a person walks a dog along the beach in the morning",
    "the camera pans right over a snowy mountain village",
    "a blue car drives down a wet street at night",
    "waves crash against rocks under a grey cloudy sky",
]


def tiny_wan_vae(seed: int = 0, **overrides: object):
    """A random-weight `AutoencoderKLWan` (float32, eval mode) of `TINY_WAN_VAE` + overrides.

    Wan's published latents_mean/latents_std (the config defaults) are kept: they are what the
    wrapper's normalisation must apply.
    """
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    return AutoencoderKLWan(**{**TINY_WAN_VAE, **overrides}).eval()


def tiny_t5_tokenizer():
    """A `PreTrainedTokenizerFast` with T5's special tokens; every caption ends with `</s>`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_UMT5["vocab_size"], special_tokens=["<pad>", "</s>", "<unk>"]
    )
    tokenizer.train_from_iterator(SENTENCES * 4, trainer=trainer)
    eos = tokenizer.token_to_id("</s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", eos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


def tiny_umt5_encoder(seed: int = 0):
    """A random-weight `UMT5EncoderModel` of `TINY_UMT5` in eval mode."""
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    config = UMT5Config(**TINY_UMT5, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return UMT5EncoderModel(config).eval()


def tiny_umt5_folder(root: Path, seed: int = 0) -> Path:
    """Save a tiny UMT5 encoder and its tokenizer into `root/umt5` (a local model folder)."""
    folder = Path(root) / "umt5"
    tiny_umt5_encoder(seed).save_pretrained(folder)
    tiny_t5_tokenizer().save_pretrained(folder)
    return folder
