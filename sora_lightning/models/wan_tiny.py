"""Tiny random-weight Wan 2.1 parts, built offline from configs (diffusers, transformers).

Why in the package: the parity tests (tests/wan_fixtures.py re-exports these) and
tools/bench/wan_parity.py, which reports the tests' differences, must build the very same
models, and a tool may not import tests/. Nothing downloads: the transformer, VAE and UMT5
encoder come from small configs with seeded random weights, the tokenizer is a byte-level BPE
trained with `tokenizers` on a few sentences, with T5's special tokens (`<pad>` 0, `</s>` 1
appended to every caption, `<unk>` 2). Nothing here reads or writes files.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

TINY_WAN_VAE: dict[str, Any] = {
    "base_dim": 3,
    "z_dim": 16,
    "dim_mult": [1, 1, 1, 1],
    "num_res_blocks": 1,
    "temperal_downsample": [False, True, True],
}
"""The smallest AutoencoderKLWan that keeps the published shape: 8x space, 4x time, 16 channels."""

TINY_UMT5: dict[str, int] = {
    "vocab_size": 200,
    "d_model": 16,
    "d_kv": 8,
    "d_ff": 32,
    "num_layers": 2,
    "num_heads": 2,
    "relative_attention_num_buckets": 8,
}
"""A two-layer UMT5 encoder of width 16 (the real umt5-xxl is 4096 wide, 24 layers)."""

TINY_TRANSFORMER: dict[str, Any] = {
    "num_attention_heads": 2,
    "attention_head_dim": 12,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 16,
    "freq_dim": 32,
    "ffn_dim": 32,
    "num_layers": 2,
    "patch_size": (1, 2, 2),
    "rope_max_seq_len": 32,
}
"""A two-block WanTransformer3DModel reading the tiny UMT5's 16-wide states and 16 VAE channels."""

SENTENCES = [
    "a red ball rolls to the left across a wooden table",
    "two cats sleep on a sofa near the window at sunset",
    "a person walks a dog along the beach in the morning",
    "the camera pans right over a snowy mountain village",
    "a blue car drives down a wet street at night",
    "waves crash against rocks under a grey cloudy sky",
]


def randomize(model: nn.Module, seed: int) -> None:
    """Every parameter random, norm gains around 1, so no mapping hides behind an init value."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1 + 0.2 * noise if "norm" in name else 0.15 * noise)


def tiny_wan_transformer(seed: int = 0, **overrides: Any) -> nn.Module:
    """A `WanTransformer3DModel` of `TINY_TRANSFORMER` + overrides, every weight random (eval)."""
    from diffusers import WanTransformer3DModel

    transformer = WanTransformer3DModel(**{**TINY_TRANSFORMER, **overrides}).eval()
    randomize(transformer, seed)
    return transformer


def tiny_wan_vae(seed: int = 0, **overrides: Any) -> nn.Module:
    """A random-weight `AutoencoderKLWan` (float32, eval mode) of `TINY_WAN_VAE` + overrides.

    Wan's published latents_mean/latents_std (the config defaults) are kept: they are what the
    wrapper's normalisation must apply.
    """
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    return AutoencoderKLWan(**{**TINY_WAN_VAE, **overrides}).eval()


def tiny_t5_tokenizer() -> Any:
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


def tiny_umt5_encoder(seed: int = 0) -> nn.Module:
    """A random-weight `UMT5EncoderModel` of `TINY_UMT5` in eval mode."""
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    config = UMT5Config(**TINY_UMT5, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return UMT5EncoderModel(config).eval()


def tiny_wan_pipeline(shift: float = 3.0) -> Any:
    """A whole random-weight Wan 2.1 T2V `WanPipeline` (float32); `save_pretrained` writes the
    layout of a published diffusers Wan folder."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    return WanPipeline(
        tokenizer=tiny_t5_tokenizer(),
        text_encoder=tiny_umt5_encoder(),
        transformer=tiny_wan_transformer(seed=0),
        vae=tiny_wan_vae(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
    )
