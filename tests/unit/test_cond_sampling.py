"""Conditioned generation: given frames come out latent-exact at the start or at the end.

A tiny random DiT and causal VAE (conf/model/*/tiny.yaml) and a stub text encoder: what is tested
is the bookkeeping (which latent frames are held, the mask, the pixel-frame mapping), not quality.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from sora_lightning.diffusion.sampling import SamplingConfig, latent_shape
from sora_lightning.models.dit import DiT
from sora_lightning.models.vae import VideoVAE
from sora_lightning.sample.generate import VideoGenerator
from sora_lightning.train.callbacks import VideoSampleLogger, _PreviewParts

CONF = Path(__file__).resolve().parents[2] / "conf" / "model"
pytestmark = pytest.mark.usefixtures("one_thread")


class StubText:
    """Fixed states per prompt; the empty prompt gets zero tokens' worth of ones."""

    config = SimpleNamespace(max_length=16)

    def encode(self, texts: list[str]) -> SimpleNamespace:
        generator = torch.Generator().manual_seed(len(texts[0]))
        states = torch.randn(1, 4, 384, generator=generator)
        return SimpleNamespace(
            states=states, mask=torch.ones(1, 4, dtype=torch.bool), num_truncated=0
        )


@pytest.fixture(scope="module")
def generator() -> VideoGenerator:
    torch.manual_seed(0)
    dit_cfg = instantiate(OmegaConf.load(CONF / "dit" / "tiny.yaml"))
    dit_cfg.attn_backend = "sdpa"
    dit = DiT(dit_cfg)
    with torch.no_grad():  # off the zero init, so the prediction is not trivially zero
        for param in dit.parameters():
            param.add_(0.05 * torch.randn_like(param))
    vae = VideoVAE(instantiate(OmegaConf.load(CONF / "vae" / "tiny.yaml")))
    stats = torch.zeros(4), torch.ones(4)
    return VideoGenerator(dit, vae, StubText(), *stats, expand_prompts=False)


def clip(frames: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (frames, 16, 16, 3), dtype=np.uint8)


OPTIONS = dict(frames=13, height=16, width=16, steps=2, cfg_scale=2.0)  # 4 latent frames


def test_start_keeps_the_clips_leading_latents(generator: VideoGenerator) -> None:
    given = clip(9)  # 3 latent frames: all kept at positions 0..2, frame 3 generated
    latent, _ = generator.generate_latents("a", SamplingConfig(**OPTIONS), given)
    expected = generator.encode_frames(given)
    assert torch.equal(latent[:, :3], expected)
    assert not torch.allclose(latent[:, 3], torch.zeros_like(latent[:, 3]))


def test_end_keeps_the_clips_trailing_latents(generator: VideoGenerator) -> None:
    given = clip(11)  # cut to its last 9 frames (1 + 4*2): latents 1, 2 -> positions 2, 3
    options = SamplingConfig(**OPTIONS, cond_position="end")
    latent, _ = generator.generate_latents("a", options, given)
    expected = generator.encode_frames(given[2:])[:, 1:]
    assert expected.shape[1] == 2
    assert torch.equal(latent[:, 2:], expected)
    free, _ = generator.generate_latents("a", SamplingConfig(**OPTIONS))
    assert not torch.equal(latent[:, :2], free[:, :2])  # the lead-up sees the given ending


