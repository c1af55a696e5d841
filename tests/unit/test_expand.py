"""Prompt expanders (sample/expand.py): none, world (the old rules, unchanged) and a local chat LM.

The LM is a tiny random-weight Qwen2 with a chat-template tokenizer, made offline and loaded from
its folder like a user's model (tests/expand_fixtures.py): its words are gibberish, but greedy
decoding makes them fixed, which is what determinism, cleaning, fallback and recording need.
Example captions come from a latent cache folder written in the cache's own format (meta.json and
webdataset shards of JSON records), holding only the caption fields that examples read.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import av
import pytest
import torch
import webdataset as wds
from expand_fixtures import tiny_chat_lm
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from omegaconf import OmegaConf

from sora_lightning.config import CONFIG_MODULE, conf_dir
from sora_lightning.data import world
from sora_lightning.data.latent_cache import training_captions
from sora_lightning.data.sources import is_held_out
from sora_lightning.sample.expand import (
    ExpanderConfig,
    LLMExpander,
    NoExpander,
    WorldExpander,
    build_expander,
    clean_expansion,
    expander_config,
    find_examples,
    resolve_examples,
)

pytestmark = pytest.mark.usefixtures("one_thread")
EXAMPLES = [
    "A video of a small red circle moving slowly to the left on a black background.",
    "A video of a large blue square rotating quickly on a white background.",
]
CAPTIONS = {f"sample-{index:03d}": f"A video of caption number {index}." for index in range(12)}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("expand-models")
    return {
        "chat": tiny_chat_lm(root / "chat"),
        "silent": tiny_chat_lm(root / "silent", silent=True),
    }


@pytest.fixture(scope="module")
def chat(models: dict[str, Path]) -> LLMExpander:
    return LLMExpander(llm_config(models["chat"]), EXAMPLES)


def llm_config(model: Path, **fields) -> ExpanderConfig:
    return ExpanderConfig(name="llm", model=str(model), max_new_tokens=12, **fields)


def write_caption_cache(folder: Path, captions: dict[str, str]) -> Path:
    """A latent cache's meta.json and shard records, with only the fields captions are read from."""
    folder.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(folder / "latents-000000.tar")) as sink:
        for key, caption in captions.items():
            sink.write({"__key__": key, "json": json.dumps({"caption": caption}).encode()})
    (folder / "meta.json").write_text(json.dumps({"shards": ["latents-000000.tar"]}))
    return folder


def composed(name: str, overrides: list[str]):
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        return compose(name, overrides=overrides)


# --- none and world -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt",
    [
        "a red circle moves left",
        "a green circle grows and a blue square moves up",
        "a large yellow triangle rotates quickly on a white background",
        "a sunset over the sea",  # outside the grammar: unchanged
        "",
    ],
)
def test_world_expander_is_the_world_rules(prompt: str) -> None:
    expander = WorldExpander()
    assert expander.expand(prompt) == world.expand_prompt(prompt)
    assert expander.expand(prompt, 1) == world.expand_prompt(prompt, num_frames=1)
    assert NoExpander().expand(prompt, 1) == prompt
    assert expander.record() == {"name": "world"}


def test_world_expander_rewrites_world_prompts() -> None:
    assert WorldExpander().expand("a red circle moves left").startswith("A video of")
    assert WorldExpander().expand("a red circle moves left", 1).startswith("An image of")


# --- cleaning the LM's answer ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ('Caption: "A red circle moves left."\nA second line.', "A red circle moves left."),
        ("<|im_start|>assistant\n  A   blue\tsquare  <|im_end|>", "A blue square"),
        ("<think>which style?</think>\n\n- Expanded prompt: A cat runs.", "A cat runs."),
        ("\n\n  “A quoted caption.”  \n", "A quoted caption."),
        ("   \n<|im_end|>\n", ""),
        ("...\n---", ""),
    ],
)
def test_answers_are_cleaned_to_one_line(raw: str, clean: str) -> None:
    assert clean_expansion(raw) == clean


