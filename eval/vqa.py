"""Understanding benchmark: answer questions about images and score them by each benchmark's own rule.

    python -m eval.vqa --model DIR                                   # ShapesWorld VQA, test split (the default set)
    python -m eval.vqa --model DIR --questions gqa.jsonl --image-folder images/ --rule exact
    python -m eval.vqa --model DIR --questions mme.jsonl --image-folder MME/ --rule mme
    python -m eval.vqa --model DIR --questions pope.jsonl --image-folder coco/val2014 --rule pope
    python -m eval.vqa --model DIR --questions mmbench.jsonl --image-folder mmbench/ --rule mc

Question file: one JSON object per line::

    {"question_id": "q1",              # optional (default: line number)
     "image": "000001.png",            # path, relative to --image-folder (default: the question file's folder)
     "question": "What color is it?",  # or "text" (LLaVA question files)
     "answer": "red",                  # or "answers": [...] (VQAv2: the ten human answers)
     "type": "color",                  # or "category"; results are reported per type (default "all")
     "options": {"A": "...", ...},     # multiple choice only: a dict of letters or a list (lettered A, B, ...)
     "image_id": "..."}                # MME: the image the yes/no pair belongs to (default: the image path)

Prompt: the processor's chat template with one user turn ``<image>\\n{question}{suffix}`` (the LLaVA layout the
model is trained on), multiple choice questions followed by their lettered options and LLaVA's MMBench instruction.
Decoding is greedy, so the same checkpoint and question file always give the same numbers.

Rules (pure functions below, each tested against hand-worked examples):
- ``exact``: normalised prediction equals any normalised answer (VQA normalisation, which also covers GQA's
  lower-case / punctuation rule: punctuation, articles, number words → digits, common contractions).
- ``final``: ``exact`` on the reply's final answer, the words after its last ", so " (a short reply whole): ShapesWorld
  VQA's rule, which grades a reasoned relation reply ("the red circle is in the left column and ..., so yes") on "yes".
- ``vqa``: VQAv2 soft accuracy: mean over the ten leave-one-out subsets of min(1, matches / 3).
- ``mme``: yes/no parsed from the reply's start; accuracy over questions and accuracy+ over images (both questions
  of an image right); score = 100·(acc + acc+) per category, summed over categories as MME reports it.
- ``pope``: yes/no parsed LLaVA's way (a "no"/"not" word in the first sentence means no); accuracy, precision, recall,
  F1 (positive = yes) and the yes-ratio.
- ``mc``: option letter parsed from the reply ("B", "(B)", "B. ...", "The answer is B", or the text of exactly one
  option); accuracy. MMBench's circular evaluation (rotating options) is not done here.

Writes ``vqa_results.json`` (summary, settings), ``vqa_predictions.jsonl`` (every question, reply, parse and
verdict) and ``vqa_report.md`` into ``--output-dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm import tqdm

from llm import TokenFlowMLLM  # importing llm registers its Auto classes
from unimodal.cli import run_main
from unimodal.images import ImageLoadError, load_image
from unimodal.shapesworld import ShapesWorld
from unimodal.shapesworld.language import (check_question_types, final_answer, implied_relation_answer,
                                           reasoning_of)

RULES = ("exact", "final", "vqa", "mme", "pope", "mc")
SHAPESWORLD_RULE = "final"
SHAPESWORLD_MAX_NEW_TOKENS = 32  # a reasoned relation reply takes up to 26 tokens of the ShapesWorld vocabulary
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
OPTION_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

# ---------------------------------------------------------------------------------------------------- normalisation
# From the official VQA evaluation script (abridged: the contractions that occur in short answers).
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldnt": "couldn't", "didnt": "didn't",
    "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't", "havent": "haven't",
    "hes": "he's", "im": "i'm", "isnt": "isn't", "itd": "it'd", "itll": "it'll", "ive": "i've", "lets": "let's",
    "shes": "she's", "shouldnt": "shouldn't", "thats": "that's", "theres": "there's", "theyre": "they're",
    "theyve": "they've", "wasnt": "wasn't", "werent": "weren't", "whats": "what's", "wheres": "where's",
    "whos": "who's", "wont": "won't", "wouldnt": "wouldn't", "youd": "you'd", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                "?", "!", "*", "#", "%", "^", "&", "$", "|", "~", ":"]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def normalize_answer(text: str) -> str:
    """VQA answer normalisation: lower case, punctuation, periods not inside numbers, number words → digits,
    articles dropped, contractions restored. ``"Two."`` → ``"2"``, ``"The Red one"`` → ``"red 1"``."""
    text = text.replace("\n", " ").replace("\t", " ").strip().lower()
    for p in _PUNCTUATION:
        # As the official script: a mark next to a space (or a digit comma) disappears, one inside a word splits it.
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            text = text.replace(p, "")
        else:
            text = text.replace(p, " ")
    text = _PERIOD_STRIP.sub("", text)
    words = []
    for word in text.split():
        word = _NUMBER_WORDS.get(word, word)
        if word in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised answer, else 0.0."""
    predicted = normalize_answer(prediction)
    return float(any(predicted == normalize_answer(a) for a in answers))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQAv2 soft accuracy: mean over leave-one-out subsets of the answers of min(1, matches in the subset / 3).

    With the usual ten answers, 3 or more matches score 1, 2 score 0.6, 1 scores 0.3."""
    if not answers:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    predicted = normalize_answer(prediction)
    matches = [normalize_answer(a) == predicted for a in answers]
    if len(answers) == 1:
        return float(matches[0])
    total = sum(matches)
    return sum(min(1.0, (total - m) / 3.0) for m in matches) / len(answers)


def parse_yes_no_mme(reply: str) -> str:
    """MME's parse: "yes"/"no" when the reply is exactly that (periods dropped) or its first 4 characters hold it,
    else "other" (always wrong)."""
    text = reply.lower().strip().replace(".", "")
    if text in ("yes", "no"):
        return text
    prefix = text[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


def parse_yes_no_pope(reply: str) -> str:
    """LLaVA's POPE parse: "no" if the first sentence holds the word no / not (commas dropped), else "yes"."""
    words = reply.strip().split(".")[0].replace(",", "").split()
    return "no" if any(w in ("No", "no", "not", "NO", "Not") for w in words) else "yes"


