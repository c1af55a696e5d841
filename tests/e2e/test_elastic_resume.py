"""Elastic resume through `sora-train`: another world size, another strategy, same sample stream.

Real runs with gloo on CPU (Lightning spawns the second process: accelerator=cpu devices=2), on
the session's tiny cache. Each run writes a data ledger (`+dit_train.data_ledger=true`: per rank
and step, the global pack index, its sample keys and the frames of the batch really delivered),
from which every test counts samples. A checkpoint at step 3 (mid-stage in the tiny curriculum:
images 0-1, short_clips 2-3, long_clips 4-5) is resumed to step 6:

- ddp 2 ranks -> 1 and 1 -> 2: the full file loads as it is; the data position maps onto the
  new ranks;
- ZeRO-3 (2 ranks) -> ddp and -> fsdp2 (2 ranks): converted to a full file first; the losses
  after the resume match an uninterrupted 2-rank run, which they could not without the AdamW
  moments and step;
- ZeRO-3 2 ranks -> ZeRO-3 1 rank: the partitions are rebuilt from the converted full file; the
  losses match the ddp 2 -> 1 resume;
- FSDP2 (2 ranks, a DCP folder) -> ddp on 2 ranks (converted) and -> FSDP2 on 1 rank (DCP
  reshards as it loads): losses match the uninterrupted run and the ddp 2 -> 1 resume.
The whole file took 318 s on 2 shared cores, the tiny cache included (docs/reliability.md).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import torch
from tiny_runs import scalars

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
BIN = Path(sys.executable).parent
SPLIT, STEPS = 3, 6
STAGE_STARTS = (0, 2, 4)  # conf/curriculum/tiny.yaml: two steps per stage
LOSS_RTOL = 1e-4  # fp32 on CPU: strategies differ only in the order of gradient reductions


def train(base: Path, run_dir: Path, strategy: str, devices: int, max_steps: int) -> str:
    """One `sora-train` run with the ledger on; returns its stdout + stderr."""
    args = [
        str(BIN / "sora-train"),
        "experiment=tiny",
        "task=dit",
        f"run_dir={run_dir}",
        f"data.cache_dir={base / 'cache'}",
        f"data.vae_dir={base / 'vae'}",
        f"trainer.devices={devices}",
        f"strategy={strategy}",
        f"trainer.max_steps={max_steps}",
        "checkpoint.every_n_steps=3",
        "dit_train.sample_every_n_steps=0",
        "dit_train.val_every_n_steps=0",
        "trainer.enable_progress_bar=false",
        "+dit_train.data_ledger=true",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{args} failed:\n{output[-6000:]}"
    return output


def resume(source: Path, run_dir: Path, strategy: str, devices: int) -> str:
    """A new run folder holding only `source`'s step-3 checkpoint, trained on to step 6."""
    (run_dir / "checkpoints").mkdir(parents=True)
    for item in (source / "checkpoints").glob(f"step={SPLIT}.*"):
        copy = shutil.copytree if item.is_dir() else shutil.copy2
        copy(item, run_dir / "checkpoints" / item.name)
    return train(source.parent / "base", run_dir, strategy, devices, STEPS)


def ledger(run_dir: Path) -> list[dict]:
    """Every ledger line of a run, all ranks."""
    lines = []
    for path in sorted((run_dir / "data_ledger").glob("rank*.jsonl")):
        lines += [json.loads(line) for line in path.read_text().splitlines()]
    return lines


def losses(run_dir: Path) -> dict[int, float]:
    return dict(scalars(run_dir, "train/loss"))


def check_stream(lines: list[dict], steps: int = STEPS) -> dict[tuple[int, int], list[str]]:
    """Count what the ledger `lines` (of one or more runs, any world sizes) trained on.

    Every step 0..steps-1 was trained once by each rank of the world that ran it; each loaded
    batch is the pack the ledger names; per stage the packs consumed are 0, 1, 2, ... each
    exactly once (no pack, so no sample, repeated or skipped); and in each stage every sample was
    seen as often as every other, give or take one (no epoch cut short or repeated). Returns
    the sample keys of each (stage, pack) consumed.
    """
    by_step: dict[int, list[dict]] = defaultdict(list)
    for line in lines:
        assert line["batch_frames"] == line["frames"], line  # the loader delivered the pack
        by_step[line["step"]].append(line)
    assert sorted(by_step) == list(range(steps)), "steps repeated or skipped"
    packs: dict[tuple[int, int], list[str]] = {}
    for step, step_lines in by_step.items():
        world = step_lines[0]["world_size"]
        assert sorted(line["rank"] for line in step_lines) == list(range(world)), step
        for line in step_lines:
            key = (line["stage"], line["pack"])
            assert key not in packs, f"pack {key} trained twice (step {step})"
            packs[key] = line["samples"]
    for stage in {stage for stage, _ in packs}:
        indices = sorted(pack for s, pack in packs if s == stage)
        assert indices == list(range(len(indices))), f"stage {stage}: packs {indices}"
        seen = Counter(key for (s, _), keys in packs.items() if s == stage for key in keys)
        assert max(seen.values()) - min(seen.values()) <= 1, f"stage {stage}: {seen}"
    return packs


