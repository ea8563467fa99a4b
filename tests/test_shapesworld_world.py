"""ShapesWorld generator: determinism, splits, held-out pairs, rendering geometry, and the truth of every caption,
question and prompt, checked by a small independent reader of the generated text."""

import io
import re
from collections import Counter

import numpy as np
import pytest

from unimodal.shapesworld import (
    ANSWER_VOCAB, BACKGROUNDS, CELL_NAMES, COLORS, HELD_OUT_PAIRS, PROMPT_TAGS, QUESTION_TYPES, SHAPES, Rng, Scene,
    SceneObject, ShapesPrompts, ShapesWorld, check_prompt_meta, final_answer, object_bbox, render_scene, sample_seed,
)
from unimodal.shapesworld.language import implied_relation_answer, make_questions

PLURALS = {"circles": "circle", "squares": "square", "triangles": "triangle", "stars": "star", "crosses": "cross",
           "diamonds": "diamond"}


@pytest.fixture(scope="module")
def train_samples():
    world = ShapesWorld("train", num_samples=2000)
    return [world[i] for i in range(len(world))]


# ------------------------------------------------------------------------------------------- vocabulary, palette

def test_vocabulary_sizes_and_palette_separation():
    assert len(SHAPES) >= 6 and len(COLORS) >= 8
    assert {"circle", "square", "triangle", "star", "cross", "diamond"} <= set(SHAPES)
    objects = np.array(list(COLORS.values()), dtype=float)
    backgrounds = np.array(list(BACKGROUNDS.values()), dtype=float)
    between_objects = np.linalg.norm(objects[:, None] - objects[None], axis=-1)[~np.eye(len(objects), dtype=bool)]
    assert between_objects.min() > 90
    assert np.linalg.norm(objects[:, None] - backgrounds[None], axis=-1).min() > 110
    assert not set(COLORS) & set(BACKGROUNDS)
    assert 4 <= len(HELD_OUT_PAIRS) <= 6
    # Every colour and shape still occurs in training through some other pair.
    assert {c for c, _ in HELD_OUT_PAIRS} <= set(COLORS) and {s for _, s in HELD_OUT_PAIRS} <= set(SHAPES)
    assert len({c for c, _ in HELD_OUT_PAIRS}) == len(HELD_OUT_PAIRS) == len({s for _, s in HELD_OUT_PAIRS})


# ------------------------------------------------------------------------------------------- determinism, seeds

def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_same_seed_same_bytes_and_text():
    for split in ("train", "test"):
        a, b = ShapesWorld(split, num_samples=20), ShapesWorld(split, num_samples=20)
        for i in (0, 7, 19):
            x, y = a[i], b[i]
            assert _png(x.image) == _png(y.image)
            assert (x.captions, x.vqa, [p.meta for p in x.prompts]) == (y.captions, y.vqa, [p.meta for p in y.prompts])
            assert x.scene == y.scene
    # A different base seed gives a different world.
    first = [ShapesWorld("train", num_samples=5, seed=0)[i].scene for i in range(5)]
    other = [ShapesWorld("train", num_samples=5, seed=1)[i].scene for i in range(5)]
    assert first != other


def test_split_seeds_never_overlap():
    seeds = {split: {sample_seed(split, i, s) for i in range(5000) for s in (0, 1, 2)}
             for split in ("train", "validation", "test")}
    assert all(len(v) == 15000 for v in seeds.values())
    assert not seeds["train"] & seeds["validation"]
    assert not seeds["train"] & seeds["test"]
    assert not seeds["validation"] & seeds["test"]
    # Large indices stay in their split too.
    assert sample_seed("train", 2**32 - 1) != sample_seed("validation", 0)
    with pytest.raises(ValueError, match="index"):
        sample_seed("train", 2**32)
    with pytest.raises(ValueError, match="split"):
        sample_seed("dev", 0)


