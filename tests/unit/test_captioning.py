"""Recaptioning with a VLM: real world shards, a tiny random Qwen-VL saved to a folder and loaded
like a user's model, captions added beside the samples' own, shard-by-shard resume, the latent
cache encoding the new field under a key that covers the captioner, and the pipeline wiring."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from captioning_fixtures import build_tiny_llava_onevision, build_tiny_qwen_vl
from hydra import compose, initialize_config_module

from sora_lightning.config import CONFIG_MODULE
from sora_lightning.data.captioners import load_adapter
from sora_lightning.data.captioners.base import Clip
from sora_lightning.data.captioners.qwen import QwenVision
from sora_lightning.data.captioning import (
    AddedCaptions,
    CaptionConfig,
    caption_identity,
    caption_shards,
    main,
    uniform_indices,
)
from sora_lightning.data.latent_cache import CacheSettings, cache_key, load_cache, write_cache
from sora_lightning.data.shards import load_samples
from sora_lightning.models.text import TextEncoder, TextEncoderConfig
from sora_lightning.models.vae import VAEConfig, VideoVAE
from sora_lightning.utils import file_sha256


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_qwen_vl(tmp_path_factory.mktemp("models") / "qwen2_vl", "qwen2_vl")


@pytest.fixture(scope="module")
def world_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 shards (4 clips, 2 images) written by the ingest CLI, as the pipeline's shards step does."""
    out = tmp_path_factory.mktemp("world") / "shards"
    args = ["--world-clips", "4", "--world-images", "2", "--max-count", "2", "--quick"]
    command = [sys.executable, "-m", "sora_lightning.data.ingest", *args, "--no-progress"]
    subprocess.run([*command, "--output", str(out)], check=True, capture_output=True)
    assert len(list(out.glob("*.tar"))) == 3
    return out


def _caption(shards: Path, out: Path, model: Path, *extra: str) -> None:
    args = ["--shards", str(shards / "*.tar"), "--output", str(out), "--model", str(model)]
    assert main([*args, "--max-new-tokens", "6", "--frames", "4", "--size", "56", *extra]) == 0


@pytest.fixture(scope="module")
def captioned(world_shards: Path, tiny_vlm: Path, tmp_path_factory: pytest.TempPathFactory):
    hashes = {p.name: file_sha256(p) for p in world_shards.glob("*.tar")}
    out = tmp_path_factory.mktemp("run") / "caption"
    _caption(world_shards, out, tiny_vlm)
    return out, hashes


def test_patchify_matches_transformers_image_processor() -> None:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    image = np.random.default_rng(0).integers(0, 256, (56, 84, 3), dtype=np.uint8)
    reference = Qwen2VLImageProcessorPil(do_resize=False)(images=[image], return_tensors="np")
    patches, grid = QwenVision().patchify(image[None])
    assert grid == tuple(reference["image_grid_thw"][0]) == (1, 4, 6)
    np.testing.assert_allclose(patches, reference["pixel_values"], atol=1e-5)


def test_uniform_indices_spread_over_the_clip() -> None:
    assert uniform_indices(33, 4) == [4, 12, 20, 28]
    assert uniform_indices(3, 8) == [0, 1, 2]
    assert uniform_indices(1, 8) == [0]


def test_batched_captions_equal_one_by_one(tiny_vlm: Path) -> None:
    """Left padding and mixed images/videos in one batch change no caption."""
    adapter = load_adapter(tiny_vlm)
    rng = np.random.default_rng(1)
    clips = [
        Clip("a", rng.integers(0, 256, (4, 56, 84, 3), dtype=np.uint8), False, 4.0),
        Clip("b", rng.integers(0, 256, (1, 28, 56, 3), dtype=np.uint8), True),
        Clip("c", rng.integers(0, 256, (2, 28, 28, 3), dtype=np.uint8), False, 2.0),
    ]
    batched = adapter.caption(clips, "Describe.", 8)
    assert batched == [adapter.caption([clip], "Describe.", 8)[0] for clip in clips]
    assert adapter.dtype == torch.float32  # dtype=auto on a CPU


def test_qwen2_5_vl_captions(tmp_path: Path) -> None:
    adapter = load_adapter(build_tiny_qwen_vl(tmp_path / "qwen25", "qwen2_5_vl"))
    clip = Clip("a", np.zeros((4, 56, 56, 3), dtype=np.uint8), False, 8.0)
    inputs = adapter.inputs([clip], "Describe.")
    assert inputs["second_per_grid_ts"].tolist() == [0.25]  # 2 frames per grid step at 8 fps
    assert len(adapter.caption([clip], "Describe.", 4)) == 1


