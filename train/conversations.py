"""Training data for the unified model: every source becomes a list of chat conversations.

A *conversation* is what `TokenFlowProcessor.encode_conversation` consumes::

    {"messages": [{"role": "user", "content": [{"type": "image", "image": <path | PIL>}, {"type": "text", ...}]},
                  {"role": "assistant", "content": "a red circle"}],
     "task": "caption"}

Image items in user/system turns are images the model looks at; in assistant turns, images it draws. An image item
holds pixels (`"image"`: a path or a PIL image) or, after `train/pretokenize.py`, its TokenFlow indices
(`"indices"`: LongTensor [Σs²]). Content is always a list of items here (LLaVA's `<image>` placeholders are split
into items when a file is read), so pre-tokenization only has to walk the items.

Sources (each a map-style dataset of conversations, deterministic in its index):
- `ShapesWorldConversations`: the built-in world, generated on the fly. Stage 1 (`pretrain`) tasks: `caption`
  (image → caption) and `t2i` (caption or drawing prompt → image). Stage 2 (`sft`) tasks: `vqa` (image + questions →
  short answers), `t2i` (drawing requests in chat form), `text` (questions answered from a text description). Either
  stage may add `describe` (image → every occupied cell named in reading order, "top left: small red circle;
  center: large blue square": dense supervision of what each part of the image holds). With `curriculum_steps`,
  scenes hold at most one object at step 0, rising to the world's maximum by that step.
- `LlavaConversations`: LLaVA conversation JSON / JSONL (`conversations` with from/value or role/content, `image`
  a path or a list of paths relative to `image_folder`).
- `CaptionConversations`: image–caption pairs (JSONL, parquet, an `imagefolder` directory with `metadata.jsonl`,
  or a Hugging Face dataset saved with `save_to_disk`), used for captioning, drawing or both.
- `TextConversations`: text-only chat JSONL (`messages` or `conversations`).
- `PretokenizedConversations`: the output of `train/pretokenize.py` (conversations whose images are indices).
- `MixtureDataset`: draws from several sources with weights.

Classifier-free guidance is trained by replacing the user text of drawing conversations by the empty prompt with
probability `cfg_drop_prob`; sampling uses that same empty prompt as its unconditional row.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from llm.configuration_tokenflow_mllm import IMAGE_PLACEMENTS
from llm.processing_tokenflow_mllm import user_content
from unimodal.shapesworld import (
    MAX_OBJECTS, PROMPT_TAGS, QUESTION_TYPES, Rng, ShapesWorld, curriculum_max_objects, describe_scene,
    make_questions, render_scene,
)
from unimodal.shapesworld.labels import slot_description
from unimodal.shapesworld.language import check_question_types, check_reasoned_types

from .batches import item_at_step

IMAGE_PLACEHOLDER = "<image>"
ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                "system": "system"}
CAPTION_REQUESTS = ("Describe the image.", "What is in this picture?", "Write a caption for this image.")
DESCRIBE_REQUEST = "Describe the objects, top left to bottom right."  # words of the ShapesWorld vocabulary
DRAW_REQUESTS = ("Draw {}.", "Please draw {}.", "Can you draw {}?", "Make a picture of {}.")
SHAPESWORLD_TASKS = ("caption", "vqa", "t2i", "text", "describe")
PRETRAIN_TASKS = {"caption": 0.5, "t2i": 0.5}
SFT_TASKS = {"vqa": 0.6, "t2i": 0.35, "text": 0.05}
# Question types every scene can answer (the others need a nameable object, or two).
ALWAYS_ASKABLE = ("color", "shape", "count", "exists")


def sample_rng(seed: int, index: int, salt: str = "") -> random.Random:
    """An RNG that depends only on (seed, index, salt): a sample is the same whatever order it is read in."""
    return random.Random(f"{seed}/{index}/{salt}")


def weighted_choice(rng: random.Random, weights: dict[str, float]) -> str:
    names = list(weights)
    return rng.choices(names, weights=[weights[n] for n in names], k=1)[0]


def check_weights(weights: dict[str, float], allowed: Sequence[str], what: str) -> dict[str, float]:
    """Validate mixture weights: known names, finite non-negative values, positive sum."""
    for name, value in weights.items():
        if name not in allowed:
            raise ValueError(f"unknown {what} {name!r}; allowed: {', '.join(allowed)}")
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{what} weight {name}={value!r} must be a finite number >= 0")
    if not sum(weights.values()) > 0:
        raise ValueError(f"{what} weights {weights} must have a positive sum")
    return dict(weights)


# ---------------------------------------------------------------------------------------------- conversation kinds

def caption_conversation(image: Any, caption: str, request: str = CAPTION_REQUESTS[0],
                         placement: str = "before_text") -> dict:
    """The model looks at `image` (placed before or after `request`, see `llm.processing_tokenflow_mllm.user_content`)
    and answers with `caption`."""
    return {"task": "caption", "messages": [
        {"role": "user", "content": user_content(request, [image], placement)},
        {"role": "assistant", "content": [{"type": "text", "text": caption}]},
    ]}


def drawing_conversation(prompt: str, image: Any) -> dict:
    """The model draws `image` for the user text `prompt` ("" is the unconditional prompt of CFG)."""
    return {"task": "t2i", "messages": [
        {"role": "user", "content": [{"type": "text", "text": prompt}]},
        {"role": "assistant", "content": [{"type": "image", "image": image}]},
    ]}


def vqa_conversation(image: Any, qa_pairs: Sequence[tuple[str, str]], placement: str = "before_text") -> dict:
    """The model looks at `image` and answers each question in turn (the image comes with the first, before or after
    its text as `placement` says)."""
    messages: list[dict] = []
    for turn, (question, answer) in enumerate(qa_pairs):
        content = user_content(question, [image] if turn == 0 else [], placement)
        messages += [{"role": "user", "content": content},
                     {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
    return {"task": "vqa", "messages": messages}


def text_conversation(turns: Sequence[tuple[str, str]]) -> dict:
    messages: list[dict] = []
    for question, answer in turns:
        messages += [{"role": "user", "content": [{"type": "text", "text": question}]},
                     {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
    return {"task": "text", "messages": messages}


def drop_prompt(conversation: dict) -> dict:
    """The same drawing conversation with the empty prompt (the unconditional row of CFG)."""
    first, *rest = conversation["messages"]
    return {**conversation, "messages": [{"role": first["role"], "content": [{"type": "text", "text": ""}]}, *rest],
            "cfg_dropped": True}


def conversation_images(conversation: dict) -> list[dict]:
    """The image items of a conversation in reading order (looked-at and drawn alike)."""
    return [item for message in conversation["messages"] if isinstance(message["content"], list)
            for item in message["content"] if item["type"] == "image"]


# ---------------------------------------------------------------------------------------------------- ShapesWorld

class ShapesWorldConversations(Dataset):
    """Conversations about ShapesWorld scenes, generated on the fly.

    Item `i` picks a task by `tasks` weights with an RNG seeded by (seed, i), so the same index always gives the same
    conversation (resumed runs see the same data).

    Args:
        stage: `"pretrain"` or `"sft"`: which default task weights apply (any task can be weighted in either).
        split: ShapesWorld split (train/validation/test; their seeds never overlap).
        num_samples: length of the dataset.
        image_size: side of the rendered images.
        tasks: task → weight (defaults: `PRETRAIN_TASKS` / `SFT_TASKS`).
        cfg_drop_prob: probability that a drawing conversation gets the empty prompt.
        max_questions: questions per VQA conversation (the image comes with the first).
        image_placement: where the image of a looked-at conversation (caption, describe, vqa) sits in its user
            turn: `"before_text"` or `"after_text"` (the trained model's `config.image_placement`).
        question_types: the VQA (and text) tasks ask only these types (None: all of `QUESTION_TYPES`); at least one
            that every scene can answer (color, shape, count, exists) must be among them.
        extra_questions: question type → how many more questions of that type each VQA (and text) conversation
            asks beside its `max_questions` (different ones, as many as the scene allows), so a type that is slow to
            learn is seen more often without taking questions from the others; e.g. {"relation": 2}.
        reasoned_types: questions of these types (of `REASONED_TYPES`) are answered with their reasoning first
            ("the red circle is in the left column and the blue square is in the center column, so yes"), the rest
            with the answer alone.
        slot_label_side: when set, every looked-at image carries `slot_labels`, the `slot_description` of its scene
            on the side×side grid of the model's understanding slots (targets of a model's `slot_head`); None = no
            labels.
        curriculum_steps: over the first this many training steps the most objects per scene rises from 1 to the
            world's maximum (`curriculum_max_objects`); 0 = none. The step comes from the sample's stream position
            (`item_at_step`, which the training stream calls); `dataset[i]` is always the full world.
    """

    def __init__(self, stage: str = "sft", split: str = "train", num_samples: int = 20000, image_size: int = 64,
                 seed: int = 0, tasks: dict[str, float] | None = None, cfg_drop_prob: float = 0.1,
                 max_questions: int = 3, curriculum_steps: int = 0, image_placement: str = "before_text",
                 question_types: Sequence[str] | None = None, reasoned_types: Sequence[str] = (),
                 slot_label_side: int | None = None, extra_questions: dict[str, int] | None = None):
        if stage not in ("pretrain", "sft"):
            raise ValueError(f"stage={stage!r}; allowed: 'pretrain', 'sft'")
        defaults = PRETRAIN_TASKS if stage == "pretrain" else SFT_TASKS
        self.tasks = check_weights(tasks if tasks is not None else defaults, SHAPESWORLD_TASKS, f"{stage} task")
        if not 0 <= cfg_drop_prob <= 1:
            raise ValueError(f"cfg_drop_prob={cfg_drop_prob!r} must be in [0, 1]")
        if max_questions < 1:
            raise ValueError(f"max_questions={max_questions!r} must be >= 1")
        if curriculum_steps < 0:
            raise ValueError(f"curriculum_steps={curriculum_steps!r} must be >= 0")
        self.stage, self.seed, self.curriculum_steps = stage, seed, curriculum_steps
        if image_placement not in IMAGE_PLACEMENTS:
            raise ValueError(f"image_placement={image_placement!r}; allowed: {', '.join(IMAGE_PLACEMENTS)}")
        self.question_types = check_question_types(QUESTION_TYPES if question_types is None else question_types)
        if not set(self.question_types) & set(ALWAYS_ASKABLE):
            raise ValueError(f"question types {list(self.question_types)} need at least one of "
                             f"{', '.join(ALWAYS_ASKABLE)} (every scene can answer those)")
        self.reasoned_types = check_reasoned_types(reasoned_types)
        self.extra_questions = dict(extra_questions or {})
        if self.extra_questions:
            check_question_types(list(self.extra_questions))
        for question_type, count in self.extra_questions.items():
            if not isinstance(count, int) or count < 0:
                raise ValueError(f"extra_questions[{question_type!r}]={count!r} must be an int >= 0")
            if question_type not in self.question_types:
                raise ValueError(f"extra_questions asks for {question_type!r} questions, which question types "
                                 f"{list(self.question_types)} exclude")
        self.cfg_drop_prob, self.max_questions, self.image_placement = cfg_drop_prob, max_questions, image_placement
        if slot_label_side is not None and slot_label_side < 1:
            raise ValueError(f"slot_label_side={slot_label_side!r} must be None or >= 1")
        self.slot_label_side = slot_label_side
        self.world = ShapesWorld(split, size=image_size, num_samples=num_samples, seed=seed)

    def __len__(self) -> int:
        return len(self.world)

    def __getitem__(self, index: int) -> dict:
        return self.conversation(index, MAX_OBJECTS)

    def item_at_step(self, index: int, step: int) -> dict:
        """Item `index` as read at training step `step`: its scene capped by the curriculum."""
        return self.conversation(index, curriculum_max_objects(step, self.curriculum_steps))

    def questions(self, sample, rng: random.Random) -> list:
        """Up to `max_questions` of the sample's questions of the asked types, in random order, then with
        `extra_questions` further ones of those types mixed in."""
        asked = [qa for qa in sample.vqa if qa.type in self.question_types]
        chosen = rng.sample(asked, min(self.max_questions, len(asked)))
        if not any(self.extra_questions.values()):
            return chosen
        seen = {qa.question for qa in chosen}
        for question_type, count in self.extra_questions.items():
            extra = make_questions(sample.scene, Rng(sample.seed, f"vqa/extra/{question_type}"), question_type,
                                   count + 1, self.world.held_out)  # one more, in case one is already asked
            extra = [qa for qa in extra if qa.question not in seen][:count]
            seen.update(qa.question for qa in extra)
            chosen += extra
        return rng.sample(chosen, len(chosen))

    def reply(self, qa) -> str:
        return qa.reply(reasoned=qa.type in self.reasoned_types)

    def conversation(self, index: int, max_objects: int) -> dict:
        rng = sample_rng(self.seed, index, f"shapesworld/{self.stage}")
        task = weighted_choice(rng, self.tasks)
        sample = self.world.sample(index, max_objects)
        shown = sample.image  # the looked-at image, with its per-slot labels when asked for
        if self.slot_label_side is not None:
            shown = {"type": "image", "image": sample.image,
                     "slot_labels": slot_description(sample.scene, self.slot_label_side)}
        if task == "caption":
            conversation = caption_conversation(shown, rng.choice(sample.captions), rng.choice(CAPTION_REQUESTS),
                                                self.image_placement)
        elif task == "describe":
            conversation = {**caption_conversation(shown, describe_scene(sample.scene), DESCRIBE_REQUEST,
                                                   self.image_placement), "task": "describe"}
        elif task == "vqa":
            pairs = self.questions(sample, rng)
            conversation = vqa_conversation(shown, [(qa.question, self.reply(qa)) for qa in pairs],
                                            self.image_placement)
        elif task == "text":
            # A full description of the scene stands in for the image: the answers follow from the text alone.
            pairs = self.questions(sample, rng)
            description = f"A picture shows {sample.captions[1]}."
            turns = [(f"{description} {q.question}" if i == 0 else q.question, self.reply(q))
                     for i, q in enumerate(pairs)]
            conversation = text_conversation(turns)
        else:  # t2i: half GenEval-style prompts with their own target scene, half full captions of the sample
            if rng.random() < 0.5:
                prompt = sample.prompts[rng.randrange(len(PROMPT_TAGS))]
                text, image = prompt.text, render_scene(prompt.scene, self.world.size)
            else:
                text, image = rng.choice(sample.captions[:3]), sample.image
            if self.stage == "sft" and rng.random() < 0.5:
                text = rng.choice(DRAW_REQUESTS).format(text)
            conversation = drawing_conversation(text, image)
            if rng.random() < self.cfg_drop_prob:
                conversation = drop_prompt(conversation)
        conversation["id"] = f"shapesworld-{self.world.split}-{index}"
        return conversation


# ---------------------------------------------------------------------------------------------------- file formats

def read_records(path: str | os.PathLike) -> list[dict]:
    """Records of a JSON list, a JSONL file, or a parquet file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    if path.suffix == ".parquet":
        import datasets

        return list(datasets.Dataset.from_parquet(str(path)))
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        records = json.loads(text)
    else:
        records = []
        for line_number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{line_number}: not valid JSON ({error.msg})") from None
    if not all(isinstance(r, dict) for r in records):
        raise ValueError(f"{path}: every record must be a JSON object")
    return records


