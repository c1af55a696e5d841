"""Atomic checkpoints with manifests: what counts, what is skipped and why, retention, weights_only.

Real files in tmp_path throughout; the Lightning tests train a two-parameter module for a few
steps through a real Trainer with `build_checkpointing`, so the plugin is exercised the way
`sora-train` uses it.
"""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from sora_lightning.data.datamodule import StepSampler
from sora_lightning.train.checkpoint import (
    AtomicCheckpointIO,
    CheckpointConfig,
    CheckpointError,
    assert_plain,
    build_checkpointing,
    find_resume_checkpoint,
    manifest_path,
    prune_checkpoints,
    resolve_resume,
    scan_checkpoints,
    verify_checkpoint,
)
from sora_lightning.train.curriculum import Curriculum, Stage


def fake_checkpoint(step: int, curriculum: dict | None = None) -> dict:
    hparams = {"curriculum": curriculum} if curriculum else {"width": 4}
    return {
        "global_step": step,
        "state_dict": {"w": torch.full((3,), float(step))},
        "hyper_parameters": hparams,
    }


def save(directory: Path, step: int, keep_last: int | None = None) -> Path:
    path = directory / f"step={step}.ckpt"
    AtomicCheckpointIO(keep_last=keep_last).save_checkpoint(fake_checkpoint(step), path)
    return path


def test_save_writes_checkpoint_then_manifest_and_no_temp_files(tmp_path: Path) -> None:
    curriculum = Curriculum(stages=[Stage("a", steps=2), Stage("b", steps=3)]).to_dict()
    path = tmp_path / "step=3.ckpt"
    AtomicCheckpointIO().save_checkpoint(fake_checkpoint(3, curriculum), path)
    manifest = json.loads(manifest_path(path).read_text())
    assert manifest_path(path).name == "step=3.manifest.json"
    assert manifest["file"] == "step=3.ckpt" and manifest["step"] == 3
    assert manifest["size"] == path.stat().st_size and len(manifest["sha256"]) == 64
    assert manifest["stage"] == {"index": 1, "name": "b", "step_in_stage": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step=3.ckpt", "step=3.manifest.json"]
    loaded = AtomicCheckpointIO().load_checkpoint(path)
    assert torch.equal(loaded["state_dict"]["w"], torch.full((3,), 3.0))
    assert loaded["curriculum_state"]["name"] == "b"


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        ("no_manifest", "no manifest step=2.manifest.json"),
        ("truncate", "truncated"),
        ("flip_byte", "sha256 does not match"),
        ("bad_json", "unreadable"),
        ("other_file", "describes 'step=9.ckpt'"),
    ],
)
def test_damaged_checkpoint_does_not_verify(tmp_path: Path, damage: str, reason: str) -> None:
    path = save(tmp_path, 2)
    data = bytearray(path.read_bytes())
    if damage == "no_manifest":
        manifest_path(path).unlink()
    elif damage == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "flip_byte":
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    elif damage == "bad_json":
        manifest_path(path).write_text("{not json")
    else:
        manifest = json.loads(manifest_path(path).read_text())
        manifest_path(path).write_text(json.dumps({**manifest, "file": "step=9.ckpt"}))
    assert reason in (verify_checkpoint(path) or "")
    with pytest.raises(CheckpointError, match=r"step=2\.ckpt"):
        AtomicCheckpointIO().load_checkpoint(path)


def test_resume_takes_newest_verified_and_says_what_it_skipped(tmp_path: Path, caplog) -> None:
    save(tmp_path, 2)
    save(tmp_path, 4)
    newest = save(tmp_path, 6)
    manifest_path(newest).unlink()  # killed between rename and manifest
    (tmp_path / "step=8.ckpt").write_bytes(b"half a checkpoint")
    with caplog.at_level(logging.INFO, logger="sora_lightning.train.checkpoint"):
        found = find_resume_checkpoint(tmp_path)
    assert found == tmp_path / "step=4.ckpt"
    assert "skipping checkpoint" in caplog.text and "step=8.ckpt: no manifest" in caplog.text
    assert "step=6.ckpt: no manifest" in caplog.text
    assert [s.step for s in scan_checkpoints(tmp_path)] == [8, 6, 4, 2]
    assert find_resume_checkpoint(tmp_path / "missing") is None


def test_requested_checkpoint_missing_or_corrupt_is_an_error(tmp_path: Path) -> None:
    good = save(tmp_path, 2)
    assert resolve_resume(str(good), tmp_path) == good
    assert resolve_resume(None, tmp_path) == good
    with pytest.raises(
        CheckpointError, match=r"nope\.ckpt: file not found; refusing to start fresh"
    ):
        resolve_resume(str(tmp_path / "nope.ckpt"), tmp_path)
    manifest_path(good).unlink()
    with pytest.raises(CheckpointError, match=r"step=2\.ckpt: no manifest"):
        resolve_resume(good, tmp_path)
    assert (
        resolve_resume(None, tmp_path) is None
    )  # nothing verifies: a fresh start, but only when not asked