# --- the llm expander -----------------------------------------------------------------------


def test_llm_is_greedy_and_deterministic(models: dict[str, Path], chat: LLMExpander) -> None:
    prompt = "a cat on a field"
    expanded = chat.expand(prompt)
    assert expanded and expanded != prompt and "\n" not in expanded
    assert expanded == clean_expansion(chat.answer(prompt))
    again = LLMExpander(llm_config(models["chat"], seed=5), EXAMPLES)  # greedy: the seed is unused
    assert again.expand(prompt) == expanded
    sampled = [
        LLMExpander(
            llm_config(models["chat"], do_sample=True, temperature=1.5, seed=seed), EXAMPLES
        )
        for seed in (0, 1)
    ]
    assert sampled[0].answer(prompt) == sampled[0].answer(prompt)  # seeded: reproducible
    assert sampled[0].answer(prompt) != sampled[1].answer(prompt)  # but it does sample


def test_llm_sees_the_examples_and_the_prompt(chat: LLMExpander) -> None:
    system, user = chat.messages("a dog")
    assert user == {"role": "user", "content": "a dog"}
    assert all(f"- {example}" in system["content"] for example in EXAMPLES)
    text = chat.tokenizer.apply_chat_template(
        chat.messages("a dog"), add_generation_prompt=True, tokenize=False
    )
    assert text.endswith("<|im_start|>assistant\n")


def test_llm_record_names_the_model_and_its_weights(models: dict[str, Path], chat) -> None:
    record = chat.record()
    assert record["name"] == "llm" and record["model"] == "chat"
    assert len(record["model_hash"]) == 16 and record["num_examples"] == len(EXAMPLES)
    silent = LLMExpander(llm_config(models["silent"]), EXAMPLES).record()
    assert silent["model_hash"] != record["model_hash"]


def test_llm_without_a_usable_answer_falls_back(models: dict[str, Path], caplog) -> None:
    silent = LLMExpander(llm_config(models["silent"]), EXAMPLES)
    assert clean_expansion(silent.answer("a cat")) == ""
    with caplog.at_level(logging.WARNING, logger="sora_lightning.sample.expand"):
        assert silent.expand("a cat") == "a cat"
    assert "returned nothing usable" in caplog.text


def test_a_tokenizer_without_chat_template_is_refused(models, tmp_path: Path) -> None:
    import shutil

    plain = shutil.copytree(models["chat"], tmp_path / "plain")
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    settings = json.loads((plain / "tokenizer_config.json").read_text())
    settings.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(settings))
    with pytest.raises(ValueError, match="no chat template"):
        LLMExpander(llm_config(plain), EXAMPLES)


# --- config ---------------------------------------------------------------------------------


def test_bad_configs_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs prompt_expander.model=DIR"):
        ExpanderConfig(name="llm")
    with pytest.raises(ValueError, match="not a local Hugging Face model folder"):
        ExpanderConfig(name="llm", model=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="not one of"):
        ExpanderConfig(name="gpt")
    with pytest.raises(ValueError, match="unknown prompt_expander keys \\['modle'\\]"):
        ExpanderConfig.from_config({"name": "llm", "modle": "x"})
    (tmp_path / "config.json").write_text("{}")  # looks like a model; never loaded below
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        ExpanderConfig(name="llm", model=str(tmp_path), max_new_tokens=0)
    llm = ExpanderConfig(name="llm", model=str(tmp_path))
    with pytest.raises(ValueError, match="needs example captions"):
        build_expander(llm, tmp_path / "export")  # refused before the (unloadable) model loads
    with pytest.raises(ValueError, match="is not a latent cache"):
        resolve_examples(ExpanderConfig(name="llm", model=str(tmp_path), examples_from_cache="x"))


