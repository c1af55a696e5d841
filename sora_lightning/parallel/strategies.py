"""Distributed strategy from config, applied from outside the model (torchtitan style)."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.strategies import DDPStrategy, Strategy


def build_strategy(cfg: dict[str, Any]) -> Strategy | str:
    """`auto` for one process; `ddp` with gloo on CPU and NCCL on GPU."""
    name = cfg.get("name", "auto")
    if name == "auto":
        return "auto"
    if name == "ddp":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        return DDPStrategy(process_group_backend=backend, find_unused_parameters=bool(cfg.get("find_unused_parameters", False)))
    raise ValueError(f"unknown strategy {name!r}; choose one of conf/strategy/*.yaml (auto, ddp)")
