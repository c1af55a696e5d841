"""Editing (SDEdit) and connecting two clips: what comes out latent-exact, and what is refused.

A tiny random DiT and causal VAE (conf/model/*/tiny.yaml, 4x time) and a stub text encoder: the
bookkeeping is tested (noise levels, schedules, masks, pixel-frame mapping), not quality.
Requests that cannot work are refused by `sora-sample` before any weights load: an export
folder with only its dit.json (no weights) proves it, since loading it would fail otherwise.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import av
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from omegaconf import OmegaConf

from sora_lightning.config import CONFIG_MODULE
from sora_lightning.data.decode import encode_mp4
from sora_lightning.diffusion import flow
from sora_lightning.diffusion.sampling import SamplingConfig
from sora_lightning.models.dit import DiT
from sora_lightning.models.vae import VideoVAE
from sora_lightning.sample.generate import Given, VideoGenerator

CONF = Path(__file__).resolve().parents[2] / "conf" / "model"
OPTIONS = dict(frames=13, height=16, width=16, steps=3, cfg_scale=2.0)  # 4 latent frames
pytestmark = pytest.mark.usefixtures("one_thread")


class StubText:
    """Fixed states per prompt length: prompts of different lengths differ."""

    config = SimpleNamespace(max_length=16)

    def encode(self, texts: list[str]) -> SimpleNamespace:
        generator = torch.Generator().manual_seed(len(texts[0]))
        states = torch.randn(1, 4, 384, generator=generator)
        return SimpleNamespace(
            states=states, mask=torch.ones(1, 4, dtype=torch.bool), num_truncated=0
        )


def tiny_generator(**kwargs) -> VideoGenerator:
    """The tiny DiT (weights off their zero init) and VAE of conf/model/*/tiny.yaml."""
    torch.manual_seed(0)
    dit_cfg = instantiate(OmegaConf.load(CONF / "dit" / "tiny.yaml"))
    dit_cfg.attn_backend = "sdpa"
    dit = DiT(dit_cfg)
    with torch.no_grad():
        for param in dit.parameters():
            param.add_(0.05 * torch.randn_like(param))
    vae = VideoVAE(instantiate(OmegaConf.load(CONF / "vae" / "tiny.yaml")))
    stats = torch.zeros(4), torch.ones(4)
    return VideoGenerator(dit, vae, StubText(), *stats, expand_prompts=False, **kwargs)


@pytest.fixture(scope="module")
def generator() -> VideoGenerator:
    return tiny_generator()


def clip(frames: int, seed: int = 1, size: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (frames, size, size, 3), dtype=np.uint8)


def edit(generator: VideoGenerator, source: np.ndarray, strength: float, prompt: str = "b"):
    given = Given(frames=source, edit_strength=strength)
    return generator.generate_latents(prompt, SamplingConfig(**OPTIONS), given=given)[0]


# --- editing --------------------------------------------------------------------------------


def test_truncated_schedule_starts_at_the_strength() -> None:
    full = flow.sampling_schedule(10, shift=3.0)
    assert flow.truncated_schedule(full, 1.0) is full
    assert flow.truncated_schedule(full, 0.0).tolist() == [0.0]
    half = flow.truncated_schedule(full, 0.5)
    assert half[0] == 0.5 and torch.equal(half[1:], full[full < 0.5]) and half[-1] == 0.0
    with pytest.raises(ValueError, match="start must be in"):
        flow.truncated_schedule(full, 1.5)


def test_edit_at_zero_returns_the_clips_latents(generator: VideoGenerator) -> None:
    source = clip(17)  # longer than asked: its first 13 frames are edited
    assert torch.equal(edit(generator, source, 0.0), generator.encode_frames(source[:13]))


def test_edit_at_one_is_text_to_video(generator: VideoGenerator) -> None:
    plain, _ = generator.generate_latents("b", SamplingConfig(**OPTIONS))
    assert torch.equal(edit(generator, clip(13), 1.0), plain)


def test_edit_in_between_keeps_some_of_the_clip(generator: VideoGenerator) -> None:
    source = generator.encode_frames(clip(13))
    plain, _ = generator.generate_latents("b", SamplingConfig(**OPTIONS))
    light, strong = edit(generator, clip(13), 0.2), edit(generator, clip(13), 0.9)
    assert (light - source).abs().mean() < (strong - source).abs().mean()
    assert not torch.allclose(strong, plain, atol=1e-3)
    assert not torch.equal(
        edit(generator, clip(13), 0.5, "other prompt"), edit(generator, clip(13), 0.5)
    )


def test_edit_records_its_strength(generator: VideoGenerator) -> None:
    video = generator.generate(
        "b", SamplingConfig(**OPTIONS), given=Given(frames=clip(13), edit_strength=0.4)
    )
    assert video.frames.shape == (13, 16, 16, 3)
    assert video.options["mode"] == "edit" and video.options["edit_strength"] == 0.4


# --- connecting -----------------------------------------------------------------------------


@pytest.mark.parametrize("held", [1, 2])
def test_connect_holds_both_clips_latent_exact(generator: VideoGenerator, held: int) -> None:
    before, after = clip(11, seed=2), clip(13, seed=3)
    options = SamplingConfig(**{**OPTIONS, "frames": 21})  # 6 latent frames
    given = Given(frames=before, end_frames=after, connect_frames=held)
    latent, _ = generator.generate_latents("a", options, given=given)
    opening = generator.encode_frames(before[len(before) - 1 - 4 * (held - 1) :])
    closing = generator.encode_frames(after[: 1 + 4 * held])[:, 1:]  # its frames 1 .. 4 held
    assert opening.shape[1] == closing.shape[1] == held
    assert torch.equal(latent[:, :held], opening)
    assert torch.equal(latent[:, 6 - held :], closing)
    middle = latent[:, held : 6 - held]
    assert middle.abs().sum() > 0 and not torch.equal(middle, torch.zeros_like(middle))


def test_connect_to_an_image_holds_it_still(generator: VideoGenerator) -> None:
    image = clip(1, seed=4)
    latent, _ = generator.generate_latents(
        "a", SamplingConfig(**OPTIONS), given=Given(frames=clip(9), end_frames=image)
    )
    still = generator.encode_frames(np.repeat(image, 5, axis=0))[:, 1:]
    assert torch.equal(latent[:, -1:], still)


def test_connect_must_leave_frames_to_generate(generator: VideoGenerator) -> None:
    given = Given(frames=clip(9), end_frames=clip(9), connect_frames=2)
    with pytest.raises(ValueError, match="pass sampling.frames >= 17"):
        generator.generate_latents("a", SamplingConfig(**OPTIONS), given=given)  # 4 latents < 5


# --- refusals, before any weights load ------------------------------------------------------


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A weightless export (dit.json only: 2x time, 4x space) and clips of 48x64 and 32x32."""
    folder = tmp_path_factory.mktemp("media")
    export = folder / "export"
    export.mkdir()
    dit = {"config": {"in_channels": 4, "patch_size": [1, 2, 2]}}
    dit["meta"] = {"temporal_factor": 2, "spatial_factor": 4, "trained_frames": 9}
    (export / "dit.json").write_text(json.dumps(dit))
    paths = {"export": export}
    right = np.random.default_rng(0).integers(0, 256, (9, 48, 64, 3), dtype=np.uint8)
    wrong = np.random.default_rng(1).integers(0, 256, (9, 32, 32, 3), dtype=np.uint8)
    for name, frames in {"clip": right, "small": wrong}.items():
        paths[name] = folder / f"{name}.mp4"
        paths[name].write_bytes(encode_mp4(frames, fps=8))
    return paths


REFUSALS = {
    "image and edit": (["image={clip}", "edit_strength=0.5"], "image= is image-to-video"),
    "strength above 1": (["video={clip}", "edit_strength=1.5"], "edit_strength must be in"),
    "edit without a clip": (["edit_strength=0.5"], "edit_strength needs video="),
    "edit and connect": (
        ["video={clip}", "video_end={clip}", "edit_strength=0.5"],
        "cannot be combined",
    ),
    "connect without a start": (["video_end={clip}"], "video_end= needs video="),
    "other size": (["video={small}", "edit_strength=0.5"], "video= is 32x32 but the request"),
    "frames off the rule": (["video={clip}", "sampling.frames=8"], "1 \\+ 2k"),
    "edit longer than the clip": (
        ["video={clip}", "edit_strength=0.3", "sampling.frames=17"],
        "pass sampling.frames=9",
    ),
    "connect too short": (
        ["video={clip}", "video_end={clip}", "sampling.frames=3"],
        "pass sampling.frames >= 5",
    ),
    "end with edit": (
        ["video={clip}", "edit_strength=0.3", "sampling.cond_position=end", "sampling.frames=9"],
        "leave it at start",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_impossible_requests_are_refused_before_loading(media: dict[str, Path], case: str) -> None:
    from sora_lightning.sample.main import sample

    overrides, message = REFUSALS[case]
    overrides = [o.format(**{k: str(v) for k, v in media.items()}) for o in overrides]
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        cfg = compose("sample", overrides=[f"ckpt={media['export']}", "prompt=a", *overrides])
    with pytest.raises(ValueError, match=message):
        sample(cfg)


def test_a_valid_request_gets_as_far_as_loading(media: dict[str, Path]) -> None:
    """The same weightless export with a request that works: only the missing weights stop it."""
    from sora_lightning.sample.main import sample

    overrides = [f"ckpt={media['export']}", "prompt=a", f"video={media['clip']}"]
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        cfg = compose("sample", overrides=[*overrides, "edit_strength=0.5", "sampling.frames=9"])
    with pytest.raises(FileNotFoundError, match="dit.safetensors"):
        sample(cfg)


# --- sora-sample on a tiny export -----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A loadable export of the tiny random models (trained length recorded: 9 frames)."""
    from sora_lightning.train.export import export_bundle
    from sora_lightning.train.weights import save_module

    folder = tmp_path_factory.mktemp("tiny_export")
    generator = tiny_generator()
    meta = {
        "vae_dir": str(folder / "vae"),
        "text": {"max_length": 16},
        "latent_mean": [0.0] * 4,
        "latent_std": [1.0] * 4,
        "temporal_factor": 4,
        "spatial_factor": 4,
        "trained_frames": 9,
    }
    save_module(generator.dit, generator.dit.config, folder / "dit", "dit", {"meta": meta})
    save_module(generator.vae, generator.vae.config, folder / "vae", "vae")
    return export_bundle(folder / "dit", folder / "vae", folder / "export")


def test_sora_sample_edits_long_and_connects(tiny_export: Path, tmp_path: Path) -> None:
    """A long edit (windows) and a connection, written as mp4s that record their request."""
    from sora_lightning.data.decode import decode_video
    from sora_lightning.sample.main import sample

    source = tmp_path / "source.mp4"
    source.write_bytes(encode_mp4(clip(25), fps=8))
    requests = {
        "edit.mp4": [f"video={source}", "edit_strength=0.5", "sampling.frames=25"],
        "connect.mp4": [f"video={source}", f"video_end={source}", "sampling.frames=13"],
    }
    for name, overrides in requests.items():
        common = [f"ckpt={tiny_export}", "prompt=a", f"out={tmp_path / name}", "sampling=tiny"]
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            cfg = compose("sample", overrides=[*common, *overrides, "expand_prompt=false"])
        assert sample(cfg) == [tmp_path / name]
    edited = decode_video((tmp_path / "edit.mp4").read_bytes())[0]
    connected = decode_video((tmp_path / "connect.mp4").read_bytes())[0]
    assert edited.shape == (25, 16, 16, 3) and connected.shape == (13, 16, 16, 3)
    with av.open(str(tmp_path / "edit.mp4")) as container:
        options = json.loads(container.metadata["comment"])["options"]
    assert options["mode"] == "edit" and options["edit_strength"] == 0.5
    assert options["windows"] == [[0, 3], [1, 4], [2, 5], [3, 6], [4, 7]]  # overlap 2 of 3
