"""Drawing benchmark: draw prompts into GenEval's folder layout with fixed seeds, and grade ShapesWorld prompts.

    python -m eval.t2i --model DIR                                   # ShapesPrompts test split, graded by ShapesEval
    python -m eval.t2i --model DIR --prompts evaluation_metadata.jsonl --images-per-prompt 4   # GenEval prompts
    python -m eval.t2i --model DIR --prompts dpg_prompts.txt         # a plain list, one prompt per line (DPG style)

Input: GenEval metadata (`.jsonl`: one JSON object per line with at least `prompt`, e.g. `tag`, `include`, ...) or
a plain prompt list (any other suffix: one prompt per non-empty line). Output, in `--output-dir`, GenEval's layout::

    images/00000/metadata.jsonl        the prompt's metadata line, as read ({"prompt": ...} for plain lists)
    images/00000/samples/0000.png      its images (PNG text chunks: prompt, seed, sampler settings)
    images/00001/...

so GenEval's own `evaluate_images.py images/` can grade them elsewhere. Seeds: batch b of prompts (prompts
b·B ... b·B + B − 1 with `--batch-size B`) is drawn with seed `--seed + b·B`; with the default B = 1, prompt i always
gets seed + i, whatever else is drawn. Same checkpoint, prompts, seed, batch size and settings → the same images.

Grading: ShapesEval reads each image back and applies GenEval's rules to prompts in ShapesWorld's vocabulary (the
default set, `--grade` for a file of them, e.g. one written by `python -m unimodal.shapesworld export geneval`);
accuracy per category (single_object, two_object, counting, colors, position, color_attr) and overall (the mean
over categories, as GenEval). Writes `t2i_results.json`, `t2i_grades.jsonl` (verdict per image) and `t2i_report.md`.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import torch
from tqdm import tqdm

from eval.vqa import (
    add_model_arguments, check_num_samples, iter_jsonl, iter_text_lines, load_model, prepare_output_dir,
)
from llm import save_png
from llm.generation import (DEFAULT_SAMPLER, add_sampler_arguments, resolve_sampler, sampler_arguments,
                             sampler_defaults)
from unimodal.cli import run_main
from unimodal.shapesworld import PROMPT_TAGS, ShapesEval, ShapesPrompts, check_prompt_meta



def drawing_settings(model, **settings: Any) -> dict[str, Any]:
    """The settings a drawing uses: the checkpoint's own sampler (`llm.generation.sampler_defaults`, from its
    generation_config) with every sampler setting given here (not None) in its place; other `generate_image`
    options (e.g. `num_scales`) pass through."""
    sampler = {k: v for k, v in settings.items() if k in DEFAULT_SAMPLER}
    return {**settings, **resolve_sampler(sampler_defaults(model), **sampler)}


def read_geneval_metadata(path: str | os.PathLike) -> list[dict]:
    """GenEval metadata JSONL → one dict per prompt (each must hold a string `prompt`)."""
    records = []
    for number, record in iter_jsonl(path):
        if not isinstance(record.get("prompt"), str):
            raise ValueError(f"{path}:{number}: GenEval metadata needs a string 'prompt', got {str(record)[:120]}")
        records.append(record)
    if not records:
        raise ValueError(f"{str(path)!r} holds no prompts")
    return records


def read_prompt_list(path: str | os.PathLike) -> list[dict]:
    """A plain prompt list (one prompt per non-empty line, DPG style) → [{"prompt": line}, ...]."""
    records = [{"prompt": line.strip()} for _, line in iter_text_lines(path) if line.strip()]
    if not records:
        raise ValueError(f"{str(path)!r} holds no prompts")
    return records


def read_prompts(path: str | os.PathLike) -> list[dict]:
    """`.jsonl` → GenEval metadata, anything else → a plain prompt list."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt file {str(path)!r} not found")
    return read_geneval_metadata(path) if str(path).endswith(".jsonl") else read_prompt_list(path)