def option_letters(options: dict[str, str] | Sequence[str]) -> dict[str, str]:
    """Options as a dict letter → text; a list is lettered A, B, C, ... in order."""
    if isinstance(options, dict):
        bad = [k for k in options if k not in OPTION_LETTERS]
        if bad:
            raise ValueError(f"option keys must be capital letters A-Z, got {bad}")
        return {str(k): str(v) for k, v in options.items()}
    if len(options) > len(OPTION_LETTERS):
        raise ValueError(f"at most {len(OPTION_LETTERS)} options, got {len(options)}")
    return {OPTION_LETTERS[i]: str(v) for i, v in enumerate(options)}


def parse_option_letter(reply: str, options: dict[str, str]) -> str | None:
    """The option a reply picks, or None.

    In order: a leading letter ("B", "(B)", "B.", "B) ...", "B: ..."); "answer/option is B"; exactly one distinct
    standalone option letter anywhere; the text of exactly one option inside the reply (normalised)."""
    text = reply.strip()
    lead = re.match(r"^\(?([A-Z])\)?(?=$|[.:)\s,])", text)
    if lead and lead.group(1) in options:
        return lead.group(1)
    said = re.search(r"\b(?:answer|option|choice)\s*(?:is|:)?\s*:?\s*\(?([A-Z])\)?(?![A-Za-z])", text, re.IGNORECASE)
    if said and said.group(1).upper() in options and said.group(1).isupper():
        return said.group(1)
    standalone = {m for m in re.findall(r"(?<![A-Za-z])([A-Z])(?![A-Za-z])", text) if m in options}
    if len(standalone) == 1:
        return standalone.pop()
    normalised = f" {normalize_answer(text)} "
    hits = [letter for letter, option in options.items()
            if normalize_answer(option) and f" {normalize_answer(option)} " in normalised]
    return hits[0] if len(hits) == 1 else None


