"""The embedded world: seeded scenes, held-out split, geometry, rendering, captions, prompts."""

from __future__ import annotations

import itertools
import json
import math
import time
from collections import Counter

import numpy as np
import pytest

from sora_lightning.data import world
from sora_lightning.data.world import (
    BACKGROUNDS,
    CLIP_LENGTHS,
    COLOURS,
    EVAL_MOTIONS,
    HELD_OUT,
    MOTIONS,
    RESOLUTIONS,
    SHAPES,
    SIZES,
    ObjectSpec,
    Scene,
    detailed_caption,
    eval_prompts,
    expand_prompt,
    parse_prompt,
    render,
    sample_scene,
    scene_from_prompt,
    seen_prompts,
    short_prompt,
)


def _scenes(count: int, seed: int = 0, **kwargs) -> list[Scene]:
    rng = np.random.default_rng(seed)
    lengths = kwargs.pop("lengths", CLIP_LENGTHS)
    return [sample_scene(rng, num_frames=lengths[i % len(lengths)], **kwargs) for i in range(count)]


def _analytic_area(obj: ObjectSpec, scene: Scene) -> np.ndarray:
    """Area in pixels per frame of an object that lies fully inside the frame."""
    progress = np.linspace(0.0, 1.0, scene.num_frames) if scene.num_frames > 1 else np.zeros(1)
    end = {"grow": world.GROW_SCALE, "shrink": world.SHRINK_SCALE}.get(obj.motion, 1.0)
    radius = SIZES[obj.size] * min(scene.width, scene.height) * (1 + (end - 1) * progress)
    unit = {"circle": math.pi, "square": 4 * 0.9**2, "triangle": 3 * math.sqrt(3) / 4 * 1.2**2}
    return unit[obj.shape] * radius**2


def _alone(obj: ObjectSpec, scene: Scene) -> np.ndarray:
    """Coverage [T, H, W] in [0, 1] of one object rendered white on black."""
    white = ObjectSpec(obj.shape, "white", obj.size, obj.motion, obj.speed, obj.x0, obj.y0)
    alone = Scene((white,), "black", scene.width, scene.height, scene.num_frames)
    return render(alone)[..., 0].astype(float) / COLOURS["white"][0]


def test_constants_match_the_contract() -> None:
    assert len(COLOURS) == 8 and len(BACKGROUNDS) == 3
    palette = np.asarray(list(COLOURS.values()), dtype=float)
    pairwise = np.linalg.norm(palette[:, None] - palette[None], axis=-1)
    assert pairwise[~np.eye(8, dtype=bool)].min() > 90  # colours stay apart after blur
    for rgb in BACKGROUNDS.values():
        assert np.linalg.norm(palette - np.asarray(rgb), axis=1).min() > 120
    assert all(w % 8 == 0 and h % 8 == 0 for w, h in RESOLUTIONS.values())
    assert set(EVAL_MOTIONS) == set(MOTIONS) - {"rotate"}
    assert all((n - 1) % 4 == 0 for n in CLIP_LENGTHS)


def test_same_seed_gives_same_scene_and_pixels() -> None:
    first, second = _scenes(20, seed=7), _scenes(20, seed=7)
    assert first == second
    for a, b in zip(first[:5], second[:5], strict=True):
        np.testing.assert_array_equal(render(a), render(b))
    assert _scenes(20, seed=8) != first


def test_train_split_never_yields_held_out_triples() -> None:
    seen = set()
    for scene in _scenes(2000, seed=1, lengths=(5,)):
        for obj in scene.objects:
            triple = (obj.colour, obj.shape, obj.motion)
            assert triple not in HELD_OUT
            assert not (obj.shape == "circle" and obj.motion == "rotate")
            seen.add(triple)
    # Every pair of a held-out triple still appears in training: composition is learnable.
    for colour, shape, motion in HELD_OUT:
        assert any(c == colour and s == shape for c, s, _ in seen)
        assert any(c == colour and m == motion for c, _, m in seen)
        assert any(s == shape and m == motion for _, s, m in seen)


def test_held_out_set_covers_the_vocabulary() -> None:
    assert 12 <= len(HELD_OUT) <= 20
    colours, shapes, motions = (set(column) for column in zip(*HELD_OUT, strict=True))
    assert colours == set(COLOURS) and shapes == set(SHAPES) and motions == set(EVAL_MOTIONS)
    held = _scenes(200, seed=2, split="heldout", lengths=(9,))
    assert all((o.colour, o.shape, o.motion) in HELD_OUT for s in held for o in s.objects)


