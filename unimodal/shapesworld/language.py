"""The words of ShapesWorld: captions, question–answer pairs and GenEval-style drawing prompts.

Answers are short lowercase strings from a fixed vocabulary per question type, so exact match is a fair grade.
Relation questions also carry a reasoning (the column, or the row, of both objects): a reasoned reply gives it before
the answer, and `final_answer` reads the answer back from either kind of reply. Questions only refer to objects by
descriptions that pick out exactly one object in the scene.

Prompts follow GenEval (Ghosh et al., 2023): one metadata dict per prompt with `prompt`, `tag` and `include`
(plus `exclude` for counting, so "two stars" means exactly two). Each prompt comes with a target scene that
satisfies it and holds nothing else; unspecified attributes (colour, size, cell, background) are random.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .world import (
    CELL_NAMES, COLOR_NAMES, COLUMN_NAMES, GRID, MAX_OBJECTS, RELATIONS, ROW_NAMES, SHAPE_PLURALS, SHAPES, SIZES, Rng,
    Scene, SceneObject, allowed_pairs, cell_row_col, check_held_out_mode, first_pairs, relation_holds,
    sample_background,
)

QUESTION_TYPES: tuple[str, ...] = ("color", "shape", "count", "position", "relation", "exists")


def check_question_types(types: Sequence[str]) -> tuple[str, ...]:
    """`types` as a tuple if it names at least one type and only `QUESTION_TYPES`; otherwise a ValueError naming it."""
    types = tuple(types)
    if not types or any(t not in QUESTION_TYPES for t in types):
        raise ValueError(f"question types {list(types)}; allowed: {', '.join(QUESTION_TYPES)}")
    return types

YES_NO: tuple[str, ...] = ("yes", "no")
ANSWER_VOCAB: dict[str, tuple[str, ...]] = {
    "color": COLOR_NAMES,
    "shape": SHAPES,
    "count": tuple(str(n) for n in range(GRID * GRID + 1)),
    "position": CELL_NAMES,
    "relation": YES_NO,
    "exists": YES_NO,
}
PROMPT_TAGS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")

_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_RELATION_PHRASES = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}


# A reasoned reply states the facts its answer rests on, then the answer after this separator (`final_answer`).
REASONING_SEPARATOR = ", so "
REASONED_TYPES: tuple[str, ...] = ("relation",)  # the question types whose pairs carry a reasoning


@dataclass(frozen=True)
class QAPair:
    question: str
    answer: str
    type: str  # one of QUESTION_TYPES
    reasoning: str = ""  # relation: the coordinate it compares ("the red circle is in the left column and ...")

    def reply(self, reasoned: bool = False) -> str:
        """The answer alone, or with `reasoned` (and a reasoning to give) the reasoning, then the answer."""
        return f"{self.reasoning}{REASONING_SEPARATOR}{self.answer}" if reasoned and self.reasoning else self.answer


def final_answer(reply: str) -> str:
    """What `reply` concludes: the words after its last `REASONING_SEPARATOR`, or the whole of a short reply."""
    return reply.rpartition(REASONING_SEPARATOR)[2]


_REASONED_COORDINATES = re.compile(r" is in the (\w+) (column|row) and .+ is in the (\w+) (column|row)$")


def reasoning_of(reply: str) -> str:
    """What `reply` states before its conclusion (the words before its last `REASONING_SEPARATOR`; "" if none)."""
    reasoning, separator, _ = reply.rpartition(REASONING_SEPARATOR)
    return reasoning if separator else ""


def implied_relation_answer(question: str, reply: str) -> str | None:
    """The answer ("yes" / "no") that the two coordinates a reasoned relation reply names imply for `question`,
    whatever the reply concludes: "Is the red circle to the left of the blue square?" with "the red circle is in the
    left column and the blue square is in the center column, so no" implies "yes". None when the question is not a
    relation question or the reply does not name two coordinates of the kind its relation compares (columns for
    left / right, rows for above / below)."""
    relation = next((r for r, phrase in _RELATION_PHRASES.items() if f" {phrase} " in question), None)
    found = _REASONED_COORDINATES.search(reasoning_of(reply).strip())
    if relation is None or found is None:
        return None
    word_a, kind_a, word_b, kind_b = found.groups()
    kind = "column" if relation in ("left of", "right of") else "row"
    names = COLUMN_NAMES if kind == "column" else ROW_NAMES
    if kind_a != kind or kind_b != kind or word_a not in names or word_b not in names:
        return None
    a, b = names.index(word_a), names.index(word_b)
    return "yes" if {"left of": a < b, "right of": a > b, "above": a < b, "below": a > b}[relation] else "no"


def check_reasoned_types(types: Sequence[str]) -> tuple[str, ...]:
    """`types` as a tuple if each is one of `REASONED_TYPES`; otherwise a ValueError naming it."""
    types = tuple(types)
    if any(t not in REASONED_TYPES for t in types):
        raise ValueError(f"reasoned answer types {list(types)}; allowed: {', '.join(REASONED_TYPES)} "
                         f"(the types whose questions come with a reasoning)")
    return types


@dataclass
class Prompt:
    """A drawing prompt: its GenEval metadata and a scene that satisfies it."""

    meta: dict
    scene: Scene = field(repr=False)

    @property
    def text(self) -> str:
        return self.meta["prompt"]

    @property
    def tag(self) -> str:
        return self.meta["tag"]


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


# ---------------------------------------------------------------------------------------------------- captions

def _full(o: SceneObject) -> str:
    return f"{_a(f'{o.size} {o.color} {o.shape}')} in the {o.position}"


def _background_phrase(scene: Scene) -> str:
    if scene.layout == "plain":
        return f"on {_a(scene.background[0])} background"
    first, second = scene.background
    if scene.layout == "horizontal":
        return f"on a background that is {first} at the top and {second} at the bottom"
    return f"on a background that is {first} on the left and {second} on the right"


def make_captions(scene: Scene, rng: Rng) -> list[str]:
    """Four captions: three complete descriptions (every object's size, colour, shape and cell) in different
    templates and orders, then a short one naming only colours and shapes."""
    objects = list(scene.objects)
    n = len(objects)
    counted = "a single object" if n == 1 else f"{_NUMBER_WORDS[n]} objects"
    return [
        _join([_full(o) for o in objects]),
        f"{counted} {_background_phrase(scene)}: " + _join([_full(o) for o in rng.shuffled(objects)]),
        _join([f"in the {o.position} there is {_a(f'{o.size} {o.color} {o.shape}')}" for o in rng.shuffled(objects)]),
        _join([_a(f"{o.color} {o.shape}") for o in rng.shuffled(objects)]),
    ]


def describe_scene(scene: Scene) -> str:
    """Every object cell by cell in reading order (the dense description the VQA probe's describe loss asks of each
    slot, in words): "top left: small red circle; center: large blue square"."""
    return "; ".join(f"{o.position}: {o.size} {o.color} {o.shape}" for o in scene.objects)


# ---------------------------------------------------------------------------------------------------- questions

def _unique_refs(scene: Scene, target: SceneObject, levels: Sequence[tuple[str, ...]], noun: str | None = None
                 ) -> list[str]:
    """Every description built from `levels` (attribute names; `noun` replaces the shape word) that matches
    `target` and no other object."""
    refs = []
    for attributes in levels:
        matches = [o for o in scene.objects if all(getattr(o, a) == getattr(target, a) for a in attributes)]
        if matches == [target]:
            words = [getattr(target, a) for a in attributes if a != "shape"]
            refs.append("the " + " ".join(words + [noun or target.shape]))
    return refs


_NAMING_LEVELS = (("shape",), ("color", "shape"), ("size", "color", "shape"))
# Question wordings shared by the VQA data and the checks of a drawing (`prompt_checks`), so both ask alike.
_COLOR_TEMPLATES = ("What color is {}?", "What is the color of {}?")


def _how_many(plural: str) -> str:
    return f"How many {plural} are there?"


def _is_there(phrase: str) -> str:
    return f"Is there {_a(phrase)}?"


def _where_is(ref: str) -> str:
    return f"Where is {ref}?"


def _is_related(ref_a: str, relation: str, ref_b: str) -> str:
    return f"Is {ref_a} {_RELATION_PHRASES[relation]} {ref_b}?"


def _color_question(scene: Scene, rng: Rng, held_out: str) -> QAPair:
    target = rng.choice(scene.objects)
    refs = _unique_refs(scene, target, (("shape",), ("size", "shape")))
    ref = refs[0] if refs else f"the object in the {target.position}"
    template = rng.choice(_COLOR_TEMPLATES)
    return QAPair(template.format(ref), target.color, "color")


def _shape_question(scene: Scene, rng: Rng, held_out: str) -> QAPair:
    target = rng.choice(scene.objects)
    refs = _unique_refs(scene, target, (("color",), ("size", "color")), noun="object")
    ref = refs[0] if refs else f"the object in the {target.position}"
    template = rng.choice(("What shape is {}?", "Which shape is {}?"))
    return QAPair(template.format(ref), target.shape, "shape")


def _count_question(scene: Scene, rng: Rng, held_out: str) -> QAPair:
    candidates = [(_how_many("objects"), len(scene.objects))]
    candidates += [(_how_many(SHAPE_PLURALS[s]), scene.count(shape=s)) for s in SHAPES]
    candidates += [(_how_many(f"{c} objects"), scene.count(color=c)) for c in COLOR_NAMES]
    # Draw the answer first, uniformly over those this scene allows, so small counts do not swamp the rest.
    answer = rng.choice(sorted({n for _, n in candidates}))
    question = rng.choice([q for q, n in candidates if n == answer])
    return QAPair(question, str(answer), "count")


def _position_question(scene: Scene, rng: Rng, held_out: str) -> QAPair | None:
    named = [(o, refs) for o in scene.objects if (refs := _unique_refs(scene, o, _NAMING_LEVELS))]
    if not named:
        return None
    target, refs = rng.choice(named)
    return QAPair(_where_is(rng.choice(refs)), target.position, "position")


def _relation_question(scene: Scene, rng: Rng, held_out: str) -> QAPair | None:
    named = [(o, refs) for o in scene.objects if (refs := _unique_refs(scene, o, _NAMING_LEVELS))]
    triples = [(a, b, rel) for a in named for b in named if a[0] is not b[0] for rel in RELATIONS]
    if not triples:
        return None
    # Draw the answer first so yes and no are equally likely over the dataset.
    want = rng.coin()
    pool = [t for t in triples if relation_holds(t[0][0].cell, t[1][0].cell, t[2]) == want]
    (a, refs_a), (b, refs_b), rel = rng.choice(pool or triples)
    answer = "yes" if relation_holds(a.cell, b.cell, rel) else "no"
    ref_a, ref_b = rng.choice(refs_a), rng.choice(refs_b)
    # The answer follows from one coordinate of each object: a reasoned reply names those first, the columns for
    # left/right and the rows for above/below, so it ends on a comparison of two words of an ordered set of three.
    (row_a, col_a), (row_b, col_b) = cell_row_col(a.cell), cell_row_col(b.cell)
    if rel in ("left of", "right of"):
        where_a, where_b = f"{COLUMN_NAMES[col_a]} column", f"{COLUMN_NAMES[col_b]} column"
    else:
        where_a, where_b = f"{ROW_NAMES[row_a]} row", f"{ROW_NAMES[row_b]} row"
    reasoning = f"{ref_a} is in the {where_a} and {ref_b} is in the {where_b}"
    return QAPair(_is_related(ref_a, rel, ref_b), answer, "relation", reasoning)


def _exists_question(scene: Scene, rng: Rng, held_out: str) -> QAPair:
    want = rng.coin()
    by_shape = rng.coin(0.3)
    if by_shape:
        present = sorted({o.shape for o in scene.objects}, key=SHAPES.index)
        absent = [s for s in SHAPES if s not in present]
        if want or not absent:
            want, shape = True, rng.choice(present)
        else:
            shape = rng.choice(absent)
        return QAPair(f"Is there {_a(shape)} in the image?", "yes" if want else "no", "exists")
    present_pairs = {o.pair for o in scene.objects}
    if want:
        color, shape = rng.choice(scene.objects).pair
    else:
        color, shape = rng.choice([p for p in allowed_pairs(held_out) if p not in present_pairs])
    return QAPair(_is_there(f"{color} {shape}"), "yes" if want else "no", "exists")


_QUESTION_MAKERS: dict[str, Callable[[Scene, Rng, str], QAPair | None]] = {
    "color": _color_question,
    "shape": _shape_question,
    "count": _count_question,
    "position": _position_question,
    "relation": _relation_question,
    "exists": _exists_question,
}


def make_vqa(scene: Scene, rng: Rng, held_out: str = "exclude") -> list[QAPair]:
    """One question of each type the scene allows (relation needs two nameable objects), in random order.
    Questions that name a colour–shape pair absent from the scene only use pairs allowed under `held_out`."""
    check_held_out_mode(held_out)
    pairs = [make(scene, rng, held_out) for make in _QUESTION_MAKERS.values()]
    return rng.shuffled([p for p in pairs if p is not None])


def make_questions(scene: Scene, rng: Rng, question_type: str, count: int, held_out: str = "exclude",
                   attempts_per_question: int = 4) -> list[QAPair]:
    """Up to `count` different questions of `question_type` about `scene` (fewer when the scene allows fewer, or
    when `attempts_per_question` draws per question keep repeating ones already drawn); none when it allows none."""
    check_held_out_mode(held_out)
    check_question_types([question_type])
    if count < 0:
        raise ValueError(f"count={count!r} must be >= 0")
    make, questions = _QUESTION_MAKERS[question_type], {}
    for _ in range(count * attempts_per_question):
        if len(questions) == count:
            break
        pair = make(scene, rng, held_out)
        if pair is None:
            break
        questions.setdefault(pair.question, pair)
    return list(questions.values())


# ---------------------------------------------------------------------------------------------------- prompts

def _place(rng: Rng, kinds: Sequence[tuple[str, str]], cells: Sequence[int] | None = None) -> Scene:
    """A scene holding exactly objects of `kinds` ((colour, shape) pairs) at `cells` (random if not given)."""
    cells = list(cells) if cells is not None else rng.sample(range(GRID * GRID), len(kinds))
    objects = [SceneObject(shape, color, rng.choice(SIZES), cell) for (color, shape), cell in zip(kinds, cells)]
    background, layout = sample_background(rng)
    return Scene.of(objects, background, layout)


def _two_kinds(rng: Rng, held_out: str, distinct_colors: bool) -> list[tuple[str, str]]:
    """Two (colour, shape) pairs with different shapes (and colours if asked), in random mention order."""
    first = rng.choice(first_pairs(held_out))
    second = rng.choice([p for p in allowed_pairs(held_out)
                         if p[1] != first[1] and not (distinct_colors and p[0] == first[0])])
    return rng.shuffled([first, second])


def _single_object(rng: Rng, held_out: str) -> Prompt:
    color, shape = rng.choice(first_pairs(held_out))
    meta = {"prompt": f"a photo of {_a(shape)}", "include": [{"class": shape, "count": 1}]}
    return Prompt(meta, _place(rng, [(color, shape)]))


def _two_object(rng: Rng, held_out: str) -> Prompt:
    kinds = _two_kinds(rng, held_out, distinct_colors=False)
    (_, s1), (_, s2) = kinds
    meta = {"prompt": f"a photo of {_a(s1)} and {_a(s2)}",
            "include": [{"class": s1, "count": 1}, {"class": s2, "count": 1}]}
    return Prompt(meta, _place(rng, kinds))


def _counting(rng: Rng, held_out: str) -> Prompt:
    n = 2 + rng.below(MAX_OBJECTS - 1)
    color, shape = rng.choice(first_pairs(held_out))
    kinds = [(color, shape)] + [rng.choice([p for p in allowed_pairs(held_out) if p[1] == shape])
                                for _ in range(n - 1)]
    meta = {"prompt": f"a photo of {_NUMBER_WORDS[n]} {SHAPE_PLURALS[shape]}",
            "include": [{"class": shape, "count": n}], "exclude": [{"class": shape, "count": n + 1}]}
    return Prompt(meta, _place(rng, kinds))


def _colors(rng: Rng, held_out: str) -> Prompt:
    color, shape = rng.choice(first_pairs(held_out))
    meta = {"prompt": f"a photo of {_a(f'{color} {shape}')}",
            "include": [{"class": shape, "count": 1, "color": color}]}
    return Prompt(meta, _place(rng, [(color, shape)]))


def _position(rng: Rng, held_out: str) -> Prompt:
    # GenEval order: the reference object first, then the one placed relative to it (index 0).
    subject, reference = _two_kinds(rng, held_out, distinct_colors=False)
    relation = rng.choice(RELATIONS)
    cell_pairs = [(a, b) for a in range(GRID * GRID) for b in range(GRID * GRID)
                  if a != b and relation_holds(a, b, relation)]
    subject_cell, reference_cell = rng.choice(cell_pairs)
    meta = {"prompt": f"a photo of {_a(subject[1])} {relation} {_a(reference[1])}",
            "include": [{"class": reference[1], "count": 1},
                        {"class": subject[1], "count": 1, "position": [relation, 0]}]}
    return Prompt(meta, _place(rng, [reference, subject], [reference_cell, subject_cell]))


def _color_attr(rng: Rng, held_out: str) -> Prompt:
    kinds = _two_kinds(rng, held_out, distinct_colors=True)
    (c1, s1), (c2, s2) = kinds
    meta = {"prompt": f"a photo of {_a(f'{c1} {s1}')} and {_a(f'{c2} {s2}')}",
            "include": [{"class": s1, "count": 1, "color": c1}, {"class": s2, "count": 1, "color": c2}]}
    return Prompt(meta, _place(rng, kinds))


_PROMPT_MAKERS: dict[str, Callable[[Rng, str], Prompt]] = {
    "single_object": _single_object,
    "two_object": _two_object,
    "counting": _counting,
    "colors": _colors,
    "position": _position,
    "color_attr": _color_attr,
}


def make_prompt(tag: str, rng: Rng, held_out: str = "exclude") -> Prompt:
    """A random prompt of GenEval category `tag` with its target scene.

    Under held_out="only" the target scene holds a held-out pair, and colour prompts name it."""
    if tag not in _PROMPT_MAKERS:
        raise ValueError(f"unknown prompt tag {tag!r}; allowed: {', '.join(PROMPT_TAGS)}")
    check_held_out_mode(held_out)
    prompt = _PROMPT_MAKERS[tag](rng, held_out)
    prompt.meta = {"tag": tag, **prompt.meta}
    return prompt


def check_prompt_meta(meta: dict) -> None:
    """Raise ValueError naming the first thing in `meta` that is not valid GenEval metadata for this world."""
    for key in ("prompt", "tag", "include"):
        if key not in meta:
            raise ValueError(f"prompt metadata lacks {key!r}: {meta}")
    if meta["tag"] not in PROMPT_TAGS:
        raise ValueError(f"unknown prompt tag {meta['tag']!r}; allowed: {', '.join(PROMPT_TAGS)}")
    if not meta["include"]:
        raise ValueError(f"prompt metadata has an empty include list: {meta}")
    for k, req in enumerate(list(meta["include"]) + list(meta.get("exclude", []))):
        if req.get("class") not in SHAPES:
            raise ValueError(f"unknown class {req.get('class')!r} in {req}; allowed: {', '.join(SHAPES)}")
        if not isinstance(req.get("count"), int) or req["count"] < 1:
            raise ValueError(f"count must be a positive int, got {req.get('count')!r} in {req}")
        if "color" in req and req["color"] not in COLOR_NAMES:
            raise ValueError(f"unknown color {req['color']!r} in {req}; allowed: {', '.join(COLOR_NAMES)}")
        if "position" in req:
            relation, target = req["position"]
            if relation not in RELATIONS:
                raise ValueError(f"unknown relation {relation!r} in {req}; allowed: {', '.join(RELATIONS)}")
            if not isinstance(target, int) or not 0 <= target < min(k, len(meta["include"])):
                raise ValueError(f"position target {target!r} in {req} must index an earlier include entry")


# ---------------------------------------------------------------------------------------------------- checks

_WORD_COUNTS = {"a": 1, "an": 1, **{word: n for n, word in enumerate(_NUMBER_WORDS) if n}}
_SHAPE_WORDS = {**{s: s for s in SHAPES}, **{plural: s for s, plural in SHAPE_PLURALS.items()}}
_NOUN_PHRASE = re.compile(
    rf"(?:(?P<count>{'|'.join(_WORD_COUNTS)}) )?(?:(?P<size>{'|'.join(SIZES)}) )?"
    rf"(?:(?P<color>{'|'.join(COLOR_NAMES)}) )?(?P<shape>{'|'.join(sorted(_SHAPE_WORDS, key=len, reverse=True))})"
    rf"(?: in the (?P<cell>{'|'.join(CELL_NAMES)}))?")
# Longest first, so "to the left of" is not read as "left of" with "to the" left over.
_RELATION_WORDS = sorted({**{r: r for r in RELATIONS}, **{p: r for r, p in _RELATION_PHRASES.items()}}.items(),
                         key=lambda item: -len(item[0]))
_REQUEST = re.compile(r"^(?:(?:please|can you|could you|would you) )*"
                      r"(?:(?:draw|paint|show|generate)(?: me)?|(?:make|create) (?:a|an) (?:picture|image) of)?\s*"
                      r"(?:(?:a|an) (?:photo|picture|image|drawing) of )?")
_POLITE_END = re.compile(r"(?: ,)? (?:please|thanks|thank you)$")


@dataclass(frozen=True)
class _Mention:
    shape: str
    count: int
    color: str | None
    cell: str | None


def _mention(phrase: str) -> _Mention | None:
    match = _NOUN_PHRASE.fullmatch(phrase)
    if match is None:
        return None
    count = _WORD_COUNTS[match["count"]] if match["count"] else 1
    return _Mention(_SHAPE_WORDS[match["shape"]], count, match["color"], match["cell"])


def _read_prompt(text: str) -> tuple[list[_Mention], str | None] | None:
    """The objects a drawing prompt in ShapesWorld's words asks for, and the relation of the first to the second if
    it states one; None when the text is not such a prompt."""
    text = " ".join(text.lower().replace(",", " , ").split()).rstrip(" .?!")
    text = _POLITE_END.sub("", _REQUEST.sub("", text, count=1))
    text = text.rpartition(": ")[2]  # "two objects on a gray background: a ..."
    for words, relation in _RELATION_WORDS:
        subject, found, reference = text.partition(f" {words} ")
        if found:
            mentions = [_mention(subject), _mention(reference)]
            return (mentions, relation) if None not in mentions else None
    phrases = [p.removeprefix("and ") for part in text.split(" , ") for p in part.split(" and ")]
    mentions = [_mention(p.strip()) for p in phrases]
    return (mentions, None) if mentions and None not in mentions else None


def prompt_checks(text: str) -> list[QAPair]:
    """Questions, in the words the VQA data uses, that a drawing of `text` must answer as given: how many of each
    named shape and how many objects in all (prompts ask for scenes holding nothing else), the colour and the cell of
    each shape named once, and the stated relation. `text` is a ShapesWorld drawing prompt ("a photo of two stars",
    "a red circle above a blue square") or a caption that names objects first ("a small red circle in the top left
    and ..."), bare or as a request ("Draw ...", "Can you please draw ...?", "Make a picture of ..., please"); any
    other text gives no checks ([])."""
    read = _read_prompt(text)
    if read is None:
        return []
    mentions, relation = read
    totals: dict[str, int] = {}
    for m in mentions:
        totals[m.shape] = totals.get(m.shape, 0) + m.count
    checks = [QAPair(_how_many("objects"), str(sum(totals.values())), "count")]
    checks += [QAPair(_how_many(SHAPE_PLURALS[s]), str(n), "count") for s, n in totals.items()]
    for m in mentions:
        if m.color is not None:
            checks.append(QAPair(_is_there(f"{m.color} {m.shape}"), "yes", "exists"))
        if totals[m.shape] == 1 and m.color is not None:
            checks.append(QAPair(_COLOR_TEMPLATES[0].format(f"the {m.shape}"), m.color, "color"))
        if totals[m.shape] == 1 and m.cell is not None:
            checks.append(QAPair(_where_is(f"the {m.shape}"), m.cell, "position"))
    if relation is not None:
        subject, reference = mentions  # a relation joins exactly two objects
        if totals[subject.shape] == 1 and totals[reference.shape] == 1 and subject.shape != reference.shape:
            checks.append(QAPair(_is_related(f"the {subject.shape}", relation, f"the {reference.shape}"), "yes",
                                 "relation"))
    return checks