def test_end_mask_and_at_least_one_generated_frame(generator: VideoGenerator) -> None:
    shape = generator.latent_shape(SamplingConfig(**OPTIONS))
    long_clip = clip(33)  # 8 trailing latents offered, only 3 of 4 positions may be held
    clean, mask = generator._conditioning(long_clip, shape, "end")
    per_frame = (shape[2] // 2) * (shape[3] // 2)
    assert mask.tolist() == [0.0] * per_frame + [1.0] * (3 * per_frame)
    assert torch.count_nonzero(clean[:per_frame]) == 0


def test_end_with_an_image_holds_it_still_for_the_last_latent(generator: VideoGenerator) -> None:
    image = clip(1)[0]
    latent, _ = generator.generate_latents(
        "a", SamplingConfig(**OPTIONS, cond_position="end"), image
    )
    still = generator.encode_frames(np.repeat(image[None], 5, axis=0))[:, 1:]
    assert torch.equal(latent[:, 3:], still)
    frames = generator.generate("a", SamplingConfig(**OPTIONS, cond_position="end"), image).frames
    assert frames.shape == (13, 16, 16, 3)


def test_bad_cond_position_is_refused() -> None:
    with pytest.raises(ValueError, match="cond_position"):
        SamplingConfig(cond_position="middle")


def test_image_first_samples_the_first_frame_as_an_image(generator: VideoGenerator) -> None:
    """Factorised text-to-video: latent frame 0 is exactly the 1-frame sample of the same seed
    (the image pass), and the later frames are generated conditioned on it."""
    image, _ = generator.generate_latents(
        "a red circle", SamplingConfig(**{**OPTIONS, "frames": 1})
    )
    video, _ = generator.generate_latents(
        "a red circle", SamplingConfig(**OPTIONS, image_first=True)
    )
    joint, _ = generator.generate_latents("a red circle", SamplingConfig(**OPTIONS))
    assert video.shape == joint.shape == (4, 4, 4, 4)
    torch.testing.assert_close(video[:, :1], image, rtol=0, atol=0)
    assert not torch.allclose(video[:, :1], joint[:, :1])


def test_cfg_interval_guides_only_inside_it(generator: VideoGenerator) -> None:
    """Outside the interval the solver uses the conditional velocity alone: an interval that no
    step's t falls in samples like cfg_scale=1; one covering every step like no interval."""
    plain = {**OPTIONS, "steps": 3}
    guided, _ = generator.generate_latents("a", SamplingConfig(**plain))
    unguided, _ = generator.generate_latents("a", SamplingConfig(**{**plain, "cfg_scale": 1.0}))
    never, _ = generator.generate_latents("a", SamplingConfig(**plain, cfg_interval=(0.0, 0.0)))
    always, _ = generator.generate_latents("a", SamplingConfig(**plain, cfg_interval=[0.0, 1.0]))
    torch.testing.assert_close(never, unguided, rtol=1e-5, atol=1e-5)
    assert torch.equal(always, guided)
    assert not torch.allclose(guided, unguided, atol=1e-3)
    # Guiding only the last steps (t <= 0.5) leaves the first step unguided: a third result.
    late, _ = generator.generate_latents("a", SamplingConfig(**plain, cfg_interval=(0.0, 0.5)))
    assert not torch.allclose(late, guided, atol=1e-4) and not torch.allclose(
        late, never, atol=1e-4
    )


@pytest.mark.parametrize("interval", [(0.8, 0.2), (0.0, 1.5), (0.5,)])
def test_bad_cfg_interval_is_refused(interval: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match="cfg_interval"):
        SamplingConfig(cfg_interval=interval)


def test_frames_must_fit_the_vaes_temporal_factor() -> None:
    config = SamplingConfig(frames=7, height=16, width=16)
    kwargs = dict(channels=4, spatial_factor=4, patch=(1, 2, 2))
    assert latent_shape(config, temporal_factor=2, **kwargs) == (4, 4, 4, 4)
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        latent_shape(config, temporal_factor=4, **kwargs)


def test_training_previews_sample_like_sora_sample(generator: VideoGenerator) -> None:
    """The preview callback and `VideoGenerator` share one solve: same config, same frames."""
    config = SamplingConfig(**OPTIONS, seed=3)
    expanding = VideoGenerator(
        generator.dit, generator.vae, generator.text_encoder, torch.zeros(4), torch.ones(4)
    )
    logger = VideoSampleLogger(["a red circle moves left"], every_n_steps=1, sampling=config)
    logger._parts = _PreviewParts(
        generator.vae,
        generator.text_encoder,
        generator._null_text(),
        torch.zeros(4, 1, 1, 1),
        torch.ones(4, 1, 1, 1),
    )
    preview = logger.render(SimpleNamespace(ema=generator.dit), "a red circle moves left", config)
    sampled = expanding.generate("a red circle moves left", config).frames
    assert preview.shape == (13, 16, 16, 3)
    np.testing.assert_array_equal(preview, sampled)
