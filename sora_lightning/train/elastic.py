"""Elastic resume: continue a run on another world size or under another strategy.

Every checkpoint records the topology that wrote it (`TopologyRecorder`: strategy and world
size, plus the parameter name of each optimizer index). A resume compares it with its own and
loads the checkpoint as it is when it can:

- a full file (ddp, auto): model, EMA and optimizer whole. DDP loads it at any world size, and
  ZeRO-3 through `CPUCapableDeepSpeedStrategy`, which places weights, fp32 masters, moments and
  step into its partitions. FSDP2 scatters a full file too, but wants its optimizer state keyed
  by parameter name, so it gets a renamed copy.
- a DCP folder (fsdp2): resharded by torch on load, at any world size, by FSDP2 only.
- a ZeRO-3 folder: partitions fixed to the world size that wrote them, loadable only by ZeRO-3
  on that many ranks.

Otherwise it is converted once into a full file in `checkpoints/converted/by_index/` (or
`by_name/` for FSDP2), with a manifest, carrying weights, EMA, the AdamW moments and step, the
LR schedule, loops, callbacks and the data position; the run resumes from that, and a warning
says what was converted. A full file without parameter names (written before this) cannot give
its optimizer state to FSDP2 or ZeRO-3: that is refused with the reason, never silently reset.
The data position is world-size-free (`train.dit_data`), so the new ranks continue the same
global sample stream.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from sora_lightning.parallel.strategies import is_sharded_checkpoint, strategy_name
from sora_lightning.train.checkpoint import (
    CheckpointError,
    find_resume_checkpoint,
    manifest_path,
    resolve_resume,
    step_of,
    verify_checkpoint,
    write_manifest,
)
from sora_lightning.train.export import (
    DEEPSPEED_CLASSES,
    _load_zero3,
    _zero3_tag_folder,
    read_dcp,
    weights_only_loads,
)
from sora_lightning.train.weights import torch_load_safe
from sora_lightning.utils import atomic_path

log = logging.getLogger(__name__)
DEEPSPEED_KEYS = frozenset(
    "buffer_names checkpoint_parallel_dimensions data_sampler dp_world_size ds_config ds_version "
    "frozen_param_fragments frozen_param_shapes global_samples global_steps lr_scheduler module "
    "mp_world_size optimizer param_shapes random_ltd shared_params skipped_steps "
    "sparse_tensor_module_names".split()
)
"""Keys DeepSpeed adds to its model-states file; the rest is Lightning's checkpoint."""
_RANK_FILE = re.compile(r"zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")


@dataclass(frozen=True)
class Topology:
    """What wrote a checkpoint: the `conf/strategy` name and the number of ranks."""

    strategy: str
    world_size: int

    def to_dict(self) -> dict[str, Any]:
        """Plain data for a checkpoint."""
        return {"strategy": self.strategy, "world_size": self.world_size}


