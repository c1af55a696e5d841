"""Safety checks at generation: a prompt filter before any model loads, a frame filter before writing.

Why: a model trained on open data can be asked for, or drift into, content its operator does not
want to publish. `safety.prompt_filter` (a word list and/or a local Hugging Face text classifier)
refuses a prompt before the video model loads, naming the rule that refused it; it also reads
the expanded prompt before anything is written, since an expander may add words.
`safety.frame_filter` (a local Hugging Face image classifier) scores frames sampled evenly
through each video and withholds the video when any scores above its threshold: nothing is
written, a message says why, and the run counts it. Both are off by default; what ran, with which
model (a hash of its weights) and what it scored, goes into each output's provenance manifest.

A classifier's score is the probability of its `unsafe_labels`: summed over a softmax (one label
per input), or the largest sigmoid for a multi-label model (`problem_type` multi_label_classification).
Models load from local folders only (`local_files_only`); nothing downloads.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sora_lightning.utils import combined_hash, file_sha256

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


class PromptRefused(ValueError):
    """A prompt the prompt filter refuses; `rule` names what refused it."""

    def __init__(self, prompt: str, rule: str) -> None:
        super().__init__(f"prompt {prompt!r} refused by safety.prompt_filter: {rule}")
        self.prompt, self.rule = prompt, rule


def _refuse_unknown(cls: type, node: Mapping[str, Any], where: str) -> None:
    unknown = sorted(set(node) - {f.name for f in fields(cls)})
    if unknown:
        known = sorted(f.name for f in fields(cls))
        raise ValueError(f"unknown {where} keys {unknown}; known: {known}")


def _check_classifier(where: str, model: str | None, labels: list[str], threshold: float) -> None:
    if model is not None and not (Path(model).expanduser() / "config.json").is_file():
        raise ValueError(
            f"{where}.model={model} is not a local Hugging Face model folder (no config.json)"
        )
    if model is not None and not labels:
        raise ValueError(
            f"{where}.unsafe_labels is empty: name the model's labels that count as unsafe"
        )
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"{where}.threshold must be in [0, 1], got {threshold}")


@dataclass
class PromptFilterConfig:
    """`safety.prompt_filter`: refuse prompts before any model loads (off when both are null)."""

    words: str | None = None
    """A word list file: one word or phrase per line, matched as whole words, any case; # comments."""
    model: str | None = None
    """A local Hugging Face text-classification model folder (weights, config, tokenizer)."""
    unsafe_labels: list[str] = field(default_factory=list)
    """The model's labels that count as unsafe (e.g. [toxic])."""
    threshold: float = 0.5
    """A prompt whose unsafe score is above this is refused."""

    def __post_init__(self) -> None:
        self.unsafe_labels = [str(label) for label in self.unsafe_labels]
        if self.words is not None and not Path(self.words).expanduser().is_file():
            raise ValueError(f"safety.prompt_filter.words={self.words} is not a file")
        _check_classifier("safety.prompt_filter", self.model, self.unsafe_labels, self.threshold)

    @property
    def enabled(self) -> bool:
        return self.words is not None or self.model is not None


@dataclass
class FrameFilterConfig:
    """`safety.frame_filter`: withhold videos whose frames an image classifier flags (off: null)."""

    model: str | None = None
    """A local Hugging Face image-classification model folder (weights, config, image processor)."""
    unsafe_labels: list[str] = field(default_factory=list)
    """The model's labels that count as unsafe (e.g. [nsfw])."""
    threshold: float = 0.5
    """A video with any reviewed frame scoring above this is withheld."""
    num_frames: int = 4
    """Frames reviewed per video, evenly spaced from first to last."""

    def __post_init__(self) -> None:
        self.unsafe_labels = [str(label) for label in self.unsafe_labels]
        _check_classifier("safety.frame_filter", self.model, self.unsafe_labels, self.threshold)
        if self.num_frames < 1:
            raise ValueError(f"safety.frame_filter.num_frames must be >= 1, got {self.num_frames}")

    @property
    def enabled(self) -> bool:
        return self.model is not None


@dataclass
class SafetyConfig:
    """The `safety` node: both filters, off by default."""

    prompt_filter: PromptFilterConfig = field(default_factory=PromptFilterConfig)
    frame_filter: FrameFilterConfig = field(default_factory=FrameFilterConfig)

    def __post_init__(self) -> None:
        for name, cls in (
            ("prompt_filter", PromptFilterConfig),
            ("frame_filter", FrameFilterConfig),
        ):
            value = getattr(self, name)
            if value is None:
                setattr(self, name, cls())
            elif not isinstance(value, cls):
                _refuse_unknown(cls, value, f"safety.{name}")
                setattr(self, name, cls(**dict(value)))

    @classmethod
    def from_config(cls, node: Mapping[str, Any] | None) -> SafetyConfig:
        """The `safety` node of a composed config (absent: both off); unknown keys refused."""
        node = dict(node or {})
        _refuse_unknown(cls, node, "safety")
        return cls(**node)

    def as_overrides(self, prefix: str = "safety") -> list[str]:
        """`prefix.filter.key=value` (absolute paths, JSON values) so another process screens the
        same way: the pipeline's samples and eval steps."""
        overrides = []
        for name, config in (
            ("prompt_filter", self.prompt_filter),
            ("frame_filter", self.frame_filter),
        ):
            for key, value in asdict(config).items():
                if key in ("words", "model") and value is not None:
                    value = str(Path(value).expanduser().resolve())
                overrides.append(f"{prefix}.{name}.{key}={json.dumps(value)}")
        return overrides


