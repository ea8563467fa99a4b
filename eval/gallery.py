"""The README gallery from a checkpoint folder, made by code: what the model draws and answers on held-out
ShapesWorld data, coarse to fine, and how its tokenizer reconstructs.

    python -m eval.gallery --model DIR [--output-dir DIR] [--num-drawn 12 --num-vqa 8 --num-recon 8 --seed 0]

Writes into --output-dir (default <model>/eval/gallery; the figures come from the report card's own pieces: `eval.report.image_grid` and
`progressive_strip`, `eval.t2i.draw_prompts` graded by ShapesEval, `eval.vqa.run`):
    drawn.png             held-out ShapesPrompts drawn, each under its prompt (✓ / ✗: ShapesEval's verdict)
    coarse_to_fine.png    the first drawings decoded after each scale, 1×1 to the full grid
    vqa.png, vqa.md       held-out test images with a question, the model's answer and the ground truth
    reconstructions.png   held-out test scenes (top) and the checkpoint tokenizer's reconstructions (bottom, PSNR)
    gallery.md            the figures with the command that made them, ready to place under the README
Same checkpoint and arguments, same gallery (greedy answers, seeded drawing).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

from eval import t2i, vqa
from eval.metrics import psnr
from eval.report import image_grid, progressive_strip
from unimodal.shapesworld import ShapesEval, ShapesWorld

FIGURES = ("drawn.png", "coarse_to_fine.png", "vqa.png", "reconstructions.png")


def draw(model, processor, out: Path, num_drawn: int, seed: int) -> None:
    """drawn.png and coarse_to_fine.png (the first four drawings)."""
    metadata = t2i.shapes_prompt_metadata(num_drawn, "test")
    drawn = t2i.draw_prompts(model, processor, metadata, seed=seed, grader=ShapesEval())
    verdicts = {g["index"]: g["correct"] for g in drawn["grades"]}
    image_grid([images[0] for images in drawn["images"]],
               [("✓ " if verdicts[i] else "✗ ") + m["prompt"] for i, m in enumerate(metadata)], out / "drawn.png")
    strip = range(min(4, num_drawn))
    progressive_strip(model, torch.stack([drawn["indices"][i][0] for i in strip]),
                      [metadata[i]["prompt"] for i in strip], out / "coarse_to_fine.png")


def answer(model, processor, out: Path, num_vqa: int) -> list[dict]:
    """vqa.png and vqa.md: the first question of each of the first `num_vqa` test images."""
    questions, seen = [], set()
    for question in vqa.shapesworld_questions(6 * num_vqa, "test", model.config.tokenizer_config.image_size):
        if question.image_id not in seen and len(questions) < num_vqa:
            seen.add(question.image_id)
            questions.append(question)
    _, records = vqa.run(model, processor, questions, vqa.SHAPESWORLD_RULE,
                         max_new_tokens=vqa.SHAPESWORLD_MAX_NEW_TOKENS)
    titles = [f"{r['question']} — model: {_short(r['reply'])} {'✓' if r['score'] else '✗'} — truth: "
              f"{r['answers'][0]}" for r in records]
    image_grid([q.image for q in questions], titles, out / "vqa.png", columns=4, title_width=30)
    lines = ["| image | question | model's answer | ground truth |", "|---|---|---|---|"]
    lines += [f"| {r['image_id']} | {r['question']} | {r['reply']} {'✓' if r['score'] else '✗'} | {r['answers'][0]} |"
              for r in records]
    (out / "vqa.md").write_text("\n".join(lines) + "\n")
    return records


def _short(reply: str, width: int = 16) -> str:
    """A reply as a figure title shows it (the markdown table keeps it whole)."""
    return "(nothing)" if not reply else reply if len(reply) <= width else reply[: width - 1] + "…"


@torch.no_grad()
def reconstruct(model, out: Path, num_recon: int) -> None:
    """reconstructions.png: test scenes and their reconstructions from all scales of the checkpoint's tokenizer."""
    tokenizer = model.image_tokenizer
    world = ShapesWorld("test", size=tokenizer.config.image_size, num_samples=num_recon)
    originals = [world[i].image for i in range(num_recon)]
    pixels = tokenizer.image_processor(originals, return_tensors="pt")["pixel_values"].to(model.device)
    decoded = tokenizer.decode_indices(tokenizer.encode(pixels).indices).clamp(-1, 1)
    scores = psnr(decoded.float() * 0.5 + 0.5, pixels.float() * 0.5 + 0.5).tolist()
    image_grid(originals + tokenizer.image_processor.postprocess(decoded),
               [f"test scene {i}" for i in range(num_recon)] + [f"{s:.1f} dB" for s in scores],
               out / "reconstructions.png", columns=num_recon)


def gallery_markdown(command: str) -> str:
    return "\n".join([
        f"Made by `{command}` (held-out ShapesWorld test data).", "",
        "Drawn from held-out prompts (✓: ShapesEval finds what the prompt asks for):", "", "![drawn](drawn.png)", "",
        "Coarse to fine: each column decodes one more scale of the drawn indices:", "",
        "![coarse to fine](coarse_to_fine.png)", "",
        "Questions about held-out images, the model's answer and the truth (also as a table in `vqa.md`):", "",
        "![vqa](vqa.png)", "",
        "The tokenizer's reconstructions of held-out scenes (top: input, bottom: decoded from all scales):", "",
        "![reconstructions](reconstructions.png)", ""])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m eval.gallery", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a TokenFlowMLLM checkpoint folder")
    vqa.add_model_arguments(p, "gallery")
    for name, default, what in (("drawn", 12, "held-out prompts drawn"),
                                ("vqa", 8, "held-out images asked about (one question each)"),
                                ("recon", 8, "held-out scenes reconstructed")):
        p.add_argument(f"--num-{name}", type=int, default=default, help=what)
    p.add_argument("--seed", type=int, default=0, help="drawing seed (prompt i gets seed + i)")
    args = p.parse_args(argv)
    for name in ("num_drawn", "num_vqa", "num_recon"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    args.output_dir = args.output_dir or str(Path(args.model) / "eval" / "gallery")
    return args


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    model, processor = vqa.load_model(args.model, args.device, args.dtype)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    draw(model, processor, out, args.num_drawn, args.seed)
    answer(model, processor, out, args.num_vqa)
    reconstruct(model, out, args.num_recon)
    command = shlex.join(["python", "-m", "eval.gallery", *(sys.argv[1:] if argv is None else argv)])
    (out / "gallery.md").write_text(gallery_markdown(command))
    print(f"gallery -> {out / 'gallery.md'}")
    return out


if __name__ == "__main__":
    main()
