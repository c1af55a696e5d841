"""Adherence detector on rendered truth (raw, degraded, H.264) and the evaluator built on it."""

from __future__ import annotations

import io
from collections import Counter

import numpy as np
import pytest

from sora_lightning.data.world import (
    COLOURS,
    EVAL_MOTIONS,
    HELD_OUT,
    SHAPES,
    ObjectSpec,
    Scene,
    parse_prompt,
    render,
    scene_from_prompt,
)
from sora_lightning.eval import evaluate as evaluate_module
from sora_lightning.eval.detector import (
    CHANCE,
    NONE,
    Detection,
    accuracy_on_clips,
    detect,
    detector_accuracy_on_truth,
    truth_clips,
)
from sora_lightning.eval.evaluate import evaluate


def _h264_round_trip(frames: np.ndarray) -> np.ndarray:
    """Encode uint8 [T, H, W, 3] to an in-memory mp4 (libx264, yuv420p, crf 18) and decode."""
    av = pytest.importorskip("av")
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    buffer.seek(0)
    with av.open(buffer) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def _blur_and_noise(frames: np.ndarray) -> np.ndarray:
    """A VAE-like degradation: a 5-tap binomial blur and Gaussian noise (sigma 8)."""
    pixels = frames.astype(np.float32)
    for axis in (1, 2):
        for _ in range(2):
            shifted = np.roll(pixels, 1, axis) + np.roll(pixels, -1, axis)
            pixels = (shifted + 2 * pixels) / 4
    pixels += np.random.default_rng(0).normal(0, 8, pixels.shape).astype(np.float32)
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def _render_prompt(prompt: str, *, num_frames: int = 17) -> np.ndarray:
    return render(scene_from_prompt(prompt, width=64, height=48, num_frames=num_frames))


def test_detector_reads_rendered_truth() -> None:
    accuracy = detector_accuracy_on_truth(num_clips=200, seed=0, num_frames=17)
    assert set(accuracy) == {"colour_acc", "shape_acc", "motion_acc"}
    assert min(accuracy.values()) >= 0.98, accuracy


def test_truth_clips_vary_every_attribute() -> None:
    scenes = [scene for scene, _ in truth_clips(120, seed=0)]
    objects = [scene.objects[0] for scene in scenes]
    assert all(len(scene.objects) == 1 for scene in scenes)
    assert {o.colour for o in objects} == set(COLOURS) and {o.shape for o in objects} == set(SHAPES)
    assert {o.motion for o in objects} == set(EVAL_MOTIONS)
    assert len({scene.background for scene in scenes}) == 3
    assert len({(scene.width, scene.height) for scene in scenes}) == 4


def test_detector_survives_an_h264_round_trip() -> None:
    accuracy = accuracy_on_clips(truth_clips(40, seed=1), transform=_h264_round_trip)
    assert min(accuracy.values()) >= 0.98, accuracy


def test_detector_survives_blur_and_noise() -> None:
    accuracy = accuracy_on_clips(truth_clips(100, seed=2), transform=_blur_and_noise)
    assert min(accuracy.values()) >= 0.98, accuracy


def test_detect_examples_and_empty_clip() -> None:
    found = detect(_render_prompt("an orange triangle moves down"))
    assert found == Detection("orange", "triangle", "down")
    assert detect(_render_prompt("a cyan square shrinks")) == Detection("cyan", "square", "shrink")
    blank = np.full((9, 48, 64, 3), 112, dtype=np.uint8)
    assert detect(blank) == Detection(NONE, NONE, NONE)
    with pytest.raises(ValueError, match="T, H, W, 3"):
        detect(blank[0])


def test_chance_levels() -> None:
    assert CHANCE == pytest.approx({"colour": 1 / 8, "shape": 1 / 3, "motion": 1 / 7})


