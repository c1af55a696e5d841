"""Prompt-adherence evaluator on held-out compositions of the embedded world.

Why: a text-to-video model trained on `sora_lightning.data.world` never saw the HELD_OUT
(colour, shape, motion) triples. Generating them and reading back what appears measures whether
it composes attributes it learned separately. The number is reported only if the detector first
proves itself on rendered truth; otherwise it would measure the detector, not the model.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from tqdm.auto import tqdm

from sora_lightning.data.world import eval_prompts, parse_prompt
from sora_lightning.eval.detector import (
    CHANCE,
    accuracy_on_clips,
    detect,
    detector_accuracy_on_truth,
)
from sora_lightning.eval.detector import truth_clips as render_truth_clips

MIN_DETECTOR_ACCURACY = 0.98
"""Below this accuracy on rendered truth the detector is not trusted and evaluation refuses."""
ATTRIBUTES = ("colour", "shape", "motion")
HEADLINE_KEYS = (
    "val_flow_loss",
    "val_samples",
    "vae_psnr",
    "vae_ssim",
    "colour_acc",
    "shape_acc",
    "motion_acc",
    "detector_acc_on_truth",
    "vae_ceiling",
    "chance",
)
"""The eval.json fields worth a line on the console (everything but per-prompt records)."""


def headline(scores: dict) -> dict:
    """The HEADLINE_KEYS present in `scores`: what `sora-eval` and the pipeline summary print."""
    return {key: scores[key] for key in HEADLINE_KEYS if key in scores}


def _expected(prompt: str) -> dict[str, str]:
    """The single object's colour, shape and motion a prompt asks for ("still" if unsaid)."""
    objects = parse_prompt(prompt)
    if objects is None or len(objects) != 1:
        raise ValueError(f"evaluation prompts must name exactly one object, got {prompt!r}")
    obj = objects[0]
    return {"colour": obj["colour"], "shape": obj["shape"], "motion": obj["motion"] or "still"}


def _check_frames(frames: np.ndarray, prompt: str) -> None:
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 4:
        raise ValueError(
            f"generate({prompt!r}, seed) must return uint8 frames [T, H, W, 3], got "
            f"{type(frames).__name__} {getattr(frames, 'dtype', None)} {getattr(frames, 'shape', None)}"
        )


def _score(frames: np.ndarray, expected: dict[str, str]) -> dict:
    """Detect what the frames show and compare each attribute with the expectation."""
    found = detect(frames)
    detected = {name: getattr(found, name) for name in ATTRIBUTES}
    record: dict = {"expected": expected, "detected": detected}
    record.update({f"{name}_ok": detected[name] == expected[name] for name in ATTRIBUTES})
    return record


def confusion(records: list[dict]) -> dict[str, dict[str, dict[str, int]]]:
    """{attribute: {expected: {detected: count}}} over scored videos.

    Why: an accuracy at chance does not say whether the model draws one answer for every
    prompt (e.g. every motion read as "still") or a random one; the counts do.
    """
    table: dict[str, dict[str, dict[str, int]]] = {name: {} for name in ATTRIBUTES}
    for record in records:
        for name in ATTRIBUTES:
            row = table[name].setdefault(record["expected"][name], {})
            found = record["detected"][name]
            row[found] = row.get(found, 0) + 1
    return table


def _check_detector(truth_clips: int) -> float:
    """Detector accuracy on rendered truth (min over attributes); raises if untrustworthy."""
    truth = detector_accuracy_on_truth(num_clips=truth_clips)
    accuracy = min(truth.values())
    if accuracy < MIN_DETECTOR_ACCURACY:
        raise RuntimeError(
            f"detector accuracy on rendered truth is {truth}, below {MIN_DETECTOR_ACCURACY}: "
            "adherence numbers would measure the detector, not the model"
        )
    return accuracy


def evaluate(
    generate: Callable[[str, int], np.ndarray],
    *,
    prompts: list[str] | None = None,
    num_seeds: int = 1,
    truth_clips: int = 200,
    reconstruct: Callable[[np.ndarray], np.ndarray] | None = None,
    ceiling_clips: int = 48,
) -> dict:
    """Score prompt adherence of `generate(prompt, seed) -> uint8 [T, H, W, 3]`.

    Prompts default to `eval_prompts()` (one per held-out triple). Returns colour_acc, shape_acc,
    motion_acc (fractions of videos where the detected attribute matches the prompt),
    detector_acc_on_truth, chance (uniform-guess accuracies), num_videos, confusion (per
    attribute, expected -> detected -> count) and per_prompt records (prompt, seed, expected,
    detected, and per-attribute correctness).

    `reconstruct(frames) -> frames` (the VAE's encode then decode) adds `vae_ceiling`: the
    detector's accuracy on reconstructed truth clips, the most the DiT can reach through this VAE.
    Why: it tells a weak score caused by the VAE from one caused by the DiT.
    """
    if num_seeds < 1:
        raise ValueError(f"num_seeds must be >= 1, got {num_seeds}")
    if truth_clips < 1:
        raise ValueError(f"truth_clips must be >= 1, got {truth_clips}")
    prompts = eval_prompts() if prompts is None else list(prompts)
    if not prompts:
        raise ValueError("prompts must not be empty")
    expected = {prompt: _expected(prompt) for prompt in prompts}  # fail fast on a bad prompt
    detector_accuracy = _check_detector(truth_clips)
    records = []
    for prompt in tqdm(prompts, desc="adherence", unit="prompt"):
        for seed in range(num_seeds):
            frames = generate(prompt, seed)
            _check_frames(frames, prompt)
            records.append(_score(frames, expected[prompt]) | {"prompt": prompt, "seed": seed})
    result = {
        f"{name}_acc": float(np.mean([record[f"{name}_ok"] for record in records]))
        for name in ATTRIBUTES
    }
    if reconstruct is not None:
        # Truth clips as long as the generated videos, so the VAE sees the same frame count.
        clips = render_truth_clips(ceiling_clips, seed=1, num_frames=frames.shape[0])
        result["vae_ceiling"] = accuracy_on_clips(clips, transform=reconstruct)
    result.update(
        detector_acc_on_truth=detector_accuracy,
        chance=dict(CHANCE),
        num_videos=len(records),
        confusion=confusion(records),
        per_prompt=records,
    )
    return result
