"""Non-finite losses: skipped steps are counted, and K in a row roll back in place or stop clearly.

NaNs are injected through the real config path (`nonfinite.inject_at_steps`), which poisons the
batch so the module's own finite check skips the step. The guard's decisions are tested on a tiny
line-fitting module (seconds); the rollback is tested on the tiny DiT through `train(cfg)` against
a reference run whose weights and optimizer never moved during the same window: after the
rollback both must be bit-identical.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import lightning as L
import pytest
import safetensors.torch
import torch
from tiny_runs import compose_cfg, scalars
from torch.utils.data import DataLoader

from sora_lightning.data.datamodule import StepSampler
from sora_lightning.train.checkpoint import CheckpointConfig, build_checkpointing
from sora_lightning.train.guards import NonFiniteConfig, NonFiniteGuard, NonFiniteLossError
from sora_lightning.train.main import train

pytestmark = pytest.mark.e2e


class SkippingLineFit(L.LightningModule):
    """Fits y = 2x + 1 and, like DiTModule, returns None (skips the step) when the loss is not finite."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor | None:
        loss = (self.layer(batch) - (2 * batch + 1)).pow(2).mean()
        return loss if torch.isfinite(loss) else None

    def train_dataloader(self) -> DataLoader:
        batches = torch.linspace(-1, 1, 32).view(16, 2, 1)
        sampler = StepSampler(lambda: self.trainer.global_step, num_steps=16)
        return DataLoader(batches, sampler=sampler, batch_size=None)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit_line(tmp_path: Path, max_steps: int, **nonfinite) -> tuple[L.Trainer, NonFiniteGuard]:
    torch.manual_seed(0)
    directory = tmp_path / "checkpoints"
    callbacks, plugins = build_checkpointing(
        CheckpointConfig(every_n_steps=2, keep_last=3), directory, sharded=False
    )
    guard = NonFiniteGuard(NonFiniteConfig(**nonfinite), directory)
    trainer = L.Trainer(
        max_steps=max_steps,
        callbacks=[*callbacks, guard],
        plugins=plugins,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        default_root_dir=tmp_path,
    )
    trainer.fit(SkippingLineFit())
    return trainer, guard


def test_isolated_nans_are_counted_and_training_goes_on(tmp_path: Path) -> None:
    trainer, guard = fit_line(tmp_path, 8, inject_at_steps=[1, 4], max_consecutive=2, action="stop")
    assert trainer.global_step == 8
    assert guard.skipped_total == 2 and guard.rollbacks == 0
    assert float(trainer.callback_metrics["train/nonfinite_skipped"]) == 2.0


def test_stop_after_k_in_a_row_names_the_steps(tmp_path: Path) -> None:
    with pytest.raises(
        NonFiniteLossError,
        match=r"2 consecutive non-finite losses \(steps 3\.\.4\); nonfinite\.action=stop",
    ):
        fit_line(tmp_path, 8, inject_at_steps=[3, 4], max_consecutive=2, action="stop")


def test_rollback_without_an_earlier_checkpoint_stops_clearly(tmp_path: Path) -> None:
    with pytest.raises(NonFiniteLossError, match=r"no verified checkpoint from before step 0"):
        fit_line(tmp_path, 8, inject_at_steps=[0, 1], max_consecutive=2, action="rollback")


def test_persistent_fault_stops_after_max_rollbacks(tmp_path: Path) -> None:
    with pytest.raises(
        NonFiniteLossError, match=r"after 1 rollbacks \(nonfinite\.max_rollbacks=1\)"
    ):
        fit_line(
            tmp_path, 16, inject_at_steps=list(range(3, 16)), max_consecutive=2, max_rollbacks=1
        )


def test_rollback_restores_weights_of_the_checkpoint_before_the_streak(
    tmp_path: Path, caplog
) -> None:
    with caplog.at_level(logging.WARNING, logger="sora_lightning.train.guards"):
        trainer, guard = fit_line(
            tmp_path, 6, inject_at_steps=[3, 4], max_consecutive=2, action="rollback"
        )
    assert guard.rollbacks == 1 and guard.skipped_total == 2
    assert "rolled back model, EMA and optimizer to" in caplog.text and "step=2.ckpt" in caplog.text


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="action='retry' is not one of"):
        NonFiniteConfig(action="retry")
    with pytest.raises(ValueError, match="max_consecutive must be >= 1"):
        NonFiniteConfig(max_consecutive=0)