def shapes_prompt_metadata(num_prompts: int, split: str = "test", seed: int = 0) -> list[dict]:
    """GenEval metadata of the first `num_prompts` ShapesPrompts of `split` (categories in turn, so balanced)."""
    if num_prompts < 1:
        raise ValueError(f"num_prompts must be >= 1, got {num_prompts}")
    prompts = ShapesPrompts(split, num_samples=num_prompts, seed=seed)
    return [prompts.prompt(i).meta for i in range(num_prompts)]


@torch.no_grad()
def draw_prompts(
    model,
    processor,
    metadata: Sequence[dict],
    output_dir: str | os.PathLike | None = None,
    images_per_prompt: int = 1,
    batch_size: int = 1,
    seed: int = 0,
    grader: ShapesEval | None = None,
    grades_file: TextIO | None = None,
    **sampler: Any,
) -> dict[str, Any]:
    """Draw every prompt; write GenEval's layout under `output_dir` (when given) and grade with `grader` (when given),
    appending each verdict to `grades_file` as soon as it is made (so an interrupted run keeps its grades).

    Returns {"images": [[PIL per sample] per prompt], "indices": [[N] LongTensor per prompt], "grades": [verdict
    dicts, prompt-major]}."""
    if images_per_prompt < 1 or batch_size < 1:
        raise ValueError(f"images_per_prompt and batch_size must be >= 1, got {images_per_prompt}, {batch_size}")
    settings = drawing_settings(model, **sampler)
    images: list[list] = []
    indices: list[torch.Tensor] = []
    grades: list[dict] = []
    progress = tqdm(total=len(metadata), desc="drawing", unit="prompt", dynamic_ncols=True)
    for start in range(0, len(metadata), batch_size):
        batch = list(metadata[start:start + batch_size])
        out = model.generate_image([m["prompt"] for m in batch], processor=processor, seed=seed + start,
                                   num_images_per_prompt=images_per_prompt, **settings)
        for offset, meta in enumerate(batch):
            rows = slice(offset * images_per_prompt, (offset + 1) * images_per_prompt)
            prompt_images = out.images[rows]
            images.append(prompt_images)
            indices.append(out.indices[rows].cpu())
            index = start + offset
            if output_dir is not None:
                write_geneval_folder(Path(output_dir) / f"{index:05d}", meta, prompt_images)
            if grader is not None:
                for sample, image in enumerate(prompt_images):
                    verdict = grader.add_prompt(image, meta)
                    grades.append({"index": index, "sample": sample, **verdict})
                    if grades_file is not None:
                        grades_file.write(json.dumps(grades[-1]) + "\n")
                        grades_file.flush()
        progress.update(len(batch))
    progress.close()
    return {"images": images, "indices": indices, "grades": grades}


def write_geneval_folder(folder: Path, meta: dict, images: Sequence) -> None:
    """`folder/metadata.jsonl` (one line) and `folder/samples/0000.png`, ... (with their drawing metadata)."""
    (folder / "samples").mkdir(parents=True, exist_ok=True)
    (folder / "metadata.jsonl").write_text(json.dumps(meta) + "\n", encoding="utf-8")
    for k, image in enumerate(images):
        save_png(image, str(folder / "samples" / f"{k:04d}.png"))


def grade_summary(grader: ShapesEval) -> dict[str, Any]:
    """ShapesEval's prompt accuracies: {tag: accuracy, ..., "overall": mean over tags} and counts per tag."""
    summary = grader.summary()
    if "prompts" not in summary:
        raise ValueError("nothing was graded")
    return {"accuracy": summary["prompts"], "counts": summary["prompt_counts"]}


def report_markdown(results: dict) -> str:
    settings = results["settings"]
    lines = [f"# Drawing: `{settings['model']}`", "",
             f"{results['num_prompts']} prompts from {settings['prompts']}, {settings['images_per_prompt']} image(s) "
             f"each, seed {settings['seed']}, sampler {json.dumps(settings['sampler'], sort_keys=True)}.", "",
             f"Images in GenEval's layout: `{settings['images_dir']}`."]
    if "shapes_eval" in results:
        accuracy, counts = results["shapes_eval"]["accuracy"], results["shapes_eval"]["counts"]
        lines += ["", "## ShapesEval (GenEval rules)", "", "| category | accuracy | images |", "|---|---|---|"]
        lines += [f"| {tag} | {accuracy[tag]:.4f} | {counts[tag]} |" for tag in PROMPT_TAGS if tag in accuracy]
        lines.append(f"| **overall** (mean over categories) | {accuracy['overall']:.4f} | {sum(counts.values())} |")
    return "\n".join(lines) + "\n"


