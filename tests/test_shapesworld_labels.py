"""Dense scene labels against hand-worked cells."""

import pytest
import torch

from unimodal.shapesworld import Scene, SceneObject
from unimodal.shapesworld.labels import (
    LABEL_CLASSES, SLOT_LABEL_CLASSES, cell_labels, slot_cells, slot_description, slot_labels,
)
from unimodal.shapesworld.world import COLOR_NAMES, GRID, SHAPES


def test_cell_labels_name_shape_colour_and_size_of_each_cell():
    scene = Scene.of([SceneObject("triangle", "blue", "large", 4), SceneObject("circle", "red", "small", 0)])
    labels = cell_labels(scene)
    assert labels.shape == (3, 9)
    assert labels[:, 0].tolist() == [1, 1, 1]  # circle (first shape), red (first colour), small (first size)
    assert labels[:, 4].tolist() == [3, 6, 2]  # triangle, blue, large
    assert labels[:, [1, 2, 3, 5, 6, 7, 8]].eq(0).all()
    assert all(labels[row].max() < classes for row, classes in enumerate(LABEL_CLASSES))


def test_slot_cells_follow_slot_centres():
    assert slot_cells(3).tolist() == list(range(9))
    # 8 slots per line: centres at 4, 12, ..., 60 px of 64; cells are 64/3 ≈ 21.3 px wide: 3 / 2 / 3 slots.
    line = [0, 0, 0, 1, 1, 2, 2, 2]
    assert slot_cells(8).reshape(8, 8).tolist() == [[3 * r + c for c in line] for r in line]
    scene = Scene.of([SceneObject("star", "green", "small", 8)])
    assert slot_labels(scene, 8)[0].reshape(8, 8)[5:, 5:].eq(4).all()  # star is the 4th shape
    assert slot_labels(scene, 8)[0].sum() == 4 * 9
    with pytest.raises(ValueError, match="side must be >= 1"):
        slot_cells(0)


@pytest.mark.parametrize("side", [3, 8, 16])
def test_slot_description_names_the_object_under_each_slot_centre(side):
    scene = Scene.of([SceneObject("square", "yellow", "small", 2), SceneObject("circle", "purple", "large", 6)])
    by_cell = {obj.cell: obj for obj in scene.objects}
    described = slot_description(scene, side)
    assert described.shape == (3, side * side)
    for row in range(side):
        for col in range(side):
            # the slot's centre in units of the image side, and the cell that holds it
            y, x = (row + 0.5) / side, (col + 0.5) / side
            cell = int(y * GRID) * GRID + int(x * GRID)
            obj = by_cell.get(cell)
            expected = [0, 0] if obj is None else [SHAPES.index(obj.shape) + 1, COLOR_NAMES.index(obj.color) + 1]
            assert described[:, row * side + col].tolist() == [*expected, cell], (row, col)
    assert all(described[r].max() < classes for r, classes in enumerate(SLOT_LABEL_CLASSES))