def test_llava_onevision_captions_clips_of_any_length(tmp_path: Path) -> None:
    """Frame counts differ within a batch (grouped per generate call); the processor's
    chat_template.json is used, the tokenizer having none."""
    adapter = load_adapter(build_tiny_llava_onevision(tmp_path / "llava"))
    rng = np.random.default_rng(2)
    clips = [
        Clip("a", rng.integers(0, 256, (4, 40, 60, 3), dtype=np.uint8), False, 4.0),
        Clip("b", rng.integers(0, 256, (1, 30, 30, 3), dtype=np.uint8), True),
        Clip("c", rng.integers(0, 256, (4, 60, 40, 3), dtype=np.uint8), False, 2.0),
    ]
    inputs = adapter.inputs(clips[:1], "Describe.")
    video_id = adapter.model.config.video_token_id
    assert int((inputs["input_ids"] == video_id).sum()) == 4 * 2 * 2 + 1  # pooled 2x2 + newline
    assert inputs["pixel_values_videos"].shape == (1, 4, 3, 56, 56)
    batched = adapter.caption(clips, "Describe.", 6)
    assert batched == [adapter.caption([clip], "Describe.", 6)[0] for clip in clips]


def test_each_prompt_shows_its_own_clips_hint(tiny_vlm: Path, tmp_path: Path) -> None:
    """`{hint}` in the instruction becomes each clip's own caption (its alt-text) in its prompt,
    for both adapter families."""
    llava = load_adapter(build_tiny_llava_onevision(tmp_path / "llava"))
    frames = np.zeros((4, 56, 56, 3), dtype=np.uint8)
    clips = [Clip(k, frames, False, 4.0, hint=f"{k} circle clip") for k in ("red", "blue")]
    for adapter in (load_adapter(tiny_vlm), llava):
        inputs = adapter.inputs(clips, "Describe. The original caption: {hint}")
        texts = adapter.tokenizer.batch_decode(inputs["input_ids"], skip_special_tokens=True)
        for clip, text in zip(clips, texts, strict=True):
            assert f"The original caption: {clip.hint}" in text, text


def test_a_hint_is_refused_where_it_would_go_unread(world_shards: Path, tiny_vlm: Path) -> None:
    with pytest.raises(ValueError, match="no \\{hint\\}"):
        CaptionConfig(model=str(tiny_vlm), hint_field="detailed")
    with pytest.raises(ValueError, match="hint_field is null"):
        CaptionConfig(model=str(tiny_vlm), instruction="Describe; the alt-text says {hint}")
    CaptionConfig(model="world", hint_field="alt_text")  # the world captioner reads it itself
    config = CaptionConfig(model=str(tiny_vlm), instruction="Say {hint}", hint_field="alt_text")
    assert caption_identity(config)["hint_field"] == "alt_text"
    assert "hint_field" not in caption_identity(CaptionConfig(model=str(tiny_vlm)))
    shard = sorted(world_shards.glob("*.tar"))[0]
    with pytest.raises(ValueError, match=f"{shard}: .* has no 'alt_text' caption"):
        caption_shards([shard], world_shards.parent / "hinted", config, caption_identity(config))


def test_captions_are_added_beside_the_samples_own(captioned, world_shards: Path) -> None:
    out, hashes = captioned
    assert hashes == {p.name: file_sha256(p) for p in world_shards.glob("*.tar")}  # untouched
    added = AddedCaptions.load(out)
    assert added.field == "vlm" and added.meta["num_captioned"] == 6
    identity = added.meta["identity"]
    assert identity["instruction"] == CaptionConfig().instruction and len(identity["model_hash"])
    for shard in sorted(world_shards.glob("*.tar")):
        keys = {s.key for s in load_samples([shard])}
        assert set(json.loads(line)["key"] for line in open(out / f"{shard.stem}.jsonl")) == keys
        record = json.loads((out / f"{shard.stem}.done.json").read_text())
        assert record["shard_sha256"] == hashes[shard.name] and record["dtype"] == "float32"
        assert record["frames_kept"] <= 4 * record["captioned"]


def test_a_field_the_samples_have_is_refused(world_shards: Path, tiny_vlm: Path, tmp_path) -> None:
    config = CaptionConfig(model=str(tiny_vlm), field="detailed", max_new_tokens=2, size=56)
    shards = sorted(world_shards.glob("*.tar"))
    with pytest.raises(ValueError, match="never overwritten"):
        caption_shards(shards, tmp_path / "caption", config, caption_identity(config))
    with pytest.raises(ValueError, match="caption.model"):
        CaptionConfig(enabled=True, model=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="caption.field"):
        CaptionConfig(field="Bad Name")


