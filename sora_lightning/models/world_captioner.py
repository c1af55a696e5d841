"""A small CNN that reads one object's attributes from a few frames of a clip (world captioner).

Why this shape: the attributes of the synthetic world's objects are of two kinds. Where an object
is and how it moves needs sub-pixel precision, so a per-pixel map is turned into a centroid by a
spatial soft-argmax (the expectation of pixel coordinates under a softmax, as in DSNT) rather than
classified from pooled features. Shape and size are read at the world's native scale (at 32
pixels a small object is 3 to 4 pixels wide, too few to tell a disc from a square): a window
around the object's centre is cut from frames kept at full resolution, the object's coverage and
colour in it are read from colour (`crop_occupancy`, keeping only the part connected to the
window's middle), and that mask's area and moments feed those heads. Its centre of mass refines
the centre. With several objects the window goes to the largest (the main object), or to the one
the sample's alt-text names when it is given as a hint: candidates from the attention and from
the frame's own peaks (`candidate_peaks`) are each read at native scale in the first frame, the
best is kept and then followed (`WorldCaptionerNet._centres`). Motion is read from how the
centres, the mask's area and its moments change across the sampled frames. Plain torch: the
training loop and I/O live in `sora_lightning/data/captioners/world.py`.

Shape legend: B clips, K frames per clip, C channels, S frame side after resizing, F fine frame
side, W window (crop) side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

OFF_LINE = 0.3
"""A pixel further than this (in units of |c - b|) from the blends of the object's colour c over
the background b is not the object's (`crop_occupancy`)."""

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
    """Width of the per-pixel stage."""
    hidden: int = 32
    """Width of each head's MLP."""
    fine: int = 72
    """Side of the fine frames the crop is sampled from: the world's largest native side, so a
    frame is only ever stretched up and no pixel of it is lost."""
    crop: int = 32
    """Side of the crop in pixels."""
    window: float = 0.8
    """Side of the crop as a fraction of min(width, height), the unit the world's sizes use: a
    large triangle reaches 0.28 of it from its centre, and the rest is room for the coarse
    centre's error. Measuring in that unit makes an object's extent in the crop its size."""
    floor: float = 0.2
    """Coverage read from colour below this is taken as none (see `crop_occupancy`)."""
    candidates: int = 4
    """Candidate centres per frame besides the attention's (`candidate_peaks`)."""
    suppress: int = 4
    """Half side, in coarse pixels, of the box a candidate peak suppresses."""
    contrast: float = 0.15
    """A candidate's blurred contrast, and its window's middle colour's, must exceed this."""
    connected: bool = True
    """Keep only the part of a window's mask connected to its middle (`connected_to_middle`):
    the world's objects never overlap, so a neighbour of the same colour is cut off."""

    def __post_init__(self) -> None:
        if self.side < 8 or self.side % 4 or self.channels < 1 or self.hidden < 1:
            raise ValueError(f"side must be a multiple of 4 >= 8 and widths >= 1, got {self}")
        if self.fine < 8 or self.crop < 8 or not 0 < self.window <= 1 or not 0 <= self.floor < 1:
            raise ValueError(
                f"fine and crop must be >= 8, window in (0, 1] and floor in [0, 1), got {self}"
            )


class FrameEncoder(nn.Module):
    """One frame at the coarse side -> attention map (and so the centre), occupancy map and
    attention-pooled colour."""

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

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """pixels [N, 3, S, S] in [0, 1] -> centroid [N, 2], rgb [N, 3], border [N, 3] and the
        occupancy logit [N, S, S] (trained against the object's coverage: it teaches the stem
        what the object is, which the attention builds on)."""
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
        return {
            "centroid": torch.stack([centroid_x, centroid_y], -1),
            "rgb": rgb,
            "border": border,
            "occupancy_logit": occupancy_logit,
        }


