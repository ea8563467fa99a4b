"""The ShapesWorld model from nothing, with one command: teacher → tokenizer → stage 1 → stage 2 → report.

    python -m train.recipes.shapesworld                                   # --budget quick into runs/shapesworld
    python -m train.recipes.shapesworld --budget bundled --from-shipped   # the long CPU run, shipped tokenizer
    python -m train.recipes.shapesworld --budget h200 --from-shipped --output-dir OUT   # one CUDA GPU
    python -m train.recipes.shapesworld --budget quick --dry-run          # every stage at tiny sizes (CPU, seconds)

Every stage is the command a user would type (`train/train_teacher.py`, `train/train_tokenizer.py`,
`train/pretokenize.py`, `train/pretrain.py`, `train/sft.py`, `python -m eval.report`, `python -m eval.speed`),
printed before it runs and appended to OUTPUT/commands.sh, so the model card can list every command. The training
stages run in this process (one start-up); the evaluation ones as child processes.

Resuming: run the same command again. A stage whose final output exists is skipped; a stage that stopped part-way
continues from its last checkpoint (`--resume auto`); the teacher (a minute) starts over. `--from-shipped` takes the
committed teacher and tokenizer instead of training them. OUTPUT/recipe.json records each stage's status and
wall time.

Budgets (`BUDGETS`): `quick` is the trainers' defaults (about 35 minutes on a 2-core CPU), `bundled` the long,
resumable CPU run of the bundled model (stage 2 alone, on a new backbone, in three sittings: `sft`, then `sft-2`
and `sft-3`, each from the one before), `h200` one GPU for under 10 minutes: data pre-tokenized into index shards
first, bf16, batches of 256, each stage under a wall-clock limit (`--max-minutes`), then the report and the 7B speed
card. `--dry-run` keeps a budget's stages and data path but shrinks every size, on the CPU in fp32 without
DeepSpeed.
"""

from __future__ import annotations

import argparse
import gc
import json
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from tokenizer.teacher import DEFAULT_TEACHER_DIR, TEACHER_WEIGHTS_NAME
from train import pretokenize, pretrain, sft, train_teacher, train_tokenizer
from train.arguments import DEFAULT_TOKENIZER, REPO_DIR

# In-process entry points (train/ may not import eval/, whose entry points run as child processes).
ENTRY_POINTS: dict[str, Callable[[list[str]], object]] = {
    "train/train_teacher.py": train_teacher.main, "train/train_tokenizer.py": train_tokenizer.main,
    "train/pretokenize.py": pretokenize.main, "train/pretrain.py": pretrain.main, "train/sft.py": sft.main,
}


@dataclass(frozen=True)
class Sitting:
    """A later stage-2 sitting: `train/sft.py` again, from the previous sitting's final model (`--init-from`), with
    its own data flags (in place of the budget's `sft_data_flags`) and training flags (in place of `sft_flags`)."""

    steps: int
    data_flags: tuple[str, ...] = ()
    flags: tuple[str, ...] = ()


@dataclass(frozen=True)
class Budget:
    """Sizes of one recipe run (stage-1 and stage-2 steps share `batch_size`)."""

    teacher_steps: int = 100
    teacher_batch: int = 128
    tokenizer_steps: int = 3000
    tokenizer_batch: int = 4
    pretrain_steps: int = 250                    # 0: no stage 1; stage 2 starts from a new backbone (--init-from none)
    sft_steps: int = 1100
    batch_size: int = 16
    num_samples: int = 20000                     # conversations per epoch of each stage (pre-tokenized: written once)
    pretokenize: bool = False                    # encode the stages' images once into index shards
    max_minutes: tuple[float, float] | None = None  # wall-clock limits of stage 1 and stage 2
    stage_flags: tuple[str, ...] = ("--deepspeed", "none")  # one process: DeepSpeed adds nothing
    sft_data_flags: tuple[str, ...] = ()         # stage 2's ShapesWorld data (task mixture, answers): to train/sft.py,
                                                 # or to its train/pretokenize.py when the data is pre-tokenized
    sft_flags: tuple[str, ...] = ()              # stage 2's training options (curriculum, description head)
    later_sittings: tuple[Sitting, ...] = ()     # stage 2 continued, each from the one before (sft-2, sft-3, ...)
    report_flags: tuple[str, ...] = ()
    speed: tuple[str, ...] | None = None         # `eval.speed` flags of a final speed card (None: no speed card)
    speed_timeout_s: float | None = None


SFT_DATA = ("--shapesworld-tasks", "vqa:0.45,describe:0.15,t2i:0.4", "--reasoned-answers", "relation",
            "--questions-per-image", "6")
