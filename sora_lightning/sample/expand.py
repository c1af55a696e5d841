"""Prompt expanders: a user's short prompt -> the detailed caption form the DiT was trained on.

Why: a DiT learns from detailed captions, so a terse prompt at sampling is far from what it saw.
Three expanders sit behind one interface (`PromptExpander.expand`), chosen by the
`prompt_expander` config group (conf/prompt_expander/):
- `none`: the prompt unchanged;
- `world`: the embedded world's grammar rules (`data.world.expand_prompt`); a prompt outside the
  grammar passes unchanged;
- `llm`: a local Hugging Face causal LM with a chat template, shown a few training captions as
  examples of the target style and asked to rewrite the prompt in it. Greedy by default (the same
  prompt always gives the same expansion); the answer is cleaned to one line without chat
  artefacts, and an answer with nothing usable falls back to the prompt with a logged warning.

The examples come from, in order: `prompt_expander.examples` (a list in the config);
`prompt_expander.examples_from_cache` (a latent cache folder); the run an export belongs to (its
DiT run's config.yaml names the latent cache and the held-out fraction). Only training captions
are shown, never held-out ones (evaluation's prompts). A bad config (no model, a folder that is
no model, no examples to find) is refused by `build_expander` before any model loads.
What expanded a prompt (`PromptExpander.record`: name, and for llm the model's weight hash and
the examples' hash) is written into each mp4's metadata and provenance manifest.
"""

from __future__ import annotations

import json
import logging
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from sora_lightning.data.latent_cache import training_captions
from sora_lightning.data.world import expand_prompt as world_expand_prompt
from sora_lightning.sample.safety import folder_hash
from sora_lightning.utils import combined_hash

log = logging.getLogger(__name__)

EXPANDERS = ("none", "world", "llm")
INSTRUCTION = (
    "You rewrite short video prompts as detailed captions. Answer with one caption in the style "
    "of the examples: the same structure, the same kinds of detail, about the same length. Keep "
    "everything the prompt says and add only plausible detail. Write the caption alone on one "
    "line, with no preamble, quotes or notes."
)
"""The llm expander's system message (`prompt_expander.instruction` replaces it); the examples
follow it, one per line."""
LABEL = re.compile(
    r"^\s*(?:[-*•]\s*|\d+[.)]\s*)?(?:(?:expanded|detailed|rewritten)?\s*(?:caption|prompt)"
    r"|answer|output|assistant)\s*:\s*",
    re.IGNORECASE,
)
"""A label an LM may put before its answer ("Caption: ...", "- Expanded prompt: ...")."""
CHAT_MARKER = re.compile(r"<\|[^|<>]*\|>|<think>.*?</think>|</?s>", re.DOTALL)
"""Chat-template tokens and reasoning blocks that decoding without special tokens can leave."""
ROLES = ("system", "user", "assistant", "model")
"""A line holding only one of these is a chat turn's header left by its template, not an answer."""


@dataclass
class ExpanderConfig:
    """The `prompt_expander` node; the llm fields matter only for `name: llm`."""

    name: str = "world"
    """none | world | llm."""
    model: str | None = None
    """llm: a local Hugging Face causal LM folder whose tokenizer has a chat template."""
    examples: list[str] = field(default_factory=list)
    """llm: captions in the target style; empty: taken from the cache or the export's run."""
    examples_from_cache: str | None = None
    """llm: a latent cache folder whose training captions are the examples."""
    val_fraction: float = 0.0
    """llm, with examples_from_cache: the held-out fraction, whose captions are never shown."""
    num_examples: int = 6
    """llm: examples shown to the LM (more: closer style, longer prompt)."""
    max_new_tokens: int = 120
    """llm: longest answer in tokens (the text encoder truncates past its max_length anyway)."""
    do_sample: bool = False
    """llm: false decodes greedily (same prompt, same expansion); true samples with the seed."""
    temperature: float = 0.7
    """llm, with do_sample: sampling temperature."""
    seed: int = 0
    """llm, with do_sample: the RNG seed of every expansion (so each is reproducible)."""
    instruction: str | None = None
    """llm: the system message; null: INSTRUCTION."""
    device: str | None = None
    """llm: where the LM runs; null: cuda when available, else cpu."""

    def __post_init__(self) -> None:
        self.examples = [str(example) for example in self.examples]
        if self.name not in EXPANDERS:
            raise ValueError(f"prompt_expander={self.name!r} is not one of {list(EXPANDERS)}")
        if self.name == "llm":
            self._check_llm()

    def _check_llm(self) -> None:
        if not self.model:
            raise ValueError(
                "prompt_expander=llm needs prompt_expander.model=DIR, a local Hugging Face "
                "causal LM folder (its config.json, weights and a tokenizer with a chat template)"
            )
        if not (Path(self.model).expanduser() / "config.json").is_file():
            raise ValueError(
                f"prompt_expander.model={self.model} is not a local Hugging Face model folder "
                "(no config.json); nothing is downloaded: pass a folder on disk"
            )
        if self.num_examples < 1 or self.max_new_tokens < 1:
            raise ValueError(
                "prompt_expander.num_examples and max_new_tokens must be >= 1, got "
                f"{self.num_examples} and {self.max_new_tokens}"
            )
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"prompt_expander.val_fraction must be in [0, 1): {self.val_fraction}")

    @classmethod
    def from_config(cls, node: Mapping[str, Any] | None) -> ExpanderConfig:
        """The `prompt_expander` node of a composed config (absent: world); unknown keys refused."""
        node = dict(node or {})
        unknown = sorted(set(node) - {f.name for f in fields(cls)})
        if unknown:
            known = sorted(f.name for f in fields(cls))
            raise ValueError(f"unknown prompt_expander keys {unknown}; known: {known}")
        return cls(**node)

    def as_overrides(self, prefix: str = "prompt_expander") -> list[str]:
        """`prefix=name` and, for llm, `prefix.key=value` (absolute paths, JSON values), so another
        process expands the same way: the pipeline's samples and eval steps."""
        overrides = [f"{prefix}={self.name}"]
        if self.name != "llm":
            return overrides
        for item in fields(self):
            value = getattr(self, item.name)
            if item.name in ("model", "examples_from_cache") and value:
                value = str(Path(value).expanduser().resolve())
            if item.name != "name":
                overrides.append(f"{prefix}.{item.name}={json.dumps(value)}")
        return overrides


