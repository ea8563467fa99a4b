"""Report card: one command grades a checkpoint on understanding, drawing, reconstruction and speed.

    python -m eval.report --model DIR [--output-dir D] [--num-vqa N --num-t2i N --num-recon N] [--no-speed]

Runs, on ShapesWorld's test split with fixed seeds (same checkpoint and arguments → same numbers; speed aside):
- understanding: `eval.vqa` on the first --num-vqa ShapesWorld questions (exact match, per question type);
- drawing: `eval.t2i` on the first --num-t2i ShapesPrompts (balanced over categories), graded by ShapesEval;
- reconstruction: `eval.reconstruction` on --num-recon scenes with the checkpoint's own image tokenizer;
- speed: drawing at batch 1 (KV cache vs full recompute) and answering at batch 1 (`eval.speed`); skip with --no-speed.

Writes into --output-dir (default <model>/eval/report):
    report_card.json, report_card.md     every number, with the plots below
    model_card.md                        the headline numbers as a model-card table
    plots/vqa_accuracy.png               accuracy per question type
    plots/shapes_eval.png                ShapesEval accuracy per category
    plots/drawn_grid.png                 drawn images with their prompts (✓ = ShapesEval says correct)
    plots/progressive.png                coarse-to-fine: drawn indices decoded after each scale
    reconstruction/reconstructions.png   inputs (top) and reconstructions (bottom); and the reconstruction report
    vqa/, t2i/                           the full outputs of those runs (predictions, GenEval image folder)
"""

from __future__ import annotations

import argparse
import json
import os
import textwrap
import time
from pathlib import Path
from typing import Any

import torch

from eval import reconstruction, t2i, vqa
from eval.speed import card_markdown as speed_markdown
from eval.speed import speed_card
from tokenizer.teacher import DEFAULT_TEACHER
from unimodal.cli import run_main