@pytest.mark.parametrize("name", ["sample", "eval"])
def test_entry_points_compose_every_expander(name: str, models: dict[str, Path]) -> None:
    default = expander_config(composed(name, ["ckpt=x"]))
    assert default == ExpanderConfig(name="world")  # as expand_prompt=true was
    for option in ("none", "world"):
        cfg = composed(name, ["ckpt=x", f"prompt_expander={option}"])
        assert expander_config(cfg) == ExpanderConfig(name=option)
    cfg = composed(
        name, ["ckpt=x", "prompt_expander=llm", f"prompt_expander.model={models['chat']}"]
    )
    assert expander_config(cfg) == ExpanderConfig(name="llm", model=str(models["chat"]))
    llm_yaml = OmegaConf.load(conf_dir() / "prompt_expander" / "llm.yaml")
    assert ExpanderConfig.from_config({**llm_yaml, "model": str(models["chat"])}) == ExpanderConfig(
        name="llm", model=str(models["chat"])
    )  # the YAML's defaults are the dataclass's
    with pytest.raises(ValueError, match="needs prompt_expander.model"):
        expander_config(composed(name, ["ckpt=x", "prompt_expander=llm"]))


def test_expand_prompt_false_is_an_alias_of_none(models: dict[str, Path]) -> None:
    assert expander_config(composed("sample", ["ckpt=x", "expand_prompt=false"])).name == "none"
    assert expander_config(composed("sample", ["ckpt=x", "expand_prompt=true"])).name == "world"
    model = f"prompt_expander.model={models['chat']}"
    contradiction = ["ckpt=x", "expand_prompt=false", "prompt_expander=llm", model]
    with pytest.raises(ValueError, match="old name of prompt_expander=none"):
        expander_config(composed("sample", contradiction))


def test_pipeline_passes_one_expander_to_samples_and_eval(models, tmp_path: Path) -> None:
    """Unset: world for the world's data; chosen: passed on whole, and an llm without examples
    reads the run's cache (absolute paths and quoted examples survive the command line)."""
    from sora_lightning.pipeline.steps import STEPS, prompt_expander

    run = tmp_path / "run"
    steps = {step.name: step for step in STEPS}

    def expander_of(step: str, overrides: list[str]) -> ExpanderConfig:
        cfg = composed("pipeline", [f"run_dir={run}", *overrides])
        command = steps[step].command(cfg, run, [])
        passed = [arg for arg in command if arg.startswith("prompt_expander")]
        return expander_config(composed(step.replace("samples", "sample"), ["ckpt=x", *passed]))

    assert expander_of("samples", []) == ExpanderConfig(name="world")
    assert expander_of("eval", ["prompt_expander=none"]) == ExpanderConfig(name="none")
    llm = ["prompt_expander=llm", f"prompt_expander.model={models['chat']}"]
    for step in ("samples", "eval"):
        passed = expander_of(step, llm)
        assert passed.examples_from_cache == str(run / "cache") and passed.val_fraction == 0.05
    quoted = ['A "quoted", caption.', "It's, here = there"]
    examples = "prompt_expander.examples=" + json.dumps(quoted)
    assert expander_of("samples", [*llm, examples]).examples == quoted
    with pytest.raises(ValueError, match="needs prompt_expander.model"):  # before any step runs
        prompt_expander(composed("pipeline", ["prompt_expander=llm"]), run)


# --- examples from a run --------------------------------------------------------------------


def test_examples_are_training_captions_of_the_cache(tmp_path: Path, models) -> None:
    cache = write_caption_cache(tmp_path / "cache", CAPTIONS)
    training = [c for key, c in sorted(CAPTIONS.items()) if not is_held_out(key, 0.3)]
    assert 0 < len(training) < len(CAPTIONS)  # the split holds some out
    assert training_captions(cache, 0.3, 100) == training
    config = llm_config(models["chat"], examples_from_cache=str(cache), val_fraction=0.3)
    assert find_examples(config) == training[: config.num_examples]
    assert find_examples(llm_config(models["chat"], examples=EXAMPLES)) == EXAMPLES  # list first