SFT_HEAD = ("--slot-loss-weight", "1")
# The bundled model's second sitting: relation questions three times as often (two more per looked-at scene, the
# rate at which relation-only training taught the comparison), a larger drawing share, a fresh optimizer at 5e-4.
SECOND_SITTING = Sitting(15000, data_flags=("--shapesworld-tasks", "vqa:0.4,describe:0.1,t2i:0.5", "--reasoned-answers",
                                            "relation", "--questions-per-image", "6", "--extra-questions",
                                            "relation:2"),
                         flags=(*SFT_HEAD, "--learning-rate", "5e-4", "--warmup-steps", "100", "--seed", "1"))
# The third: drawing in rounds (`--scale-reveal-prob`, a zero-initialised reveal projector), a drawing share of 60 %.
THIRD_SITTING = Sitting(18000, data_flags=("--shapesworld-tasks", "vqa:0.3,describe:0.1,t2i:0.6", "--reasoned-answers",
                                           "relation", "--questions-per-image", "6", "--extra-questions", "relation:1"),
                        flags=(*SFT_HEAD, "--scale-reveal-prob", "0.5", "--learning-rate", "4e-4", "--warmup-steps",
                               "100", "--seed", "2"))
# The bundled model's drawing sampler (its card): the full distribution at CFG 3, two rounds per scale, and each
# drawing checked among 16 candidates by the model's own answers.
BUNDLED_SAMPLER = ("--cfg-scale", "3", "--top-k", "2048", "--top-p", "1", "--scale-rounds", "2", "--self-check", "16")
BUDGETS = {
    "quick": Budget(),
    # The bundled model's three sittings (demo/shapesworld-tiny/README.md): the shipped tokenizer's 10000 steps in one
    # cosine run of batch 8, then stage 2 alone on a new 128-wide backbone (a frozen random backbone has nothing for
    # stage 1 to align to), fresh scenes every batch, a loader process beside the two training threads. Stage 2 has
    # the description task, the one-object-first curriculum and the per-slot description head (the recipe study's
    # winners; the head with the shapes' 1/sqrt(width) init is what lets exists questions be learned), every question
    # of an image in one conversation, and relation questions answered with the rows or columns they compare first;
    # then `SECOND_SITTING` and `THIRD_SITTING` from there.
    "bundled": Budget(teacher_steps=1200, tokenizer_steps=10000, tokenizer_batch=8, pretrain_steps=0,
                      sft_steps=15000, num_samples=400000, sft_data_flags=SFT_DATA,
                      stage_flags=("--deepspeed", "none", "--backbone", "shapesworld-narrow",
                                   "--dataloader-num-workers", "1", "--save-steps", "1000"),
                      sft_flags=("--curriculum-steps", "500", *SFT_HEAD), later_sittings=(SECOND_SITTING, THIRD_SITTING),
                      report_flags=BUNDLED_SAMPLER),
    # Fits one 10-minute command: ~1 min pre-tokenizing, stages of at most 1 + 3.5 min, report, 2-min speed card.
    # Shards are read by index, so no curriculum; the sft shards carry the slots' labels for the description head.
    "h200": Budget(pretrain_steps=300, sft_steps=1500, batch_size=256, num_samples=16000, pretokenize=True,
                   max_minutes=(1.0, 3.5), sft_data_flags=SFT_DATA, sft_flags=SFT_HEAD,
                   stage_flags=("--deepspeed", "none", "--bf16", "true", "--dataloader-num-workers", "4",
                                "--save-steps", "500"),
                   speed=("--config", "clipb-256+llama-7b"), speed_timeout_s=120),
}
# --dry-run: the same stages at these sizes, CPU and fp32 (the budget's stage flags are replaced).
DRY_RUN = dict(teacher_steps=2, teacher_batch=4, tokenizer_steps=2, tokenizer_batch=2, pretrain_steps=2,
               sft_steps=2, batch_size=2, num_samples=8,
               stage_flags=("--deepspeed", "none", "--use-cpu", "true", "--bf16", "false", "--report-to", "none",
                            "--backbone", "shapesworld-tiny", "--logging-steps", "1", "--num-sample-prompts", "1"),
               report_flags=("--num-vqa", "2", "--num-t2i", "1", "--num-recon", "2", "--no-speed", "--device", "cpu",
                             "--teacher", "none"),
               speed_timeout_s=600)
DRY_RUN_SPEED = ("--config", "tiny", "--device", "cpu", "--dtypes", "float32", "--tokenizer-batch-sizes", "1",
                 "--batch-sizes", "1", "--prompt-tokens", "0", "--new-tokens", "2", "--repeats", "1", "--warmup", "0")


