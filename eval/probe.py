"""Probes of image features, independent of the LLM: what a feature map carries, and how fast VQA is learned from it.

    python -m eval.probe cells                                   # shape / colour per grid cell, every feature source
    python -m eval.probe cells --features joint,raw --heads conv
    python -m eval.probe vqa --features raw --minutes 20         # a purpose-built VQA classifier, its learning curve

Feature sources (``--features``), each a token sequence ``[B, S², C]`` on the tokenizer's ``S×S`` grid:

- ``semantic`` / ``joint``: the tokenizer's quantized features f̂ (32-d semantic half / all 40 dims), exactly what
  the LLM's understanding projector reads;
- ``prequant``: the semantic half before quantization (what the codebook loses);
- ``raw``: the image's own RGB patches (``(H/S)² · 3`` values per slot), a control that needs no tokenizer.

``cells`` trains a small head per source to read the shape and the colour of the object in each of ShapesWorld's
3×3 cells (empty cells included) and reports accuracy over the objects of held-out test scenes. The ``slot`` head
sees one slot at a time (1×1 convolutions, then an average over the cell's slots), as the LLM's projector does; the
``conv`` head may combine neighbouring slots (two 3×3 convolutions).

``vqa`` trains a 4-layer bidirectional transformer over ``[CLS, projected slots + learned 2-D positions, question
words]`` to classify the answer, the easiest setting a transformer gets for ShapesWorld VQA (whole answers as classes,
attention in both directions, absolute slot positions), and records test accuracy per question type along the way.
Its curve is a reference for what an LLM of similar size, which has none of these advantages, can expect to learn from
the same features in the same number of steps.

Both write ``probe_<kind>.json`` and ``probe_<kind>.md`` to ``--output-dir`` (default ``eval_outputs/probe``).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from eval.reconstruction import from_images
from tokenizer import TokenFlowTokenizer
from tokenizer.quantizer import map_to_tokens
from unimodal.cli import run_main
from unimodal.shapesworld import ShapesWorld
from unimodal.shapesworld.language import QUESTION_TYPES
from unimodal.shapesworld.world import COLORS, GRID, SHAPES

FEATURE_SOURCES = ("semantic", "joint", "prequant", "raw")
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
    if source not in FEATURE_SOURCES:
        raise ValueError(f"feature source {source!r}; allowed: {FEATURE_SOURCES}")
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
    target = torch.zeros(2, GRID * GRID, dtype=torch.long)
    for obj in scene.objects:
        target[0, obj.cell] = SHAPES.index(obj.shape) + 1
        target[1, obj.cell] = COLOR_NAMES.index(obj.color) + 1
    return target


def standardise(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """Per-channel standardisation with the training features' statistics."""
    mean, std = train.mean((0, 1), keepdim=True), train.std((0, 1), keepdim=True) + 1e-6
    return [(x - mean) / std for x in (train, *others)]


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
    train_x, test_x = standardise(train_x, test_x)
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

def question_words(question: str) -> list[str]:
    return question.lower().replace("?", " ?").split()


