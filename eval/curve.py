"""Learning curves: grade every saved checkpoint of a training run on held-out ShapesWorld data.

    python -m eval.curve runs/sft                              # VQA (300 questions) at each checkpoint-N
    python -m eval.curve runs/sft --t2i 60 --vqa 0             # ShapesEval on 60 prompts instead
    python -m eval.curve runs/sft --t2i 60 --top-p 1 --cfg-scale 3   # ... drawn with another sampler
    python -m eval.curve runs/a runs/b --output-dir eval_outputs/curve/ab    # two runs, one plot
    python -m eval.curve runs/sft --watch                      # grade checkpoints as a running training saves them

Each `checkpoint-N` folder of a run (what `train/pretrain.py` / `train/sft.py` save every `--save-steps`) is graded
once: results go to `OUTPUT/curve.jsonl` (one line per run, step and settings; a checkpoint already graded with the
same settings, sampler flags included, is read back, so the command can be repeated while training goes on, and checkpoints that the trainer
later deletes keep their line). From those lines it writes `curve.csv` (a row per run and step: overall and
per-type VQA exact match, ShapesEval overall and per category) and `curve.png`.

The questions and prompts are the first N of the test split (seeds never used in training), the same at every
step, so points differ by the checkpoint alone. `--watch` polls until every run has written its final model
(`config.json` beside the checkpoints) and its last checkpoint is graded.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import time
from pathlib import Path

import torch

from eval import t2i, vqa
from eval.report import _pyplot
from unimodal.cli import run_main
from unimodal.shapesworld.language import QUESTION_TYPES, check_question_types

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def checkpoints(run: Path) -> list[tuple[int, Path]]:
    """The complete `checkpoint-N` folders of `run` (model weights written), by step."""
    found = [(int(m.group(1)), d) for d in run.iterdir() if d.is_dir() and (m := CHECKPOINT.match(d.name))]
    return sorted((step, d) for step, d in found if (d / "config.json").exists() and any(d.glob("*.safetensors")))


def grade(checkpoint: Path, num_vqa: int, num_t2i: int, work_dir: Path, seed: int = 0,
          question_types: list[str] | None = None, **sampler) -> dict:
    """VQA exact match (overall and per type) on `num_vqa` test questions (of `question_types` only, when given) and
    ShapesEval (overall and per category) on `num_t2i` test prompts, drawn with `sampler` (unset settings: the
    checkpoint's), for one checkpoint folder."""
    model, processor = vqa.load_model(checkpoint)
    result: dict = {}
    with torch.inference_mode():
        if num_vqa:
            questions = vqa.shapesworld_questions(num_vqa, "test", model.config.tokenizer_config.image_size,
                                                  question_types=question_types)
            summary, _ = vqa.run(model, processor, questions, vqa.SHAPESWORLD_RULE,
                                 max_new_tokens=vqa.SHAPESWORLD_MAX_NEW_TOKENS)
            result["vqa"] = summary["overall"]["accuracy"]
            result.update({f"vqa/{kind}": value["accuracy"] for kind, value in summary["per_type"].items()})
        if num_t2i:
            metadata = t2i.shapes_prompt_metadata(num_t2i, "test")
            drawn, _ = t2i.run(model, processor, metadata, work_dir, grade=True, seed=seed,
                               model_name=str(checkpoint), **sampler)
            accuracy = drawn["shapes_eval"]["accuracy"]
            result["shapes_eval"] = accuracy["overall"]
            result.update({f"shapes_eval/{tag}": value for tag, value in accuracy.items() if tag != "overall"})
    return result


def read_lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def grade_new(runs: list[Path], out: Path, num_vqa: int, num_t2i: int, question_types: list[str] | None = None,
              **sampler) -> list[dict]:
    """Grade the checkpoints of `runs` not yet in `OUTPUT/curve.jsonl` with these settings; returns every line."""
    lines_path = out / "curve.jsonl"
    lines = read_lines(lines_path)
    settings = {"num_vqa": num_vqa, "num_t2i": num_t2i}
    if question_types:
        settings["question_types"] = list(question_types)
    if num_t2i:
        settings["sampler"] = {k: v for k, v in sampler.items() if v is not None}
    done = {(line["run"], line["step"]) for line in lines if line["settings"] == settings}
    for run in runs:
        for step, folder in checkpoints(run):
            if (str(run), step) in done:
                continue
            started = time.perf_counter()
            result = grade(folder, num_vqa, num_t2i, out / "drawings" / run.name / f"step-{step}",
                           question_types=question_types, **sampler)
            line = {"run": str(run), "step": step, "settings": settings, **result,
                    "seconds": round(time.perf_counter() - started, 1)}
            print(json.dumps(line), flush=True)
            with lines_path.open("a", encoding="utf-8") as sink:
                sink.write(json.dumps(line) + "\n")
            lines.append(line)
    return [line for line in lines if line["settings"] == settings and line["run"] in {str(r) for r in runs}]


def write_curves(lines: list[dict], out: Path) -> None:
    """`curve.csv` and `curve.png` from graded lines."""
    lines = sorted(lines, key=lambda line: (line["run"], line["step"]))
    columns = ["run", "step"] + sorted({k for line in lines for k in line if k not in ("run", "step", "settings")})
    with (out / "curve.csv").open("w", newline="", encoding="utf-8") as sink:
        writer = csv.DictWriter(sink, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(lines)
    metrics = [m for m in ("vqa", "shapes_eval") if any(m in line for line in lines)]
    if not metrics:
        return
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4), squeeze=False)
    for axis, metric in zip(axes[0], metrics):
        for run in dict.fromkeys(line["run"] for line in lines):
            points = [(line["step"], line[metric]) for line in lines if line["run"] == run and metric in line]
            axis.plot(*zip(*points), marker="o", label=Path(run).name)
        axis.set_xlabel("training step")
        axis.set_ylabel({"vqa": "VQA exact match", "shapes_eval": "ShapesEval overall"}[metric])
        axis.set_ylim(0, 1)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(out / "curve.png", dpi=100)
    plt.close(figure)


