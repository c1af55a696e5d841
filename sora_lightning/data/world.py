"""The embedded world: a seeded generator of captioned clips of coloured shapes.

Why: the whole text-to-video pipeline (VAE, DiT, text encoder, curriculum, sampling) must train
and be *checked* with no downloads. Every clip here has a known ground truth (colour, shape,
motion), so prompt adherence is measurable by a detector (`sora_lightning.eval.detector`), and a
fixed set of held-out (colour, shape, motion) triples, never shown in training, measures
compositional generalisation.

numpy only. Frames are uint8 [T, H, W, 3]. Pixel geometry: an object's "radius" r is
SIZES[size] * min(H, W); circles have radius r, squares half-side 0.9 r, triangles are
equilateral with circumradius 1.2 r, centred on their centroid (so scaling never moves it).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 200, 50),
    "blue": (40, 80, 255),
    "yellow": (245, 230, 30),
    "magenta": (225, 40, 225),
    "cyan": (30, 225, 235),
    "orange": (255, 140, 0),
    "white": (250, 250, 250),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "gray": (112, 112, 112),
    "navy": (10, 10, 60),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: dict[str, float] = {"small": 0.12, "medium": 0.17, "large": 0.23}
MOTIONS: tuple[str, ...] = ("left", "right", "up", "down", "still", "grow", "shrink", "rotate")
EVAL_MOTIONS: tuple[str, ...] = tuple(m for m in MOTIONS if m != "rotate")
SPEEDS: dict[str, float] = {"slow": 0.01, "fast": 0.02}
RESOLUTIONS: dict[str, tuple[int, int]] = {
    "landscape": (64, 48),
    "wide": (72, 40),
    "portrait": (48, 64),
    "square": (56, 56),
}
FPS = 8
CLIP_LENGTHS: tuple[int, ...] = (1, 5, 9, 17, 33)

# Hard-coded so it never changes between runs: 2 per colour, every shape and eval motion >= 2x.
HELD_OUT: frozenset[tuple[str, str, str]] = frozenset(
    {
        ("red", "circle", "left"),
        ("red", "triangle", "grow"),
        ("green", "square", "right"),
        ("green", "circle", "shrink"),
        ("blue", "triangle", "up"),
        ("blue", "square", "still"),
        ("yellow", "circle", "down"),
        ("yellow", "square", "left"),
        ("magenta", "square", "grow"),
        ("magenta", "triangle", "right"),
        ("cyan", "triangle", "shrink"),
        ("cyan", "circle", "up"),
        ("orange", "circle", "still"),
        ("orange", "triangle", "down"),
        ("white", "square", "shrink"),
        ("white", "circle", "right"),
    }
)

GROW_SCALE = 1.6
"""Radius multiplier reached at the last frame of a "grow" clip."""
SHRINK_SCALE = 0.55
"""Radius multiplier reached at the last frame of a "shrink" clip."""
ROTATE_DEGREES = 90.0
"""Total turn of a "rotate" clip (squares and triangles only)."""

_SPLITS = ("train", "heldout", "all")
_DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
_SQUARE_HALF = 0.9
_TRIANGLE_CIRCUM = 1.2
# Half-extent of each shape in units of r: axis-aligned, and while rotating (circumradius).
_EXTENT = {"circle": 1.0, "square": _SQUARE_HALF, "triangle": _TRIANGLE_CIRCUM}
_CIRCUMRADIUS = {
    "circle": 1.0,
    "square": _SQUARE_HALF * math.sqrt(2.0),
    "triangle": _TRIANGLE_CIRCUM,
}
_NUM_OBJECT_WEIGHTS = (0.6, 0.25, 0.15)
_DEFAULT_BACKGROUND = "black"
_DEFAULT_RESOLUTION = "landscape"
_DEFAULT_NUM_FRAMES = 17


@dataclass(frozen=True)
class ObjectSpec:
    """One object of a scene; everything needed to render and to caption it."""

    shape: str
    """One of SHAPES."""
    colour: str
    """A key of COLOURS."""
    size: str
    """A key of SIZES."""
    motion: str
    """One of MOTIONS (still rendered as the first frame only for images)."""
    speed: str
    """A key of SPEEDS; only translations use it."""
    x0: float
    """Start centre, fraction of the frame width."""
    y0: float
    """Start centre, fraction of the frame height."""
    speed_scale: float = 1.0
    """Multiplier on SPEEDS: a world configuration may move objects further per frame (the CPU
    demo does, so that motion is a larger part of each clip); captions still say slowly/quickly."""

    def __post_init__(self) -> None:
        checks = [
            (self.shape, SHAPES, "shape"),
            (self.colour, COLOURS, "colour"),
            (self.size, SIZES, "size"),
            (self.motion, MOTIONS, "motion"),
            (self.speed, SPEEDS, "speed"),
        ]
        for value, allowed, name in checks:
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not one of {sorted(allowed)}")
        if self.shape == "circle" and self.motion == "rotate":
            raise ValueError("a rotating circle looks still: circle+rotate is not allowed")
        if not self.speed_scale > 0:
            raise ValueError(f"speed_scale must be > 0, got {self.speed_scale}")

    def to_dict(self) -> dict:
        """JSON-able form (stored in shard records)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ObjectSpec:
        """Inverse of `to_dict` (records written before `speed_scale` existed have scale 1)."""
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