def split_placeholders(text: str, images: list) -> list[dict]:
    """LLaVA text with `<image>` placeholders → content items, taking images from `images` in order."""
    items: list[dict] = []
    pieces = text.split(IMAGE_PLACEHOLDER)
    for number, piece in enumerate(pieces):
        if number > 0:
            if not images:
                raise ValueError(f"more {IMAGE_PLACEHOLDER} placeholders than images in {text!r}")
            items.append({"type": "image", "image": images.pop(0)})
            piece = piece[1:] if piece.startswith("\n") else piece  # the chat template puts the newline back
        if number == 0 and number < len(pieces) - 1:
            piece = piece.rstrip("\n")
        if piece:
            items.append({"type": "text", "text": piece})
    return items


def resolve_path(path: str, folder: str | os.PathLike | None) -> str:
    return path if folder is None or os.path.isabs(path) else os.path.join(folder, path)


class LlavaConversations(Dataset):
    """LLaVA conversation JSON/JSONL: `{"id", "image": path | [paths], "conversations": [{"from", "value"}, ...]}`.

    `from` may be human/gpt/system (or `role`/`content` keys with user/assistant/system). Each `<image>` in a turn is
    the next image; a record with images but no placeholder gets them before the first user text (LLaVA's rule).
    """

    def __init__(self, path: str | os.PathLike, image_folder: str | os.PathLike | None = None):
        self.path, self.image_folder = str(path), image_folder
        self.records = read_records(path)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        where = f"{self.path} record {index} (id {record.get('id', '?')!r})"
        turns = record.get("conversations", record.get("messages"))
        if not isinstance(turns, list) or not turns:
            raise ValueError(f"{where}: needs a non-empty 'conversations' list")
        image_field = record.get("image", record.get("images")) or []
        images = [resolve_path(p, self.image_folder) for p in
                  ([image_field] if isinstance(image_field, str) else list(image_field))]
        placeholders = sum(str(t.get("value", t.get("content", ""))).count(IMAGE_PLACEHOLDER) for t in turns)
        if placeholders == 0 and images:
            first = dict(turns[0])
            key = "value" if "value" in first else "content"
            first[key] = IMAGE_PLACEHOLDER * len(images) + "\n" + first[key]
            turns = [first, *turns[1:]]
        elif placeholders != len(images):
            raise ValueError(f"{where}: {placeholders} {IMAGE_PLACEHOLDER} placeholders but {len(images)} images")
        messages = []
        for turn in turns:
            role = ROLE_ALIASES.get(turn.get("from", turn.get("role")))
            if role is None:
                raise ValueError(f"{where}: unknown speaker {turn.get('from', turn.get('role'))!r}; allowed: "
                                 f"{', '.join(ROLE_ALIASES)}")
            messages.append({"role": role, "content": split_placeholders(str(turn.get("value", turn.get("content"))),
                                                                         images)})
        has_drawing = any(m["role"] == "assistant" and any(i["type"] == "image" for i in m["content"])
                          for m in messages)
        return {"task": "t2i" if has_drawing else ("vqa" if placeholders or image_field else "text"),
                "messages": messages, "id": str(record.get("id", index))}