class VQAProbe(nn.Module):
    """Bidirectional transformer classifier: (features [B, S², C], word ids [B, Q]; 0 = pad) → answer logits."""

    def __init__(self, in_dim: int, num_slots: int, vocab_size: int, num_answers: int, max_words: int,
                 hidden: int = 256, layers: int = 4, heads: int = 8):
        super().__init__()
        self.project = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.slot_position = nn.Parameter(torch.randn(num_slots, hidden) * 0.02)
        self.word_position = nn.Parameter(torch.randn(max_words, hidden) * 0.02)
        self.words = nn.Embedding(vocab_size, hidden, padding_idx=0)
        self.cls = nn.Parameter(torch.zeros(1, 1, hidden))
        layer = nn.TransformerEncoderLayer(hidden, heads, 4 * hidden, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(hidden)
        self.answer_head = nn.Linear(hidden, num_answers)

    def forward(self, features: torch.Tensor, word_ids: torch.Tensor) -> torch.Tensor:
        batch = len(features)
        tokens = torch.cat([self.cls.expand(batch, -1, -1), self.project(features) + self.slot_position,
                            self.words(word_ids) + self.word_position[: word_ids.shape[1]]], dim=1)
        padding = torch.cat([torch.zeros(batch, 1 + features.shape[1], dtype=torch.bool, device=word_ids.device),
                             word_ids == 0], dim=1)
        return self.answer_head(self.norm(self.encoder(tokens, src_key_padding_mask=padding)[:, 0]))


class QuestionSet:
    """Every (image index, question, answer, type) of a split, with word and answer vocabularies shared by splits."""

    def __init__(self, samples_by_split: dict[str, list], max_words: int = 16):
        self.rows = {split: [(i, qa.question, qa.answer, qa.type) for i, s in enumerate(samples) for qa in s.vqa]
                     for split, samples in samples_by_split.items()}
        every = [row for rows in self.rows.values() for row in rows]
        self.words = {w: i + 1 for i, w in enumerate(sorted({w for _, q, _, _ in every for w in question_words(q)}))}
        self.answers = {a: i for i, a in enumerate(sorted({a for _, _, a, _ in every}))}
        self.max_words = max_words

    def encode(self, rows: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """rows → (image indices [n], word ids [n, max_words], answer ids [n])."""
        words = torch.zeros(len(rows), self.max_words, dtype=torch.long)
        for r, (_, question, _, _) in enumerate(rows):
            ids = [self.words[w] for w in question_words(question)]
            if len(ids) > self.max_words:
                raise ValueError(f"question {question!r} has {len(ids)} words; the probe takes {self.max_words}")
            words[r, : len(ids)] = torch.tensor(ids)
        return (torch.tensor([i for i, *_ in rows]), words, torch.tensor([self.answers[a] for _, _, a, _ in rows]))


@torch.no_grad()
def vqa_accuracy(probe: VQAProbe, features: torch.Tensor, questions: QuestionSet, rows: list,
                 batch_size: int = 256) -> dict:
    probe.eval()
    right: dict[str, list[bool]] = {}
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        images, words, answers = questions.encode(chunk)
        predictions = probe(features[images], words).argmax(-1)
        for (_, _, _, kind), ok in zip(chunk, (predictions == answers).tolist()):
            right.setdefault(kind, []).append(ok)
    probe.train()
    every = [ok for oks in right.values() for ok in oks]
    return {"accuracy": sum(every) / len(every),
            "per_type": {kind: sum(right[kind]) / len(right[kind]) for kind in QUESTION_TYPES if kind in right}}


def train_vqa_probe(train_x: torch.Tensor, test_x: torch.Tensor, questions: QuestionSet, max_steps: int,
                    max_minutes: float | None = None, batch_size: int = 32, lr: float = 1e-3, eval_every: int = 250,
                    hidden: int = 256, layers: int = 4, seed: int = 0, progress: bool = True) -> dict:
    """Train a `VQAProbe` on the train questions for `max_steps` (or until `max_minutes`); test accuracy per type
    every `eval_every` steps and at the end."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    train_x, test_x = standardise(train_x, test_x)
    probe = VQAProbe(train_x.shape[-1], train_x.shape[1], len(questions.words) + 1, len(questions.answers),
                     questions.max_words, hidden=hidden, layers=layers)
    optimizer = torch.optim.AdamW(probe.parameters(), lr, betas=(0.9, 0.95), weight_decay=0.0)
    train_rows, test_rows = questions.rows["train"], questions.rows["test"]
    curve, start, step, loss = [], time.time(), 0, None
    bar = tqdm(total=max_steps if max_minutes is None else None, desc="vqa probe", disable=not progress,
               dynamic_ncols=True)
    while step < max_steps and (max_minutes is None or time.time() - start < 60 * max_minutes):
        images, words, answers = questions.encode(rng.sample(train_rows, batch_size))
        loss = F.cross_entropy(probe(train_x[images], words), answers)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        bar.update()
        if step % eval_every == 0:
            curve.append({"step": step, "seconds": round(time.time() - start, 1), "train_loss": float(loss.detach()),
                          **vqa_accuracy(probe, test_x, questions, test_rows)})
            bar.set_postfix(acc=f"{curve[-1]['accuracy']:.3f}")
    bar.close()
    if not curve or curve[-1]["step"] != step:
        curve.append({"step": step, "seconds": round(time.time() - start, 1),
                      "train_loss": float(loss.detach()) if loss is not None else None,
                      **vqa_accuracy(probe, test_x, questions, test_rows)})
    return {"steps": step, "seconds": curve[-1]["seconds"], "final": curve[-1], "curve": curve, "probe": probe}


# ------------------------------------------------------------------------------------------------ command line

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m eval.probe", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=("cells", "vqa"))
    p.add_argument("--tokenizer", default=DEFAULT_TOKENIZER, help="TokenFlowTokenizer folder (default: shipped)")
    p.add_argument("--features", default=None,
                   help=f"comma-separated sources from {', '.join(FEATURE_SOURCES)} (default: all for cells, raw for vqa)")
    p.add_argument("--heads", default="slot,conv", help="cells: comma-separated heads from slot, conv")
    p.add_argument("--num-train", type=int, default=4000, help="ShapesWorld train scenes")
    p.add_argument("--num-test", type=int, default=500, help="ShapesWorld test scenes")
    p.add_argument("--image-size", type=int, default=None, help="default: the tokenizer's")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: 800 cells; vqa: until --minutes)")
    p.add_argument("--minutes", type=float, default=None,
                   help="vqa: stop after this much training time (default 8 when --steps is not given)")
    p.add_argument("--batch-size", type=int, default=None, help="default: 128 cells, 32 vqa")
    p.add_argument("--lr", type=float, default=None, help="default: 2e-3 cells, 1e-3 vqa")
    p.add_argument("--eval-every", type=int, default=250, help="vqa: test accuracy every N steps")
    p.add_argument("--hidden", type=int, default=256, help="vqa: transformer width")
    p.add_argument("--layers", type=int, default=4, help="vqa: transformer layers")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default="eval_outputs/probe")
    args = p.parse_args(argv)
    default_features = ",".join(FEATURE_SOURCES) if args.kind == "cells" else "raw"
    args.features = [f.strip() for f in (args.features or default_features).split(",") if f.strip()]
    args.heads = [h.strip() for h in args.heads.split(",") if h.strip()]
    for name, values, allowed in (("--features", args.features, FEATURE_SOURCES), ("--heads", args.heads, CELL_HEADS)):
        unknown = [v for v in values if v not in allowed]
        if unknown or not values:
            p.error(f"{name} {values}: allowed {', '.join(allowed)}")
    if args.kind == "vqa" and args.minutes is None and args.steps is None:
        args.minutes = 8.0
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = None
    if any(f != "raw" for f in args.features) or args.image_size is None:
        tokenizer = TokenFlowTokenizer.from_pretrained(args.tokenizer).eval()
    size = args.image_size or tokenizer.config.image_size
    grid = tokenizer.config.grid_size if tokenizer is not None else 8
    train_images, train_samples = render_split("train", args.num_train, size, args.seed)
    test_images, test_samples = render_split("test", args.num_test, size, args.seed)
    features = {source: (extract_features(train_images, source, tokenizer, grid),
                         extract_features(test_images, source, tokenizer, grid)) for source in args.features}
    settings = {k: v for k, v in vars(args).items() if k != "kind"}
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    if args.kind == "cells":
        train_y = torch.stack([cell_targets(s.scene) for s in train_samples])
        test_y = torch.stack([cell_targets(s.scene) for s in test_samples])
        results = {}
        for source, (train_x, test_x) in features.items():
            for head in args.heads:
                results[f"{source}/{head}"] = train_cell_probe(
                    train_x, train_y, test_x, test_y, head, steps=args.steps or 800, batch_size=args.batch_size or 128,
                    lr=args.lr or 2e-3, seed=args.seed)
                print(f"{source:9s} {head:5s} shape {results[f'{source}/{head}']['shape']:.3f}  "
                      f"colour {results[f'{source}/{head}']['colour']:.3f}", flush=True)
        lines = [f"# Per-cell probe ({args.num_train} train / {args.num_test} test scenes, chance: shape "
                 f"1/{len(SHAPES)}, colour 1/{len(COLOR_NAMES)})", "",
                 "| features | head | shape | colour |", "|---|---|---:|---:|"]
        lines += [f"| {key.split('/')[0]} | {key.split('/')[1]} | {r['shape']:.3f} | {r['colour']:.3f} |"
                  for key, r in results.items()]
    else:
        questions = QuestionSet({"train": train_samples, "test": test_samples})
        results = {}
        for source, (train_x, test_x) in features.items():
            run = train_vqa_probe(train_x, test_x, questions, max_steps=args.steps or 10**9,
                                  max_minutes=args.minutes, batch_size=args.batch_size or 32, lr=args.lr or 1e-3,
                                  eval_every=args.eval_every, hidden=args.hidden, layers=args.layers, seed=args.seed)
            run.pop("probe")
            results[source] = run
            final = run["final"]
            print(f"{source}: {run['steps']} steps in {run['seconds']:.0f} s, test accuracy {final['accuracy']:.3f} "
                  + " ".join(f"{k} {v:.2f}" for k, v in final["per_type"].items()), flush=True)
        lines = [f"# VQA probe ({args.num_train} train / {args.num_test} test scenes, batch {args.batch_size or 32}, "
                 f"{args.layers} layers × {args.hidden})", ""]
        for source, run in results.items():
            kinds = list(run["final"]["per_type"])
            lines += [f"## {source}", "", "| step | seconds | accuracy | " + " | ".join(kinds) + " |",
                      "|---:|---:|---:|" + "---:|" * len(kinds)]
            lines += [f"| {c['step']} | {c['seconds']:.0f} | {c['accuracy']:.3f} | "
                      + " | ".join(f"{c['per_type'].get(k, float('nan')):.2f}" for k in kinds) + " |"
                      for c in run["curve"]]
            lines.append("")
    (out_dir / f"probe_{args.kind}.json").write_text(json.dumps({"settings": settings, "results": results}, indent=2))
    (out_dir / f"probe_{args.kind}.md").write_text("\n".join(lines) + "\n")
    print(f"-> {out_dir / f'probe_{args.kind}.md'}")
    return results


if __name__ == "__main__":
    run_main(main)
