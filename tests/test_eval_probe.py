"""eval.probe: feature extraction against its definition, cell targets, and that both probes learn."""

import json

import pytest
import torch

from eval.probe import (
    DEFAULT_TOKENIZER, QuestionSet, cell_targets, extract_features, main, render_split, train_cell_probe,
    train_vqa_probe,
)
from tokenizer import TokenFlowTokenizer
from unimodal.shapesworld.world import COLORS, GRID, SHAPES


def test_raw_features_are_the_image_patches_in_raster_order():
    images = torch.randn(2, 3, 64, 64)
    features = extract_features(images, "raw", grid=8)
    assert features.shape == (2, 64, 3 * 8 * 8)
    for row, col in ((0, 0), (3, 5), (7, 7)):
        patch = images[:, :, 8 * row: 8 * row + 8, 8 * col: 8 * col + 8]  # [B, 3, 8, 8], channel-major like unshuffle
        assert torch.equal(features[:, row * 8 + col], patch.reshape(2, -1))


@pytest.fixture(scope="module")
def tiny_tokenizer():
    return TokenFlowTokenizer.from_pretrained(DEFAULT_TOKENIZER).eval()


def test_tokenizer_feature_sources_are_the_quantized_maps(tiny_tokenizer):
    images = torch.rand(3, 3, tiny_tokenizer.config.image_size, tiny_tokenizer.config.image_size) * 2 - 1
    encoded = tiny_tokenizer.encode(images)
    semantic_dim = tiny_tokenizer.config.semantic_code_dim
    joint = extract_features(images, "joint", tiny_tokenizer, batch_size=2)
    assert torch.allclose(joint, encoded.features.flatten(2).transpose(1, 2), atol=1e-6)
    assert torch.allclose(extract_features(images, "semantic", tiny_tokenizer), joint[..., :semantic_dim], atol=1e-6)
    assert torch.allclose(extract_features(images, "prequant", tiny_tokenizer),
                          encoded.pre_quant[:, :semantic_dim].flatten(2).transpose(1, 2), atol=1e-6)


def test_cell_targets_mark_each_object_in_its_cell():
    _, samples = render_split("test", 5, 64)
    for sample in samples:
        target = cell_targets(sample.scene)
        assert target.shape == (2, GRID * GRID)
        assert int((target[0] > 0).sum()) == len(sample.scene.objects)
        for obj in sample.scene.objects:
            assert SHAPES[target[0, obj.cell] - 1] == obj.shape
            assert list(COLORS)[target[1, obj.cell] - 1] == obj.color


def test_cell_probe_learns_colour_from_raw_patches():
    train_images, train_samples = render_split("train", 300, 64)
    test_images, test_samples = render_split("test", 100, 64)
    result = train_cell_probe(
        extract_features(train_images, "raw", grid=8), torch.stack([cell_targets(s.scene) for s in train_samples]),
        extract_features(test_images, "raw", grid=8), torch.stack([cell_targets(s.scene) for s in test_samples]),
        head="slot", steps=150, batch_size=64)
    assert result["objects"] > 100
    assert result["colour"] > 0.6  # chance is 1/8


def test_vqa_probe_memorises_a_few_scenes():
    images, samples = render_split("train", 8, 64)
    questions = QuestionSet({"train": samples, "test": samples})
    features = extract_features(images, "raw", grid=8)
    run = train_vqa_probe(features, features, questions, max_steps=120, batch_size=len(questions.rows["train"]),
                          lr=3e-3, eval_every=40, hidden=64, layers=2, progress=False)
    assert [c["step"] for c in run["curve"]] == [40, 80, 120]
    assert run["final"]["accuracy"] == 1.0
    assert set(run["final"]["per_type"]) == {qa.type for s in samples for qa in s.vqa}


def test_command_line_writes_both_reports(tmp_path):
    cells = main(["cells", "--features", "raw", "--heads", "slot", "--num-train", "32", "--num-test", "8",
                  "--image-size", "64", "--steps", "3", "--output-dir", str(tmp_path)])
    assert set(cells) == {"raw/slot"}
    vqa = main(["vqa", "--features", "raw", "--num-train", "16", "--num-test", "8", "--image-size", "64",
                "--steps", "4", "--eval-every", "2", "--hidden", "32", "--layers", "1", "--output-dir", str(tmp_path)])
    assert [c["step"] for c in vqa["raw"]["curve"]] == [2, 4]
    saved = json.loads((tmp_path / "probe_vqa.json").read_text())
    assert saved["results"]["raw"]["steps"] == 4
    assert "| raw | slot |" in (tmp_path / "probe_cells.md").read_text()