class TopologyRecorder(Callback):
    """Writes `topology` (strategy, world size) and, for full checkpoints, the parameter name of
    every optimizer index (`optimizer_param_names`) into each checkpoint.

    Why: a resume on another world size or strategy decides from them whether the checkpoint
    loads as it is or is converted first, and ZeRO-3 places a full optimizer state by name.
    """

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Before the strategy writes: plain data only, so it loads with weights_only."""
        topology = Topology(strategy_name(trainer.strategy), trainer.world_size)
        checkpoint["topology"] = topology.to_dict()
        names = {id(param): name for name, param in pl_module.named_parameters()}
        if trainer.optimizers and topology.strategy in ("ddp", "auto"):
            checkpoint["optimizer_param_names"] = [
                [names[id(param)] for param in group["params"]]
                for group in trainer.optimizers[0].param_groups
            ]


def checkpoint_format(path: Path) -> str:
    """The format of a checkpoint: "zero3" (DeepSpeed folder), "dcp" (FSDP2 folder) or "full"."""
    if path.is_dir() and (path / "latest").is_file():
        return "zero3"
    if path.is_dir() and (path / ".metadata").is_file():
        return "dcp"
    return "full"


def read_topology(path: Path) -> Topology | None:
    """The topology a checkpoint records; for older ones what its format shows (None: unknown)."""
    kind = checkpoint_format(path)
    if kind == "zero3":
        tag = _zero3_tag_folder(path)
        extras = torch_load_safe(sorted(tag.glob("*model_states.pt"))[0])
        recorded = extras.get("topology")
        ranks = len(list(tag.glob("*_optim_states.pt")))
        return Topology(**recorded) if recorded else Topology("deepspeed_zero3", ranks)
    if kind == "dcp":
        meta = torch_load_safe(path / "meta.pt") if (path / "meta.pt").is_file() else {}
        recorded = meta.get("topology")
        return Topology(**recorded) if recorded else None
    try:  # the manifest repeats it: no need to load a large file twice
        recorded = json.loads(manifest_path(path).read_text()).get("topology")
    except (OSError, ValueError):
        recorded = None
    recorded = recorded or torch_load_safe(path).get("topology")
    return Topology(**recorded) if recorded else None


def newest_checkpoint(directory: Path) -> Path | None:
    """The newest checkpoint of any format: a file whose manifest verifies or a complete folder.

    Why one search for all: a run resumed under another strategy must find what the previous
    one wrote (a ZeRO-3 folder for a DDP run), not start fresh because the format differs.
    """
    folders = [p for p in directory.glob("step=*.ckpt") if is_sharded_checkpoint(p)]
    candidates = [p for p in (find_resume_checkpoint(directory), *folders) if p is not None]
    if not candidates:
        return None
    return max(candidates, key=lambda p: (step_of(p) or -1, p.is_dir()))


def resume_checkpoint(
    resume_from: str | Path | None, directory: Path, strategy: str, world_size: int
) -> Path | None:
    """The path `trainer.fit` resumes from: the requested (or newest) checkpoint, converted to a
    full file when this strategy and world size cannot load it as it is."""
    if resume_from and is_sharded_checkpoint(Path(resume_from)):
        path: Path | None = Path(resume_from)
    elif resume_from:
        path = resolve_resume(resume_from, directory)  # must verify, or CheckpointError
    else:
        path = newest_checkpoint(directory)
    if path is None:
        return None
    return prepare_resume(path, Topology(strategy, world_size))


def prepare_resume(path: Path, target: Topology) -> Path:
    """`path` itself where `target` loads it as it is; else its conversion (made once, reused)."""
    kind, source = checkpoint_format(path), read_topology(path)
    if kind == "dcp":
        loadable = target.strategy == "fsdp2"  # torch reshards DCP to any world size
    elif kind == "zero3":
        loadable = source == target  # partitions fixed to the world size that wrote them
    else:
        loadable = target.strategy != "fsdp2"  # FSDP2 takes full optimizer state keyed by name
    if loadable:
        if source is not None and source != target:
            log.warning(
                "resuming %s (written by %s on %d ranks) with %s on %d ranks: loaded as it is "
                "(%s checkpoint)",
                path, source.strategy, source.world_size, target.strategy, target.world_size, kind,
            )  # fmt: skip
        return path
    keyed = "by_name" if target.strategy == "fsdp2" else "by_index"
    converted = path.parent / "converted" / keyed / path.name
    if verify_checkpoint(converted) is None:
        log.warning("resuming from %s, converted earlier from %s", converted, path)
        return converted
    readers = {"zero3": zero3_to_full, "dcp": dcp_to_full, "full": torch_load_safe}
    checkpoint = readers[kind](path)
    if keyed == "by_name":
        checkpoint = optimizer_by_name(checkpoint, path)
    converted.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(converted) as tmp:  # every rank may convert: same bytes, atomic rename
        torch.save(checkpoint, tmp)
    write_manifest(converted, checkpoint)
    log.warning(
        "checkpoint %s was written by %s on %s ranks; this run is %s on %d ranks: converted to "
        "the full checkpoint %s (weights, EMA, AdamW moments and step, LR schedule, data position)",
        path,
        source.strategy if source else "an unrecorded strategy",
        source.world_size if source else "?",
        target.strategy,
        target.world_size,
        converted,
    )
    return converted


def optimizer_by_name(checkpoint: dict[str, Any], path: Path) -> dict[str, Any]:
    """The full checkpoint with its AdamW state keyed by parameter name, as FSDP2 loads it.

    Why: Lightning maps an index-keyed state onto FSDP2 by `named_parameters()` order, not by
    the optimizer's groups (weights with decay first), which puts moments on the wrong tensors.
    """
    names = checkpoint.get("optimizer_param_names")
    if not names:
        raise CheckpointError(
            f"{path} does not name its optimizer's parameters (written before elastic resume), "
            "so its optimizer state cannot be given to FSDP2; resume it with the strategy that "
            "wrote it, or under ddp"
        )
    state = checkpoint["optimizer_states"][0]
    by_index = {
        index: name
        for group_names, group in zip(names, state["param_groups"], strict=True)
        for index, name in zip(group["params"], group_names, strict=True)
    }
    renamed = {
        "state": {by_index[index]: value for index, value in state["state"].items()},
        "param_groups": [
            {**group, "params": [by_index[index] for index in group["params"]]}
            for group in state["param_groups"]
        ],
    }
    return {**checkpoint, "optimizer_states": [renamed]}


def merge_zero3_partitions(
    flats: list[torch.Tensor], shapes: dict[str, torch.Size]
) -> dict[str, torch.Tensor]:
    """Whole tensors from each rank's flat partition (sub-groups concatenated), as ZeRO-3 lays
    them out: each parameter takes ceil(numel / world) elements on every rank, the last padded."""
    world, offset, merged = len(flats), 0, {}
    for name, shape in shapes.items():
        numel = math.prod(shape)
        part = math.ceil(numel / world)
        pieces = [flat[offset : offset + part] for flat in flats]
        merged[name] = torch.cat(pieces)[:numel].view(shape).clone()
        offset += part
    if offset != flats[0].numel():
        raise CheckpointError(f"ZeRO-3 partitions hold {flats[0].numel()} elements, used {offset}")
    return merged


def zero3_to_full(folder: Path) -> dict[str, Any]:
    """A ZeRO-3 folder as one full checkpoint: fp32 weights (EMA included) and AdamW state merged
    from every rank's partitions, index-keyed like a DDP checkpoint, and Lightning's extras."""
    weights, extras = _load_zero3(folder)
    tag = _zero3_tag_folder(folder)
    files = sorted(tag.glob("*_optim_states.pt"), key=lambda p: int(_RANK_FILE.search(p.name)[1]))
    allowed = [getattr(importlib.import_module(m), n) for m, n in DEEPSPEED_CLASSES]
    with weights_only_loads(allowed):
        ranks = [torch.load(f, map_location="cpu")["optimizer_state_dict"] for f in files]
    groups = extras["param_shapes"]  # one {name: shape} per param group, in optimizer order
    shapes = {name: shape for group in groups for name, shape in group.items()}
    bases = [rank["optimizer_state_dict"] for rank in ranks]
    moments = {
        key: merge_zero3_partitions(
            [torch.cat([base["state"][i][key] for i in range(len(groups))]) for base in bases],
            shapes,
        )
        for key in ("exp_avg", "exp_avg_sq")
    }
    state, param_groups, names, index = {}, [], [], 0
    for number, group in enumerate(groups):
        step = bases[0]["state"][number]["step"]
        indices = list(range(index, index + len(group)))
        for position, name in zip(indices, group, strict=True):
            state[position] = {"step": step.clone(), **{k: v[name] for k, v in moments.items()}}
        saved = bases[0]["param_groups"][number]
        param_groups.append(
            {**{k: v for k, v in saved.items() if k != "params"}, "params": indices}
        )
        names.append(list(group))
        index += len(group)
    lightning = {k: v for k, v in extras.items() if k not in DEEPSPEED_KEYS}
    return {
        **lightning,
        "state_dict": {k: v.float() for k, v in weights.items()},
        "optimizer_states": [{"state": state, "param_groups": param_groups}],
        "optimizer_param_names": names,
    }


def dcp_to_full(folder: Path) -> dict[str, Any]:
    """An FSDP2 DCP folder as one full checkpoint: whole weights and an index-keyed AdamW state.

    DCP keys the optimizer state by parameter name; a full checkpoint by index, in the order of
    the optimizer's groups, which the saved `param_groups` list by name.
    """
    loaded, extras = read_dcp(folder)
    saved = loaded["optimizer_0"]
    state, param_groups, names, index = {}, [], [], 0
    for group in saved["param_groups"]:
        group_names = list(group["params"])
        indices = list(range(index, index + len(group_names)))
        for position, name in zip(indices, group_names, strict=True):
            if name in saved["state"]:
                state[position] = dict(saved["state"][name])
        param_groups.append(
            {**{k: v for k, v in group.items() if k != "params"}, "params": indices}
        )
        names.append(group_names)
        index += len(group_names)
    return {
        **extras,
        "state_dict": dict(loaded["state_dict"]),
        "optimizer_states": [{"state": state, "param_groups": param_groups}],
        "optimizer_param_names": names,
    }
