"""The world captioner: a small CNN trained in the pipeline on the labelled clips of alt-text shards.

Why: DALL-E 3's claim (descriptive synthetic captions beat alt-text) should be shown on the
embedded world, not assumed. `dataset.captions=alt_text` writes shards whose only caption is
terse alt-text ("red circle clip"); a labelled fraction keeps the scene's truth in its record.
`caption.model=world` trains `models/world_captioner.py` on those records (nothing else is read:
unlabelled records carry no truth) and writes the world's detailed caption of every sample from
the predicted attributes, like a VLM would.

One object per caption: the scene's main object (`world.main_object`: the largest, the first
drawn on a tie), the same one the alt-text names. Other objects of multi-object clips are left out.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from sora_lightning.data import world
from sora_lightning.data.captioners.base import Clip
from sora_lightning.data.shards import RawSample, iter_shard_samples
from sora_lightning.models.world_captioner import HEADS, WorldCaptionerConfig, WorldCaptionerNet
from sora_lightning.utils import combined_hash, file_sha256, write_json_atomic

log = logging.getLogger(__name__)
MODEL_NAME = "world"
"""`caption.model=world` picks this captioner instead of a VLM folder."""
WEIGHTS = "model.safetensors"
RECORD = "train.json"
VOCAB: dict[str, tuple[str, ...]] = {
    "colour": tuple(world.COLOURS),
    "shape": world.SHAPES,
    "size": tuple(world.SIZES),
    "motion": world.MOTIONS,
    "speed": tuple(world.SPEEDS),
    "background": tuple(world.BACKGROUNDS),
}
TRANSLATIONS = ("left", "right", "up", "down")
_FLIP = {"left": "right", "right": "left"}


@dataclass(frozen=True)
class WorldTrainConfig:
    """How the world captioner is trained on the labelled clips."""

    steps: int = 500
    """Optimizer steps."""
    batch_size: int = 16
    """Clips per step."""
    lr: float = 3e-3
    """Peak AdamW learning rate (cosine decay to 0)."""
    seed: int = 0
    """Initialisation and batch order."""
    position_weight: float = 20.0
    """Weight of the L1 loss on the centre in each frame (fractions) against the cross-entropies."""
    head_steps: int = 150
    """Full-batch steps refitting the heads alone on the trained encoder's features (`refit_heads`)."""

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or not self.lr > 0 or self.head_steps < 0:
            raise ValueError(f"steps and batch_size must be >= 1, head_steps >= 0, lr > 0: {self}")


@dataclass
class Batch:
    """Clips as the network takes them (see `WorldCaptionerNet.forward`)."""

    pixels: torch.Tensor
    fine: torch.Tensor
    progress: torch.Tensor
    aux: torch.Tensor
    hint: torch.Tensor | None = None
    """[B, 2] colour and shape classes each clip's hint names (-1: none); None: no hints."""

    def __getitem__(self, picked: torch.Tensor | slice) -> Batch:
        """The picked clips."""
        hint = None if self.hint is None else self.hint[picked]
        return Batch(
            self.pixels[picked], self.fine[picked], self.progress[picked], self.aux[picked], hint
        )


def hint_classes(hint: str) -> tuple[int, int]:
    """The colour and shape classes a hint names ("red circle clip" -> red, circle), -1 for
    either it leaves out: what the captioner is told of the main object."""
    words = hint.lower().replace(",", " ").split()
    colour, shape = (
        next((VOCAB[name].index(w) for w in words if w in VOCAB[name]), -1)
        for name in ("colour", "shape")
    )
    return colour, shape


def _resize(frames: torch.Tensor, side: int) -> torch.Tensor:
    """Frames [T, C, H, W] stretched to side x side (frames, pixels and masks alike)."""
    return F.interpolate(frames, size=(side, side), mode="bilinear", antialias=True)


