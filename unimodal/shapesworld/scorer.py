"""ShapesEval: read a ShapesWorld image back into objects, and grade it against a prompt or a scene.

The reader knows how the world is drawn:
1. every pixel takes the nearest colour of the object and background palettes; it is an object pixel when that
   colour is an object colour within `color_tolerance` (edge blends and noise fall to the background);
2. 4-connected blobs of object pixels are objects; blobs smaller than a fraction of the smallest object the world
   draws are speckles and dropped; holes are filled;
3. colour = the palette colour nearest the median of the blob's inner pixels (edge pixels are blends);
4. shape = the outline template (`render.shape_template`) nearest the blob's mask, both stretched to the blob's
   bounding box, plus a penalty for a wrong box aspect; too far from every template → "unknown";
5. size = the longer box side against the midpoint of small and large for that shape; cell = box centre.

Grading follows GenEval's rules (an include entry needs `count` objects of its class, of its colour if given,
in its relation to an object matched by the entry it points at; an exclude entry fails at `count` or more), with
relations read off cells exactly as the world defines them.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from .language import PROMPT_TAGS, check_prompt_meta
from .render import UNIT_OUTLINES, box_side, shape_aspect, shape_template
from .world import BACKGROUNDS, CELL_NAMES, COLORS, GRID, SHAPES, Scene, relation_holds

_OBJECT_RGB = np.array(list(COLORS.values()), dtype=np.float32)
_BACKGROUND_RGB = np.array(list(BACKGROUNDS.values()), dtype=np.float32)
_PALETTE_RGB = np.concatenate([_OBJECT_RGB, _BACKGROUND_RGB])
_COLOR_NAMES = list(COLORS)
_TEMPLATE_SIDE = 16
# Blur levels (sigma / shape extent) the reader expects: crisp renders up to a soft learned decoder.
_TEMPLATE_BLURS = (0.0, 0.04, 0.08)
_TEMPLATES = np.stack([[shape_template(s, _TEMPLATE_SIDE, b) for b in _TEMPLATE_BLURS] for s in SHAPES])
_LOG_ASPECTS = np.log([shape_aspect(s) for s in SHAPES])
_SCENE_ATTRIBUTES = ("shape", "color", "size", "position")


def _polygon_area(xy: np.ndarray) -> float:
    x, y = xy[:, 0], xy[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


# Area of each shape as a fraction of its drawing box (longer side 1), and of the smallest object the world draws
# as a fraction of the image.
_UNIT_AREAS = {s: _polygon_area(UNIT_OUTLINES[s]) / 4 for s in SHAPES}
_SMALLEST_OBJECT_FRACTION = min(_UNIT_AREAS[s] * box_side("small", s, 1) ** 2 for s in SHAPES)


@dataclass(frozen=True)
class ScorerConfig:
    color_tolerance: float = 100.0  # RGB distance (0–255 scale) within which a pixel counts as an object colour
    min_area_fraction: float = 0.35  # of the smallest object the world draws; smaller blobs are speckles
    max_shape_distance: float = 0.3  # mean template mismatch (+ aspect penalty) above which a shape is "unknown"
    aspect_weight: float = 0.5


@dataclass(frozen=True)
class DetectedObject:
    shape: str  # a SHAPES name or "unknown"
    color: str  # a COLORS name or "unknown"
    size: str
    cell: int
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, end-exclusive
    pixels: int
    shape_distance: float  # mismatch to the chosen template; 0 is a perfect fit

    @property
    def position(self) -> str:
        return CELL_NAMES[self.cell]


def _segment(rgb: np.ndarray, tolerance: float) -> np.ndarray:
    """Boolean [H, W]: pixels nearest an object colour (not a background one) and within tolerance."""
    flat = rgb.reshape(-1, 3)
    sq = (flat**2).sum(1, keepdims=True) - 2 * flat @ _PALETTE_RGB.T + (_PALETTE_RGB**2).sum(1)
    nearest = sq.argmin(1)
    is_object = (nearest < len(_OBJECT_RGB)) & (sq[np.arange(len(flat)), nearest] <= tolerance**2)
    return is_object.reshape(rgb.shape[:2])


def _median_color(pixels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    core = ndimage.binary_erosion(mask)
    return np.median(pixels[core if core.sum() >= 4 else mask], axis=0)


def _color_name(rgb: np.ndarray, tolerance: float) -> str:
    distances = np.linalg.norm(_OBJECT_RGB - rgb, axis=1)
    best = int(distances.argmin())
    return _COLOR_NAMES[best] if distances[best] <= tolerance else "unknown"


def _local_backgrounds(pixels: np.ndarray, min_share: float = 0.1) -> np.ndarray:
    """[K, 3]: the actual colour (median) of each background palette colour covering `min_share` of `pixels`."""
    if len(pixels) == 0:
        return np.zeros((0, 3), dtype=np.float32)
    nearest = (((pixels[:, None, :] - _BACKGROUND_RGB) ** 2).sum(-1)).argmin(1)
    shares = np.bincount(nearest, minlength=len(_BACKGROUND_RGB)) / len(pixels)
    return np.array([np.median(pixels[nearest == k], axis=0) for k in np.nonzero(shares >= min_share)[0]],
                    dtype=np.float32).reshape(-1, 3)


def _refine(rgb: np.ndarray, blobs: np.ndarray, label: int, box: tuple[slice, slice], color: np.ndarray
            ) -> tuple[np.ndarray, tuple[slice, slice]]:
    """Re-cut a blob half way between its own colour and the background colour(s) right around it.

    The palette cut is biased for colours whose blend with the background passes near another background colour
    (white fades into black through gray); this cut is not. Returns the filled mask and its box in image
    coordinates."""
    rows, cols = box
    pad = 2 + max(rows.stop - rows.start, cols.stop - cols.start) // 4
    window = (slice(max(rows.start - pad, 0), rows.stop + pad), slice(max(cols.start - pad, 0), cols.stop + pad))
    pixels, owners = rgb[window], blobs[window]
    frame = np.ones(owners.shape, dtype=bool)
    frame[2:-2, 2:-2] = False  # the window's outer frame: background, clear of this blob's blurred edge
    backgrounds = _local_backgrounds(pixels[frame & (owners == 0)])
    if len(backgrounds) == 0:
        return ndimage.binary_fill_holes(blobs[box] == label), box
    to_background = ((pixels[:, :, None, :] - backgrounds) ** 2).sum(-1).min(-1)
    nearer = ((pixels - color) ** 2).sum(-1) < to_background
    parts, _ = ndimage.label(nearer & ((owners == 0) | (owners == label)))
    overlap = np.bincount(parts[owners == label], minlength=2)
    overlap[0] = 0
    mask = parts == overlap.argmax()
    (r, c), = ndimage.find_objects(mask.astype(np.int32))
    top, left = window[0].start, window[1].start
    return (ndimage.binary_fill_holes(mask[r, c]),
            (slice(top + r.start, top + r.stop), slice(left + c.start, left + c.stop)))


def _shape_of(mask: np.ndarray, config: ScorerConfig) -> tuple[str, float]:
    height, width = mask.shape
    resized = Image.fromarray(mask.astype(np.float32)).resize((_TEMPLATE_SIDE, _TEMPLATE_SIDE), Image.BILINEAR)
    observed = np.asarray(resized)
    mismatch = np.abs(observed - _TEMPLATES).mean(axis=(2, 3)).min(axis=1)  # best blur level per shape
    distances = mismatch + config.aspect_weight * np.abs(math.log(width / height) - _LOG_ASPECTS)
    best = int(distances.argmin())
    distance = float(distances[best])
    return (SHAPES[best] if distance <= config.max_shape_distance else "unknown"), distance


def _size_of(shape: str, pixels: int, image_side: int) -> str:
    # Area, not box: blur eats thin tips (and so the box) but barely moves the area of a half-coverage cut.
    reference = shape if shape in _UNIT_AREAS else "circle"
    small, large = (_UNIT_AREAS[reference] * box_side(s, reference, image_side) ** 2 for s in ("small", "large"))
    return "small" if pixels < math.sqrt(small * large) else "large"


def read_back(image: Image.Image, config: ScorerConfig = ScorerConfig()) -> list[DetectedObject]:
    """Every object visible in a ShapesWorld-style image, in reading order of their cells."""
    if image.width != image.height:
        raise ValueError(f"ShapesWorld images are square, got {image.width}×{image.height}")
    side = image.width
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    blobs, _ = ndimage.label(_segment(rgb, config.color_tolerance))
    min_pixels = config.min_area_fraction * _SMALLEST_OBJECT_FRACTION * side * side
    found = []
    for label, box in enumerate(ndimage.find_objects(blobs), start=1):
        blob = blobs[box] == label
        if blob.sum() < min_pixels:
            continue
        color = _median_color(rgb[box], blob)
        mask, (rows, cols) = _refine(rgb, blobs, label, box, color)
        shape, distance = _shape_of(mask, config)
        x0, x1, y0, y1 = cols.start, cols.stop, rows.start, rows.stop
        column = min(int((x0 + x1) / 2 / side * GRID), GRID - 1)
        row = min(int((y0 + y1) / 2 / side * GRID), GRID - 1)
        pixels = int(mask.sum())
        found.append(DetectedObject(
            shape=shape,
            color=_color_name(color, config.color_tolerance),
            size=_size_of(shape, pixels, side),
            cell=row * GRID + column,
            bbox=(x0, y0, x1, y1),
            pixels=pixels,
            shape_distance=distance,
        ))
    return sorted(found, key=lambda d: (d.cell, -d.pixels))


# ---------------------------------------------------------------------------------------------------- grading

def grade_prompt(found: list[DetectedObject], meta: dict) -> dict:
    """GenEval verdict for objects already read back; see `score_prompt`."""
    check_prompt_meta(meta)
    by_class: dict[str, list[DetectedObject]] = defaultdict(list)
    for d in found:
        by_class[d.shape].append(d)
    reasons: list[str] = []
    matched_groups: list[list[DetectedObject] | None] = []
    for req in meta["include"]:
        name, count = req["class"], req["count"]
        candidates = by_class[name]
        problem = None
        if len(candidates) < count:
            problem = f"expected {name}>={count}, found {len(candidates)}"
        elif "color" in req:
            candidates = [d for d in candidates if d.color == req["color"]]
            if len(candidates) < count:
                colors = [d.color for d in by_class[name]]
                problem = f"expected {req['color']} {name}>={count}, found {len(candidates)} (colors {colors})"
        if problem is None and "position" in req:
            relation, target = req["position"]
            targets = matched_groups[target]
            if targets is None:
                problem = f"no target for {name} to be {relation}"
            else:
                candidates = [d for d in candidates if any(relation_holds(d.cell, t.cell, relation) for t in targets)]
                if len(candidates) < count:
                    problem = f"expected {name} {relation} target, found {len(candidates)}"
        if problem:
            reasons.append(problem)
        matched_groups.append(None if problem else candidates)
    for req in meta.get("exclude", []):
        if len(by_class[req["class"]]) >= req["count"]:
            reasons.append(f"expected {req['class']}<{req['count']}, found {len(by_class[req['class']])}")
    return {"tag": meta["tag"], "prompt": meta["prompt"], "correct": not reasons, "reasons": reasons,
            "detected": [f"{d.size} {d.color} {d.shape} in the {d.position}" for d in found]}


def score_prompt(image: Image.Image, meta: dict, config: ScorerConfig = ScorerConfig()) -> dict:
    """GenEval-style verdict: {"tag", "prompt", "correct": bool, "reasons": [why not], "detected": [...]}."""
    return grade_prompt(read_back(image, config), meta)


def _agreement(truth, detected: DetectedObject) -> float:
    # Position weighs most so that objects pair up by place; attributes then break ties.
    return (4 * (truth.cell == detected.cell) + 2 * (truth.shape == detected.shape)
            + 2 * (truth.color == detected.color) + (truth.size == detected.size))


def grade_scene(found: list[DetectedObject], scene: Scene) -> dict:
    """Per-attribute accuracy of objects already read back; see `score_scene`."""
    truths = list(scene.objects)
    agreement = np.array([[_agreement(t, d) for d in found] for t in truths], dtype=np.float64).reshape(
        len(truths), len(found))
    rows, cols = linear_sum_assignment(agreement, maximize=True)
    match = {int(r): found[int(c)] for r, c in zip(rows, cols)}
    correct = {a: [] for a in _SCENE_ATTRIBUTES}
    for k, truth in enumerate(truths):
        detected = match.get(k)
        for attribute in _SCENE_ATTRIBUTES:
            correct[attribute].append(detected is not None and getattr(detected, attribute) == getattr(truth, attribute))
    all_right = all(all(v) for v in correct.values())
    return {
        "num_objects": len(truths),
        "num_detected": len(found),
        **{a: sum(v) / len(truths) for a, v in correct.items()},
        "count": len(found) == len(truths),
        "exact": all_right and len(found) == len(truths),
    }


def score_scene(image: Image.Image, scene: Scene, config: ScorerConfig = ScorerConfig()) -> dict:
    """How well `image` shows `scene`: detected objects are paired with the scene's (most agreement first);
    returns the fraction of scene objects whose pair has the right shape / color / size / position, whether the
    object count matches, and `exact` (everything right, nothing extra)."""
    return grade_scene(read_back(image, config), scene)


class ShapesEval:
    """Accumulates prompt and scene grades and averages them per category and overall.

    The overall prompt score is the mean of the per-tag accuracies, as in GenEval."""

    def __init__(self, config: ScorerConfig = ScorerConfig()) -> None:
        self.config = config
        self.prompt_results: dict[str, list[bool]] = defaultdict(list)
        self.scene_results: list[dict] = []

    def add_prompt(self, image: Image.Image, meta: dict) -> dict:
        result = score_prompt(image, meta, self.config)
        self.prompt_results[result["tag"]].append(result["correct"])
        return result

    def add_scene(self, image: Image.Image, scene: Scene) -> dict:
        result = score_scene(image, scene, self.config)
        self.scene_results.append(result)
        return result

    def summary(self) -> dict:
        """{"prompts": {tag: accuracy, ..., "overall": mean over tags}, "prompt_counts": {tag: n},
        "scenes": {attribute: mean, "count": ..., "exact": ..., "n": ...}} (sections present once filled)."""
        out: dict = {}
        if self.prompt_results:
            per_tag = {t: float(np.mean(self.prompt_results[t])) for t in PROMPT_TAGS if t in self.prompt_results}
            out["prompts"] = {**per_tag, "overall": float(np.mean(list(per_tag.values())))}
            out["prompt_counts"] = {t: len(self.prompt_results[t]) for t in per_tag}
        if self.scene_results:
            keys = (*_SCENE_ATTRIBUTES, "count", "exact")
            out["scenes"] = {k: float(np.mean([r[k] for r in self.scene_results])) for k in keys}
            out["scenes"]["n"] = len(self.scene_results)
        return out