PLOTS = ("vqa_accuracy.png", "shapes_eval.png", "drawn_grid.png", "progressive.png")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bar_chart(values: dict[str, float], title: str, path: Path, counts: dict[str, int] | None = None) -> None:
    """Bars of values in [0, 1] with their value (and count) written above."""
    plt = _pyplot()
    names = list(values)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(names)), 3.2))
    bars = ax.bar(names, [values[n] for n in names], color="#4c72b0")
    for bar, name in zip(bars, names):
        label = f"{values[name]:.2f}" + (f"\n(n={counts[name]})" if counts and name in counts else "")
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + 0.02, label, ha="center", va="bottom",
                fontsize=8)
    ax.set_ylim(0, 1.2)
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def image_grid(images: list, titles: list[str], path: Path, columns: int = 6, title_width: int = 22) -> None:
    """Images in a grid, each with a (wrapped) title."""
    plt = _pyplot()
    rows = (len(images) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(2.0 * columns, 2.5 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, title in zip(axes.flat, images, titles):
        ax.imshow(image)
        ax.set_title("\n".join(textwrap.wrap(title, title_width)[:4]), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@torch.no_grad()
def progressive_strip(model, indices: torch.Tensor, prompts: list[str], path: Path) -> None:
    """Rows = drawn images, columns = the image decoded from its first 1, 2, ..., L scales (coarse to fine)."""
    plt = _pyplot()
    tokenizer = model.image_tokenizer
    prefixes = tokenizer.config.prefix_lengths
    scales = model.scales
    fig, axes = plt.subplots(len(indices), len(scales), figsize=(1.6 * len(scales), 1.8 * len(indices)),
                             squeeze=False)
    for k, length in enumerate(prefixes):
        decoded = tokenizer.image_processor.postprocess(tokenizer.decode_indices(indices[:, :length].to(model.device)))
        for row, image in enumerate(decoded):
            ax = axes[row, k]
            ax.imshow(image)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(f"{scales[k]}×{scales[k]}", fontsize=8)
            if k == 0:
                ax.set_ylabel("\n".join(textwrap.wrap(prompts[row], 18)[:3]), fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_reconstruction(model, output_dir: Path, num_images: int, teacher: str | None, batch_size: int = 50) -> dict:
    """`eval.reconstruction` on the checkpoint's own image tokenizer (saved next to the report for it to load)."""
    tokenizer_dir = output_dir / "reconstruction" / "tokenizer"
    model.image_tokenizer.save_pretrained(str(tokenizer_dir))
    args = reconstruction.parse_args([
        "--tokenizer", str(tokenizer_dir), "--teacher", teacher or "none", "--num-images", str(num_images),
        "--batch-size", str(min(batch_size, num_images)), "--output-dir", str(output_dir / "reconstruction")])
    return reconstruction.evaluate(args)


def model_card_table(card: dict[str, Any]) -> str:
    """The headline numbers as a markdown model-card table."""
    rows = []
    if "vqa" in card:
        v = card["vqa"]
        rows.append(("Understanding", f"ShapesWorld VQA test ({v['num_questions']} q)", "accuracy (exact match)",
                     v["overall"]["accuracy"]))
        rows += [("Understanding", f"ShapesWorld VQA · {t}", "accuracy", m["accuracy"]) for t, m in v["per_type"].items()]
    if "t2i" in card:
        accuracy = card["t2i"]["shapes_eval"]["accuracy"]
        n = card["t2i"]["num_prompts"]
        rows.append(("Drawing", f"ShapesEval, GenEval rules ({n} prompts)", "overall (mean over categories)",
                     accuracy["overall"]))
        rows += [("Drawing", f"ShapesEval · {tag}", "accuracy", value) for tag, value in accuracy.items()
                 if tag != "overall"]
    if "reconstruction" in card:
        r = card["reconstruction"]
        name = f"ShapesWorld test ({r['num_images']} images)"
        rows += [("Reconstruction", name, "PSNR (dB)", r["psnr"]), ("Reconstruction", name, "SSIM", r["ssim"])]
        if r.get("readback_reconstructions"):
            rows.append(("Reconstruction", name, "ShapesEval read-back exact", r["readback_reconstructions"]["exact"]))
    if "speed" in card:
        s = card["speed"]
        draw = s["drawing"][0]
        rows += [("Speed", f"drawing, batch 1, CFG ({s['device']})", "seconds per image (draw + decode)",
                  draw["draw_and_decode_s"]),
                 ("Speed", "drawing, batch 1", "KV cache vs full recompute", f"{draw['speedup']:.2f}x"),
                 ("Speed", f"answering, batch 1 ({s['device']})", "tokens/s", s["answering"][0]["tokens_per_s"]),
                 ("Speed", "answering, batch 1", "time to first token (ms)", s["answering"][0]["ttft_s"] * 1e3)]
    lines = ["| task | benchmark | metric | value |", "|---|---|---|---|"]
    for task, benchmark, metric, value in rows:
        shown = "—" if value is None else (f"{value:.4f}" if isinstance(value, float) else str(value))
        lines.append(f"| {task} | {benchmark} | {metric} | {shown} |")
    return "\n".join(lines) + "\n"


def card_markdown(card: dict[str, Any]) -> str:
    s = card["settings"]
    lines = [f"# Report card: `{s['model']}`", "",
             f"ShapesWorld test split; {s['num_vqa']} questions, {s['num_t2i']} drawing prompts (seed {s['seed']}), "
             f"{s['num_recon']} reconstructions; {s['device']}. Took {card['wall_s']:.0f} s.", "",
             "## Summary", "", model_card_table(card)]
    if "vqa" in card:
        lines += [vqa.summary_markdown(card["vqa"], "Understanding (ShapesWorld VQA)"),
                  "![accuracy per question type](plots/vqa_accuracy.png)", ""]
    if "t2i" in card:
        lines += [t2i.report_markdown(card["t2i"]).replace("# Drawing", "## Drawing", 1),
                  "![ShapesEval per category](plots/shapes_eval.png)", "",
                  "![drawn images](plots/drawn_grid.png)", "",
                  "Coarse to fine (each column decodes one more scale):", "", "![progressive](plots/progressive.png)",
                  ""]
    if "reconstruction" in card:
        r = card["reconstruction"]
        lines += ["## Reconstruction", "",
                  f"PSNR {r['psnr']:.2f} dB, SSIM {r['ssim']:.4f}, quality monotonic in scales: "
                  f"{r['quality_monotonic']} (details: `reconstruction/report.md`).", "",
                  "![reconstructions](reconstruction/reconstructions.png)", ""]
    if "speed" in card:
        lines += [speed_markdown(card["speed"]).replace("# Speed card", "## Speed", 1)]
    return "\n".join(lines) + "\n"


def build_report(model, processor, output_dir: str | os.PathLike, *, model_name: str, num_vqa: int = 300,
                 num_t2i: int = 60, num_recon: int = 64, seed: int = 0, batch_size: int = 16,
                 teacher: str | None = None, speed: bool = True, speed_repeats: int = 5, grid_size: int = 12,
                 **sampler: Any) -> dict[str, Any]:
    """Run every section and write the card; returns it (see the module docstring)."""
    for name, value, low in (("num_vqa", num_vqa, 1), ("num_t2i", num_t2i, 1), ("num_recon", num_recon, 2)):
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    out = Path(output_dir)
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    card: dict[str, Any] = {"settings": {"model": model_name, "num_vqa": num_vqa, "num_t2i": num_t2i,
                                         "num_recon": num_recon, "seed": seed, "device": str(model.device),
                                         "sampler": t2i.drawing_settings(model, **sampler)}}

    questions = vqa.shapesworld_questions(num_vqa, "test", model.config.tokenizer_config.image_size)
    summary, records = vqa.run(model, processor, questions, vqa.SHAPESWORLD_RULE, batch_size,
                               vqa.SHAPESWORLD_MAX_NEW_TOKENS)
    vqa.write_outputs(out / "vqa", summary, records, {"model": model_name, "questions": "ShapesWorld test",
                                                      "rule": vqa.SHAPESWORLD_RULE, "decoding": "greedy"})
    card["vqa"] = summary
    bar_chart({t: m["accuracy"] for t, m in summary["per_type"].items()}, "ShapesWorld VQA: accuracy per type",
              plots / "vqa_accuracy.png", {t: m["n"] for t, m in summary["per_type"].items()})

    metadata = t2i.shapes_prompt_metadata(num_t2i, "test")
    results, drawn = t2i.run(model, processor, metadata, out / "t2i", grade=True, seed=seed,
                             source="ShapesPrompts test", model_name=model_name, **sampler)
    card["t2i"] = results
    shapes = results["shapes_eval"]
    bar_chart({k: v for k, v in shapes["accuracy"].items()}, "ShapesEval (GenEval rules): accuracy per category",
              plots / "shapes_eval.png", shapes["counts"])
    verdicts = {(g["index"], g["sample"]): g["correct"] for g in drawn["grades"]}
    shown = list(range(min(grid_size, len(metadata))))
    image_grid([drawn["images"][i][0] for i in shown],
               [("✓ " if verdicts[(i, 0)] else "✗ ") + metadata[i]["prompt"] for i in shown], plots / "drawn_grid.png")
    strip = shown[: min(4, len(shown))]
    progressive_strip(model, torch.stack([drawn["indices"][i][0] for i in strip]),
                      [metadata[i]["prompt"] for i in strip], plots / "progressive.png")

    card["reconstruction"] = run_reconstruction(model, out, num_recon, teacher)

    if speed:
        card["speed"] = speed_card(model, processor, name=model_name, device=str(model.device), dtypes=["float32"],
                                   tokenizer_batch_sizes=[1], drawing_batch_sizes=[1], prompt_lengths=[0],
                                   new_tokens=16, train_batch_size=0, repeats=speed_repeats, warmup=1)
    card["wall_s"] = time.perf_counter() - start
    (out / "report_card.json").write_text(json.dumps(card, indent=2, default=str))
    (out / "report_card.md").write_text(card_markdown(card))
    (out / "model_card.md").write_text(f"## Evaluation of `{model_name}`\n\n" + model_card_table(card))
    return card


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m eval.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a TokenFlowMLLM checkpoint folder")
    p.add_argument("--output-dir", default=None, help="default: <model>/eval/report")
    p.add_argument("--num-vqa", type=int, default=300, help="ShapesWorld questions")
    p.add_argument("--num-t2i", type=int, default=60, help="ShapesPrompts drawn (10 per category)")
    p.add_argument("--num-recon", type=int, default=64, help="scenes reconstructed")
    p.add_argument("--seed", type=int, default=0, help="drawing seed (prompt i gets seed + i)")
    p.add_argument("--batch-size", type=int, default=16, help="questions per answering batch")
    p.add_argument("--teacher", default=None,
                   help="the tokenizer teacher's weights for the semantic reconstruction metrics (default: the "
                        "ShapesWorld teacher when present, else none)")
    p.add_argument("--no-speed", action="store_true", help="skip the speed section")
    t2i.add_sampler_arguments(p)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    teacher = args.teacher
    if teacher is None and DEFAULT_TEACHER.is_file():
        teacher = str(DEFAULT_TEACHER)
    output_dir = vqa.prepare_output_dir(args.output_dir or Path(args.model) / "eval" / "report")
    model, processor = vqa.load_model(args.model, args.device)
    card = build_report(model, processor, output_dir, model_name=str(args.model), num_vqa=args.num_vqa,
                        num_t2i=args.num_t2i, num_recon=args.num_recon, seed=args.seed, batch_size=args.batch_size,
                        teacher=teacher, speed=not args.no_speed, **t2i.sampler_arguments(args))
    print(model_card_table(card))
    print(f"report card -> {output_dir / 'report_card.md'}")
    return card


if __name__ == "__main__":
    run_main(main)