class CaptionConversations(Dataset):
    """Image–caption pairs used for captioning (`mode="caption"`), drawing (`"t2i"`) or both (`"both"`: item 2i
    captions image i, item 2i+1 draws it).

    `path`: a JSONL/JSON/parquet file of records, an `imagefolder` directory (images + `metadata.jsonl`), or a
    dataset saved with `datasets.save_to_disk`. The image column holds paths (relative to `image_folder`, or to the
    file's directory) or images; the caption column holds a string or a list of strings (one is picked per item).
    """

    def __init__(self, path: str | os.PathLike, mode: str = "both", image_folder: str | os.PathLike | None = None,
                 image_column: str = "image", caption_column: str = "caption", seed: int = 0,
                 cfg_drop_prob: float = 0.1):
        if mode not in ("caption", "t2i", "both"):
            raise ValueError(f"mode={mode!r}; allowed: 'caption', 't2i', 'both'")
        if not 0 <= cfg_drop_prob <= 1:
            raise ValueError(f"cfg_drop_prob={cfg_drop_prob!r} must be in [0, 1]")
        self.path, self.mode, self.seed, self.cfg_drop_prob = str(path), mode, seed, cfg_drop_prob
        self.image_column, self.caption_column = image_column, caption_column
        path = Path(path)
        if path.is_dir():
            import datasets

            if (path / "dataset_info.json").exists() or (path / "state.json").exists():
                self.records = datasets.load_from_disk(str(path))
            else:
                self.records = datasets.load_dataset("imagefolder", data_dir=str(path), split="train")
                if caption_column not in self.records.column_names and "text" in self.records.column_names:
                    self.caption_column = "text"
            self.image_folder = image_folder
        else:
            self.records = read_records(path)
            self.image_folder = image_folder if image_folder is not None else path.parent
        if len(self.records) and self.image_column not in self.records[0]:
            raise ValueError(f"{self.path}: no image column {self.image_column!r}; columns: {sorted(self.records[0])}")
        if len(self.records) and self.caption_column not in self.records[0]:
            raise ValueError(f"{self.path}: no caption column {self.caption_column!r}; columns: "
                             f"{sorted(self.records[0])}")

    def __len__(self) -> int:
        return len(self.records) * (2 if self.mode == "both" else 1)

    def __getitem__(self, index: int) -> dict:
        record_index, task = (index // 2, ("caption", "t2i")[index % 2]) if self.mode == "both" else (index, self.mode)
        record = self.records[record_index]
        rng = sample_rng(self.seed, index, "captions")
        captions = record[self.caption_column]
        caption = rng.choice(captions) if isinstance(captions, (list, tuple)) else captions
        if not isinstance(caption, str) or not caption.strip():
            raise ValueError(f"{self.path} record {record_index}: caption must be a non-empty string, got {caption!r}")
        image = record[self.image_column]
        if isinstance(image, str):
            image = resolve_path(image, self.image_folder)
        if task == "caption":
            conversation = caption_conversation(image, caption, rng.choice(CAPTION_REQUESTS))
        else:
            conversation = drawing_conversation(caption, image)
            if rng.random() < self.cfg_drop_prob:
                conversation = drop_prompt(conversation)
        conversation["id"] = f"{Path(self.path).name}-{record_index}-{task}"
        return conversation


class TextConversations(Dataset):
    """Text-only chat JSONL: `{"messages": [{"role", "content"}]}` or LLaVA-style `conversations`."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        self.records = read_records(path)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        turns = record.get("messages", record.get("conversations"))
        if not isinstance(turns, list) or not turns:
            raise ValueError(f"{self.path} record {index}: needs a non-empty 'messages' list")
        messages = []
        for turn in turns:
            role = ROLE_ALIASES.get(turn.get("role", turn.get("from")))
            if role is None:
                raise ValueError(f"{self.path} record {index}: unknown role {turn.get('role', turn.get('from'))!r}")
            text = turn.get("content", turn.get("value"))
            if not isinstance(text, str):
                raise ValueError(f"{self.path} record {index}: text-only turns need string content, got {text!r}")
            if IMAGE_PLACEHOLDER in text:
                raise ValueError(f"{self.path} record {index}: {IMAGE_PLACEHOLDER} in a text-only conversation")
            messages.append({"role": role, "content": [{"type": "text", "text": text}]})
        return {"task": "text", "messages": messages, "id": str(record.get("id", index))}


PRETOKENIZED_FORMAT = "tokenflow-pretokenized"
PRETOKENIZED_VERSION = 1
# The tokenizer settings that decide which indices an image gets (batch-size and training-only options left out).
ENCODING_CONFIG_KEYS = ("image_size", "image_mean", "image_std", "resize_mode", "semantic_tower", "semantic_input",
                        "pixel_encoder", "pixel_input_size", "semantic_code_dim", "pixel_code_dim", "pixel_weight",
                        "codebook_size", "scales")


def tokenizer_fingerprint(image_tokenizer) -> dict[str, Any]:
    """What pre-tokenized indices depend on: the encoding settings of the config and the codebook itself.

    Returns `{"config_sha256", "codebook_sha256"}`; `codebook_sha256` is None when the codebook is partitioned
    (DeepSpeed ZeRO-3) and cannot be read on this rank.
    """
    import hashlib

    config = image_tokenizer.config.to_dict()
    encoding = {key: config.get(key) for key in ENCODING_CONFIG_KEYS}
    config_hash = hashlib.sha256(json.dumps(encoding, sort_keys=True, default=str).encode()).hexdigest()
    quantizer = image_tokenizer.quantize
    weights = [quantizer.embedding_vqkd.weight, quantizer.embedding_vqgan.weight]
    if any(w.numel() == 0 or hasattr(w, "ds_numel") for w in weights):
        return {"config_sha256": config_hash, "codebook_sha256": None}
    digest = hashlib.sha256()
    for weight in weights:
        digest.update(weight.detach().float().cpu().contiguous().numpy().tobytes())
    return {"config_sha256": config_hash, "codebook_sha256": digest.hexdigest()}


class PretokenizedConversations(Dataset):
    """Conversations written by `train/pretokenize.py`, whose images are TokenFlow indices instead of pixels.

    Directory layout::

        manifest.json                 format, tokenizer fingerprint, codebook size, scales, counts, shard names
        indices-00000.safetensors     tensor "indices" [n, Σs²] int16 (int32 for codebooks above 32768 entries),
        indices-00001.safetensors     scale-major (coarse → fine, row-major inside a scale), n ≤ shard size
        conversations.jsonl           one conversation per line; each image item is {"type": "image", "shard": k,
                                      "row": r} (any other keys of the item, e.g. "in_history", are kept;
                                      "slot_labels" [R, S²] as nested lists, written with --slot-labels)

    Items come back as `{"type": "image", "indices": LongTensor [Σs²]}`, which the processor turns into
    `image_indices` (images looked at: features rebuilt from the indices) and `generation_indices` (images drawn), so
    training never runs the tokenizer's encoder.

    Args:
        directory: the output folder of `train/pretokenize.py`.
        cfg_drop_prob: the run's `--cfg-drop-prob`; drawing prompts were dropped when the data was written, so a
            different value is refused rather than silently ignored (None: no check).
        image_placement: the trained model's `config.image_placement`; ShapesWorld conversations were laid out when
            the data was written (manifests without the key: `"before_text"`), so another one is refused (None: no
            check).
    """

    def __init__(self, directory: str | os.PathLike, cfg_drop_prob: float | None = None,
                 image_placement: str | None = None):
        from safetensors.torch import load_file

        self.directory = directory = Path(directory)
        manifest_path = directory / "manifest.json"
        if not manifest_path.exists():
            raise FileNotFoundError(f"{str(directory)!r} is not a pre-tokenized dataset: no manifest.json "
                                    "(write one with train/pretokenize.py)")
        self.manifest = manifest = json.loads(manifest_path.read_text())
        if manifest.get("format") != PRETOKENIZED_FORMAT or manifest.get("version") != PRETOKENIZED_VERSION:
            raise ValueError(f"{manifest_path}: format {manifest.get('format')!r} version {manifest.get('version')!r}; "
                             f"this reader takes {PRETOKENIZED_FORMAT!r} version {PRETOKENIZED_VERSION}")
        if (cfg_drop_prob is not None and manifest.get("num_drawn_images", 0) > 0
                and not math.isclose(cfg_drop_prob, manifest["cfg_drop_prob"])):
            raise ValueError(
                f"--cfg-drop-prob={cfg_drop_prob} but the drawing prompts of {str(directory)!r} were dropped with "
                f"probability {manifest['cfg_drop_prob']} when it was written; re-run train/pretokenize.py with "
                f"--cfg-drop-prob {cfg_drop_prob}, or train with --cfg-drop-prob {manifest['cfg_drop_prob']}")
        written_placement = manifest.get("image_placement", "before_text")
        if image_placement is not None and image_placement != written_placement and manifest.get("sources", {}).get(
                "shapesworld", 0) > 0:
            raise ValueError(
                f"the model places looked-at images {image_placement!r} but the ShapesWorld conversations of "
                f"{str(directory)!r} were written {written_placement!r}; re-run train/pretokenize.py with "
                f"--image-placement {image_placement}")
        self.shards = []
        for name in manifest["shards"]:
            indices = load_file(str(directory / name))["indices"]
            if indices.ndim != 2 or indices.shape[1] != self.num_image_codes:
                raise ValueError(f"{directory / name}: indices of shape {tuple(indices.shape)}, expected "
                                 f"[n, {self.num_image_codes}]")
            self.shards.append(indices)
        self.records = read_records(directory / "conversations.jsonl")

    @property
    def num_image_codes(self) -> int:
        return int(self.manifest["num_image_codes"])

    def check_tokenizer(self, image_tokenizer) -> None:
        """Raise ValueError unless `image_tokenizer` (the model's) is the one that wrote these indices."""
        expected = self.manifest["tokenizer"]
        config = image_tokenizer.config
        if list(config.scales) != self.manifest["scales"] or config.codebook_size != self.manifest["codebook_size"]:
            raise ValueError(
                f"{str(self.directory)!r} holds indices for scales {self.manifest['scales']} and a codebook of "
                f"{self.manifest['codebook_size']}, but the model's tokenizer has scales {list(config.scales)} and "
                f"{config.codebook_size} codes; pre-tokenize the data with the model's tokenizer")
        found = tokenizer_fingerprint(image_tokenizer)
        for key in ("config_sha256", "codebook_sha256"):
            if found[key] is not None and found[key] != expected[key]:
                raise ValueError(
                    f"{str(self.directory)!r} was pre-tokenized with another tokenizer ({expected['name_or_path']!r}; "
                    f"{key} differs); re-run train/pretokenize.py with the model's tokenizer")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = json.loads(json.dumps(self.records[index]))  # a private copy
        for message in record["messages"]:
            for item in message["content"] if isinstance(message["content"], list) else []:
                if item["type"] == "image":
                    shard, row = item.pop("shard"), item.pop("row")
                    if not (0 <= shard < len(self.shards) and 0 <= row < len(self.shards[shard])):
                        raise IndexError(f"{self.directory / 'conversations.jsonl'} record {index} points at shard "
                                         f"{shard} row {row}, which does not exist")
                    item["indices"] = self.shards[shard][row].long()
                    if "slot_labels" in item:
                        item["slot_labels"] = torch.tensor(item["slot_labels"], dtype=torch.long)
        return record

    @property
    def slot_label_side(self) -> int | None:
        """Side of the slot grid whose labels ShapesWorld's looked-at images carry (None: written without)."""
        return self.manifest.get("slot_label_side")


def check_pretokenized_tokenizer(dataset: Dataset, image_tokenizer) -> None:
    """Check every pre-tokenized source of `dataset` (itself or a mixture's sources) against the model's tokenizer."""
    sources = dataset.sources.values() if isinstance(dataset, MixtureDataset) else [dataset]
    for source in sources:
        if isinstance(source, PretokenizedConversations):
            source.check_tokenizer(image_tokenizer)


def check_slot_labels(dataset: Dataset, side: int) -> None:
    """Raise ValueError unless some source of `dataset` labels its looked-at images on the model's side×side slot grid
    (ShapesWorld built with `slot_label_side`, or shards written with `--slot-labels`), and none on another grid."""
    sources = dataset.sources.values() if isinstance(dataset, MixtureDataset) else [dataset]
    sides = [s.slot_label_side for s in sources if isinstance(s, (ShapesWorldConversations, PretokenizedConversations))]
    wrong = [found for found in sides if found is not None and found != side]
    if wrong or side not in sides:
        raise ValueError(
            f"the slot loss needs per-slot labels on the model's {side}x{side} slot grid, but the data's sources "
            f"label {'grids of side ' + str(wrong) if wrong else 'none'}; train on ShapesWorld, or pre-tokenize it "
            f"with the model's tokenizer and --slot-labels")


class MixtureDataset(Dataset):
    """`num_samples` items drawn from named sources with probabilities ∝ `weights`; item i's source and the index
    inside it depend only on (seed, i)."""

    def __init__(self, sources: dict[str, Dataset], weights: dict[str, float], num_samples: int, seed: int = 0):
        weights = check_weights({k: v for k, v in weights.items() if k in sources or v > 0}, tuple(sources), "source")
        for name, source in sources.items():
            if weights.get(name, 0) > 0 and len(source) == 0:
                raise ValueError(f"source {name!r} is empty but has weight {weights[name]}")
        self.sources, self.weights = sources, {k: v for k, v in weights.items() if v > 0}
        self.num_samples, self.seed = num_samples, seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict:
        return self.item_at_step(index, None)

    def item_at_step(self, index: int, step: int | None) -> dict:
        """Item `index` as read at training step `step` (None: outside training): each source's own
        `item_at_step`, where it has one."""
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for a mixture of {self.num_samples} samples")
        rng = sample_rng(self.seed, index, "mixture")
        name = weighted_choice(rng, self.weights)
        source = self.sources[name]
        return {**item_at_step(source, rng.randrange(len(source)), step), "source": name}