class WordList:
    """Words and phrases, each matched as whole words in any case; a match names its line."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        self.entries: list[tuple[int, str, re.Pattern[str]]] = []
        for number, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), 1):
            phrase = line.split("#", 1)[0].strip()
            if phrase:
                words = r"\s+".join(re.escape(word) for word in phrase.split())
                self.entries.append((number, phrase, re.compile(rf"(?<!\w){words}(?!\w)", re.I)))
        if not self.entries:
            raise ValueError(f"safety.prompt_filter.words={path} holds no words")

    def match(self, text: str) -> str | None:
        """The rule `text` breaks (file, line, phrase), or None."""
        for number, phrase, pattern in self.entries:
            if pattern.search(text):
                return f"word list {self.path.name} line {number}: {phrase!r}"
        return None

    def settings(self) -> dict[str, Any]:
        return {
            "file": self.path.name,
            "sha256": file_sha256(self.path),
            "entries": len(self.entries),
        }


def folder_hash(folder: Path) -> str:
    """A short hash of a model folder's weight files (what the classifier really is)."""
    weights = sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    return combined_hash(*(f"{p.name}:{file_sha256(p)}" for p in weights))


class Classifier:
    """A local Hugging Face classifier scoring inputs by the probability of its unsafe labels."""

    def __init__(self, where: str, folder: str, unsafe_labels: list[str], kind: str) -> None:
        from transformers import (
            AutoImageProcessor,
            AutoModelForImageClassification,
            AutoModelForSequenceClassification,
            AutoTokenizer,
        )

        self.where, self.folder = where, Path(folder).expanduser()
        loaders = {
            "text": (AutoModelForSequenceClassification, AutoTokenizer),
            "image": (AutoModelForImageClassification, AutoImageProcessor),
        }[kind]
        try:
            self.model = loaders[0].from_pretrained(self.folder, local_files_only=True).eval()
            self.processor = loaders[1].from_pretrained(self.folder, local_files_only=True)
        except (OSError, ValueError) as error:
            raise ValueError(
                f"{where}.model={folder} cannot be loaded as a {kind} classifier: {error}"
            ) from error
        label_ids = {str(name): int(index) for index, name in self.model.config.id2label.items()}
        missing = sorted(set(unsafe_labels) - set(label_ids))
        if missing:
            raise ValueError(
                f"{where}.unsafe_labels {missing} are not labels of {folder}: {sorted(label_ids)}"
            )
        self.unsafe = [(label, label_ids[label]) for label in unsafe_labels]
        self.multi_label = self.model.config.problem_type == "multi_label_classification"
        self.hash = folder_hash(self.folder)

    @torch.no_grad()
    def score(self, inputs: dict[str, torch.Tensor]) -> list[tuple[float, str]]:
        """(unsafe score, the most likely unsafe label) per input."""
        logits = self.model(**inputs).logits.float()
        probs = logits.sigmoid() if self.multi_label else logits.softmax(-1)
        unsafe = probs[:, [index for _, index in self.unsafe]]
        scores = unsafe.max(-1).values if self.multi_label else unsafe.sum(-1)
        top = unsafe.argmax(-1)
        return [(float(s), self.unsafe[int(t)][0]) for s, t in zip(scores, top, strict=True)]

    def score_texts(self, texts: list[str]) -> list[tuple[float, str]]:
        max_length = getattr(self.model.config, "max_position_embeddings", 512)
        inputs = self.processor(
            texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length
        )
        return self.score(dict(inputs))

    def score_images(self, images: np.ndarray) -> list[tuple[float, str]]:
        """uint8 images [N, H, W, 3]."""
        return self.score(dict(self.processor(images=list(images), return_tensors="pt")))

    def settings(self, threshold: float) -> dict[str, Any]:
        labels = [label for label, _ in self.unsafe]
        return {
            "model": self.folder.name,
            "hash": self.hash,
            "unsafe_labels": labels,
            "threshold": threshold,
        }


class PromptFilter:
    """The word list, then the text classifier; the first rule a prompt breaks refuses it."""

    def __init__(self, config: PromptFilterConfig) -> None:
        self.config = config
        self.words = WordList(config.words) if config.words else None
        self.classifier = (
            Classifier("safety.prompt_filter", config.model, config.unsafe_labels, "text")
            if config.model
            else None
        )

    def rule(self, prompt: str) -> str | None:
        """What refuses `prompt`, or None when it passes."""
        found = self.words.match(prompt) if self.words else None
        if found is None and self.classifier is not None:
            score, label = self.classifier.score_texts([prompt])[0]
            if score > self.config.threshold:
                found = (
                    f"text classifier {self.classifier.folder.name}: {label!r} scored "
                    f"{score:.3f} > threshold {self.config.threshold}"
                )
        return found

    def settings(self) -> dict[str, Any]:
        return {
            "words": self.words.settings() if self.words else None,
            "classifier": self.classifier.settings(self.config.threshold)
            if self.classifier
            else None,
        }


