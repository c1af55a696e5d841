"""Shared fixtures: every test starts from a fixed seed and few threads (2-core CI)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    """Seed all RNGs so each test is deterministic on its own."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