def test_objects_stay_inside_the_frame() -> None:
    for scene in _scenes(400, seed=3):
        for obj in scene.objects:
            centre_x, centre_y, scale, _ = world._trajectory(
                obj, scene.width, scene.height, scene.num_frames
            )
            extent = world._extent_px(obj.shape, obj.size, obj.motion, scene.width, scene.height)
            assert (
                centre_x.min() - extent >= -1e-6 and centre_x.max() + extent <= scene.width + 1e-6
            )
            assert centre_y.min() - extent >= -1e-6
            assert centre_y.max() + extent <= scene.height + 1e-6


def test_rendered_area_matches_geometry_so_nothing_is_clipped() -> None:
    for scene in _scenes(60, seed=4, lengths=(9, 17)):
        for obj in scene.objects:
            area = _alone(obj, scene).sum(axis=(1, 2))
            expected = _analytic_area(obj, scene)
            # 2x2 supersampling places each edge to within a quarter pixel.
            tolerance = 1.0 + np.sqrt(expected)
            assert np.all(np.abs(area - expected) <= tolerance)


def test_multiple_objects_do_not_overlap_much() -> None:
    scenes = [s for s in _scenes(200, seed=5, lengths=(9,)) if len(s.objects) > 1]
    assert len(scenes) > 40  # about 40% of scenes have several objects
    for scene in scenes:
        for a, b in itertools.combinations(scene.objects, 2):
            cover_a, cover_b = _alone(a, scene), _alone(b, scene)
            shared = np.minimum(cover_a, cover_b).sum(axis=(1, 2))
            smaller = np.minimum(cover_a.sum(axis=(1, 2)), cover_b.sum(axis=(1, 2)))
            assert (shared / smaller).max() < 0.1


def test_all_aspect_ratios_and_object_counts_are_produced() -> None:
    scenes = _scenes(300, seed=6, lengths=(1, 17))
    sizes = {(s.width, s.height) for s in scenes}
    assert sizes == set(RESOLUTIONS.values())
    assert any(w < h for w, h in sizes) and any(w > h for w, h in sizes)
    assert any(w == h for w, h in sizes)
    counts = np.bincount([len(s.objects) for s in scenes], minlength=4)
    assert counts[0] == 0 and counts[1] > counts[2] > counts[3] > 0


def test_render_is_anti_aliased_and_fast() -> None:
    scene = scene_from_prompt("a large red circle grows", width=64, height=48, num_frames=33)
    start = time.perf_counter()
    frames = render(scene)
    assert time.perf_counter() - start < 0.1
    assert frames.shape == (33, 48, 64, 3) and frames.dtype == np.uint8
    reds = np.unique(frames[..., 0])
    assert len(reds) > 2  # edge pixels take intermediate values, not just background/object


def test_motions_move_scale_and_turn_the_object() -> None:
    def centroid_and_area(prompt: str) -> tuple[np.ndarray, np.ndarray]:
        scene = scene_from_prompt(prompt, width=64, height=48, num_frames=17)
        mask = render(scene).max(axis=-1) > 128
        grid_y, grid_x = np.mgrid[0:48, 0:64]
        area = mask.sum(axis=(1, 2))
        centre = np.stack([(mask * grid_x).sum((1, 2)), (mask * grid_y).sum((1, 2))], 1)
        return centre / area[:, None], area

    for prompt, sign in [("a red circle moves left", (-1, 0)), ("a red square moves up", (0, -1))]:
        centre, _ = centroid_and_area(prompt)
        assert np.allclose(np.sign(np.round(centre[-1] - centre[0], 3)), sign)
    _, area = centroid_and_area("a blue triangle grows")
    assert 2.2 < area[-1] / area[0] < 2.9
    _, area = centroid_and_area("a blue triangle shrinks")
    assert 0.2 < area[-1] / area[0] < 0.4
    scene = scene_from_prompt("a white square rotates", width=64, height=48, num_frames=17)
    frames = render(scene)
    assert not np.array_equal(frames[0], frames[8])  # at 45 degrees it is a diamond
    areas = frames[..., 0].astype(float).sum(axis=(1, 2))  # soft area, white on black
    assert areas.max() / areas.min() < 1.1  # 2x2 supersampling quantises edges


def test_scene_dict_round_trip_is_json_able() -> None:
    for scene in _scenes(10, seed=9):
        assert Scene.from_dict(json.loads(json.dumps(scene.to_dict()))) == scene