def test_splits_are_different_worlds():
    train = {ShapesWorld("train", num_samples=50)[i].scene for i in range(50)}
    test = {ShapesWorld("test", num_samples=50)[i].scene for i in range(50)}
    assert len(train) == 50 and len(test) == 50 and not train & test


def test_dataset_interface_and_errors():
    world = ShapesWorld("validation", size=64, num_samples=3)
    assert len(world) == 3 and [s.index for s in world] == [0, 1, 2]  # iteration stops at IndexError
    with pytest.raises(IndexError):
        world[3]
    with pytest.raises(ValueError, match="split"):
        ShapesWorld("dev")
    with pytest.raises(ValueError, match="image size"):
        ShapesWorld("train", size=16)
    with pytest.raises(ValueError, match="held_out"):
        ShapesWorld("train", held_out="include")
    with pytest.raises(ValueError, match="held_out mode"):
        ShapesWorld("test", held_out="sometimes")
    with pytest.raises(ValueError, match="tag"):
        ShapesPrompts("test", tags=("single_object", "drawing"))


# ------------------------------------------------------------------------------------------- rendering geometry

def test_render_sizes_bboxes_and_pixels():
    scene = Scene.of([SceneObject("circle", "red", "small", 4), SceneObject("square", "blue", "large", 0)],
                     ("gray",), "plain")
    # Hand-computed: cell side 64/3; small circle diameter 0.6 · 64/3 = 12.8 around (32, 32).
    assert object_bbox(scene.objects[1], 64) == (25, 25, 39, 39)
    for size in (64, 128, 256):
        image = render_scene(scene, size)
        assert image.size == (size, size) and image.mode == "RGB"
        pixels = np.asarray(image).astype(int)
        for obj in scene.objects:
            x0, y0, x1, y1 = object_bbox(obj, size)
            centre = pixels[(y0 + y1) // 2, (x0 + x1) // 2]
            assert np.abs(centre - COLORS[obj.color]).max() <= 1
            inside = np.all(np.abs(pixels - COLORS[obj.color]) < 60, axis=-1)
            rows, cols = np.nonzero(inside)
            assert x0 <= cols.min() <= x0 + 1 and x1 - 2 <= cols.max() <= x1 - 1
            assert y0 <= rows.min() <= y0 + 1 and y1 - 2 <= rows.max() <= y1 - 1
        assert np.abs(pixels[size - 2, size // 2] - BACKGROUNDS["gray"]).max() <= 1


def test_small_objects_are_big_enough_and_objects_never_touch():
    for shape in SHAPES:
        x0, y0, x1, y1 = object_bbox(SceneObject(shape, "red", "small", 4), 64)
        assert max(x1 - x0, y1 - y0) >= 12
    # Two large objects in neighbouring cells leave a gap of at least 2 px at 64 px.
    left, right = SceneObject("square", "red", "large", 3), SceneObject("circle", "red", "large", 4)
    assert object_bbox(right, 64)[0] - object_bbox(left, 64)[2] >= 2


def test_two_tone_backgrounds():
    obj = SceneObject("star", "white", "small", 4)
    top, bottom = np.asarray(render_scene(Scene.of([obj], ("navy", "olive"), "horizontal")))[[2, 61], 2]
    assert tuple(top) == BACKGROUNDS["navy"] and tuple(bottom) == BACKGROUNDS["olive"]
    left, right = np.asarray(render_scene(Scene.of([obj], ("navy", "olive"), "vertical")))[2, [2, 61]]
    assert tuple(left) == BACKGROUNDS["navy"] and tuple(right) == BACKGROUNDS["olive"]


def test_scene_validation():
    with pytest.raises(ValueError, match="shape"):
        SceneObject("hexagon", "red", "small", 0)
    with pytest.raises(ValueError, match="color"):
        SceneObject("star", "brown", "small", 0)
    with pytest.raises(ValueError, match="one object per cell"):
        Scene.of([SceneObject("star", "red", "small", 0), SceneObject("cross", "blue", "large", 0)])
    with pytest.raises(ValueError, match="background"):
        Scene.of([SceneObject("star", "red", "small", 0)], ("black",), "vertical")
    scene = Scene.of([SceneObject("star", "red", "small", 8), SceneObject("cross", "blue", "large", 2)],
                     ("black", "navy"), "vertical")
    assert Scene.from_dict(scene.to_dict()) == scene


def test_rng_draws_cover_their_range():
    rng = Rng(3, "test")
    draws = Counter(rng.below(6) for _ in range(6000))
    assert set(draws) == set(range(6)) and min(draws.values()) > 850
    assert sorted(rng.shuffled(range(10))) == list(range(10))


# ------------------------------------------------------------------------------------------- an independent reader

def _resolve(ref: str, objects: list[dict]) -> list[dict]:
    """Objects a reference like "the small red star", "the red object" or "the object in the top left" names."""
    assert ref.startswith("the "), ref
    if ref.startswith("the object in the "):
        return [o for o in objects if CELL_NAMES[o["cell"]] == ref[len("the object in the "):]]
    *attributes, noun = ref[4:].split()
    return [o for o in objects if noun in ("object", o["shape"]) and all(a in (o["size"], o["color"])
                                                                         for a in attributes)]


def _one(ref: str, objects: list[dict]) -> dict:
    matches = _resolve(ref, objects)
    assert len(matches) == 1, f"ambiguous or empty reference {ref!r}: {matches}"
    return matches[0]


def _true_answer(question: str, objects: list[dict]) -> tuple[str, str]:
    """(type, answer) read off the scene for one generated question."""
    rows_cols = {id(o): divmod(o["cell"], 3) for o in objects}
    if m := re.fullmatch(r"What (?:color is|is the color of) (.+)\?", question):
        return "color", _one(m[1], objects)["color"]
    if m := re.fullmatch(r"(?:What|Which) shape is (.+)\?", question):
        return "shape", _one(m[1], objects)["shape"]
    if question == "How many objects are there?":
        return "count", str(len(objects))
    if m := re.fullmatch(r"How many (\w+) objects are there\?", question):
        return "count", str(sum(o["color"] == m[1] for o in objects))
    if m := re.fullmatch(r"How many (\w+) are there\?", question):
        return "count", str(sum(o["shape"] == PLURALS[m[1]] for o in objects))
    if m := re.fullmatch(r"Where is (.+)\?", question):
        return "position", CELL_NAMES[_one(m[1], objects)["cell"]]
    if m := re.fullmatch(r"Is (the .+?) (to the left of|to the right of|above|below) (the .+)\?", question):
        (ra, ca), (rb, cb) = rows_cols[id(_one(m[1], objects))], rows_cols[id(_one(m[3], objects))]
        holds = {"to the left of": ca < cb, "to the right of": ca > cb, "above": ra < rb, "below": ra > rb}[m[2]]
        return "relation", "yes" if holds else "no"
    if m := re.fullmatch(r"Is there an? (\w+)(?: (\w+))?(?: in the image)?\?", question):
        color, shape = (m[1], m[2]) if m[2] else (None, m[1])
        found = any(o["shape"] == shape and color in (None, o["color"]) for o in objects)
        return "exists", "yes" if found else "no"
    raise AssertionError(f"question in no known form: {question!r}")


def test_every_answer_is_true_unambiguous_and_in_vocabulary(train_samples):
    for sample in train_samples[:600]:
        objects = sample.scene.to_dict()["objects"]
        types = [qa.type for qa in sample.vqa]
        assert len(types) == len(set(types))  # one question per type
        for qa in sample.vqa:
            assert qa.answer in ANSWER_VOCAB[qa.type], qa
            assert _true_answer(qa.question, objects) == (qa.type, qa.answer), qa
        kinds = Counter((o["size"], o["color"], o["shape"]) for o in objects)
        nameable = sum(1 for o in objects if kinds[(o["size"], o["color"], o["shape"])] == 1)
        assert ("relation" in types) == (nameable >= 2)


def test_relation_reasoning_names_the_compared_coordinates_and_its_answer_follows_from_them(train_samples):
    rows, columns = ("top", "middle", "bottom"), ("left", "center", "right")
    checked = 0
    for sample in train_samples[:300]:
        objects = sample.scene.to_dict()["objects"]
        for qa in sample.vqa:
            if qa.type != "relation":
                assert qa.reasoning == "" and qa.reply(reasoned=True) == qa.answer, qa
                continue
            m = re.fullmatch(r"(the .+?) is in the (\w+) (row|column) and (the .+?) is in the (\w+) (row|column)",
                             qa.reasoning)
            assert m and m[3] == m[6], qa.reasoning
            question = re.fullmatch(r"Is (the .+?) (to the left of|to the right of|above|below) (the .+)\?", qa.question)
            assert (question[1], question[3]) == (m[1], m[4])  # the question's objects, in its order
            assert m[3] == ("column" if question[2] in ("to the left of", "to the right of") else "row")
            names = columns if m[3] == "column" else rows
            coordinate = 1 if m[3] == "column" else 0
            a, b = (divmod(_one(ref, objects)["cell"], 3)[coordinate] for ref in (m[1], m[4]))
            assert (names[a], names[b]) == (m[2], m[5])
            # The answer is the comparison of those two coordinates alone.
            first = question[2] in ("to the left of", "above")
            assert qa.answer == ("yes" if (a < b if first else a > b) else "no")
            assert qa.reply(reasoned=True) == f"{qa.reasoning}, so {qa.answer}"
            assert final_answer(qa.reply(reasoned=True)) == final_answer(qa.reply()) == qa.answer
            # What the stated coordinates imply, whatever the reply concludes.
            for conclusion in ("yes", "no"):
                assert implied_relation_answer(qa.question, f"{qa.reasoning}, so {conclusion}") == qa.answer
            checked += 1
    assert checked >= 150


def test_make_questions_draws_different_correct_questions_of_one_type(train_samples):
    drawn = Counter()
    for sample in train_samples[:200]:
        objects = sample.scene.to_dict()["objects"]
        for kind in ("relation", "count"):
            pairs = make_questions(sample.scene, Rng(sample.seed, "extra"), kind, 3)
            assert len({qa.question for qa in pairs}) == len(pairs) <= 3
            for qa in pairs:
                assert qa.type == kind and _true_answer(qa.question, objects) == (kind, qa.answer), qa
            drawn[kind, len(pairs)] += 1
            assert make_questions(sample.scene, Rng(sample.seed, "extra"), kind, 3) == pairs  # same draws
        # A scene without two nameable objects has no relation to ask about.
        if not any(qa.type == "relation" for qa in sample.vqa):
            assert make_questions(sample.scene, Rng(sample.seed, "extra"), "relation", 3) == []
    assert drawn["relation", 3] >= 100 and drawn["count", 3] >= 150
    assert make_questions(train_samples[0].scene, Rng(0), "relation", 0) == []
    with pytest.raises(ValueError, match="question types \\['size'\\]"):
        make_questions(train_samples[0].scene, Rng(0), "size", 2)
    with pytest.raises(ValueError, match="count=-1"):
        make_questions(train_samples[0].scene, Rng(0), "relation", -1)


def test_implied_relation_answer_reads_the_coordinates_a_reply_names():
    question = "Is the red circle to the left of the blue square?"
    left_center = "the red circle is in the left column and the blue square is in the center column"
    assert implied_relation_answer(question, f"{left_center}, so no") == "yes"
    assert implied_relation_answer(question.replace("left", "right"), f"{left_center}, so no") == "no"
    assert implied_relation_answer(question, "the red circle is in the right column and the blue square is in the "
                                             "right column, so yes") == "no"  # the same column: not left of
    assert implied_relation_answer("Is the red circle below the blue square?",
                                   "the red circle is in the bottom row and the blue square is in the top row, so no"
                                   ) == "yes"
    assert implied_relation_answer(question, "yes") is None  # nothing stated
    assert implied_relation_answer(question, "the red circle is in the top row and the blue square is in the "
                                             "middle row, so yes") is None  # rows cannot answer left / right
    assert implied_relation_answer(question, "the red circle is in the top column and the blue square is in the "
                                             "left column, so yes") is None  # not a column name
    assert implied_relation_answer("What colour is the circle?", f"{left_center}, so yes") is None


def test_question_types_and_yes_no_balance(train_samples):
    counts = Counter(qa.type for s in train_samples for qa in s.vqa)
    assert set(counts) == set(QUESTION_TYPES)
    for kind in ("color", "shape", "count", "exists"):
        assert counts[kind] == len(train_samples)
    assert counts["position"] >= 0.95 * len(train_samples)
    assert counts["relation"] >= 0.6 * len(train_samples)
    for kind in ("relation", "exists"):
        answers = [qa.answer for s in train_samples for qa in s.vqa if qa.type == kind]
        assert 0.45 <= answers.count("yes") / len(answers) <= 0.55, kind
    yes_no = [qa.answer for s in train_samples for qa in s.vqa if qa.answer in ("yes", "no")]
    assert 0.47 <= yes_no.count("yes") / len(yes_no) <= 0.53
    # Answers are spread over their vocabularies, not stuck on a few values.
    for kind in ("color", "shape", "position"):
        seen = Counter(qa.answer for s in train_samples for qa in s.vqa if qa.type == kind)
        assert set(seen) == set(ANSWER_VOCAB[kind]), kind
    # Count answers: every count 0..4 occurs and none dominates (a scene holds mostly 0 or 1 of any one kind).
    counted = Counter(qa.answer for s in train_samples for qa in s.vqa if qa.type == "count")
    assert set(counted) == {"0", "1", "2", "3", "4"}
    assert max(counted.values()) <= 0.4 * sum(counted.values())


def test_captions_describe_the_scene(train_samples):
    for sample in train_samples[:300]:
        objects = sample.scene.objects
        assert len(sample.captions) >= 3
        for caption in sample.captions[:3]:  # the complete ones
            for o in objects:
                assert f"{o.size} {o.color} {o.shape}" in caption
                assert f"in the {o.position}" in caption
        for o in objects:
            assert f"{o.color} {o.shape}" in sample.captions[3]
        assert len(set(sample.captions)) == len(sample.captions)


# ------------------------------------------------------------------------------------------- prompts

def _satisfies(meta: dict, objects: list[dict]) -> bool:
    """GenEval rules on a scene description, written independently of the scorer."""
    groups = []
    for req in meta["include"]:
        found = [o for o in objects if o["shape"] == req["class"] and req.get("color", o["color"]) == o["color"]]
        if "position" in req:
            relation, target = req["position"]
            def holds(a, b):
                (ra, ca), (rb, cb) = divmod(a["cell"], 3), divmod(b["cell"], 3)
                return {"left of": ca < cb, "right of": ca > cb, "above": ra < rb, "below": ra > rb}[relation]
            found = [o for o in found if any(holds(o, t) for t in groups[target])]
        if len(found) < req["count"]:
            return False
        groups.append(found)
    return all(sum(o["shape"] == req["class"] for o in objects) < req["count"] for req in meta.get("exclude", []))


def test_prompt_scenes_satisfy_their_prompts_and_hold_nothing_else(train_samples):
    tags = Counter()
    for sample in train_samples[:500]:
        assert [p.tag for p in sample.prompts] == list(PROMPT_TAGS)
        for prompt in sample.prompts:
            check_prompt_meta(prompt.meta)
            objects = prompt.scene.to_dict()["objects"]
            assert _satisfies(prompt.meta, objects), prompt.meta
            assert len(objects) == sum(req["count"] for req in prompt.meta["include"])
            assert prompt.text.startswith("a photo of ")
            tags[prompt.tag] += 1
            if prompt.tag == "counting":
                n = prompt.meta["include"][0]["count"]
                assert 2 <= n <= 4 and prompt.meta["exclude"] == [{"class": prompt.meta["include"][0]["class"],
                                                                    "count": n + 1}]
            if prompt.tag == "position":
                assert prompt.meta["include"][1]["position"][1] == 0
    assert set(tags) == set(PROMPT_TAGS)
    prompts = ShapesPrompts("test", num_samples=12)
    assert [prompts[i].prompt.tag for i in range(12)] == list(PROMPT_TAGS) * 2
    # ShapesPrompts item i is the prompt of that tag in ShapesWorld sample i.
    assert prompts[8].prompt.meta == ShapesWorld("test", num_samples=12)[8].prompts[8 % 6].meta


def test_prompt_metadata_validation():
    good = {"prompt": "a photo of a star", "tag": "single_object", "include": [{"class": "star", "count": 1}]}
    check_prompt_meta(good)
    for bad, message in [({**good, "tag": "art"}, "tag"),
                         ({**good, "include": [{"class": "cat", "count": 1}]}, "class"),
                         ({**good, "include": [{"class": "star", "count": 1, "color": "brown"}]}, "color"),
                         ({**good, "include": [{"class": "star", "count": 1, "position": ["near", 0]}]}, "relation"),
                         ({**good, "include": [{"class": "star", "count": 1, "position": ["above", 0]}]}, "earlier"),
                         ({"tag": "colors", "include": []}, "prompt")]:
        with pytest.raises(ValueError, match=message):
            check_prompt_meta(bad)


# ------------------------------------------------------------------------------------------- held-out pairs

def _named_pairs(text: str) -> set[tuple[str, str]]:
    words = re.findall(r"[a-z]+", text.lower())
    return {(a, b) for a, b in zip(words, words[1:]) if a in COLORS and b in SHAPES}


def _all_text(sample) -> str:
    parts = sample.captions + [qa.question + " " + qa.answer for qa in sample.vqa] + [p.text for p in sample.prompts]
    return " | ".join(parts)


def test_held_out_pairs_never_in_train(train_samples):
    held = set(HELD_OUT_PAIRS)
    for sample in train_samples:
        assert not {o.pair for o in sample.scene.objects} & held
        assert not _named_pairs(_all_text(sample)) & held
        for prompt in sample.prompts:
            assert not {o.pair for o in prompt.scene.objects} & held
            assert not {(r["color"], r["class"]) for r in prompt.meta["include"] if "color" in r} & held
        for qa in sample.vqa:  # "what shape is the purple object?" → "star" would leak a pair too
            if qa.type == "shape" and (m := re.search(r"the (?:\w+ )?(\w+) object", qa.question)):
                assert (m[1], qa.answer) not in held


def test_held_out_modes_in_test_prompts():
    def colour_pairs(held_out):
        prompts = ShapesPrompts("test", num_samples=600, held_out=held_out, tags=("colors", "color_attr"))
        return [{(r["color"], r["class"]) for r in prompts.prompt(i).meta["include"]} for i in range(len(prompts))]

    held = set(HELD_OUT_PAIRS)
    included = colour_pairs("include")
    assert 0.05 < sum(bool(p & held) for p in included) / len(included) < 0.4  # natural rate, about 5/48 per pair
    assert all(not p & held for p in colour_pairs("exclude"))
    assert all(p & held for p in colour_pairs("only"))
    only = ShapesPrompts("test", num_samples=60, held_out="only")
    assert all({o.pair for o in only.prompt(i).scene.objects} & held for i in range(60))
    world = ShapesWorld("test", num_samples=60, held_out="only")
    assert all({o.pair for o in world[i].scene.objects} & held for i in range(60))
    assert ShapesWorld("test", num_samples=1).held_out == "include"
    assert ShapesWorld("train", num_samples=1).held_out == "exclude"