@dataclass(frozen=True)
class Scene:
    """A whole clip: objects (drawn in order, later on top) over a flat background."""

    objects: tuple[ObjectSpec, ...]
    """Objects in drawing order."""
    background: str
    """A key of BACKGROUNDS."""
    width: int
    """Frame width in pixels."""
    height: int
    """Frame height in pixels."""
    num_frames: int
    """Clip length T; 1 is an image."""
    fps: int = FPS
    """Frames per second the clip is meant to be played at."""

    def __post_init__(self) -> None:
        if self.background not in BACKGROUNDS:
            raise ValueError(f"background={self.background!r} is not one of {sorted(BACKGROUNDS)}")
        if self.width <= 0 or self.height <= 0 or self.num_frames <= 0 or self.fps <= 0:
            raise ValueError(
                f"width, height, num_frames and fps must be positive, got "
                f"{self.width}, {self.height}, {self.num_frames}, {self.fps}"
            )

    def to_dict(self) -> dict:
        """JSON-able form (stored in shard records)."""
        data = asdict(self)
        data["objects"] = [obj.to_dict() for obj in self.objects]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Scene:
        """Inverse of `to_dict`."""
        objects = tuple(ObjectSpec.from_dict(obj) for obj in data["objects"])
        fields = {k: data[k] for k in ("background", "width", "height", "num_frames")}
        return cls(objects=objects, fps=int(data.get("fps", FPS)), **fields)


# ----------------------------------------------------------------------------- trajectories


def _progress(num_frames: int) -> np.ndarray:
    """Clip progress in [0, 1] per frame (all zeros for an image)."""
    if num_frames == 1:
        return np.zeros(1)
    return np.arange(num_frames) / (num_frames - 1)


def _trajectory(obj: ObjectSpec, width: int, height: int, num_frames: int) -> tuple:
    """Per-frame centre x, y (pixels), radius scale and angle (radians) of one object."""
    frames = np.arange(num_frames, dtype=np.float64)
    progress = _progress(num_frames)
    step = SPEEDS[obj.speed] * obj.speed_scale * width
    dir_x, dir_y = _DIRECTIONS.get(obj.motion, (0, 0))
    centre_x = obj.x0 * width + dir_x * step * frames
    centre_y = obj.y0 * height + dir_y * step * frames
    end_scale = {"grow": GROW_SCALE, "shrink": SHRINK_SCALE}.get(obj.motion, 1.0)
    scale = 1.0 + (end_scale - 1.0) * progress
    turn = math.radians(ROTATE_DEGREES) if obj.motion == "rotate" else 0.0
    return centre_x, centre_y, scale, turn * progress


def _extent_px(shape: str, size: str, motion: str, width: int, height: int) -> float:
    """Largest half-extent (pixels) the object reaches during the clip."""
    base = _CIRCUMRADIUS[shape] if motion == "rotate" else _EXTENT[shape]
    max_scale = GROW_SCALE if motion == "grow" else 1.0
    return base * max_scale * SIZES[size] * min(width, height)


