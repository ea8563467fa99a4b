"""Where a drawing is decided: draw each ShapesWorld prompt once, then redraw it from the prefix of its first k scales
(k = 1 .. L−1, the finer scales drawn anew) and grade every drawing with ShapesEval.

    python -m eval.commitment --model DIR [--num-samples 60] [--redraws 4] [--split validation]

For each k: how often a redraw passes when the original passed, and when it failed. Where the two rates are apart,
the first k scales have already settled the verdict; where they are close, the decision is still open. Drawing uses
the checkpoint's sampler (the sampler flags override it). Writes `commitment.json` and `commitment.md`.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm import tqdm

from eval.t2i import drawing_settings, shapes_prompt_metadata
from eval.vqa import add_model_arguments, check_num_samples, load_model, prepare_output_dir
from llm.generation import add_sampler_arguments, sampler_arguments
from unimodal.cli import run_main
from unimodal.shapesworld import ShapesEval

# verdict(image, its codes [Σs²], the prompt's metadata) → passes?
Verdict = Callable[[Image.Image, torch.Tensor, dict], bool]


def shapes_eval_verdict(image: Image.Image, codes: torch.Tensor, meta: dict) -> bool:
    """ShapesEval's verdict on one drawing of a ShapesWorld prompt."""
    return bool(ShapesEval().add_prompt(image, meta)["correct"])


@torch.no_grad()
def commitment_study(model, processor, metadata: Sequence[dict], redraws: int = 4, seed: int = 0,
                     verdict: Verdict = shapes_eval_verdict, **sampler: Any) -> dict[str, Any]:
    """Returns {"scales": [...], "rows": [{"kept_scales": k, "side": s_{k-1}, "pass_after_pass": rate,
    "pass_after_fail": rate}, ...], "original_pass_rate": rate, "num_passed": n, "num_failed": n}.

    Prompt i is drawn with seed `seed + i` and redrawn, `redraws` images at once per k, with seed `seed + i + k·P`
    (P prompts), so every number is reproducible."""
    if redraws < 1 or not metadata:
        raise ValueError(f"redraws must be >= 1 and metadata non-empty, got {redraws} and {len(metadata)} prompts")
    # Single drawings are what commit at a scale; a self-checked one is a choice among several.
    if sampler.get("self_check") not in (None, 1):
        raise ValueError(f"self_check={sampler['self_check']!r}: the study redraws single drawings; leave it out or "
                         "pass 1")
    settings = {**drawing_settings(model, **sampler), "self_check": 1}
    scales, lengths = model.scales, model.config.tokenizer_config.prefix_lengths
    passes = {k: {True: [], False: []} for k in range(1, len(scales))}
    originals = []
    for i, meta in enumerate(tqdm(metadata, desc="prompts", unit="prompt", dynamic_ncols=True)):
        first = model.generate_image(meta["prompt"], processor=processor, seed=seed + i, **settings)
        passed = verdict(first.images[0], first.indices[0], meta)
        originals.append(passed)
        for k in range(1, len(scales)):
            prefix = first.indices[:, :lengths[k - 1]].repeat(redraws, 1)
            out = model.generate_image(meta["prompt"], processor=processor, seed=seed + i + k * len(metadata),
                                       num_images_per_prompt=redraws, prefix=prefix, **settings)
            verdicts = [verdict(image, codes, meta) for image, codes in zip(out.images, out.indices)]
            passes[k][passed].append(sum(verdicts) / redraws)

    def mean(values: list[float]) -> float | None:
        return sum(values) / len(values) if values else None

    rows = [{"kept_scales": k, "side": scales[k - 1], "pass_after_pass": mean(passes[k][True]),
             "pass_after_fail": mean(passes[k][False])} for k in range(1, len(scales))]
    return {"scales": scales, "rows": rows, "original_pass_rate": sum(originals) / len(originals),
            "num_passed": sum(originals), "num_failed": len(originals) - sum(originals), "redraws": redraws,
            "sampler": dict(settings)}


def report_markdown(results: dict, model_path: str) -> str:
    def fmt(value):
        return "—" if value is None else f"{value:.2f}"

    lines = [f"# Where drawings are decided: `{model_path}`", "",
             f"{results['num_passed'] + results['num_failed']} prompts ({results['num_passed']} passed at first, "
             f"{results['original_pass_rate']:.2f}), {results['redraws']} redraws per kept prefix, sampler "
             f"{json.dumps(results['sampler'], sort_keys=True)}.", "",
             "| scales kept | last kept | redraw passes, original passed | redraw passes, original failed |",
             "|---:|---:|---:|---:|"]
    for row in results["rows"]:
        side = row["side"]
        lines.append(f"| {row['kept_scales']} | {side}×{side} | {fmt(row['pass_after_pass'])} | "
                     f"{fmt(row['pass_after_fail'])} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m eval.commitment", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a TokenFlowMLLM checkpoint folder")
    p.add_argument("--split", choices=("validation", "test"), default="validation")
    p.add_argument("--num-samples", type=int, default=60, help="ShapesPrompts to draw (categories in turn)")
    p.add_argument("--redraws", type=int, default=4, help="redraws per prompt and kept prefix")
    p.add_argument("--seed", type=int, default=0)
    add_sampler_arguments(p)
    add_model_arguments(p, "commitment")
    args = p.parse_args(argv)
    check_num_samples(p, args)
    if args.redraws < 1:
        p.error(f"--redraws must be >= 1, got {args.redraws}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = prepare_output_dir(args.output_dir or Path(args.model) / "eval" / "commitment")
    model, processor = load_model(args.model, args.device, args.dtype)
    results = commitment_study(model, processor, shapes_prompt_metadata(args.num_samples, args.split),
                               args.redraws, args.seed, **sampler_arguments(args))
    (out / "commitment.json").write_text(json.dumps(results, indent=2))
    report = report_markdown(results, str(args.model))
    (out / "commitment.md").write_text(report)
    print(report)
    return results


if __name__ == "__main__":
    run_main(main)
