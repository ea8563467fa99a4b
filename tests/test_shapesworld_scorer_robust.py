"""ShapesEval beyond clean renders: mild noise and blur are tolerated; wrong images are rejected."""

import dataclasses

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from unimodal.shapesworld import (
    BACKGROUNDS, COLORS, SHAPES, Rng, Scene, SceneObject, ShapesEval, ShapesPrompts, read_back, render_scene,
    sample_scene, score_prompt, score_scene,
)


def degrade(image: Image.Image, seed: int, blur_px_at_64: float = 0.6, noise: float = 8.0) -> Image.Image:
    """Gaussian blur (sigma scaled with the image size) then Gaussian noise of `noise`/255 per channel."""
    blurred = image.filter(ImageFilter.GaussianBlur(blur_px_at_64 * image.width / 64))
    pixels = np.asarray(blurred, dtype=np.float32)
    pixels = pixels + np.random.default_rng(seed).normal(0.0, noise, pixels.shape)
    return Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8))


@pytest.mark.parametrize("size", [64, 128])
def test_scene_read_back_survives_mild_noise_and_blur(size):
    exact = 0
    for i in range(300):
        scene = sample_scene(Rng(i, f"robust-{size}"), held_out="include")
        exact += score_scene(degrade(render_scene(scene, size), i), scene)["exact"]
    assert exact / 300 >= 0.98


def test_prompts_survive_mild_noise_and_blur():
    prompts = ShapesPrompts("validation", size=64, num_samples=300)
    judge = ShapesEval()
    for i in range(len(prompts)):
        judge.add_prompt(degrade(prompts[i].image, i), prompts[i].prompt.meta)
    summary = judge.summary()["prompts"]
    assert min(summary.values()) >= 0.98, summary


def test_speckles_are_ignored_and_odd_blobs_are_not_shapes():
    scene = Scene.of([SceneObject("star", "red", "small", 0), SceneObject("cross", "blue", "large", 8)], ("navy",))
    image = render_scene(scene, 64)
    pixels = np.asarray(image).copy()
    rng = np.random.default_rng(0)
    for _ in range(40):  # single pixels of object colours scattered over the background
        y, x = rng.integers(24, 40, size=2)
        pixels[y, x] = list(COLORS.values())[rng.integers(len(COLORS))]
    pixels[30:32, 45:47] = COLORS["yellow"]  # a 2×2 blob
    assert score_scene(Image.fromarray(pixels), scene)["exact"]
    # A 3:1 bar or a lumpy blob is no shape of this world.
    canvas = Image.new("RGB", (64, 64), BACKGROUNDS["black"])
    draw = ImageDraw.Draw(canvas)
    draw.rectangle((4, 8, 20, 13), fill=COLORS["green"])
    draw.polygon([(40, 40), (60, 42), (44, 48), (58, 60), (41, 58)], fill=COLORS["green"])
    assert [d.shape for d in read_back(canvas)] == ["unknown", "unknown"]


# --------------------------------------------------------------------------------------------- wrong images

def _with(scene: Scene, index: int, **changes) -> Scene:
    objects = list(scene.objects)
    objects[index] = dataclasses.replace(objects[index], **changes)
    return Scene.of(objects, scene.background, scene.layout)


def _other(values, *taken):
    return next(v for v in values if v not in taken)


def _prompt_items(tag: str, n: int = 100):
    prompts = ShapesPrompts("test", size=64, num_samples=n, tags=(tag,))
    return [prompts.prompt(i) for i in range(n)]


def _rejected(scene: Scene, meta: dict) -> bool:
    return not score_prompt(render_scene(scene, 64), meta)["correct"]


def test_wrong_colour_is_rejected():
    for prompt in _prompt_items("colors") + _prompt_items("color_attr"):
        k = len(prompt.scene.objects) - 1
        named = {r["color"] for r in prompt.meta["include"]}
        assert _rejected(_with(prompt.scene, k, color=_other(COLORS, *named)), prompt.meta), prompt.meta


def test_wrong_shape_is_rejected():
    for prompt in _prompt_items("single_object") + _prompt_items("two_object") + _prompt_items("colors"):
        named = {r["class"] for r in prompt.meta["include"]}
        assert _rejected(_with(prompt.scene, 0, shape=_other(SHAPES, *named)), prompt.meta), prompt.meta


