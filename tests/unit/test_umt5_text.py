"""UMT5 through our TextEncoder gives WanPipeline's caption states (tiny random encoder, offline).

The equivalence, made explicit: Wan tokenizes to 512 tokens, encodes with the attention mask,
zeroes the states past each caption's length and keeps all 512. Ours pads to the batch's longest
caption, encodes with the mask and zeroes the padding, returning the mask beside the states. So
Wan's states = ours padded with zeros to max_length, and Wan's per-caption lengths = mask.sum(1).
Wan's transformer attends to all 512 positions (no text mask), so a Wan DiT must be given the
padded states, not only the real tokens. Not reproduced: WanPipeline's `prompt_clean` (ftfy,
HTML unescape, whitespace collapse) of the caption text; captions are used as written.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from wan_fixtures import TINY_UMT5, tiny_umt5_folder

from sora_lightning.config import conf_dir
from sora_lightning.models.text import TextEncoder, TextEncoderConfig

PRESET = conf_dir() / "model" / "text" / "umt5.yaml"
CAPTIONS = [
    "a red ball rolls to the left",
    "two cats sleep on a sofa near the window at sunset and the camera pans right",
]


@pytest.fixture(scope="module")
def umt5_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_umt5_folder(tmp_path_factory.mktemp("text"))


def _wan_states(encoder: TextEncoder, captions: list[str], max_length: int) -> torch.Tensor:
    """WanPipeline._get_t5_prompt_embeds on our encoder's tokenizer and model."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    pipe = WanPipeline(
        tokenizer=encoder.tokenizer,
        text_encoder=encoder.model,
        transformer=None,
        vae=None,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )
    with torch.no_grad():
        return pipe._get_t5_prompt_embeds(
            captions, max_sequence_length=max_length, device=torch.device("cpu")
        )


@pytest.mark.parametrize("max_length", [512, 8])
def test_states_equal_wan_pipeline(umt5_folder: Path, max_length: int) -> None:
    """512: both pad, ours to the longest caption; 8: both cut the long caption at 8 tokens."""
    config = TextEncoderConfig(path=str(umt5_folder), max_length=max_length, model_type="umt5")
    encoder = TextEncoder(config)
    ours = encoder.encode(CAPTIONS)
    wan = _wan_states(encoder, CAPTIONS, max_length)
    assert (
        wan.shape == (2, max_length, TINY_UMT5["d_model"]) == (2, max_length, encoder.hidden_size)
    )
    padded = F.pad(ours.states, (0, 0, 0, max_length - ours.states.shape[1]))
    assert (padded - wan).abs().max() <= 1e-5  # padding changes only the float rounding
    assert (ours.states[~ours.mask] == 0).all()
    lengths = ours.mask.sum(1)
    for index, length in enumerate(lengths.tolist()):  # Wan's zeros start at each length
        assert (wan[index, length:] == 0).all() and wan[index, length - 1].abs().max() > 0
    assert ours.num_truncated == (1 if max_length == 8 else 0)


def test_preset_needs_a_umt5_path(umt5_folder: Path) -> None:
    config = instantiate(OmegaConf.load(PRESET), _convert_="all")
    assert (config.max_length, config.layers, config.model_type) == (512, (-1,), "umt5")
    with pytest.raises(FileNotFoundError, match="set model.text.path to a local umt5"):
        TextEncoder(config)
    config.path, config.dtype = str(umt5_folder), "float32"
    assert TextEncoder(config).hidden_size == TINY_UMT5["d_model"]
    with pytest.raises(ValueError, match="holds a 'umt5' model, but model.text.model_type is 't5'"):
        TextEncoder(TextEncoderConfig(path=str(umt5_folder), model_type="t5"))


def test_diffusers_pipeline_folder(umt5_folder: Path, tmp_path: Path) -> None:
    """A Wan diffusers folder keeps the encoder in text_encoder/ and the tokenizer beside it."""
    pipeline = tmp_path / "Wan-tiny"
    shutil.copytree(umt5_folder, pipeline / "text_encoder", ignore=shutil.ignore_patterns("tok*"))
    shutil.copytree(
        umt5_folder, pipeline / "tokenizer", ignore=shutil.ignore_patterns("model*", "config.json")
    )
    (pipeline / "model_index.json").write_text('{"_class_name": "WanPipeline"}')
    single = TextEncoder(TextEncoderConfig(path=str(umt5_folder), max_length=512))
    split = TextEncoder(TextEncoderConfig(path=str(pipeline), max_length=512, model_type="umt5"))
    assert split.path == pipeline / "text_encoder"
    assert split.weights_hash() == single.weights_hash()
    assert torch.equal(split.encode(CAPTIONS).states, single.encode(CAPTIONS).states)