def test_invalid_specs_raise_value_error() -> None:
    with pytest.raises(ValueError, match="circle"):
        ObjectSpec("circle", "red", "small", "rotate", "slow", 0.5, 0.5)
    with pytest.raises(ValueError, match="colour"):
        ObjectSpec("circle", "mauve", "small", "left", "slow", 0.5, 0.5)
    with pytest.raises(ValueError, match="split"):
        sample_scene(np.random.default_rng(0), num_frames=5, split="test")


def test_captions_name_colour_shape_motion_and_background() -> None:
    direction = {"left": "left", "right": "right", "up": "up", "down": "down"}
    words = {"still": "still", "grow": "grows", "shrink": "shrinks", "rotate": "rotates"}
    for scene in _scenes(200, seed=10):
        short, detailed = short_prompt(scene), detailed_caption(scene)
        assert scene.background in detailed
        assert detailed.startswith("An image" if scene.num_frames == 1 else "A video")
        for obj in scene.objects:
            assert f"{obj.colour} {obj.shape}" in short
            assert f"{obj.size} {obj.colour} {obj.shape}" in detailed
            motion_word = direction.get(obj.motion) or words[obj.motion]
            if scene.num_frames > 1:
                assert motion_word in short.split(obj.shape, 1)[1]
        if scene.num_frames == 1:
            assert "moves" not in short + detailed and "still" not in short


def test_short_prompt_examples() -> None:
    obj = ObjectSpec("circle", "red", "small", "left", "slow", 0.5, 0.5)
    two = Scene(
        (obj, ObjectSpec("square", "blue", "large", "grow", "fast", 0.2, 0.2)), "gray", 64, 48, 9
    )
    assert short_prompt(two) == "a red circle moves left and a blue square grows"
    assert short_prompt(Scene((obj,), "gray", 64, 48, 1)) == "a red circle"
    assert detailed_caption(two) == (
        "A video of a small red circle in the centre that moves slowly to the left, and a large "
        "blue square near the top left that grows, on a gray background."
    )


def test_expanded_short_prompt_parses_back_to_the_same_attributes() -> None:
    for scene in _scenes(200, seed=11, lengths=(5, 17, 33)):
        expanded = expand_prompt(short_prompt(scene))
        assert expanded.startswith("A video of a medium ")
        parsed = parse_prompt(expanded)
        got = [(o["colour"], o["shape"], o["motion"]) for o in parsed]
        truth = [(o.colour, o.shape, o.motion) for o in scene.objects]
        assert got == truth


def test_detailed_caption_parses_back_completely() -> None:
    for scene in _scenes(100, seed=12, lengths=(9,)):
        parsed = parse_prompt(detailed_caption(scene))
        for obj, found in zip(scene.objects, parsed, strict=True):
            assert (found["colour"], found["shape"], found["motion"], found["size"]) == (
                obj.colour,
                obj.shape,
                obj.motion,
                obj.size,
            )
            if obj.motion in ("left", "right", "up", "down"):
                assert found["speed"] == obj.speed


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("A Red Circle moving left", ("red", "circle", "left")),
        ("the blue square is growing.", ("blue", "square", "grow")),
        ("green triangle goes up", ("green", "triangle", "up")),
        ("a cyan circle is still", ("cyan", "circle", "still")),
        ("an orange triangle shrinking", ("orange", "triangle", "shrink")),
        ("a white square falls", ("white", "square", "down")),
        ("a yellow square spins", ("yellow", "square", "rotate")),
        ("a magenta circle", ("magenta", "circle", None)),
    ],
)
def test_parse_prompt_is_tolerant(prompt: str, expected: tuple) -> None:
    (found,) = parse_prompt(prompt)
    assert (found["colour"], found["shape"], found["motion"]) == expected


def test_expand_prompt_defaults_and_fallback() -> None:
    assert expand_prompt("a red circle moves left") == (
        "A video of a medium red circle in the centre that moves slowly to the left, "
        "on a black background."
    )
    assert expand_prompt("a red circle", num_frames=1) == (
        "An image of a medium red circle in the centre, on a black background."
    )
    assert expand_prompt("a green circle grows and a blue square moves up").startswith(
        "A video of a medium green circle on the left that grows, and a medium blue square on "
        "the right"
    )
    assert expand_prompt("a sunset over the sea") == "a sunset over the sea"
    assert parse_prompt("a sunset over the sea") is None
    assert scene_from_prompt("purple rain", width=64, height=48, num_frames=9) is None


