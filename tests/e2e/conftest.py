"""Shared e2e fixtures: one tiny shards -> VAE -> latent cache run per test session."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_cache_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run folder holding the tiny experiment's shards, VAE and latent cache (built once)."""
    run_dir = tmp_path_factory.getbasetemp() / "tiny-cache"
    args = [
        str(Path(sys.executable).parent / "sora-pipeline"),
        "experiment=tiny",
        f"run_dir={run_dir}",
        "pipeline.steps=[shards,vae,cache]",
    ]
    result = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (
        f"tiny cache build failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return run_dir
