"""Self-checked drawing: the checks a ShapesWorld prompt implies hold on its own target scene, the answer
log-likelihoods equal a one-row-at-a-time computation, and drawing keeps the best-scored candidate."""

import importlib

import pytest
import torch

import llm
from llm import self_check
from llm.self_check import answer_log_likelihoods, best_candidate, drawing_checks, reasoning_prefix
from unimodal.shapesworld import (
    CELL_NAMES, RELATIONS, SHAPES, QAPair, Rng, ShapesPrompts, ShapesWorld, make_captions, prompt_checks,
    relation_holds,
)
from unimodal.shapesworld.world import SHAPE_PLURALS

_RELATION_PHRASES = {"to the left of": "left of", "to the right of": "right of", "above": "above", "below": "below"}


def answer_from_scene(scene, question: str) -> str:
    """The true answer to a check's question, read off the scene by brute force."""
    if question == "How many objects are there?":
        return str(len(scene.objects))
    for shape in SHAPES:
        if question == f"How many {SHAPE_PLURALS[shape]} are there?":
            return str(sum(o.shape == shape for o in scene.objects))
        if question == f"What color is the {shape}?":
            (only,) = [o for o in scene.objects if o.shape == shape]
            return only.color
        if question == f"Where is the {shape}?":
            (only,) = [o for o in scene.objects if o.shape == shape]
            return CELL_NAMES[only.cell]
        for phrase, relation in _RELATION_PHRASES.items():
            for other in SHAPES:
                if question == f"Is the {shape} {phrase} the {other}?":
                    (a,) = [o for o in scene.objects if o.shape == shape]
                    (b,) = [o for o in scene.objects if o.shape == other]
                    return "yes" if relation_holds(a.cell, b.cell, relation) else "no"
    if question.startswith("Is there "):
        named = question.removeprefix("Is there ").removesuffix("?").split(" ", 1)[1]
        return "yes" if any(f"{o.color} {o.shape}" == named for o in scene.objects) else "no"
    raise AssertionError(f"no brute-force answer for {question!r}")


@pytest.mark.parametrize("split", ["validation", "test"])
def test_every_prompt_gets_checks_that_hold_on_its_own_scene(split):
    prompts = ShapesPrompts(split, num_samples=240)
    kinds = set()
    for i in range(240):
        prompt = prompts.prompt(i)
        bare = prompt.text.removeprefix("a photo of ")
        for text in (prompt.text, f"Draw {bare}.", f"Can you draw {prompt.text}?", f"Could you please draw me {bare}?",
                     f"Make a picture of {bare}, please", f"PLEASE DRAW {bare.upper()}!"):
            checks = prompt_checks(text)
            assert checks and checks == prompt_checks(prompt.text), text
            for check in checks:
                assert answer_from_scene(prompt.scene, check.question) == check.answer, (text, check)
                kinds.add(check.type)
    assert kinds == {"count", "exists", "color", "relation"}
    # Every relation word is read: the position prompts above use all four.
    assert {prompts.prompt(i).meta["include"][1]["position"][0] for i in range(4, 240, 6)} == set(RELATIONS)


def test_captions_give_checks_with_cells_and_other_text_gives_none():
    world = ShapesWorld("validation", size=32, num_samples=40)
    for i in range(40):
        scene = world.sample(i, 4).scene
        for caption in make_captions(scene, Rng(i))[:2]:  # the templates that name every object by its cell
            checks = prompt_checks(caption)
            assert checks, caption
            assert all(answer_from_scene(scene, c.question) == c.answer for c in checks), caption
            if len({o.shape for o in scene.objects}) == len(scene.objects):
                assert any(c.type == "position" for c in checks)
    for text in ("", "hello there", "What color is the circle?", "a photo of a dog", "draw a circle with a hat",
                 "a photo of ten circles", "a circle above", "a circle and"):
        assert prompt_checks(text) == [], text
    listed = prompt_checks("a red circle, a square, and two stars")  # a list, with the serial comma
    assert {(c.question, c.answer) for c in listed} >= {("How many objects are there?", "4"),
                                                       ("How many stars are there?", "2"),
                                                       ("What color is the circle?", "red")}
    assert drawing_checks("Draw a red circle above a blue square.") == prompt_checks("a red circle above a blue square")


def test_reasoning_prefix_keeps_the_reasoning_up_to_the_last_separator():
    reply = "the circle is in the top row and the square is in the bottom row, so yes"
    assert reasoning_prefix(reply) == "the circle is in the top row and the square is in the bottom row, so "
    assert reasoning_prefix(" yes ") == "" and reasoning_prefix("a, so b, so no") == "a, so b, so "


def one_row_log_likelihood(model, processor, image, question, prefix, answer) -> float:
    """log p(answer | image, question, prefix), scoring the answer's tokens one forward at a time, no batching."""
    head = processor.apply_chat_template([{"role": "user", "content": processor.user_content(question)}],
                                         add_generation_prompt=True) + prefix
    ids = processor(text=[head + answer], images=[image])
    head_ids = processor(text=[head], images=[image])["input_ids"][0].tolist()
    full = ids["input_ids"][0].tolist()
    common = next(k for k in range(len(full) + 1) if k == len(head_ids) or k == len(full) or head_ids[k] != full[k])
    total = 0.0
    for t in range(common, len(full)):
        with torch.no_grad():
            logits = model(input_ids=ids["input_ids"][:, :t], attention_mask=ids["attention_mask"][:, :t],
                           image_indices=ids["image_indices"]).logits
        total += float(logits[0, -1].float().log_softmax(-1)[full[t]])
    return total