def test_wrong_count_is_rejected():
    for prompt in _prompt_items("counting"):
        objects, shape = list(prompt.scene.objects), prompt.meta["include"][0]["class"]
        free = _other(range(9), *[o.cell for o in objects])
        one_more = Scene.of(objects + [SceneObject(shape, "white", "small", free)], prompt.scene.background,
                            prompt.scene.layout)
        one_fewer = Scene.of(objects[1:], prompt.scene.background, prompt.scene.layout)
        assert _rejected(one_more, prompt.meta) and _rejected(one_fewer, prompt.meta), prompt.meta


def test_wrong_position_is_rejected():
    for prompt in _prompt_items("position"):
        a, b = prompt.scene.objects
        swapped = Scene.of([dataclasses.replace(a, cell=b.cell), dataclasses.replace(b, cell=a.cell)],
                           prompt.scene.background, prompt.scene.layout)
        assert _rejected(swapped, prompt.meta), prompt.meta


def test_blank_image_is_rejected():
    for name, rgb in BACKGROUNDS.items():
        blank = Image.new("RGB", (64, 64), rgb)
        assert read_back(blank) == []
        for prompt in _prompt_items("single_object", 6) + _prompt_items("counting", 6):
            assert not score_prompt(blank, prompt.meta)["correct"]
        scene = sample_scene(Rng(0, name))
        result = score_scene(blank, scene)
        assert not result["exact"] and result["shape"] == result["color"] == result["position"] == 0.0


def test_scene_scores_drop_on_each_kind_of_mistake():
    for i in range(100):
        scene = sample_scene(Rng(i, "mistakes"), num_objects=2 + i % 3)
        first = scene.objects[0]
        recoloured = score_scene(render_scene(_with(scene, 0, color=_other(COLORS, first.color)), 64), scene)
        assert not recoloured["exact"] and recoloured["color"] < 1 and recoloured["shape"] == 1
        reshaped = score_scene(render_scene(_with(scene, 0, shape=_other(SHAPES, first.shape)), 64), scene)
        assert not reshaped["exact"] and reshaped["shape"] < 1 and reshaped["color"] == 1
        resized = score_scene(render_scene(_with(scene, 0, size=_other(("small", "large"), first.size)), 64), scene)
        assert not resized["exact"] and resized["size"] < 1 and resized["shape"] == 1
        free = _other(range(9), *[o.cell for o in scene.objects])
        moved = score_scene(render_scene(_with(scene, 0, cell=free), 64), scene)
        assert not moved["exact"] and moved["position"] < 1
        fewer = score_scene(render_scene(Scene.of(scene.objects[1:], scene.background, scene.layout), 64), scene)
        assert not fewer["exact"] and not fewer["count"] and fewer["num_detected"] == len(scene.objects) - 1
        extra = Scene.of(list(scene.objects) + [SceneObject("circle", "white", "small", free)], scene.background,
                         scene.layout)
        more = score_scene(render_scene(extra, 64), scene)
        assert not more["exact"] and not more["count"]


def test_shapes_eval_averages_per_category_then_overall():
    prompts = {tag: ShapesPrompts("test", size=64, num_samples=3, tags=(tag,))[0] for tag in ("colors", "counting")}
    blank = Image.new("RGB", (64, 64), BACKGROUNDS["black"])
    judge = ShapesEval()
    judge.add_prompt(prompts["colors"].image, prompts["colors"].prompt.meta)  # right
    judge.add_prompt(prompts["counting"].image, prompts["counting"].prompt.meta)  # right
    judge.add_prompt(prompts["counting"].image, prompts["counting"].prompt.meta)  # right
    judge.add_prompt(blank, prompts["counting"].prompt.meta)  # wrong
    scene = prompts["colors"].prompt.scene
    judge.add_scene(prompts["colors"].image, scene)
    judge.add_scene(blank, scene)
    summary = judge.summary()
    assert summary["prompts"] == pytest.approx({"counting": 2 / 3, "colors": 1.0, "overall": (2 / 3 + 1) / 2})
    assert summary["prompt_counts"] == {"counting": 3, "colors": 1}
    assert summary["scenes"]["exact"] == 0.5 and summary["scenes"]["color"] == 0.5 and summary["scenes"]["n"] == 2