def dry_run_budget(budget: Budget) -> Budget:
    """`budget`'s stages and data path at tiny sizes (its time limits kept, its speed card on the tiny shape)."""
    sizes = {**DRY_RUN, "pretrain_steps": DRY_RUN["pretrain_steps"] if budget.pretrain_steps else 0,
             "later_sittings": tuple(replace(s, steps=DRY_RUN["sft_steps"]) for s in budget.later_sittings)}
    return replace(budget, **sizes, speed=DRY_RUN_SPEED if budget.speed else None)


@dataclass
class Stage:
    """One step of the recipe: commands (program, argv) run one after another, skipped once `done` exists."""

    name: str
    what: str
    done: Path
    commands: list[tuple[str, list[str]]]
    timeout_s: float | None = None


def command_line(program: str, argv: list[str]) -> str:
    head = ["python", program] if program.endswith(".py") else ["python", "-m", program]
    return shlex.join(head + argv)


def plan(budget: Budget, out: Path, from_shipped: bool) -> list[Stage]:
    """The stages of a run into `out` (absolute paths throughout, so the commands work from any folder)."""
    stages = []
    if from_shipped:
        teacher, tokenizer = DEFAULT_TEACHER_DIR, DEFAULT_TOKENIZER
    else:
        teacher, tokenizer = out / "teacher", out / "tokenizer" / "tokenizer"
        stages.append(Stage("teacher", f"ShapesWorld CLIP teacher, {budget.teacher_steps} steps × "
                            f"{budget.teacher_batch}", teacher / "metrics.json",
                            [("train/train_teacher.py", ["--output-dir", str(teacher), "--max-steps",
                                                         str(budget.teacher_steps), "--batch-size",
                                                         str(budget.teacher_batch)])]))
        stages.append(Stage("tokenizer", f"TokenFlow tokenizer, {budget.tokenizer_steps} steps × "
                            f"{budget.tokenizer_batch}", out / "tokenizer" / "summary.json",
                            [("train/train_tokenizer.py", [
                                "--output-dir", str(out / "tokenizer"), "--export-dir", "none", "--teacher",
                                str(teacher / TEACHER_WEIGHTS_NAME), "--max-steps", str(budget.tokenizer_steps),
                                "--batch-size", str(budget.tokenizer_batch), "--resume", "auto"])]))
    llm_stages = ("pretrain", "sft") if budget.pretrain_steps else ("sft",)
    shapesworld = ["--data", "shapesworld", "--num-samples", str(budget.num_samples)]  # fresh scenes every batch
    data = {"pretrain": shapesworld, "sft": shapesworld}
    data_flags = {"pretrain": [], "sft": list(budget.sft_data_flags)}
    if budget.pretokenize:
        if "--slot-loss-weight" in budget.sft_flags:  # the description head trains on labels the shards must hold
            data_flags["sft"].append("--slot-labels")
        commands = [("train/pretokenize.py", ["--stage", stage, "--output-dir", str(out / "data" / stage),
                                              "--tokenizer", str(tokenizer), "--num-samples",
                                              str(budget.num_samples), "--overwrite", *data_flags[stage]])
                    for stage in llm_stages]
        stages.append(Stage("pretokenize", f"{budget.num_samples} conversations per stage into index shards",
                            out / "data" / "sft" / "manifest.json", commands))
        data = {stage: ["--data", f"pretokenized:{out / 'data' / stage}"] for stage in llm_stages}
    else:
        data = {stage: data[stage] + data_flags[stage] for stage in data}
    sft_init = str(out / "pretrain") if budget.pretrain_steps else "none"
    for stage, steps, init_from, limit in (("pretrain", budget.pretrain_steps, "none", 0),
                                           ("sft", budget.sft_steps, sft_init, 1))[-len(llm_stages):]:
        argv = ["--output-dir", str(out / stage), "--tokenizer", str(tokenizer), "--init-from", init_from,
                "--max-steps", str(steps), "--per-device-train-batch-size", str(budget.batch_size),
                "--resume", "auto", *data[stage], *budget.stage_flags,
                *(budget.sft_flags if stage == "sft" else ())]
        if budget.max_minutes:
            argv += ["--max-minutes", str(budget.max_minutes[limit])]
        stages.append(Stage(stage, f"stage {limit + 1}, {steps} steps × {budget.batch_size}",
                            out / stage / "config.json", [(f"train/{stage}.py", argv)]))
    model = out / "sft"
    if budget.later_sittings and budget.pretokenize:
        raise ValueError("later stage-2 sittings read ShapesWorld on the fly; a pre-tokenized budget has none")
    for number, sitting in enumerate(budget.later_sittings, 2):
        name = f"sft-{number}"
        argv = ["--output-dir", str(out / name), "--tokenizer", str(tokenizer), "--init-from", str(model),
                "--max-steps", str(sitting.steps), "--per-device-train-batch-size", str(budget.batch_size),
                "--resume", "auto", *shapesworld, *sitting.data_flags, *budget.stage_flags, *sitting.flags]
        stages.append(Stage(name, f"stage 2, sitting {number}: {sitting.steps} steps × {budget.batch_size} from "
                            f"{model.name}", out / name / "config.json", [("train/sft.py", argv)]))
        model = out / name
    stages.append(Stage("report", "held-out VQA, drawing, reconstruction (and speed)",
                        out / "report" / "report_card.json",
                        [("eval.report", ["--model", str(model), "--output-dir", str(out / "report"),
                                          *budget.report_flags])]))
    if budget.speed:
        speed_dir = out / "speed"
        stages.append(Stage("speed", "speed card " + " ".join(budget.speed), speed_dir / "speed_card.json",
                            [("eval.speed", [*budget.speed, "--output-dir", str(speed_dir)])],
                            timeout_s=budget.speed_timeout_s))
    return stages