def ledger_packs(run_dir: Path) -> dict[tuple[int, int], list[str]]:
    return {(line["stage"], line["pack"]): line["samples"] for line in ledger(run_dir)}


def before_split(run_dir: Path) -> list[dict]:
    """The ledger lines of the steps before the checkpoint a resume starts from."""
    return [line for line in ledger(run_dir) if line["step"] < SPLIT]


@pytest.fixture(scope="module")
def base(tiny_cache_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's tiny cache, linked into a folder of this module's own."""
    link = tmp_path_factory.mktemp("elastic") / "base"
    link.symlink_to(tiny_cache_run, target_is_directory=True)
    return link


@pytest.fixture(scope="module")
def ddp2(base: Path) -> Path:
    """Uninterrupted reference: ddp on 2 ranks to step 6, checkpoints at 3 and 6."""
    run_dir = base.parent / "ddp2"
    train(base, run_dir, "ddp", 2, STEPS)
    return run_dir


@pytest.fixture(scope="module")
def zero3(base: Path) -> Path:
    """ZeRO-3 on 2 ranks to step 3 (its checkpoint: a folder of per-rank partitions)."""
    run_dir = base.parent / "zero3"
    train(base, run_dir, "deepspeed_zero3", 2, SPLIT)
    assert (run_dir / "checkpoints" / f"step={SPLIT}.ckpt" / "latest").is_file()
    return run_dir


def final_data_state(run_dir: Path) -> dict:
    checkpoint = torch.load(run_dir / "checkpoints" / f"step={STEPS}.ckpt", weights_only=True)
    assert checkpoint["global_step"] == STEPS
    return checkpoint["DiTDataModule"]


def test_ddp_two_ranks_resume_on_one(ddp2: Path) -> None:
    """2 ranks to step 3, then 1 rank: step 3 takes pack 2 of short_clips (2 ranks took 0, 1)."""
    run_dir = ddp2.parent / "ddp_2to1"
    output = resume(ddp2, run_dir, "ddp", 1)
    assert "checkpoint written by 2 ranks, resumed by 1" in output
    assert sorted(losses(run_dir)) == [3, 4, 5]  # went on from step 3
    packs = check_stream(before_split(ddp2) + ledger(run_dir))
    assert sorted(packs) == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2), (2, 0), (2, 1)]
    reference = ledger_packs(ddp2)
    assert all(packs[key] == reference[key] for key in packs)  # one global stream
    assert final_data_state(run_dir) == {"step": STEPS, "packs": 2, "world_size": 1}


def test_ddp_one_rank_resume_on_two(base: Path) -> None:
    """1 rank to step 3, then 2 ranks: step 3 takes packs 1 and 2 of short_clips."""
    first = base.parent / "ddp1"
    train(base, first, "ddp", 1, SPLIT)
    run_dir = base.parent / "ddp_1to2"
    output = resume(first, run_dir, "ddp", 2)
    assert "checkpoint written by 1 ranks, resumed by 2" in output
    assert sorted(losses(run_dir)) == [3, 4, 5]
    packs = check_stream(ledger(first) + ledger(run_dir))
    assert sorted(packs) == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2), (2, 3)]
    assert final_data_state(run_dir) == {"step": STEPS, "packs": 4, "world_size": 2}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_zero3_checkpoint_resumes_under(strategy: str, zero3: Path, ddp2: Path) -> None:
    """ZeRO-3's partitions merged into a full file (weights, EMA, AdamW moments and step), then
    trained on under `strategy` on 2 ranks: the losses of steps 3-5 match the uninterrupted run."""
    run_dir = zero3.parent / f"zero3_to_{strategy}"
    output = resume(zero3, run_dir, strategy, 2)
    assert "was written by deepspeed_zero3 on 2 ranks" in output and "converted to" in output
    keyed = "by_name" if strategy == "fsdp2" else "by_index"
    assert (run_dir / "checkpoints" / "converted" / keyed / f"step={SPLIT}.ckpt").is_file()
    got, want = losses(run_dir), losses(ddp2)
    assert sorted(got) == [3, 4, 5]
    torch.testing.assert_close(
        torch.tensor([got[s] for s in (3, 4, 5)]),
        torch.tensor([want[s] for s in (3, 4, 5)]),
        rtol=LOSS_RTOL,
        atol=1e-6,
    )
    packs = check_stream(ledger(zero3) + ledger(run_dir))
    assert packs == ledger_packs(ddp2)  # the same samples, pack for pack


def test_zero3_two_ranks_resume_on_one_under_zero3(zero3: Path, ddp2: Path) -> None:
    """ZeRO-3 partitions of 2 ranks cannot load on 1: converted, then scattered into the new
    partitions with the optimizer state; the losses match ddp's own 2 -> 1 resume."""
    run_dir = zero3.parent / "zero3_2to1"
    output = resume(zero3, run_dir, "deepspeed_zero3", 1)
    assert "this run is deepspeed_zero3 on 1 ranks: converted to" in output
    got = losses(run_dir)
    reference = ddp2.parent / "ddp_2to1"
    if not reference.is_dir():
        resume(ddp2, reference, "ddp", 1)
    want = losses(reference)
    assert sorted(got) == [3, 4, 5]
    torch.testing.assert_close(
        torch.tensor([got[s] for s in (3, 4, 5)]),
        torch.tensor([want[s] for s in (3, 4, 5)]),
        rtol=LOSS_RTOL,
        atol=1e-6,
    )
    assert ledger_packs(run_dir) == ledger_packs(reference)


@pytest.fixture(scope="module")
def fsdp2(base: Path) -> Path:
    """FSDP2 on 2 ranks to step 3 (its checkpoint: a DCP folder)."""
    run_dir = base.parent / "fsdp2"
    train(base, run_dir, "fsdp2", 2, SPLIT)
    assert (run_dir / "checkpoints" / f"step={SPLIT}.ckpt" / ".metadata").is_file()
    return run_dir


def test_fsdp2_checkpoint_resumes_under_ddp(fsdp2: Path, ddp2: Path) -> None:
    """A DCP folder read whole into a full file (optimizer re-keyed from names to indices):
    ddp on 2 ranks goes on with the losses of the uninterrupted run."""
    run_dir = fsdp2.parent / "fsdp2_to_ddp"
    output = resume(fsdp2, run_dir, "ddp", 2)
    assert "was written by fsdp2 on 2 ranks" in output and "converted to" in output
    got, want = losses(run_dir), losses(ddp2)
    assert sorted(got) == [3, 4, 5]
    torch.testing.assert_close(
        torch.tensor([got[s] for s in (3, 4, 5)]),
        torch.tensor([want[s] for s in (3, 4, 5)]),
        rtol=LOSS_RTOL,
        atol=1e-6,
    )
    assert check_stream(ledger(fsdp2) + ledger(run_dir)) == ledger_packs(ddp2)


def test_fsdp2_two_ranks_resume_on_one(fsdp2: Path, ddp2: Path) -> None:
    """DCP reshards by itself: FSDP2 on 1 rank loads the 2-rank folder as it is, and goes on as
    ddp's own 2 -> 1 resume does."""
    run_dir = fsdp2.parent / "fsdp2_2to1"
    output = resume(fsdp2, run_dir, "fsdp2", 1)
    assert "loaded as it is (dcp checkpoint)" in output
    assert not (run_dir / "checkpoints" / "converted").exists()
    reference = ddp2.parent / "ddp_2to1"
    if not reference.is_dir():
        resume(ddp2, reference, "ddp", 1)
    got, want = losses(run_dir), losses(reference)
    assert sorted(got) == [3, 4, 5]
    torch.testing.assert_close(
        torch.tensor([got[s] for s in (3, 4, 5)]),
        torch.tensor([want[s] for s in (3, 4, 5)]),
        rtol=LOSS_RTOL,
        atol=1e-6,
    )
    assert ledger_packs(run_dir) == ledger_packs(reference)
