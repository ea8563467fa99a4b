"""Drawing benchmark: prompt files, GenEval folder layout, fixed seeds, ShapesEval grading per category."""

import json

import pytest
import torch
from PIL import Image

from eval.t2i import draw_prompts, main, read_prompts, run, shapes_prompt_metadata
from llm import ImageGenerationOutput
from unimodal.shapesworld import PROMPT_TAGS, ShapesPrompts


@pytest.fixture(scope="module")
def tiny():
    from llm import build_tiny

    return build_tiny(seed=0)


def test_read_prompts(tmp_path):
    geneval = tmp_path / "meta.jsonl"
    geneval.write_text(json.dumps({"prompt": "a red circle", "tag": "colors", "extra": 1}) + "\n\n"
                       + json.dumps({"prompt": "two stars"}) + "\n")
    assert read_prompts(geneval) == [{"prompt": "a red circle", "tag": "colors", "extra": 1}, {"prompt": "two stars"}]
    plain = tmp_path / "dpg.txt"
    plain.write_text("a red circle\n\n  two stars  \n")
    assert read_prompts(plain) == [{"prompt": "a red circle"}, {"prompt": "two stars"}]
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"text": "no prompt key"}) + "\n")
    with pytest.raises(ValueError, match="string 'prompt'"):
        read_prompts(broken)
    with pytest.raises(FileNotFoundError):
        read_prompts(tmp_path / "absent.jsonl")


def test_geneval_layout_and_png_metadata(tiny, tmp_path):
    model, processor = tiny
    metadata = [{"prompt": "a photo of a red circle", "tag": "colors", "include": [{"class": "circle", "count": 1}]},
                {"prompt": "two stars"}]
    drawn = draw_prompts(model, processor, metadata, tmp_path / "images", images_per_prompt=2, seed=5)
    for index, meta in enumerate(metadata):
        folder = tmp_path / "images" / f"{index:05d}"
        assert json.loads((folder / "metadata.jsonl").read_text()) == meta
        assert sorted(p.name for p in (folder / "samples").iterdir()) == ["0000.png", "0001.png"]
        with Image.open(folder / "samples" / "0001.png") as image:
            assert image.size == (64, 64)
            assert image.text["prompt"] == meta["prompt"]
            assert image.text["seed"] == str(5 + index)  # prompt i gets seed + i
    assert len(drawn["images"]) == 2 and drawn["indices"][0].shape == (2, model.num_image_codes)


def test_same_seed_same_images_and_prompt_seeds_do_not_depend_on_neighbours(tiny):
    model, processor = tiny
    metadata = [{"prompt": "a photo of a star"}, {"prompt": "a photo of two squares"}]
    first = draw_prompts(model, processor, metadata, seed=3)
    again = draw_prompts(model, processor, metadata, seed=3)
    alone = draw_prompts(model, processor, metadata[1:], seed=4)
    other = draw_prompts(model, processor, metadata, seed=9)
    assert all(torch.equal(a, b) for a, b in zip(first["indices"], again["indices"]))
    assert torch.equal(first["indices"][1], alone["indices"][0])
    assert not torch.equal(first["indices"][0], other["indices"][0])


class _TargetDrawer:
    """Draws the target scene for the prompts in `correct`, a blank image otherwise."""

    def __init__(self, targets: dict[str, Image.Image], correct: set[str]):
        self.targets, self.correct = targets, correct

    def generate_image(self, prompts, processor=None, seed=None, num_images_per_prompt=1, **settings):
        images = [self.targets[p].copy() if p in self.correct else Image.new("RGB", (64, 64), (128, 128, 128))
                  for p in prompts for _ in range(num_images_per_prompt)]
        return ImageGenerationOutput(images=images, indices=torch.zeros(len(images), 130, dtype=torch.long),
                                     prompts=list(prompts), seed=seed, settings=settings)


def test_shapes_eval_per_category_hand_worked(tmp_path):
    prompts = ShapesPrompts("test", num_samples=12)
    metadata = shapes_prompt_metadata(12)
    assert [m["tag"] for m in metadata] == list(PROMPT_TAGS) * 2
    targets = {prompts[i].prompt.text: prompts[i].image for i in range(12)}
    # Right images for both single_object prompts, one of the two two_object prompts, and nothing else.
    correct = {metadata[0]["prompt"], metadata[6]["prompt"], metadata[1]["prompt"]}
    results, drawn = run(_TargetDrawer(targets, correct), None, metadata, tmp_path, grade=True)
    accuracy = results["shapes_eval"]["accuracy"]
    assert accuracy["single_object"] == 1.0
    assert accuracy["two_object"] == 0.5
    assert all(accuracy[t] == 0.0 for t in ("counting", "colors", "position", "color_attr"))
    assert accuracy["overall"] == pytest.approx(1.5 / 6)
    assert results["shapes_eval"]["counts"] == {t: 2 for t in PROMPT_TAGS}
    grades = [json.loads(line) for line in (tmp_path / "t2i_grades.jsonl").read_text().splitlines()]
    assert [g["correct"] for g in grades] == [m["prompt"] in correct for m in metadata]
    assert json.loads((tmp_path / "t2i_results.json").read_text())["shapes_eval"]["accuracy"] == accuracy
    assert "| **overall** (mean over categories) | 0.2500 | 12 |" in (tmp_path / "t2i_report.md").read_text()


def test_grading_needs_shapesworld_metadata(tmp_path):
    with pytest.raises(ValueError, match="cannot be graded by ShapesEval"):
        run(_TargetDrawer({}, set()), None, [{"prompt": "a cat"}], tmp_path, grade=True)


def test_drawing_follows_the_checkpoints_sampler_unless_a_flag_says_otherwise(tmp_path):
    from llm import build_tiny
    from llm.generation import DEFAULT_SAMPLER, set_sampler_defaults

    model, _ = build_tiny(seed=0)
    set_sampler_defaults(model, top_k=3, cfg_scale=2.0)
    model.save_pretrained(tmp_path / "model")
    common = ["--model", str(tmp_path / "model"), "--num-samples", "1"]
    stored = main(common + ["--output-dir", str(tmp_path / "a")])["settings"]["sampler"]
    assert stored == {**DEFAULT_SAMPLER, "top_k": 3, "cfg_scale": 2.0}
    flagged = main(common + ["--output-dir", str(tmp_path / "b"), "--top-k", "5"])["settings"]["sampler"]
    assert flagged == {**DEFAULT_SAMPLER, "top_k": 5, "cfg_scale": 2.0}
