"""A labelled contact sheet: images in a grid, each with its text underneath, for a person to look at."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

_MARGIN = 6
_LINE_HEIGHT = 13


def contact_sheet(images: Sequence[Image.Image], labels: Sequence[str], tile: int = 192,
                  columns: int | None = None) -> Image.Image:
    """Grid of `images` scaled to tile×tile (nearest neighbour, so pixels stay visible), each over its wrapped
    label."""
    if len(images) != len(labels):
        raise ValueError(f"got {len(images)} images but {len(labels)} labels")
    if not images:
        raise ValueError("a contact sheet needs at least one image")
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    wrapped = [textwrap.wrap(label, max(8, tile // 6)) for label in labels]
    cell_w = tile + 2 * _MARGIN
    cell_h = tile + 2 * _MARGIN + max(len(lines) for lines in wrapped) * _LINE_HEIGHT
    sheet = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=11)
    for k, (image, lines) in enumerate(zip(images, wrapped)):
        x, y = (k % columns) * cell_w + _MARGIN, (k // columns) * cell_h + _MARGIN
        sheet.paste(image.convert("RGB").resize((tile, tile), Image.NEAREST), (x, y))
        for n, line in enumerate(lines):
            draw.text((x, y + tile + 2 + n * _LINE_HEIGHT), line, fill="black", font=font)
    return sheet
