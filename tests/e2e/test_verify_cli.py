"""`sora-verify` as a user runs it: a signed, an unsigned and a tampered file, and exit codes."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from provenance_fixtures import PROMPT, flip_byte, make_chain, tiny_video

from sora_lightning.eval.contact_sheet import write_png
from sora_lightning.sample.generate import write_mp4
from sora_lightning.sample.provenance import Provenance, ProvenanceConfig, generation_record

pytestmark = pytest.mark.e2e

VERIFY = str(Path(sys.executable).parent / "sora-verify")


def verify(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        [VERIFY, *map(str, args)], capture_output=True, text=True, timeout=60, check=False
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("verify")
    chain = make_chain(folder / "pki")
    signing = Provenance(ProvenanceConfig(str(chain.cert), str(chain.key), str(chain.root)))
    video = tiny_video()
    signed = write_mp4(folder / "signed.mp4", video, 8, signing)
    tampered = flip_byte(Path(shutil.copy(signed, folder / "tampered.mp4")), b"mdat")
    png = write_png(folder / "sheet.png", video.frames[0], signing, generation_record(video))
    unsigned = write_mp4(folder / "unsigned.mp4", video, 8)
    other = make_chain(folder / "other", name="other")
    return {
        "signed": signed,
        "tampered": tampered,
        "png": png,
        "unsigned": unsigned,
        "root": chain.root,
        "other_root": other.root,
    }


def test_signed_file_prints_its_manifest(files) -> None:
    result = verify(files["signed"], files["png"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("signed and intact") == 2
    assert "validation state: Valid" in result.stdout
    assert "claim generator: sora_lightning 0.1.0" in result.stdout
    assert (
        "c2pa.created (http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia)"
        in (result.stdout)
    )
    assert f'"prompt": "{PROMPT}"' in result.stdout and '"seed": 3' in result.stdout
    trusted = verify("--trust-anchors", files["root"], files["signed"])
    assert (
        trusted.returncode == 0 and "signer trusted (validation state: Trusted)" in trusted.stdout
    )
    stranger = verify("--trust-anchors", files["other_root"], files["signed"])
    assert stranger.returncode == 1 and "UNTRUSTED" in stranger.stdout


def test_tampered_file_is_reported_and_fails(files) -> None:
    result = verify(files["tampered"])
    assert result.returncode == 1
    assert "TAMPERED: the file changed after it was signed" in result.stdout
    assert "assertion.bmffHash.mismatch" in result.stdout


def test_unsigned_file_says_so(files) -> None:
    result = verify(files["unsigned"])
    assert result.returncode == 3 and "UNSIGNED: no C2PA manifest" in result.stdout
    both = verify(files["unsigned"], files["tampered"], files["signed"])
    assert both.returncode == 1  # a failed check outranks a missing manifest
    missing = verify(files["signed"].with_name("nope.mp4"))
    assert missing.returncode == 2 and "not a file" in missing.stderr
