"""A fine-tuned run's export/ carries its text encoder (train/export.py `carry_text_encoder`).

The run's DiT names the imported export's text_encoder/ by absolute path; its own export must
still load and encode the same after that import is gone. Hard links where both are on one file
system (tmp_path is); `--reference-text-encoder` / `export.copy_text_encoder=false` keep the path.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from test_import_wan import tiny_wan_folder

from sora_lightning.models.text import TextEncoder, TextEncoderConfig
from sora_lightning.pipeline.main import forwarded_overrides
from sora_lightning.pipeline.steps import _export
from sora_lightning.sample import generate
from sora_lightning.train.export import export_bundle, main
from sora_lightning.train.import_wan import import_wan21
from sora_lightning.train.weights import load_dit, read_module_meta, save_module

CAPTIONS = ["a red ball rolls to the left", "two cats sleep on a sofa"]


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> tuple[Path, Path]:
    """(a tiny diffusers Wan folder, its import with text_encoder/ carried)."""
    root = tmp_path_factory.mktemp("carry")
    folder = tiny_wan_folder(root)
    return folder, import_wan21(folder, root / "import")


def run_final(export: Path, root: Path) -> Path:
    """A run's dit/final/ as fine-tuning from `export` writes it: meta.text names the export's
    encoder by absolute path, meta.vae_dir the export."""
    dit, saved = load_dit(export)
    meta = {**saved["meta"], "vae_dir": str(export)}
    final = root / "run" / "dit" / "final"
    save_module(dit, dit.config, final, "dit", {"meta": meta})
    return final


def states(text: dict) -> torch.Tensor:
    return TextEncoder(TextEncoderConfig(**text)).encode(CAPTIONS).states


def test_export_carries_the_text_encoder_and_stands_alone(imported, tmp_path: Path) -> None:
    folder, _ = imported
    source = import_wan21(folder, tmp_path / "import")  # this test deletes it below
    final = run_final(source, tmp_path)
    text = read_module_meta(final, "dit")["meta"]["text"]
    assert text["path"] == str(source / "text_encoder")
    expected = states(text)
    out = export_bundle(final, source, tmp_path / "run" / "export")
    carried = read_module_meta(out, "dit")["meta"]["text"]
    assert carried == {**text, "path": str(out.resolve() / "text_encoder")}
    weights = next((out / "text_encoder" / "text_encoder").glob("*.safetensors"))
    original = source / "text_encoder" / "text_encoder" / weights.name
    assert weights.stat().st_ino == original.stat().st_ino  # one file system: a hard link
    assert (out / "text_encoder" / "tokenizer").is_dir()
    assert not list(out.glob(".text_encoder.*"))  # no staging folder left
    shutil.rmtree(source)
    assert torch.equal(states(carried), expected)
    generator = generate.load_generator(out, expand_prompts=False)
    assert torch.equal(generator.text_encoder.encode(CAPTIONS).states, expected)
    export_bundle(final.parent.parent / "export", out, out)  # exporting over itself keeps it


def test_reference_keeps_the_path_and_a_pipeline_folder_carries_two_parts(
    imported, tmp_path: Path
) -> None:
    folder, export = imported
    final = run_final(export, tmp_path)
    argv = ["--dit", str(final), "--vae", str(export), "--output", str(tmp_path / "referenced")]
    main([*argv, "--reference-text-encoder"])
    meta = read_module_meta(tmp_path / "referenced", "dit")["meta"]
    assert meta["text"]["path"] == str(export / "text_encoder")
    assert not (tmp_path / "referenced" / "text_encoder").exists()
    # an import made with --reference-text-encoder names the whole diffusers folder
    referenced = import_wan21(folder, tmp_path / "ref_import", copy_text_encoder=False)
    out = export_bundle(run_final(referenced, tmp_path / "second"), referenced, tmp_path / "out")
    assert sorted(p.name for p in (out / "text_encoder").iterdir()) == ["text_encoder", "tokenizer"]
    text = read_module_meta(out, "dit")["meta"]["text"]
    assert torch.equal(states(text), states({**text, "path": str(folder)}))


def test_pipeline_export_step_flag(tmp_path: Path) -> None:
    cfg = OmegaConf.create({"vae": {"pretrained": str(tmp_path / "vae")}, "model": {}})
    assert "--reference-text-encoder" not in _export(cfg, tmp_path, [])  # default: carried
    cfg.export = {"copy_text_encoder": False}
    assert _export(cfg, tmp_path, [])[-1] == "--reference-text-encoder"
    assert forwarded_overrides(["export.copy_text_encoder=false", "lora.rank=4"]) == ["lora.rank=4"]