class Payload:
    """A class whose instances can only come back by unpickling code."""

    def __reduce__(self):
        return (print, ("code ran while loading",))


def test_save_refuses_pickled_classes_and_keeps_the_last_good_one(tmp_path: Path) -> None:
    good = save(tmp_path, 2, keep_last=1)
    bad = fake_checkpoint(4)
    bad["hyper_parameters"]["path"] = Path("/data")
    with pytest.raises(CheckpointError, match=r"\['hyper_parameters'\]\['path'\] is a pathlib"):
        AtomicCheckpointIO(keep_last=1).save_checkpoint(bad, tmp_path / "step=4.ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step=2.ckpt", "step=2.manifest.json"]
    assert verify_checkpoint(good) is None
    assert_plain({"a": [1, 2.0, "x", None, (torch.zeros(1), torch.float32)]})  # plain data passes


def test_load_uses_weights_only_even_for_a_verified_file(tmp_path: Path) -> None:
    """A file with pickled code and a matching manifest still never runs that code."""
    path = tmp_path / "step=1.ckpt"
    torch.save({"global_step": 1, "evil": Payload()}, path)
    from sora_lightning.train.checkpoint import write_manifest

    write_manifest(path, {"global_step": 1})
    assert verify_checkpoint(path) is None
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        AtomicCheckpointIO().load_checkpoint(path, weights_only=False)


def test_failed_write_leaves_previous_checkpoints_and_no_temp(tmp_path: Path, monkeypatch) -> None:
    good = save(tmp_path, 2, keep_last=1)

    def crash_midway(obj, target, *args, **kwargs):
        target.write(b"partial bytes")  # the open temp file `atomic_path` handed out
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        AtomicCheckpointIO(keep_last=1).save_checkpoint(
            fake_checkpoint(4), tmp_path / "step=4.ckpt"
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step=2.ckpt", "step=2.manifest.json"]
    assert find_resume_checkpoint(tmp_path) == good


def test_retention_keeps_last_k_good_and_drops_unverified_and_temp(tmp_path: Path) -> None:
    for step in (2, 4):
        save(tmp_path, step, keep_last=2)
    (tmp_path / "step=5.ckpt").write_bytes(b"no manifest")
    (tmp_path / ".step=7.ckpt.tmp").write_bytes(b"killed mid-write")
    (tmp_path / "other.txt").write_text("not ours")
    save(tmp_path, 6, keep_last=2)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "other.txt",
        "step=4.ckpt",
        "step=4.manifest.json",
        "step=6.ckpt",
        "step=6.manifest.json",
    ]
    assert prune_checkpoints(tmp_path, keep_last=2) == []


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="keep_last must be >= 1"):
        CheckpointConfig(keep_last=0)
    with pytest.raises(ValueError, match="every_n_steps must be >= 1"):
        CheckpointConfig(every_n_steps=0)


class LineFit(L.LightningModule):
    """y = 2x + 1 with SGD: enough state (weights, momentum, LR schedule) to check a resume."""

    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layer = torch.nn.Linear(1, 1)
        self.losses: list[float] = []

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = (self.layer(batch) - (2 * batch + 1)).pow(2).mean()
        self.losses.append(loss.item())
        return loss

    def train_dataloader(self) -> DataLoader:
        """Step-indexed like the real data modules: the batch of step s is row s, wherever a run starts."""
        batches = torch.linspace(-1, 1, 16).view(8, 2, 1)
        sampler = StepSampler(lambda: self.trainer.global_step, num_steps=8)
        return DataLoader(batches, sampler=sampler, batch_size=None)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
        schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def fit_line(directory: Path, max_steps: int, ckpt_path: Path | None = None) -> LineFit:
    torch.manual_seed(0)
    callbacks, plugins = build_checkpointing(
        CheckpointConfig(every_n_steps=2, keep_last=2), directory, sharded=False
    )
    trainer = L.Trainer(
        max_steps=max_steps,
        callbacks=callbacks,
        plugins=plugins,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        default_root_dir=directory.parent,
    )
    module = LineFit()
    trainer.fit(module, ckpt_path=ckpt_path)  # AtomicCheckpointIO loads with weights_only=True
    return module


def test_lightning_writes_verified_checkpoints_and_resumes_exactly(tmp_path: Path) -> None:
    full = fit_line(tmp_path / "full", max_steps=6)
    fit_line(tmp_path / "part", max_steps=4)
    statuses = scan_checkpoints(tmp_path / "part")
    assert [(s.step, s.ok) for s in statuses] == [(4, True), (2, True)]
    resumed = fit_line(
        tmp_path / "part", max_steps=6, ckpt_path=find_resume_checkpoint(tmp_path / "part")
    )
    assert resumed.losses == full.losses[4:]
    assert torch.equal(resumed.layer.weight, full.layer.weight)
    assert [s.step for s in scan_checkpoints(tmp_path / "part")] == [6, 4]  # keep_last=2
    checkpoint = torch.load(tmp_path / "part" / "step=6.ckpt", weights_only=True)
    assert checkpoint["hyper_parameters"] == {"lr": 0.1}
