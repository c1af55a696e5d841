"""Regional `torch.compile` of the DiT from outside the model: each transformer block in place.

Why per block (torchtitan's way): every block runs the same code on same-shaped weights, so one
compiled graph serves them all and compile time does not grow with depth. `nn.Module.compile`
compiles in place, so the module tree and state-dict keys stay as they were (checkpoints, EMA and
exported weights see no `_orig_mod.` prefix), and wrappers applied before (activation
checkpointing) are compiled with their block.

Packed batches change their token count every step, so blocks are compiled with `dynamic=True`:
sizes are symbolic from the first call instead of recompiling once per new length.
The per-sample SDPA loop reads `cu_seqlens` on the host (`tolist`) and loops over samples;
traced, it specialises on every pack's lengths and recompiles (~2 min each on two cores), so it is
called as-is between compiled regions (`keep_attention_eager`).
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
from torch import nn

from sora_lightning.models import layers

log = logging.getLogger(__name__)

UNSUPPORTED_STRATEGIES = (
    "CPUCapableDeepSpeedStrategy",
    "DeepSpeedStrategy",
    "ModelParallelStrategy",
)


def keep_attention_eager() -> None:
    """Make Dynamo call the per-sample SDPA loop instead of tracing it (idempotent).

    TODO(models owner): this belongs in `models/layers.py` as `@torch.compiler.disable` on
    `_sdpa_per_sample`; until then it is applied here, before anything is compiled.
    """
    function = layers._sdpa_per_sample
    if not getattr(function, "_torchdynamo_disable", False):
        layers._sdpa_per_sample = torch.compiler.disable(
            function, reason="per-sample SDPA: host-side offsets, one call per sample"
        )


def compile_blocks(dit: nn.Module, *, dynamic: bool | None = True, **options: Any) -> int:
    """`torch.compile` every block of `dit.blocks` in place; returns how many were compiled.

    `options` go to `torch.compile` (mode, backend, fullgraph...). Compilation itself happens
    lazily at the first forward, so its time shows up in the first training step.
    """
    keep_attention_eager()
    # Duck sizing ties sizes that happen to be equal on the first call (caption length and a
    # rope width, say) and recompiles when a later pack separates them.
    torch.fx.experimental._config.use_duck_shape = False
    for block in dit.blocks:
        block.compile(dynamic=dynamic, **options)
    log.info(
        "torch.compile: %d DiT blocks compiled in place (dynamic=%s)", len(dit.blocks), dynamic
    )
    return len(dit.blocks)


def check_strategy(strategy: Any) -> None:
    """Compiled blocks are measured under single-process and DDP training only."""
    name = type(strategy).__name__
    if name in UNSUPPORTED_STRATEGIES:
        raise ValueError(
            f"dit_train.compile=true is not supported with {name} (sharded parameters are "
            "gathered by hooks the compiled blocks would have to trace); use strategy=auto or ddp"
        )


def compile_counters() -> dict[str, Any]:
    """Dynamo's counts so far in this process: frames compiled (a recompile is one more frame),
    distinct graphs and graph breaks."""
    from torch._dynamo.utils import counters

    return {
        "compile": {
            "frames_compiled": int(counters["frames"]["ok"]),
            "unique_graphs": int(counters["stats"]["unique_graphs"]),
            "graph_breaks": int(sum(counters["graph_break"].values())),
        }
    }


class CompileMonitor(L.Callback):
    """Recompiles in training: frames Dynamo compiled after the first step (which compiles)."""

    def __init__(self) -> None:
        self._after_first: int | None = None

    def on_train_batch_end(self, *args: Any) -> None:
        if self._after_first is None:
            self._after_first = compile_counters()["compile"]["frames_compiled"]

    def summary(self) -> dict[str, Any]:
        """`compile_counters()` plus `recompiles_after_first_step`; for step_time.json."""
        counts = compile_counters()
        first = (
            counts["compile"]["frames_compiled"] if self._after_first is None else self._after_first
        )
        counts["compile"]["recompiles_after_first_step"] = (
            counts["compile"]["frames_compiled"] - first
        )
        return counts
