"""Signed provenance: what the manifest says, that it verifies, and that a bad setup fails early.

A certificate chain made here (tests/provenance_fixtures.py) signs tiny mp4s and PNGs; the
checks read them back with c2pa's Reader, as `sora-verify` does.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import c2pa
import pytest
from cryptography.x509.oid import ExtendedKeyUsageOID
from hydra import compose, initialize_config_module
from provenance_fixtures import PROMPT, flip_byte, make_chain, tiny_video

from sora_lightning import __version__
from sora_lightning.config import CONFIG_MODULE
from sora_lightning.eval.contact_sheet import contact_sheet, write_png
from sora_lightning.sample.generate import write_mp4
from sora_lightning.sample.provenance import (
    GENERATION_LABEL,
    TRAINED_ALGORITHMIC_MEDIA,
    Provenance,
    ProvenanceConfig,
    generation_record,
)
from sora_lightning.sample.verify import verify_file


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory):
    return make_chain(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def provenance(chain) -> Provenance:
    config = ProvenanceConfig(str(chain.cert), str(chain.key), str(chain.root))
    return Provenance(config)


def read(path: Path, root: Path | None = None) -> tuple[str, dict]:
    """(validation state, active manifest) of a signed file."""
    context = None
    if root is not None:
        settings = {"verify": {"verify_trust": True}, "trust": {"trust_anchors": root.read_text()}}
        context = c2pa.Context.from_dict(settings)
    with open(path, "rb") as stream, c2pa.Reader(path.suffix[1:], stream, context=context) as r:
        return r.get_validation_state(), r.get_active_manifest()


def assertion(manifest: dict, label: str) -> dict:
    return next(a["data"] for a in manifest["assertions"] if a["label"] == label)


def test_mp4_manifest_says_who_made_it_and_how(tmp_path: Path, chain, provenance) -> None:
    video = tiny_video()
    record = generation_record(video, safety={"prompt_filter": None, "frame_filter": None})
    path = write_mp4(tmp_path / "out" / "000.mp4", video, 8, provenance, record)
    state, manifest = read(path, chain.root)
    assert state == "Trusted"
    assert manifest["claim_generator_info"][0]["name"] == "sora_lightning"
    assert manifest["claim_generator_info"][0]["version"] == __version__
    (created,) = assertion(manifest, "c2pa.actions.v2")["actions"]
    assert created["action"] == "c2pa.created"
    assert created["digitalSourceType"] == TRAINED_ALGORITHMIC_MEDIA
    generation = assertion(manifest, GENERATION_LABEL)
    assert generation["prompt"] == PROMPT and generation["expanded_prompt"] == video.expanded_prompt
    assert (generation["seed"], generation["model_hash"]) == (3, video.model_hash)
    options = generation["options"]  # a list of numbers is kept as its JSON text (why: provenance)
    assert json.loads(options.pop("cfg_interval")) == [0.0, 0.7]
    assert options == {k: v for k, v in video.options.items() if k != "cfg_interval"}
    assert generation["safety"] == {"prompt_filter": None, "frame_filter": None}
    assert sorted(p.name for p in path.parent.iterdir()) == ["000.mp4"]  # no temp files left
    assert read(path)[0] == "Valid"  # without the root: intact, signer not checked


def test_png_contact_sheet_is_signed(tmp_path: Path, chain, provenance) -> None:
    video = tiny_video()
    path = write_png(tmp_path / "000.png", contact_sheet(video.frames), provenance, {"seed": 3})
    state, manifest = read(path, chain.root)
    assert state == "Trusted" and assertion(manifest, GENERATION_LABEL) == {"seed": 3}


@pytest.mark.parametrize(("name", "marker"), [("a.mp4", b"mdat"), ("a.png", b"IDAT")])
def test_one_changed_byte_is_reported_as_tampering(
    tmp_path: Path, provenance, name: str, marker: bytes
) -> None:
    video = tiny_video()
    path = tmp_path / name
    if name.endswith(".mp4"):
        write_mp4(path, video, 8, provenance)
    else:
        write_png(path, video.frames[0], provenance, generation_record(video))
    assert verify_file(path).status == "intact"
    verdict = verify_file(flip_byte(path, marker))
    assert verdict.status == "tampered" and verdict.state == "Invalid"
    assert any(p["code"].endswith("Hash.mismatch") for p in verdict.problems), verdict.problems


def test_unsigned_is_said_once_and_written_plainly(tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING):
        unsigned = Provenance(ProvenanceConfig())
    assert "UNSIGNED" in caplog.text and not unsigned.signs
    path = write_mp4(tmp_path / "a.mp4", tiny_video(), 8, unsigned)
    path_png = write_png(tmp_path / "a.png", tiny_video().frames[0], unsigned, {})
    assert verify_file(path).status == "unsigned" and verify_file(path_png).status == "unsigned"
    assert caplog.text.count("UNSIGNED") == 1


def test_a_failed_signature_leaves_no_file(tmp_path: Path, provenance, monkeypatch) -> None:
    old = write_png(tmp_path / "a.png", tiny_video().frames[0], provenance, {"n": 1})
    before = old.read_bytes()

    def broken(source, dest, *args) -> None:
        dest.write(b"half a file")
        raise c2pa.C2paError("signing failed")

    monkeypatch.setattr(provenance, "sign_stream", broken)
    with pytest.raises(c2pa.C2paError):
        write_mp4(tmp_path / "b.mp4", tiny_video(), 8, provenance)
    with pytest.raises(c2pa.C2paError):
        write_png(old, tiny_video().frames[0], provenance, {"n": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]  # no b.mp4, no temp files
    assert old.read_bytes() == before  # the earlier signed file is untouched


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"cert": "CERT"}, "cert and provenance.key go together"),
        ({"cert": "missing.pem", "key": "KEY"}, "provenance.cert=missing.pem is not a file"),
        ({"cert": "CERT", "key": "KEY", "alg": "rsa"}, "provenance.alg='rsa'"),
        ({"trust_anchors": "ROOT"}, "trust_anchors needs provenance.cert"),
    ],
)
def test_bad_config_is_named(chain, fields: dict, message: str) -> None:
    paths = {"CERT": str(chain.cert), "KEY": str(chain.key), "ROOT": str(chain.root)}
    with pytest.raises(ValueError, match=message):
        ProvenanceConfig(**{k: paths.get(v, v) for k, v in fields.items()})
    with pytest.raises(ValueError, match="unknown provenance keys \\['crt'\\]"):
        ProvenanceConfig.from_config({"crt": "x"})


def test_credentials_that_cannot_sign_fail_at_start(tmp_path: Path, chain) -> None:
    other = make_chain(tmp_path / "other", name="other")
    with pytest.raises(ValueError, match="cannot sign|test signature"):  # key of another cert
        Provenance(ProvenanceConfig(str(chain.cert), str(other.key)))
    with pytest.raises(ValueError, match="not Trusted"):  # chain outside the trust anchors
        Provenance(ProvenanceConfig(str(chain.cert), str(chain.key), str(other.root)))
    code = make_chain(tmp_path / "code", name="code", eku=ExtendedKeyUsageOID.CODE_SIGNING)
    with pytest.raises(ValueError, match="test signature"):  # an EKU C2PA refuses
        Provenance(ProvenanceConfig(str(code.cert), str(code.key)))


@pytest.mark.parametrize("name", ["sample", "eval"])
def test_missing_cert_is_refused_before_the_model_loads(tmp_path: Path, name: str) -> None:
    from sora_lightning.eval.main import run_eval
    from sora_lightning.sample.main import sample

    overrides = [
        f"ckpt={tmp_path / 'no-such-checkpoint'}",
        "prompts=[a]",
        f"provenance.cert={tmp_path / 'missing.pem'}",
        f"provenance.key={tmp_path / 'missing.key'}",
    ]
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        cfg = compose(name, overrides=overrides)
    with pytest.raises(ValueError, match="provenance.cert=.*missing.pem is not a file"):
        (sample if name == "sample" else run_eval)(cfg)


def test_overrides_reproduce_the_config(chain) -> None:
    """The pipeline hands `provenance` to its samples and eval steps as overrides."""
    config = ProvenanceConfig(str(chain.cert), str(chain.key), str(chain.root), alg="es256")
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        default = compose("sample", overrides=["ckpt=x"])
        cfg = compose("eval", overrides=["ckpt=x", *config.as_overrides()])
    assert ProvenanceConfig.from_config(default.provenance) == ProvenanceConfig()
    assert ProvenanceConfig.from_config(cfg.provenance) == config
    assert json.loads(config.as_overrides()[0].split("=", 1)[1]) == str(chain.cert.resolve())
