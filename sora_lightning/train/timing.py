"""Where the time of every training step goes: data wait, forward, backward, optimizer, EMA,
logging, sample previews, validation, checkpointing and what is left.

No hand timers: the Trainer already wraps the data fetch, every hook, the training step, backward
and the optimizer step in `profiler.profile(action)`, so `StepTimeProfiler` is a Lightning
`Profiler` that files each action's *exclusive* time (nested actions count once, to their own
category) under the category its name says. A step runs from one data fetch to the next; time in
no action is `other`, except the stretch after the last `on_train_batch_end` hook, where
Lightning flushes `self.log`'d metrics to the loggers, which counts as `logging`.
`StepTimeMonitor` (a callback) logs per-step means to TensorBoard (`time/*`) every N steps and,
when training ends, one log line naming the largest cost plus `step_time.json`.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Checkpoint, ProgressBar
from lightning.pytorch.profilers import Profiler

log = logging.getLogger(__name__)

CATEGORIES = (
    "data",
    "forward",
    "backward",
    "optimizer",
    "ema",
    "logging",
    "previews",
    "validation",
    "checkpoint",
    "other",
)
COMPUTE = ("forward", "backward", "optimizer")
"""The step proper; everything else is framework overhead (data wait included)."""
EMA_ACTION = "[sora]ema_update"
LOG_ACTION = "[sora]log_metrics"
COMPILE_ACTION = "[sora]compile"
_AFTER_STEPS = (".on_train_epoch_end", ".on_train_end")
_CONTAINERS = ("run_training_epoch",)  # span many steps: never filed under one
_STRATEGY_HOOKS = {"training_step": "forward", "backward": "backward", "batch_to_device": "data"}
_MODULE_HOOKS = {
    "optimizer_step": "optimizer",
    "optimizer_zero_grad": "optimizer",
    "configure_gradient_clipping": "optimizer",
    "lr_scheduler_step": "optimizer",
}
_OWN_ACTIONS = {
    EMA_ACTION: "ema",
    LOG_ACTION: "logging",
    COMPILE_ACTION: "other",
    "save_checkpoint": "checkpoint",
    "[_TrainingEpochLoop].train_dataloader_next": "data",
}


def callback_category(callback: L.Callback) -> str:
    """A callback's category: its `time_category` attribute, else by Lightning type, else other."""
    declared = getattr(callback, "time_category", None)
    if declared is not None:
        if declared not in CATEGORIES:
            raise ValueError(
                f"{type(callback).__name__}.time_category={declared!r} not in {CATEGORIES}"
            )
        return declared
    if isinstance(callback, Checkpoint):
        return "checkpoint"
    return "logging" if isinstance(callback, ProgressBar) else "other"


class StepTimeProfiler(Profiler):
    """Per-step exclusive time of every profiled action, filed by category (see module doc).

    `clock` defaults to wall time; `time.process_time` (CPU time of the process) is steadier on
    a shared machine for comparisons, with one torch thread and no loader workers.
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        super().__init__()
        self.clock = clock
        self.callback_categories: dict[str, str] = {}
        self.steps: list[list[float]] = []  # per finished step: category seconds..., total
        self.actions: dict[str, float] = {}  # exclusive seconds per action, inside steps
        self._stack: list[list[Any]] = []  # [action, start, time in children]
        self._category_of: dict[str, str | None] = {}
        self._step: list[float] | None = None
        self._step_start = 0.0
        self._batch_end_at: float | None = None

    def assign_callbacks(self, callbacks: Iterable[L.Callback]) -> None:
        """Learn which category each callback's hooks belong to (by its `state_key`)."""
        self.callback_categories = {cb.state_key: callback_category(cb) for cb in callbacks}
        self._category_of.clear()

    def start(self, action_name: str) -> None:
        now = self.clock()
        if action_name == "[_TrainingEpochLoop].train_dataloader_next":
            self._next_step(now)
        elif action_name.endswith(_AFTER_STEPS):
            self.finish_step()  # end-of-epoch / end-of-run work belongs to no step
        self._stack.append([action_name, now, 0.0])

    def stop(self, action_name: str) -> None:
        now = self.clock()
        while self._stack:  # tolerate an action that never stopped (an exception inside it)
            name, start, children = self._stack.pop()
            if name == action_name:
                break
        else:
            return
        elapsed = now - start
        if self._stack:
            self._stack[-1][2] += elapsed
        category = self._category(action_name)
        if category is not None and self._step is not None:
            self._step[CATEGORIES.index(category)] += elapsed - children
            self.actions[action_name] = self.actions.get(action_name, 0.0) + elapsed - children
        if action_name.endswith(".on_train_batch_end") and action_name.startswith("[Lightning"):
            self._batch_end_at = now  # the module hook runs last; Lightning's log flush follows

    def _category(self, action: str) -> str | None:
        if action not in self._category_of:
            self._category_of[action] = self._classify(action)
        return self._category_of[action]

    def _classify(self, action: str) -> str | None:
        if action in _CONTAINERS:
            return None
        if action in _OWN_ACTIONS:
            return _OWN_ACTIONS[action]
        kind, _, hook = action.rpartition(".")
        if kind.startswith("[Strategy]"):
            return _STRATEGY_HOOKS.get(hook, "other")
        if kind.startswith("[LightningModule]"):
            return _MODULE_HOOKS.get(hook, "other")
        if kind.startswith("[Callback]"):
            return self.callback_categories.get(kind.removeprefix("[Callback]"), "other")
        return "other"

    def _next_step(self, now: float) -> None:
        """Close the open step (its log-flush tail included) and open a new one at `now`."""
        self.finish_step(now)
        self._step = [0.0] * len(CATEGORIES)
        self._step_start = now

    def finish_step(self, now: float | None = None) -> None:
        """Close the open step; at the end of training the last one closes at its last hook."""
        if self._step is None:
            return
        end = now if now is not None else (self._batch_end_at or self.clock())
        if self._batch_end_at is not None and now is not None:
            self._step[CATEGORIES.index("logging")] += max(0.0, now - self._batch_end_at)
            end = now
        total = end - self._step_start
        self._step[CATEGORIES.index("other")] += max(0.0, total - sum(self._step))
        self.steps.append([*self._step, total])
        self._step, self._batch_end_at = None, None

    def window(self, first: int) -> dict[str, float]:
        """Mean seconds per step of each category (and `step`) over steps[first:]."""
        rows = self.steps[first:]
        if not rows:
            return {}
        names = (*CATEGORIES, "step")
        return {name: sum(r[i] for r in rows) / len(rows) for i, name in enumerate(names)}

    def summarize(self, skip_first: int = 1) -> dict[str, Any]:
        """The run's breakdown; the first `skip_first` steps (warm-up, compilation) stand apart."""
        rows = self.steps[skip_first:] or self.steps
        if not rows:
            return {"steps": 0}
        totals = {name: sum(r[i] for r in rows) for i, name in enumerate(CATEGORIES)}
        wall = sum(r[-1] for r in rows)
        overhead = {k: v for k, v in totals.items() if k not in COMPUTE}
        return {
            "steps": len(rows),
            "first_steps_s": [round(r[-1], 4) for r in self.steps[:skip_first]],
            "mean_step_s": wall / len(rows),
            "median_step_s": statistics.median(r[-1] for r in rows),
            "max_step_s": max(r[-1] for r in rows),
            "seconds": totals,
            "fraction": {k: v / wall for k, v in totals.items()},
            "largest": max(totals, key=totals.get),
            "overhead_fraction": sum(overhead.values()) / wall,
            "largest_overhead": max(overhead, key=overhead.get),
            "top_actions_s": dict(sorted(self.actions.items(), key=lambda item: -item[1])[:12]),
        }


