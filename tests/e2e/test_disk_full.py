"""A full disk while writing: checkpoints, the latent cache and shards, each on a small tmpfs.

Every test mounts a tmpfs of a chosen size (root with CAP_SYS_ADMIN; skipped, saying why, where
mount is refused), so the write fails with a real ENOSPC from the kernel, then grows it with
`mount -o remount,size=` to show that a rerun with space continues. What must hold each time: a
clear error naming the folder and "no space"; nothing half-written that counts as done (a
checkpoint without a verifying manifest, a cache without meta.json, a pipeline step without its
`steps/<step>.json`, a shard folder without summary.json, no truncated shard left at all); the
rerun finishes, and where the output is deterministic it equals the one written with space.

The fast tests call the writers in-process; the slow ones run `sora-train`, `sora-pipeline` and
`python -m sora_lightning.data.ingest` as real processes on the session's tiny run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from sora_lightning.data.shards import write_shards
from sora_lightning.pipeline.ownership import REGISTRY_NAME
from sora_lightning.train.checkpoint import AtomicCheckpointIO, scan_checkpoints, verify_checkpoint
from sora_lightning.utils import NoSpaceError, file_sha256

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent
PAGE = 4096


@contextmanager
def small_disk(folder: Path, size_bytes: int) -> Iterator[Path]:
    """`folder` as a tmpfs of `size_bytes` (rounded up to pages); always unmounted afterwards."""
    folder.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={pages(size_bytes) * PAGE}", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        pytest.skip(
            f"cannot mount a small tmpfs at {folder} (needs root with CAP_SYS_ADMIN, as in the "
            f"project's containers): {result.stderr.strip()}"
        )
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def resize(folder: Path, size_bytes: int) -> None:
    """Grow (or shrink, down to what it holds) the tmpfs mounted at `folder`."""
    subprocess.run(
        ["mount", "-o", f"remount,size={pages(size_bytes) * PAGE}", str(folder)], check=True
    )


def pages(size_bytes: int) -> int:
    return -(-size_bytes // PAGE)


def used_bytes(folder: Path) -> int:
    usage = shutil.disk_usage(folder)
    return usage.total - usage.free


def one_thread_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run(args: list[str], log: Path) -> tuple[int, str]:
    """Run a real process to its end; (exit code, its output), the output also kept in `log`."""
    result = subprocess.run(
        args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=one_thread_env()
    )
    log.write_text(result.stdout)
    return result.returncode, result.stdout


def assert_whole_tars(folder: Path) -> list[str]:
    """Every tar left in `folder` reads to its end marker (none was cut short); their names."""
    for path in sorted(folder.glob("*.tar")):
        with tarfile.open(path) as tar:
            tar.getmembers()  # a truncated tar raises ReadError here
    return sorted(p.name for p in folder.glob("*.tar"))


# In-process: the writers themselves, seconds.


def test_checkpoint_write_on_a_full_disk_is_named_and_the_previous_one_still_counts(
    tmp_path: Path,
) -> None:
    checkpoint = {"global_step": 2, "state_dict": {"w": torch.arange(60_000, dtype=torch.float32)}}
    io = AtomicCheckpointIO(keep_last=2)
    size = 240_000 + 2 * PAGE  # step=2 (its 240 kB of weights) fits, a second copy does not
    with small_disk(tmp_path / "checkpoints", size) as folder:
        io.save_checkpoint(checkpoint, folder / "step=2.ckpt")
        assert verify_checkpoint(folder / "step=2.ckpt") is None
        with pytest.raises(NoSpaceError) as raised:
            io.save_checkpoint({**checkpoint, "global_step": 4}, folder / "step=4.ckpt")
        message = str(raised.value)
        assert f"no space left on device in {folder} while writing step=4.ckpt" in message
        assert "step=2.ckpt still verifies: free space and rerun, it resumes from there" in message
        assert sorted(p.name for p in folder.iterdir()) == ["step=2.ckpt", "step=2.manifest.json"]
        assert [s.step for s in scan_checkpoints(folder) if s.ok] == [2]


def test_shards_on_a_full_disk_leave_no_cut_shard(tmp_path: Path) -> None:
    samples = [
        {"__key__": f"s{i:03d}", "jpg": os.urandom(6000), "json": {"caption": f"sample {i}"}}
        for i in range(12)
    ]
    with small_disk(tmp_path / "shards", 10 * PAGE) as folder:
        with pytest.raises(NoSpaceError, match=f"no space left on device in {folder}"):
            write_shards(samples, folder, max_count=3)
        left = assert_whole_tars(folder)
        assert left == ["shard-000000.tar"], "the whole shard before the full one, only"
        resize(folder, 1 << 20)
        written = write_shards(samples, folder, max_count=3)
        assert [p.name for p in written] == [f"shard-{i:06d}.tar" for i in range(4)]
        assert len(assert_whole_tars(folder)) == 4


# Real processes on the session's tiny run (shards, VAE, cache: built once, ~1-2 min).


def vae_args(run_dir: Path, shards: Path, steps: int) -> list[str]:
    return [
        str(BIN / "sora-train"),
        "experiment=tiny",
        "task=vae",
        f"run_dir={run_dir}",
        f"data.shards={shards}/*.tar",
        f"vae_train.steps={steps}",
        "trainer.enable_progress_bar=false",
    ]


@pytest.mark.slow
def test_vae_checkpoint_on_a_full_disk_then_resume(tiny_cache_run: Path, tmp_path: Path) -> None:
    """Run 1 writes step=2 (every 2 steps); the disk then holds only half a checkpoint more; run 2
    resumes, trains to 4 and fails writing step=4; with space, run 3 resumes from step=2 again."""
    run_dir = tmp_path / "vae"
    shards = tiny_cache_run / "shards"
    with small_disk(run_dir / "checkpoints", 64 << 20) as folder:
        code, output = run(vae_args(run_dir, shards, 2), tmp_path / "run1.log")
        assert code == 0, output[-3000:]
        first = folder / "step=2.ckpt"
        assert verify_checkpoint(first) is None
        weights = file_sha256(run_dir / "vae.safetensors")  # run 1's final weights (step 2)
        resize(folder, used_bytes(folder) + first.stat().st_size // 2)

        code, output = run(vae_args(run_dir, shards, 4), tmp_path / "run2.log")
        assert code != 0, "the run must fail when its checkpoint cannot be written"
        assert f"resuming from {first} (step 2)" in output
        assert f"no space left on device in {folder} while writing step=4.ckpt" in output
        assert "step=2.ckpt still verifies: free space and rerun, it resumes from there" in output
        assert sorted(p.name for p in folder.iterdir()) == ["step=2.ckpt", "step=2.manifest.json"]
        assert verify_checkpoint(first) is None
        assert file_sha256(run_dir / "vae.safetensors") == weights, "a failed run wrote weights"

        resize(folder, 64 << 20)
        code, output = run(vae_args(run_dir, shards, 4), tmp_path / "run3.log")
        assert code == 0, output[-3000:]
        assert f"resuming from {first} (step 2)" in output
        assert verify_checkpoint(folder / "step=4.ckpt") is None
        assert file_sha256(run_dir / "vae.safetensors") != weights, "step 4's weights written"


def copy_run(source: Path, target: Path, names: list[str]) -> None:
    """The session run's finished steps (their files and manifests) into a new run folder."""
    for name in ("pipeline.yaml", REGISTRY_NAME):  # the registry: these names are the pipeline's
        shutil.copy2(source / name, target / name)
    for name in names:
        shutil.copytree(source / name, target / name)
        shutil.copy2(source / "steps" / f"{name}.json", target / "steps" / f"{name}.json")