def test_rerun_skips_finished_shards_and_redoes_the_interrupted_one(
    world_shards: Path, tiny_vlm: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "caption"
    _caption(world_shards, out, tiny_vlm)
    first = {p.name: p.stat().st_mtime_ns for p in out.glob("*.done.json")}
    (out / "shard-000001.done.json").unlink()  # killed before this shard's record was written
    (out / "meta.json").unlink()
    capsys.readouterr()
    _caption(world_shards, out, tiny_vlm)
    report = json.loads(capsys.readouterr().out)
    assert report["already_done"] == 2 and report["captioned"] == 2
    again = {p.name: p.stat().st_mtime_ns for p in out.glob("*.done.json")}
    assert {k: v for k, v in again.items() if k != "shard-000001.done.json"} == {
        k: v for k, v in first.items() if k != "shard-000001.done.json"
    }
    assert AddedCaptions.load(out).meta["num_captioned"] == 6
    _caption(world_shards, out, tiny_vlm, "--instruction", "Say what moves.")
    report = json.loads(capsys.readouterr().out)
    assert report["already_done"] == 0  # another instruction: other captions, all redone


def test_array_parts_then_merge(world_shards: Path, tiny_vlm: Path, tmp_path: Path) -> None:
    out = tmp_path / "caption"
    with pytest.raises(FileNotFoundError, match="no verified captions"):
        _caption(world_shards, out, tiny_vlm, "--merge")
    for part in range(2):
        _caption(world_shards, out, tiny_vlm, "--num-parts", "2", "--part", str(part))
    assert not (out / "meta.json").exists()
    _caption(world_shards, out, tiny_vlm, "--merge")
    assert AddedCaptions.load(out).meta["num_captioned"] == 6


def test_cache_encodes_the_new_field_under_a_key_that_covers_it(
    captioned, world_shards: Path
) -> None:
    out, _ = captioned
    added = AddedCaptions.load(out)
    config = VAEConfig(
        base_channels=8, channel_mults=(1, 2, 2), temporal_downsample=(True, True), norm_groups=4
    )
    vae, text = VideoVAE(config), TextEncoder(TextEncoderConfig(max_length=24))
    plain = CacheSettings(max_area=1024, multiple=8, max_frames=9)
    settings = CacheSettings(max_area=1024, multiple=8, max_frames=9, captions=added.source)
    shards = sorted(world_shards.glob("*.tar"))
    with pytest.raises(ValueError, match="added captions"):
        write_cache(shards, out.parent / "bad", vae, text, plain, added=added)
    meta = write_cache(shards, out.parent / "cache", vae, text, settings, added=added)
    assert meta["key"] != cache_key("v", "t", plain) and meta["settings"]["captions"]
    assert cache_key("v", "t", settings) != cache_key("v", "t", plain)
    samples, _, _ = load_cache(out.parent / "cache", meta["key"])
    assert len(samples) == 6 and all({"detailed", "short", "vlm"} <= set(s.texts) for s in samples)
    _train_picks_the_new_field(samples)


def _train_picks_the_new_field(samples: list) -> None:
    """data.caption_probs selects the added field like any other caption form."""
    from sora_lightning.train.curriculum import Curriculum, Stage
    from sora_lightning.train.dit_data import PackStepDataset

    curriculum = Curriculum(stages=[Stage("clips", 2, frames=(1, 5))], warmup_steps=1)
    kwargs = {"patch_size": (1, 2, 2), "spatial_factor": 4, "temporal_factor": 4, "seed": 0}
    stats = (torch.zeros(4), torch.ones(4))
    probs = {"vlm": 0.95, "detailed": 0.05}
    dataset = PackStepDataset(
        samples,
        torch.zeros(1, 384),
        *stats,
        curriculum,
        caption_probs=probs,
        text_dropout=0.0,
        **kwargs,
    )
    rng, sample = np.random.default_rng(0), samples[0]
    picks = [dataset._caption(sample, rng) for _ in range(400)]
    vlm = sum(torch.equal(p, sample.texts["vlm"].float()) for p in picks)
    assert 360 <= vlm < 400  # 95% of draws, and the original caption still drawn


def test_cache_settings_read_the_captions_folder(captioned) -> None:
    from sora_lightning.train.cache import cache_settings

    out, _ = captioned
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        cfg = compose("train", overrides=["task=cache", f"data.captions_dir={out}"])
        plain = compose("train", overrides=["task=cache"])
    assert cache_settings(cfg).captions == AddedCaptions.load(out).source
    assert cache_settings(plain).captions == ""


def test_pipeline_runs_the_caption_step_only_when_enabled(tiny_vlm: Path, tmp_path: Path) -> None:
    from sora_lightning.launch.slurm import launcher_config
    from sora_lightning.pipeline.main import forwarded_overrides
    from sora_lightning.pipeline.slurm_runner import batch_script, step_jobs
    from sora_lightning.pipeline.steps import steps_for

    on = ["caption.enabled=true", f"caption.model={tiny_vlm}", "launcher=slurm"]
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        off_cfg = compose("pipeline", overrides=["experiment=tiny"])
        cfg = compose("pipeline", overrides=["experiment=tiny", *on])
    assert "caption" not in [s.name for s in steps_for(off_cfg)]
    assert CaptionConfig.from_config(off_cfg.caption) == CaptionConfig()  # YAML = dataclass
    steps = {s.name: s for s in steps_for(cfg)}
    assert list(steps)[:2] == ["shards", "caption"] and "caption" in steps["cache"].inputs
    run = tmp_path / "run"
    command = steps["caption"].command(cfg, run, [])
    assert command[command.index("--model") + 1] == str(tiny_vlm.resolve())
    assert f"data.captions_dir='{run / 'caption'}'" in steps["cache"].command(cfg, run, [])
    assert f"data.captions_dir='{run / 'caption'}'" in steps["dit"].command(cfg, run, [])
    assert forwarded_overrides(on) == ["launcher=slurm"]
    cfg.launcher.array_parts, cfg.launcher.gpus_per_node = 3, 8
    launcher = launcher_config(cfg)
    parts, merge = step_jobs(steps["caption"], cfg, run, [], launcher)
    assert parts.command[-2:] == ["--num-parts", "3"] and merge.command[-1] == "--merge"
    assert "#SBATCH --gpus-per-node=1" in batch_script(parts, run, launcher)
    assert "--gpus-per-node" not in batch_script(merge, run, launcher)


@pytest.mark.slow
def test_a_killed_run_continues_without_redoing_finished_shards(
    tiny_vlm: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """SIGKILL mid-run (a real process), then rerun: finished shards are kept, the rest done."""
    import signal
    import time

    shards, out = tmp_path / "shards", tmp_path / "caption"
    args = ["--world-clips", "16", "--world-images", "0", "--max-count", "1", "--quick"]
    ingest = [sys.executable, "-m", "sora_lightning.data.ingest", *args, "--no-progress"]
    subprocess.run([*ingest, "--output", str(shards)], check=True, capture_output=True)
    flags = ["--shards", str(shards / "*.tar"), "--output", str(out), "--model", str(tiny_vlm)]
    flags += ["--max-new-tokens", "48", "--size", "56"]
    command = [sys.executable, "-m", "sora_lightning.data.captioning", *flags]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(out.glob("*.done.json")) and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = {p.name: p.read_bytes() for p in out.glob("*.done.json")}
    assert 0 < len(done) < 16 and not (out / "meta.json").exists()
    capsys.readouterr()
    assert main(flags) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["already_done"] == len(done) and report["captioned"] == 16 - len(done)
    assert all((out / name).read_bytes() == record for name, record in done.items())
    assert AddedCaptions.load(out).meta["num_captioned"] == 16


@pytest.mark.slow
def test_pipeline_recaptions_and_caches_the_new_field(tiny_vlm: Path, tmp_path: Path) -> None:
    """sora-pipeline with caption.enabled: shards -> caption -> vae -> cache, as processes."""
    run = tmp_path / "run"
    command = [sys.executable, "-m", "sora_lightning.pipeline.main", "experiment=tiny"]
    command += [f"run_dir={run}", "caption.enabled=true", f"caption.model={tiny_vlm}"]
    command += ["caption.max_new_tokens=8", "pipeline.steps=[shards,caption,vae,cache]"]
    subprocess.run(command, check=True, capture_output=True, timeout=600)
    added = AddedCaptions.load(run / "caption")
    meta = json.loads((run / "cache" / "meta.json").read_text())
    assert meta["settings"]["captions"] == added.source
    samples, _, _ = load_cache(run / "cache", meta["key"])
    assert sum("vlm" in s.texts for s in samples) == added.meta["num_captioned"] == len(samples)
    again = subprocess.run(command, check=True, capture_output=True, text=True, timeout=600)
    assert again.stdout.count("skipped") >= 4
