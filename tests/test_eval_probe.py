"""eval.probe: feature extraction against its definition, cell targets, and that both probes learn."""

import json

import pytest
import torch

from eval.probe import (
    DEFAULT_TOKENIZER, LEVERS, STUDY_BASE, QuestionSet, Recipe, TrainingStream, VQAProbe, cell_targets, extract_features,
    features_of, lever_overrides, main, oracle_features, render_split, train_cell_probe, train_vqa_probe,
)
from tokenizer import TokenFlowTokenizer
from unimodal.shapesworld.language import QUESTION_TYPES
from unimodal.shapesworld.world import COLORS, GRID, SHAPES, cell_row_col


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


def test_oracle_features_match_a_pixel_construction():
    """Each slot holds the one-hots of the object whose 3×3 cell (in pixels) contains the slot's centre."""
    _, samples = render_split("train", 6, 64)
    for side in (8, 6):
        features = oracle_features([s.scene for s in samples], side)
        assert features.shape == (6, side * side, len(SHAPES) + len(COLORS))
        for b, sample in enumerate(samples):
            expected = torch.zeros(side * side, len(SHAPES) + len(COLORS))
            for slot in range(side * side):
                y, x = ((slot // side) + 0.5) * 64 / side, ((slot % side) + 0.5) * 64 / side
                for obj in sample.scene.objects:
                    row, col = cell_row_col(obj.cell)
                    if row * 64 / GRID <= y < (row + 1) * 64 / GRID and col * 64 / GRID <= x < (col + 1) * 64 / GRID:
                        expected[slot, SHAPES.index(obj.shape)] = 1
                        expected[slot, len(SHAPES) + list(COLORS).index(obj.color)] = 1
            assert torch.equal(features[b], expected)
    assert torch.equal(features_of(samples, "oracle", grid=8), oracle_features([s.scene for s in samples], 8))


def test_causal_probe_answers_from_what_comes_before():
    """Under causal attention with the question first, the slots cannot see the question: their description outputs
    do not change with it; bidirectionally they do."""
    words = torch.tensor([[1, 2, 0], [3, 4, 5]])
    features = torch.randn(1, 4, 5).expand(2, -1, -1)
    for encoder, attention, same in (("torch", "causal", True), ("torch", "bidirectional", False),
                                     ("llm", "causal", True)):
        torch.manual_seed(0)
        probe = VQAProbe(5, 4, 6, 3, 3, Recipe(hidden=32, layers=1, num_heads=2, order="question-first",
                                                  attention=attention, encoder=encoder))
        answers, described = probe(features, words)
        assert answers.shape == (2, 3) and described.shape == (2, 4, 2 + len(SHAPES) + len(COLORS) + GRID * GRID)
        probe.recipe.order = "image-first"
        first = probe(features, words)[1]
        assert torch.allclose(first[0], first[1], atol=1e-5) == same
    with pytest.raises(ValueError, match="needs attention 'causal'"):
        Recipe(encoder="llm", attention="bidirectional")


def test_training_stream_curriculum_balance_and_fresh_scenes():
    _, samples = render_split("train", 200, 64)
    questions = QuestionSet({"train": samples, "test": samples[:5]})
    features = features_of(samples, "oracle", grid=8)
    recipe = Recipe(batch_size=60, curriculum_steps=30, balance="uniform", fresh=False)
    stream = TrainingStream(features, samples, questions, recipe, lambda s: features_of(s, "oracle", grid=8), 64)
    assert [stream.object_cap(s) for s in (0, 9, 10, 29, 30)] == [1, 1, 2, 3, 4]
    batch_features, words, answers, targets = stream.batch(0)
    occupied_slots = (batch_features.sum(-1) > 0).sum(1)  # one object covers 2×2, 2×3 or 3×3 slots
    assert set(occupied_slots.tolist()) <= {4, 6, 9}
    assert targets.shape == (60, 3, 64) and torch.equal(targets[:, 0].gt(0).sum(1), occupied_slots)
    kinds = [stream.pick({k: [k] for k in QUESTION_TYPES}) for _ in range(600)]
    assert min(kinds.count(k) for k in QUESTION_TYPES) > 60  # uniform over the six types
    fresh = TrainingStream(features, samples, questions, Recipe(batch_size=8, fresh=True),
                           lambda s: features_of(s, "oracle", grid=8), 64)
    batch_features, *_ = fresh.batch(0)
    assert fresh.next_fresh >= 208 and batch_features.shape == (8, 64, 14)


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
    recipe = Recipe(batch_size=len(questions.rows["train"]), lr=3e-3, hidden=64, layers=2, describe_weight=0.0,
                    curriculum_steps=0)
    stream = TrainingStream(features, samples, questions, recipe, lambda s: features_of(s, "raw", grid=8), 64)
    run = train_vqa_probe(stream, features, max_steps=120, eval_every=40, progress=False)
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
    study = ["study", "--features", "oracle", "--levers", "base,defaults+conv-projector", "--num-train", "16", "--num-test", "8",
             "--image-size", "64", "--steps", "2", "--eval-every", "1", "--hidden", "32", "--layers", "1",
             "--output-dir", str(tmp_path / "study")]
    first = main(study)
    assert set(first) == {"oracle-base", "oracle-defaults+conv-projector"}
    on_defaults = first["oracle-defaults+conv-projector"]["recipe"]
    assert on_defaults == {**first["oracle-base"]["recipe"], **{k: Recipe().__dict__[k] for k in STUDY_BASE},
                           "projector": "conv2x_gelu"}
    assert main(study[:4] + ["base"] + study[5:]) == first  # saved runs are read back, not retrained
    rows = (tmp_path / "study" / "curves.csv").read_text().splitlines()
    assert rows[0].startswith("source,lever,step") and len(rows) == 1 + 2 * 2
    assert (tmp_path / "study" / "curves.png").stat().st_size > 0
    with pytest.raises(SystemExit):
        main(study[:4] + ["defaults+nothing"] + study[5:])
    assert set(LEVERS) >= {"base", "defaults", "fresh", "curriculum", "describe", "question-first-causal"}


def test_levers_change_the_base_or_the_defaults():
    assert lever_overrides(None) == lever_overrides("defaults") == {}
    assert lever_overrides("fresh") == {**STUDY_BASE, "fresh": True}
    assert lever_overrides("defaults+fresh") == {"fresh": True}
    assert Recipe(**lever_overrides("defaults+conv-projector")).projector == "conv2x_gelu"