def _moments(mass: torch.Tensor, grid_x: torch.Tensor, grid_y: torch.Tensor) -> torch.Tensor:
    """Shape descriptors of a mask [N, S, S]: second moments over area, vertical skew (a
    triangle's apex) and the cross fourth moment (corners). Why: they tell the world's shapes
    apart whatever their size (a disc's cross moment is 2/3, a square's 1, a triangle's skew
    about -0.5), so a head needs few labelled clips to read them."""
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


def crop_window(
    centre: torch.Tensor, aspect: torch.Tensor, config: WorldCaptionerConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampling grid [N, W, W, 2] (grid_sample's [-1, 1] frame coordinates) of a square window
    of side `config.window` * min(width, height) centred on centre [N, 2] (fractions), for frames
    of width / height `aspect` [N] stretched to a square; and the window's spans [N, 2] as
    fractions of the frame's width and height (to map crop offsets back to the frame)."""
    spans = config.window * torch.stack(
        [torch.clamp(1 / aspect, max=1.0), torch.clamp(aspect, max=1.0)], -1
    )  # min / width, min / height
    zero = torch.zeros_like(aspect)
    theta = torch.stack(
        [
            torch.stack([spans[:, 0], zero, 2 * centre[:, 0] - 1], -1),
            torch.stack([zero, spans[:, 1], 2 * centre[:, 1] - 1], -1),
        ],
        1,
    )  # N 2 3
    side = config.crop
    return F.affine_grid(theta, [len(centre), 1, side, side], align_corners=False), spans


def connected_to_middle(mask: torch.Tensor) -> torch.Tensor:
    """mask [N, W, W] restricted to the pixels 8-connected to its middle (grown from the middle's
    covered pixels by repeated 3x3 max-pooling inside the mask). Why: the window is wide (room
    for the coarse centre's error), so a neighbour whose colour lies on the object's blend line
    (the same colour, or grey between white and black) stays in the mask and bends its moments;
    objects never overlap, so the neighbour is a separate component. A window whose middle is
    not covered keeps its whole mask."""
    side = mask.shape[-1]
    middle = side // 2
    inside = mask > 0
    seed = torch.zeros_like(inside)
    seed[:, middle - 2 : middle + 2, middle - 2 : middle + 2] = True
    reach = (inside & seed & (mask > 0.5)).to(mask.dtype)[:, None]
    allowed = inside.to(mask.dtype)[:, None]
    for _ in range(side):
        grown = F.max_pool2d(reach, 3, stride=1, padding=1) * allowed
        if torch.equal(grown, reach):
            break
        reach = grown
    empty = reach.flatten(1).amax(1) == 0
    return torch.where(empty[:, None, None], mask, mask * reach[:, 0])


def crop_occupancy(
    fine: torch.Tensor, grid: torch.Tensor, border: torch.Tensor, floor: float, connected: bool
) -> dict[str, torch.Tensor]:
    """The object's coverage in a window of a fine frame, read from colour: the world blends an
    object's colour c over the background b by its coverage a, so a pixel p gives
    a = <p - b, c - b> / |c - b|^2. c is the window's middle (the window is centred on the
    object, and the world's shapes are convex, so their centre is inside), b is the frame's
    border. Coverage under `floor` is dropped: video coding leaves faint colour everywhere, and
    moments weight far pixels by up to distance^4. No parameters: it needs no labels to learn.

    fine [N, 3, F, F] in [0, 1], grid from `crop_window`, border [N, 3] -> mask [N, W, W],
    colour [N, 3] (the mean of the pixels it fully covers; the window's middle if none), area
    [N] (fraction of the window), moments [N, 5] and offset [N, 2] (centre of mass minus the
    window's centre, in window sides)."""
    # Objects never touch the frame's edge, so a window past it repeats the background.
    crop = F.grid_sample(fine, grid, padding_mode="border", align_corners=False)  # N 3 W W
    side = crop.shape[-1]
    middle = side // 2
    colour = crop[..., middle - 1 : middle + 1, middle - 1 : middle + 1].mean((2, 3))  # N 3
    away = colour - border
    along = ((crop - border[..., None, None]) * away[..., None, None]).sum(1)  # N W W
    norm2 = (away * away).sum(1).clamp_min(1e-3)[:, None, None]
    alpha = along / norm2
    mask = ((alpha - floor) / (1 - floor)).clamp(0, 1)
    # Pixels off the line from b to c are another object's (several objects in a clip): none.
    off = crop - border[..., None, None] - alpha[:, None] * away[..., None, None]
    mask = mask * ((off * off).sum(1) < OFF_LINE**2 * norm2)
    if connected:
        mask = connected_to_middle(mask)
    coords = (torch.arange(side, device=crop.device, dtype=crop.dtype) + 0.5) / side
    grid_x = coords.view(1, 1, side).expand(len(crop), side, side)
    grid_y = coords.view(1, side, 1).expand(len(crop), side, side)
    total = mask.sum((1, 2)).clamp_min(1e-4)
    offset = torch.stack(
        [(mask * grid_x).sum((1, 2)) / total, (mask * grid_y).sum((1, 2)) / total], -1
    )
    # The object's colour: the mean of the pixels it fully covers (the middle's if none are).
    core = (mask > 0.9).to(crop.dtype)
    count = core.sum((1, 2))
    tint = (crop * core[:, None]).sum((2, 3)) / count.clamp_min(1)[:, None]
    tint = torch.where(count[:, None] > 0, tint, colour)
    return {
        "mask": mask,
        "colour": tint,
        "area": mask.mean((1, 2)),
        "moments": _moments(mask, grid_x, grid_y),
        "offset": offset - 0.5,
    }


def candidate_peaks(
    pixels: torch.Tensor, border: torch.Tensor, count: int, radius: int, threshold: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Up to `count` places in each frame that look like an object's centre, one per object. No
    parameters. Pixels unlike the background (by over `threshold`) are marked and the marks
    blurred (a Gaussian of 2 pixels: a convex shape's blur peaks inside it, near its centre; marks,
    not contrast, so a vivid object's halo does not outrank a dull object). The best marked
    pixel is taken, then the pixels of that object are dropped: a box of `radius` pixels, and
    within twice that the blends of its colour over the background. pixels [N, 3, S, S] in
    [0, 1], border [N, 3] -> centres [N, M, 2] (fractions), colours [N, M, 3] (the pixel at each
    peak) and valid [N, M]."""
    side = pixels.shape[-1]
    away = pixels - border[..., None, None]  # N 3 S S
    marked = (away.abs().mean(1, keepdim=True) > threshold).to(pixels.dtype)  # N 1 S S
    taps = torch.arange(-4, 5, device=pixels.device, dtype=pixels.dtype)
    kernel = (-(taps**2) / 8).exp()
    kernel = kernel / kernel.sum()
    blurred = F.conv2d(marked, kernel.view(1, 1, 1, 9), padding=(0, 4))
    blurred = F.conv2d(blurred, kernel.view(1, 1, 9, 1), padding=(4, 0))
    score = (blurred * marked).flatten(1)  # N S*S
    flat = away.flatten(2)  # N 3 S*S
    cells = torch.arange(side * side, device=pixels.device)
    xs, ys = cells % side, cells // side
    picks, values = [], []
    for _ in range(count):
        value, index = score.max(1)
        picks.append(index)
        values.append(value)
        step = torch.maximum((xs[None] - xs[index, None]).abs(), (ys[None] - ys[index, None]).abs())
        tone = flat.gather(2, index[:, None, None].expand(-1, 3, 1))  # N 3 1
        norm2 = (tone * tone).sum(1).clamp_min(1e-3)  # N 1
        alpha = (flat * tone).sum(1) / norm2  # N S*S
        off = ((flat - alpha[:, None] * tone) ** 2).sum(1)
        blend = (alpha > 0.1) & (off < 0.09 * norm2)
        score = score.masked_fill((step <= radius) | (blend & (step <= 2 * radius)), -1.0)
    index = torch.stack(picks, 1)  # N M
    centres = torch.stack([xs[index], ys[index]], -1).to(pixels.dtype).add(0.5) / side
    colours = pixels.flatten(2).gather(2, index[:, None].expand(-1, 3, -1)).transpose(1, 2)
    return centres, colours, torch.stack(values, 1) > 0


MOMENT_LOW = (0.0, 0.0, -0.1, -2.0, 0.0)
MOMENT_HIGH = (0.5, 0.5, 0.1, 2.0, 3.0)
"""Bounds of the moments the heads read: well beyond any lone shape's (second moments over area
0.08 to 0.10, skew -0.55 to 0, cross <= 1), so an empty or cluttered window (a clip with several
objects) cannot swing the heads' batch statistics, which are taken over a few clips."""


def bounded_moments(moments: torch.Tensor) -> torch.Tensor:
    """moments [..., 5] clamped to [MOMENT_LOW, MOMENT_HIGH]."""
    low = torch.tensor(MOMENT_LOW, device=moments.device, dtype=moments.dtype)
    high = torch.tensor(MOMENT_HIGH, device=moments.device, dtype=moments.dtype)
    return torch.maximum(torch.minimum(moments, high), low)


HINT_WEIGHT = 10.0
"""What a candidate gains per attribute of the hint it matches (`WorldCaptionerNet._centres`):
more than any coverage difference (log areas differ by under 3), so a match outranks size."""


HEAD_INPUTS: dict[str, tuple[str, ...]] = {
    "colour": ("rgb", "border"),
    "background": ("border",),
    "size": ("fine_area", "fine_corners"),
    "shape": ("fine_moments", "fine_moments_mean"),
    "motion": ("slope", "per_step", "fine_area_slope", "fine_change"),
    "speed": ("speed_norm",),
}
"""What each head reads: few inputs per head, so a hundred labelled clips are enough to fit it."""


class WorldCaptionerNet(nn.Module):
    """K frames of a clip -> logits per attribute and the object's start position."""

    def __init__(self, config: WorldCaptionerConfig | None = None) -> None:
        super().__init__()
        self.config = config or WorldCaptionerConfig()
        self.frames = FrameEncoder(self.config)
        widths = {"rgb": 3, "border": 3, "slope": 2, "per_step": 2, "speed_norm": 1}
        widths.update(fine_area=1, fine_area_slope=1, fine_moments=5, fine_moments_mean=5)
        widths.update(fine_change=5, fine_corners=2)
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
        self,
        pixels: torch.Tensor,
        fine: torch.Tensor,
        progress: torch.Tensor,
        aux: torch.Tensor,
        hint: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """pixels [B, K, 3, S, S] in [0, 1]; fine [B, K, 3, F, F] uint8 (the same frames, less
        shrunk); progress [B, K] (frame index / (T - 1), 0 for images); aux [B, 3] (width /
        height, frames T - 1 between the first and last, is_image); hint [B, 2] (the colour and
        shape class the sample's alt-text names, -1 where it names none; used by a trained
        network to choose the object, `_centres`). Returns logits [B, n] per
        HEADS name, "position" [B, 2] (start centre, fractions; refined by the crop), "track"
        [B, K, 2] (the attention's centre in every frame), "occupancy" [B, K, S, S] (mask logits),
        "fine_mask" [B, K, W, W] (the crops' coverage) and "inputs/NAME" [B, width] (what each
        head read)."""
        batch, count = pixels.shape[:2]
        per_frame = self.frames(pixels.flatten(0, 1))  # B*K ...
        fine_pixels = fine.flatten(0, 1).float() / 255
        aspect = aux[:, 0].repeat_interleave(count)
        centre = self._centres(
            per_frame, pixels.flatten(0, 1), fine_pixels, (batch, count), aspect, hint
        )
        grid, spans = crop_window(centre, aspect, self.config)
        crops = crop_occupancy(
            fine_pixels, grid, per_frame["border"], self.config.floor, self.config.connected
        )
        per_frame["fine_centroid"] = centre + crops["offset"] * spans
        per_frame.update({f"fine_{k}": v for k, v in crops.items() if k != "offset"})
        per_frame = {k: v.view(batch, count, *v.shape[1:]) for k, v in per_frame.items()}
        summary = self._summarise(per_frame, progress, aux)  # name -> B width
        inputs = {name: torch.cat([summary[k] for k in HEAD_INPUTS[name]], -1) for name in HEADS}
        logits = {name: head(inputs[name]) for name, head in self.heads.items()}
        logits.update({f"inputs/{name}": value for name, value in inputs.items()})
        logits["position"] = per_frame["fine_centroid"][:, 0]  # B 2: the first frame is frame 0
        logits["track"] = per_frame["centroid"]  # B K 2
        logits["occupancy"] = per_frame["occupancy_logit"]  # B K S S
        logits["fine_mask"] = per_frame["fine_mask"]  # B K W W
        return logits

    def _centres(
        self,
        per_frame: dict[str, torch.Tensor],
        pixels: torch.Tensor,
        fine: torch.Tensor,
        sizes: tuple[int, int],
        aspect: torch.Tensor,
        hint: torch.Tensor | None,
    ) -> torch.Tensor:
        """Where the main object is in each frame [B*K, 2]. Why: with several objects the
        attention often lands on another one. The main object is the largest, so in the first
        frame each candidate (the attention's centre and the peaks of `candidate_peaks`) gets a
        native-scale window, and the one whose coverage is largest is kept (a triangle's area
        counted 1.7 times: it covers 0.58 of a disc of the same size). With a hint, candidates
        whose colour and shape the heads read as the hint's come first (`_hint_matches`): two
        objects of one size look alike in size, and the alt-text names the main one. Later frames
        keep the candidate nearest the previous centre in place and colour. No parameters."""
        config = self.config
        batch, count = sizes
        peaks, colours, valid = candidate_peaks(
            pixels, per_frame["border"], config.candidates, config.suppress, config.contrast
        )
        peaks = torch.cat([per_frame["centroid"].detach()[:, None], peaks], 1)  # N M 2
        colours = torch.cat([per_frame["rgb"].detach()[:, None], colours], 1)  # N M 3
        valid = torch.cat([torch.ones_like(valid[:, :1]), valid], 1)  # N M
        width = peaks.shape[1]
        peaks = peaks.view(batch, count, width, 2)
        colours = colours.view(batch, count, width, 3)
        valid = valid.view(batch, count, width)
        first = torch.arange(batch, device=pixels.device) * count
        border = per_frame["border"][first].repeat_interleave(width, 0)  # B*M 3
        starts = peaks[:, 0].flatten(0, 1)  # B*M 2
        grid, spans = crop_window(starts, aspect[first].repeat_interleave(width), config)
        crops = crop_occupancy(
            fine[first].repeat_interleave(width, 0), grid, border, config.floor, config.connected
        )
        distinct = (crops["colour"] - border).abs().mean(-1) > config.contrast
        triangle = crops["moments"][:, 3] < -0.25
        score = crops["area"].clamp_min(1e-4).log() + triangle * math.log(1.7)
        if hint is not None:
            score = score + HINT_WEIGHT * self._hint_matches(crops, border, hint, width)
        keep = valid[:, 0] & distinct.view(batch, width)
        best = score.view(batch, width).masked_fill(~keep, -math.inf).argmax(1)
        rows = torch.arange(batch, device=pixels.device)
        chosen = [(starts + crops["offset"] * spans).view(batch, width, 2)[rows, best]]
        colour = crops["colour"].view(batch, width, 3)[rows, best]
        for k in range(1, count):
            cost = (peaks[:, k] - chosen[-1][:, None]).abs().sum(-1)
            cost = cost + (colours[:, k] - colour[:, None]).abs().sum(-1)
            pick = cost.masked_fill(~valid[:, k], math.inf).argmin(1)
            # Centre the window on the picked object's centre of mass (a peak is whole pixels).
            start, frame = peaks[rows, k, pick], first + k
            grid, spans = crop_window(start, aspect[frame], config)
            crop = crop_occupancy(
                fine[frame], grid, per_frame["border"][frame], config.floor, config.connected
            )
            chosen.append(start + crop["offset"] * spans)
        return torch.stack(chosen, 1).flatten(0, 1)

    def _hint_matches(
        self, crops: dict[str, torch.Tensor], border: torch.Tensor, hint: torch.Tensor, width: int
    ) -> torch.Tensor:
        """How many of the hint's attributes [B*M] each first-frame candidate's window shows:
        its colour and its shape as the trained heads read them from that window alone (its
        colour, and its first-frame moments standing in for their mean over frames), fed in the
        order `HEAD_INPUTS` gives."""
        moments = bounded_moments(crops["moments"])
        features = {"rgb": crops["colour"], "border": border}
        features.update(fine_moments=moments, fine_moments_mean=moments)
        wanted = hint.repeat_interleave(width, 0)  # B*M 2
        matches = torch.zeros(len(wanted), device=wanted.device)
        for column, name in enumerate(("colour", "shape")):
            inputs = torch.cat([features[k] for k in HEAD_INPUTS[name]], -1)
            matches += (self.heads[name](inputs).argmax(-1) == wanted[:, column]).float()
        return matches

    @staticmethod
    def _summarise(
        per_frame: dict[str, torch.Tensor], progress: torch.Tensor, aux: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Per-clip inputs of the heads: colours, the crop's area and moments, and the slopes of
        centre and log area over clip progress (least squares: any frame count and spacing reads
        the same)."""
        centroid = per_frame["fine_centroid"]  # B K 2
        # Bounded, as the moments (`bounded_moments`): a cluttered window must not swing them.
        fine_log_area = per_frame["fine_area"].clamp_min(0.01).log()  # B K
        moments = bounded_moments(per_frame["fine_moments"])  # B K 5
        centred = progress - progress.mean(1, keepdim=True)  # B K
        spread = (centred * centred).sum(1).clamp_min(1e-6)  # B
        slope_xy = (centred.unsqueeze(-1) * centroid).sum(1) / spread.unsqueeze(-1)  # B 2
        fine_slope_area = (centred * fine_log_area).sum(1) / spread  # B
        aspect, span = aux[:, 0], aux[:, 1].clamp_min(1.0)
        per_step = torch.stack([slope_xy[:, 0], slope_xy[:, 1] / aspect], -1) / span.unsqueeze(-1)
        return {
            "rgb": per_frame["fine_colour"].mean(1),
            "border": per_frame["border"][:, 0],
            "slope": 5 * slope_xy,
            "per_step": 50 * per_step,
            "speed_norm": 50 * per_step.norm(dim=-1, keepdim=True),
            # The first frame is the object at its named size and unturned.
            "fine_area": fine_log_area[:, :1],
            "fine_area_slope": fine_slope_area.unsqueeze(-1),
            "fine_moments": moments[:, 0],
            # What sets the area of a shape of a given size: a triangle's skew, a square's corners.
            "fine_corners": moments[:, 0, 3:],
            "fine_moments_mean": moments.mean(1),
            # Turning changes a square's corners and a triangle's skew, not its area.
            "fine_change": (moments - moments[:, :1]).abs().amax(1),
        }
