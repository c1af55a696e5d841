"""Sampling runs the networks where their weights are; the sampler's state stays on the CPU."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from sora_lightning.diffusion.sampling import SamplingConfig
from sora_lightning.models.dit import DiT
from sora_lightning.models.text import TextEncoder, TextEncoderConfig
from sora_lightning.models.vae import VideoVAE
from sora_lightning.sample.generate import VideoGenerator
from sora_lightning.utils import pick_device

CONF = "conf/model"


def test_auto_is_the_cpu_without_a_gpu_and_a_missing_gpu_is_refused() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert pick_device("auto") == torch.device("cpu")
    assert pick_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="no CUDA GPU is visible"):
        pick_device("cuda:0")


def test_to_moves_every_network_and_keeps_the_seeded_video(one_thread: None) -> None:
    torch.manual_seed(0)
    dit = DiT(instantiate(OmegaConf.load(f"{CONF}/dit/tiny.yaml")))
    vae = VideoVAE(instantiate(OmegaConf.load(f"{CONF}/vae/tiny.yaml")))
    text = TextEncoder(TextEncoderConfig(max_length=16))
    generator = VideoGenerator(dit, vae, text, torch.zeros(4), torch.ones(4), expand_prompts=False)
    config = SamplingConfig(frames=5, height=16, width=16, steps=2, seed=3)
    before = generator.generate("a red circle", config).frames
    target = "cuda" if torch.cuda.is_available() else "cpu"
    assert generator.to(target) is generator
    for network in (generator.dit, generator.vae, generator.text_encoder):
        assert {p.device.type for p in network.parameters()} == {target}
    after = generator.generate("a red circle", config).frames
    if target == "cpu":
        assert (after == before).all()  # same seed, same device: the same video
    else:  # kernels differ across devices; the noise does not
        assert abs(after.astype(int) - before.astype(int)).mean() < 8