# ----------------------------------------------------------------------------- rendering


def _inside(shape: str, u: np.ndarray, v: np.ndarray, radius: np.ndarray) -> np.ndarray:
    """Boolean inside-test in object-local coordinates (y points down)."""
    if shape == "circle":
        return u * u + v * v <= radius * radius
    if shape == "square":
        half = _SQUARE_HALF * radius
        return np.maximum(np.abs(u), np.abs(v)) <= half
    # Equilateral triangle, apex up, centroid at origin: three edges at the inradius R/2.
    inradius = 0.5 * _TRIANGLE_CIRCUM * radius
    inside = v <= inradius
    for angle in (math.radians(210.0), math.radians(330.0)):
        inside = inside & (u * math.cos(angle) + v * math.sin(angle) <= inradius)
    return inside


def _coverage(obj: ObjectSpec, width: int, height: int, num_frames: int) -> np.ndarray:
    """Fractional coverage [T, H, W] of one object, from 2x2 supersampling."""
    centre_x, centre_y, scale, angle = _trajectory(obj, width, height, num_frames)
    radius = (SIZES[obj.size] * min(width, height) * scale).astype(np.float32)[:, None, None]
    cos_a = np.cos(angle).astype(np.float32)[:, None, None]
    sin_a = np.sin(angle).astype(np.float32)[:, None, None]
    total = np.zeros((num_frames, height, width), dtype=np.float32)
    for off_y in (0.25, 0.75):
        for off_x in (0.25, 0.75):
            # dx [T, 1, W] and dy [T, H, 1]: broadcasting keeps unrotated shapes cheap.
            dx = (np.arange(width, dtype=np.float32) + off_x)[None, None, :] - centre_x.astype(
                np.float32
            )[:, None, None]
            dy = (np.arange(height, dtype=np.float32) + off_y)[None, :, None] - centre_y.astype(
                np.float32
            )[:, None, None]
            if obj.motion == "rotate":  # rotate sample points by -angle into the object's frame
                dx, dy = cos_a * dx + sin_a * dy, -sin_a * dx + cos_a * dy
            total += _inside(obj.shape, dx, dy, radius)
    return total * 0.25


def render(scene: Scene) -> np.ndarray:
    """Render a scene to uint8 frames [T, H, W, 3] (anti-aliased, later objects on top)."""
    shape = (scene.num_frames, scene.height, scene.width, 3)
    canvas = np.empty(shape, dtype=np.float32)
    canvas[...] = np.asarray(BACKGROUNDS[scene.background], dtype=np.float32)
    for obj in scene.objects:
        alpha = _coverage(obj, scene.width, scene.height, scene.num_frames)
        covered = alpha > 0  # blend only where the object is: most pixels are background
        colour = np.asarray(COLOURS[obj.colour], dtype=np.float32)
        pixels = canvas[covered]
        canvas[covered] = pixels + alpha[covered][:, None] * (colour - pixels)
    canvas += 0.5  # blends of values in [0, 255] stay in range: round by truncation
    return canvas.astype(np.uint8)


# ----------------------------------------------------------------------------- sampling


def _fit_start(
    rng: np.random.Generator,
    extent: float,
    travel: float,
    length: int,
    spread: float | None = None,
) -> float | None:
    """Random start (pixels) so [start - extent, start + travel + extent] fits in [0, length];
    with `spread`, the path's midpoint also lies within spread * length of the frame's centre."""
    low = extent + max(0.0, -travel)
    high = length - extent - max(0.0, travel)
    if spread is not None:
        centred = length / 2 - travel / 2
        low, high = max(low, centred - spread * length), min(high, centred + spread * length)
    if high < low:
        return None
    return float(rng.uniform(low, high))


def _overlaps(a: ObjectSpec, b: ObjectSpec, width: int, height: int, num_frames: int) -> bool:
    """True if two objects' circumscribed circles overlap by over 10% at any frame."""
    ax, ay, a_scale, _ = _trajectory(a, width, height, num_frames)
    bx, by, b_scale, _ = _trajectory(b, width, height, num_frames)
    unit = min(width, height)
    reach_a = _CIRCUMRADIUS[a.shape] * SIZES[a.size] * unit * a_scale
    reach_b = _CIRCUMRADIUS[b.shape] * SIZES[b.size] * unit * b_scale
    return bool(np.any(np.hypot(ax - bx, ay - by) < 0.9 * (reach_a + reach_b)))


