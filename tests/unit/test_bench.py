"""The benchmarks in tools/bench run at tiny sizes and print one JSON line with their keys."""

from __future__ import annotations

import importlib.util
import io
import json
import tarfile
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import safetensors.torch
import torch

ROOT = Path(__file__).resolve().parents[2]


def load_bench(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pytestmark = pytest.mark.usefixtures("one_thread")


def printed_json(capsys: pytest.CaptureFixture[str]) -> dict:
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    return json.loads(lines[0])


def test_dit_step_prints_throughput_of_both_models(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("diffusers")
    argv = "--hidden 48 --depth 1 --heads 4 --channels 4 --frames 2 --height 4 --width 4"
    argv += (
        " --text-len 3 --text-dim 16 --batch 2 --warmup 0 --iters 1 --threads 1 --matmul-size 64"
    )
    result = load_bench("dit_step").main(argv.split())
    assert printed_json(capsys) == json.loads(json.dumps(result))
    for key in ("ours_tokens_per_s", "peer_tokens_per_s", "ratio", "mfu"):
        assert result[key] > 0, key
    assert result["video_tokens"] == 2 * 2 * 2 * 2
    # same width, depth, heads and MLP: the two models must be within 5% in size
    assert abs(result["params_ours"] / result["params_peer"] - 1) < 0.05
    assert result["config"]["hidden"] == 48 and result["config"]["mlp"] == 192


def test_vae_memory_reports_ratios_from_two_subprocesses(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = "--short 1 --long 9 --size 8 --chunk-frames 4 --chunk-latents 1 --threads 1"
    result = load_bench("vae_memory").main(argv.split())
    assert printed_json(capsys) == json.loads(json.dumps(result))
    assert result["peak_ratio_long_vs_short"] > 0 and result["time_ratio"] > 0
    assert result["frame_ratio"] == 9
    assert (result["short"]["frames"], result["long"]["frames"]) == (1, 9)
    for case in (result["short"], result["long"]):
        assert case["peak_rss_bytes"] >= case["baseline_rss_bytes"] > 0
    assert result["long"]["output_bytes"] > result["short"]["output_bytes"]


def test_data_bench_reports_packing_and_loader_speed(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("skvideo")
    pytest.importorskip("skimage")
    result = load_bench("data").main(["--tiny"])
    assert printed_json(capsys) == json.loads(json.dumps(result))
    assert result["num_samples"] >= 8 and result["skipped"] == {}
    assert 0 < result["bucketing_efficiency"] < result["packing_efficiency"] <= 1
    assert result["num_batches_packed"] < result["num_batches_bucketed"]
    for key in ("loader_samples_per_s_per_worker", "raw_decode_samples_per_s"):
        assert result[key] > 0, key
    assert 0 < result["loader_vs_decode_ratio"] < 10


def test_motion_probe_reads_true_clips_and_prints_its_curve(
    capsys: pytest.CaptureFixture[str],
) -> None:
    probe = load_bench("motion_probe")
    args = probe.parse_args(["--tiny"])
    true_travel = args.speed * (args.frames - 2)  # last two frames' centroid minus first two's
    for motion in probe.MOTIONS:
        start = probe.random_start(np.random.default_rng(1), motion, args)
        delta = probe.travel(probe.disc_latent("blue", motion, start, args))
        assert probe.read_motion(delta, true_travel) == motion
    centred = probe.parse_args(["--tiny", "--centre-jitter", "1"])
    for motion, (dir_x, dir_y) in probe.DIRECTIONS.items():
        start_x, start_y = probe.random_start(np.random.default_rng(2), motion, centred)
        travel = centred.speed * (centred.frames - 1)
        assert abs(start_x + dir_x * travel / 2 - centred.width / 2) <= 1
        assert abs(start_y + dir_y * travel / 2 - centred.height / 2) <= 1
    for bad in (["--eval-every", "0"], ["--speed", "2"], ["--text-layers", "0,last"]):
        with pytest.raises(SystemExit):  # a usage error before the text encoder loads
            probe.parse_args(bad)
    capsys.readouterr()
    result = probe.main(["--tiny", "--threads", "1"])
    assert printed_json(capsys) == json.loads(json.dumps(result))
    assert result["text_layers"] == [-1]
    assert result["true_along_px"] == pytest.approx(true_travel, rel=0.02)
    assert [point["step"] for point in result["curve"]] == [2, 4]
    assert 0 <= result["final"]["direction_acc"] <= 1 and result["clips_seen"] == 12
    assert set(result["final"]["mean_travel"]) == set(probe.MOTIONS)


def _write_cache(folder: Path, clips: list[tuple[torch.Tensor, dict[str, str]]]) -> None:
    """A latent cache in the format `data.latent_cache` writes (one shard, meta.json)."""
    with tarfile.open(folder / "latents-000000-000000.tar", "w") as archive:
        for index, (latent, captions) in enumerate(clips):
            tensors = {"latent": latent, "text_detailed": torch.zeros(3, 384)}
            for ext, blob in (
                ("safetensors", safetensors.torch.save(tensors)),
                ("json", json.dumps({"captions": captions}).encode()),
            ):
                info = tarfile.TarInfo(f"{index:06d}.{ext}")
                info.size = len(blob)
                archive.addfile(info, io.BytesIO(blob))
    meta = {
        "shards": ["latents-000000-000000.tar"],
        "num_samples": len(clips),
        "latent_mean": [0.5] * 4,
        "latent_std": [2.0] * 4,
    }
    (folder / "meta.json").write_text(json.dumps(meta))


def test_motion_probe_trains_on_a_caches_one_object_clips(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--cache keeps one-object clips that translate or stay still and are long enough,
    normalised by the cache's mean/std; --cache-match narrows them by the detailed caption."""
    probe = load_bench("motion_probe")
    args = probe.parse_args(["--tiny", "--cache", str(tmp_path)])
    start = (6.0, 6.0)

    def clip(motion: str, frames: int, short: str) -> tuple[torch.Tensor, dict[str, str]]:
        latent = probe.disc_latent("red", motion, start, args)[:, :frames] * 2.0 + 0.5
        detailed = f"A video of a medium red circle that {short.split(' ', 3)[-1]} slowly."
        return latent, {"short": short, "detailed": detailed}

    _write_cache(
        tmp_path,
        [
            clip("right", 9, "a red circle moves right"),
            clip("left", 9, "a red circle moves left"),
            clip("still", 9, "a red circle stays still"),
            clip("still", 9, "a red circle grows"),  # not a probe motion
            clip("right", 9, "a red circle moves right and a blue square shrinks"),  # two objects
            clip("right", 5, "a red circle moves right"),  # shorter than --frames
        ],
    )
    pool = probe.world_clips(args)
    assert [motion for _, _, motion, _ in pool] == ["right", "left", "still"]
    assert [slow for *_, slow in pool] == [True, True, True]
    assert torch.allclose(pool[0][0], probe.disc_latent("red", "right", start, args), atol=1e-6)
    matched = probe.world_clips(
        probe.parse_args(["--tiny", "--cache", str(tmp_path), "--cache-match", "left"])
    )
    assert [motion for _, _, motion, _ in matched] == ["left"]
    short = probe.world_clips(
        probe.parse_args(["--tiny", "--cache", str(tmp_path), "--caption", "short"])
    )
    assert [text for _, text, _, _ in short][:2] == [
        "a red circle moves right",
        "a red circle moves left",
    ]
    capsys.readouterr()
    result = probe.main(
        ["--tiny", "--threads", "1", "--cache", str(tmp_path), "--motion-weight", "4"]
    )
    assert result["pool_clips"] == 3 and result["motion_weight"] == 4.0
    assert result["clips_seen"] == 12 and 0 <= result["final"]["direction_acc"] <= 1


def test_text_separation_finds_minilm_last_layer_blind_to_direction(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The measurement behind the demo's text layers [0, -1] (tools/bench/text_separation.py)."""
    load_bench("text_separation").main(["--layers", "0,-1"])
    layers = printed_json(capsys)["layers"]
    assert 0.7 < layers["0"]["motion_vs_colour"] < 1.4  # token embeddings: left/right like colours
    assert layers["-1"]["motion_vs_colour"] < 0.25  # last layer: directions nearly merged
    assert layers["-1"]["colour"]["token"] > 2 * layers["-1"]["left/right"]["token"]


def test_edit_colour_reads_edits_and_keeps_the_clip_at_strength_zero(
    capsys: pytest.CaptureFixture[str],
) -> None:
    result = load_bench("edit_colour").main(
        ["--tiny", "--clips", "2", "--strengths", "0,1", "--steps", "2", "--threads", "1"]
    )
    assert printed_json(capsys) == result
    assert result["clips"] == 2 and set(result["by_strength"]) == {"0.0", "1.0"}
    assert result["max_pixel_gap_at_0"] <= 1.0  # the clip's own latents, decoded


def test_train_vs_bench_times_bare_steps_and_compares_mfus() -> None:
    """The bare step trains (weights move), and the MFU ratio is the step-time ratio on equal
    FLOPs, training's first (warm-up) step left out as the breakdown leaves it out."""
    import torch

    from sora_lightning.data.packing import pack_samples
    from sora_lightning.models.dit import DiTConfig

    bench = load_bench("train_vs_bench")
    config = DiTConfig(
        in_channels=4, patch_size=(1, 2, 2), hidden_size=32, depth=1, num_heads=2, text_dim=8
    )
    packs = [
        pack_samples(
            [torch.randn(4, 1, 4, 4), torch.randn(4, 2, 4, 6)],
            [torch.randn(3, 8), torch.randn(5, 8)],
            (1, 2, 2),
            capacity=64,
        )
        for _ in range(2)
    ]
    dit, optimizer = bench.bench_model(config)
    before = [p.detach().clone() for p in dit.parameters()]
    times = bench.time_bare_steps(dit, optimizer, packs, bench.CLOCKS["process"])
    assert len(times) == 2 and all(t >= 0 for t in times)
    assert any(not torch.equal(a, b) for a, b in zip(before, dit.parameters(), strict=True))
    flops = bench.pack_flops(config, packs[0])
    assert flops > 0
    summary = {
        "first_steps_s": [9.0],
        "mean_step_s": 2.0,
        "steps": 2,
        "seconds": {"forward": 1.0, "backward": 2.0, "optimizer": 0.6},
        "overhead_fraction": 0.1,
        "fraction": {},
    }
    result = bench.compare(summary, [10 * flops, flops, flops], [1.0, 1.0], [flops, flops], 1e9)
    assert result["ratio"] == pytest.approx(0.5)
    assert result["train_compute_step_s"] == pytest.approx(1.8)


def test_wan_parity_reports_each_case_within_its_tolerance(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The cheap groups (no saved pipeline folder): differences measured, tolerances the tests'."""
    pytest.importorskip("diffusers")
    result = load_bench("wan_parity").main(["--groups", "dit,umt5", "--threads", "1"])
    assert printed_json(capsys) == json.loads(json.dumps(result))
    cases = result["cases"]
    assert set(cases) == {
        "dit_one_sample",
        "dit_one_sample_patch213",
        "dit_packed",
        "umt5_states_512",
        "umt5_states_8",
    }
    assert result["all_within_tolerance"] and all(c["atol"] == 1e-5 for c in cases.values())
    assert 0 < cases["dit_packed"]["max_abs"] < 1e-5  # float32 rounding, not bit-identical
    assert cases["umt5_states_8"]["test"].startswith("tests/unit/test_umt5_text.py::")
    with pytest.raises(SystemExit):
        load_bench("wan_parity").main(["--groups", "dit,nope"])
