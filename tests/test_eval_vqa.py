"""VQA scoring rules against hand-worked examples, question files, the answering loop and the lmms-eval plugin."""

import json

import pytest
import torch

import llm
from eval.vqa import (
    Question, build_prompt, exact_match, generate_answers, judge, load_questions, mme_metrics, normalize_answer,
    option_letters, parse_option_letter, parse_yes_no_mme, parse_yes_no_pope, pope_metrics, run, score_predictions,
    shapesworld_questions, summary_markdown, vqa_accuracy,
)
from unimodal.shapesworld import ShapesWorld

OPTIONS = {"A": "red", "B": "blue", "C": "green", "D": "yellow"}


# ---------------------------------------------------------------------------------------------------- rules
@pytest.mark.parametrize("text, expected", [
    ("Two.", "2"),
    ("The Red one", "red 1"),
    ("  Yes!", "yes"),
    ("dont know", "don't know"),
    ("1,000", "1000"),
    ("top-left", "top left"),
    ("an apple , please", "apple please"),
    ("2.5", "2.5"),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match():
    assert exact_match("Red.", ["red"]) == 1.0
    assert exact_match("a diamond", ["diamond"]) == 1.0
    assert exact_match("diamonds", ["diamond"]) == 0.0
    assert exact_match("three", ["2", "3"]) == 1.0


def test_vqa_soft_accuracy_hand_worked():
    # Ten answers, two of them "2": the 2 matching subsets hold 1 match (1/3), the 8 others 2 (2/3) → 6/10.
    answers = ["2", "2"] + ["3"] * 8
    assert vqa_accuracy("two", answers) == pytest.approx(0.6)
    # Three matches: matching subsets see 2 (2/3), the 7 others 3 (1) → (3·2/3 + 7)/10 = 0.9 (VQA's known quirk).
    assert vqa_accuracy("2", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("2", ["2"] * 4 + ["3"] * 6) == pytest.approx(1.0)
    assert vqa_accuracy("4", answers) == 0.0
    assert vqa_accuracy("red", ["red"]) == 1.0


def test_mme_parse_and_metrics():
    assert parse_yes_no_mme("Yes.") == "yes"
    assert parse_yes_no_mme("No, there is not.") == "no"
    assert parse_yes_no_mme("yes it is") == "yes"
    assert parse_yes_no_mme("I think yes") == "other"
    # image 1: both right; image 2: one right, one wrong → acc 3/4, acc+ 1/2, score 100·(0.75 + 0.5).
    metrics = mme_metrics(["Yes", "no", "Yes.", "Yes"], ["yes", "no", "yes", "no"], ["i1", "i1", "i2", "i2"])
    assert metrics["acc"] == pytest.approx(0.75)
    assert metrics["acc_plus"] == pytest.approx(0.5)
    assert metrics["score"] == pytest.approx(125.0)
    assert metrics["images"] == 2


def test_pope_parse_and_metrics():
    assert parse_yes_no_pope("There is not a dog. Yes.") == "no"
    assert parse_yes_no_pope("Nothing") == "yes"
    predictions = ["Yes", "No", "Yes, there is.", "There is not a dog.", "yes", "no"]
    answers = ["yes", "no", "no", "yes", "yes", "yes"]
    # parsed: yes no yes no yes no → TP 2 (0, 4), FP 1 (2), TN 1 (1), FN 2 (3, 5).
    m = pope_metrics(predictions, answers)
    assert m["accuracy"] == pytest.approx(3 / 6)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 4)
    assert m["f1"] == pytest.approx(4 / 7)
    assert m["yes_ratio"] == pytest.approx(3 / 6)
    never_yes = pope_metrics(["no", "no"], ["yes", "no"])
    assert never_yes["precision"] == 0.0 and never_yes["f1"] == 0.0 and never_yes["accuracy"] == 0.5
    with pytest.raises(ValueError, match="'yes' or 'no'"):
        pope_metrics(["yes"], ["maybe"])


@pytest.mark.parametrize("reply, expected", [
    ("B", "B"),
    ("(C) green", "C"),
    ("D. yellow", "D"),
    ("The answer is D.", "D"),
    ("answer: (A)", "A"),
    ("blue", "B"),
    ("It is green.", "C"),
    ("I don't know", None),
    ("It is green, not blue", None),
    ("E", None),
])
def test_parse_option_letter(reply, expected):
    assert parse_option_letter(reply, OPTIONS) == expected


def test_option_letters():
    assert option_letters(["cat", "dog"]) == {"A": "cat", "B": "dog"}
    with pytest.raises(ValueError, match="capital letters"):
        option_letters({"a": "cat"})


def test_score_predictions_per_type_exact_and_mc():
    questions = [Question("1", None, "q", ["red"], "color"), Question("2", None, "q", ["blue"], "color"),
                 Question("3", None, "q", ["star"], "shape")]
    summary = score_predictions(questions, ["Red", "green", "a star"], "exact")
    assert summary["per_type"]["color"] == {"accuracy": 0.5, "n": 2}
    assert summary["per_type"]["shape"] == {"accuracy": 1.0, "n": 1}
    assert summary["overall"]["accuracy"] == pytest.approx(2 / 3)
    assert summary["overall"]["accuracy_macro"] == pytest.approx(0.75)
    mc = [Question("1", None, "q", ["B"], "x", options=OPTIONS), Question("2", None, "q", ["A"], "x", options=OPTIONS)]
    assert score_predictions(mc, ["(B)", "blue"], "mc")["overall"]["accuracy"] == 0.5


def test_final_rule_grades_what_a_reasoned_reply_concludes():
    question = Question("1", None, "Is the red circle to the left of the blue square?", ["yes"], "relation")
    reasoned = "The red circle is in the left column and the blue square is in the center column, so Yes."
    assert judge(question, reasoned, "final") == ("yes", 1.0)
    assert judge(question, reasoned, "exact")[1] == 0.0  # exact match reads the whole reply
    assert judge(question, "yes", "final") == ("yes", 1.0)
    assert judge(question, "the red circle is in the center column, so no", "final") == ("no", 0.0)
    # Only the last conclusion counts.
    assert judge(question, "so yes, so no", "final") == ("no", 0.0)
    colour = Question("2", None, "What colour is the circle?", ["red"], "color")
    assert score_predictions([question, colour], [reasoned, "Red"], "final")["overall"]["accuracy"] == 1.0


def test_reasoning_metrics_of_reasoned_replies():
    reasoning = "the red circle is in the left column and the blue square is in the center column"
    question = Question("1", None, "Is the red circle to the left of the blue square?", ["yes"], "relation",
                        reasoning=reasoning)
    colour = Question("2", None, "What colour is the circle?", ["red"], "color")
    replies = [f"{reasoning}, so yes",                                       # right reasoning, follows from it
               f"{reasoning}, so no",                                        # right reasoning, wrong conclusion
               "the red circle is in the right column and the blue square is in the center column, so no",  # wrong
               "yes"]                                                        # no reasoning
    summary = score_predictions([question] * 4 + [colour], replies + ["red"], "final")
    relation = summary["per_type"]["relation"]
    assert relation["accuracy"] == 0.5 and relation["reasoning"] == 0.5 and relation["consistent"] == 0.5
    assert summary["per_type"]["color"] == {"accuracy": 1.0, "n": 1, "reasoning": None, "consistent": None}
    assert "| relation | 0.5000 | 0.5000 | 0.5000 | 4 |" in summary_markdown(summary, "t")
    # Without reasonings to compare to, the summary is the plain one.
    plain = score_predictions([colour], ["red"], "final")
    assert plain["per_type"]["color"] == {"accuracy": 1.0, "n": 1}


def test_shapesworld_questions_carry_the_reasoning_of_relation_questions():
    questions = shapesworld_questions(60, "validation")
    relation = [q for q in questions if q.type == "relation"]
    assert relation and all(q.reasoning.endswith(" column") or q.reasoning.endswith(" row") for q in relation)
    assert all(q.reasoning == "" for q in questions if q.type != "relation")


def test_score_predictions_mme_total_is_sum_of_categories():
    questions = [Question(str(i), None, "q", [a], cat, image_id=img) for i, (a, cat, img) in enumerate([
        ("yes", "color", "a"), ("no", "color", "a"), ("yes", "count", "b"), ("no", "count", "b")])]
    summary = score_predictions(questions, ["yes", "no", "yes", "yes"], "mme")
    assert summary["per_type"]["color"]["score"] == pytest.approx(200.0)
    assert summary["per_type"]["count"]["score"] == pytest.approx(50.0)  # acc 0.5, acc+ 0
    assert summary["overall"]["total_score"] == pytest.approx(250.0)


# ---------------------------------------------------------------------------------------------------- files
def _write_question_file(tmp_path, records, images=("a.png", "b.png")):
    world = ShapesWorld("test", 64, len(images))
    for i, name in enumerate(images):
        world[i].image.save(tmp_path / name)
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_load_questions_formats_and_errors(tmp_path):
    path = _write_question_file(tmp_path, [
        {"question_id": "q0", "image": "a.png", "question": "Which?", "answer": "blue", "category": "c",
         "options": ["red", "blue"]},
        {"image": "b.png", "text": "Which?", "answers": ["A"], "options": {"A": "x", "B": "y"}},
    ])
    questions = load_questions(path, rule="mc")
    assert [q.answers for q in questions] == [["B"], ["A"]]
    assert questions[0].type == "c" and questions[1].type == "all" and questions[1].question_id == "1"
    assert questions[0].image == str(tmp_path / "a.png")
    bad = _write_question_file(tmp_path, [{"image": "missing.png", "question": "q", "answer": "x"}])
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_questions(bad)
    bad = _write_question_file(tmp_path, [{"image": "a.png", "question": "q"}])
    with pytest.raises(ValueError, match="'answer' or 'answers'"):
        load_questions(bad)
    bad = _write_question_file(tmp_path, [{"image": "a.png", "question": "q", "answer": "z", "options": ["x", "y"]}])
    with pytest.raises(ValueError, match="neither an option letter"):
        load_questions(bad, rule="mc")


def test_shapesworld_questions_take_every_question_of_an_image_in_order():
    questions = shapesworld_questions(8)
    first = ShapesWorld("test", 64, 2)[0]
    assert len(questions) == 8
    assert [q.question for q in questions[: len(first.vqa)]] == [p.question for p in first.vqa]
    assert {q.image_id for q in questions} == {"test-000000", "test-000001"}
    # At most two per scene: the first two of each scene's own order, over four scenes.
    spread = shapesworld_questions(8, per_image=2)
    world = ShapesWorld("test", 64, 4)
    assert [q.question for q in spread] == [p.question for i in range(4) for p in world[i].vqa[:2]]
    assert [q.image_id for q in spread[::2]] == [f"test-{i:06d}" for i in range(4)]
    with pytest.raises(ValueError, match="per_image must be None"):
        shapesworld_questions(8, per_image=0)


# ---------------------------------------------------------------------------------------------------- model
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from llm import build_tiny

    model, processor = build_tiny(seed=0)
    directory = tmp_path_factory.mktemp("tiny_mllm")
    model.save_pretrained(directory)
    return str(directory), model, processor


def test_run_is_deterministic_and_replies_are_text(tiny_checkpoint):
    _, model, processor = tiny_checkpoint
    questions = shapesworld_questions(5)
    first_summary, first = run(model, processor, questions, "exact", batch_size=2, max_new_tokens=4)
    second_summary, second = run(model, processor, questions, "exact", batch_size=2, max_new_tokens=4)
    assert [r["reply"] for r in first] == [r["reply"] for r in second]
    assert first_summary == second_summary
    assert first_summary["num_questions"] == 5
    assert all("<image>" not in r["reply"] for r in first)


def test_prompts_follow_the_model_image_placement():
    question = Question("q", None, "What color is the star?", ["red"])
    for placement, expected in (("before_text", "<image>\nWhat color is the star?<|im_end|>"),
                                ("after_text", "What color is the star?\n<image>\n<|im_end|>")):
        _, processor = llm.build_tiny(seed=0, image_placement=placement)
        assert expected in build_prompt(processor, question)


def test_lmms_plugin_generate_until(tiny_checkpoint, tmp_path):
    directory, model, processor = tiny_checkpoint
    from eval.lmms_plugin.models import AVAILABLE_MODELS
    from eval.lmms_plugin.models.tokenflow_mllm import TokenFlowMLLMForLMMSEval

    assert AVAILABLE_MODELS == {"tokenflow_mllm": "TokenFlowMLLMForLMMSEval"}
    try:
        from lmms_eval.api.instance import Instance
    except ImportError:  # lmms-eval absent: a stand-in with the same fields
        from dataclasses import dataclass, field

        @dataclass
        class Instance:
            request_type: str
            arguments: tuple
            idx: int
            metadata: dict = field(default_factory=dict)

            @property
            def args(self):
                return self.arguments

    lmm = TokenFlowMLLMForLMMSEval.create_from_arg_string(f"pretrained={directory},max_new_tokens=4",
                                                          {"batch_size": 2, "device": "cpu"})
    world = ShapesWorld("test", 64, 3)
    docs = [{"image": world[i].image, "question": world[i].vqa[0].question} for i in range(3)]
    lmm.task_dict = {"shapes": {"test": docs}}

    def request(doc_id, gen_kwargs):
        return Instance("generate_until", (docs[doc_id]["question"], gen_kwargs, lambda d: [d["image"]], doc_id,
                                           "shapes", "test"), doc_id, {"task": "shapes", "doc_id": doc_id, "repeats": 1})

    replies = lmm.generate_until([request(i, {"max_new_tokens": 4, "temperature": 0}) for i in range(3)])
    prompts = [processor.apply_chat_template([{"role": "user", "content": "<image>\n" + d["question"]}],
                                             add_generation_prompt=True) for d in docs]
    direct = generate_answers(model, processor, prompts, [d["image"] for d in docs], batch_size=3, max_new_tokens=4)
    assert replies == direct
    cut = next(r for r in direct if len(r.strip()) >= 2)
    marker = cut.strip()[1]
    index = direct.index(cut)
    replies = lmm.generate_until([request(index, {"max_new_tokens": 4, "until": [marker]})])
    assert replies == [cut[: cut.index(marker)]]
    with pytest.raises(NotImplementedError, match="loglikelihood"):
        lmm.loglikelihood([request(0, {})])
    with pytest.raises(TypeError, match="unknown model arguments"):
        TokenFlowMLLMForLMMSEval(pretrained=directory, colour="red")
    assert torch.equal(lmm.model.image_head.weight, model.image_head.weight)