def _allowed_triple(colour: str, shape: str, motion: str, split: str) -> bool:
    """Whether a (colour, shape, motion) triple may be sampled for this split."""
    if shape == "circle" and motion == "rotate":
        return False
    if split == "train":
        return (colour, shape, motion) not in HELD_OUT
    if split == "heldout":
        return (colour, shape, motion) in HELD_OUT
    return True


def _place(
    rng: np.random.Generator,
    attrs: tuple[str, str, str, str, str],
    size_res: tuple[int, int, int],
    speed_scale: float = 1.0,
    path_spread: float | None = None,
) -> ObjectSpec | None:
    """Place an object so it stays inside the frame (and, with `path_spread`, a clip's translating
    object's path near the centre); downgrade speed, then size, if needed."""
    colour, shape, motion, size, speed = attrs
    width, height, num_frames = size_res
    spread = path_spread if motion in _DIRECTIONS and num_frames > 1 else None
    sizes = list(SIZES)[: list(SIZES).index(size) + 1][::-1]
    speeds = [speed] if speed == "slow" else [speed, "slow"]
    dir_x, dir_y = _DIRECTIONS.get(motion, (0, 0))
    for size_name in sizes:
        extent = _extent_px(shape, size_name, motion, width, height)
        for speed_name in speeds:
            travel = SPEEDS[speed_name] * speed_scale * width * (num_frames - 1)
            start_x = _fit_start(rng, extent, dir_x * travel, width, spread)
            start_y = _fit_start(rng, extent, dir_y * travel, height, spread)
            if start_x is not None and start_y is not None:
                start = (start_x / width, start_y / height)
                return ObjectSpec(shape, colour, size_name, motion, speed_name, *start, speed_scale)
    return None


def _sample_object(
    rng: np.random.Generator,
    size_res: tuple[int, int, int],
    split: str,
    motions: tuple[str, ...],
    speed_scale: float = 1.0,
    path_spread: float | None = None,
) -> ObjectSpec | None:
    """Draw random attributes (respecting the split) and place the object; None if it never fits."""
    for _ in range(100):
        colour = str(rng.choice(list(COLOURS)))
        shape = str(rng.choice(SHAPES))
        motion = str(rng.choice(motions))
        if not _allowed_triple(colour, shape, motion, split):
            continue
        attrs = (colour, shape, motion, str(rng.choice(list(SIZES))), str(rng.choice(list(SPEEDS))))
        obj = _place(rng, attrs, size_res, speed_scale, path_spread)
        if obj is not None:
            return obj
    return None


def check_path_spread(path_spread: float | None) -> None:
    """`sample_scene`'s path_spread must be None or in (0, 0.5] (0.5: the whole frame)."""
    if path_spread is None:
        return
    number = isinstance(path_spread, int | float) and not isinstance(path_spread, bool)
    if not number or not 0.0 < path_spread <= 0.5:
        raise ValueError(f"path_spread must be null or in (0, 0.5], got {path_spread!r}")