def clip_tensors(clips: Sequence[Clip], frames: int, config: WorldCaptionerConfig) -> Batch:
    """Clips -> frames resized to the coarse side (float) and to the fine side (uint8: a quarter
    of the memory), padded to `frames` by repeating the last one."""
    pixels, fine, progress, aux = [], [], [], []
    for clip in clips:
        video = torch.from_numpy(np.ascontiguousarray(clip.frames)).permute(0, 3, 1, 2).float()
        height, width = video.shape[-2:]
        detail = _resize(video, config.fine).round().clamp(0, 255).to(torch.uint8)
        video = _resize(video / 255, config.side)
        total = max(clip.total_frames, 1)
        indices = list(clip.indices) or list(range(len(clip.frames)))
        times = [i / (total - 1) if total > 1 else 0.0 for i in indices]
        pad = frames - len(times)
        if pad < 0:
            raise ValueError(f"{clip.key}: {len(times)} frames, the captioner takes {frames}")
        pixels.append(torch.cat([video, video[-1:].expand(pad, -1, -1, -1)]))
        fine.append(torch.cat([detail, detail[-1:].expand(pad, -1, -1, -1)]))
        progress.append(torch.tensor(times + times[-1:] * pad))
        aux.append(torch.tensor([width / height, float(total - 1), float(total == 1)]))
    hints = torch.tensor([hint_classes(clip.hint) for clip in clips], dtype=torch.long)
    stacked = (torch.stack(pixels), torch.stack(fine), torch.stack(progress).float())
    return Batch(*stacked, torch.stack(aux), hints if bool((hints >= 0).any()) else None)


def _track(scene: world.Scene, clip: Clip, frames: int) -> list[list[float]]:
    """The main object's centre (fractions) at each sampled frame, padded like `clip_tensors`."""
    obj = world.main_object(scene)
    centre_x, centre_y, _, _ = world._trajectory(obj, scene.width, scene.height, scene.num_frames)
    indices = list(clip.indices) or [0]
    indices += indices[-1:] * (frames - len(indices))
    return [[centre_x[i] / scene.width, centre_y[i] / scene.height] for i in indices]


def scene_targets(
    scenes: Sequence[world.Scene], clips: Sequence[Clip], frames: int, config: WorldCaptionerConfig
) -> dict[str, torch.Tensor]:
    """Class indices of each scene's main object (-100 where a head has no truth: the motion of
    an image, the speed of an untranslated object), and its centre at every sampled frame (so
    the attention is taught where the object is in each frame, not only in the first), and its
    coverage (what the occupancy map learns)."""
    rows: dict[str, list] = {name: [] for name in [*HEADS, "position"]}
    for scene, clip in zip(scenes, clips, strict=True):
        obj = world.main_object(scene)
        image = scene.num_frames == 1
        for name in ("colour", "shape", "size"):
            rows[name].append(VOCAB[name].index(getattr(obj, name)))
        rows["background"].append(VOCAB["background"].index(scene.background))
        rows["motion"].append(-100 if image else VOCAB["motion"].index(obj.motion))
        moving = not image and obj.motion in TRANSLATIONS
        rows["speed"].append(VOCAB["speed"].index(obj.speed) if moving else -100)
        rows["position"].append(_track(scene, clip, frames))
    out = {name: torch.tensor(rows[name]) for name in HEADS}
    out["position"] = torch.tensor(rows["position"], dtype=torch.float32)
    covers = [_cover(sc, c, frames) for sc, c in zip(scenes, clips, strict=True)]
    out["mask"] = torch.stack([_resize(c, config.side)[:, 0] for c in covers])
    return out


def _cover(scene: world.Scene, clip: Clip, frames: int) -> torch.Tensor:
    """The main object's coverage [K, 1, H, W] at the sampled frames."""
    obj = world.main_object(scene)
    cover = world._coverage(obj, scene.width, scene.height, scene.num_frames)  # T H W
    indices = list(clip.indices) or [0]
    indices += indices[-1:] * (frames - len(indices))
    return torch.from_numpy(cover[indices]).unsqueeze(1)