# ---------------------------------------------------------------------------------------------------- metrics
def accuracy(correct: Sequence[float]) -> float:
    if not correct:
        raise ValueError("accuracy of an empty list")
    return sum(correct) / len(correct)


def mme_metrics(predictions: Sequence[str], answers: Sequence[str], image_ids: Sequence[str]) -> dict[str, float]:
    """MME: acc over questions, acc+ over images (every question of the image right), score = 100·(acc + acc+)."""
    if not (len(predictions) == len(answers) == len(image_ids)) or not predictions:
        raise ValueError(f"need equally many predictions, answers and image ids (>0), got {len(predictions)}, "
                         f"{len(answers)}, {len(image_ids)}")
    right = [parse_yes_no_mme(p) == a.strip().lower() for p, a in zip(predictions, answers)]
    per_image: dict[str, list[bool]] = defaultdict(list)
    for image_id, ok in zip(image_ids, right):
        per_image[image_id].append(ok)
    acc = sum(right) / len(right)
    acc_plus = sum(all(v) for v in per_image.values()) / len(per_image)
    return {"acc": acc, "acc_plus": acc_plus, "score": 100.0 * (acc + acc_plus), "n": len(right),
            "images": len(per_image)}


def pope_metrics(predictions: Sequence[str], answers: Sequence[str]) -> dict[str, float]:
    """POPE: accuracy, precision, recall, F1 (positive class "yes") and the fraction of "yes" replies.

    Precision (recall) is 0 when nothing is predicted (labelled) yes; F1 is 0 when both are 0."""
    if len(predictions) != len(answers) or not predictions:
        raise ValueError(f"need equally many predictions and answers (>0), got {len(predictions)}, {len(answers)}")
    truth = [a.strip().lower() for a in answers]
    bad = sorted({t for t in truth if t not in ("yes", "no")})
    if bad:
        raise ValueError(f"POPE answers must be 'yes' or 'no', got {bad}")
    said = [parse_yes_no_pope(p) for p in predictions]
    tp = sum(s == "yes" and t == "yes" for s, t in zip(said, truth))
    fp = sum(s == "yes" and t == "no" for s, t in zip(said, truth))
    tn = sum(s == "no" and t == "no" for s, t in zip(said, truth))
    fn = sum(s == "no" and t == "yes" for s, t in zip(said, truth))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    n = len(said)
    return {"accuracy": (tp + tn) / n, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": (tp + fp) / n, "n": n}


# ---------------------------------------------------------------------------------------------------- questions
@dataclass
class Question:
    """One question. `image` is a path or a PIL image; `answers` the reference answers (letters for mc)."""

    question_id: str
    image: Any
    question: str
    answers: list[str]
    type: str = "all"
    options: dict[str, str] | None = None
    image_id: str = ""
    extra: dict = field(default_factory=dict)
    reasoning: str = ""  # ShapesWorld's reasoned types: what a reasoned reply should state before its answer


def iter_text_lines(path: str | os.PathLike):
    """(line number, text) for every line of a UTF-8 file; a line that is not UTF-8 names itself."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(f"{path}:{number}: not UTF-8 text (byte {error.start} of the line: "
                                 f"{raw[error.start:error.start + 4]!r})") from None


def iter_jsonl(path: str | os.PathLike):
    """(line number, parsed object) for every non-empty line of a JSONL file; a bad line names itself."""
    for number, line in iter_text_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not valid JSON ({error})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{number}: expected one JSON object per line, got {type(record).__name__} "
                             f"{line.strip()[:80]}")
        yield number, record


def load_questions(path: str | os.PathLike, image_folder: str | os.PathLike | None = None, rule: str = "exact"
                   ) -> list[Question]:
    """Read a question file (see the module docstring); image paths are checked to exist."""
    if rule not in RULES:
        raise ValueError(f"rule={rule!r}; allowed: {RULES}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"question file {str(path)!r} not found")
    folder = Path(image_folder) if image_folder is not None else path.parent
    questions = [_question_from_record(record, folder, rule, f"{path}:{number}", str(number - 1))
                 for number, record in iter_jsonl(path)]
    if not questions:
        raise ValueError(f"question file {str(path)!r} holds no questions")
    return questions


def _question_from_record(record: dict, folder: Path, rule: str, where: str, default_id: str) -> Question:
    if "image" not in record:
        raise ValueError(f"{where}: a question needs 'image' (a path), got keys {sorted(record)}")
    text = record.get("question", record.get("text"))
    if not isinstance(text, str):
        raise ValueError(f"{where}: a question needs 'question' (or 'text') as a string")
    answers = record.get("answers", record.get("answer"))
    if answers is None:
        raise ValueError(f"{where}: a question needs 'answer' or 'answers' to be scored")
    answers = [str(a) for a in answers] if isinstance(answers, list) else [str(answers)]
    image_path = Path(record["image"])
    if not image_path.is_absolute():
        image_path = folder / image_path
    if not image_path.is_file():
        raise FileNotFoundError(f"{where}: image {str(image_path)!r} not found (give --image-folder)")
    options = None
    if rule == "mc":
        if "options" not in record:
            raise ValueError(f"{where}: rule 'mc' needs 'options'")
        options = option_letters(record["options"])
        answers = [_answer_letter(a, options, where) for a in answers]
    return Question(
        question_id=str(record.get("question_id", default_id)), image=str(image_path), question=text,
        answers=answers, type=str(record.get("type", record.get("category", "all"))), options=options,
        image_id=str(record.get("image_id", record["image"])))


def _answer_letter(answer: str, options: dict[str, str], where: str) -> str:
    if answer in options:
        return answer
    matches = [k for k, v in options.items() if normalize_answer(v) == normalize_answer(answer)]
    if len(matches) != 1:
        raise ValueError(f"{where}: answer {answer!r} is neither an option letter nor the text of one option "
                         f"{options}")
    return matches[0]


def shapesworld_questions(num_questions: int, split: str = "test", image_size: int = 64, seed: int = 0,
                          question_types: Sequence[str] | None = None, per_image: int | None = None
                          ) -> list[Question]:
    """The first `num_questions` ShapesWorld VQA pairs of `split`, image by image (every question of an image, or its
    first `per_image` in the scene's own random order), only those of `question_types` when given. With
    `per_image=1` a small sample spreads over as many scenes as questions, so one hard scene weighs one question."""
    if num_questions < 1:
        raise ValueError(f"num_questions must be >= 1, got {num_questions}")
    if per_image is not None and per_image < 1:
        raise ValueError(f"per_image must be None (every question) or >= 1, got {per_image}")
    if question_types is not None:
        question_types = check_question_types(question_types)
    world = ShapesWorld(split, size=image_size, num_samples=2**31, seed=seed)
    questions: list[Question] = []
    index = 0
    while len(questions) < num_questions:
        sample = world[index]
        pairs = [(k, p) for k, p in enumerate(sample.vqa) if question_types is None or p.type in question_types]
        for k, pair in pairs[: min(num_questions - len(questions), per_image or len(pairs))]:
            questions.append(Question(
                question_id=f"{split}-{index:06d}-{k}", image=sample.image, question=pair.question,
                answers=[pair.answer], type=pair.type, image_id=f"{split}-{index:06d}", reasoning=pair.reasoning))
        index += 1
    return questions


# ---------------------------------------------------------------------------------------------------- answering
def load_model(path: str | os.PathLike, device: str = "cpu", dtype: str = "float32"):
    """A TokenFlowMLLM checkpoint folder → (model in eval mode on `device`, its processor)."""
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in dtypes:
        raise ValueError(f"dtype={dtype!r}; allowed: {sorted(dtypes)}")
    model = TokenFlowMLLM.from_pretrained(path, dtype=dtypes[dtype]).to(device).eval()
    if model.processor is None:
        raise ValueError(f"{str(path)!r} holds no processor (processor_config.json); save the model together with "
                         "its TokenFlowProcessor")
    return model, model.processor


def build_prompt(processor, question: Question, suffix: str = "") -> str:
    """The chat-template prompt of one question (ends with the opened assistant turn)."""
    text = question.question + suffix
    if question.options is not None:
        text += "\n" + "\n".join(f"{k}. {v}" for k, v in question.options.items()) + "\n" + MC_INSTRUCTION
    return processor.apply_chat_template([{"role": "user", "content": processor.user_content(text)}],
                                         add_generation_prompt=True)


def stop_token_ids(processor) -> list[int]:
    """Ids that end an answer: the turn's end (EOS, `<|im_end|>` where the vocabulary has it) and `<boi>` (the model
    starting to draw is not an answer)."""
    return sorted({*processor.turn_end_ids, processor.boi_token_id})


@torch.no_grad()
def generate_answers(model, processor, prompts: Sequence[str], images: Sequence[Any], batch_size: int = 16,
                     max_new_tokens: int = 16, desc: str | None = "answering", **generate_kwargs: Any) -> list[str]:
    """Replies to chat-template `prompts`, in batches with a progress bar; greedy unless `generate_kwargs` (passed to
    `model.generate`) say otherwise.

    `images[i]` is the image of prompt i's `<image>`, or a list of its images in order (empty for text only).
    `desc=None` hides the progress bar (for callers that show their own)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts but {len(images)} images")
    stops = stop_token_ids(processor)
    replies: list[str] = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch", dynamic_ncols=True,
                      disable=desc is None):
        batch = processor(text=list(prompts[start:start + batch_size]), images=list(images[start:start + batch_size]),
                          padding_side="left")
        batch = {k: v.to(model.device) for k, v in batch.items()}
        # A reply is text: `<image>` / `<eoi>` ids would open image slots no image fills (the model draws only after
        # `<boi>`, which stops the reply).
        settings = {"do_sample": False, "eos_token_id": stops,
                    "suppress_tokens": [processor.image_token_id, processor.eoi_token_id], **generate_kwargs}
        output = model.generate(**batch, max_new_tokens=max_new_tokens, pad_token_id=processor.tokenizer.pad_token_id,
                                **settings)
        new_tokens = output[:, batch["input_ids"].shape[1]:]
        replies += [r.strip() for r in processor.batch_decode(new_tokens, skip_special_tokens=True)]
    return replies


