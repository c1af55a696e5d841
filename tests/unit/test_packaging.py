"""The wheel carries the configs (conf/ as `sora_lightning.conf`) and the entry points compose from it.

The wheel is built from a copy of the sources so that setuptools' build/ and *.egg-info folders
never land in the checkout (a stale build/lib would leak into later wheels).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from sora_lightning.config import CONFIG_MODULE, CONFIG_PATH

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("conf", "sora_lightning"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
        + ["-w", str(out), str(src)],
        check=True,
        capture_output=True,
    )
    (wheel,) = out.glob("*.whl")
    with zipfile.ZipFile(wheel) as zf:
        return set(zf.namelist())


def test_every_yaml_of_conf_is_in_the_wheel_once(wheel_names: set[str]) -> None:
    expected = {
        f"sora_lightning/conf/{p.relative_to(ROOT / 'conf').as_posix()}"
        for p in (ROOT / "conf").rglob("*.yaml")
    }
    assert expected, "conf/ has no YAML"
    assert "sora_lightning/conf/__init__.py" in wheel_names
    assert expected <= wheel_names, sorted(expected - wheel_names)
    yamls = {n for n in wheel_names if n.endswith(".yaml")}
    assert yamls == expected, sorted(yamls - expected)  # no second copy anywhere else


def test_every_package_is_in_the_wheel(wheel_names: set[str]) -> None:
    """pyproject.toml lists the packages by hand (see there): a new sub-package must be added."""
    packages = {
        p.relative_to(ROOT).as_posix() for p in (ROOT / "sora_lightning").rglob("__init__.py")
    }
    assert packages <= wheel_names, f"add to [tool.setuptools] packages: {packages - wheel_names}"


def test_pipeline_composes_from_the_package() -> None:
    assert CONFIG_PATH == f"pkg://{CONFIG_MODULE}"
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        cfg = compose("pipeline", overrides=["experiment=tiny"])
    assert cfg.run_dir == "runs/tiny"


@pytest.mark.parametrize("how", ["--config-dir", "hydra.searchpath"])
def test_entry_point_finds_a_users_own_experiment(
    how: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`@hydra.main(config_path=CONFIG_PATH)` composes from the package plus the user's folder."""
    from sora_lightning.pipeline.main import main

    mine = tmp_path / "mine"
    (mine / "experiment").mkdir(parents=True)
    (mine / "experiment" / "mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - tiny\nrun_dir: runs/mine-marker\n"
    )
    where = (
        ["--config-dir", str(mine)]
        if how == "--config-dir"
        else [f"hydra.searchpath=[file://{mine}]"]
    )
    monkeypatch.chdir(tmp_path)  # nothing relative to the checkout
    monkeypatch.setattr(sys, "argv", ["sora-pipeline", "--cfg", "job", *where, "experiment=mine"])
    main()
    out = capsys.readouterr().out
    assert "run_dir: runs/mine-marker" in out
    assert "vae_train:" in out and "crop: 16" in out  # the packaged experiment=tiny under it