def test_seen_prompts_are_training_triples_covering_every_eval_motion() -> None:
    prompts = seen_prompts(per_motion=3)
    assert prompts == sorted(prompts) == seen_prompts(per_motion=3)
    triples = [tuple(parse_prompt(p)[0][k] for k in ("colour", "shape", "motion")) for p in prompts]
    assert len(set(triples)) == len(triples) == 3 * len(EVAL_MOTIONS)
    assert not set(triples) & HELD_OUT
    assert Counter(motion for _, _, motion in triples) == {m: 3 for m in EVAL_MOTIONS}


def test_eval_prompts_are_one_per_held_out_triple() -> None:
    prompts = eval_prompts()
    assert prompts == sorted(prompts) == eval_prompts() and len(prompts) == len(HELD_OUT)
    triples = set()
    for prompt in prompts:
        (found,) = parse_prompt(prompt)
        triples.add((found["colour"], found["shape"], found["motion"]))
    assert triples == HELD_OUT


def test_speed_scale_moves_objects_further_and_round_trips() -> None:
    """A world configuration may move objects further per frame (the CPU demo's 3x)."""
    base = ObjectSpec("circle", "red", "small", "right", "slow", 0.2, 0.5)
    fast = ObjectSpec("circle", "red", "small", "right", "slow", 0.2, 0.5, speed_scale=3.0)
    travel = [world._trajectory(o, 64, 48, 9)[0] for o in (base, fast)]
    assert np.allclose(travel[1] - travel[1][0], 3.0 * (travel[0] - travel[0][0]))
    assert ObjectSpec.from_dict(fast.to_dict()) == fast
    old_record = {k: v for k, v in base.to_dict().items() if k != "speed_scale"}
    assert ObjectSpec.from_dict(old_record) == base  # shards written before the option
    with pytest.raises(ValueError, match="speed_scale"):
        ObjectSpec("circle", "red", "small", "right", "slow", 0.2, 0.5, speed_scale=0.0)


def test_demo_world_scenes_hold_one_fast_object_inside_the_frame() -> None:
    scenes = _scenes(200, seed=5, lengths=(9,), max_objects=1, speed_scale=3.0)
    assert all(len(s.objects) == 1 and s.objects[0].speed_scale == 3.0 for s in scenes)
    for scene in scenes:
        obj = scene.objects[0]
        centre_x, centre_y, _, _ = world._trajectory(obj, scene.width, scene.height, 9)
        extent = world._extent_px(obj.shape, obj.size, obj.motion, scene.width, scene.height)
        assert centre_x.min() - extent >= -1e-6 and centre_x.max() + extent <= scene.width + 1e-6
        assert centre_y.min() - extent >= -1e-6 and centre_y.max() + extent <= scene.height + 1e-6
    for scene in (s for s in scenes if s.objects[0].motion in ("left", "right")):
        obj = scene.objects[0]
        centre_x = world._trajectory(obj, scene.width, scene.height, 9)[0]
        travel = abs(centre_x[-1] - centre_x[0]) / scene.width
        assert travel >= 0.03 * 8 - 1e-9  # the slow speed x3: a quarter of the width in 9 frames


def test_path_spread_centres_translations_and_leaves_the_default_world_unchanged() -> None:
    """With path_spread, a translating object's path midpoint lies near the frame's centre, so its
    start words stop giving its direction away; other objects, images and the default world are
    placed as before."""
    spread = 0.1
    default = _scenes(120, seed=7, lengths=(17,))
    assert default == _scenes(120, seed=7, lengths=(17,), path_spread=None)
    starts: dict[str, set[str]] = {"left": set(), "right": set()}
    for scene in _scenes(300, seed=7, lengths=(17,), path_spread=spread):
        for obj in scene.objects:
            if obj.motion not in world._DIRECTIONS:
                continue
            centre_x, centre_y, _, _ = world._trajectory(obj, scene.width, scene.height, 17)
            mid_x, mid_y = (centre_x[0] + centre_x[-1]) / 2, (centre_y[0] + centre_y[-1]) / 2
            assert abs(mid_x / scene.width - 0.5) <= spread + 1e-6
            assert abs(mid_y / scene.height - 0.5) <= spread + 1e-6
            if obj.motion in starts:
                starts[obj.motion].add(world.position_words(obj.x0, obj.y0))
    assert "on the left" not in starts["left"] and "on the right" not in starts["right"]
    assert starts["left"] and starts["right"]
    images = _scenes(50, seed=3, lengths=(1,))
    assert images == _scenes(50, seed=3, lengths=(1,), path_spread=spread)
    for bad in (0.0, 0.6, "abc", True):
        with pytest.raises(ValueError, match="path_spread"):
            _scenes(1, path_spread=bad)