def read_question_images(questions: Sequence[Question]) -> tuple[list[Question], list[Image.Image], list[dict]]:
    """(questions whose image could be read, those images, one record per skipped question with the reason)."""
    readable, images, skipped = [], [], []
    for q in questions:
        try:
            images.append(load_image(q.image))
        except ImageLoadError as error:
            skipped.append({"question_id": q.question_id, "image": error.source, "reason": error.reason})
            continue
        readable.append(q)
    return readable, images, skipped


def answer_questions(model, processor, questions: Sequence[Question], batch_size: int = 16,
                     max_new_tokens: int = 16, prompt_suffix: str = "",
                     on_answers: Callable[[list[Question], list[str]], None] | None = None
                     ) -> tuple[list[Question], list[str], list[dict]]:
    """Answers `questions` batch by batch; an unreadable image skips its question instead of stopping the run.

    Returns (answered questions, their replies, skipped-question records). `on_answers(questions, replies)` is called
    after every batch (to write results as they come)."""
    answered: list[Question] = []
    replies: list[str] = []
    skipped: list[dict] = []
    progress = tqdm(total=len(questions), desc="answering", unit="question", dynamic_ncols=True)
    for start in range(0, len(questions), batch_size):
        batch, images, batch_skipped = read_question_images(questions[start:start + batch_size])
        skipped += batch_skipped
        if batch:
            prompts = [build_prompt(processor, q, prompt_suffix) for q in batch]
            batch_replies = generate_answers(model, processor, prompts, images, len(batch), max_new_tokens, desc=None)
            answered += batch
            replies += batch_replies
            if on_answers is not None:
                on_answers(batch, batch_replies)
        progress.update(len(batch) + len(batch_skipped))
        progress.set_postfix(skipped=len(skipped))
    progress.close()
    return answered, replies, skipped


