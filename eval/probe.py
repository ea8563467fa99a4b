"""Probes of image features, independent of the LLM: what a feature map carries, and how fast VQA is learned from it.

    python -m eval.probe cells                                   # shape / colour per grid cell, every feature source
    python -m eval.probe cells --features joint,raw --heads conv
    python -m eval.probe vqa --features raw --minutes 20         # a purpose-built VQA classifier, its learning curve
    python -m eval.probe study --levers base,curriculum          # the recipe study: one lever at a time, curves

Feature sources (``--features``), each a token sequence ``[B, S², C]`` on the tokenizer's ``S×S`` grid:

- ``semantic`` / ``joint``: the tokenizer's quantized features f̂ (32-d semantic half / all 40 dims), exactly what
  the LLM's understanding projector reads;
- ``prequant``: the semantic half before quantization (what the codebook loses);
- ``raw``: the image's own RGB patches (``(H/S)² · 3`` values per slot), a control that needs no tokenizer;
- ``oracle`` (vqa and study only): ideal features read from the scene, a one-hot of the shape and of the colour of
  the object in each slot's 3×3 cell (zeros where the cell is empty), the upper reference for any tokenizer.

``cells`` trains a small head per source to read the shape and the colour of the object in each of ShapesWorld's
3×3 cells (empty cells included) and reports accuracy over the objects of held-out test scenes. The ``slot`` head
sees one slot at a time (1×1 convolutions, then an average over the cell's slots), as the LLM's projector does; the
``conv`` head may combine neighbouring slots (two 3×3 convolutions).

``vqa`` trains a small transformer over the projected slots (plus 2-D slot positions), the question's words and a
readout token whose output classifies the answer, and records test accuracy per question type along the way. With
the defaults (bidirectional attention, whole answers as classes, absolute 2-D slot positions) it is the easiest
setting a transformer gets for ShapesWorld VQA; its curve is a reference for what an LLM of similar size can expect
to learn from the same features in the same number of steps. Every lever of the recipe (`Recipe`: learning rate and
warm-up, batch, width, depth, slot positions, question order, causal attention, a dense per-slot description loss,
a curriculum over objects per scene, the balance of question types, fresh scenes every batch) is a flag.

``study`` trains one run per feature source and lever of `LEVERS` (each one change against a base recipe), saves
each to ``<output-dir>/runs/`` (runs already there are read back, so a study can be split over several commands or
resumed) and writes every saved run's curve to ``curves.csv`` and ``curves.png``.

Each kind writes ``probe_<kind>.json`` and ``probe_<kind>.md`` to ``--output-dir`` (default ``eval_outputs/probe``).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from eval.reconstruction import from_images
from llm.configuration_tokenflow_mllm import UNDERSTANDING_PROJECTOR_TYPES
from llm.modeling_tokenflow_mllm import build_projector, sincos_2d, slot_label_loss
from tokenizer import TokenFlowTokenizer
from tokenizer.quantizer import map_to_tokens
from unimodal.cli import run_main
from unimodal.shapesworld import ShapesWorld, curriculum_max_objects
from unimodal.shapesworld.labels import SLOT_LABEL_CLASSES, cell_labels, slot_cells, slot_description
from unimodal.shapesworld.language import ANSWER_VOCAB, QUESTION_TYPES, check_question_types
from unimodal.shapesworld.world import COLORS, GRID, MAX_OBJECTS, SHAPES

IMAGE_SOURCES = ("semantic", "joint", "prequant", "raw")
FEATURE_SOURCES = (*IMAGE_SOURCES, "oracle")
CELL_HEADS = ("slot", "conv")
DEFAULT_TOKENIZER = str(Path(__file__).resolve().parent.parent / "tokenizer" / "pretrained" / "shapesworld-tiny")
COLOR_NAMES = tuple(COLORS)


# ------------------------------------------------------------------------------------------------ data

def render_split(split: str, num: int, size: int, seed: int = 0) -> tuple[torch.Tensor, list]:
    """ShapesWorld `split` → (images [num, 3, size, size] in [-1, 1], the samples)."""
    world = ShapesWorld(split, size=size, num_samples=num, seed=seed)
    samples = [world[i] for i in range(num)]
    return from_images([s.image for s in samples]) * 2 - 1, samples


@torch.no_grad()
def extract_features(images: torch.Tensor, source: str, tokenizer=None, grid: int | None = None,
                     batch_size: int = 200) -> torch.Tensor:
    """Images [B, 3, H, W] in [-1, 1] → features [B, S², C] of `source` (see the module docstring), raster order.

    `grid` (S) is the tokenizer's when one is given; `raw` alone needs only `grid`."""
    if source not in IMAGE_SOURCES:
        raise ValueError(f"image feature source {source!r}; allowed: {IMAGE_SOURCES}")
    if source == "raw":
        grid = tokenizer.config.grid_size if tokenizer is not None else grid
        if grid is None or images.shape[-1] % grid:
            raise ValueError(f"raw patches need a grid side dividing the image side {images.shape[-1]}, got {grid}")
        return F.pixel_unshuffle(images, images.shape[-1] // grid).flatten(2).transpose(1, 2)
    if tokenizer is None:
        raise ValueError(f"feature source {source!r} needs a tokenizer")
    semantic_dim = tokenizer.config.semantic_code_dim
    chunks = []
    for start in range(0, len(images), batch_size):
        encoded = tokenizer.encode(images[start:start + batch_size])
        maps = {"semantic": encoded.features[:, :semantic_dim], "joint": encoded.features,
                "prequant": encoded.pre_quant[:, :semantic_dim]}[source]
        chunks.append(map_to_tokens(maps))
    return torch.cat(chunks)


def cell_targets(scene) -> torch.Tensor:
    """[2, GRID²]: shape index + 1 and colour index + 1 of the object in each cell, 0 where the cell is empty."""
    return cell_labels(scene)[:2]


def oracle_features(scenes: list, side: int) -> torch.Tensor:
    """Ideal features [B, side², #shapes + #colours]: each slot holds a one-hot of the shape and of the colour of
    the object in its cell (see `slot_cells`), zeros where the cell is empty."""
    targets = torch.stack([cell_targets(scene) for scene in scenes])[:, :, slot_cells(side)]  # [B, 2, side²]
    shape = F.one_hot(targets[:, 0], 1 + len(SHAPES))[..., 1:]
    colour = F.one_hot(targets[:, 1], 1 + len(COLOR_NAMES))[..., 1:]
    return torch.cat([shape, colour], -1).float()


def features_of(samples: list, source: str, tokenizer=None, grid: int | None = None) -> torch.Tensor:
    """ShapesWorld samples → features [B, S², C] of `source`: `oracle` from the scenes, the rest from the images."""
    if source == "oracle":
        return oracle_features([s.scene for s in samples], tokenizer.config.grid_size if tokenizer else grid)
    return extract_features(from_images([s.image for s in samples]) * 2 - 1, source, tokenizer, grid)


def standardiser(train: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Per-channel standardisation with the statistics of the training features `train` [B, S², C]."""
    mean, std = train.mean((0, 1), keepdim=True), train.std((0, 1), keepdim=True) + 1e-6
    return lambda x: (x - mean) / std


# ------------------------------------------------------------------------------------------------ cell probe

class CellProbe(nn.Module):
    """[B, S², C] → shape logits [B, GRID², 1 + #shapes] and colour logits [B, GRID², 1 + #colours]."""

    def __init__(self, in_dim: int, head: str, width: int = 128):
        super().__init__()
        if head not in CELL_HEADS:
            raise ValueError(f"cell head {head!r}; allowed: {CELL_HEADS}")
        kernel = 1 if head == "slot" else 3
        self.body = nn.Sequential(
            nn.Conv2d(in_dim, width, kernel, padding=kernel // 2), nn.GELU(),
            nn.Conv2d(width, width, kernel, padding=kernel // 2), nn.GELU(), nn.Conv2d(width, width, 1))
        self.shape_head = nn.Linear(width, 1 + len(SHAPES))
        self.colour_head = nn.Linear(width, 1 + len(COLOR_NAMES))

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        side = int(round(features.shape[1] ** 0.5))
        maps = features.transpose(1, 2).reshape(len(features), -1, side, side)
        cells = F.adaptive_avg_pool2d(self.body(maps), GRID).flatten(2).transpose(1, 2)  # [B, GRID², width]
        return self.shape_head(cells), self.colour_head(cells)


def train_cell_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                     head: str, steps: int = 800, batch_size: int = 128, lr: float = 2e-3, seed: int = 0) -> dict:
    """Train a `CellProbe`; accuracy of shape and colour over the objects (occupied cells) of the test set."""
    torch.manual_seed(seed)
    scale = standardiser(train_x)
    train_x, test_x = scale(train_x), scale(test_x)
    probe = CellProbe(train_x.shape[-1], head)
    optimizer = torch.optim.Adam(probe.parameters(), lr)
    for _ in range(steps):
        batch = torch.randint(0, len(train_x), (batch_size,))
        shape_logits, colour_logits = probe(train_x[batch])
        loss = (F.cross_entropy(shape_logits.flatten(0, 1), train_y[batch, 0].flatten())
                + F.cross_entropy(colour_logits.flatten(0, 1), train_y[batch, 1].flatten()))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        shape_logits, colour_logits = probe(test_x)
    occupied = test_y[:, 0] > 0
    return {"shape": float((shape_logits.argmax(-1) == test_y[:, 0])[occupied].float().mean()),
            "colour": float((colour_logits.argmax(-1) == test_y[:, 1])[occupied].float().mean()),
            "objects": int(occupied.sum()), "final_loss": float(loss.detach())}


# ------------------------------------------------------------------------------------------------ VQA probe

SLOT_POSITIONS = ("learned", "sincos")
ORDERS = ("image-first", "question-first")
ATTENTIONS = ("bidirectional", "causal")
BALANCES = ("natural", "uniform")
ENCODERS = ("torch", "llm")
UNKNOWN_WORD = "<unk>"


@dataclass
class Recipe:
    """How the VQA probe is trained; each field is one lever of the recipe study (see the README)."""

    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 0  # linear learning-rate warm-up steps
    hidden: int = 128
    layers: int = 4
    num_heads: int = 8
    slot_position: str = "sincos"  # fixed 2-D sin/cos or a learned table, either times position_scale
    position_scale: float = 1.0  # amplitude of the sin/cos table / init std of the learned one
    order: str = "image-first"  # where the question's words sit relative to the slots
    attention: str = "bidirectional"  # causal: each token sees only earlier ones, the readout token comes last
    describe_weight: float = 1.0  # weight of the dense per-slot description loss (shape, colour, cell of each slot)
    curriculum_steps: int = 300  # scenes with at most 1 + 3·step/curriculum_steps objects until then
    balance: str = "natural"  # uniform: every question type equally often
    question_types: tuple[str, ...] = QUESTION_TYPES  # types trained on (and tested on)
    fresh: bool = False  # new scenes every batch instead of the fixed training set
    projector: str = "mlp2x_gelu"  # the LLM's understanding projectors: each slot alone, or conv2x_gelu (3×3 grid)
    encoder: str = "torch"  # torch: nn.TransformerEncoder; llm: the LLM stages' decoder (Qwen2: RoPE, GQA, SwiGLU)
    rope_theta: float = 10000.0  # llm encoder: RoPE base (very large: rotations vanish, no 1-D positions)
    init_std: float = 0.02  # llm encoder: std of its linear layers' normal init (the backbones' initializer_range)

    def __post_init__(self) -> None:
        for name, allowed in (("slot_position", SLOT_POSITIONS), ("order", ORDERS), ("attention", ATTENTIONS),
                              ("balance", BALANCES), ("projector", UNDERSTANDING_PROJECTOR_TYPES),
                              ("encoder", ENCODERS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} {getattr(self, name)!r}; allowed: {', '.join(allowed)}")
        self.question_types = check_question_types(self.question_types)
        if self.encoder == "llm" and self.attention != "causal":
            raise ValueError("encoder 'llm' is the LLM's causal decoder: it needs attention 'causal'")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta {self.rope_theta!r} must be > 0")


def question_words(question: str) -> list[str]:
    return question.lower().replace("?", " ?").split()


class VQAProbe(nn.Module):
    """Transformer classifier: (features [B, S², C], word ids [B, Q]; 0 = pad) → answer logits [B, #answers] and
    per-slot description logits [B, S², 1 + #shapes + 1 + #colours + GRID²].

    The sequence is the projected slots (plus 2-D positions) and the question words in `recipe.order`, then one
    readout token whose output is classified."""

    def __init__(self, in_dim: int, num_slots: int, vocab_size: int, num_answers: int, max_words: int,
                 recipe: Recipe):
        super().__init__()
        hidden, side = recipe.hidden, int(round(num_slots ** 0.5))
        self.recipe = recipe
        self.project = build_projector(recipe.projector, in_dim, hidden)
        if recipe.slot_position == "learned":
            self.slot_position = nn.Parameter(torch.randn(num_slots, hidden) * recipe.position_scale)
        else:
            self.register_buffer("slot_position", sincos_2d(side, hidden) * recipe.position_scale, persistent=False)
        self.word_position = nn.Parameter(torch.randn(max_words, hidden) * 0.02)
        self.words = nn.Embedding(vocab_size, hidden, padding_idx=0)
        self.readout = nn.Parameter(torch.zeros(1, 1, hidden))
        if recipe.encoder == "llm":
            self.encoder = llm_decoder(hidden, recipe.layers, recipe.num_heads, recipe.rope_theta, recipe.init_std)
            self.norm = nn.Identity()  # the decoder ends in its own RMSNorm
        else:
            layer = nn.TransformerEncoderLayer(hidden, recipe.num_heads, 4 * hidden, dropout=0.0, batch_first=True,
                                               norm_first=True)
            self.encoder = nn.TransformerEncoder(layer, recipe.layers, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(hidden)
        self.answer_head = nn.Linear(hidden, num_answers)
        self.describe_head = nn.Linear(hidden, sum(SLOT_LABEL_CLASSES))

    def forward(self, features: torch.Tensor, word_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, num_slots = features.shape[:2]
        slots = self.project(features) + self.slot_position
        words = self.words(word_ids) + self.word_position[: word_ids.shape[1]]
        slot_pad = torch.zeros(batch, num_slots, dtype=torch.bool, device=features.device)
        parts = [(slots, slot_pad), (words, word_ids == 0)]
        if self.recipe.order == "question-first":
            parts.reverse()
        tokens = torch.cat([p[0] for p in parts] + [self.readout.expand(batch, -1, -1)], dim=1)
        padding = torch.cat([p[1] for p in parts] + [slot_pad[:, :1]], dim=1)
        if self.recipe.encoder == "llm":
            out = self.encoder(inputs_embeds=tokens, attention_mask=(~padding).long()).last_hidden_state
        else:
            causal = None
            if self.recipe.attention == "causal":
                causal = torch.ones(tokens.shape[1], tokens.shape[1], dtype=torch.bool, device=tokens.device).triu(1)
            out = self.norm(self.encoder(tokens, mask=causal, src_key_padding_mask=padding))
        slot_start = 0 if self.recipe.order == "image-first" else word_ids.shape[1]
        return self.answer_head(out[:, -1]), self.describe_head(out[:, slot_start: slot_start + num_slots])


def llm_decoder(hidden: int, layers: int, heads: int, rope_theta: float, init_std: float) -> nn.Module:
    """The LLM stages' decoder (Qwen2, as `llm.build.BACKBONE_SHAPES` names them: two query heads per key/value
    head, SwiGLU 3× wide, linear layers initialised N(0, init_std)), without its token embeddings."""
    from transformers import Qwen2Config, Qwen2Model

    config = Qwen2Config(vocab_size=1, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                         max_position_embeddings=512, rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
                         initializer_range=init_std, attn_implementation="sdpa")
    return Qwen2Model(config)


def describe_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the per-slot description (`slot_description`), see `llm.modeling_tokenflow_mllm.slot_label_loss`."""
    return slot_label_loss(logits, targets, SLOT_LABEL_CLASSES)


class QuestionSet:
    """Every (image index, question, answer, type) of each split, with word and answer vocabularies shared by
    splits. Answers are every answer the world can give; a word no split contains maps to `<unk>` (fresh scenes)."""

    def __init__(self, samples_by_split: dict[str, list], max_words: int = 16,
                 question_types: tuple[str, ...] = QUESTION_TYPES):
        self.question_types = question_types
        self.rows = {split: self.rows_of(samples) for split, samples in samples_by_split.items()}
        every = [row for rows in self.rows.values() for row in rows]
        known = sorted({w for _, q, _, _ in every for w in question_words(q)})
        self.words = {w: i + 1 for i, w in enumerate([UNKNOWN_WORD] + known)}
        self.answers = {a: i for i, a in enumerate(sorted({a for t in QUESTION_TYPES for a in ANSWER_VOCAB[t]}))}
        self.max_words = max_words

    def rows_of(self, samples: list) -> list[tuple[int, str, str, str]]:
        return [(i, qa.question, qa.answer, qa.type) for i, s in enumerate(samples) for qa in s.vqa
                if qa.type in self.question_types]

    def encode(self, rows: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """rows → (image indices [n], word ids [n, max_words], answer ids [n])."""
        words = torch.zeros(len(rows), self.max_words, dtype=torch.long)
        unknown = self.words[UNKNOWN_WORD]
        for r, (_, question, _, _) in enumerate(rows):
            ids = [self.words.get(w, unknown) for w in question_words(question)]
            if len(ids) > self.max_words:
                raise ValueError(f"question {question!r} has {len(ids)} words; the probe takes {self.max_words}")
            words[r, : len(ids)] = torch.tensor(ids)
        return (torch.tensor([i for i, *_ in rows]), words, torch.tensor([self.answers[a] for _, _, a, _ in rows]))


class TrainingStream:
    """Batches of training questions as `recipe` draws them: from the fixed training scenes or from fresh ones,
    with the curriculum's cap on objects per scene and the balance of question types.

    `batch(step)` → (features [B, S², C], word ids [B, Q], answer ids [B], description targets [B, 3, S²])."""

    def __init__(self, features: torch.Tensor, samples: list, questions: QuestionSet, recipe: Recipe,
                 make_features: Callable[[list], torch.Tensor], num_slots: int, seed: int = 0):
        self.features, self.samples, self.questions, self.recipe = features, samples, questions, recipe
        self.make_features, self.rng = make_features, random.Random(seed)
        self.side = int(round(num_slots ** 0.5))
        self.world = ShapesWorld("train", size=samples[0].image.width, num_samples=2**31, seed=seed)
        self.next_fresh = len(samples)  # fresh scenes continue after the fixed ones
        self.by_cap_and_type = {(cap, kind): [r for r in questions.rows["train"]
                                              if r[3] == kind and len(samples[r[0]].scene.objects) <= cap]
                                for cap in range(1, MAX_OBJECTS + 1) for kind in questions.question_types}

    def object_cap(self, step: int) -> int:
        return curriculum_max_objects(step, self.recipe.curriculum_steps)

    def pick(self, rows_by_type: dict[str, list]) -> tuple:
        kinds = [k for k, rows in rows_by_type.items() if rows]
        weights = [1 if self.recipe.balance == "uniform" else len(rows_by_type[k]) for k in kinds]
        return self.rng.choice(rows_by_type[self.rng.choices(kinds, weights)[0]])

    def batch(self, step: int):
        cap = self.object_cap(step)
        if self.recipe.fresh:
            samples, rows = [], []
            while len(rows) < self.recipe.batch_size:
                sample = self.world[self.next_fresh]
                self.next_fresh += 1
                by_type = {k: [] for k in self.questions.question_types}
                for row in self.questions.rows_of([sample]):
                    by_type[row[3]].append((len(samples), *row[1:]))
                if len(sample.scene.objects) <= cap and any(by_type.values()):
                    rows.append(self.pick(by_type))
                    samples.append(sample)
            features = self.make_features(samples)
        else:
            by_type = {k: self.by_cap_and_type[cap, k] for k in self.questions.question_types}
            if not any(by_type.values()):
                raise ValueError(f"no training scene with at most {cap} object(s) holds a question of the types "
                                 f"{self.questions.question_types}: use more --num-train scenes or no curriculum")
            rows = [self.pick(by_type) for _ in range(self.recipe.batch_size)]
            samples, features = self.samples, self.features
        images, words, answers = self.questions.encode(rows)
        targets = torch.stack([slot_description(samples[i].scene, self.side) for i in images.tolist()])
        return features[images], words, answers, targets


@torch.no_grad()
def vqa_accuracy(probe: VQAProbe, features: torch.Tensor, questions: QuestionSet, rows: list,
                 batch_size: int = 256) -> dict:
    probe.eval()
    right: dict[str, list[bool]] = {}
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        images, words, answers = questions.encode(chunk)
        predictions = probe(features[images], words)[0].argmax(-1)
        for (_, _, _, kind), ok in zip(chunk, (predictions == answers).tolist()):
            right.setdefault(kind, []).append(ok)
    probe.train()
    every = [ok for oks in right.values() for ok in oks]
    return {"accuracy": sum(every) / len(every),
            "per_type": {kind: sum(right[kind]) / len(right[kind]) for kind in QUESTION_TYPES if kind in right}}


def train_vqa_probe(stream: TrainingStream, test_x: torch.Tensor, max_steps: int, max_minutes: float | None = None,
                    eval_every: int = 250, seed: int = 0, progress: bool = True) -> dict:
    """Train a `VQAProbe` on `stream`'s batches for `max_steps` (or until `max_minutes`); test accuracy per type
    every `eval_every` steps and at the end. Features must be standardised already (see `standardiser`)."""
    torch.manual_seed(seed)
    recipe, questions = stream.recipe, stream.questions
    probe = VQAProbe(test_x.shape[-1], test_x.shape[1], len(questions.words) + 1, len(questions.answers),
                     questions.max_words, recipe)
    optimizer = torch.optim.AdamW(probe.parameters(), recipe.lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (recipe.warmup + 1)))
    test_rows = questions.rows["test"]
    curve, start, step, loss = [], time.time(), 0, None
    bar = tqdm(total=max_steps if max_minutes is None else None, desc="vqa probe", disable=not progress,
               dynamic_ncols=True)

    def record() -> None:
        curve.append({"step": step, "seconds": round(time.time() - start, 1),
                      "train_loss": float(loss.detach()) if loss is not None else None,
                      **vqa_accuracy(probe, test_x, questions, test_rows)})

    while step < max_steps and (max_minutes is None or time.time() - start < 60 * max_minutes):
        features, words, answers, targets = stream.batch(step)
        answer_logits, describe_logits = probe(features, words)
        loss = F.cross_entropy(answer_logits, answers)
        if recipe.describe_weight:
            loss = loss + recipe.describe_weight * describe_loss(describe_logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        warmup.step()
        step += 1
        bar.update()
        if step % eval_every == 0:
            record()
            bar.set_postfix(acc=f"{curve[-1]['accuracy']:.3f}")
    bar.close()
    if not curve or curve[-1]["step"] != step:
        record()
    return {"steps": step, "seconds": curve[-1]["seconds"], "final": curve[-1], "curve": curve, "probe": probe}


# ------------------------------------------------------------------------------------------------ recipe study

# One lever changed at a time against the study's base recipe (`Recipe()` less the winning levers it combines, so
# that the study reproduces after its winners became the defaults); `base` is that recipe itself, `defaults` is
# `Recipe()` and `learned-0.02` the slot positions the probe had before the study (a learned table at std 0.02).
# `defaults+<lever>` changes that lever on top of the defaults instead (the next lever after the current winners).
STUDY_BASE: dict = {"describe_weight": 0.0, "curriculum_steps": 0}
LEVERS: dict[str, dict] = {
    "base": {},
    "defaults": {},
    "learned-0.02": {"slot_position": "learned", "position_scale": 0.02},
    "learned-1": {"slot_position": "learned", "position_scale": 1.0},
    "lr-3e-4": {"lr": 3e-4},
    "lr-3e-3-warmup": {"lr": 3e-3, "warmup": 100},
    "batch-64": {"batch_size": 64},
    "width-256": {"hidden": 256},
    "depth-2": {"layers": 2},
    "curriculum": {"curriculum_steps": 300},
    "question-first-causal": {"order": "question-first", "attention": "causal"},
    "image-first-causal": {"attention": "causal"},
    "describe": {"describe_weight": 1.0},
    "balanced": {"balance": "uniform"},
    "fresh": {"fresh": True},
    "conv-projector": {"projector": "conv2x_gelu"},
    "llm-decoder": {"encoder": "llm", "attention": "causal", "num_heads": 4},
    "llm-decoder-no-rope": {"encoder": "llm", "attention": "causal", "num_heads": 4, "rope_theta": 1e12},
    "llm-decoder-8-heads": {"encoder": "llm", "attention": "causal", "num_heads": 8},
    "llm-decoder-init-0.088": {"encoder": "llm", "attention": "causal", "num_heads": 4, "init_std": 0.088},
}
ON_DEFAULTS = "defaults+"


def lever_overrides(lever: str | None) -> dict:
    """Recipe fields that `lever` (None: the flags alone) changes, see `LEVERS`."""
    if lever in (None, "defaults"):
        return {}
    if lever.startswith(ON_DEFAULTS):
        return dict(LEVERS[lever.removeprefix(ON_DEFAULTS)])
    return {**STUDY_BASE, **LEVERS[lever]}


def known_lever(lever: str) -> bool:
    return lever.removeprefix(ON_DEFAULTS) in LEVERS


CURVE_COLUMNS = ("source", "lever", "step", "seconds", "accuracy", *QUESTION_TYPES)


def curve_rows(source: str, lever: str, run: dict) -> list[dict]:
    return [{"source": source, "lever": lever, "step": c["step"], "seconds": c["seconds"],
             "accuracy": round(c["accuracy"], 4),
             **{k: round(c["per_type"][k], 4) if k in c["per_type"] else "" for k in QUESTION_TYPES}}
            for c in run["curve"]]


def write_curves(rows: list[dict], out_dir: Path, title: str) -> None:
    """`curves.csv` (one row per evaluation) and `curves.png` (accuracy, position and relation against steps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(out_dir / "curves.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, CURVE_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    panels = ("accuracy", "position", "relation")
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), sharey=True)
    runs = sorted({(r["source"], r["lever"]) for r in rows})
    for ax, column in zip(axes, panels):
        for source, lever in runs:
            points = [(r["step"], r[column]) for r in rows
                      if (r["source"], r["lever"]) == (source, lever) and r[column] != ""]
            if points:
                ax.plot(*zip(*points), marker=".", label=f"{source}/{lever}",
                        linestyle="-" if source == "oracle" else "--")
        ax.set_title(f"{title}: {column}")
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy")
    axes[-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(out_dir / "curves.png", dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ command line

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = Recipe()
    p = argparse.ArgumentParser(prog="python -m eval.probe", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=("cells", "vqa", "study"))
    p.add_argument("--tokenizer", default=DEFAULT_TOKENIZER, help="TokenFlowTokenizer folder (default: shipped)")
    p.add_argument("--features", default=None, help=f"comma-separated sources from {', '.join(FEATURE_SOURCES)} "
                   "(default: every image source for cells, raw for vqa, oracle for study)")
    p.add_argument("--heads", default="slot,conv", help="cells: comma-separated heads from slot, conv")
    p.add_argument("--levers", default=",".join(LEVERS), help="study: comma-separated levers from LEVERS")
    p.add_argument("--num-train", type=int, default=4000, help="ShapesWorld train scenes")
    p.add_argument("--num-test", type=int, default=500, help="ShapesWorld test scenes")
    p.add_argument("--image-size", type=int, default=None, help="default: the tokenizer's")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps (default: 800 cells, 1000 study; vqa: until --minutes)")
    p.add_argument("--minutes", type=float, default=None,
                   help="vqa: stop after this much training time (default 8 when --steps is not given)")
    p.add_argument("--batch-size", type=int, default=None, help=f"default: 128 cells, {defaults.batch_size} vqa")
    p.add_argument("--lr", type=float, default=None, help=f"default: 2e-3 cells, {defaults.lr} vqa")
    p.add_argument("--eval-every", type=int, default=250, help="vqa: test accuracy every N steps")
    recipe = p.add_argument_group("vqa recipe (defaults: the recipe study's winner)")
    recipe.add_argument("--warmup", type=int, default=defaults.warmup, help="linear learning-rate warm-up steps")
    recipe.add_argument("--hidden", type=int, default=defaults.hidden, help="transformer width")
    recipe.add_argument("--layers", type=int, default=defaults.layers, help="transformer layers")
    recipe.add_argument("--slot-position", choices=SLOT_POSITIONS, default=defaults.slot_position)
    recipe.add_argument("--position-scale", type=float, default=defaults.position_scale,
                        help="init std of the learned slot positions / amplitude of the sin-cos ones")
    recipe.add_argument("--order", choices=ORDERS, default=defaults.order)
    recipe.add_argument("--attention", choices=ATTENTIONS, default=defaults.attention)
    recipe.add_argument("--describe-weight", type=float, default=defaults.describe_weight,
                        help="weight of the dense per-slot description loss (0: off)")
    recipe.add_argument("--curriculum-steps", type=int, default=defaults.curriculum_steps,
                        help="raise the objects per scene from 1 to 4 over these steps (0: off)")
    recipe.add_argument("--balance", choices=BALANCES, default=defaults.balance)
    recipe.add_argument("--question-types", default=",".join(defaults.question_types))
    recipe.add_argument("--fresh", action=argparse.BooleanOptionalAction, default=defaults.fresh,
                        help="new training scenes every batch instead of the --num-train fixed ones")
    recipe.add_argument("--encoder", choices=ENCODERS, default=defaults.encoder,
                        help="torch: nn.TransformerEncoder; llm: the LLM stages' Qwen2 decoder (causal only)")
    recipe.add_argument("--rope-theta", type=float, default=defaults.rope_theta,
                        help="llm encoder: RoPE base (1e12: practically no rotation)")
    recipe.add_argument("--init-std", type=float, default=defaults.init_std,
                        help="llm encoder: std of the normal init of its linear layers")
    recipe.add_argument("--projector", choices=UNDERSTANDING_PROJECTOR_TYPES, default=defaults.projector,
                        help="slot projector: the LLM's mlp2x_gelu (each slot alone) or conv2x_gelu (3x3 neighbours)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default="eval_outputs/probe")
    args = p.parse_args(argv)
    default_features = {"cells": ",".join(IMAGE_SOURCES), "vqa": "raw", "study": "oracle"}[args.kind]
    args.features = [f.strip() for f in (args.features or default_features).split(",") if f.strip()]
    args.heads = [h.strip() for h in args.heads.split(",") if h.strip()]
    args.levers = [v.strip() for v in args.levers.split(",") if v.strip()]
    args.question_types = tuple(t.strip() for t in args.question_types.split(",") if t.strip())
    allowed_features = IMAGE_SOURCES if args.kind == "cells" else FEATURE_SOURCES
    for name, values, allowed in (("--features", args.features, allowed_features), ("--heads", args.heads, CELL_HEADS),
                                  ("--question-types", args.question_types, QUESTION_TYPES)):
        unknown = [v for v in values if v not in allowed]
        if unknown or not values:
            p.error(f"{name} {values}: allowed {', '.join(allowed)}")
    if not args.levers or not all(known_lever(v) for v in args.levers):
        p.error(f"--levers {args.levers}: allowed {', '.join(LEVERS)}, each also as {ON_DEFAULTS}<lever>")
    if args.kind == "vqa" and args.minutes is None and args.steps is None:
        args.minutes = 8.0
    return args


def recipe_of(args: argparse.Namespace, **overrides) -> Recipe:
    fields = {f.name for f in dataclasses.fields(Recipe)}
    chosen = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    return Recipe(**{**chosen, **overrides})


def run_cells(args, features: dict, train_samples: list, test_samples: list) -> tuple[dict, list[str]]:
    train_y = torch.stack([cell_targets(s.scene) for s in train_samples])
    test_y = torch.stack([cell_targets(s.scene) for s in test_samples])
    results = {}
    for source, (train_x, test_x) in features.items():
        for head in args.heads:
            results[f"{source}/{head}"] = result = train_cell_probe(
                train_x, train_y, test_x, test_y, head, steps=args.steps or 800, batch_size=args.batch_size or 128,
                lr=args.lr or 2e-3, seed=args.seed)
            print(f"{source:9s} {head:5s} shape {result['shape']:.3f}  colour {result['colour']:.3f}", flush=True)
    lines = [f"# Per-cell probe ({args.num_train} train / {args.num_test} test scenes, chance: shape "
             f"1/{len(SHAPES)}, colour 1/{len(COLOR_NAMES)})", "",
             "| features | head | shape | colour |", "|---|---|---:|---:|"]
    lines += [f"| {key.split('/')[0]} | {key.split('/')[1]} | {r['shape']:.3f} | {r['colour']:.3f} |"
              for key, r in results.items()]
    return results, lines


def curve_table(title: str, run: dict) -> list[str]:
    kinds = list(run["final"]["per_type"])
    lines = [f"## {title}", "", "| step | seconds | accuracy | " + " | ".join(kinds) + " |",
             "|---:|---:|---:|" + "---:|" * len(kinds)]
    lines += [f"| {c['step']} | {c['seconds']:.0f} | {c['accuracy']:.3f} | "
              + " | ".join(f"{c['per_type'].get(k, float('nan')):.2f}" for k in kinds) + " |" for c in run["curve"]]
    return lines + [""]


def run_vqa(args, features: dict, train_samples: list, test_samples: list, make_features) -> tuple[dict, list[str]]:
    """`vqa`: one run per source with the recipe of the flags; `study`: one run per source and lever, each saved to
    `<output-dir>/runs/<source>-<lever>.json` and skipped when already there, then the curves of every saved run."""
    questions = QuestionSet({"train": train_samples, "test": test_samples}, question_types=args.question_types)
    levers = args.levers if args.kind == "study" else [None]
    results, lines = {}, [f"# VQA probe ({args.num_train} train / {args.num_test} test scenes)", ""]
    runs_dir = Path(args.output_dir) / "runs"
    for source, (train_x, test_x) in features.items():
        for lever in levers:
            name = source if lever is None else f"{source}-{lever}"
            saved = runs_dir / f"{name}.json"
            if lever is not None and saved.exists():
                results[name] = json.loads(saved.read_text())
                continue
            recipe = recipe_of(args, **lever_overrides(lever))
            stream = TrainingStream(train_x, train_samples, questions, recipe, make_features[source],
                                    train_x.shape[1], seed=args.seed)
            run = train_vqa_probe(stream, test_x, max_steps=args.steps or (1000 if lever else 10**9),
                                  max_minutes=args.minutes, eval_every=args.eval_every, seed=args.seed)
            run.pop("probe")
            run.update(source=source, lever=lever or "flags", recipe=dataclasses.asdict(recipe))
            results[name] = run
            if lever is not None:
                runs_dir.mkdir(parents=True, exist_ok=True)
                saved.write_text(json.dumps(run, indent=2))
            print(f"{name}: {run['steps']} steps in {run['seconds']:.0f} s, test accuracy "
                  f"{run['final']['accuracy']:.3f} " + " ".join(f"{k} {v:.2f}" for k, v in
                                                               run["final"]["per_type"].items()), flush=True)
    if args.kind == "study":
        results = {p.stem: json.loads(p.read_text()) for p in sorted(runs_dir.glob("*.json"))}
        write_curves([row for run in results.values() for row in curve_rows(run["source"], run["lever"], run)],
                     Path(args.output_dir), "VQA probe")
    for name, run in results.items():
        lines += curve_table(f"{name} ({json.dumps(run['recipe'])})", run)
    return results, lines


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = None
    if any(f not in ("raw", "oracle") for f in args.features) or args.image_size is None:
        tokenizer = TokenFlowTokenizer.from_pretrained(args.tokenizer).eval()
    size = args.image_size or tokenizer.config.image_size
    grid = tokenizer.config.grid_size if tokenizer is not None else 8
    _, train_samples = render_split("train", args.num_train, size, args.seed)
    _, test_samples = render_split("test", args.num_test, size, args.seed)
    features, make_features = {}, {}
    for source in args.features:
        train_x, test_x = (features_of(s, source, tokenizer, grid) for s in (train_samples, test_samples))
        scale = standardiser(train_x)
        features[source] = (scale(train_x), scale(test_x))
        make_features[source] = (lambda samples, source=source, scale=scale:
                                 scale(features_of(samples, source, tokenizer, grid)))
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.kind == "cells":
        results, lines = run_cells(args, features, train_samples, test_samples)
    else:
        results, lines = run_vqa(args, features, train_samples, test_samples, make_features)
    settings = {k: v for k, v in vars(args).items() if k != "kind"}
    (out_dir / f"probe_{args.kind}.json").write_text(json.dumps({"settings": settings, "results": results}, indent=2))
    (out_dir / f"probe_{args.kind}.md").write_text("\n".join(lines) + "\n")
    print(f"-> {out_dir / f'probe_{args.kind}.md'}")
    return results


if __name__ == "__main__":
    run_main(main)