def expander_config(cfg: DictConfig | Mapping[str, Any]) -> ExpanderConfig:
    """The expander a sora-sample or sora-eval config asks for: `prompt_expander`, with the old
    switch `expand_prompt=false` read as `prompt_expander=none` (true keeps the group's choice)."""
    node = cfg.get("prompt_expander")
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    config = ExpanderConfig.from_config(node)
    old = cfg.get("expand_prompt")
    if old is None or bool(old):
        return config
    if config.name == "llm":
        raise ValueError(
            "expand_prompt=false contradicts prompt_expander=llm: expand_prompt is the old name "
            "of prompt_expander=none; drop it"
        )
    return ExpanderConfig(name="none")


class PromptExpander(ABC):
    """Rewrites a prompt into the caption form the DiT was trained on."""

    name: str

    @abstractmethod
    def expand(self, prompt: str, num_frames: int | None = None) -> str:
        """The expanded prompt; num_frames=1 asks for the image form where the expander has one."""

    def record(self) -> dict[str, Any]:
        """What expanded the prompts, for each output's metadata and provenance manifest."""
        return {"name": self.name}


class NoExpander(PromptExpander):
    """The prompt as given reaches the text encoder."""

    name = "none"

    def expand(self, prompt: str, num_frames: int | None = None) -> str:
        return prompt


class WorldExpander(PromptExpander):
    """The embedded world's grammar rules; prompts outside the grammar pass unchanged."""

    name = "world"

    def expand(self, prompt: str, num_frames: int | None = None) -> str:
        if num_frames is None:
            return world_expand_prompt(prompt)
        return world_expand_prompt(prompt, num_frames=num_frames)


def clean_expansion(text: str) -> str:
    """An LM's answer as one caption line: chat tokens, reasoning, labels and quotes removed,
    whitespace collapsed; "" when nothing with a letter or digit is left."""
    text = CHAT_MARKER.sub("\n", text)
    lines = [line.strip() for line in text.splitlines()]
    answers = (line for line in lines if line.lower() not in ROLES)
    line = next((line for line in answers if any(c.isalnum() for c in line)), "")
    line = LABEL.sub("", line).strip()
    if len(line) >= 2 and line[0] in "\"'“`" and line[-1] in "\"'”`":
        line = line[1:-1].strip()
    line = " ".join(line.split())
    return line if any(c.isalnum() for c in line) else ""


