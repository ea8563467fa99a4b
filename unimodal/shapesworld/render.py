"""How ShapesWorld is drawn: shape outlines, object boxes, and the scene renderer.

All geometry is in fractions of the image side, so a scene looks the same at 64, 128 or 256 px. An object sits in
a square drawing box centred on its cell; the box side is a fixed fraction of the cell side (small or large), times
a per-shape scale that evens out how heavy shapes look. Each outline is a unit polygon whose tight bounding box has
its longer side spanning [-1, 1], so the object's tight bounding box is known exactly from the geometry.

Scenes are drawn at `SUPERSAMPLE`× the size and box-downsampled, which anti-aliases the edges; the result is a
pure function of the scene and size, hence byte-identical across runs.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .world import BACKGROUNDS, COLORS, GRID, SHAPES, Scene, SceneObject, cell_row_col

SIZE_FRACTION: dict[str, float] = {"small": 0.6, "large": 0.85}  # drawing-box side / cell side
SHAPE_SCALE: dict[str, float] = {"circle": 1.0, "square": 0.9, "triangle": 1.0, "star": 1.0, "cross": 1.0,
                                 "diamond": 1.0}
SUPERSAMPLE = 4
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 32, 1024

_STAR_INNER_RADIUS = 0.45  # fatter than a geometric star (0.38) so small stars keep visible arms at 64 px
_CROSS_HALF_WIDTH = 0.34


def _star() -> list[tuple[float, float]]:
    points = []
    for k in range(10):
        radius = 1.0 if k % 2 == 0 else _STAR_INNER_RADIUS
        angle = -math.pi / 2 + k * math.pi / 5
        points.append((radius * math.cos(angle), radius * math.sin(angle)))
    return points


def _cross() -> list[tuple[float, float]]:
    w = _CROSS_HALF_WIDTH
    return [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w),
            (-w, -w)]


def _raw_outline(shape: str) -> list[tuple[float, float]]:
    if shape == "circle":
        return [(math.cos(2 * math.pi * k / 64), math.sin(2 * math.pi * k / 64)) for k in range(64)]
    if shape == "square":
        return [(-1, -1), (1, -1), (1, 1), (-1, 1)]
    if shape == "triangle":
        return [(0, -1), (1, 1), (-1, 1)]
    if shape == "star":
        return _star()
    if shape == "cross":
        return _cross()
    if shape == "diamond":
        return [(0, -1), (1, 0), (0, 1), (-1, 0)]
    raise ValueError(f"unknown shape {shape!r}; allowed: {', '.join(SHAPES)}")


def _normalised(points: list[tuple[float, float]]) -> np.ndarray:
    """Centre the tight bounding box on the origin and make its longer side span [-1, 1]."""
    xy = np.asarray(points, dtype=np.float64)
    low, high = xy.min(axis=0), xy.max(axis=0)
    return (xy - (low + high) / 2) / ((high - low).max() / 2)


UNIT_OUTLINES: dict[str, np.ndarray] = {shape: _normalised(_raw_outline(shape)) for shape in SHAPES}


def check_image_size(size: int) -> None:
    if not isinstance(size, int) or not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE:
        raise ValueError(f"image size must be an int in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}], got {size!r}")


def box_side(size_name: str, shape: str, image_size: int) -> float:
    """Side in pixels of the longer side of an object's tight bounding box."""
    return SIZE_FRACTION[size_name] * SHAPE_SCALE[shape] * image_size / GRID


def object_outline(obj: SceneObject, image_size: int) -> np.ndarray:
    """The object's outline polygon [K, 2] in pixel coordinates (x right, y down, pixel i spans [i, i+1))."""
    row, col = cell_row_col(obj.cell)
    cell = image_size / GRID
    centre = np.array([(col + 0.5) * cell, (row + 0.5) * cell])
    return centre + UNIT_OUTLINES[obj.shape] * box_side(obj.size, obj.shape, image_size) / 2


def object_bbox(obj: SceneObject, image_size: int) -> tuple[int, int, int, int]:
    """Pixel bounding box (x0, y0, x1, y1), end-exclusive, of every pixel the object touches."""
    xy = object_outline(obj, image_size)
    x0, y0 = np.floor(xy.min(axis=0)).astype(int)
    x1, y1 = np.ceil(xy.max(axis=0)).astype(int)
    return int(x0), int(y0), int(x1), int(y1)


def _fill_background(draw: ImageDraw.ImageDraw, scene: Scene, side: int) -> None:
    first = BACKGROUNDS[scene.background[0]]
    draw.rectangle((0, 0, side - 1, side - 1), fill=first)
    if scene.layout == "horizontal":
        draw.rectangle((0, side // 2, side - 1, side - 1), fill=BACKGROUNDS[scene.background[1]])
    elif scene.layout == "vertical":
        draw.rectangle((side // 2, 0, side - 1, side - 1), fill=BACKGROUNDS[scene.background[1]])


def _polygon(xy: np.ndarray, scale: int) -> list[tuple[float, float]]:
    # PIL fills pixel j when its centre (at integer j) is inside, so shift by half a canvas pixel.
    return [(float(x) * scale - 0.5, float(y) * scale - 0.5) for x, y in xy]


def render_scene(scene: Scene, size: int = 64) -> Image.Image:
    """Draw `scene` as a size×size RGB image."""
    check_image_size(size)
    side = size * SUPERSAMPLE
    canvas = Image.new("RGB", (side, side))
    draw = ImageDraw.Draw(canvas)
    _fill_background(draw, scene, side)
    for obj in scene.objects:
        draw.polygon(_polygon(object_outline(obj, size), SUPERSAMPLE), fill=COLORS[obj.color])
    return canvas.reduce(SUPERSAMPLE)


def shape_template(shape: str, side: int, blur: float = 0.0) -> np.ndarray:
    """The mask a reader sees of `shape`, stretched over its tight box to side×side, values in [0, 1].

    `blur` is a Gaussian sigma as a fraction of the shape's longer side: the shape is blurred and cut at half
    coverage first, as nearest-colour segmentation does to a blurred image, and stretched over what is left."""
    extent, margin = 128, 32
    canvas = Image.new("L", (extent + 2 * margin, extent + 2 * margin))
    ImageDraw.Draw(canvas).polygon(_polygon(margin + (UNIT_OUTLINES[shape] + 1) * extent / 2, 1), fill=255)
    if blur > 0:
        canvas = canvas.filter(ImageFilter.GaussianBlur(blur * extent))
    seen = np.asarray(canvas) >= 128
    rows, cols = np.nonzero(seen)
    crop = seen[rows.min():rows.max() + 1, cols.min():cols.max() + 1].astype(np.float32)
    return np.asarray(Image.fromarray(crop).resize((side, side), Image.BILINEAR))


def shape_aspect(shape: str) -> float:
    """Width / height of the shape's tight bounding box."""
    extent = UNIT_OUTLINES[shape].max(axis=0) - UNIT_OUTLINES[shape].min(axis=0)
    return float(extent[0] / extent[1])
