"""A small CNN that reads one object's attributes from a few frames of a clip (world captioner).

Why this shape: the attributes of the synthetic world's objects are of two kinds. Where an object
is and how it moves needs sub-pixel precision, so a per-pixel map is turned into a centroid by a
spatial soft-argmax (the expectation of pixel coordinates under a softmax, as in DSNT) rather than
classified from pooled features; colour, shape, size and background are classified from features
pooled under that same attention. Motion is read from how the centroids, the object's area and its
features change across the sampled frames. Plain torch: the training loop and I/O live in
`sora_lightning/data/captioners/world.py`.

Shape legend: B clips, K frames per clip, C channels, S frame side after resizing, D features.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

HEADS: dict[str, int] = {
    "colour": 8,
    "shape": 3,
    "size": 3,
    "motion": 8,
    "speed": 2,
    "background": 3,
}
"""Classified attributes and their class counts (the world's vocabularies, in world.py order)."""


@dataclass(frozen=True)
class WorldCaptionerConfig:
    """Sizes of the captioner network."""

    side: int = 32
    """Frames are resized to side x side (positions are fractions, so stretching keeps them)."""
    channels: int = 8
    """Width of the full-resolution stage (the later stages have 2x and 2x)."""
    hidden: int = 32
    """Width of each head's MLP."""

    def __post_init__(self) -> None:
        if self.side < 8 or self.side % 4 or self.channels < 1 or self.hidden < 1:
            raise ValueError(f"side must be a multiple of 4 >= 8 and widths >= 1, got {self}")


class FrameEncoder(nn.Module):
    """One frame -> attention map, occupancy map and attention-pooled features."""

    def __init__(self, config: WorldCaptionerConfig) -> None:
        super().__init__()
        width = config.channels
        self.stem = nn.Sequential(
            nn.Conv2d(6, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1)
        )
        self.maps = nn.Conv2d(width, 2, 1)  # attention logit, occupancy logit
        # A peaked softmax needs large logits; learning that scale from a few clips is slow.
        self.sharpness = nn.Parameter(torch.tensor(10.0))
        # Starting the attention on pixels unlike the background keeps it from locking onto an
        # empty corner (seen: a seed whose attention never found the object, every head at chance).
        self.prior = nn.Parameter(torch.tensor(1.0))
        self.deep = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.out_dim = 2 * width

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """pixels [N, 3, S, S] in [0, 1] -> centroid [N, 2], rgb [N, 3], area [N], desc [N, D]."""
        side = pixels.shape[-1]
        coords = (torch.arange(side, device=pixels.device, dtype=pixels.dtype) + 0.5) / side
        grid_x = coords.view(1, 1, 1, side).expand(pixels.shape[0], 1, side, side)
        grid_y = coords.view(1, 1, side, 1).expand(pixels.shape[0], 1, side, side)
        border = torch.cat([pixels[..., 0, :], pixels[..., -1, :]], dim=-1).mean(-1)  # N 3
        # Objects never touch the frame's edge, so its mean colour is the background's.
        contrast = (pixels - border[..., None, None]).abs().mean(1, keepdim=True)  # N 1 S S
        hidden = self.stem(torch.cat([pixels, grid_x, grid_y, contrast], dim=1))  # N C S S
        attention_logit, occupancy_logit = self.maps(hidden).unbind(1)  # N S S each
        attention_logit = self.sharpness * (attention_logit + self.prior * contrast[:, 0])
        attention = attention_logit.flatten(1).softmax(-1).view_as(attention_logit)  # N S S
        centroid_x = (attention * grid_x[:, 0]).sum((1, 2))
        centroid_y = (attention * grid_y[:, 0]).sum((1, 2))
        rgb = (attention.unsqueeze(1) * pixels).sum((2, 3))  # N 3
        occupancy = torch.sigmoid(occupancy_logit)  # N S S
        area = occupancy.mean((1, 2))  # N
        moments = _moments(occupancy, grid_x[:, 0], grid_y[:, 0])  # N 4
        deep = self.deep(hidden)  # N 2C S/4 S/4
        pooled_attention = F.avg_pool2d(attention.unsqueeze(1), 4) * 16  # N 1 S/4 S/4, sums to 1
        desc = (deep * pooled_attention).sum((2, 3))  # N 2C
        return {
            "centroid": torch.stack([centroid_x, centroid_y], -1),
            "rgb": rgb,
            "area": area,
            "desc": desc,
            "border": border,
            "moments": moments,
            "occupancy_logit": occupancy_logit,
        }


def _moments(mass: torch.Tensor, grid_x: torch.Tensor, grid_y: torch.Tensor) -> torch.Tensor:
    """Shape descriptors of a mask [N, S, S]: second moments over area, vertical skew (a
    triangle's apex) and the cross fourth moment (corners). Why: a few pixels of radius leave a
    small CNN little to tell shapes by, and these read them from the learned mask directly."""
    total = mass.sum((1, 2)).clamp_min(1e-4)  # N
    mean_x = (mass * grid_x).sum((1, 2)) / total
    mean_y = (mass * grid_y).sum((1, 2)) / total
    dx, dy = grid_x - mean_x[:, None, None], grid_y - mean_y[:, None, None]
    side2 = float(mass.shape[-1] ** 2)
    area = total / side2  # fraction of the frame
    second = [(mass * t).sum((1, 2)) / total / area for t in (dx * dx, dy * dy, dx * dy)]
    var_x = (mass * dx * dx).sum((1, 2)) / total
    var_y = (mass * dy * dy).sum((1, 2)) / total
    skew = (mass * dy**3).sum((1, 2)) / total / var_y.clamp_min(1e-6) ** 1.5
    # E[x^2 y^2] / (E[x^2] E[y^2]): 2/3 for a disc, 1 for a square, whatever the frame's aspect.
    cross = (mass * dx * dx * dy * dy).sum((1, 2)) / total / (var_x * var_y).clamp_min(1e-12)
    return torch.stack([*second, skew, cross], -1)


HEAD_INPUTS: dict[str, tuple[str, ...]] = {
    "colour": ("rgb", "border"),
    "background": ("border",),
    "size": ("area", "aux", "desc_first", "moments"),
    "shape": ("desc_mean", "desc_first", "moments"),
    "motion": ("slope", "per_step", "area_slope", "desc_std", "aux"),
    "speed": ("slope", "per_step", "speed_norm", "aux"),
}
"""What each head reads: few inputs per head, so a hundred labelled clips are enough to fit it."""


class WorldCaptionerNet(nn.Module):
    """K frames of a clip -> logits per attribute and the object's start position."""

    def __init__(self, config: WorldCaptionerConfig | None = None) -> None:
        super().__init__()
        self.config = config or WorldCaptionerConfig()
        self.frames = FrameEncoder(self.config)
        dim = self.frames.out_dim
        widths = {"rgb": 3, "border": 3, "area": 1, "area_slope": 1, "slope": 2, "per_step": 2}
        widths.update(aux=3, desc_mean=dim, desc_first=dim, desc_std=dim, moments=5, speed_norm=1)
        hidden = self.config.hidden
        self.heads = nn.ModuleDict(
            {
                name: nn.Sequential(
                    nn.BatchNorm1d(sum(widths[k] for k in HEAD_INPUTS[name])),
                    nn.Linear(sum(widths[k] for k in HEAD_INPUTS[name]), hidden),
                    nn.ReLU(),
                    nn.Linear(hidden, classes),
                )
                for name, classes in HEADS.items()
            }
        )

    def forward(
        self, pixels: torch.Tensor, progress: torch.Tensor, aux: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """pixels [B, K, 3, S, S] in [0, 1]; progress [B, K] (frame index / (T - 1), 0 for
        images); aux [B, 3] (width / height, frames T - 1 between the first and last, is_image).
        Returns logits [B, n] per HEADS name, "position" [B, 2] (start centre, fractions) and
        "track" [B, K, 2] (the centre in every frame), "occupancy" [B, K, S, S] (mask logits)."""
        batch, count = pixels.shape[:2]
        per_frame = self.frames(pixels.flatten(0, 1))  # B*K ...
        per_frame = {k: v.view(batch, count, *v.shape[1:]) for k, v in per_frame.items()}
        summary = self._summarise(per_frame, progress, aux)  # name -> B width
        logits = {
            name: head(torch.cat([summary[k] for k in HEAD_INPUTS[name]], -1))
            for name, head in self.heads.items()
        }
        logits["position"] = per_frame["centroid"][:, 0]  # B 2: the first frame is frame 0
        logits["track"] = per_frame["centroid"]  # B K 2
        logits["occupancy"] = per_frame["occupancy_logit"]  # B K S S
        return logits

    @staticmethod
    def _summarise(
        per_frame: dict[str, torch.Tensor], progress: torch.Tensor, aux: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Per-clip inputs of the heads: pooled features, colours, and the slopes of centroid and
        log area over clip progress (least squares: any frame count and spacing reads the same)."""
        desc, centroid = per_frame["desc"], per_frame["centroid"]  # B K D, B K 2
        log_area = per_frame["area"].clamp_min(1e-4).log()  # B K
        centred = progress - progress.mean(1, keepdim=True)  # B K
        spread = (centred * centred).sum(1).clamp_min(1e-6)  # B
        slope_xy = (centred.unsqueeze(-1) * centroid).sum(1) / spread.unsqueeze(-1)  # B 2
        slope_area = (centred * log_area).sum(1) / spread  # B
        aspect, span = aux[:, 0], aux[:, 1].clamp_min(1.0)
        per_step = torch.stack([slope_xy[:, 0], slope_xy[:, 1] / aspect], -1) / span.unsqueeze(-1)
        return {
            "rgb": per_frame["rgb"].mean(1),
            "border": per_frame["border"][:, 0],
            "area": 10 * per_frame["area"][:, :1],
            "area_slope": slope_area.unsqueeze(-1),
            "slope": 5 * slope_xy,
            "per_step": 50 * per_step,
            "speed_norm": 50 * per_step.norm(dim=-1, keepdim=True),
            "aux": aux / torch.tensor([1.0, 32.0, 1.0], device=aux.device),
            "desc_mean": desc.mean(1),
            "desc_first": desc[:, 0],
            "desc_std": desc.std(1, unbiased=False),
            "moments": per_frame["moments"][:, 0],
        }
