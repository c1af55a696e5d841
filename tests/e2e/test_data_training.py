"""The data paths inside real VAE training: streaming loader resume, bad-data logging and abort."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import DictConfig
from tiny_runs import scalars

from sora_lightning.config import CONFIG_MODULE
from sora_lightning.data.ingest import shards_from_world
from sora_lightning.data.shards import load_samples
from sora_lightning.train.main import train

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("one_thread")]


def vae_cfg(run_dir: Path, shards: str, *extra: str) -> DictConfig:
    overrides = [
        "experiment=tiny",
        "task=vae",
        f"run_dir={run_dir}",
        f"data.shards={shards}",
        "trainer.deterministic=true",
        "trainer.enable_progress_bar=false",
        *extra,
    ]
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        return compose("train", overrides=overrides)


@pytest.fixture(scope="module")
def world_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("world")
    shards_from_world(out, num_clips=4, num_images=4, seed=0, max_count=3, progress=False)
    return out


def test_streaming_vae_resumes_exactly_with_two_workers(world_shards: Path, tmp_path: Path) -> None:
    # Posterior sampling on (the default): its noise is keyed by (seed, step, rank), so the resumed
    # run must match the uninterrupted one in data and in noise.
    stream = ("data.loader=stream", "data.num_workers=2")
    shards = f"{world_shards}/shard-*.tar"
    first = tmp_path / "full"
    assert vae_cfg(first, shards, *stream).vae_train.sample_posterior
    train(vae_cfg(first, shards, *stream))
    full = scalars(first, "train/loss")
    assert [step for step, _ in full] == [0, 1, 2, 3]
    resumed = tmp_path / "resumed"  # a run that starts from the step-2 checkpoint of the first
    start = f"checkpoint.resume_from='{first / 'checkpoints' / 'step=2.ckpt'}'"
    train(vae_cfg(resumed, shards, *stream, start))
    assert scalars(resumed, "train/loss") == full[2:], (full, scalars(resumed, "train/loss"))


def _raw_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def bad_shards(world_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The world shards plus a cut-short tar, a zero-byte video and a caption that is not UTF-8."""
    out = tmp_path_factory.mktemp("bad")
    for shard in sorted(world_shards.glob("shard-*.tar")):
        (out / shard.name).write_bytes(shard.read_bytes())
    data = (out / "shard-000000.tar").read_bytes()
    (out / "shard-cut.tar").write_bytes(data[: len(data) // 2])
    _raw_tar(
        out / "shard-bad.tar",
        [
            ("zero.mp4", b""),
            ("zero.json", b'{"caption": "an empty video file"}'),
            ("latin.mp4", (out / "shard-000000.tar").read_bytes()[:10]),
            ("latin.json", b'{"caption": "caf\xe9"}'),
        ],
    )
    return out


def test_bad_data_aborts_before_step_0_naming_shards(bad_shards: Path, tmp_path: Path) -> None:
    for loader in ("memory", "stream"):
        cfg = vae_cfg(tmp_path / loader, f"{bad_shards}/shard-*.tar", f"data.loader={loader}")
        with pytest.raises(RuntimeError, match="raise data.max_bad_fraction") as error:
            train(cfg)
        message = str(error.value)
        for part in ("truncated_tar", "zero_byte", "invalid_utf8", "shard-bad.tar: zero"):
            assert part in message, (loader, part, message)
        assert "shard-cut.tar" in message
        assert not (tmp_path / loader / "checkpoints").exists() or not list(
            (tmp_path / loader / "checkpoints").glob("*.ckpt")
        )


def test_bad_data_under_the_threshold_is_logged_to_tensorboard(
    bad_shards: Path, tmp_path: Path
) -> None:
    cfg = vae_cfg(
        tmp_path,
        f"{bad_shards}/shard-*.tar",
        "data.loader=stream",
        "data.max_bad_fraction=0.5",
        "vae_train.steps=1",
    )
    train(cfg)
    assert scalars(tmp_path, "data/bad/zero_byte") == [(0, 1.0)]
    assert scalars(tmp_path, "data/bad/invalid_utf8") == [(0, 1.0)]
    assert scalars(tmp_path, "data/bad/truncated_tar") == [(0, 1.0)]
    num_good = len(load_samples(sorted(bad_shards.glob("shard-*.tar"))))
    assert num_good >= 8  # the world shards, plus what precedes the cut
    assert scalars(tmp_path, "data/bad_fraction") == [(0, pytest.approx(3 / (3 + num_good)))]
