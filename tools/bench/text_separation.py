"""How far apart does a text encoder put captions that differ in one word? Prints JSON per layer.

    python tools/bench/text_separation.py                 # the bundled MiniLM, every layer
    python tools/bench/text_separation.py --path DIR      # any local Hugging Face encoder

Why: the DiT can only follow a word the text states carry. A sentence encoder is trained to map
paraphrases together, and "moves to the left" and "moves to the right" are near-paraphrases to it;
if its states barely separate them, the DiT has to amplify a tiny difference before it can learn
motion. This measures that difference for every hidden layer, so the layers fed to the DiT
(`model.text.layers`) are chosen on evidence.

Captions are the world's detailed captions (`world.detailed_caption`) of one object; each pair
differs in one attribute only (motion direction, colour or shape), over every colour, shape and
start position. For each layer it reports, relative to the state norms:
- `pooled`: distance of the mean-pooled states (what the DiT's pooled-caption path sees);
- `token`: the largest per-token distance (what cross-attention can pick out), for pairs whose
  captions have the same token count (null otherwise: the tokens do not line up).
`motion_vs_colour` is the direction pairs' pooled distance over the colour pairs'.
"""

from __future__ import annotations

import argparse
import itertools
import json
from typing import Any

import torch

from sora_lightning.data import world
from sora_lightning.models.text import TextEncoder, TextEncoderConfig

PAIRS = {
    "left/right": ("motion", "left", "right"),
    "up/down": ("motion", "up", "down"),
    "still/left": ("motion", "still", "left"),
    "colour": ("colour", "red", "blue"),
    "shape": ("shape", "circle", "square"),
}
"""Pair name -> (attribute, value a, value b): captions identical but for that attribute."""


def caption(colour: str, shape: str, motion: str, start: tuple[float, float]) -> str:
    """The world's detailed caption of one medium object."""
    obj = world.ObjectSpec(shape, colour, "medium", motion, "slow", *start)
    return world.detailed_caption(world.Scene((obj,), "black", 64, 48, 9, world.FPS))


def caption_pairs(attribute: str, first: str, second: str) -> list[tuple[str, str]]:
    """Caption pairs over every colour, shape and three start positions, differing in one word."""
    pairs = []
    starts = ((0.5, 0.5), (0.2, 0.3), (0.8, 0.7))
    for colour, shape, start in itertools.product(world.COLOURS, ("square", "triangle"), starts):
        base = {"colour": colour, "shape": shape, "motion": "right"}
        a, b = dict(base, **{attribute: first}), dict(base, **{attribute: second})
        pairs.append((caption(**a, start=start), caption(**b, start=start)))
    return pairs


def separations(encoder: TextEncoder, pairs: list[tuple[str, str]]) -> list[dict[str, float]]:
    """Per layer: mean relative pooled distance and mean largest relative token distance."""
    first = encoder.encode([a for a, _ in pairs])
    second = encoder.encode([b for _, b in pairs])
    width = encoder.hidden_size // len(encoder.config.layers)
    rows = []
    for index in range(len(encoder.config.layers)):
        part = slice(index * width, (index + 1) * width)
        a, b = first.states[..., part], second.states[..., part]  # [B, S, D], padding zeroed
        pooled_a = a.sum(1) / first.mask.sum(1, keepdim=True)
        pooled_b = b.sum(1) / second.mask.sum(1, keepdim=True)
        pooled = (pooled_a - pooled_b).norm(dim=-1) / pooled_a.norm(dim=-1)
        row = {"pooled": float(pooled.mean()), "token": None}
        if first.mask.shape == second.mask.shape and torch.equal(first.mask, second.mask):
            # same token count: the pairs differ in one word, so tokens line up position by position
            token = (a - b).norm(dim=-1) / a.norm(dim=-1).clamp_min(1e-6)  # [B, S]
            row["token"] = float(token.amax(1).mean())
        rows.append(row)
    return rows


def measure(path: str | None, layers: list[int]) -> dict[str, Any]:
    """The JSON this tool prints: per layer, per pair kind, pooled and token separations."""
    encoder = TextEncoder(TextEncoderConfig(path=path, layers=tuple(layers), max_length=64))
    with torch.no_grad():
        per_pair = {
            name: separations(encoder, caption_pairs(*spec)) for name, spec in PAIRS.items()
        }
    result: dict[str, Any] = {"encoder": path or "bundled all-MiniLM-L6-v2", "layers": {}}
    for index, layer in enumerate(layers):
        row = {name: per_pair[name][index] for name in PAIRS}
        row["motion_vs_colour"] = row["left/right"]["pooled"] / row["colour"]["pooled"]
        result["layers"][str(layer)] = row
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", default=None, help="local encoder folder (default: MiniLM)")
    parser.add_argument("--layers", default="0,1,2,3,4,5,6", help="hidden-state indices")
    args = parser.parse_args(argv)
    layers = [int(item) for item in args.layers.split(",")]
    print(json.dumps(measure(args.path, layers)))


if __name__ == "__main__":
    main()