def run_command(program: str, argv: list[str], timeout_s: float | None) -> None:
    if program in ENTRY_POINTS:
        ENTRY_POINTS[program](argv)
        gc.collect()  # the stage's model and optimizer go before the next stage builds its own
        return
    subprocess.run([sys.executable, "-m", program, *argv], cwd=REPO_DIR, check=True, timeout=timeout_s)


def run(stages: list[Stage], out: Path) -> list[dict]:
    """Run the stages that are not done yet, with a header per stage; returns their records (also in
    OUTPUT/recipe.json, rewritten after every stage)."""
    records = []
    for number, stage in enumerate(stages, 1):
        lines = [command_line(program, argv) for program, argv in stage.commands]
        record = {"stage": stage.name, "what": stage.what, "commands": lines}
        print(f"\n=== [{number}/{len(stages)}] {stage.name}: {stage.what}", flush=True)
        if stage.done.exists():
            print(f"    done already ({stage.done} exists): skipped", flush=True)
            records.append({**record, "status": "skipped (done)"})
            continue
        start = time.perf_counter()
        with (out / "commands.sh").open("a", encoding="utf-8") as log:
            log.writelines(f"{line}\n" for line in lines)
        try:
            for (program, argv), line in zip(stage.commands, lines):
                print(f"    $ {line}", flush=True)
                run_command(program, argv, stage.timeout_s)
        except subprocess.TimeoutExpired:  # recorded and reported; the stages after it still run
            print(f"=== [{number}/{len(stages)}] {stage.name} TIMED OUT after {stage.timeout_s:.0f} s", flush=True)
            records.append({**record, "status": f"timed out after {stage.timeout_s:.0f} s"})
            continue
        if not stage.done.exists():
            raise RuntimeError(f"stage {stage.name} finished without writing {stage.done}")
        records.append({**record, "status": "done", "seconds": round(time.perf_counter() - start, 1)})
        (out / "recipe.json").write_text(json.dumps(records, indent=2))
        print(f"=== [{number}/{len(stages)}] {stage.name} done in {records[-1]['seconds']:.0f} s", flush=True)
    (out / "recipe.json").write_text(json.dumps(records, indent=2))
    return records


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m train.recipes.shapesworld", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", default="quick", choices=sorted(BUDGETS), help="step counts and sizes (default quick)")
    p.add_argument("--output-dir", default="runs/shapesworld", help="every stage's output goes under it")
    p.add_argument("--from-shipped", action="store_true",
                   help="start from the committed teacher and tokenizer instead of training them")
    p.add_argument("--dry-run", action="store_true",
                   help="the budget's stages at tiny sizes on the CPU (fp32, no DeepSpeed): proves the chain works")
    p.add_argument("--stage-args", default="",
                   help="further flags for both LLM stages, e.g. '--learning-rate 5e-4 --deepspeed zero2'")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    budget = dry_run_budget(BUDGETS[args.budget]) if args.dry_run else BUDGETS[args.budget]
    budget = replace(budget, stage_flags=(*budget.stage_flags, *shlex.split(args.stage_args)))
    out = Path(args.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    records = run(plan(budget, out, args.from_shipped), out)
    print("\n" + "\n".join(f"{r['stage']:>12}: {r['status']}" + (f" ({r['seconds']:.0f} s)" if "seconds" in r else "")
                           for r in records))
    print(f"model: {out / 'sft'}   report: {out / 'report' / 'report_card.md'}   commands: {out / 'commands.sh'}")
    return records


if __name__ == "__main__":
    sys.exit(0 if all(not r["status"].startswith("timed out") for r in main()) else 1)