def _flip(batch: Batch, targets: dict[str, torch.Tensor], mask: torch.Tensor) -> tuple:
    """Mirror the masked clips left-right (x -> 1 - x, left <-> right): twice the layouts."""
    pixels = torch.where(mask.view(-1, 1, 1, 1, 1), batch.pixels.flip(-1), batch.pixels)
    fine = torch.where(mask.view(-1, 1, 1, 1, 1), batch.fine.flip(-1), batch.fine)
    flipped = dict(targets)
    position = targets["position"].clone()  # B K 2
    position[mask, :, 0] = 1 - position[mask, :, 0]
    flipped["position"] = position
    flipped["mask"] = torch.where(mask.view(-1, 1, 1, 1), targets["mask"].flip(-1), targets["mask"])
    motion = targets["motion"].clone()
    for src, dst in _FLIP.items():
        motion[mask & (targets["motion"] == VOCAB["motion"].index(src))] = VOCAB["motion"].index(
            dst
        )
    flipped["motion"] = motion
    return Batch(pixels, fine, batch.progress, batch.aux), flipped


def loss_fn(
    out: dict[str, torch.Tensor], targets: dict[str, torch.Tensor], position_weight: float
) -> torch.Tensor:
    """Sum of cross-entropies (ignoring -100), the weighted L1 of the attention's centre in
    every frame, and the BCE of the occupancy map against the main object's coverage."""
    total = position_weight * F.l1_loss(out["track"], targets["position"])
    total = total + F.binary_cross_entropy_with_logits(out["occupancy"], targets["mask"])
    for name in HEADS:
        if (targets[name] != -100).any():
            total = total + F.cross_entropy(out[name], targets[name], ignore_index=-100)
    return total