class LLMExpander(PromptExpander):
    """A local chat LM shown training captions as examples of the style to write in."""

    name = "llm"

    def __init__(self, config: ExpanderConfig, examples: list[str]) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.config, self.examples = config, examples
        self.folder = Path(str(config.model)).expanduser()
        where = f"prompt_expander.model={config.model}"
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.folder, local_files_only=True)
            self.model = AutoModelForCausalLM.from_pretrained(self.folder, local_files_only=True)
        except (OSError, ValueError) as error:
            raise ValueError(f"{where} cannot be loaded as a causal LM: {error}") from error
        if not self.tokenizer.chat_template:
            raise ValueError(f"{where}: its tokenizer has no chat template (an instruct model has)")
        device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = self.model.to(device).eval()
        self.hash = folder_hash(self.folder)
        self._expanded: dict[str, str] = {}

    def expand(self, prompt: str, num_frames: int | None = None) -> str:
        """The same expansion for video and image forms (the examples set the form); each prompt
        is expanded once per run."""
        if prompt not in self._expanded:
            answer = clean_expansion(self.answer(prompt))
            if not answer:
                log.warning(
                    f"prompt_expander=llm: {self.folder.name} returned nothing usable for "
                    f"{prompt!r}; the prompt is used as given"
                )
            self._expanded[prompt] = answer or prompt
        return self._expanded[prompt]

    def messages(self, prompt: str) -> list[dict[str, str]]:
        """The chat: the instruction with the examples, then the prompt."""
        listed = "\n".join(f"- {example}" for example in self.examples)
        system = f"{self.config.instruction or INSTRUCTION}\n\nExamples:\n{listed}"
        return [{"role": "system", "content": system}, {"role": "user", "content": prompt}]

    @torch.no_grad()
    def answer(self, prompt: str) -> str:
        """The LM's raw answer (special tokens dropped), before `clean_expansion`."""
        from transformers import GenerationConfig

        inputs = self.tokenizer.apply_chat_template(
            self.messages(prompt), add_generation_prompt=True, return_dict=True, return_tensors="pt"
        ).to(self.model.device)
        eos = self.model.generation_config.eos_token_id or self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos
        # a fresh GenerationConfig: the model's own defaults (often do_sample=true) do not apply
        settings = GenerationConfig(
            max_new_tokens=self.config.max_new_tokens,
            do_sample=self.config.do_sample,
            temperature=self.config.temperature if self.config.do_sample else None,
            eos_token_id=eos,
            pad_token_id=pad[0] if isinstance(pad, list) else pad,
        )
        cuda = self.model.device.type == "cuda"
        with torch.random.fork_rng(devices=[self.model.device.index or 0] if cuda else []):
            torch.manual_seed(self.config.seed)  # the caller's RNG streams are left as they were
            output = self.model.generate(**inputs, generation_config=settings)
        new = output[0, inputs["input_ids"].shape[1] :]
        return self.tokenizer.decode(new, skip_special_tokens=True)

    def record(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": self.folder.name,
            "model_hash": self.hash,
            "examples_hash": combined_hash(*self.examples),
            "num_examples": len(self.examples),
            "max_new_tokens": self.config.max_new_tokens,
            "do_sample": self.config.do_sample,
        }


def run_cache(ckpt: str | Path) -> tuple[Path, float] | None:
    """(latent cache, held-out fraction) of the run a model belongs to: RUN/export or
    RUN/dit/final, whose DiT run wrote RUN/dit/config.yaml; None when none is found."""
    folder = Path(ckpt).expanduser().resolve()
    for config in (folder.parent / "dit" / "config.yaml", folder.parent / "config.yaml"):
        if config.is_file():
            run = OmegaConf.load(config)
            cache = OmegaConf.select(run, "data.cache_dir")
            if cache and (Path(cache) / "meta.json").is_file():
                return Path(cache), float(OmegaConf.select(run, "dataset.val_fraction") or 0.0)
    return None


def find_examples(config: ExpanderConfig, ckpt: str | Path | None = None) -> list[str]:
    """The llm expander's style examples, from the first source that has some (module doc)."""
    if config.examples:
        return config.examples[: config.num_examples]
    source = None
    if config.examples_from_cache:  # checked here: a pipeline names its cache before it exists
        source = Path(config.examples_from_cache).expanduser(), config.val_fraction
        if not (source[0] / "meta.json").is_file():
            raise ValueError(
                f"prompt_expander.examples_from_cache={source[0]} is not a latent cache (no "
                "meta.json)"
            )
    elif ckpt is not None:
        source = run_cache(ckpt)
    examples = training_captions(*source, config.num_examples) if source else []
    if not examples:
        raise ValueError(
            "prompt_expander=llm needs example captions of the style to write in, and "
            f"{'the cache ' + str(source[0]) + ' has none' if source else 'none were found'}: "
            "pass prompt_expander.examples=[...] or prompt_expander.examples_from_cache=CACHE_DIR "
            "(a model inside a pipeline run finds its run's cache by itself)"
        )
    return examples


def resolve_examples(config: ExpanderConfig, ckpt: str | Path | None = None) -> ExpanderConfig:
    """`config` with the llm expander's examples found (`find_examples`), so a missing source is
    refused up front, before any model (the safety filters', the LM, the video model) loads."""
    if config.name != "llm" or config.examples:
        return config
    return replace(config, examples=find_examples(config, ckpt))


def build_expander(config: ExpanderConfig, ckpt: str | Path | None = None) -> PromptExpander:
    """The configured expander; for llm the examples are found (or refused) before the LM loads.

    `ckpt` is the video model (an export or checkpoint), whose run may hold the examples.
    """
    if config.name == "none":
        return NoExpander()
    if config.name == "world":
        return WorldExpander()
    return LLMExpander(config, find_examples(config, ckpt))
