"""`tools/gpu_check.sh --cpu` as a real process: the one-shot GPU check's plumbing on the CPU.

The GPU paths (flash-attn, CUDA timing, NCCL) cannot run here; `--cpu` runs the same parts at
tiny sizes (SDPA against a float64 reference, the tiny presets, ZeRO-3 over gloo with one rank),
so what a lent GPU will run is exercised up to the device: one JSON object on stdout whatever
happens, a skip (not a crash) for a missing dependency, a failure (not a hang) past a budget.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

ROOT = Path(__file__).resolve().parents[2]
PARTS = ["attention", "training", "zero3", "sampling"]


def run_check(*args: str, env: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    """Exit status and the JSON on stdout (json.loads fails if anything else was printed)."""
    environment = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **(env or {})}
    result = subprocess.run(
        [str(ROOT / "tools" / "gpu_check.sh"), "--cpu", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=environment,
    )
    assert result.stdout.strip(), f"no JSON on stdout; stderr:\n{result.stderr[-3000:]}"
    return result.returncode, json.loads(result.stdout)


@pytest.fixture(scope="module")
def cpu_check(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One full `--cpu` run (about 40 s on two busy cores), shared by the tests below."""
    out = tmp_path_factory.mktemp("gpu-check") / "check.json"
    returncode, result = run_check("--out", str(out))
    assert json.loads(out.read_text()) == result, "--out must hold the JSON printed on stdout"
    assert returncode == 0, json.dumps(result, indent=1)[-4000:]
    return result


def test_every_part_passes_in_one_json(cpu_check: dict[str, Any]) -> None:
    summary = cpu_check["summary"]
    assert summary["ok"] is True
    assert summary["passed"] == PARTS and summary["failed"] == [] and summary["skipped"] == {}
    assert cpu_check["environment"]["mode"] == "cpu"
    assert cpu_check["gpu_paths_verified"] is False
    for name in PARTS:
        part = cpu_check["parts"][name]
        assert part["status"] == "ok" and 0 < part["seconds"] <= part["budget_s"], (name, part)


def test_attention_compares_sdpa_with_float64_reference(cpu_check: dict[str, Any]) -> None:
    attention = cpu_check["parts"]["attention"]
    assert (attention["candidate"], attention["baseline"]) == ("sdpa", "float64 reference")
    for case in attention["cases"].values():
        assert len(set(case["lengths_q"])) > 1, "samples of one packed batch differ in length"
        relative = case["relative_diff"]
        assert set(relative) == {"out", "grad_q", "grad_k", "grad_v"}
        # float32 against float64: a real, tiny difference (zero would mean one compared to itself)
        assert all(0 < value <= 1e-4 for value in relative.values()), relative
        for timing in (case["candidate_ms"], case["baseline_ms"]):
            assert timing["forward_ms"] > 0 and timing["forward_backward_ms"] > 0
    assert attention["cases"]["cross"]["lengths_k"] != attention["cases"]["cross"]["lengths_q"]


def test_training_reports_mfu_and_checkpoints_long_batches(cpu_check: dict[str, Any]) -> None:
    training = cpu_check["parts"]["training"]
    cases = training["cases"]
    assert set(cases) == {"tiny@64", "tiny@256", "demo@64", "demo@256"}
    for name, case in cases.items():
        assert case["video_tokens"] == int(name.split("@")[1])
        assert case["activation_checkpointing"] is (case["video_tokens"] > 128)
        achieved = case["train_flops_per_step"] / case["step_s"]
        assert math.isclose(case["achieved_flops_per_s"], achieved, rel_tol=1e-2)
        assert math.isclose(case["mfu"], achieved / training["peak_flops"], rel_tol=1e-2)
        assert 0 < case["mfu"] < 1
    assert cases["demo@64"]["params"] > cases["tiny@64"]["params"]


def test_zero3_matches_plain_run_and_the_comparison_can_see_training(
    cpu_check: dict[str, Any],
) -> None:
    zero3 = cpu_check["parts"]["zero3"]
    plain, sharded = zero3["plain_losses"], zero3["zero3_losses"]
    assert len(plain) == len(sharded) == zero3["steps"] >= 2
    assert all(math.isfinite(loss) for loss in plain + sharded)
    assert plain[0] != plain[-1] and sharded[-1] < sharded[0], "both runs must train"
    assert zero3["max_relative_diff"] <= zero3["rtol"] < zero3["plain_relative_movement"]
    assert zero3["partitioned_numel"] == zero3["full_numel"] > 0  # one rank holds it all


def test_sampling_one_video(cpu_check: dict[str, Any]) -> None:
    sampling = cpu_check["parts"]["sampling"]
    assert sampling["latent_shape"] == [4, 2, 8, 8] and sampling["video_tokens"] == 32
    assert sampling["seconds"] > 0 and sampling["steps"] == 4


def test_missing_dependency_skips_and_spent_budget_fails(tmp_path: Path) -> None:
    """A package that will not import makes its part a skip; a part past its budget a failure;
    the JSON still comes out, and with nothing passed the summary is not ok."""
    fake = tmp_path / "deepspeed"
    fake.mkdir()
    (fake / "__init__.py").write_text('raise ImportError("hidden for this test")\n')
    pythonpath = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    returncode, result = run_check(
        "--parts", "zero3,sampling", "--budget-scale", "1e-4", env={"PYTHONPATH": pythonpath}
    )
    assert returncode == 1
    parts = result["parts"]
    assert (
        parts["zero3"]["status"] == "skipped" and "hidden for this test" in parts["zero3"]["reason"]
    )
    assert parts["sampling"]["status"] == "failed"
    assert parts["sampling"]["error"].startswith("PartTimeout"), parts["sampling"]
    assert result["summary"] == {
        "ok": False,
        "passed": [],
        "failed": ["sampling"],
        "skipped": {"zero3": parts["zero3"]["reason"]},
        "seconds": result["summary"]["seconds"],
    }
