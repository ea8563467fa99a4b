"""ShapesWorld scenes: the vocabulary of the world, the scene records, and how random scenes are drawn.

A scene is 1–4 coloured shapes on a 3×3 grid of cells (one object per cell, so objects never overlap) over a plain
or two-tone background. Object colours and background colours come from two palettes chosen far apart in RGB, so a
reader can tell object from background by nearest colour even on a blurred, noisy image.

A handful of colour–shape pairs (`HELD_OUT_PAIRS`) never occur in the training split; validation and test use them
to measure composition (a "purple star" from having seen purple things and stars separately).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond")
SHAPE_PLURALS: dict[str, str] = {
    "circle": "circles", "square": "squares", "triangle": "triangles",
    "star": "stars", "cross": "crosses", "diamond": "diamonds",
}

# Saturated, mutually distant colours (closest pair ≈ 95 in RGB distance); no greys except white, so that the
# grey/dark backgrounds and every object/background blend at an edge stay nearer to a background than to an object.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (225, 30, 30),
    "orange": (250, 130, 20),
    "yellow": (245, 225, 40),
    "green": (40, 185, 60),
    "cyan": (40, 210, 225),
    "blue": (45, 85, 235),
    "purple": (150, 60, 210),
    "white": (245, 245, 245),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)

# Dark, desaturated backgrounds: every one is ≥ 120 away from every object colour.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (18, 18, 20),
    "dark gray": (58, 58, 62),
    "gray": (96, 96, 100),
    "navy": (30, 38, 70),
    "olive": (60, 62, 34),
    "maroon": (70, 32, 44),
}
BACKGROUND_NAMES: tuple[str, ...] = tuple(BACKGROUNDS)
# plain: one colour; horizontal: a horizontal line splits top (first colour) from bottom; vertical: left | right.
LAYOUTS: tuple[str, ...] = ("plain", "horizontal", "vertical")

SIZES: tuple[str, ...] = ("small", "large")

GRID = 3
ROW_NAMES: tuple[str, ...] = ("top", "middle", "bottom")
COLUMN_NAMES: tuple[str, ...] = ("left", "center", "right")
# "top left", "top center", ..., "center" (not "middle center"), ..., "bottom right", in reading order.
CELL_NAMES: tuple[str, ...] = tuple("center" if (row, column) == ("middle", "center") else f"{row} {column}"
                                    for row in ROW_NAMES for column in COLUMN_NAMES)
MAX_OBJECTS = 4

# Relations between two objects are read off their cells: A is "left of" B when A's column is left of B's column,
# whatever the rows. Questions, prompts and the scorer all use this one definition.
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")

# Never in a training scene, caption, question or prompt. Every colour and every shape still occurs in training.
HELD_OUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("purple", "star"),
    ("yellow", "cross"),
    ("cyan", "triangle"),
    ("orange", "diamond"),
    ("green", "circle"),
)
# exclude: no held-out pair anywhere; include: pairs occur at their natural rate; only: every scene (and every
# prompt's target scene) holds at least one held-out pair, and every prompt that names colours names one.
HELD_OUT_MODES: tuple[str, ...] = ("exclude", "include", "only")

ALL_PAIRS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLOR_NAMES for s in SHAPES)
TRAIN_PAIRS: tuple[tuple[str, str], ...] = tuple(p for p in ALL_PAIRS if p not in HELD_OUT_PAIRS)


def _check_choice(kind: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {kind} {value!r}; allowed: {', '.join(map(repr, allowed))}")


def check_held_out_mode(held_out: str) -> None:
    _check_choice("held_out mode", held_out, HELD_OUT_MODES)


def cell_row_col(cell: int) -> tuple[int, int]:
    return divmod(cell, GRID)


def relation_holds(cell_a: int, cell_b: int, relation: str) -> bool:
    """Whether the object in `cell_a` stands in `relation` to the object in `cell_b` (see RELATIONS)."""
    _check_choice("relation", relation, RELATIONS)
    (row_a, col_a), (row_b, col_b) = cell_row_col(cell_a), cell_row_col(cell_b)
    return {
        "left of": col_a < col_b,
        "right of": col_a > col_b,
        "above": row_a < row_b,
        "below": row_a > row_b,
    }[relation]


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    cell: int  # 0..8, row-major over the 3×3 grid

    def __post_init__(self) -> None:
        _check_choice("shape", self.shape, SHAPES)
        _check_choice("color", self.color, COLOR_NAMES)
        _check_choice("size", self.size, SIZES)
        _check_choice("cell", self.cell, range(GRID * GRID))

    @property
    def position(self) -> str:
        return CELL_NAMES[self.cell]

    @property
    def pair(self) -> tuple[str, str]:
        return (self.color, self.shape)


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]  # sorted by cell
    background: tuple[str, ...]  # one colour for "plain", two for a split layout
    layout: str = "plain"

    def __post_init__(self) -> None:
        if not 1 <= len(self.objects) <= GRID * GRID:
            raise ValueError(f"a scene holds 1 to {GRID * GRID} objects, got {len(self.objects)}")
        cells = [o.cell for o in self.objects]
        if len(set(cells)) != len(cells):
            raise ValueError(f"one object per cell, got cells {cells}")
        if cells != sorted(cells):
            raise ValueError(f"objects must be sorted by cell, got cells {cells}")
        _check_choice("layout", self.layout, LAYOUTS)
        expected = 1 if self.layout == "plain" else 2
        if len(self.background) != expected:
            raise ValueError(f"layout {self.layout!r} takes {expected} background colour(s), got {self.background}")
        for name in self.background:
            _check_choice("background colour", name, BACKGROUND_NAMES)

    @classmethod
    def of(cls, objects: Sequence[SceneObject], background: Sequence[str] = ("black",), layout: str = "plain"
           ) -> Scene:
        """Build a scene from objects in any order."""
        return cls(tuple(sorted(objects, key=lambda o: o.cell)), tuple(background), layout)

    def count(self, shape: str | None = None, color: str | None = None) -> int:
        return sum((shape is None or o.shape == shape) and (color is None or o.color == color) for o in self.objects)

    def to_dict(self) -> dict:
        return {
            "objects": [{"shape": o.shape, "color": o.color, "size": o.size, "cell": o.cell, "position": o.position}
                        for o in self.objects],
            "background": list(self.background),
            "layout": self.layout,
        }

    @classmethod
    def from_dict(cls, record: dict) -> Scene:
        """Inverse of `to_dict` (derived keys such as position or bbox are ignored)."""
        objects = [SceneObject(o["shape"], o["color"], o["size"], int(o["cell"])) for o in record["objects"]]
        return cls.of(objects, record["background"], record["layout"])


class Rng:
    """Random draws built only on `random.Random.random()`.

    Python promises that method's sequence for a given seed across versions, but not choice/shuffle/sample, so
    everything else is derived from it here: a seed gives the same world on every Python.
    """

    def __init__(self, seed: int, stream: str = "") -> None:
        # The stream name gives independent draws per part of a sample, so changing how questions are drawn
        # never changes the scene drawn from the same seed.
        digest = hashlib.blake2b(f"{seed}/{stream}".encode(), digest_size=8).digest()
        self._random = random.Random(int.from_bytes(digest, "big"))

    def below(self, n: int) -> int:
        return min(int(self._random.random() * n), n - 1)

    def coin(self, p: float = 0.5) -> bool:
        return self._random.random() < p

    def choice(self, items: Sequence[T]) -> T:
        if not items:
            raise ValueError("cannot choose from an empty sequence")
        return items[self.below(len(items))]

    def shuffled(self, items: Sequence[T]) -> list[T]:
        out = list(items)
        for i in range(len(out) - 1, 0, -1):
            j = self.below(i + 1)
            out[i], out[j] = out[j], out[i]
        return out

    def sample(self, items: Sequence[T], k: int) -> list[T]:
        return self.shuffled(items)[:k]


def allowed_pairs(held_out: str) -> tuple[tuple[str, str], ...]:
    """Colour–shape pairs a freely drawn object may take (the forced object of "only" mode aside)."""
    check_held_out_mode(held_out)
    return TRAIN_PAIRS if held_out == "exclude" else ALL_PAIRS


def first_pairs(held_out: str) -> tuple[tuple[str, str], ...]:
    """Pairs the first object of a scene or prompt draws from: in "only" mode it carries the held-out pair."""
    return HELD_OUT_PAIRS if held_out == "only" else allowed_pairs(held_out)


def sample_background(rng: Rng) -> tuple[tuple[str, ...], str]:
    layout = "plain" if rng.coin() else rng.choice(LAYOUTS[1:])
    colors = rng.sample(BACKGROUND_NAMES, 1 if layout == "plain" else 2)
    return tuple(colors), layout


def sample_scene(rng: Rng, held_out: str = "exclude", num_objects: int | None = None,
                 max_objects: int = MAX_OBJECTS) -> Scene:
    """A random scene of `num_objects` objects (None: 1 to `max_objects`, uniformly); with held_out="only" one of
    its objects (at a random cell) takes a held-out pair."""
    check_held_out_mode(held_out)
    if not 1 <= max_objects <= MAX_OBJECTS:
        raise ValueError(f"max_objects must be in [1, {MAX_OBJECTS}], got {max_objects}")
    n = 1 + rng.below(max_objects) if num_objects is None else num_objects
    if not 1 <= n <= GRID * GRID:
        raise ValueError(f"num_objects must be in [1, {GRID * GRID}], got {n}")
    cells = rng.sample(range(GRID * GRID), n)
    objects = []
    for k, cell in enumerate(cells):
        color, shape = rng.choice(first_pairs(held_out) if k == 0 else allowed_pairs(held_out))
        objects.append(SceneObject(shape, color, rng.choice(SIZES), cell))
    background, layout = sample_background(rng)
    return Scene.of(objects, background, layout)


def curriculum_max_objects(step: int, curriculum_steps: int) -> int:
    """Most objects per scene at training step `step` of a curriculum that rises from one object to `MAX_OBJECTS`
    over `curriculum_steps` steps (0: no curriculum); the probe found one-object scenes first help."""
    if step >= curriculum_steps:
        return MAX_OBJECTS
    return 1 + (MAX_OBJECTS - 1) * step // curriculum_steps