# ---------------------------------------------------------------------------------------------------- scoring
def judge(question: Question, reply: str, rule: str) -> tuple[str | None, float]:
    """(what the reply was parsed to, its score in [0, 1]) for one question under `rule`."""
    if rule == "exact":
        return normalize_answer(reply), exact_match(reply, question.answers)
    if rule == "final":
        answer = final_answer(reply)
        return normalize_answer(answer), exact_match(answer, question.answers)
    if rule == "vqa":
        return normalize_answer(reply), vqa_accuracy(reply, question.answers)
    if rule == "mme":
        parsed = parse_yes_no_mme(reply)
        return parsed, float(parsed == question.answers[0].strip().lower())
    if rule == "pope":
        parsed = parse_yes_no_pope(reply)
        return parsed, float(parsed == question.answers[0].strip().lower())
    if rule == "mc":
        if question.options is None:
            raise ValueError(f"question {question.question_id!r} has no options; rule 'mc' needs them")
        parsed = parse_option_letter(reply, question.options)
        return parsed, float(parsed is not None and parsed in question.answers)
    raise ValueError(f"rule={rule!r}; allowed: {RULES}")


def reasoning_metrics(questions: Sequence[Question], replies: Sequence[str]) -> dict[str, float | None]:
    """How reasoned replies reason, for questions of one type: `reasoning`, the share of replies that state exactly
    the expected reasoning (`Question.reasoning`, normalised as answers are); `consistent` (relation questions), the
    share whose conclusion is the answer that the coordinates they name imply, right or wrong
    (`implied_relation_answer`). None where the type has no reasoning (or no `consistent` check)."""
    if not any(q.reasoning for q in questions):
        return {"reasoning": None, "consistent": None}
    stated = [normalize_answer(reasoning_of(r)) == normalize_answer(q.reasoning) for q, r in zip(questions, replies)]
    consistent = None
    if all(q.type == "relation" for q in questions):
        consistent = accuracy([float(implied_relation_answer(q.question, r) == normalize_answer(final_answer(r)))
                               for q, r in zip(questions, replies)])
    return {"reasoning": accuracy([float(s) for s in stated]), "consistent": consistent}