def train_net(
    batch: Batch,
    targets: dict[str, torch.Tensor],
    net_config: WorldCaptionerConfig,
    config: WorldTrainConfig,
) -> tuple[WorldCaptionerNet, dict[str, float]]:
    """Train a fresh network on the labelled clips (all of them, mirrored at random)."""
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    net = WorldCaptionerNet(net_config)
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / config.steps))
    )
    count, start, loss = len(batch.pixels), time.perf_counter(), torch.tensor(0.0)
    for _ in range(config.steps):
        picked = torch.randint(count, (min(config.batch_size, count),), generator=generator)
        mask = torch.rand(len(picked), generator=generator) < 0.5
        part, truth = _flip(batch[picked], {k: v[picked] for k, v in targets.items()}, mask)
        out = net(part.pixels, part.fine, part.progress, part.aux)
        loss = loss_fn(out, truth, config.position_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    refit_heads(net, batch, targets, config.head_steps, config.lr)
    return net.eval(), {"seconds": time.perf_counter() - start, "final_loss": float(loss.detach())}


def refit_heads(
    net: WorldCaptionerNet,
    batch: Batch,
    targets: dict[str, torch.Tensor],
    steps: int,
    lr: float,
) -> None:
    """Fit each head again on all labelled clips and their mirrors at once, on the features of
    the trained encoder. Why: in the joint loop a head sees a few clips per step, with batch
    statistics that swing, while its features still move; with a handful of labelled examples
    of a class (four clips moving right) its boundary ended up anywhere in a wide gap, and
    clearly separated features were misread (motion 0.93 on held-out clips, 0.99 after). Full
    batches of fixed features cost no convolution. Few steps at the loop's peak rate: more fit
    the labelled clips with several objects, whose features are cluttered, and lose accuracy."""
    net.eval()
    inputs: dict[str, list[torch.Tensor]] = {name: [] for name in HEADS}
    labels: dict[str, list[torch.Tensor]] = {name: [] for name in HEADS}
    for mirrored in (False, True):
        mask = torch.full((len(batch.pixels),), mirrored)
        part, truth = _flip(batch, targets, mask)
        with torch.no_grad():
            out = net(part.pixels, part.fine, part.progress, part.aux)
        # Clips whose window missed the main object (two objects of its size: a tie) teach a
        # head another object's features under the main object's labels: left out.
        found = (out["position"] - truth["position"][:, 0]).abs().sum(-1) < 0.05
        for name in HEADS:
            inputs[name].append(out[f"inputs/{name}"][found])
            labels[name].append(truth[name][found])
    for name, head in net.heads.items():
        x, y = torch.cat(inputs[name]), torch.cat(labels[name])
        x, y = x[y != -100], y[y != -100]
        if len(y) < 2:
            continue
        optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
        head.train()
        for _ in range(steps):
            loss = F.cross_entropy(head(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        head.eval()


def predict(net: WorldCaptionerNet, batch: Batch) -> list[dict[str, Any]]:
    """Attributes of each clip's main object (the class with the highest logit; x0, y0); the
    object the clip's hint names, where it has one."""
    with torch.inference_mode():
        out = net(batch.pixels, batch.fine, batch.progress, batch.aux, batch.hint)
    picks = {name: out[name].argmax(-1).tolist() for name in HEADS}
    rows = []
    for index, (x0, y0) in enumerate(out["position"].tolist()):
        row: dict[str, Any] = {name: VOCAB[name][picks[name][index]] for name in HEADS}
        rows.append({**row, "x0": float(x0), "y0": float(y0)})
    return rows


def caption_from(attrs: dict[str, Any], clip: Clip) -> str:
    """The world's detailed caption of a one-object scene with the predicted attributes."""
    image = clip.is_image or clip.total_frames <= 1
    motion = "still" if image else attrs["motion"]
    if attrs["shape"] == "circle" and motion == "rotate":
        motion = "still"  # a turning circle looks still; the world has no circle+rotate
    obj = world.ObjectSpec(
        attrs["shape"],
        attrs["colour"],
        attrs["size"],
        motion,
        attrs["speed"],
        attrs["x0"],
        attrs["y0"],
    )
    height, width = clip.frames.shape[1:3]
    scene = world.Scene((obj,), attrs["background"], width, height, 1 if image else 2)
    return world.detailed_caption(scene)


class WorldCaptioner:
    """A trained world captioner with the VLM adapters' interface (`captioners.base.VLMAdapter`)."""

    family = MODEL_NAME
    multiple = 1
    sample_ends = True  # `captioning.read_clip(ends=True)`: the first frame is where it starts
    dtype = torch.float32
    device = torch.device("cpu")

    def __init__(self, net: WorldCaptionerNet, frames: int, weights_hash: str) -> None:
        self.net, self.frames, self.weights_hash = net.eval(), frames, weights_hash

    def attributes(self, clips: list[Clip]) -> list[dict[str, Any]]:
        """Predicted attributes of each clip's main object (a few hundred clips at a time, so
        memory stays small whatever the caller passes)."""
        rows: list[dict[str, Any]] = []
        for start in range(0, len(clips), 256):
            part = clips[start : start + 256]
            rows += predict(self.net, clip_tensors(part, self.frames, self.net.config))
        return rows

    def caption(self, clips: list[Clip], instruction: str, max_new_tokens: int) -> list[str]:
        """One detailed caption per clip (the instruction and token budget do not change it)."""
        del instruction, max_new_tokens
        attrs = self.attributes(clips)
        return [caption_from(a, c) for a, c in zip(attrs, clips, strict=True)]

    def save(self, folder: Path, record: dict[str, Any]) -> None:
        """Weights, then the record naming their hash (a record means the weights are whole)."""
        folder.mkdir(parents=True, exist_ok=True)
        save_file(self.net.state_dict(), str(folder / WEIGHTS))
        self.weights_hash = file_sha256(folder / WEIGHTS)
        write_json_atomic(folder / RECORD, {**record, "weights_sha256": self.weights_hash})

    @classmethod
    def load(cls, folder: Path) -> WorldCaptioner:
        """A saved captioner; refused when its weights are not the ones its record names."""
        record = json.loads((folder / RECORD).read_text(encoding="utf-8"))
        if file_sha256(folder / WEIGHTS) != record["weights_sha256"]:
            raise ValueError(f"{folder / WEIGHTS} is not the file {RECORD} names: retrain")
        net = WorldCaptionerNet(WorldCaptionerConfig(**record["net"]))
        net.load_state_dict(load_file(str(folder / WEIGHTS)))
        return cls(net, int(record["frames"]), record["weights_sha256"])


def labelled_examples(
    shards: Sequence[Path], read: Callable[[RawSample], Clip]
) -> tuple[list[Clip], list[world.Scene]]:
    """The clips whose records keep the scene's truth (alt-text shards' labelled fraction);
    `read` decodes a sample as the caption step will (`captioning.read_clip`, which imports
    this module, so it is passed in)."""
    clips, scenes = [], []
    for sample in iter_shard_samples([str(s) for s in shards]):
        if "scene" not in sample.meta:
            continue
        clips.append(read(sample))
        scenes.append(world.Scene.from_dict(sample.meta["scene"]))
    return clips, scenes


def train_or_load(
    shards: Sequence[Path],
    folder: Path,
    read: Callable[[RawSample], Clip],
    frames: int,
    size: int,
    config: WorldTrainConfig | None = None,
) -> WorldCaptioner:
    """The captioner trained on these shards' labelled clips: loaded from `folder` when its record
    names the same shards (by sha256), frames, size and network configuration (whatever recipe
    trained it: its weights hash is in the captions' identity), else trained now with `config`
    and saved there."""
    config = config or WorldTrainConfig()
    net_config = WorldCaptionerConfig()
    # A model saved with another network configuration (an older version) would not load.
    wanted = {"shards": [file_sha256(s) for s in shards], "frames": frames, "size": size}
    wanted["net"] = asdict(net_config)
    path = folder / RECORD
    if path.is_file():
        record = json.loads(path.read_text(encoding="utf-8"))
        if {k: record.get(k) for k in wanted} == wanted:
            return WorldCaptioner.load(folder)
    clips, scenes = labelled_examples(shards, read)
    if len(clips) < 8:
        raise ValueError(
            f"caption.model=world found {len(clips)} labelled samples in the shards (records with a "
            "'scene'): write them with dataset.captions=alt_text and dataset.labelled_fraction > 0"
        )
    net, stats = train_net(
        clip_tensors(clips, frames, net_config),
        scene_targets(scenes, clips, frames, net_config),
        net_config,
        config,
    )
    log.info("world captioner: %d labelled samples, %.1f s", len(clips), stats["seconds"])
    captioner = WorldCaptioner(net, frames, "")
    record = {**wanted, "train": asdict(config)}
    captioner.save(folder, {**record, "labelled": len(clips), **stats})
    return captioner


def world_identity(captioner: WorldCaptioner, field: str, instruction: str, frames: int) -> dict:
    """The captions' identity (as `captioning.caption_identity` gives a VLM's)."""
    return {
        "model_hash": combined_hash(captioner.weights_hash),
        "family": MODEL_NAME,
        "field": field,
        "instruction": instruction,
        "frames": frames,
        "sampling": "ends",
    }


def accuracy(
    predicted: Sequence[dict[str, Any]], scenes: Sequence[world.Scene]
) -> dict[str, float | int]:
    """Per-attribute accuracy against the scenes' main objects: colour, shape, size, background
    and position (the caption's 3x3 grid words) over all; motion over clips; speed over
    translated clips; `caption` the share whose whole detailed caption is right."""
    hits: dict[str, list[bool]] = {n: [] for n in [*HEADS, "position", "caption"]}
    for attrs, scene in zip(predicted, scenes, strict=True):
        obj = world.main_object(scene)
        image = scene.num_frames == 1
        right = {name: attrs[name] == getattr(obj, name) for name in ("colour", "shape", "size")}
        right["background"] = attrs["background"] == scene.background
        guess = world.position_words(attrs["x0"], attrs["y0"])
        right["position"] = guess == world.position_words(obj.x0, obj.y0)
        if not image:
            right["motion"] = attrs["motion"] == obj.motion
        if not image and obj.motion in TRANSLATIONS:
            right["speed"] = attrs["speed"] == obj.speed
        for name, value in right.items():
            hits[name].append(value)
        hits["caption"].append(all(right.values()))
    result: dict[str, float | int] = {
        name: float(np.mean(values)) if values else float("nan") for name, values in hits.items()
    }
    result["count"] = len(predicted)
    return result
