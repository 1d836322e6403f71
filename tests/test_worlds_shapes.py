"""Tests for the shapes world (``stages.worlds.shapes``): grammar, splits, renderer and reward.

The renderer and the reward check each other: every ground-truth image must meet every requirement,
and each corruption of a ground-truth layout must lose exactly the requirements it breaks.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from stages.support.errors import TempflowError
from stages.worlds import shapes
from stages.worlds.shapes import Obj, Placed, Scene, parse_prompt

OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def _met(image: np.ndarray, scene: Scene) -> list[bool]:
    return shapes.check(image, scene).met


def _unused_colour(scene: Scene) -> str:
    used = {o.colour for o in scene.objects}
    return next(c for c in shapes.COLOURS if c not in used)


# --------------------------------------------------------------------------------------------
# Grammar


def test_every_prompt_round_trips():
    prompts = shapes.all_prompts()
    assert len(set(prompts)) == len(prompts)
    for prompt in prompts:
        assert parse_prompt(prompt).prompt == prompt


def test_prompt_counts_per_task():
    tasks = Counter(parse_prompt(p).task for p in shapes.all_prompts())
    objects = 7 * 3
    assert tasks == {"single": objects, "counting": 3 * objects, "two_objects": objects * (objects - 1),
                     "position": 4 * objects * (objects - 1)}
    assert shapes.all_prompts() == shapes.all_prompts()  # deterministic order


@pytest.mark.parametrize("text, canonical", [
    ("A Red Circle", "a red circle"),
    ("  two   BLUE squares.  ", "two blue squares"),
    ("a red circle\tand  a blue square.", "a red circle and a blue square"),
    ("a white triangle LEFT OF a green circle", "a white triangle left of a green circle"),
    ("four cyan triangles.", "four cyan triangles"),
])
def test_parse_tolerates_case_spaces_and_one_period(text, canonical):
    assert parse_prompt(text).prompt == canonical


def test_parse_builds_the_scene():
    scene = parse_prompt("a yellow square below a magenta triangle")
    assert scene == Scene("position", (Obj("yellow", "square"), Obj("magenta", "triangle")), relation="below")
    assert parse_prompt("three red circles") == Scene("counting", (Obj("red", "circle"),), count=3)


@pytest.mark.parametrize("text, expected", [
    ("a purple circle", ["'a purple circle'", "unknown colour 'purple'", "red, green, blue"]),
    ("a red star", ["unknown shape 'star'", "square, circle, triangle"]),
    ("two red circle", ["takes the plural", "'two red circles'"]),
    ("a red circles", ["takes the singular", "'a red circle'"]),
    ("five red circles", ["count 'five' is out of range", "two, three, four"]),
    ("2 red circles", ["'two', not '2'"]),
    ("one red circle", ["'a <colour> <shape>' for one object"]),
    ("a red circle next to a blue square", ["unknown relation 'next to'", "left of, right of, above, below"]),
    ("a red circle and a red circle", ["must differ", "'two red circles'"]),
    ("a red circle above a red circle", ["must differ", "'two red circles'"]),
    ("a red circle left of blue square", ["each object starts with 'a'"]),
    ("red circle", ["'a red circle'"]),
    ("a circle", ["needs a colour"]),
    ("a big red circle", ["expected 'a <colour> <shape>'", "'a big red circle'"]),
    ("", ["empty"]),
    ("a photo of a cat", ["is not in the shapes world"]),
])
def test_parse_refuses_with_one_helpful_line(text, expected):
    with pytest.raises(TempflowError) as info:
        parse_prompt(text)
    message = str(info.value)
    assert message.startswith(f"prompt {text!r} is not in the shapes world: ")
    assert "\n" not in message
    for part in expected:
        assert part in message


def test_scene_validates_on_construction():
    red = Obj("red", "circle")
    with pytest.raises(TempflowError, match="count 5"):
        Scene("counting", (red,), count=5)
    with pytest.raises(TempflowError, match="must differ"):
        Scene("two_objects", (red, red))
    with pytest.raises(TempflowError, match="relation 'near'"):
        Scene("position", (red, Obj("blue", "square")), relation="near")
    with pytest.raises(TempflowError, match="unknown colour 'purple'"):
        Obj("purple", "circle")


# --------------------------------------------------------------------------------------------
# Splits


def test_splits_partition_the_grammar():
    train, heldout = shapes.train_prompts(), shapes.heldout_prompts()
    assert not set(train) & set(heldout)
    assert sorted(train + heldout) == sorted(shapes.all_prompts())
    assert all(shapes.split_of(parse_prompt(p)) == "train" for p in train)


def test_no_train_prompt_shows_a_heldout_pair():
    assert 1 <= len(shapes.HELDOUT_PAIRS) <= 4
    for prompt in shapes.train_prompts():
        scene = parse_prompt(prompt)
        assert not {(o.colour, o.shape) for o in scene.objects} & set(shapes.HELDOUT_PAIRS), prompt
        assert not any(f"{c} {s}" in prompt for c, s in shapes.HELDOUT_PAIRS), prompt


def test_training_sees_every_colour_shape_and_heldout_ingredient():
    train = [parse_prompt(p) for p in shapes.train_prompts()]
    seen = {o for scene in train for o in scene.objects}
    assert {o.colour for o in seen} == set(shapes.COLOURS)
    assert {o.shape for o in seen} == set(shapes.SHAPES)
    # held-out compositions are made of objects training shows, just never together
    for pair in shapes.HELDOUT_COMPOSITIONS:
        assert set(pair) <= seen
        assert not any(set(pair) == set(s.objects) for s in train)
    for count, obj in shapes.HELDOUT_COUNTS:
        assert obj in seen
        assert any(s.task == "counting" and s.objects == (obj,) for s in train)
        assert Scene("counting", (obj,), count=count).prompt in shapes.heldout_prompts()


def test_heldout_has_pairings_and_compositions():
    kinds = Counter((s.task, shapes.heldout_kind(s)) for s in map(parse_prompt, shapes.heldout_prompts()))
    assert kinds[("single", "pair")] == len(shapes.HELDOUT_PAIRS)
    for task in ("counting", "two_objects", "position"):
        assert kinds[(task, "pair")] > 0 and kinds[(task, "composition")] > 0
    assert "a green circle and a red square" in shapes.heldout_prompts()  # compositions hold in either order
    assert "a red square right of a green circle" in shapes.heldout_prompts()


def test_heldout_halves_partition_heldout_with_every_task_and_kind():
    """validation and test: disjoint, together the held-out split, each with both kinds of every task."""
    validation = shapes.eval_prompts("validation", per_task=10**6)
    test = shapes.eval_prompts("test", per_task=10**6)
    assert not set(validation) & set(test)
    assert sorted(validation + test) == sorted(shapes.heldout_prompts())
    every = {(s.task, shapes.heldout_kind(s)) for s in map(parse_prompt, shapes.heldout_prompts())}
    for half in (validation, test):
        kinds = {(s.task, shapes.heldout_kind(s)) for s in map(parse_prompt, half)}
        assert kinds == every and len(every) == 7  # single: pairings only
        assert abs(len(half) - len(shapes.heldout_prompts()) / 2) <= 4  # halves in every (task, kind)
    assert shapes.eval_prompts("test", per_task=8, seed=3) == shapes.eval_prompts("test", per_task=8, seed=3)
    with pytest.raises(TempflowError, match="unknown split"):
        shapes.eval_prompts("val")


def test_sample_scene_stays_in_its_split():
    rng = np.random.default_rng(0)
    for split in shapes.SPLITS:
        scenes = [shapes.sample_scene(rng, split) for _ in range(2000)]
        assert all(shapes.split_of(s) == split for s in scenes)
        tasks = Counter(s.task for s in scenes)
        assert set(tasks) == set(shapes.TASKS) and min(tasks.values()) > 400  # uniform over 4 tasks
    with pytest.raises(TempflowError, match="unknown split 'test'"):
        shapes.sample_scene(rng, "test")


def test_sample_scene_of_any_split_draws_both():
    """ANY_SPLIT: the whole grammar, held-out pairings and compositions included, every task."""
    rng = np.random.default_rng(0)
    scenes = [shapes.sample_scene(rng, shapes.ANY_SPLIT) for _ in range(4000)]
    kinds = Counter(shapes.heldout_kind(s) for s in scenes)
    assert set(kinds) == {None, "pair", "composition"}
    assert 0.15 < (kinds["pair"] + kinds["composition"]) / len(scenes) < 0.45  # about its share per task
    assert set(Counter(s.task for s in scenes)) == set(shapes.TASKS)


def test_eval_prompts_are_balanced_and_deterministic():
    for split in shapes.SPLITS:
        prompts = shapes.eval_prompts(split, per_task=16, seed=0)
        assert prompts == shapes.eval_prompts(split, per_task=16, seed=0)
        assert prompts != shapes.eval_prompts(split, per_task=16, seed=1)
        assert len(set(prompts)) == len(prompts)
        assert set(prompts) <= set(shapes.train_prompts() if split == "train" else shapes.heldout_prompts())
        available = Counter(parse_prompt(p).task for p in shapes.all_prompts()
                            if shapes.split_of(parse_prompt(p)) == split)
        tasks = Counter(parse_prompt(p).task for p in prompts)
        assert tasks == {t: min(16, available[t]) for t in shapes.TASKS}
    heldout = [parse_prompt(p) for p in shapes.eval_prompts("heldout", per_task=4)]
    for task in ("counting", "two_objects", "position"):
        assert {shapes.heldout_kind(s) for s in heldout if s.task == task} == {"pair", "composition"}


# --------------------------------------------------------------------------------------------
# Ground truth: every rendered image meets every requirement


def _ground_truth_failures(count: int, size: int, first_seed: int = 0) -> list[str]:
    seeds = range(first_seed, first_seed + count)
    scenes, images = [], []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        scenes.append(shapes.sample_scene(rng, shapes.SPLITS[seed % 2]))
        images.append(shapes.render(scenes[-1], rng, size))
    verdicts = shapes.verdicts(np.stack(images), [s.prompt for s in scenes])
    return [f"seed {seed}: {s.prompt!r} missed {[r for r, ok in zip(v.requirements, v.met) if not ok]}"
            for seed, s, v in zip(seeds, scenes, verdicts) if not v.strict]


@pytest.mark.parametrize("size, count", [(32, 3000), (64, 300), (16, 300)])
def test_rendered_scenes_meet_every_requirement(size, count):
    failures = _ground_truth_failures(count, size)
    assert not failures, f"{len(failures)} of {count} at {size}px, e.g. {failures[:5]}"


@pytest.mark.parametrize("size", [16, 32, 64])
def test_grid_fallback_is_correct(size):
    """With no random tries, the grid layout alone must satisfy every prompt (all relations, four objects)."""
    rng = np.random.default_rng(size)
    prompts = [p for p in shapes.all_prompts() if p.startswith("four") or " of " in p or "above" in p][::7]
    for prompt in prompts:
        scene = parse_prompt(prompt)
        placed = shapes.layout(scene, rng, size, tries=0)
        assert shapes.check(shapes.paint(placed, size), scene).strict, prompt


def test_objects_are_separate_components_of_the_right_size():
    geo = shapes.Geometry(32)
    assert (geo.min_side, geo.max_side, geo.gap, geo.margin, geo.min_area) == (7, 11, 2, 3.2, 5)
    assert (shapes.Geometry(64).min_side, shapes.Geometry(64).max_side) == (14, 22)
    rng = np.random.default_rng(1)
    for _ in range(300):
        scene = shapes.sample_scene(rng)
        placed = shapes.layout(scene, rng, 32)
        assert len(placed) == len(scene.copies)
        assert all(geo.min_side <= p.side <= geo.max_side for p in placed)
        assert all(a.apart(b, geo.gap) for i, a in enumerate(placed) for b in placed[i + 1:])
        foreground = (shapes.paint(placed, 32).max(-1) > 0).astype(np.int64)[None]  # colour-blind
        roots = shapes.components(foreground)[foreground.reshape(-1) > 0]
        assert np.unique(roots).size == len(placed)


def test_render_batch_and_size_limit():
    rng = np.random.default_rng(0)
    scenes = [shapes.sample_scene(rng) for _ in range(5)]
    images = shapes.render_batch(scenes, rng, 64)
    assert images.shape == (5, 64, 64, 3) and images.dtype == np.uint8
    assert shapes.render_batch([], rng).shape == (0, 32, 32, 3)
    with pytest.raises(TempflowError, match="at least 16 pixels"):
        shapes.render(scenes[0], rng, 8)


# --------------------------------------------------------------------------------------------
# Corruptions lose exactly the matching requirement

CORRUPTED = ["a red circle", "three blue squares", "two white triangles", "a green triangle and a white square",
             "a yellow circle and a yellow square", "a cyan square above a magenta triangle",
             "a red triangle left of a blue circle"]


def _lost_first(scene: Scene) -> list[bool]:
    """What is met when the first placed object is gone or is another kind: its kind's presence
    (unless counting still has others), the count, and any relation; "nothing else" is the caller's:
    it fails when the first object became another kind, holds when it is just gone."""
    if scene.task == "counting":
        return [True, False]
    return [False] + [True] * (len(scene.objects) - 1) + ([False] if scene.relation else [])


@pytest.mark.parametrize("prompt", CORRUPTED)
def test_wrong_colour_or_shape_or_missing_object(prompt):
    scene = parse_prompt(prompt)
    for seed in range(20):
        placed = shapes.layout(scene, np.random.default_rng(seed), 32)
        first = placed[0]
        recoloured = Placed(Obj(_unused_colour(scene), first.obj.shape), first.top, first.left, first.side)
        other_shape = next(s for s in ("square", "circle") if s != first.obj.shape)
        reshaped = Placed(Obj(first.obj.colour, other_shape), first.top, first.left, first.side)
        assert _met(shapes.paint(placed), scene) == [True] * len(shapes.requirements(scene))
        assert _met(shapes.paint([recoloured] + placed[1:]), scene) == _lost_first(scene) + [False], (prompt, seed)
        # just gone: nothing else is there, unless nothing at all is (an empty canvas meets nothing)
        assert _met(shapes.paint(placed[1:]), scene) == _lost_first(scene) + [len(placed) > 1], (prompt, seed)
        if Obj(first.obj.colour, other_shape) not in scene.objects:
            assert _met(shapes.paint([reshaped] + placed[1:]), scene) == _lost_first(scene) + [False], (prompt, seed)


@pytest.mark.parametrize("count", [2, 3])
def test_an_extra_object_fails_the_count_and_nothing_else(count):
    obj = Obj("green", "circle")
    for seed in range(20):
        rng = np.random.default_rng(seed)
        image = shapes.render(Scene("counting", (obj,), count=count + 1), rng)
        assert _met(image, Scene("counting", (obj,), count=count)) == [True, False, False]  # count, nothing else


@pytest.mark.parametrize("relation", shapes.RELATIONS)
def test_the_opposite_relation_fails_only_the_relation(relation):
    objects = (Obj("red", "triangle"), Obj("blue", "square"))
    scene = Scene("position", objects, relation=relation)
    for seed in range(30):
        rng = np.random.default_rng(seed)
        image = shapes.render(Scene("position", objects, relation=OPPOSITE[relation]), rng)
        assert _met(image, scene) == [True, True, False, True], seed
        if relation in ("left of", "right of"):  # mirrored left-right, the scene is the opposite too
            assert _met(shapes.render(scene, rng)[:, ::-1], scene) == [True, True, False, True], seed


def test_relation_margin():
    assert shapes.holds("left of", (10.0, 5.0), (13.3, 0.0), 3.2)
    assert not shapes.holds("left of", (10.0, 5.0), (13.2, 0.0), 3.2)
    assert shapes.holds("above", (0.0, 2.0), (0.0, 9.0), 3.2)  # above = smaller row
    assert not shapes.holds("below", (0.0, 2.0), (0.0, 9.0), 3.2)
    assert shapes.holds("right of", (20.0, 0.0), (10.0, 0.0), 3.2)


# --------------------------------------------------------------------------------------------
# The shape classifier and components


def _one(mask: np.ndarray, colour: str = "white") -> shapes.Detection:
    image = np.zeros((*mask.shape, 3), dtype=np.uint8)
    image[mask] = shapes.COLOURS[colour]
    (found,) = shapes.detect(image)
    return found


@pytest.mark.parametrize("shape", shapes.SHAPES)
def test_every_rendered_size_is_classified(shape):
    for size in (16, 32, 64):
        geo = shapes.Geometry(size)
        for side in range(geo.min_side, geo.max_side + 1):
            image = shapes.paint([Placed(Obj("red", shape), 1, 1, side)], size)
            (found,) = shapes.detect(image)
            assert (found.shape, found.area) == (shape, int(image.any(-1).sum())), (size, side)


def test_odd_blobs_are_unknown_and_a_stray_pixel_is_tolerated():
    triangle = shapes.paint([Placed(Obj("white", "triangle"), 0, 0, 11)], 16)[:11, :11].any(-1)
    ring = np.ones((9, 9), dtype=bool)
    ring[1:-1, 1:-1] = False
    y, x = np.mgrid[0:11, 0:11]
    diamond = np.abs(x - 5) + np.abs(y - 5) <= 5
    bar = np.ones((2, 12), dtype=bool)
    for mask in (triangle[::-1], ring, diamond, bar):
        assert _one(np.pad(mask, 2)).shape == "unknown"
    square = np.pad(np.ones((9, 9), dtype=bool), 2)
    square[1, 6] = square[11, 4] = square[5, 1] = square[7, 11] = True  # a stray pixel on each edge
    found = _one(square)
    assert (found.shape, found.area, found.width, found.height) == ("square", 85, 9, 9)


def test_components_are_8_connected_per_colour():
    index = np.zeros((1, 6, 6), dtype=np.int64)
    index[0, 0:2, 0:2] = 4
    index[0, 2:4, 2:4] = 4  # touches the first block at a corner: one component
    index[0, 0:2, 4:6] = 2  # same place, other colour: its own component
    index[0, 5, 5] = 4
    roots = shapes.components(index)[index.reshape(-1) > 0]
    assert np.unique(roots).size == 3


# --------------------------------------------------------------------------------------------
# The reward functions


def test_blank_image_scores_zero_for_every_task():
    prompts = ["a red circle", "three blue squares", "a red circle and a blue square", "a red circle above a blue square"]
    blank = np.zeros((4, 32, 32, 3), dtype=np.uint8)
    assert shapes.shapes_reward(blank, prompts).tolist() == [0.0] * 4
    assert shapes.shapes_strict(blank, prompts).tolist() == [0.0] * 4


@pytest.mark.parametrize("shape", [(8, 32, 32, 3), (8, 64, 64, 3), (8, 16, 16, 3), (2, 1, 1, 3), (2, 5, 9, 3)])
def test_noise_and_odd_sizes_do_not_crash(shape):
    rng = np.random.default_rng(0)
    prompts = [shapes.sample_scene(rng).prompt for _ in range(shape[0])]
    for images in (rng.integers(0, 256, size=shape, dtype=np.uint8), np.full(shape, 255, dtype=np.uint8)):
        values = shapes.shapes_reward(images, prompts)
        assert values.dtype == np.float64 and np.all((values >= 0) & (values <= 1))
        assert set(shapes.shapes_strict(images, prompts).tolist()) <= {0.0, 1.0}


def test_reward_refuses_prompts_outside_the_world_and_bad_batches():
    images = np.zeros((2, 32, 32, 3), dtype=np.uint8)
    with pytest.raises(TempflowError, match="prompt 'a photo of a cat' is not in the shapes world"):
        shapes.shapes_reward(images, ["a red circle", "a photo of a cat"])
    with pytest.raises(TempflowError, match="2 images but 1 prompts"):
        shapes.shapes_reward(images, ["a red circle"])
    with pytest.raises(TempflowError, match=r"expected images \(N, H, W, 3\)"):
        shapes.shapes_reward(images[..., 0], ["a red circle"] * 2)


def test_partial_credit_is_the_fraction_met():
    scene = parse_prompt("a red circle left of a blue square")
    placed = shapes.layout(scene, np.random.default_rng(0), 32)
    only_circle = shapes.paint(placed[:1])
    verdict = shapes.check(only_circle, scene)
    assert verdict.requirements == ["red circle present", "blue square present", "red circle left of blue square",
                                    "nothing else in the image"]
    assert verdict.met == [True, False, False, True]
    assert verdict.score == pytest.approx(2 / 4) and not verdict.strict


def test_clutter_fails_nothing_else_but_keeps_the_rest():
    """A fragment of the asked colour beside a correct object: presence holds, "nothing else" fails."""
    scene = parse_prompt("a red circle")
    tested = 0
    for seed in range(40):
        image = shapes.render(scene, np.random.default_rng(seed))
        if image[:5, :5].any():  # the corner (with a gap) must be free for the fragment
            continue
        image[:3, :3] = (255, 0, 0)  # a 3x3 red square: area 9, above the minimum
        verdict = shapes.check(image, scene)
        assert verdict.met == [True, False] and verdict.clean == 0.5, seed  # one of two objects was asked for
        assert verdict.score == pytest.approx(0.75) and not verdict.strict
        tested += 1
    assert tested >= 10


REPO = Path(__file__).resolve().parents[1]


def test_the_shipped_train_prompts_are_the_world_train_split():
    shipped = (REPO / "examples" / "prompts" / "shapes-train.txt").read_text().splitlines()
    assert [p for p in shipped if p and not p.startswith("#")] == shapes.train_prompts()