def describe(summary: dict[str, Any]) -> str:
    """One line: the shares of the step, largest first, and the largest overhead."""
    if not summary.get("steps"):
        return "step time: no steps timed"
    shares = sorted(summary["fraction"].items(), key=lambda item: -item[1])
    parts = ", ".join(f"{name} {100 * share:.1f}%" for name, share in shares if share >= 0.001)
    return (
        f"step time over {summary['steps']} steps (mean {summary['mean_step_s']:.3f} s, median "
        f"{summary['median_step_s']:.3f} s): {parts}; largest cost: {summary['largest']}; "
        f"overhead (not forward/backward/optimizer) {100 * summary['overhead_fraction']:.1f}%, "
        f"largest: {summary['largest_overhead']}"
    )


CLOCKS = {"wall": time.perf_counter, "process": time.process_time}


def step_timing(
    values: dict[str, Any] | None,
    output: Path,
    extra: Callable[[], dict[str, Any]] | None = None,
) -> tuple[StepTimeProfiler, StepTimeMonitor]:
    """(profiler, callback) from the `timing` config node; `output` is the summary's JSON path."""
    values = dict(values or {})
    clock = values.pop("clock", "wall")
    every_n_steps = values.pop("every_n_steps", 50)
    if values:
        raise ValueError(f"timing has unknown keys {sorted(values)}; valid: clock, every_n_steps")
    if clock not in CLOCKS:
        raise ValueError(f"timing.clock={clock!r} is not one of {sorted(CLOCKS)}")
    profiler = StepTimeProfiler(CLOCKS[clock])
    return profiler, StepTimeMonitor(profiler, output, every_n_steps=every_n_steps, extra=extra)


class StepTimeMonitor(L.Callback):
    """TensorBoard `time/<category>` (mean s/step over the last `every_n_steps` steps),
    `time/step` and `time/overhead_fraction`; at the end of training a log line and `output`."""

    time_category = "logging"

    def __init__(
        self,
        profiler: StepTimeProfiler,
        output: str | Path | None = None,
        *,
        every_n_steps: int = 50,
        extra: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        if every_n_steps < 1:
            raise ValueError(f"timing.every_n_steps must be >= 1, got {every_n_steps}")
        self.profiler, self.every_n_steps = profiler, every_n_steps
        self.output = Path(output) if output is not None else None
        self.extra = extra  # more facts for the summary, e.g. compile counters
        self._logged = 0  # steps already in TensorBoard
        self.summary: dict[str, Any] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.profiler.assign_callbacks(trainer.callbacks)

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        done = len(self.profiler.steps)
        if done - self._logged < self.every_n_steps:
            return
        means = self.profiler.window(max(self._logged, 1))  # step 0 compiles and warms up
        self._logged = done
        if not means:
            return
        metrics = {f"time/{name}": value for name, value in means.items()}
        compute = sum(means[name] for name in COMPUTE)
        metrics["time/overhead_fraction"] = 1.0 - compute / means["step"]
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.profiler.finish_step()
        self.summary = self.profiler.summarize()
        if self.extra is not None:
            self.summary.update(self.extra())
        if not trainer.is_global_zero:
            return
        log.info(describe(self.summary))
        if self.output is not None:
            self.output.parent.mkdir(parents=True, exist_ok=True)
            self.output.write_text(json.dumps(self.summary, indent=2, sort_keys=True) + "\n")