def score_predictions(questions: Sequence[Question], replies: Sequence[str], rule: str) -> dict[str, Any]:
    """Summary of a run: {"rule", "num_questions", "overall": {...}, "per_type": {type: {...}}}.

    exact / vqa / mc / final: accuracy (overall: over all questions, and `accuracy_macro` the mean over types), and per
    type the `reasoning_metrics` when the questions carry a reasoning (ShapesWorld's relation questions). mme: acc,
    acc+ and score per category; overall acc, acc+ and `total_score` = the sum of the category scores. pope: the
    `pope_metrics` per type and over all questions."""
    if len(questions) != len(replies) or not questions:
        raise ValueError(f"need equally many questions and replies (>0), got {len(questions)}, {len(replies)}")
    if rule not in RULES:
        raise ValueError(f"rule={rule!r}; allowed: {RULES}")
    by_type: dict[str, list[int]] = defaultdict(list)
    for i, q in enumerate(questions):
        by_type[q.type].append(i)
    types = sorted(by_type)
    if rule == "mme":
        per_type = {t: mme_metrics([replies[i] for i in by_type[t]], [questions[i].answers[0] for i in by_type[t]],
                                   [questions[i].image_id for i in by_type[t]]) for t in types}
        overall = mme_metrics(replies, [q.answers[0] for q in questions], [f"{q.type}/{q.image_id}" for q in questions])
        overall["total_score"] = sum(m["score"] for m in per_type.values())
    elif rule == "pope":
        per_type = {t: pope_metrics([replies[i] for i in by_type[t]], [questions[i].answers[0] for i in by_type[t]])
                    for t in types}
        overall = pope_metrics(replies, [q.answers[0] for q in questions])
    else:
        scores = [judge(q, r, rule)[1] for q, r in zip(questions, replies)]
        per_type = {t: {"accuracy": accuracy([scores[i] for i in by_type[t]]), "n": len(by_type[t])} for t in types}
        if any(q.reasoning for q in questions):
            for t in types:
                per_type[t].update(reasoning_metrics([questions[i] for i in by_type[t]],
                                                     [replies[i] for i in by_type[t]]))
        overall = {"accuracy": accuracy(scores), "n": len(scores),
                   "accuracy_macro": sum(m["accuracy"] for m in per_type.values()) / len(per_type)}
    return {"rule": rule, "num_questions": len(questions), "overall": overall, "per_type": per_type}


