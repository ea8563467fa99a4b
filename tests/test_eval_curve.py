"""Learning curves over a run's checkpoints: each graded once, equal to grading the folder directly, kept when the
trainer deletes the folder."""

import csv
import json
import shutil

import pytest

import llm
from eval import curve, vqa


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    for step, seed in ((4, 1), (2, 0)):
        model, _ = llm.build_tiny(seed=seed)
        model.save_pretrained(run / f"checkpoint-{step}")
    (run / "checkpoint-6").mkdir()  # a checkpoint being written: no weights yet
    (run / "logs").mkdir()
    return run


def test_checkpoints_are_the_complete_ones_by_step(run_folder):
    assert [step for step, _ in curve.checkpoints(run_folder)] == [2, 4]


def test_curve_grades_each_checkpoint_once_as_a_direct_grading_would(run_folder, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(run_folder, run)
    out = tmp_path / "curve"
    lines = curve.main([str(run), "--vqa", "5", "--output-dir", str(out)])
    assert [line["step"] for line in lines] == [2, 4]
    model, processor = vqa.load_model(run / "checkpoint-4")
    summary, _ = vqa.run(model, processor, vqa.shapesworld_questions(5, "test", 64), "exact")
    assert lines[1]["vqa"] == summary["overall"]["accuracy"]
    assert {k: v for k, v in lines[1].items() if k.startswith("vqa/")} == {
        f"vqa/{kind}": value["accuracy"] for kind, value in summary["per_type"].items()}
    rows = list(csv.DictReader((out / "curve.csv").open()))
    assert [int(r["step"]) for r in rows] == [2, 4] and float(rows[1]["vqa"]) == lines[1]["vqa"]
    assert (out / "curve.png").stat().st_size > 0

    # Graded lines are read back: nothing is graded again, and a checkpoint the trainer deleted keeps its line.
    shutil.rmtree(run / "checkpoint-2")
    monkeypatch.setattr(curve, "grade", lambda *a, **k: pytest.fail("graded again"))
    again = curve.main([str(run), "--vqa", "5", "--output-dir", str(out)])
    assert [line["step"] for line in again] == [2, 4]
    assert len((out / "curve.jsonl").read_text().splitlines()) == 2


def test_curve_draws_and_grades_prompts(run_folder, tmp_path):
    lines = curve.main([str(run_folder), "--vqa", "0", "--t2i", "2", "--top-k", "3", "--output-dir", str(tmp_path)])
    assert len(lines) == 2 and all(0 <= line["shapes_eval"] <= 1 and "vqa" not in line for line in lines)
    assert lines[0]["settings"] == {"num_vqa": 0, "num_t2i": 2, "sampler": {"top_k": 3}}
    drawn = json.loads((tmp_path / "drawings" / run_folder.name / "step-2" / "t2i_results.json").read_text())
    assert drawn["shapes_eval"]["accuracy"]["overall"] == lines[0]["shapes_eval"]
    assert drawn["settings"]["sampler"]["top_k"] == 3
    # Another sampler is another curve: graded anew, the first one's lines kept.
    other = curve.main([str(run_folder), "--vqa", "0", "--t2i", "2", "--top-k", "4", "--output-dir", str(tmp_path)])
    assert len(other) == 2 and len((tmp_path / "curve.jsonl").read_text().splitlines()) == 4


def test_curve_grades_only_the_question_types_asked(run_folder, tmp_path):
    lines = curve.main([str(run_folder), "--vqa", "6", "--question-types", "exists,count", "--output-dir",
                        str(tmp_path)])
    assert lines[0]["settings"] == {"num_vqa": 6, "num_t2i": 0, "question_types": ["exists", "count"]}
    assert {k for k in lines[0] if k.startswith("vqa/")} <= {"vqa/exists", "vqa/count"}
    questions = vqa.shapesworld_questions(6, "test", 64, question_types=["exists", "count"])
    assert len(questions) == 6 and {q.type for q in questions} <= {"exists", "count"}
    everything = vqa.shapesworld_questions(60, "test", 64)
    assert [q.question_id for q in questions] == [q.question_id for q in everything
                                                   if q.type in ("exists", "count")][:6]  # same order, same ids
    with pytest.raises(SystemExit):
        curve.parse_args([str(tmp_path), "--question-types", "colour"])
    with pytest.raises(ValueError, match="question types \\['size'\\]"):
        vqa.shapesworld_questions(3, question_types=["size"])


def test_curve_errors(tmp_path):
    with pytest.raises(SystemExit):
        curve.parse_args([str(tmp_path), "--vqa", "0"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        curve.main([str(tmp_path / "missing")])
