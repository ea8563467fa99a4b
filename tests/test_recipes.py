"""The one-command ShapesWorld recipe at dry-run sizes: every stage runs, writes what the next one reads, is
recorded, and a second run skips what is done and resumes what is not; the budgets' plans; the stages' wall-clock
budget (`--max-minutes`)."""

import csv
import json
import shlex
from dataclasses import replace

import pytest
import torch
import yaml
from transformers import TrainerControl, TrainerState

from tokenizer import TokenFlowConfig, TokenFlowTokenizer
from train import pretrain
from train.recipes import shapesworld as recipe
from train.time_budget import TimeBudgetCallback
from train.trainer import last_complete_checkpoint

GPU_STAGES = ["teacher", "tokenizer", "pretokenize", "pretrain", "sft", "report", "speed"]


def test_gpu_recipe_dry_run_from_scratch_runs_every_stage_and_resumes(tmp_path):
    out = tmp_path / "run"
    records = recipe.main(["--budget", "h200", "--dry-run", "--output-dir", str(out)])
    assert [r["stage"] for r in records] == GPU_STAGES
    assert all(r["status"] == "done" for r in records)
    assert json.loads((out / "recipe.json").read_text()) == records

    # each stage consumed the previous one's output
    assert (out / "teacher" / "open_clip_model.safetensors").is_file()
    assert TokenFlowTokenizer.from_pretrained(out / "tokenizer" / "tokenizer").config.preset == "tiny"
    for stage in ("pretrain", "sft"):
        manifest = json.loads((out / "data" / stage / "manifest.json").read_text())
        assert manifest["num_conversations"] == 8 and manifest["stage"] == stage
        assert manifest["reasoned_answers"] == ("relation" if stage == "sft" else None)
        assert (manifest["slot_label_side"] is not None) == (stage == "sft")
        options = yaml.safe_load((out / stage / "run_config.yaml").read_text())
        assert options["data"] == f"pretokenized:{out / 'data' / stage}"
        assert options["tokenizer"] == str(out / "tokenizer" / "tokenizer")
        assert options["max_steps"] == 2 and options["bf16"] is False and options["max_minutes"] > 0
        with open(out / stage / "train_log.csv", newline="") as f:
            assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2]
    assert yaml.safe_load((out / "sft" / "run_config.yaml").read_text())["init_from"] == str(out / "pretrain")
    card = json.loads((out / "report" / "report_card.json").read_text())
    assert card["settings"]["model"] == str(out / "sft") and card["vqa"]["num_questions"] == 2
    assert json.loads((out / "speed" / "speed_card.json").read_text())["drawing"]

    # commands.sh holds every command, each one a line a user can run
    lines = (out / "commands.sh").read_text().splitlines()
    assert [shlex.split(line)[1] for line in lines] == [
        "train/train_teacher.py", "train/train_tokenizer.py", "train/pretokenize.py", "train/pretokenize.py",
        "train/pretrain.py", "train/sft.py", "-m", "-m"]
    assert lines[-2].startswith("python -m eval.report") and lines[-1].startswith("python -m eval.speed")

    # a run stopped in stage 2 after its checkpoint: a second run skips what is done and resumes stage 2 only
    (out / "sft" / "config.json").unlink()
    records = recipe.main(["--budget", "h200", "--dry-run", "--output-dir", str(out)])
    assert {r["stage"]: r["status"] for r in records} == {**{s: "skipped (done)" for s in GPU_STAGES}, "sft": "done"}
    assert (out / "sft" / "config.json").is_file()
    assert len((out / "commands.sh").read_text().splitlines()) == len(lines) + 1


