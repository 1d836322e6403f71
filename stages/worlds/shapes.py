"""The shapes world: a GenEval-like prompt grammar, a ground-truth renderer and a weight-free reward.

Objects are one of 7 colours (the corners of the RGB cube) and one of 3 shapes, drawn filled on black.
Four task types, as in GenEval:

* ``single``       ``a red circle``
* ``counting``     ``two blue squares`` (two to four)
* ``two_objects``  ``a red circle and a blue square``
* ``position``     ``a red circle left of a blue square`` (``left of``, ``right of``, ``above``, ``below``)

A fixed part of the grammar is held out of training (:func:`split_of`): a few colour-shape pairings
(:data:`HELDOUT_PAIRS`) and a few combinations of objects that training shows only separately
(:data:`HELDOUT_COMPOSITIONS`, :data:`HELDOUT_COUNTS`).

The reward (:func:`check`) is GenEval without a detector model: pixels snap to the palette, connected
components of one colour are objects, and each component's shape is read off its geometry.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache, lru_cache

import numpy as np

from stages.support.errors import TempflowError

# --------------------------------------------------------------------------------------------
# Grammar

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
    "white": (255, 255, 255),
}
SHAPES: tuple[str, ...] = ("square", "circle", "triangle")
TASKS: tuple[str, ...] = ("single", "counting", "two_objects", "position")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
SPLITS: tuple[str, ...] = ("train", "heldout")
COUNT_WORDS: dict[int, str] = {2: "two", 3: "three", 4: "four"}

_COUNT_OF = {word: n for n, word in COUNT_WORDS.items()}
_OTHER_NUMBERS = ("zero", "one", "five", "six", "seven", "eight", "nine", "ten", "many", "several")


@dataclass(frozen=True)
class Obj:
    """One kind of object: a colour of :data:`COLOURS` and a shape of :data:`SHAPES`."""

    colour: str
    shape: str

    def __post_init__(self) -> None:
        if self.colour not in COLOURS:
            raise TempflowError(f"unknown colour {self.colour!r}; colours are {', '.join(COLOURS)}")
        if self.shape not in SHAPES:
            raise TempflowError(f"unknown shape {self.shape!r}; shapes are {', '.join(SHAPES)}")

    @property
    def name(self) -> str:
        """``red circle``."""
        return f"{self.colour} {self.shape}"

    @property
    def plural(self) -> str:
        """``red circles``."""
        return f"{self.colour} {self.shape}s"


@dataclass(frozen=True)
class Scene:
    """What a prompt asks for.

    ``counting`` holds one object kind in ``objects`` and the number in ``count``; ``two_objects`` and
    ``position`` hold their two (different) objects in prompt order, ``position`` also its ``relation``.
    """

    task: str
    objects: tuple[Obj, ...]
    count: int = 1
    relation: str | None = None

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise TempflowError(f"unknown task {self.task!r}; tasks are {', '.join(TASKS)}")
        wanted = 2 if self.task in ("two_objects", "position") else 1
        if len(self.objects) != wanted:
            raise TempflowError(f"a {self.task} scene has {wanted} object(s), got {len(self.objects)}")
        if wanted == 2 and self.objects[0] == self.objects[1]:
            raise TempflowError(f"the two objects of a {self.task} scene must differ (both {self.objects[0].name})")
        bad_count = self.count not in COUNT_WORDS if self.task == "counting" else self.count != 1
        if bad_count:
            raise TempflowError(f"count {self.count} does not fit task {self.task}; counting takes 2 to 4, others 1")
        if (self.task == "position") != (self.relation in RELATIONS):
            raise TempflowError(f"relation {self.relation!r} does not fit task {self.task}; position takes one of "
                                f"{', '.join(RELATIONS)}, others None")

    @property
    def prompt(self) -> str:
        """The canonical prompt text; ``parse_prompt(scene.prompt) == scene``."""
        first = self.objects[0]
        if self.task == "single":
            return f"a {first.name}"
        if self.task == "counting":
            return f"{COUNT_WORDS[self.count]} {first.plural}"
        middle = "and" if self.task == "two_objects" else self.relation
        return f"a {first.name} {middle} a {self.objects[1].name}"

    @property
    def copies(self) -> list[Obj]:
        """Every object the image must show, one entry per instance."""
        return list(self.objects) * self.count


class _NotInWorld(ValueError):
    """Why a prompt is outside the grammar; :func:`parse_prompt` adds the prompt to the message."""


def parse_prompt(text: str) -> Scene:
    """The scene a prompt asks for. Case, surrounding and repeated spaces and one final period are ignored.

    Raises :class:`TempflowError` (one line naming the prompt and what was expected) outside the grammar.
    """
    words = text.strip().lower().removesuffix(".").split()
    try:
        return _parse_words(words)
    except _NotInWorld as why:
        raise TempflowError(f"prompt {text!r} is not in the shapes world: {why}") from None


def _parse_words(words: list[str]) -> Scene:
    if not words:
        raise _NotInWorld("it is empty; write e.g. 'a red circle' or 'two blue squares'")
    if words[0] != "a":
        return _parse_counting(words)
    second = words.index("a", 1) if "a" in words[1:] else None
    if second is None:
        if "and" in words or {"left", "right", "above", "below"} & set(words):
            raise _NotInWorld("each object starts with 'a', as in 'a red circle left of a blue square'")
        return Scene("single", (_parse_object(words),))
    end = _object_end(words, second)
    first, middle, other = _parse_object(words[:end]), " ".join(words[end:second]), _parse_object(words[second:])
    if middle != "and" and middle not in RELATIONS:
        raise _NotInWorld(f"unknown relation {middle!r} between the objects; write 'and' or one of "
                          f"{', '.join(RELATIONS)}")
    if first == other:
        raise _NotInWorld(f"both objects are a {first.name}; they must differ in colour or shape "
                          f"(for two of the same write 'two {first.plural}')")
    if middle == "and":
        return Scene("two_objects", (first, other))
    return Scene("position", (first, other), relation=middle)


def _object_end(words: list[str], stop: int) -> int:
    """Index just after the first object: after its shape word, else 3 words in."""
    for i in range(1, stop):
        if words[i] in SHAPES or words[i].removesuffix("s") in SHAPES:
            return i + 1
    return min(3, stop)


def _parse_object(words: list[str]) -> Obj:
    """``a <colour> <shape>``."""
    if len(words) == 2 and words[0] == "a" and words[1] in SHAPES:
        raise _NotInWorld(f"'a {words[1]}' needs a colour, one of {', '.join(COLOURS)}")
    if len(words) != 3 or words[0] != "a":
        raise _NotInWorld(f"expected 'a <colour> <shape>', got {' '.join(words)!r}")
    colour = _colour(words[1])
    if words[2].removesuffix("s") in SHAPES and words[2] not in SHAPES:
        raise _NotInWorld(f"'a' takes the singular: write 'a {colour} {words[2].removesuffix('s')}'")
    return Obj(colour, _shape(words[2]))


def _parse_counting(words: list[str]) -> Scene:
    """``<two|three|four> <colour> <shapes>``."""
    first = words[0]
    if first not in _COUNT_OF:
        raise _NotInWorld(_bad_start(words))
    if len(words) != 3:
        raise _NotInWorld(f"a counting prompt is '<count> <colour> <shapes>', e.g. 'two red circles'; "
                          f"got {' '.join(words)!r}")
    colour = _colour(words[1])
    if words[2] in SHAPES:
        raise _NotInWorld(f"{first!r} takes the plural: write '{first} {colour} {words[2]}s'")
    shape = words[2].removesuffix("s")
    if shape not in SHAPES or shape == words[2]:
        raise _NotInWorld(f"unknown shape {words[2]!r}; shapes are {', '.join(s + 's' for s in SHAPES)}")
    return Scene("counting", (Obj(colour, shape),), count=_COUNT_OF[first])


def _bad_start(words: list[str]) -> str:
    """Why a prompt cannot start with its first word (not 'a', not a count word)."""
    first = words[0]
    if first in ("one", "1"):
        return "write 'a <colour> <shape>' for one object, e.g. 'a red circle'"
    if first.isdigit() and int(first) in COUNT_WORDS:
        return f"write the count as a word: '{COUNT_WORDS[int(first)]}', not '{first}'"
    if first.isdigit() or first in _OTHER_NUMBERS:
        return f"count {first!r} is out of range; counts are {', '.join(COUNT_WORDS.values())}"
    if first in COLOURS:
        shape = words[1].removesuffix("s") if len(words) > 1 and words[1].removesuffix("s") in SHAPES else "circle"
        return f"put 'a' or a count before the colour, as in 'a {first} {shape}' or 'two {first} {shape}s'"
    return f"a prompt starts with 'a' or a count ({', '.join(COUNT_WORDS.values())}), not {first!r}"


def _colour(word: str) -> str:
    if word in COLOURS:
        return word
    if word in SHAPES or word.removesuffix("s") in SHAPES:
        raise _NotInWorld(f"expected a colour before the shape, got {word!r}; colours are {', '.join(COLOURS)}")
    raise _NotInWorld(f"unknown colour {word!r}; colours are {', '.join(COLOURS)}")


def _shape(word: str) -> str:
    if word in SHAPES:
        return word
    raise _NotInWorld(f"unknown shape {word!r}; shapes are {', '.join(SHAPES)}")


# --------------------------------------------------------------------------------------------
# Splits: held-out pairings and compositions

HELDOUT_PAIRS: tuple[tuple[str, str], ...] = (("yellow", "triangle"), ("cyan", "circle"), ("magenta", "square"))
"""Colour-shape pairings no training prompt contains (each colour and shape is still seen in training)."""

HELDOUT_COMPOSITIONS: tuple[tuple[Obj, Obj], ...] = (
    (Obj("red", "square"), Obj("green", "circle")),
    (Obj("blue", "circle"), Obj("white", "triangle")),
    (Obj("yellow", "square"), Obj("magenta", "triangle")),
    (Obj("green", "triangle"), Obj("cyan", "square")),
    (Obj("white", "circle"), Obj("red", "triangle")),
    (Obj("magenta", "circle"), Obj("yellow", "circle")),
    (Obj("green", "square"), Obj("green", "triangle")),
    (Obj("cyan", "triangle"), Obj("blue", "square")),
)
"""Object pairs (either order, with ``and`` and every relation) seen in training only apart."""

HELDOUT_COUNTS: tuple[tuple[int, Obj], ...] = (
    (2, Obj("white", "triangle")),
    (3, Obj("red", "square")),
    (4, Obj("green", "circle")),
    (2, Obj("magenta", "circle")),
    (3, Obj("cyan", "square")),
    (4, Obj("yellow", "square")),
)
"""Counts of objects that training shows with the other counts only."""

_HELD_PAIRS = frozenset(HELDOUT_PAIRS)
_HELD_COMPOSITIONS = frozenset(frozenset(pair) for pair in HELDOUT_COMPOSITIONS)
_HELD_COUNTS = frozenset(HELDOUT_COUNTS)


def heldout_kind(scene: Scene) -> str | None:
    """``"pair"`` if an object is a held-out pairing, ``"composition"`` if the combination is held out."""
    if any((o.colour, o.shape) in _HELD_PAIRS for o in scene.objects):
        return "pair"
    if scene.task == "counting" and (scene.count, scene.objects[0]) in _HELD_COUNTS:
        return "composition"
    if len(scene.objects) == 2 and frozenset(scene.objects) in _HELD_COMPOSITIONS:
        return "composition"
    return None


def split_of(scene: Scene) -> str:
    """``"train"`` or ``"heldout"``."""
    return "train" if heldout_kind(scene) is None else "heldout"


@cache
def _all_scenes() -> tuple[Scene, ...]:
    objects = [Obj(c, s) for c in COLOURS for s in SHAPES]
    pairs = [(a, b) for a in objects for b in objects if a != b]
    return (
        *(Scene("single", (o,)) for o in objects),
        *(Scene("counting", (o,), count=n) for n in COUNT_WORDS for o in objects),
        *(Scene("two_objects", pair) for pair in pairs),
        *(Scene("position", pair, relation=r) for r in RELATIONS for pair in pairs),
    )


HELDOUT_HALVES = ("validation", "test")
"""Disjoint halves of the held-out split: one for choosing settings (beta, learning rate, the
iteration to report), the other for the figures reported at the chosen settings."""


@cache
def _scenes_of(split: str, task: str) -> tuple[Scene, ...]:
    if split == ANY_SPLIT:
        return tuple(s for s in _all_scenes() if s.task == task)
    if split in HELDOUT_HALVES:
        return tuple(s for s in _scenes_of("heldout", task) if heldout_half(s) == split)
    return tuple(s for s in _all_scenes() if s.task == task and split_of(s) == split)


@cache
def heldout_half(scene: Scene) -> str:
    """``"validation"`` or ``"test"`` for a held-out scene: within each (task, held-out kind), the
    scenes in grammar order alternate test, validation, test, ... so each half holds both kinds of
    every task."""
    same = [s for s in _scenes_of("heldout", scene.task) if heldout_kind(s) == heldout_kind(scene)]
    return HELDOUT_HALVES[same.index(scene) % 2 == 0]


def _check_split(split: str, allowed: tuple[str, ...] = SPLITS) -> None:
    if split not in allowed:
        raise TempflowError(f"unknown split {split!r}; choose one of {', '.join(allowed)}")


def all_prompts() -> list[str]:
    """Every prompt of the grammar, canonical, grouped by task in :data:`TASKS` order."""
    return [s.prompt for s in _all_scenes()]


def train_prompts() -> list[str]:
    """The prompts of :func:`all_prompts` that :func:`split_of` puts in training."""
    return [s.prompt for s in _all_scenes() if split_of(s) == "train"]


def heldout_prompts() -> list[str]:
    """The prompts of :func:`all_prompts` held out of training."""
    return [s.prompt for s in _all_scenes() if split_of(s) == "heldout"]


def eval_prompts(split: str = "heldout", per_task: int = 16, seed: int = 0) -> list[str]:
    """``per_task`` prompts of each task of ``split`` (all of a task's prompts when it has fewer).

    ``split`` is ``train``, ``heldout`` or one of its :data:`HELDOUT_HALVES`. Deterministic in ``seed``.
    Within a task the held-out kinds (pairing, composition) take turns, so a held-out subset always
    tests both.
    """
    _check_split(split, SPLITS + HELDOUT_HALVES)
    picked = []
    for t, task in enumerate(TASKS):
        groups: dict[str, list[Scene]] = {}
        for scene in _scenes_of(split, task):
            groups.setdefault(str(heldout_kind(scene)), []).append(scene)
        rng = np.random.default_rng([seed, t])
        queues = [[groups[kind][i] for i in rng.permutation(len(groups[kind]))] for kind in sorted(groups)]
        picked += [s.prompt for s in _take_turns(queues, per_task)]
    return picked


def _take_turns(queues: list[list[Scene]], count: int) -> list[Scene]:
    """Up to ``count`` scenes, one from each queue in turn."""
    chosen: list[Scene] = []
    while len(chosen) < count and any(queues):
        for queue in queues:
            if queue and len(chosen) < count:
                chosen.append(queue.pop(0))
    return chosen


ANY_SPLIT = "any"
"""The whole grammar, both splits: what an image codec (the latent presets' autoencoder) learns from.
Held-out pairings are held out of the text-to-image mapping, not out of the images a codec can
represent, just as SD3's autoencoder was trained on images of every kind (BENCHMARKS.md: an
autoencoder that never saw a yellow triangle reconstructed held-out pairings badly for one seed in two)."""


def sample_scene(rng: np.random.Generator, split: str = "train") -> Scene:
    """A random scene of ``split`` (or of :data:`ANY_SPLIT`): the task uniformly, then a scene of that
    task uniformly."""
    _check_split(split, SPLITS + (ANY_SPLIT,))
    scenes = _scenes_of(split, TASKS[int(rng.integers(len(TASKS)))])
    return scenes[int(rng.integers(len(scenes)))]


# --------------------------------------------------------------------------------------------
# Rendering: random sizes and places that satisfy the prompt

MARGIN_FRACTION = 0.1
"""A relation holds when the centroids are apart by more than this fraction of the image side."""


@dataclass(frozen=True)
class Geometry:
    """Sizes in pixels for images of side ``size``: 32 is the reference, everything scales with it."""

    size: int

    def __post_init__(self) -> None:
        if self.size < 16:
            raise TempflowError(f"shapes images must be at least 16 pixels wide (got {self.size})")

    @property
    def min_side(self) -> int:
        """Smallest object (side of its square box): 7 px at 32."""
        return max(4, round(7 * self.size / 32))

    @property
    def max_side(self) -> int:
        """Largest object: 11 px at 32 (four fit)."""
        return max(self.min_side, round(11 * self.size / 32))

    @property
    def gap(self) -> int:
        """Empty pixels between objects' boxes, so they stay separate 8-connected components."""
        return max(2, round(self.size / 16))

    @property
    def margin(self) -> float:
        """How far apart (px) centroids must be for a relation: 3.2 at 32."""
        return MARGIN_FRACTION * self.size

    @property
    def min_area(self) -> int:
        """Smallest component :func:`detect` keeps: 5 px at 32."""
        return min_area(self.size, self.size)


def min_area(height: int, width: int) -> int:
    """Smaller components are noise: 5 px at 32x32, scaled with the image area (at least 3)."""
    return max(3, round(5 * height * width / 1024))


@cache
def _mask(shape: str, side: int) -> np.ndarray:
    """``(side, side)`` bool: filled square, disc, or upright triangle (base = height = side)."""
    y, x = np.mgrid[0:side, 0:side] + 0.5  # pixel centres
    half = side / 2
    if shape == "square":
        mask = np.ones((side, side), dtype=bool)
    elif shape == "circle":
        mask = (x - half) ** 2 + (y - half) ** 2 <= half**2
    else:  # half-width grows linearly from 0.5 px at the apex row to side / 2 at the base row
        mask = np.abs(x - half) <= half * (y + 0.5) / side
    mask.flags.writeable = False
    return mask


@cache
def _mask_centroid(shape: str, side: int) -> tuple[float, float]:
    ys, xs = np.nonzero(_mask(shape, side))
    return float(xs.mean()), float(ys.mean())


@dataclass(frozen=True)
class Placed:
    """An object drawn in a ``side`` x ``side`` box whose top-left pixel is (``top``, ``left``)."""

    obj: Obj
    top: int
    left: int
    side: int

    @property
    def centroid(self) -> tuple[float, float]:
        """(x, y) mean of the object's pixel indices, as :func:`detect` measures it."""
        cx, cy = _mask_centroid(self.obj.shape, self.side)
        return self.left + cx, self.top + cy

    def apart(self, other: Placed, gap: int) -> bool:
        """At least ``gap`` empty pixels between the two boxes, along x or along y."""
        return (self.left + self.side + gap <= other.left or other.left + other.side + gap <= self.left
                or self.top + self.side + gap <= other.top or other.top + other.side + gap <= self.top)


def holds(relation: str, first: tuple[float, float], second: tuple[float, float], margin: float) -> bool:
    """Whether centroid ``first`` (x, y) is ``relation`` centroid ``second``, by more than ``margin``.

    y is the image row, so ``above`` means a smaller y.
    """
    (x1, y1), (x2, y2) = first, second
    return {"left of": x1 + margin < x2, "right of": x1 > x2 + margin,
            "above": y1 + margin < y2, "below": y1 > y2 + margin}[relation]


def layout(scene: Scene, rng: np.random.Generator, size: int = 32, tries: int = 30) -> list[Placed]:
    """Where to draw each object of ``scene``: random sizes and places, apart, relation held.

    Tries ``tries`` random layouts, then falls back to a jittered 2x2 grid that is correct by construction.
    """
    geo = Geometry(size)
    for _ in range(tries):
        placed = _random_layout(scene.copies, rng, geo)
        if placed is not None and _relation_ok(scene, placed, geo):
            return placed
    return _grid_layout(scene, rng, geo)


def _random_layout(objs: list[Obj], rng: np.random.Generator, geo: Geometry, tries: int = 20) -> list[Placed] | None:
    placed: list[Placed] = []
    for obj in objs:
        for _ in range(tries):
            side = int(rng.integers(geo.min_side, geo.max_side + 1))
            top, left = rng.integers(0, geo.size - side + 1, size=2)
            candidate = Placed(obj, int(top), int(left), side)
            if all(candidate.apart(p, geo.gap) for p in placed):
                break
        else:
            return None
        placed.append(candidate)
    return placed


def _relation_ok(scene: Scene, placed: list[Placed], geo: Geometry) -> bool:
    # one extra pixel so the reward's float centroids cannot land on the boundary
    return scene.relation is None or holds(scene.relation, placed[0].centroid, placed[1].centroid, geo.margin + 1)


def _grid_layout(scene: Scene, rng: np.random.Generator, geo: Geometry) -> list[Placed]:
    """One object per quadrant, each inside its cell less ``gap`` on the far sides, so boxes stay apart.

    For a relation the two objects sit in cells on the two sides of the image's middle line: their
    centroids are then more than ``gap + min_side / 2`` px apart, which exceeds ``margin + 1``.
    """
    cell = geo.size // 2
    objs = scene.copies
    cells = _grid_cells(scene.relation, rng)[: len(objs)]
    room = cell - geo.gap
    placed = []
    for obj, (row, col) in zip(objs, cells):
        side = int(rng.integers(geo.min_side, min(geo.max_side, room) + 1))
        dy, dx = rng.integers(0, room - side + 1, size=2)
        placed.append(Placed(obj, row * cell + int(dy), col * cell + int(dx), side))
    return placed


def _grid_cells(relation: str | None, rng: np.random.Generator) -> list[tuple[int, int]]:
    """(row, col) quadrants: a random order, or for a relation the first object's side and the other."""
    if relation is None:
        return [divmod(int(i), 2) for i in rng.permutation(4)]
    a, b = (int(v) for v in rng.integers(0, 2, size=2))
    return {"left of": [(a, 0), (b, 1)], "right of": [(a, 1), (b, 0)],
            "above": [(0, a), (1, b)], "below": [(1, a), (0, b)]}[relation]


def paint(placed: Sequence[Placed], size: int = 32) -> np.ndarray:
    """The image ``(size, size, 3)`` uint8: black with each placed object filled in its colour."""
    image = np.zeros((size, size, 3), dtype=np.uint8)
    for p in placed:
        box = image[p.top:p.top + p.side, p.left:p.left + p.side]
        box[_mask(p.obj.shape, p.side)] = COLOURS[p.obj.colour]
    return image


def render(scene: Scene, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """A ground-truth image ``(size, size, 3)`` uint8 of ``scene``: :func:`check` meets every requirement."""
    return paint(layout(scene, rng, size), size)


def render_batch(scenes: Sequence[Scene], rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """``(N, size, size, 3)`` uint8, one :func:`render` per scene."""
    images = np.zeros((len(scenes), size, size, 3), dtype=np.uint8)
    for i, scene in enumerate(scenes):
        images[i] = render(scene, rng, size)
    return images


# --------------------------------------------------------------------------------------------
# Detection: palette snapping, connected components, shape from geometry

# palette index of a pixel: 4 * (R >= 128) + 2 * (G >= 128) + (B >= 128); 0 is the black background
_COLOUR_OF_INDEX = {4 * (r > 127) + 2 * (g > 127) + (b > 127): name for name, (r, g, b) in COLOURS.items()}
# 8-connectivity: each pixel links to its right, lower, lower-right and lower-left neighbours
_NEIGHBOURS = ((0, 1), (1, 0), (1, 1), (1, -1))
# an outer row (column) of a component is a spur when the next one holds this many times its pixels: a
# stray pixel on a square's edge would otherwise make its box's corners look empty
_SPUR = 4
# corner triangles reach this fraction of the box's mean side (L1 distance from the corner)
_CORNER_REACH = 0.28


@dataclass(frozen=True)
class Detection:
    """One connected component of one palette colour.

    ``area``, ``cx``, ``cy``: the number of its pixels and their mean column and row index.
    ``top``, ``left``, ``width``, ``height``: the box its shape is measured in, its bounding box less
    spur rows and columns. Within that box, ``fill`` is pixels / box area, ``top_share`` the part of
    the pixels in its upper half (0.5 for squares and circles, 0.3 for an upright triangle) and
    ``corner_fill`` how full its corners are (1 for a square, 0 for a circle, 0.4 for a triangle).
    """

    colour: str
    shape: str  # one of SHAPES or "unknown"
    area: int
    cx: float
    cy: float
    top: int
    left: int
    width: int
    height: int
    fill: float
    top_share: float
    corner_fill: float


def classify(width: np.ndarray, height: np.ndarray, fill: np.ndarray, top_share: np.ndarray,
             corner_fill: np.ndarray) -> np.ndarray:
    """Shape names (``<U8``) from box size, fill, top share and corner fill (see :class:`Detection`), elementwise.

    * aspect (width / height) outside [0.5, 2] -> unknown
    * top share < 0.42 and fill < 0.8 -> triangle (narrow top, wide base)
    * top share in [0.42, 0.58] and fill >= 0.75, with corners at least half full or fill >= 0.9 (a
      square with blurred corners) -> square
    * top share in [0.42, 0.58] and fill >= 0.6, not a square -> circle
    * anything else -> unknown (e.g. an upside-down triangle, a ring, a diamond, a diagonal streak)
    """
    aspect = width / height
    balanced = (top_share >= 0.42) & (top_share <= 0.58)
    square = balanced & (fill >= 0.75) & ((corner_fill >= 0.5) | (fill >= 0.9))
    circle = balanced & (fill >= 0.6)  # np.select takes the first match: squares are out already
    shape = np.select([(aspect < 0.5) | (aspect > 2), (top_share < 0.42) & (fill < 0.8), square, circle],
                      ["unknown", "triangle", "square", "circle"], default="unknown")
    return shape.astype("<U8")


def palette_index(images: np.ndarray) -> np.ndarray:
    """``(..., H, W)`` int64 in 0..7 from ``(..., H, W, 3)``: 4 (R >= 128) + 2 (G >= 128) + (B >= 128).

    0 is the background (every channel dark); each other value is one colour of :data:`COLOURS`.
    """
    bits = np.asarray(images) >= 128
    return 4 * bits[..., 0].astype(np.int64) + 2 * bits[..., 1] + bits[..., 2]


def components(index: np.ndarray) -> np.ndarray:
    """Connected components (8-connected) of equal non-zero values, per image of ``index`` ``(N, H, W)``.

    Returns ``(N * H * W,)``: the flat id of each pixel's component root (its smallest flat pixel id);
    background pixels are their own root. Union-find in bulk: every round hooks each root to the
    smallest root it touches, then pointer jumping flattens the trees; it stops when no edge joins two
    roots (a few rounds for image-like components).
    """
    flat = index.reshape(-1)
    ids = np.arange(flat.size).reshape(index.shape)
    _, h, w = index.shape
    heads, tails = [], []
    for dy, dx in _NEIGHBOURS:
        a = ids[:, : h - dy, max(0, -dx): w - max(0, dx)]
        b = ids[:, dy:, max(0, dx): w - max(0, -dx)]
        same = (flat[a] == flat[b]) & (flat[a] > 0)
        heads.append(a[same])
        tails.append(b[same])
    a, b = np.concatenate(heads), np.concatenate(tails)
    parent = np.arange(flat.size)
    while a.size:
        ra, rb = parent[a], parent[b]
        apart = ra != rb
        a, b, ra, rb = a[apart], b[apart], ra[apart], rb[apart]
        np.minimum.at(parent, np.maximum(ra, rb), np.minimum(ra, rb))  # always to a smaller id: no cycles
        while True:
            jumped = parent[parent]
            if np.array_equal(jumped, parent):
                break
            parent = jumped
    return parent


@dataclass
class _Blobs:
    """Foreground pixels of a batch, flat, grouped into ``count`` components: ``comp``, column ``x``, row ``y``."""

    comp: np.ndarray
    x: np.ndarray
    y: np.ndarray
    count: int

    def total(self, weights: np.ndarray | None = None) -> np.ndarray:
        """``(count,)`` per-component sum of ``weights`` (pixel counts when None)."""
        return np.bincount(self.comp, weights, minlength=self.count)

    def extent(self, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-component smallest and largest of the pixel coordinate ``v``."""
        lo, hi = np.full(self.count, v.max(initial=0)), np.full(self.count, 0)
        np.minimum.at(lo, self.comp, v)
        np.maximum.at(hi, self.comp, v)
        return lo, hi

    def core(self, v: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``extent`` less a spur at each end: an outer line (row or column, along ``v``) holding at most
        a quarter of the pixels of the line next to it, like a stray pixel on a square's edge."""
        span = int((hi - lo).max(initial=0)) + 2  # one empty line more, so lines[:, 1] always exists
        lines = np.bincount(self.comp * span + v - lo[self.comp], minlength=self.count * span).reshape(self.count, span)
        rows, last = np.arange(self.count), hi - lo
        spur_lo = _SPUR * lines[:, 0] <= lines[:, 1]
        spur_hi = _SPUR * lines[rows, last] <= lines[rows, np.maximum(last - 1, 0)]
        return lo + spur_lo, hi - spur_hi


def _shape_features(blobs: _Blobs) -> tuple[np.ndarray, ...]:
    """Per component: its core box (left, top, width, height), fill, top share and corner fill."""
    x, y, comp = blobs.x, blobs.y, blobs.comp
    left, right = blobs.core(x, *blobs.extent(x))
    top, bottom = blobs.core(y, *blobs.extent(y))
    width, height = right - left + 1, bottom - top + 1
    inside = (x >= left[comp]) & (x <= right[comp]) & (y >= top[comp]) & (y <= bottom[comp])
    area = np.maximum(blobs.total(inside), 1)
    # upper half of the box: rows whose centre is above its middle line; the middle row counts half
    row2 = 2 * (y - top[comp]) + 1
    upper = np.where(row2 < height[comp], 1.0, np.where(row2 == height[comp], 0.5, 0.0))
    # corner triangles: pixel centres within L1 distance t of a corner; a disc inscribed in the box
    # reaches that line only at t = 0.293 side, so a circle leaves them empty and a square fills them
    reach = _CORNER_REACH * (width + height) / 2
    dx, dy = x - left[comp] + 0.5, y - top[comp] + 0.5
    near = np.minimum(dx, width[comp] - dx) + np.minimum(dy, height[comp] - dy) < reach[comp]
    k = np.maximum(np.ceil(reach) - 2, -1)  # lattice points i, j >= 0 with i + j + 1 < t: (k+1)(k+2)/2
    cells = np.maximum(2 * (k + 1) * (k + 2), 1)  # ... in 4 corners
    fill = area / (width * height)
    return left, top, width, height, fill, blobs.total(upper * inside) / area, blobs.total(near & inside) / cells


def detect_batch(images: np.ndarray) -> list[list[Detection]]:
    """:func:`detect` for each image of ``(N, H, W, 3)``, in one vectorised pass."""
    images = _as_images(images)
    n, h, w, _ = images.shape
    index = palette_index(images)  # (N, H, W)
    pixels = np.flatnonzero(index)
    roots, comp = np.unique(components(index)[pixels], return_inverse=True)  # comp: pixel -> component
    big = np.bincount(comp, minlength=roots.size) >= min_area(h, w)
    keep = big[comp]
    roots, pixels = roots[big], pixels[keep]
    comp = (np.cumsum(big) - 1)[comp[keep]]  # renumber the kept components 0 .. count-1
    blobs = _Blobs(comp, pixels % w, pixels % (h * w) // w, roots.size)
    area = blobs.total()
    cx, cy = blobs.total(blobs.x) / np.maximum(area, 1), blobs.total(blobs.y) / np.maximum(area, 1)
    left, top, width, height, fill, top_share, corner_fill = _shape_features(blobs)
    shape = classify(width, height, fill, top_share, corner_fill)
    colour = index.reshape(-1)[roots]
    found: list[list[Detection]] = [[] for _ in range(n)]
    for k in range(roots.size):
        found[int(roots[k]) // (h * w)].append(Detection(
            _COLOUR_OF_INDEX[int(colour[k])], str(shape[k]), int(area[k]), float(cx[k]), float(cy[k]),
            int(top[k]), int(left[k]), int(width[k]), int(height[k]), float(fill[k]), float(top_share[k]),
            float(corner_fill[k])))
    return found


def detect(image: np.ndarray) -> list[Detection]:
    """The objects in one image ``(H, W, 3)``: components of one palette colour of at least :func:`min_area`.

    A pixel is background when every channel is below 128; otherwise each channel thresholded at 128
    picks one of the 7 colours (:func:`palette_index`).
    """
    image = np.asarray(image)
    if image.ndim != 3:
        raise TempflowError(f"expected one image (H, W, 3), got shape {image.shape}")
    return detect_batch(image[None])[0]


def _as_images(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or 0 in images.shape[1:3]:
        raise TempflowError(f"expected images (N, H, W, 3), got shape {images.shape}")
    return images


# --------------------------------------------------------------------------------------------
# The reward: GenEval's requirements, checked on detections


@dataclass(frozen=True)
class Verdict:
    """Which requirements of a scene an image meets, aligned with :func:`requirements`."""

    requirements: list[str]
    met: list[bool]
    clean: float = 1.0
    """Share of the detected objects that were asked for (0 when nothing is detected); the last
    requirement, "nothing else", is met when it is 1."""

    @property
    def score(self) -> float:
        """Fraction of requirements met, in [0, 1], "nothing else" counted by :attr:`clean` (partial
        credit, so that a policy drawing clutter has a gradient toward drawing less of it)."""
        return (sum(self.met[:-1]) + self.clean) / len(self.met)

    @property
    def strict(self) -> bool:
        """Every requirement met (GenEval's per-image correctness)."""
        return all(self.met)


NOTHING_ELSE = "nothing else in the image"
"""The last requirement of every scene: every detected object is one that was asked for (a missing
one is the presence requirement's loss, an extra copy the count's and this one's). GenEval's
detector ignores clutter; a geometric classifier does not, and without this requirement a policy
learns to fill the canvas with fragments of the asked colours until one of them passes for the
asked shape (observed: held-out reward up, images worse)."""


def requirements(scene: Scene) -> list[str]:
    """Human-readable names of what :func:`check` tests, e.g. ``red circle left of blue square``."""
    names = [f"{o.name} present" for o in scene.objects]
    if scene.task == "counting":
        names.append(f"exactly {COUNT_WORDS[scene.count]} {scene.objects[0].plural}")
    if scene.task == "position":
        names.append(f"{scene.objects[0].name} {scene.relation} {scene.objects[1].name}")
    names.append(NOTHING_ELSE)
    return names


def judge(found: list[Detection], scene: Scene, height: int, width: int) -> Verdict:
    """:func:`check` on detections already made in an image of ``height`` x ``width``."""
    matches = [[d for d in found if d.colour == o.colour and d.shape == o.shape] for o in scene.objects]
    met = [bool(m) for m in matches]
    if scene.task == "counting":
        met.append(len(matches[0]) == scene.count)
    if scene.relation is not None:
        margin = MARGIN_FRACTION * (width if scene.relation in ("left of", "right of") else height)
        met.append(any(holds(scene.relation, (a.cx, a.cy), (b.cx, b.cy), margin)
                       for a in matches[0] for b in matches[1]))
    clean = _share_asked(found, scene)
    met.append(clean == 1.0)
    return Verdict(requirements(scene), met, clean)


def _share_asked(found: list[Detection], scene: Scene) -> float:
    """Detections that fill an asked-for copy (each copy filled once), over all detections."""
    left = Counter((o.colour, o.shape) for o in scene.copies)
    filled = 0
    for d in found:
        if left[(d.colour, d.shape)] > 0:
            left[(d.colour, d.shape)] -= 1
            filled += 1
    if not found:
        return 0.0  # an empty canvas shows nothing that was asked for
    return filled / len(found)


def check(image: np.ndarray, scene: Scene) -> Verdict:
    """Which requirements of ``scene`` the image ``(H, W, 3)`` uint8 meets."""
    image = np.asarray(image)
    return judge(detect(image), scene, image.shape[0], image.shape[1])


def verdicts(images: np.ndarray, prompts: Sequence[str]) -> list[Verdict]:
    """One :class:`Verdict` per image of ``(N, H, W, 3)`` for its prompt (parsed; refused outside the grammar)."""
    images = _as_images(images)
    if len(prompts) != images.shape[0]:
        raise TempflowError(f"shapes reward: {images.shape[0]} images but {len(prompts)} prompts")
    scenes = [_parse_cached(p) for p in prompts]
    found = detect_batch(images)
    return [judge(f, s, images.shape[1], images.shape[2]) for f, s in zip(found, scenes)]


@lru_cache(maxsize=4096)
def _parse_cached(prompt: str) -> Scene:
    return parse_prompt(prompt)


def shapes_reward(images: np.ndarray, prompts: list[str]) -> np.ndarray:
    """Fraction of the prompt's requirements each image meets, float64 in [0, 1]."""
    return np.array([v.score for v in verdicts(images, prompts)], dtype=np.float64)


def shapes_strict(images: np.ndarray, prompts: list[str]) -> np.ndarray:
    """1.0 where an image meets every requirement of its prompt, else 0.0."""
    return np.array([float(v.strict) for v in verdicts(images, prompts)], dtype=np.float64)


# --------------------------------------------------------------------------------------------
# The hooks `tempflow pretrain` and `tempflow eval` call (stages.worlds)

WORLD_REWARDS = ("shapes", "shapes_strict")
"""The rewards of this world: with one of them, prompts must follow its grammar and the verdicts
(strict accuracy, per task, per requirement) are written too."""
EVAL_SPLITS = {
    "heldout": "pairings and compositions never trained on",
    "validation": "half of the held-out prompts, for choosing settings",
    "test": "the other half, for reporting at the chosen settings",
    "train": "the training split",
}
"""The splits `tempflow eval --split` draws prompts from (:func:`eval_prompts`)."""


def training_batch(rng: np.random.Generator, batch_size: int, size: int, codec: bool) -> tuple[list[str], np.ndarray]:
    """Prompts and rendered images ``(B, size, size, 3)`` uint8 of a pretraining step: scenes of the
    train split for the text-to-image mapping, of both splits for an image codec (``codec``, see
    :data:`ANY_SPLIT`)."""
    scenes = [sample_scene(rng, ANY_SPLIT if codec else "train") for _ in range(batch_size)]
    return [scene.prompt for scene in scenes], render_batch(scenes, rng, size)


def parse_prompts(prompts: Sequence[str], source: str = "") -> list[Scene]:
    """Every prompt's scene; one outside the grammar is refused, naming its line and ``source``."""
    scenes = []
    for line, prompt in enumerate(prompts, 1):
        try:
            scenes.append(parse_prompt(prompt))
        except TempflowError as err:
            raise TempflowError(f"{source + ': ' if source else ''}prompt {line}: {err}; the shapes reward scores the "
                                "shapes world's prompts only, so name another reward for these (e.g. --reward pickscore)") from None
    return scenes


def image_verdict(image: np.ndarray, scene: Scene) -> dict[str, object]:
    """What an evaluation records of one image: its task, the fraction of requirements met, the share
    of what it drew that was asked for, whether all are met (strict), and each requirement's verdict."""
    verdict = check(image, scene)
    return {"task": scene.task, "met": verdict.score, "clean": verdict.clean, "strict": bool(verdict.strict),
            "requirements": dict(zip(requirements(scene), map(bool, verdict.met)))}