def test_answer_log_likelihoods_equal_a_row_by_row_computation(monkeypatch):
    model, processor = llm.build_tiny(seed=0)
    images = list(model.generate_image(["a red circle", "two stars"], seed=0).indices)
    checks = [QAPair("How many objects are there?", "2", "count"), QAPair("What color is the circle?", "red", "color"),
              QAPair("Is the circle above the star?", "yes", "relation")]
    reasoning = "the circle is in the top row and the star is in the bottom row, so "
    asked = []

    def fake_reasonings(model_, processor_, prompts, images_):
        asked.append(len(prompts))
        return [reasoning] * len(prompts)

    monkeypatch.setattr(self_check, "_reasonings", fake_reasonings)
    scores = answer_log_likelihoods(model, processor, images, checks, batch_size=4)  # batches cut across images
    assert scores.shape == (2, 3) and asked == [2]  # only the reasoned check asks for a reasoning, once per image
    for i, image in enumerate(images):
        for j, check in enumerate(checks):
            prefix = reasoning if check.type == "relation" else ""
            expected = one_row_log_likelihood(model, processor, image, check.question, prefix, check.answer)
            assert scores[i, j].item() == pytest.approx(expected, abs=1e-4)
    with pytest.raises(ValueError, match="at least one check"):
        answer_log_likelihoods(model, processor, images, [])


def fixed_scores(monkeypatch, module, scores_by_call):
    """Make `best_candidate` (as `module` calls it) score candidates with the next row of `scores_by_call`."""
    calls = iter(scores_by_call)

    def scores(model, processor, images, checks, batch_size=64):
        row = torch.tensor(next(calls), dtype=torch.float32)
        assert len(images) == len(row)
        return row[:, None].expand(len(images), len(checks))

    monkeypatch.setattr(module, "answer_log_likelihoods", scores)


def test_drawing_keeps_the_candidate_with_the_best_answers(monkeypatch):
    model, processor = llm.build_tiny(seed=0)
    prompts = ["a red circle above a blue square", "hello there", "three stars"]
    kwargs = dict(seed=4, cfg_scale=2.0, top_k=50)
    # The candidates are the rows a plain call draws for the same batch of prompts: three for each prompt with
    # checks, one for the prompt without.
    plain = model.generate_image([prompts[0]] * 3 + [prompts[1]] + [prompts[2]] * 3, **kwargs).indices
    assert all(not torch.equal(plain[i], plain[j]) for i in range(7) for j in range(i))
    fixed_scores(monkeypatch, self_check, [[-3.0, -1.0, -1.0], [-2.0, -5.0, -0.5]])  # a tie: the first is kept
    checked = model.generate_image(prompts, self_check=3, **kwargs)
    assert torch.equal(checked.indices, plain[[1, 3, 6]])
    assert checked.settings["self_check"] == 3 and len(checked.images) == 3
    assert [image.info["prompt"] for image in checked.images] == prompts
    monkeypatch.undo()
    # With the model's own scores: the kept rows are the best-scored ones.
    checked = model.generate_image(prompts, self_check=3, **kwargs).indices
    first, scores = best_candidate(model, processor, plain[:3], drawing_checks(prompts[0]))
    assert first == int(scores.argmax()) and torch.equal(checked[0], plain[first])
    # self_check=1 is the plain drawing; a partial drawing (num_scales) is never checked.
    assert torch.equal(model.generate_image(prompts, self_check=1, **kwargs).indices,
                       model.generate_image(prompts, **kwargs).indices)
    coarse = model.generate_image(prompts, self_check=3, num_scales=2, **kwargs).indices
    assert torch.equal(coarse, model.generate_image(prompts, num_scales=2, **kwargs).indices)
    with pytest.raises(ValueError, match="self_check must be an int >= 1"):
        model.generate_image(prompts, self_check=0)


def test_a_chat_drawing_is_checked_among_candidates(monkeypatch):
    model, processor = llm.build_tiny(seed=0)
    scenes = [ShapesWorld("test", size=64, num_samples=2)[i].image for i in range(2)]
    shown = [{"type": "image", "image": scene} for scene in scenes]
    messages = [{"role": "user", "content": [*shown, {"type": "text", "text": "Draw three stars."}]}]
    greedy = dict(cfg_scale=2.0, temperature=0.0)
    # Greedy candidates are all the single greedy drawing when each row sees the conversation's images in order.
    single = llm.chat(model, messages, seed=2, draw=True, image_settings=greedy).indices[0]
    picked = []
    real = self_check.best_candidate

    def spy(model_, processor_, candidates, checks):
        picked.append((candidates.clone(), [c.question for c in checks]))
        return real(model_, processor_, candidates, checks)

    monkeypatch.setattr(importlib.import_module("llm.chat"), "best_candidate", spy)
    llm.chat(model, messages, seed=2, draw=True, image_settings={**greedy, "self_check": 4})
    (candidates, questions), = picked
    assert candidates.shape == (4, model.num_image_codes) and "How many stars are there?" in questions
    assert all(torch.equal(row, single) for row in candidates)

    # Sampled candidates differ; the kept one is the best-scored, and previews show the first candidate only.
    picked.clear()
    fixed_scores(monkeypatch, self_check, [[-4.0, -2.0, -0.1, -3.0]])
    previews = []
    settings = {"self_check": 4, "cfg_scale": 2.0, "callback": lambda k, shown: previews.append(len(shown))}
    reply = llm.chat(model, messages, seed=2, draw=True, image_settings=settings)
    (candidates, _), = picked
    assert torch.equal(reply.indices[0], candidates[2]) and previews == [1] * len(model.scales)
    picked.clear()
    llm.chat(model, [{"role": "user", "content": "Draw something nice."}], seed=2, draw=True,
             image_settings={"self_check": 4})
    assert picked == []  # nothing to check: drawn once