def test_plans_of_the_budgets(tmp_path):
    quick = recipe.plan(recipe.BUDGETS["quick"], tmp_path, from_shipped=False)
    assert [s.name for s in quick] == ["teacher", "tokenizer", "pretrain", "sft", "report"]
    argv = quick[3].commands[0][1]
    assert argv[argv.index("--max-steps") + 1] == "1100" and argv[argv.index("--data") + 1] == "shapesworld"
    assert argv[argv.index("--init-from") + 1] == str(tmp_path / "pretrain")
    tokenizer_argv = quick[1].commands[0][1]
    assert tokenizer_argv[tokenizer_argv.index("--export-dir") + 1] == "none"  # never overwrites the shipped one

    bundled = recipe.plan(recipe.BUDGETS["bundled"], tmp_path, from_shipped=True)
    # No stage 1: stage 2 starts on a new backbone, then continues in a second and a third sitting.
    assert [s.name for s in bundled] == ["sft", "sft-2", "sft-3", "report"]
    sft_line = recipe.command_line(*bundled[0].commands[0])
    assert "--init-from none" in sft_line and "--backbone shapesworld-narrow" in sft_line
    assert ("--shapesworld-tasks vqa:0.45,describe:0.15,t2i:0.4 --reasoned-answers relation --questions-per-image 6"
            in sft_line)
    assert "--curriculum-steps 500 --slot-loss-weight 1" in sft_line
    second = recipe.command_line(*bundled[1].commands[0])
    assert f"--init-from {tmp_path / 'sft'}" in second and "--extra-questions relation:2" in second
    assert "--shapesworld-tasks vqa:0.4,describe:0.1,t2i:0.5" in second and "--curriculum-steps" not in second
    third = recipe.command_line(*bundled[2].commands[0])
    assert f"--init-from {tmp_path / 'sft-2'}" in third and "--scale-reveal-prob 0.5" in third
    report = recipe.command_line(*bundled[3].commands[0])  # graded with the bundled model's sampler
    assert f"--model {tmp_path / 'sft-3'}" in report and "--scale-rounds 2 --self-check 16" in report
    assert [s.name for s in recipe.plan(recipe.dry_run_budget(recipe.BUDGETS["bundled"]), tmp_path, True)] == \
        ["sft", "sft-2", "sft-3", "report"]  # the dry run keeps the budget's stages
    with_stage_1 = recipe.plan(replace(recipe.BUDGETS["bundled"], pretrain_steps=1000), tmp_path, from_shipped=True)
    pretrain_line, sft_line = (recipe.command_line(*stage.commands[0]) for stage in with_stage_1[:2])
    assert f"--init-from {tmp_path / 'pretrain'}" in sft_line and "--shapesworld-tasks" in sft_line
    assert "--shapesworld-tasks" not in pretrain_line and "--curriculum-steps" not in pretrain_line  # stage 2 only

    # Later sittings continue stage 2, each from the one before, with their own data and training flags.
    sittings = (recipe.Sitting(300, ("--shapesworld-tasks", "vqa:1", "--extra-questions", "relation:2"),
                               ("--learning-rate", "5e-4")), recipe.Sitting(200, (), ("--seed", "2")))
    continued = recipe.plan(replace(recipe.BUDGETS["bundled"], later_sittings=sittings), tmp_path, True)
    assert [s.name for s in continued] == ["sft", "sft-2", "sft-3", "report"]
    for stage, previous, steps in zip(continued[1:3], ("sft", "sft-2"), (300, 200)):
        argv = stage.commands[0][1]
        assert argv[argv.index("--init-from") + 1] == str(tmp_path / previous)
        assert argv[argv.index("--output-dir") + 1] == str(tmp_path / stage.name)
        assert argv[argv.index("--max-steps") + 1] == str(steps) and "--resume auto" in shlex.join(argv)
        assert "--curriculum-steps" not in argv  # the sitting's flags replace stage 2's
    second, third = (recipe.command_line(*stage.commands[0]) for stage in continued[1:3])
    assert "--shapesworld-tasks vqa:1 --extra-questions relation:2" in second and "--learning-rate 5e-4" in second
    assert "--shapesworld-tasks" not in third and "--seed 2" in third
    assert continued[-1].commands[0][1][:2] == ["--model", str(tmp_path / "sft-3")]  # the report grades the last
    dry = recipe.dry_run_budget(replace(recipe.BUDGETS["bundled"], later_sittings=sittings))
    assert [s.steps for s in dry.later_sittings] == [2, 2]
    with pytest.raises(ValueError, match="pre-tokenized budget"):
        recipe.plan(replace(recipe.BUDGETS["h200"], later_sittings=sittings), tmp_path, True)

    gpu = recipe.plan(recipe.BUDGETS["h200"], tmp_path, from_shipped=True)
    assert [s.name for s in gpu] == ["pretokenize", "pretrain", "sft", "report", "speed"]
    # Stage 2's data options go to its shards, with the slots' labels its description head trains on.
    pretokenize_pretrain, pretokenize_sft = (recipe.command_line(*c) for c in gpu[0].commands)
    assert "--shapesworld-tasks" not in pretokenize_pretrain and "--slot-labels" not in pretokenize_pretrain
    assert ("--shapesworld-tasks vqa:0.45,describe:0.15,t2i:0.4 --reasoned-answers relation --questions-per-image 6 "
            "--slot-labels" in pretokenize_sft)
    gpu_sft = recipe.command_line(*gpu[2].commands[0])
    assert "--slot-loss-weight 1" in gpu_sft and "--shapesworld-tasks" not in gpu_sft
    for stage, limit in zip(gpu[1:3], recipe.BUDGETS["h200"].max_minutes):
        line = recipe.command_line(*stage.commands[0])
        assert "--bf16 true" in line and f"--max-minutes {limit}" in line and "--data pretokenized:" in line
        assert f"--tokenizer {recipe.DEFAULT_TOKENIZER}" in line
    assert sum(recipe.BUDGETS["h200"].max_minutes) < 7  # room for pre-tokenizing, the report and the speed card
    assert gpu[-1].commands[0][1][:2] == ["--config", "clipb-256+llama-7b"] and gpu[-1].timeout_s


