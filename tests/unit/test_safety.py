"""Safety checks at generation: prompts refused before any model loads, flagged videos withheld.

Tiny random-weight classifiers (BERT for text, ViT for frames) whose verdict is fixed by their
bias stand in for real ones (tests/provenance_fixtures.py); a word list is a text file.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import c2pa
import pytest
from hydra import compose, initialize_config_module
from provenance_fixtures import PROMPT, image_classifier, make_chain, text_classifier, tiny_video

from sora_lightning.config import CONFIG_MODULE
from sora_lightning.diffusion.sampling import SamplingConfig
from sora_lightning.eval.generic import prompt_videos
from sora_lightning.sample.provenance import GENERATION_LABEL, Provenance, ProvenanceConfig
from sora_lightning.sample.safety import (
    PromptRefused,
    Safety,
    SafetyConfig,
    WordList,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("safety-models")
    return SimpleNamespace(
        toxic=text_classifier(root / "toxic", unsafe=True),
        kind=text_classifier(root / "kind", unsafe=False),
        nsfw=image_classifier(root / "nsfw", unsafe=True),
        normal=image_classifier(root / "normal", unsafe=False),
    )


@pytest.fixture
def words(tmp_path: Path) -> Path:
    path = tmp_path / "words.txt"
    path.write_text("# refused outright\nknife\n\nbloody   mess  # a phrase\n")
    return path


def safety(**filters) -> Safety:
    return Safety(SafetyConfig(**filters))


def test_word_list_matches_whole_words_in_any_case_and_names_the_line(words: Path) -> None:
    listed = WordList(words)
    assert listed.match("A KNIFE, on the table") == "word list words.txt line 2: 'knife'"
    assert listed.match("what a Bloody\tMess") == "word list words.txt line 4: 'bloody   mess'"
    assert listed.match("a knifed apple, a bloody nose") is None
    empty = words.with_name("empty.txt")
    empty.write_text("# nothing\n")
    with pytest.raises(ValueError, match="holds no words"):
        WordList(empty)


def test_text_classifier_refuses_above_threshold(models) -> None:
    refusing = safety(prompt_filter={"model": str(models.toxic), "unsafe_labels": ["toxic"]})
    rule = refusing.refusal(PROMPT)
    assert rule is not None and "'toxic' scored 0.98" in rule and "threshold 0.5" in rule
    assert refusing.screen([PROMPT, "a blue square"]) == []
    assert refusing.report()["prompts_refused"] == 2
    lenient = safety(
        prompt_filter={"model": str(models.toxic), "unsafe_labels": ["toxic"], "threshold": 0.99}
    )
    assert lenient.refusal(PROMPT) is None
    kind = safety(prompt_filter={"model": str(models.kind), "unsafe_labels": ["toxic"]})
    assert kind.screen([PROMPT]) == [PROMPT]
    with pytest.raises(ValueError, match="\\['hate'\\] are not labels of .*\\['safe', 'toxic'\\]"):
        safety(prompt_filter={"model": str(models.kind), "unsafe_labels": ["hate"]})


def test_frame_filter_withholds_and_records_its_score(models) -> None:
    flagging = safety(frame_filter={"model": str(models.nsfw), "unsafe_labels": ["nsfw"]})
    review = flagging.review(tiny_video(num_frames=9))
    assert review.withheld and "scored 0.982 for 'nsfw'" in review.withheld
    assert flagging.report()["outputs_withheld"] == 1
    passing = safety(
        frame_filter={"model": str(models.normal), "unsafe_labels": ["nsfw"], "num_frames": 3}
    )
    review = passing.review(tiny_video(num_frames=9))
    assert review.withheld is None
    record = review.record["frame_filter"]
    assert record["max_score"] < 0.05 and record["num_frames"] == 3
    assert record["model"] == "normal" and len(record["hash"]) == 16
    assert review.record["prompt_filter"] is None


def test_expanded_prompt_is_read_too(words: Path) -> None:
    video = tiny_video()
    video.expanded_prompt = "A video of a knife."
    review = safety(prompt_filter={"words": str(words)}).review(video)
    assert review.withheld and "expanded prompt" in review.withheld and "'knife'" in review.withheld


@pytest.mark.parametrize(
    ("node", "message"),
    [
        ({"prompt_filter": {"words": "missing.txt"}}, "prompt_filter.words=missing.txt is not"),
        ({"prompt_filter": {"model": "."}}, "prompt_filter.model=. is not a local Hugging Face"),
        ({"frame_filter": {"modl": "x"}}, "unknown safety.frame_filter keys \\['modl'\\]"),
        ({"frame_filter": {"num_frames": 0}}, "num_frames must be >= 1"),
        ({"filter": {}}, "unknown safety keys \\['filter'\\]"),
    ],
)
def test_bad_config_is_named(node: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SafetyConfig.from_config(node)


def test_classifier_config_needs_labels_and_a_sane_threshold(models) -> None:
    with pytest.raises(ValueError, match="frame_filter.unsafe_labels is empty"):
        SafetyConfig(frame_filter={"model": str(models.nsfw)})
    with pytest.raises(ValueError, match="prompt_filter.threshold must be in \\[0, 1\\]"):
        SafetyConfig(prompt_filter={"words": None, "threshold": 2})


@pytest.mark.parametrize("name", ["sample", "eval"])
def test_config_nodes_are_off_by_default_and_overrides_reproduce_them(name: str, words, models):
    config = SafetyConfig(
        prompt_filter={"words": str(words)},
        frame_filter={"model": str(models.nsfw), "unsafe_labels": ["nsfw"], "threshold": 0.9},
    )
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        default = compose(name, overrides=["ckpt=x"])
        cfg = compose(name, overrides=["ckpt=x", *config.as_overrides()])
    assert SafetyConfig.from_config(default.safety) == SafetyConfig()
    assert not Safety.from_config(default.safety).enabled
    assert SafetyConfig.from_config(cfg.safety) == config


def test_sora_sample_refuses_the_prompt_before_any_model_loads(tmp_path: Path, words) -> None:
    from sora_lightning.sample.main import sample

    overrides = [
        f"ckpt={tmp_path / 'no-such-checkpoint'}",  # loading it would fail: it is never reached
        "prompt='a knife in a drawer'",
        f"safety.prompt_filter.words={words}",
    ]
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        cfg = compose("sample", overrides=overrides)
    with pytest.raises(PromptRefused, match="words.txt line 2: 'knife'") as refused:
        sample(cfg)
    assert refused.value.prompt == "a knife in a drawer"


def test_sora_sample_withholds_flagged_videos(tmp_path: Path, models, monkeypatch, capsys):
    """With a stub generator: a flagged video is not written and the run says so and fails."""
    from sora_lightning.sample import main

    stub = SimpleNamespace(generate=lambda prompt, config, cond_frames=None: tiny_video(prompt))
    stub.to = lambda device: stub  # sora-sample moves the generator to its device
    monkeypatch.setattr(main, "load_generator", lambda *args, **kwargs: stub)
    overrides = [
        "ckpt=x",
        "prompts=[a,b]",
        f"out_dir={tmp_path / 'out'}",
        f"safety.frame_filter.model={models.nsfw}",
        "safety.frame_filter.unsafe_labels=[nsfw]",
    ]
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        cfg = compose("sample", overrides=overrides)
    with pytest.raises(RuntimeError, match="no video written: all 2 withheld"):
        main.sample(cfg)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_eval_prompt_videos_screen_withhold_and_sign(tmp_path: Path, models, words) -> None:
    """Refused and withheld prompts leave a reason and no file; the rest are signed with the
    safety checks that passed them recorded in the manifest."""
    chain = make_chain(tmp_path / "pki")
    provenance = Provenance(ProvenanceConfig(str(chain.cert), str(chain.key)))
    checks = safety(
        prompt_filter={"words": str(words)},
        frame_filter={"model": str(models.normal), "unsafe_labels": ["nsfw"]},
    )
    prompts = [PROMPT, "a knife"]
    records = prompt_videos(
        lambda prompt, config: tiny_video(prompt),
        prompts,
        SamplingConfig(frames=5, height=16, width=16),
        tmp_path,
        safety=checks,
        provenance=provenance,
    )
    assert records[1] == {"prompt": "a knife", "refused": "word list words.txt line 2: 'knife'"}
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["000.mp4", "000.png"]
    for name in ("000.mp4", "000.png"):
        with c2pa.Reader(str(tmp_path / "samples" / name)) as reader:
            manifest = reader.get_active_manifest()
        data = next(a["data"] for a in manifest["assertions"] if a["label"] == GENERATION_LABEL)
        assert data["prompt"] == PROMPT
        assert data["safety"]["prompt_filter"]["words"]["file"] == "words.txt"
        assert data["safety"]["frame_filter"]["unsafe_labels"] == ["nsfw"]
    assert json.dumps(checks.report())  # eval.json can hold it
    flagging = safety(frame_filter={"model": str(models.nsfw), "unsafe_labels": ["nsfw"]})
    withheld = prompt_videos(
        lambda prompt, config: tiny_video(prompt),
        [PROMPT],
        SamplingConfig(frames=5, height=16, width=16),
        tmp_path / "flagged",
        safety=flagging,
    )
    assert "withheld" in withheld[0] and not (tmp_path / "flagged").exists()