def test_evaluate_scores_a_perfect_generator_at_one() -> None:
    calls = []

    def truth(prompt: str, seed: int) -> np.ndarray:
        calls.append((prompt, seed))
        return _render_prompt(prompt)

    result = evaluate(truth, num_seeds=2, truth_clips=40)
    assert result["num_videos"] == len(calls) == 32 and len(result["per_prompt"]) == 32
    assert {seed for _, seed in calls} == {0, 1}
    assert result["colour_acc"] == result["shape_acc"] == result["motion_acc"] == 1.0
    assert result["detector_acc_on_truth"] >= 0.98 and result["chance"] == CHANCE
    record = result["per_prompt"][0]
    assert record["expected"] == record["detected"] and record["colour_ok"]
    motion = result["confusion"]["motion"]  # 16 held-out prompts x 2 seeds, all on the diagonal
    assert motion == {m: {m: 2 * n} for m, n in Counter(m for _, _, m in HELD_OUT).items()}


def _wrong_prompt(prompt: str) -> str:
    """The same prompt with every attribute replaced by a different one."""
    (obj,) = parse_prompt(prompt)
    colours, motions = list(COLOURS), list(EVAL_MOTIONS)
    colour = colours[(colours.index(obj["colour"]) + 1) % len(colours)]
    shape = SHAPES[(SHAPES.index(obj["shape"]) + 1) % len(SHAPES)]
    motion = motions[(motions.index(obj["motion"]) + 1) % len(motions)]
    spec = ObjectSpec(shape, colour, "medium", motion, "slow", 0.5, 0.5)
    return render(Scene((spec,), "gray", 64, 48, 17))


def test_evaluate_scores_wrong_and_blank_generators_at_zero() -> None:
    wrong = evaluate(lambda prompt, seed: _wrong_prompt(prompt), truth_clips=40)
    assert wrong["colour_acc"] == wrong["shape_acc"] == wrong["motion_acc"] == 0.0
    assert wrong["confusion"]["motion"]["still"] == {"grow": 2}  # the next eval motion, each time
    blank = evaluate(
        lambda p, s: np.zeros((17, 48, 64, 3), np.uint8),
        prompts=["a red circle grows"],
        truth_clips=40,
    )
    assert blank["num_videos"] == 1 and blank["per_prompt"][0]["detected"]["shape"] == NONE
    assert blank["colour_acc"] == blank["shape_acc"] == blank["motion_acc"] == 0.0


def test_vae_ceiling_scores_the_reconstruction_not_the_generator() -> None:
    """vae_ceiling reads truth clips through `reconstruct`, as long as the generated videos."""
    lengths = []

    def keep(frames: np.ndarray) -> np.ndarray:
        lengths.append(len(frames))
        return frames

    def erase(frames: np.ndarray) -> np.ndarray:
        return np.repeat(frames[:, :1, :1], frames.shape[1], 1).repeat(frames.shape[2], 2)

    blank = lambda p, s: np.zeros((9, 48, 64, 3), np.uint8)  # noqa: E731
    kept = evaluate(
        blank, prompts=["a red circle"], truth_clips=8, reconstruct=keep, ceiling_clips=6
    )
    assert kept["vae_ceiling"] == {"colour_acc": 1.0, "shape_acc": 1.0, "motion_acc": 1.0}
    assert kept["colour_acc"] == 0.0 and lengths == [9] * 6
    erased = evaluate(blank, prompts=["a red circle"], truth_clips=8, reconstruct=erase)
    assert erased["vae_ceiling"] == {"colour_acc": 0.0, "shape_acc": 0.0, "motion_acc": 0.0}
    assert "vae_ceiling" not in evaluate(blank, prompts=["a red circle"], truth_clips=8)


def test_evaluate_refuses_an_untrusted_detector_and_bad_inputs(monkeypatch) -> None:
    def truth(prompt: str, seed: int) -> np.ndarray:
        return _render_prompt(prompt)

    with pytest.raises(ValueError, match="exactly one object"):
        evaluate(truth, prompts=["a red circle grows and a blue square moves up"], truth_clips=8)
    with pytest.raises(ValueError, match="uint8"):
        evaluate(lambda p, s: np.zeros((5, 48, 64, 3)), prompts=["a red circle"], truth_clips=8)
    # No detector can beat a bar above 1: the real truth check must then refuse to score.
    monkeypatch.setattr(evaluate_module, "MIN_DETECTOR_ACCURACY", 1.01)
    with pytest.raises(RuntimeError, match="detector"):
        evaluate(truth, truth_clips=8)