def test_time_budget_callback_stops_and_saves_once_spent():
    now = [0.0]
    callback = TimeBudgetCallback(0.5, clock=lambda: now[0])
    state, control = TrainerState(max_steps=100), TrainerControl()
    callback.on_train_begin(None, state, control)
    now[0], state.global_step = 29.0, 3
    callback.on_step_end(None, state, control)
    assert not control.should_training_stop and not control.should_save
    now[0], state.global_step = 30.0, 4
    callback.on_step_end(None, state, control)
    assert control.should_training_stop and control.should_save and callback.stopped_at_step == 4
    with pytest.raises(ValueError, match="max-minutes"):
        TimeBudgetCallback(0)


def test_stage_with_max_minutes_stops_early_with_a_final_model_and_checkpoint(tmp_path):
    torch.manual_seed(0)
    TokenFlowTokenizer(TokenFlowConfig.from_preset("tiny")).save_pretrained(tmp_path / "tokenizer")
    out = tmp_path / "stage1"
    pretrain.main(["--use-cpu", "true", "--bf16", "false", "--tokenizer", str(tmp_path / "tokenizer"),
                   "--backbone", "shapesworld-tiny", "--output-dir", str(out), "--max-steps", "50",
                   "--per-device-train-batch-size", "2", "--num-samples", "64", "--logging-steps", "1",
                   "--save-steps", "1000", "--report-to", "none", "--deepspeed", "none", "--init-from", "none",
                   "--num-sample-prompts", "1", "--max-minutes", "0.0001"])  # spent within the first step
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert last_complete_checkpoint(out) == str(out / "checkpoint-1")
    with open(out / "train_log.csv", newline="") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1]


def test_max_minutes_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="--max-minutes=0.0"):
        pretrain.main(["--output-dir", str(tmp_path), "--max-minutes", "0", "--deepspeed", "none"])


def test_a_stage_past_its_time_limit_is_recorded_and_the_next_stage_still_runs(tmp_path):
    slow = recipe.Stage("slow", "sleeps", tmp_path / "never", [("timeit", ["-n", "1", "import time; time.sleep(60)"])],
                        timeout_s=1)
    marker = tmp_path / "after.txt"
    after = recipe.Stage("after", "writes a file", marker, [("timeit", ["-n", "1", f"open({str(marker)!r}, 'w')"])])
    records = recipe.run([slow, after], tmp_path)
    assert [r["status"] for r in records] == ["timed out after 1 s", "done"]
    assert json.loads((tmp_path / "recipe.json").read_text())[0]["status"] == "timed out after 1 s"