@dataclass
class FrameReview:
    """The frame filter's verdict on one video."""

    score: float
    """The highest unsafe score over the reviewed frames."""
    label: str
    frame: int
    """Index of the frame with that score."""
    num_frames: int


class FrameFilter:
    """Scores frames sampled evenly through a video with the image classifier."""

    def __init__(self, config: FrameFilterConfig) -> None:
        self.config = config
        self.classifier = Classifier(
            "safety.frame_filter", config.model, config.unsafe_labels, "image"
        )

    def review(self, frames: np.ndarray) -> FrameReview:
        """uint8 frames [T, H, W, 3] -> the highest-scoring reviewed frame."""
        count = min(self.config.num_frames, len(frames))
        chosen = np.unique(np.round(np.linspace(0, len(frames) - 1, count)).astype(np.int64))
        scored = self.classifier.score_images(frames[chosen])
        best = int(np.argmax([score for score, _ in scored]))
        score, label = scored[best]
        return FrameReview(score, label, int(chosen[best]), len(chosen))

    def settings(self) -> dict[str, Any]:
        return {
            **self.classifier.settings(self.config.threshold),
            "num_frames": self.config.num_frames,
        }


@dataclass
class Review:
    """What the filters said about one generated video: why it is withheld (None: written), and
    the record for its provenance manifest."""

    withheld: str | None
    record: dict[str, Any]


class Safety:
    """Both filters of one run, and what they refused and withheld (counted for the report)."""

    def __init__(self, config: SafetyConfig) -> None:
        self.config = config
        prompt, frame = config.prompt_filter, config.frame_filter
        self.prompt_filter = PromptFilter(prompt) if prompt.enabled else None
        self.frame_filter = FrameFilter(frame) if frame.enabled else None
        self.refused: dict[str, str] = {}
        self.withheld: list[dict[str, str]] = []
        self._checked: dict[str, str | None] = {}

    @classmethod
    def from_config(cls, node: Mapping[str, Any] | None) -> Safety:
        return cls(SafetyConfig.from_config(node))

    @property
    def enabled(self) -> bool:
        return self.prompt_filter is not None or self.frame_filter is not None

    def refusal(self, prompt: str) -> str | None:
        """The rule that refuses `prompt` (None: allowed); each prompt is judged once, logged and
        counted the first time."""
        if self.prompt_filter is None:
            return None
        if prompt not in self._checked:
            rule = self._checked[prompt] = self.prompt_filter.rule(prompt)
            if rule is not None:
                self.refused[prompt] = rule
                log.warning(f"safety: {PromptRefused(prompt, rule)}; nothing is generated for it")
        return self._checked[prompt]

    def screen(self, prompts: list[str]) -> list[str]:
        """The prompts the prompt filter allows, in order (call it before any model loads)."""
        return [prompt for prompt in prompts if self.refusal(prompt) is None]

    def review(self, video: Any) -> Review:
        """Check a generated video (a `GeneratedVideo`) before it is written: its expanded prompt
        by the prompt filter, sampled frames by the frame filter."""
        record: dict[str, Any] = {"prompt_filter": None, "frame_filter": None}
        reasons = []
        if self.prompt_filter is not None:
            record["prompt_filter"] = {**self.prompt_filter.settings(), "result": "passed"}
            expanded = video.expanded_prompt
            rule = self.prompt_filter.rule(expanded) if expanded != video.prompt else None
            if rule is not None:
                reasons.append(f"its expanded prompt breaks safety.prompt_filter: {rule}")
        if self.frame_filter is not None:
            found = self.frame_filter.review(video.frames)
            record["frame_filter"] = {**self.frame_filter.settings(), "max_score": found.score}
            if found.score > self.config.frame_filter.threshold:
                reasons.append(
                    f"frame {found.frame} scored {found.score:.3f} for {found.label!r}, above "
                    f"safety.frame_filter.threshold={self.config.frame_filter.threshold}"
                )
        withheld = "; ".join(reasons) or None
        if withheld:
            self.withheld.append({"prompt": video.prompt, "reason": withheld})
            log.warning(
                f"safety: output for {video.prompt!r} withheld (nothing written): {withheld}"
            )
        return Review(withheld, record)

    def report(self) -> dict[str, Any]:
        """Counts and reasons, for eval.json and the end-of-run line."""
        return {
            "prompts_refused": len(self.refused),
            "outputs_withheld": len(self.withheld),
            "refused": [{"prompt": p, "rule": r} for p, r in self.refused.items()],
            "withheld": list(self.withheld),
        }

    def summary(self) -> str:
        return f"safety: {len(self.refused)} prompt(s) refused, {len(self.withheld)} output(s) withheld"
