"""Long videos: windows of the trained length, each conditioned on the last one's latent frames.

Pure window planning, then a tiny random model (tests never train): a long video opens exactly
like the short one of its seed, holds given frames at both ends across windows, decodes in
chunks like one pass, and the benchmark (tools/bench/long_video.py) reports its keys.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_edit_connect import clip, tiny_generator

from sora_lightning.diffusion.sampling import SamplingConfig, window_latents, window_plan
from sora_lightning.sample.generate import Given, VideoGenerator, read_model_info, trained_frames

ROOT = Path(__file__).resolve().parents[2]
OPTIONS = dict(height=16, width=16, steps=2, cfg_scale=2.0, window_overlap=1)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def generator() -> VideoGenerator:
    return tiny_generator(trained_frames=9)  # 4x time: windows of 3 latent frames


# --- planning -------------------------------------------------------------------------------


def test_window_plan_covers_the_video_with_overlapping_trained_length_windows() -> None:
    assert window_plan([False] * 10, 4, 2) == [(0, 4), (2, 6), (4, 8), (6, 10)]
    assert window_plan([False] * 9, 4, 1) == [(0, 4), (3, 7), (5, 9)]  # the last ends flush
    assert window_plan([False] * 4, 4, 2) == [(0, 4)]  # short: one pass
    assert window_plan([False] * 40, None, 2) == [(0, 40)]  # length unknown: one pass
    known = [True, True] + [False] * 5 + [True]  # extension at the start, a clip at the end
    assert window_plan(known, 4, 1) == [(1, 5), (4, 8)]


def test_window_length_comes_from_the_config_or_the_trained_clip() -> None:
    assert window_latents(SamplingConfig(), 17, 2) == 9
    assert window_latents(SamplingConfig(window_frames=9), 17, 4) == 3
    assert window_latents(SamplingConfig(), None, 4) is None
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        window_latents(SamplingConfig(window_frames=8), None, 4)
    with pytest.raises(ValueError, match="leave no new frame"):
        window_latents(SamplingConfig(window_overlap=2), 3, 2)  # 2 latent frames, 2 held
    with pytest.raises(ValueError, match="window_overlap"):
        SamplingConfig(window_overlap=0)


def test_trained_length_is_read_from_what_the_model_records(tmp_path: Path) -> None:
    stages = {"stages": [{"frames": [1, 1]}, {"frames": [5, 17]}, {"frames": [9, 9]}]}
    assert trained_frames({"trained_frames": 33}) == 33
    assert trained_frames({}, stages) == 17
    assert trained_frames({}) is None
    run = tmp_path / "run"
    (run / "dit").mkdir(parents=True)
    (run / "export").mkdir()
    (run / "dit" / "config.yaml").write_text(json.dumps({"curriculum": stages}))
    meta = {"temporal_factor": 2, "spatial_factor": 4}
    (run / "export" / "dit.json").write_text(json.dumps({"config": {}, "meta": meta}))
    info = read_model_info(run / "export")
    assert info is not None and info.trained_frames == 17 and info.temporal_factor == 2


# --- sampling -------------------------------------------------------------------------------


def test_a_long_video_opens_like_the_short_one(generator: VideoGenerator) -> None:
    long = generator.generate("a", SamplingConfig(frames=29, **OPTIONS))  # 8 latent frames
    assert long.windows == [(0, 3), (2, 5), (4, 7), (5, 8)]
    assert long.frames.shape == (29, 16, 16, 3) and long.options["windows"][1] == [2, 5]
    latent, _ = generator.generate_latents("a", SamplingConfig(frames=29, **OPTIONS))
    short, _ = generator.generate_latents("a", SamplingConfig(frames=9, **OPTIONS))
    assert torch.equal(latent[:, :3], short)  # window 0 draws the short video's noise
    late, _ = generator.generate_latents("a", SamplingConfig(frames=29, seed=1, **OPTIONS))
    assert not torch.allclose(latent[:, 3:], late[:, 3:])


def test_given_frames_stay_exact_across_windows(generator: VideoGenerator) -> None:
    before, after = clip(9, seed=5), clip(5, seed=6)
    given = Given(frames=before, end_frames=after)
    config = SamplingConfig(frames=33, **OPTIONS)  # 9 latent frames, windows of 3
    latent, _ = generator.generate_latents("a", config, given=given)
    assert torch.equal(latent[:, :1], generator.encode_frames(before[-1:]))
    assert torch.equal(latent[:, -1:], generator.encode_frames(after)[:, 1:])
    extended, _ = generator.generate_latents("a", config, clip(13, seed=7))
    assert torch.equal(extended[:, :4], generator.encode_frames(clip(13, seed=7)))


def test_a_long_edit_at_zero_is_the_clip(generator: VideoGenerator) -> None:
    source = clip(25, seed=8)
    given = Given(frames=source, edit_strength=0.0)
    latent, _ = generator.generate_latents("a", SamplingConfig(frames=25, **OPTIONS), given=given)
    assert torch.equal(latent, generator.encode_frames(source))


def test_chunked_decode_matches_one_pass(generator: VideoGenerator) -> None:
    latent = torch.randn(4, 11, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = generator.vae.decode(latent[None])[0]
        chunked = generator._decode(latent)  # 11 > VAE_CHUNK_LATENTS: two chunks
    expected = ((whole.clamp(-1, 1) + 1) * 127.5).permute(1, 2, 3, 0).numpy()
    assert chunked.shape == (41, 16, 16, 3)
    assert np.abs(chunked.astype(np.float32) - expected).max() <= 0.51


def test_a_model_without_conditioning_refuses_windows() -> None:
    plain = tiny_generator(trained_frames=9)
    plain.dit.config.use_conditioning = False
    with pytest.raises(ValueError, match="sampling.window_frames=17"):
        plain.generate_latents("a", SamplingConfig(frames=17, **OPTIONS))


def test_benchmark_reports_memory_and_seams() -> None:
    spec = importlib.util.spec_from_file_location("long_video", ROOT / "tools/bench/long_video.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--tiny", "--lengths", "9,17", "--in-process", "--threads", "1"])
    short, long = result["cases"]
    assert (short["windows"], long["windows"]) == (1, 3)
    assert long["frame_change"]["num_seams"] == 2 and long["frame_change"]["seam"] is not None
    assert short["peak_rss_bytes"] > 0 and "working_growth_bytes" in result