def test_an_export_finds_its_runs_cache(tmp_path: Path, models) -> None:
    cache = write_caption_cache(tmp_path / "run" / "cache", CAPTIONS)
    (tmp_path / "run" / "dit").mkdir()
    run_config = {"data": {"cache_dir": str(cache)}, "dataset": {"val_fraction": 0.3}}
    OmegaConf.save(OmegaConf.create(run_config), tmp_path / "run" / "dit" / "config.yaml")
    training = training_captions(cache, 0.3, 6)
    for ckpt in (tmp_path / "run" / "export", tmp_path / "run" / "dit" / "final"):
        assert find_examples(llm_config(models["chat"]), ckpt) == training


# --- sora-sample ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """RUN/export of the tiny random models (conf/model/*/tiny.yaml) beside RUN/cache and the
    DiT run's config.yaml naming it, as a pipeline run leaves them."""
    from sora_lightning.models.dit import DiT
    from sora_lightning.models.vae import VideoVAE
    from sora_lightning.train.export import export_bundle
    from sora_lightning.train.weights import save_module

    run = tmp_path_factory.mktemp("tiny_run")
    model_conf = Path(__file__).resolve().parents[2] / "conf" / "model"
    torch.manual_seed(0)
    dit_config = instantiate(OmegaConf.load(model_conf / "dit" / "tiny.yaml"))
    dit_config.attn_backend = "sdpa"
    vae = VideoVAE(instantiate(OmegaConf.load(model_conf / "vae" / "tiny.yaml")))
    meta = {
        "vae_dir": str(run / "vae"),
        "text": {"max_length": 16},
        "latent_mean": [0.0] * 4,
        "latent_std": [1.0] * 4,
        "temporal_factor": 4,
        "spatial_factor": 4,
        "trained_frames": 9,
    }
    dit = DiT(dit_config)
    save_module(dit, dit.config, run / "dit" / "final", "dit", {"meta": meta})
    save_module(vae, vae.config, run / "vae", "vae")
    export_bundle(run / "dit" / "final", run / "vae", run / "export")
    cache = write_caption_cache(run / "cache", CAPTIONS)
    run_config = {"data": {"cache_dir": str(cache)}, "dataset": {"val_fraction": 0.3}}
    OmegaConf.save(OmegaConf.create(run_config), run / "dit" / "config.yaml")
    return run


def test_sora_sample_records_the_llm_expansion(tiny_run: Path, models, tmp_path: Path) -> None:
    from sora_lightning.sample.main import sample

    out = tmp_path / "llm.mp4"
    overrides = [
        f"ckpt={tiny_run / 'export'}",
        "prompt=a cat on a field",
        f"out={out}",
        "sampling=tiny",
        "sampling.frames=5",
        "sampling.height=16",
        "sampling.width=16",
        "prompt_expander=llm",
        f"prompt_expander.model={models['chat']}",
        "prompt_expander.max_new_tokens=12",
    ]
    assert sample(composed("sample", overrides)) == [out]
    with av.open(str(out)) as container:
        comment = json.loads(container.metadata["comment"])
    examples = training_captions(tiny_run / "cache", 0.3, 6)  # the run's, found from the export
    expected = LLMExpander(llm_config(models["chat"]), examples)
    assert comment["prompt"] == "a cat on a field"
    assert comment["expanded_prompt"] == expected.expand("a cat on a field") != comment["prompt"]
    assert comment["prompt_expander"] == expected.record()


def test_a_generator_expands_with_the_world_rules_unless_told(tiny_run: Path) -> None:
    from sora_lightning.sample.generate import load_generator

    export = tiny_run / "export"
    assert isinstance(load_generator(export).expander, WorldExpander)  # as before
    assert isinstance(load_generator(export, expand_prompts=False).expander, NoExpander)
    chosen = NoExpander()
    assert load_generator(export, expander=chosen).expander is chosen