def sample_scene(
    rng: np.random.Generator,
    *,
    num_frames: int,
    resolution: str | None = None,
    max_objects: int = 3,
    split: str = "train",
    motions: tuple[str, ...] = MOTIONS,
    speed_scale: float = 1.0,
    path_spread: float | None = None,
) -> Scene:
    """Sample a random scene: 1-3 non-overlapping objects that stay fully inside the frame.

    split: "train" never yields a HELD_OUT triple, "heldout" yields only HELD_OUT triples (for
    eval-like clips), "all" has no restriction. `motions` restricts the motion vocabulary (the
    detector's truth check uses EVAL_MOTIONS). resolution: a RESOLUTIONS key, or None for random.
    speed_scale multiplies every object's speed (see `ObjectSpec.speed_scale`).
    path_spread (None: anywhere it fits): in clips, each translating object's path midpoint lies
    within path_spread x (width, height) of the frame's centre; other objects and images as before. Why: where a clip may start anywhere, its
    start words ("on the left") predict the direction and its start hides the motion; the motion
    probe learns direction words in 3,000 clips only with paths near the centre
    (docs/demo-motion-2026-12-07.md).
    """
    check_path_spread(path_spread)
    if split not in _SPLITS:
        raise ValueError(f"split={split!r} is not one of {_SPLITS}")
    if not 1 <= max_objects <= 3:
        raise ValueError(f"max_objects must be in 1..3, got {max_objects}")
    if resolution is None:
        resolution = str(rng.choice(list(RESOLUTIONS)))
    if resolution not in RESOLUTIONS:
        raise ValueError(f"resolution={resolution!r} is not one of {sorted(RESOLUTIONS)}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    width, height = RESOLUTIONS[resolution]
    weights = np.asarray(_NUM_OBJECT_WEIGHTS[:max_objects])
    num_objects = 1 + int(rng.choice(max_objects, p=weights / weights.sum()))
    objects: list[ObjectSpec] = []
    for _ in range(8 * num_objects):
        if len(objects) == num_objects:
            break
        obj = _sample_object(
            rng, (width, height, num_frames), split, tuple(motions), speed_scale, path_spread
        )
        if obj is None:
            continue
        if not any(_overlaps(obj, other, width, height, num_frames) for other in objects):
            objects.append(obj)
    if not objects:
        raise RuntimeError(f"could not place any object in a {width}x{height} frame")
    background = str(rng.choice(list(BACKGROUNDS)))
    return Scene(tuple(objects), background, width, height, num_frames, FPS)


# ----------------------------------------------------------------------------- captions

_SHORT_MOTION = {
    "left": "moves left",
    "right": "moves right",
    "up": "moves up",
    "down": "moves down",
    "still": "stays still",
    "grow": "grows",
    "shrink": "shrinks",
    "rotate": "rotates",
}
_DIRECTION_WORDS = {
    "left": "to the left",
    "right": "to the right",
    "up": "upwards",
    "down": "downwards",
}
_SPEED_WORDS = {"slow": "slowly", "fast": "quickly"}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _object_phrase(colour: str, shape: str, motion: str | None) -> str:
    """Short-prompt phrase for one object; motion None for images."""
    phrase = f"{_article(colour)} {colour} {shape}"
    return phrase if motion is None else f"{phrase} {_SHORT_MOTION[motion]}"


def short_prompt(scene: Scene) -> str:
    """The terse prompt a user would type, e.g. "a red circle moves left" (no motion for images)."""
    image = scene.num_frames == 1
    phrases = [
        _object_phrase(obj.colour, obj.shape, None if image else obj.motion)
        for obj in scene.objects
    ]
    return " and ".join(phrases)


def _position_words(x0: float, y0: float) -> str:
    """Start position in words from a 3x3 grid."""
    column = "left" if x0 < 1 / 3 else "right" if x0 > 2 / 3 else ""
    row = "top" if y0 < 1 / 3 else "bottom" if y0 > 2 / 3 else ""
    if row and column:
        return f"near the {row} {column}"
    if row:
        return f"near the {row}"
    if column:
        return f"on the {column}"
    return "in the centre"


def position_words(x0: float, y0: float) -> str:
    """The words a detailed caption uses for a start position (x0, y0 fractions of the frame)."""
    return _position_words(x0, y0)


def _detailed_motion(obj: ObjectSpec) -> str:
    if obj.motion in _DIRECTIONS:
        return f"moves {_SPEED_WORDS[obj.speed]} {_DIRECTION_WORDS[obj.motion]}"
    return _SHORT_MOTION[obj.motion]


def detailed_caption(scene: Scene) -> str:
    """What a descriptive captioner would write: medium, sizes, colours, shapes, start positions,
    motions with speed, background. Deterministic; training captions and expanded prompts use it.
    """
    image = scene.num_frames == 1
    parts = []
    for obj in scene.objects:
        where = _position_words(obj.x0, obj.y0)
        text = f"{_article(obj.size)} {obj.size} {obj.colour} {obj.shape} {where}"
        parts.append(text if image else f"{text} that {_detailed_motion(obj)}")
    medium = "An image" if image else "A video"
    return f"{medium} of {', and '.join(parts)}, on {_article(scene.background)} {scene.background} background."


def main_object(scene: Scene) -> ObjectSpec:
    """The scene's most prominent object: the largest base size, the first drawn on a tie.

    Why: terse web alt-text names one subject, and the world captioner (data/captioners/world.py)
    describes that same object in clips with several.
    """
    order = list(SIZES)
    return max(scene.objects, key=lambda obj: order.index(obj.size))


def alt_text(scene: Scene) -> str:
    """Terse alt-text as web data carries it, e.g. "red circle clip": the main object's colour
    and shape and the medium, nothing on motion, size, place, background or other objects."""
    obj = main_object(scene)
    return f"{obj.colour} {obj.shape} {'image' if scene.num_frames == 1 else 'clip'}"


# ----------------------------------------------------------------------------- prompt parsing

_SYNONYMS = {
    "grey": "gray",
    "purple": "magenta",
    "pink": "magenta",
    "big": "large",
    "tiny": "small",
    "little": "small",
    "ball": "circle",
    "disc": "circle",
    "disk": "circle",
    "dot": "circle",
    "box": "square",
    "block": "square",
}
_MOTION_PATTERNS = [
    ("rotate", r"\b(rotat\w*|spin\w*|turn\w*)\b"),
    ("grow", r"\b(grow\w*|expand\w*|gets? (bigger|larger))\b"),
    ("shrink", r"\b(shrink\w*|shrank|contract\w*|gets? smaller)\b"),
    ("left", r"\bleft\w*\b"),
    ("right", r"\bright\w*\b"),
    ("up", r"\b(up|upwards?|rises?|rising)\b"),
    ("down", r"\b(down|downwards?|falls?|falling|drops?)\b"),
    ("still", r"\b(still|static|stationary|motionless|stays?|does not move|not moving)\b"),
]
_POSITION_RE = re.compile(
    r"\b(?:near|in|on|at) the (top|bottom|middle)?\s*(left|right|centre|center)?\b"
)
_BACKGROUND_RE = re.compile(r"\b(?:on|over|against) an? (\w+) background\b")
_WORD_TO_X = {"left": 0.2, "right": 0.8, "centre": 0.5, "center": 0.5, None: 0.5}
_WORD_TO_Y = {"top": 0.2, "bottom": 0.8, "middle": 0.5, None: 0.5}


def _normalise(prompt: str) -> str:
    words = re.sub(r"[^a-z ]+", " ", prompt.lower()).split()
    return " ".join(_SYNONYMS.get(word, word) for word in words)


def _parse_object(chunk: str) -> dict | None:
    """One object's attributes from a phrase; None if it names no colour and shape."""
    words = chunk.split()
    colour = next((w for w in words if w in COLOURS), None)
    shape = next((w for w in words if w in SHAPES), None)
    if colour is None or shape is None:
        return None
    obj: dict = {"colour": colour, "shape": shape, "motion": None, "size": None, "speed": None}
    obj["size"] = next((w for w in words if w in SIZES), None)
    if re.search(r"\b(quick\w*|fast\w*|rapid\w*)\b", chunk):
        obj["speed"] = "fast"
    elif re.search(r"\b(slow\w*|gentl\w*)\b", chunk):
        obj["speed"] = "slow"
    obj["x0"] = obj["y0"] = None
    positions = (m for m in _POSITION_RE.finditer(chunk) if m.group(1) or m.group(2))
    position = next(positions, None)
    if position is not None:
        obj["x0"] = _WORD_TO_X[position.group(2)]
        obj["y0"] = _WORD_TO_Y[position.group(1)]
        chunk = chunk[: position.start()] + chunk[position.end() :]
    motion_text = chunk.split(shape, 1)[1]
    matches = (m for m, pattern in _MOTION_PATTERNS if re.search(pattern, motion_text))
    obj["motion"] = next(matches, None)
    return obj


def _parse(prompt: str) -> tuple[list[dict], str | None] | None:
    """(objects, background) or None; see `parse_prompt`."""
    text = _normalise(prompt)
    background = None
    match = _BACKGROUND_RE.search(text)
    if match is not None:
        if match.group(1) not in BACKGROUNDS:
            return None
        background = match.group(1)
        text = text[: match.start()] + text[match.end() :]
    text = re.sub(r"^(a|an|the) (video|image|clip|picture|photo) of ", "", text.strip())
    objects = [_parse_object(chunk) for chunk in re.split(r"\band\b|\bwhile\b", text)]
    if not objects or any(obj is None for obj in objects):
        return None
    return objects, background


def parse_prompt(prompt: str) -> list[dict] | None:
    """Parse a short prompt ("a red circle moves left and a blue square grows") into objects.

    Each dict has colour, shape, motion, size, speed, x0, y0; attributes the prompt leaves out are
    None (motion None means "not said": images, or "a red circle"). Case-insensitive and tolerant
    of articles, verb forms ("moving left", "goes up", "growing", "is still") and a few synonyms.
    Returns None if any "and"-separated part names no known colour and shape.
    """
    parsed = _parse(prompt)
    return None if parsed is None else parsed[0]


def _spread_starts(objects: list[dict]) -> list[tuple[float, float]]:
    """Default starts: centred, several objects spread left to right."""
    count = len(objects)
    starts = []
    for index, obj in enumerate(objects):
        x_default = (2 * index + 1) / (2 * count)
        x0 = obj["x0"] if obj["x0"] is not None else x_default
        starts.append((x0, obj["y0"] if obj["y0"] is not None else 0.5))
    return starts


def scene_from_prompt(prompt: str, *, width: int, height: int, num_frames: int) -> Scene | None:
    """The default scene a prompt describes (None if it cannot be parsed).

    Unsaid attributes take defaults: medium size, slow speed, "still" motion, centred start
    (several objects spread left to right), black background. Starts are taken as said, so a
    fast object near an edge may leave the frame; callers wanting strict fit should check.
    """
    parsed = _parse(prompt)
    if parsed is None:
        return None
    objects, background = parsed
    specs = []
    for obj, (x0, y0) in zip(objects, _spread_starts(objects), strict=True):
        motion = obj["motion"] or "still"
        if obj["shape"] == "circle" and motion == "rotate":
            motion = "still"  # a turning circle looks still; keep the scene valid
        size, speed = obj["size"] or "medium", obj["speed"] or "slow"
        specs.append(ObjectSpec(obj["shape"], obj["colour"], size, motion, speed, x0, y0))
    return Scene(tuple(specs), background or _DEFAULT_BACKGROUND, width, height, num_frames, FPS)


def expand_prompt(prompt: str, *, num_frames: int = _DEFAULT_NUM_FRAMES) -> str:
    """Prompt expansion: the detailed caption of the prompt's default scene.

    Why: the DiT is trained on detailed captions, so a terse user prompt is rewritten into the
    same form. num_frames=1 gives "An image of ...". A prompt that cannot be parsed is returned
    unchanged (it is passed to the text encoder as is).
    """
    width, height = RESOLUTIONS[_DEFAULT_RESOLUTION]
    scene = scene_from_prompt(prompt, width=width, height=height, num_frames=num_frames)
    return prompt if scene is None else detailed_caption(scene)


def eval_prompts() -> list[str]:
    """One short prompt per HELD_OUT triple, sorted (the adherence benchmark)."""
    return sorted(_object_phrase(c, s, m) for c, s, m in HELD_OUT)


def seen_prompts(per_motion: int = 2) -> list[str]:
    """`per_motion` short prompts per eval motion whose triple is in the training split, sorted.

    Why: scored next to `eval_prompts()`, they tell a model that has not learned an attribute
    (wrong on both) from one that has not generalised it (right only on seen triples).
    Fixed: colour-shape pairs are taken in order, from a different offset for each motion.
    """
    pairs = [(colour, shape) for colour in COLOURS for shape in SHAPES]
    prompts = []
    for index, motion in enumerate(EVAL_MOTIONS):
        offset = index * len(pairs) // len(EVAL_MOTIONS)
        rotated = pairs[offset:] + pairs[:offset]
        allowed = [(c, s) for c, s in rotated if _allowed_triple(c, s, motion, "train")]
        prompts += [_object_phrase(c, s, motion) for c, s in allowed[:per_motion]]
    return sorted(prompts)