def headline(summary: dict) -> tuple[str, float]:
    """The one number of a summary: (name, value)."""
    overall = summary["overall"]
    if summary["rule"] == "mme":
        return "MME total score", overall["total_score"]
    if summary["rule"] == "pope":
        return "POPE F1", overall["f1"]
    return "accuracy", overall["accuracy"]


def summary_markdown(summary: dict, title: str) -> str:
    """A markdown section: overall metrics, then a table per question type."""
    overall = summary["overall"]
    metric_names = [k for k in next(iter(summary["per_type"].values())) if k not in ("n", "images")]
    lines = [f"## {title}", "", f"{summary['num_questions']} questions, rule `{summary['rule']}`.", "",
             "| type | " + " | ".join(metric_names) + " | n |", "|---|" + "---|" * (len(metric_names) + 1)]
    for name, metrics in summary["per_type"].items():
        lines.append(f"| {name} | " + " | ".join(_fmt(metrics[m]) for m in metric_names) + f" | {metrics['n']} |")
    lines.append("| **overall** | " + " | ".join(_fmt(overall.get(m)) for m in metric_names) + f" | {overall['n']} |")
    extras = {k: v for k, v in overall.items() if k not in metric_names and k not in ("n", "images")}
    if extras:
        lines += [""] + [f"- {k}: {_fmt(v)}" for k, v in extras.items()]
    return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


# ---------------------------------------------------------------------------------------------------- CLI
def prediction_record(question: Question, reply: str, rule: str) -> dict:
    """One line of `vqa_predictions.jsonl`: the question, the reply, its parse and score."""
    parsed, score = judge(question, reply, rule)
    return {"question_id": question.question_id, "type": question.type, "image_id": question.image_id,
            "question": question.question, "answers": question.answers, "reply": reply, "parsed": parsed,
            "score": score}


def run(model, processor, questions: Sequence[Question], rule: str, batch_size: int = 16, max_new_tokens: int = 16,
        prompt_suffix: str = "", predictions_path: str | os.PathLike | None = None) -> tuple[dict, list[dict]]:
    """Answer and score; returns (summary, one record per answered question).

    Questions whose image cannot be read are skipped and counted (`summary["skipped"]`, with the reasons). With
    `predictions_path`, every record is appended to that JSONL file as soon as its batch is answered, so an interrupted
    run keeps what it answered."""
    records: list[dict] = []
    sink = open(predictions_path, "w", encoding="utf-8") if predictions_path is not None else None

    def keep(batch: list[Question], replies: list[str]) -> None:
        for q, reply in zip(batch, replies):
            records.append(prediction_record(q, reply, rule))
            if sink is not None:
                sink.write(json.dumps(records[-1]) + "\n")
        if sink is not None:
            sink.flush()

    try:
        answered, replies, skipped = answer_questions(
            model, processor, questions, batch_size, max_new_tokens, prompt_suffix, on_answers=keep)
    finally:
        if sink is not None:
            sink.close()
    if not answered:
        raise ValueError(f"none of the {len(questions)} questions could be answered: every image was unreadable "
                         f"(first: {skipped[0]['image']}: {skipped[0]['reason']})")
    summary = score_predictions(answered, replies, rule)
    summary["skipped"] = {"count": len(skipped), "questions": skipped}
    return summary, records


def write_outputs(output_dir: str | os.PathLike, summary: dict, records: list[dict], settings: dict) -> Path:
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vqa_results.json").write_text(json.dumps({"settings": settings, **summary}, indent=2))
    with (out / "vqa_predictions.jsonl").open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    name, value = headline(summary)
    skipped = summary.get("skipped", {}).get("count", 0)
    text = (f"# Understanding: `{settings.get('model')}`\n\nQuestions: {settings.get('questions')}"
            f"{f' ({skipped} skipped: unreadable image)' if skipped else ''}. "
            f"{name}: **{value:.4f}**.\n\n" + summary_markdown(summary, "Per question type"))
    (out / "vqa_report.md").write_text(text)
    return out