def finished(run: Path) -> bool:
    return (run / "config.json").exists()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m eval.curve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="training output folders (holding checkpoint-N folders)")
    p.add_argument("--vqa", type=int, default=300, help="held-out VQA questions per checkpoint (0: none)")
    p.add_argument("--t2i", type=int, default=0, help="held-out drawing prompts per checkpoint (0: none)")
    p.add_argument("--question-types", default=None,
                   help=f"comma-separated VQA question types to grade (default: all of {', '.join(QUESTION_TYPES)}); "
                        "for runs trained on some types only")
    t2i.add_sampler_arguments(p)
    p.add_argument("--output-dir", default=None, help="default: eval_outputs/curve/<first run's name>")
    p.add_argument("--watch", action="store_true", help="keep grading new checkpoints until every run has finished")
    p.add_argument("--poll-seconds", type=float, default=30.0)
    args = p.parse_args(argv)
    if args.vqa < 0 or args.t2i < 0 or not (args.vqa or args.t2i):
        p.error(f"--vqa {args.vqa} and --t2i {args.t2i}: both must be >= 0 and one of them > 0")
    if args.question_types is not None:
        try:
            args.question_types = list(check_question_types(t.strip() for t in args.question_types.split(",")
                                                            if t.strip()))
        except ValueError as error:
            p.error(f"--question-types: {error}")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    runs = [Path(r) for r in args.runs]
    for run in runs:
        if not run.is_dir():
            raise FileNotFoundError(f"run folder {str(run)!r} does not exist")
    out = Path(args.output_dir or Path("eval_outputs") / "curve" / runs[0].name)
    out.mkdir(parents=True, exist_ok=True)
    while True:
        all_finished = all(finished(run) for run in runs)  # read before grading: nothing saved after it is missed
        lines = grade_new(runs, out, args.vqa, args.t2i, args.question_types, **t2i.sampler_arguments(args))
        write_curves(lines, out)
        if not args.watch or all_finished:
            break
        time.sleep(args.poll_seconds)
    print(f"{len(lines)} graded checkpoints -> {out / 'curve.csv'}, {out / 'curve.png'}")
    return lines


if __name__ == "__main__":
    run_main(main)