@pytest.mark.slow
def test_pipeline_cache_step_on_a_full_disk_then_rerun(
    tiny_cache_run: Path, tmp_path: Path
) -> None:
    """The pipeline's cache step writes RUN/cache on a disk that holds half the cache."""
    run_dir = tmp_path / "run"
    (run_dir / "steps").mkdir(parents=True)
    copy_run(tiny_cache_run, run_dir, ["shards", "vae"])
    reference = tiny_cache_run / "cache"
    needed = sum(pages(p.stat().st_size) * PAGE for p in reference.iterdir())
    args = [
        str(BIN / "sora-pipeline"),
        "experiment=tiny",
        f"run_dir={run_dir}",
        "pipeline.steps=[shards,vae,cache]",
    ]
    with small_disk(run_dir / "cache", needed // 2) as folder:
        code, output = run(args, tmp_path / "full.log")
        assert code != 0, output[-3000:]
        log = (run_dir / "logs" / "cache.log").read_text()
        assert f"no space left on device in {folder} while writing the latent cache" in log
        assert "its meta.json is not written, so the cache does not count" in log
        assert not (folder / "meta.json").exists()
        assert not (run_dir / "steps" / "cache.json").exists(), "a failed cache counted as done"
        assert not list(folder.glob(".*.tmp")), "temp files left behind"

        resize(folder, 2 * needed)
        code, output = run(args, tmp_path / "rerun.log")
        assert code == 0, output[-3000:]
        for name in ("shards", "vae", "cache"):  # shards and vae skipped; the cache byte-identical
            assert (run_dir / "steps" / f"{name}.json").is_file()
        expected = {p.name: file_sha256(p) for p in reference.iterdir() if p.is_file()}
        assert {p.name: file_sha256(p) for p in folder.iterdir() if p.is_file()} == expected


def ingest_command(tiny_cache_run: Path, output: Path) -> list[str]:
    """The session pipeline's own shards command (first line of its log), writing to `output`."""
    first = (tiny_cache_run / "logs" / "shards.log").read_text().splitlines()[0]
    words = first.removeprefix("$ ").split()
    at = words.index("--output")
    words[at + 1] = str(output)
    return [w for w in words if w != "--overwrite"] + ["--no-progress"]


@pytest.mark.slow
def test_ingest_on_a_full_disk_then_rerun(tiny_cache_run: Path, tmp_path: Path) -> None:
    """`python -m sora_lightning.data.ingest` on a disk that holds half the shards."""
    reference = tiny_cache_run / "shards"
    needed = sum(pages(p.stat().st_size) * PAGE for p in reference.iterdir())
    with small_disk(tmp_path / "shards", needed // 2) as folder:
        args = ingest_command(tiny_cache_run, folder)
        code, output = run(args, tmp_path / "full.log")
        assert code != 0, output[-3000:]
        assert f"no space left on device in {folder} while writing shard-*.tar" in output
        assert "the shard in progress was removed and the summary is not written" in output
        assert not (folder / "summary.json").exists()
        left = assert_whole_tars(folder)
        assert len(left) < len(list(reference.glob("*.tar")))
        for name in left:  # the shards that were finished are the right ones
            assert file_sha256(folder / name) == file_sha256(reference / name)

        resize(folder, 2 * needed)
        if left:  # without --overwrite a rerun refuses to mix with the interrupted one's files
            code, output = run(args, tmp_path / "refused.log")
            assert code != 0 and "an interrupted run" in output
        code, output = run([*args, "--overwrite"], tmp_path / "rerun.log")
        assert code == 0, output[-3000:]
        expected = {p.name: file_sha256(p) for p in reference.iterdir()}
        assert {p.name: file_sha256(p) for p in folder.iterdir()} == expected