def prepare_output_dir(path: str | os.PathLike) -> Path:
    """Creates `path` (and its parents) and checks that files can be written there; raises naming the folder."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as error:
        raise OSError(f"--output-dir {str(out)!r} is not a writable folder ({error.strerror or error})") from None
    return out


def add_model_arguments(p: argparse.ArgumentParser, output: str) -> None:
    """The flags every evaluation CLI shares: which model, where it runs, where results go, how many samples."""
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--output-dir", default=None, help=f"default: <model>/eval/{output}")


def check_num_samples(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.num_samples is not None and args.num_samples < 1:
        p.error(f"--num-samples must be >= 1, got {args.num_samples}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m eval.vqa", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a TokenFlowMLLM checkpoint folder")
    p.add_argument("--questions", default=None, help="question JSONL (default: ShapesWorld VQA, --split)")
    p.add_argument("--image-folder", default=None, help="folder the question file's image paths are relative to")
    p.add_argument("--rule", choices=RULES, default=None,
                   help=f"default: exact for --questions, {SHAPESWORLD_RULE} for ShapesWorld")
    p.add_argument("--split", choices=("validation", "test"), default="test", help="ShapesWorld split (default set)")
    p.add_argument("--num-samples", type=int, default=None,
                   help="questions to ask (default: all of the file; 600 of ShapesWorld)")
    p.add_argument("--per-image", type=int, default=None,
                   help="ShapesWorld: ask at most this many questions of each scene (default: every question; 1 "
                        "spreads the sample over as many scenes as questions)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"default: 16 for --questions, {SHAPESWORLD_MAX_NEW_TOKENS} for ShapesWorld")
    p.add_argument("--prompt-suffix", default="", help="appended to every question, e.g. ' Answer with one word.'")
    add_model_arguments(p, "vqa")
    args = p.parse_args(argv)
    check_num_samples(p, args)
    shapesworld = args.questions is None
    if args.rule is None:
        args.rule = SHAPESWORLD_RULE if shapesworld else "exact"
    if args.max_new_tokens is None:
        args.max_new_tokens = SHAPESWORLD_MAX_NEW_TOKENS if shapesworld else 16
    if args.batch_size < 1 or args.max_new_tokens < 1:
        p.error("--batch-size and --max-new-tokens must be >= 1")
    if args.per_image is not None and (args.per_image < 1 or not shapesworld):
        p.error("--per-image must be >= 1 and applies to ShapesWorld questions (no --questions file)")
    if shapesworld and args.rule not in ("exact", SHAPESWORLD_RULE):
        p.error(f"--rule {args.rule} needs --questions (ShapesWorld VQA is scored by exact match or "
                f"{SHAPESWORLD_RULE})")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = prepare_output_dir(args.output_dir or Path(args.model) / "eval" / "vqa")
    model, processor = load_model(args.model, args.device, args.dtype)
    if args.questions is None:
        image_size = model.config.tokenizer_config.image_size
        questions = shapesworld_questions(args.num_samples or 600, args.split, image_size, per_image=args.per_image)
        per_image = "" if args.per_image is None else f", at most {args.per_image} per scene"
        source = f"ShapesWorld {args.split} ({len(questions)} questions{per_image})"
    else:
        questions = load_questions(args.questions, args.image_folder, args.rule)[: args.num_samples]
        source = f"{args.questions} ({len(questions)} questions)"
    summary, records = run(model, processor, questions, args.rule, args.batch_size, args.max_new_tokens,
                           args.prompt_suffix, out / "vqa_predictions.jsonl")
    settings = {"model": str(args.model), "questions": source, "rule": args.rule, "batch_size": args.batch_size,
                "max_new_tokens": args.max_new_tokens, "prompt_suffix": args.prompt_suffix, "dtype": args.dtype,
                "decoding": "greedy"}
    write_outputs(out, summary, records, settings)
    name, value = headline(summary)
    skipped = summary["skipped"]["count"]
    print(f"{name} {value:.4f} over {len(records)} questions ({skipped} skipped: unreadable image) -> {out}")
    for type_name, metrics in summary["per_type"].items():
        print(f"  {type_name}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in metrics.items()))
    return summary


if __name__ == "__main__":
    run_main(main)