# --- the tiny DiT through `train(cfg)` -------------------------------------------------------


@pytest.fixture(scope="module")
def dit_runs(tmp_path_factory: pytest.TempPathFactory, tiny_cache_run: Path) -> dict[str, Path]:
    """Rollback run: NaN at steps 3-4, K=2, rolls back to step=2. Reference: NaN at 2-4, never acts."""
    torch.set_num_threads(2)
    deterministic = torch.are_deterministic_algorithms_enabled()
    env = {
        key: os.environ.get(key)
        for key in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS", "CUBLAS_WORKSPACE_CONFIG")
    }
    cache_run = tiny_cache_run
    root = tmp_path_factory.mktemp("nonfinite")
    runs = {"rollback": root / "rollback", "reference": root / "reference"}
    train(
        compose_cfg(
            runs["rollback"],
            cache_run,
            "nonfinite.inject_at_steps=[3,4]",
            "nonfinite.max_consecutive=2",
            "nonfinite.action=rollback",
        )
    )
    train(
        compose_cfg(
            runs["reference"],
            cache_run,
            "nonfinite.inject_at_steps=[2,3,4]",
            "nonfinite.max_consecutive=10",
        )
    )
    yield runs
    torch.use_deterministic_algorithms(deterministic)
    for key, value in env.items():
        os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


def test_dit_skips_are_counted_cumulatively_in_tensorboard(dit_runs: dict[str, Path]) -> None:
    assert scalars(dit_runs["rollback"], "train/nonfinite_skipped") == [
        (s, v) for s, v in enumerate([0, 0, 0, 1, 2, 2])
    ]
    assert scalars(dit_runs["rollback"], "train/nonfinite_rollbacks")[-1] == (5, 1.0)
    assert scalars(dit_runs["reference"], "train/nonfinite_skipped")[-1] == (5, 3.0)
    losses = scalars(
        dit_runs["rollback"], "train/loss"
    )  # a skipped step shows its NaN, not a stale value
    assert [step for step, _ in losses] == list(range(6))
    assert [math.isnan(value) for _, value in losses] == [False, False, False, True, True, False]


def test_dit_rollback_continues_from_the_last_good_weights_exactly(
    dit_runs: dict[str, Path],
) -> None:
    """After rolling back to step=2 the run equals one whose steps 2-4 never updated anything."""
    rollback, reference = (
        dict(scalars(dit_runs[k], "train/loss")) for k in ("rollback", "reference")
    )
    assert rollback[5] == reference[5] and not math.isnan(rollback[5])
    ema_a, ema_b = (
        safetensors.torch.load_file(str(dit_runs[k] / "final" / "dit.safetensors"))
        for k in dit_runs
    )
    assert all(torch.equal(ema_a[key], ema_b[key]) for key in ema_a), "EMA export differs"
    a, b = (
        torch.load(dit_runs[k] / "checkpoints" / "step=6.ckpt", weights_only=True)
        for k in ("rollback", "reference")
    )
    assert all(torch.equal(a["state_dict"][key], b["state_dict"][key]) for key in a["state_dict"])
    assert a["optimizer_states"][0]["param_groups"] == b["optimizer_states"][0]["param_groups"]


def test_dit_skipped_steps_do_not_advance_the_lr_schedule(dit_runs: dict[str, Path]) -> None:
    """Reference run: steps 2-4 skipped, so step 5 trains at the LR of the 3rd applied update
    (tiny curriculum: 1e-3), not at step 5's cosine-decayed 5.5e-4."""
    lrs = dict(scalars(dit_runs["reference"], "train/lr"))
    assert lrs[2] == lrs[3] == lrs[4] == lrs[5] == pytest.approx(1e-3)
    rollback = dict(scalars(dit_runs["rollback"], "train/lr"))
    assert rollback[5] == pytest.approx(1e-3)
