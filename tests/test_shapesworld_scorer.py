"""ShapesEval on ground-truth renders: every prompt category and every scene read back perfectly at 64 and 128 px."""

import numpy as np
import pytest
from PIL import Image

from unimodal.shapesworld import (
    BACKGROUNDS, COLORS, PROMPT_TAGS, Rng, Scene, SceneObject, ShapesEval, ShapesPrompts, object_bbox, read_back,
    render_scene, sample_scene, score_prompt, score_scene,
)

NUM_PER_TAG = 300


@pytest.mark.parametrize("size", [64, 128])
def test_every_prompt_category_scores_100_percent_on_ground_truth(size):
    prompts = ShapesPrompts("test", size=size, num_samples=NUM_PER_TAG * len(PROMPT_TAGS))
    judge = ShapesEval()
    failures = []
    for i in range(len(prompts)):
        item = prompts[i]
        result = judge.add_prompt(item.image, item.prompt.meta)
        if not result["correct"]:
            failures.append((item.prompt.text, result["reasons"], result["detected"]))
    assert not failures, failures[:5]
    summary = judge.summary()
    assert summary["prompt_counts"] == {tag: NUM_PER_TAG for tag in PROMPT_TAGS}
    assert summary["prompts"] == {**{tag: 1.0 for tag in PROMPT_TAGS}, "overall": 1.0}


@pytest.mark.parametrize("size", [64, 128])
def test_scene_read_back_is_exact_on_ground_truth(size):
    for i in range(300):
        scene = sample_scene(Rng(i, f"scorer-test-{size}"), held_out="include")
        image = render_scene(scene, size)
        found = read_back(image)
        truth = sorted((o.cell, o.shape, o.color, o.size) for o in scene.objects)
        assert sorted((d.cell, d.shape, d.color, d.size) for d in found) == truth, (scene, found)
        for d, o in zip(sorted(found, key=lambda d: d.cell), scene.objects):
            # The box read back lies within two pixels of the drawn outline's box (pointed tips are thinner than
            # half a pixel for their last pixel or two, so they read as background).
            assert np.abs(np.array(d.bbox) - np.array(object_bbox(o, size))).max() <= 2
            assert d.position == o.position
        result = score_scene(image, scene)
        assert result["exact"] and result["count"]
        assert [result[k] for k in ("shape", "color", "size", "position")] == [1.0] * 4


def test_every_shape_colour_size_and_cell_is_read_back():
    # A full 3×3 grid: all shapes in every cell, every colour, both sizes, on every background.
    backgrounds = list(BACKGROUNDS)
    shapes, colors = list(SHAPE_ORDER), list(COLORS)
    for k in range(len(shapes) * len(colors)):
        objects = [SceneObject(shapes[(k + c) % len(shapes)], colors[(k + 3 * c) % len(colors)],
                               ("small", "large")[(k + c) % 2], c) for c in range(9)]
        scene = Scene.of(objects, (backgrounds[k % len(backgrounds)],), "plain")
        result = score_scene(render_scene(scene, 64), scene)
        assert result["exact"], (scene, read_back(render_scene(scene, 64)))


SHAPE_ORDER = ("circle", "square", "triangle", "star", "cross", "diamond")


def test_scorer_input_checks():
    with pytest.raises(ValueError, match="square"):
        read_back(Image.new("RGB", (64, 32)))
    with pytest.raises(ValueError, match="tag"):
        score_prompt(Image.new("RGB", (64, 64)), {"prompt": "x", "tag": "art", "include": [{"class": "star",
                                                                                            "count": 1}]})
