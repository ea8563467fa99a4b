"""Dense labels of a scene: what each cell, and each slot of an S×S feature grid, holds.

Used where ground truth supervises or measures features patch by patch: the ShapesWorld teacher's dense loss
(`train/train_teacher.py --dense-weight`), the feature probes (`python -m eval.probe`), and the per-slot loss of the
LLM's understanding slots (`--slot-loss-weight` of the stages, `slot_description`).
"""

from __future__ import annotations

import torch

from .world import COLOR_NAMES, GRID, SHAPES, SIZES, Scene

# Classes per label row of `cell_labels`: 0 = empty cell, then the vocabulary in order.
LABEL_NAMES: tuple[str, ...] = ("shape", "color", "size")
LABEL_CLASSES: tuple[int, ...] = (1 + len(SHAPES), 1 + len(COLOR_NAMES), 1 + len(SIZES))
# Classes per row of `slot_description`: shape + 1, colour + 1 (0 = empty), and the cell under the slot.
SLOT_LABEL_CLASSES: tuple[int, ...] = (1 + len(SHAPES), 1 + len(COLOR_NAMES), GRID * GRID)


def cell_labels(scene: Scene) -> torch.Tensor:
    """[3, GRID²] long: shape index + 1, colour index + 1 and size index + 1 of the object in each cell (raster
    order), 0 where the cell is empty."""
    labels = torch.zeros(len(LABEL_NAMES), GRID * GRID, dtype=torch.long)
    for obj in scene.objects:
        labels[:, obj.cell] = torch.tensor(
            [SHAPES.index(obj.shape) + 1, COLOR_NAMES.index(obj.color) + 1, SIZES.index(obj.size) + 1])
    return labels


def slot_cells(side: int) -> torch.Tensor:
    """[side²]: the cell (0..GRID²-1) holding the centre of each slot of a side×side grid over the image, raster
    order."""
    if side < 1:
        raise ValueError(f"side must be >= 1, got {side}")
    cell_of_line = ((torch.arange(side) + 0.5) * GRID / side).long()  # row (or column) of cells per slot line
    return (cell_of_line[:, None] * GRID + cell_of_line[None, :]).flatten()


def slot_labels(scene: Scene, side: int) -> torch.Tensor:
    """[3, side²]: `cell_labels` of the cell under each slot of a side×side grid."""
    return cell_labels(scene)[:, slot_cells(side)]


def slot_description(scene: Scene, side: int) -> torch.Tensor:
    """[3, side²] long, what each slot of a side×side grid should say about itself: the shape + 1 and colour + 1 of
    the object in its cell (0 where empty) and which cell it lies over (classes `SLOT_LABEL_CLASSES`)."""
    cells = slot_cells(side)
    return torch.cat([cell_labels(scene)[:2, cells], cells[None]])


__all__ = ["LABEL_CLASSES", "LABEL_NAMES", "SLOT_LABEL_CLASSES", "cell_labels", "slot_cells", "slot_description",
           "slot_labels"]