def run(model, processor, metadata: Sequence[dict], output_dir: str | os.PathLike, grade: bool,
        images_per_prompt: int = 1, batch_size: int = 1, seed: int = 0, source: str = "", model_name: str = "",
        **sampler: Any) -> tuple[dict, dict]:
    """Draw, write and grade; returns (results written to t2i_results.json, the raw `draw_prompts` output).

    Images and grades are written as they are made; `t2i_results.json` and the report at the end."""
    out = prepare_output_dir(output_dir)
    grader = ShapesEval() if grade else None
    if grade:
        for number, meta in enumerate(metadata):
            try:
                check_prompt_meta(meta)
            except ValueError as error:
                raise ValueError(f"prompt {number} cannot be graded by ShapesEval (not ShapesWorld GenEval "
                                 f"metadata): {error}") from None
    grades_file = open(out / "t2i_grades.jsonl", "w", encoding="utf-8") if grade else None
    try:
        drawn = draw_prompts(model, processor, metadata, out / "images", images_per_prompt, batch_size, seed, grader,
                             grades_file, **sampler)
    finally:
        if grades_file is not None:
            grades_file.close()
    results: dict[str, Any] = {
        "settings": {"model": model_name, "prompts": source, "images_per_prompt": images_per_prompt,
                     "batch_size": batch_size, "seed": seed, "sampler": drawing_settings(model, **sampler),
                     "images_dir": str(out / "images")},
        "num_prompts": len(metadata),
    }
    if grader is not None:
        results["shapes_eval"] = grade_summary(grader)
    (out / "t2i_results.json").write_text(json.dumps(results, indent=2))
    (out / "t2i_report.md").write_text(report_markdown(results))
    return results, drawn


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m eval.t2i", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a TokenFlowMLLM checkpoint folder")
    p.add_argument("--prompts", default=None,
                   help="GenEval metadata .jsonl or a plain prompt list (default: ShapesPrompts, --split)")
    p.add_argument("--split", choices=("validation", "test"), default="test")
    p.add_argument("--grade", action="store_true", help="grade a --prompts file of ShapesWorld GenEval metadata")
    p.add_argument("--num-samples", type=int, default=None, help="prompts to draw (default: all; 120 ShapesPrompts)")
    p.add_argument("--images-per-prompt", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=1, help="prompts per drawing call (changes the seeds' use)")
    p.add_argument("--seed", type=int, default=0)
    add_sampler_arguments(p)
    add_model_arguments(p, "t2i")
    args = p.parse_args(argv)
    check_num_samples(p, args)
    if args.images_per_prompt < 1 or args.batch_size < 1:
        p.error("--images-per-prompt and --batch-size must be >= 1")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    output_dir = prepare_output_dir(args.output_dir or Path(args.model) / "eval" / "t2i")
    model, processor = load_model(args.model, args.device, args.dtype)
    if args.prompts is None:
        metadata = shapes_prompt_metadata(args.num_samples or 120, args.split)
        source, grade = f"ShapesPrompts {args.split}", True
    else:
        metadata = read_prompts(args.prompts)[: args.num_samples]
        source, grade = str(args.prompts), args.grade
    sampler = sampler_arguments(args)
    results, _ = run(model, processor, metadata, output_dir, grade, args.images_per_prompt, args.batch_size,
                     args.seed, source, str(args.model), **sampler)
    if "shapes_eval" in results:
        accuracy = results["shapes_eval"]["accuracy"]
        print("ShapesEval " + ", ".join(f"{k} {v:.4f}" for k, v in accuracy.items()))
    print(f"{results['num_prompts']} prompts drawn -> {output_dir}")
    return results


if __name__ == "__main__":
    run_main(main)
