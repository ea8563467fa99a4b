"""The two LLM training stages on CPU with a tiny backbone and a random tiny tokenizer: entry points, smoke runs
(one under DeepSpeed ZeRO-2), kill + resume equality, LoRA, NaN guard, options, data formats, mixture, CFG drop,
skipped samples."""

import csv
import json
import logging
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from transformers import set_seed

import llm
from tokenizer import TokenFlowConfig, TokenFlowTokenizer
from train import pretrain, sft
from train.arguments import parse_stage_args
from train.conversations import (
    CaptionConversations, LlavaConversations, MixtureDataset, ShapesWorldConversations, TextConversations,
    conversation_images,
)
from train.stage import build_dataset, build_model
from train.trainer import SKIP_REASONS, ConversationCollator, TokenFlowTrainer, last_complete_checkpoint
from unimodal.shapesworld import ShapesWorld, final_answer
from unimodal.shapesworld.language import implied_relation_answer

REPO = Path(__file__).resolve().parents[1]
STEPS = 20
LOSS_COLUMNS = ("loss", "grad_norm", "learning_rate", "text_loss", "image_loss")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A random tiny tokenizer (the default ShapesWorld one may not be trained yet) and a small image data set."""
    root = tmp_path_factory.mktemp("stages")
    torch.manual_seed(0)
    TokenFlowTokenizer(TokenFlowConfig.from_preset("tiny")).save_pretrained(root / "tokenizer")
    images = root / "images"
    images.mkdir()
    world = ShapesWorld("train", size=64, num_samples=4, seed=5)
    for i in range(4):
        world[i].image.save(images / f"{i}.png")
    (images / "broken.png").write_bytes(b"GIF89a truncated")
    return root


def stage_argv(workdir, output, *extra, steps=STEPS):
    # CPU and fp32 also on a GPU machine: the resume tests compare losses exactly, which CUDA kernels do not promise.
    return ["--use-cpu", "true", "--bf16", "false", "--tokenizer", str(workdir / "tokenizer"),
            "--backbone", "shapesworld-tiny", "--output-dir", str(output), "--max-steps", str(steps),
            "--per-device-train-batch-size", "2", "--num-samples", "64", "--logging-steps", "1", "--save-steps", "10",
            "--report-to", "none", "--deepspeed", "none", "--num-sample-prompts", "2", "--init-from", "none", *extra]


def read_log(output) -> list[dict]:
    with open(Path(output) / "train_log.csv", newline="") as f:
        return list(csv.DictReader(f))


def killed_after_checkpoint(reference, output, step: int) -> None:
    """`output` as a run of the same options as `reference` leaves it when killed right after saving checkpoint
    `step`: that checkpoint and the log up to it."""
    output.mkdir()
    shutil.copytree(reference / f"checkpoint-{step}", output / f"checkpoint-{step}")
    lines = (reference / "train_log.csv").read_text().splitlines()
    (output / "train_log.csv").write_text("\n".join(lines[: step + 1]) + "\n")


def assert_same_losses(output, reference, steps: int) -> None:
    got, expected = read_log(output), read_log(reference)
    assert [int(r["step"]) for r in got] == [int(r["step"]) for r in expected] == list(range(1, steps + 1))
    for row, expected_row in zip(got, expected):
        assert {k: row.get(k) for k in LOSS_COLUMNS} == {k: expected_row.get(k) for k in LOSS_COLUMNS}, row["step"]


@pytest.fixture(scope="module")
def stage1(workdir):
    """A 20-step stage-1 run with checkpoints at steps 10 and 20 (the uninterrupted reference of the resume test)."""
    output = workdir / "pretrain"
    assert pretrain.main(stage_argv(workdir, output)) == str(output)
    return output


# ---------------------------------------------------------------------------------------------------- entry points

def test_help_of_both_entry_points(capsys, monkeypatch):
    # sft.py by path in a fresh interpreter, exactly as `deepspeed train/sft.py --help` starts it.
    result = subprocess.run([sys.executable, str(REPO / "train" / "sft.py"), "--help"], capture_output=True,
                            text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    for option in ("--init_from", "--lora", "--data", "--mixture", "--cfg_drop_prob", "--deepspeed", "--max_steps"):
        assert option in result.stdout
    monkeypatch.setattr(os, "environ", dict(os.environ))  # the launch setup must not leak into later tests
    with pytest.raises(SystemExit) as exit_info:
        pretrain.main(["--help"])
    assert exit_info.value.code == 0
    assert "usage: train/pretrain.py" in capsys.readouterr().out


def test_stage1_smoke(stage1, workdir):
    rows = read_log(stage1)
    assert [int(r["step"]) for r in rows] == list(range(1, STEPS + 1))
    assert all(math.isfinite(float(r["loss"])) for r in rows)
    assert any(r["image_loss"] for r in rows) and any(r["text_loss"] for r in rows)  # both directions train
    assert float(rows[0]["tokens_per_s"]) > 0
    for name in ("config.json", "model.safetensors", "run_config.yaml", "trainable_parameters.md", "loss_curve.png",
                 f"samples/step-{STEPS}/answers.md", f"samples/step-{STEPS}/drawings.png"):
        assert (stage1 / name).exists(), name
    assert last_complete_checkpoint(stage1) == str(stage1 / f"checkpoint-{STEPS}")
    options = yaml.safe_load((stage1 / "run_config.yaml").read_text())
    assert options["stage"] == "pretrain" and options["max_steps"] == STEPS
    table = (stage1 / "trainable_parameters.md").read_text()
    assert "`language_model.model.embed_tokens.weight` counts as trainable above, but only 3 of its" in table

    # Stage 1 trains the connectors and the new token rows; the rest of the backbone is exactly unchanged.
    trained = llm.TokenFlowMLLM.from_pretrained(str(stage1))
    set_seed(0)  # as run_stage does before building the model
    initial, _ = build_model(SimpleNamespace(
        init_from=None, tokenizer=str(workdir / "tokenizer"), backbone="shapesworld-tiny", chat_format="chatml",
        max_length=512, understanding_features="joint", understanding_positions="sincos2d",
        understanding_projector="conv2x_gelu", image_placement="before_text", embedding_init_std=None,
        initializer_range=None))
    # The stages' defaults for new models.
    assert trained.config.understanding_positions == "sincos2d" and trained.config.understanding_features == "joint"
    assert trained.config.understanding_projector == "conv2x_gelu"
    new_rows = [trained.config.image_token_id, trained.config.boi_token_id, trained.config.eoi_token_id]
    before, after = initial.state_dict(), trained.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed, "nothing trained"
    for name in changed:
        assert not name.startswith("image_tokenizer."), name
        if name.startswith("language_model."):
            assert name.endswith(("embed_tokens.weight", "lm_head.weight")), name
            rows = (before[name] != after[name]).any(dim=1).nonzero().flatten().tolist()
            assert set(rows) <= set(new_rows), (name, rows)
    assert any(name.startswith("image_head") for name in changed)


def test_kill_and_resume_give_the_losses_of_an_uninterrupted_run(stage1, workdir, monkeypatch):
    output = workdir / "pretrain-killed"

    class Killed(Exception):
        pass

    compute_loss = TokenFlowTrainer.compute_loss

    def dies_at_step_13(self, model, inputs, *args, **kwargs):
        if self.state.global_step == 12:  # during step 13, after the step-10 checkpoint
            raise Killed
        return compute_loss(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(TokenFlowTrainer, "compute_loss", dies_at_step_13)
    with pytest.raises(Killed):
        pretrain.main(stage_argv(workdir, output))
    monkeypatch.setattr(TokenFlowTrainer, "compute_loss", compute_loss)
    assert [int(r["step"]) for r in read_log(output)] == list(range(1, 13))
    (output / "checkpoint-12").mkdir()  # a save cut off by the kill: no completion marker, never resumed from
    assert last_complete_checkpoint(output) == str(output / "checkpoint-10")

    pretrain.main(stage_argv(workdir, output))  # --resume auto
    assert_same_losses(output, stage1, STEPS)


def test_stage2_under_deepspeed_zero2_from_the_stage1_output(stage1, workdir):
    """`train/sft.py --init-from <stage-1>` in a fresh process under DeepSpeed ZeRO-2 on the CPU accelerator.

    DeepSpeed compiles its CPU communication op once per TORCH_EXTENSIONS_DIR (about a minute on 2 cores); the
    cache under the repository keeps later runs fast."""
    output = workdir / "sft-zero2"
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions")))
    argv = stage_argv(workdir, output, "--init-from", str(stage1))[2:]  # DeepSpeed picks the CPU itself
    argv[argv.index("--deepspeed") + 1] = "zero2"
    result = subprocess.run([sys.executable, str(REPO / "train" / "sft.py"), *argv], capture_output=True, text=True,
                            timeout=600, cwd=REPO, env=env)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    rows = read_log(output)
    assert [int(r["step"]) for r in rows] == list(range(1, STEPS + 1))
    assert all(math.isfinite(float(r["loss"])) for r in rows)
    checkpoint = Path(last_complete_checkpoint(output))
    assert (checkpoint / "latest").exists()  # a DeepSpeed checkpoint (engine state), not a plain Trainer one
    options = yaml.safe_load((output / "run_config.yaml").read_text())
    assert options["stage"] == "sft" and options["init_from"] == str(stage1)
    assert options["deepspeed"].endswith("zero2.json")
    table = (output / "trainable_parameters.md").read_text()
    assert "| language_model.model |" in table and "| 0 |" in table.split("language_model.model |")[1].split("\n")[0]
    model = llm.TokenFlowMLLM.from_pretrained(str(output))
    start = llm.TokenFlowMLLM.from_pretrained(str(stage1))
    layer = "language_model.model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(model.state_dict()[layer], start.state_dict()[layer])  # stage 2 trains the backbone

    # Resuming the DeepSpeed engine state from the step-10 checkpoint gives the uninterrupted run's losses.
    resumed = workdir / "sft-zero2-resumed"
    killed_after_checkpoint(output, resumed, 10)
    argv[argv.index("--output-dir") + 1] = str(resumed)
    result = subprocess.run([sys.executable, str(REPO / "train" / "sft.py"), *argv], capture_output=True, text=True,
                            timeout=600, cwd=REPO, env=env)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert f"resuming from {resumed / 'checkpoint-10'}" in result.stdout
    assert_same_losses(resumed, output, STEPS)


def test_stage2_under_deepspeed_zero3_saves_a_loadable_model(stage1, workdir):
    """Under ZeRO-3 the parameters are partitioned from construction on (`zero.Init`); the final folder holds the
    weights gathered on save (`stage3_gather_16bit_weights_on_model_save`) and loads with `from_pretrained`."""
    output = workdir / "sft-zero3"
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions")))
    argv = stage_argv(workdir, output, "--init-from", str(stage1), steps=3)[2:]
    argv[argv.index("--deepspeed") + 1] = "zero3"
    result = subprocess.run([sys.executable, str(REPO / "train" / "sft.py"), *argv], capture_output=True, text=True,
                            timeout=600, cwd=REPO, env=env)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert yaml.safe_load((output / "run_config.yaml").read_text())["deepspeed"].endswith("zero3.json")
    trained = llm.TokenFlowMLLM.from_pretrained(str(output)).state_dict()
    start = llm.TokenFlowMLLM.from_pretrained(str(stage1)).state_dict()
    assert trained.keys() == start.keys()
    assert all(trained[k].shape == start[k].shape for k in start)
    assert all(torch.equal(trained[k], start[k]) for k in start if k.startswith("image_tokenizer."))  # frozen
    layer = "language_model.model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(trained[layer], start[layer])  # the gathered weights are the trained ones

    # A new model (no --init-from) under ZeRO-3 is built whole and partitioned by the engine; its frozen tokenizer
    # holds the loaded tokenizer's weights.
    output = workdir / "sft-zero3-new"
    argv = stage_argv(workdir, output, steps=2)[2:]
    argv[argv.index("--deepspeed") + 1] = "zero3"
    result = subprocess.run([sys.executable, str(REPO / "train" / "sft.py"), *argv], capture_output=True, text=True,
                            timeout=600, cwd=REPO, env=env)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    new = llm.TokenFlowMLLM.from_pretrained(str(output)).image_tokenizer.state_dict()
    loaded = TokenFlowTokenizer.from_pretrained(str(workdir / "tokenizer")).state_dict()
    assert new.keys() == loaded.keys() and all(torch.equal(new[k], loaded[k]) for k in loaded)


def test_lora_saves_adapters_and_merges(stage1, workdir):
    """LoRA on LLaVA + text data (one unreadable image among them, skipped and counted in the log)."""
    from peft import PeftModel

    llava = [{"id": f"vqa-{i}", "image": f"{i}.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is in the picture?"}, {"from": "gpt", "value": f"shapes {i}"}]}
        for i in range(3)]
    llava.append({"id": "broken", "image": "broken.png", "conversations": [
        {"from": "human", "value": "<image>\nAnd this?"}, {"from": "gpt", "value": "nothing"}]})
    (workdir / "lora-llava.json").write_text(json.dumps(llava))
    (workdir / "lora-text.jsonl").write_text(json.dumps({"messages": [
        {"role": "user", "content": "What colour is the sky?"}, {"role": "assistant", "content": "blue"}]}) + "\n")
    output = workdir / "sft-lora"
    options = ("--init-from", str(stage1), "--lora", "true", "--lora-rank", "4", "--lora-targets", "q_proj,v_proj",
               "--merge-lora", "false", "--learning-rate", "1e-2", "--save-steps", "3",
               "--data", f"llava:{workdir / 'lora-llava.json'},text:{workdir / 'lora-text.jsonl'}",
               "--mixture", "llava:0.8,text:0.2", "--image-folder", str(workdir / "images"), "--num-samples", "24")
    sft.main(stage_argv(workdir, output, *options, steps=6))
    rows = read_log(output)
    assert len(rows) == 6 and int(rows[-1]["skipped_unreadable_image"]) >= 1
    resumed = workdir / "sft-lora-resumed"  # LoRA resume: adapters and optimizer state come back from checkpoint-3
    killed_after_checkpoint(output, resumed, 3)
    sft.main(stage_argv(workdir, resumed, *options, steps=6))
    assert_same_losses(resumed, output, 6)
    # the skip counters continue from the checkpoint instead of starting again at 0
    assert read_log(resumed)[-1]["skipped_unreadable_image"] == rows[-1]["skipped_unreadable_image"]
    assert (output / "lora_adapter" / "adapter_config.json").exists()
    merged = llm.TokenFlowMLLM.from_pretrained(str(output)).eval()
    start = llm.TokenFlowMLLM.from_pretrained(str(stage1)).eval()
    assert not any("lora" in name for name in merged.state_dict())
    q_proj = "language_model.model.layers.0.self_attn.q_proj.weight"
    k_proj = "language_model.model.layers.0.self_attn.k_proj.weight"
    assert not torch.equal(merged.state_dict()[q_proj], start.state_dict()[q_proj])  # adapters merged in
    assert torch.equal(merged.state_dict()[k_proj], start.state_dict()[k_proj])  # no adapter, frozen base

    # The saved adapters on the stage-1 backbone give the merged backbone's outputs (text ids that are not new rows).
    adapted = PeftModel.from_pretrained(start.language_model, str(output / "lora_adapter")).eval()
    ids = torch.tensor([[5, 9, 14, 20, 7, 11]])
    new_rows = {merged.config.image_token_id, merged.config.boi_token_id, merged.config.eoi_token_id}
    keep = [i for i in range(merged.config.text_config.vocab_size) if i not in new_rows]
    with torch.no_grad():
        torch.testing.assert_close(adapted(input_ids=ids).logits[..., keep],
                                   merged.language_model(input_ids=ids).logits[..., keep], rtol=1e-4, atol=1e-4)


def test_nan_loss_stops_the_run_naming_the_step(workdir, monkeypatch):
    forward = llm.TokenFlowMLLM.forward
    calls = {"n": 0}

    def nan_on_third_step(self, *args, **kwargs):
        outputs = forward(self, *args, **kwargs)
        if self.training and kwargs.get("labels") is not None:
            calls["n"] += 1
            if calls["n"] == 3:
                outputs.loss = outputs.loss * float("nan")
        return outputs

    monkeypatch.setattr(llm.TokenFlowMLLM, "forward", nan_on_third_step)
    with pytest.raises(FloatingPointError, match="at step 3 "):
        pretrain.main(stage_argv(workdir, workdir / "pretrain-nan", steps=5))


# ---------------------------------------------------------------------------------------------------- options

def test_config_file_below_command_line(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"max_steps": 7, "learning_rate": 0.01, "lora_rank": 4,
                                      "per-device-train-batch-size": 3, "cfg_drop_prob": 0.25}))
    stage_args, training_args = parse_stage_args(
        "sft", ["--config", str(config), "--max-steps", "9", "--cfg_drop_prob", "0.5", "--deepspeed", "none"])
    assert training_args.max_steps == 9 and stage_args.cfg_drop_prob == 0.5  # command line wins
    assert training_args.learning_rate == 0.01 and stage_args.lora_rank == 4  # then the file
    assert training_args.per_device_train_batch_size == 3
    assert training_args.output_dir == "outputs/sft" and training_args.warmup_steps == 20  # then the defaults
    assert training_args.deepspeed is None
    config.write_text(yaml.safe_dump({"max_step": 7}))
    with pytest.raises(ValueError, match=r"unknown options \['max_step'\]"):
        parse_stage_args("sft", ["--config", str(config), "--deepspeed", "none"])
    with pytest.raises(ValueError, match="stage-2 option"):
        parse_stage_args("pretrain", ["--lora", "true", "--deepspeed", "none"])


def test_stage2_starts_from_the_stage1_default_output(tmp_path, monkeypatch):
    """`deepspeed train/sft.py` with no --init-from continues stage 1's default output when it holds a model, and
    builds a new model when it does not (or when told `none`); an explicit folder is kept as given."""
    monkeypatch.chdir(tmp_path)
    assert parse_stage_args("sft", ["--deepspeed", "none"])[0].init_from is None
    (tmp_path / "outputs" / "pretrain").mkdir(parents=True)
    assert parse_stage_args("sft", ["--deepspeed", "none"])[0].init_from is None  # a folder without a model
    (tmp_path / "outputs" / "pretrain" / "config.json").write_text("{}")
    assert parse_stage_args("sft", ["--deepspeed", "none"])[0].init_from == "outputs/pretrain"
    assert parse_stage_args("sft", ["--deepspeed", "none", "--init-from", "none"])[0].init_from is None
    assert parse_stage_args("sft", ["--deepspeed", "none", "--init-from", "run1"])[0].init_from == "run1"
    assert parse_stage_args("pretrain", ["--deepspeed", "none"])[0].init_from is None


# ---------------------------------------------------------------------------------------------------- data

@pytest.fixture(scope="module")
def processor():
    return llm.build_tiny()[1]


def test_llava_json_from_value_and_role_content_with_several_images(workdir, processor, tmp_path):
    (tmp_path / "llava.json").write_text(json.dumps([
        {"id": "a", "image": ["0.png", "1.png"], "conversations": [
            {"from": "human", "value": "<image>\nFirst, then <image> second?"}, {"from": "gpt", "value": "Yes."},
            {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "No."}]}]))
    (tmp_path / "llava.jsonl").write_text(json.dumps(
        {"id": "b", "image": "2.png", "conversations": [
            {"role": "user", "content": "What is it?"}, {"role": "assistant", "content": "A shape."}]}) + "\n")
    first = LlavaConversations(tmp_path / "llava.json", workdir / "images")[0]
    assert first["task"] == "vqa" and [m["role"] for m in first["messages"]] == ["user", "assistant"] * 2
    assert [i["type"] for i in first["messages"][0]["content"]] == ["image", "text", "image", "text"]
    assert [Path(i["image"]).name for i in conversation_images(first)] == ["0.png", "1.png"]
    second = LlavaConversations(tmp_path / "llava.jsonl", workdir / "images")[0]
    assert second["messages"][0]["content"][0] == {"type": "image", "image": str(workdir / "images" / "2.png")}

    batch = ConversationCollator(processor)([first, second])
    assert batch["pixel_values"].shape == (3, 3, 64, 64)
    assert int((batch["input_ids"] == processor.image_token_id).sum()) == 3 * processor.num_image_slots
    assert batch["data_stats"].tolist() == [0, 0, 0]
    supervised = processor.tokenizer.decode(batch["labels"][0][batch["labels"][0] != -100])
    assert "Yes." in supervised and "No." in supervised and "Sure?" not in supervised
    with pytest.raises(ValueError, match="2 <image> placeholders but 1 images"):
        (tmp_path / "bad.json").write_text(json.dumps([{"image": "0.png", "conversations": [
            {"from": "human", "value": "<image> <image>"}, {"from": "gpt", "value": "x"}]}]))
        LlavaConversations(tmp_path / "bad.json")[0]


def test_caption_jsonl_and_text_chat_jsonl(workdir, processor, tmp_path):
    with (tmp_path / "captions.jsonl").open("w") as f:
        for i in range(2):
            f.write(json.dumps({"image": f"images/{i}.png", "caption": [f"shapes {i}", f"picture {i}"]}) + "\n")
    os.symlink(workdir / "images", tmp_path / "images")
    captions = CaptionConversations(tmp_path / "captions.jsonl", mode="both", cfg_drop_prob=0.0)
    assert len(captions) == 4 and [captions[i]["task"] for i in range(4)] == ["caption", "t2i"] * 2
    batch = ConversationCollator(processor)([captions[0], captions[2]])
    assert batch["pixel_values"].shape == (2, 3, 64, 64) and "generation_pixel_values" not in batch
    batch = ConversationCollator(processor)([captions[1], captions[3]])
    assert batch["generation_pixel_values"].shape == (2, 3, 64, 64) and "pixel_values" not in batch
    assert int((batch["input_ids"] == processor.boi_token_id).sum()) == 2

    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]}]) + "\n")
    chat = TextConversations(tmp_path / "chat.jsonl")
    batch = ConversationCollator(processor)([chat[0], chat[1]])
    assert set(batch) == {"input_ids", "attention_mask", "labels", "data_stats"}
    assert (batch["labels"] != -100).any(dim=1).all()


def test_collator_skips_and_counts_never_substitutes(workdir, processor, caplog):
    image = str(workdir / "images" / "0.png")
    good = {"id": "good", "messages": [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "shapes"}]}]}
    corrupt = {"id": "corrupt", "messages": [
        {"role": "user", "content": [{"type": "image", "image": str(workdir / "images" / "broken.png")}]},
        {"role": "assistant", "content": [{"type": "text", "text": "x"}]}]}
    unsupervised = {"id": "no-answer", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    long_text = {"id": "too-long", "messages": [{"role": "user", "content": [{"type": "text", "text": "a " * 300}]},
                                                 {"role": "assistant", "content": [{"type": "text", "text": "b"}]}]}
    collator = ConversationCollator(processor, max_length=200)
    with caplog.at_level(logging.WARNING):
        batch = collator([json.loads(json.dumps(c)) for c in (corrupt, good, unsupervised, long_text)])
    assert dict(zip(SKIP_REASONS, batch["data_stats"].tolist())) == {
        "unreadable_image": 1, "too_long": 1, "unsupervised": 1}
    alone = collator([json.loads(json.dumps(good))])
    for key in ("input_ids", "labels", "pixel_values"):  # the batch is the good sample alone: nothing replaced
        assert torch.equal(batch[key], alone[key]), key
    for sample_id in ("corrupt", "no-answer", "too-long"):
        assert f"skipping sample {sample_id}" in caplog.text
    with pytest.raises(RuntimeError, match="every sample of a batch was skipped"):
        collator([json.loads(json.dumps(corrupt))])


def test_mixture_is_deterministic_and_follows_the_weights():
    sources = {"a": [{"id": f"a{i}"} for i in range(7)], "b": [{"id": f"b{i}"} for i in range(5)]}
    draws = 4000
    first = MixtureDataset(sources, {"a": 3.0, "b": 1.0}, num_samples=draws, seed=11)
    order = [first[i]["id"] for i in range(draws)]
    assert order == [MixtureDataset(sources, {"a": 3.0, "b": 1.0}, num_samples=draws, seed=11)[i]["id"]
                     for i in range(draws)]
    assert order != [MixtureDataset(sources, {"a": 3.0, "b": 1.0}, num_samples=draws, seed=12)[i]["id"]
                     for i in range(draws)]
    share_a = sum(x.startswith("a") for x in order) / draws
    assert abs(share_a - 0.75) < 0.03  # binomial std ≈ 0.007
    assert [first[i]["id"] for i in (17, 3, 17)] == [order[17], order[3], order[17]]  # any order of reading
    assert {first[i]["source"] for i in range(50)} == {"a", "b"}
    with pytest.raises(ValueError, match="unknown source 'c'"):
        MixtureDataset(sources, {"a": 1.0, "c": 1.0}, num_samples=10)

    # The stage's --data/--mixture options build the same thing.
    args = SimpleNamespace(data="shapesworld", mixture=None, shapesworld_tasks="vqa:0.5,text:0.5", num_samples=40,
                           cfg_drop_prob=0.1, image_folder=None, questions_per_image=3, question_types=None,
                           reasoned_answers=None, extra_questions=None, curriculum_steps=0)
    tasks = [c["task"] for c in build_dataset("sft", args, seed=0)]
    assert tasks == [c["task"] for c in build_dataset("sft", args, seed=0)] and set(tasks) == {"vqa", "text"}

    # Any ShapesWorld task can be weighted in either stage; VQA asks --questions-per-image questions per image.
    args.shapesworld_tasks, args.questions_per_image = "caption:0.5,vqa:0.5", 4
    dataset = build_dataset("sft", args, seed=0)
    conversations = [dataset[i] for i in range(40)]
    assert {c["task"] for c in conversations} == {"caption", "vqa"}
    for conversation in conversations:
        answers = [m for m in conversation["messages"] if m["role"] == "assistant"]
        images = [m for m in conversation["messages"] if m["role"] == "user" and any(
            item["type"] == "image" for item in m["content"])]
        assert len(images) == 1
        assert len(answers) == (1 if conversation["task"] == "caption" else 4)  # every scene has >= 4 questions


def test_cfg_drop_probability_is_honoured(tmp_path):
    (tmp_path / "captions.jsonl").write_text("".join(
        json.dumps({"image": f"{i}.png", "caption": f"caption {i}"}) + "\n" for i in range(2000)))
    for probability in (0.0, 0.3, 1.0):
        data = CaptionConversations(tmp_path / "captions.jsonl", mode="t2i", seed=4, cfg_drop_prob=probability)
        dropped = [c for c in (data[i] for i in range(len(data))) if c.get("cfg_dropped")]
        assert abs(len(dropped) / len(data) - probability) < 0.035  # std ≈ 0.01 at p = 0.3
        assert all(c["messages"][0]["content"] == [{"type": "text", "text": ""}] for c in dropped)
    world = ShapesWorldConversations("sft", num_samples=400, tasks={"t2i": 1.0}, cfg_drop_prob=0.25, seed=2)
    share = sum(bool(world[i].get("cfg_dropped")) for i in range(400)) / 400
    assert abs(share - 0.25) < 0.07  # std ≈ 0.022
    again = ShapesWorldConversations("sft", num_samples=400, tasks={"t2i": 1.0}, cfg_drop_prob=0.25, seed=2)
    assert [bool(again[i].get("cfg_dropped")) for i in range(40)] == [bool(world[i].get("cfg_dropped"))
                                                                     for i in range(40)]


def test_pretokenized_cannot_be_mixed_with_pixel_sources(tmp_path):
    args = SimpleNamespace(data=f"pretokenized:{tmp_path},shapesworld", mixture=None, shapesworld_tasks=None,
                           num_samples=4, cfg_drop_prob=0.1, image_folder=None, questions_per_image=3,
                           question_types=None, reasoned_answers=None, extra_questions=None,
                           curriculum_steps=0)
    (tmp_path / "manifest.json").write_text(json.dumps({
        "format": "tokenflow-pretokenized", "version": 1, "shards": [], "num_image_codes": 130,
        "num_drawn_images": 0, "cfg_drop_prob": 0.1}))
    (tmp_path / "conversations.jsonl").write_text("")
    with pytest.raises(ValueError, match="mixes pretokenized with \\['shapesworld'\\]"):
        build_dataset("sft", args, seed=0)


def test_describe_task_names_exactly_the_scene_objects_cell_by_cell(tmp_path):
    from unimodal.shapesworld import CELL_NAMES

    stage_args, _ = parse_stage_args("sft", ["--output-dir", str(tmp_path), "--shapesworld-tasks", "describe:1",
                                             "--num-samples", "30", "--init-from", "none", "--deepspeed", "none"])
    data = build_dataset("sft", stage_args, seed=0)
    world = ShapesWorld("train", size=64, num_samples=30)
    for index in range(30):
        conversation = data[index]
        assert conversation["task"] == "describe"
        user, assistant = conversation["messages"]
        assert user["content"][0]["type"] == "image"
        entries = [entry.split(": ") for entry in assistant["content"][0]["text"].split("; ")]
        cells = [CELL_NAMES.index(cell) for cell, _ in entries]
        assert cells == sorted(cells)  # reading order
        described = [(cell, *words.split(" ")) for cell, (_, words) in zip(cells, entries)]
        scene = world[index].scene
        assert described == [(o.cell, o.size, o.color, o.shape) for o in scene.objects]
    # The answer is made of whole words of the ShapesWorld text vocabulary (no word spelled out in pieces).
    text = data[0]["messages"][1]["content"][0]["text"]
    words = text.replace(":", " :").replace(";", " ;").split()
    assert len(llm.build_shapesworld_text_tokenizer()(text)["input_ids"]) == len(words)
    with pytest.raises(ValueError, match="unknown sft task 'describes'"):
        ShapesWorldConversations("sft", tasks={"describes": 1.0})


def test_tokenizer_option_names_a_file_and_the_converter(tmp_path):
    from train.stage import load_image_tokenizer

    checkpoint = tmp_path / "tokenflow.pt"
    checkpoint.write_bytes(b"not a folder")
    with pytest.raises(ValueError, match=r"is a file.*python -m tokenizer\.convert"):
        load_image_tokenizer(str(checkpoint))
    with pytest.raises(Exception, match="no such folder"):
        load_image_tokenizer(str(tmp_path / "missing"))


def test_curriculum_needs_a_shapesworld_source(tmp_path):
    with pytest.raises(ValueError, match="--curriculum-steps 5 applies to ShapesWorld scenes"):
        parse_stage_args("sft", ["--output-dir", str(tmp_path), "--data", f"pretokenized:{tmp_path}",
                                 "--curriculum-steps", "5", "--init-from", "none", "--deepspeed", "none"])


def test_image_placement_reaches_shapesworld_conversations(tmp_path):
    """`after_text` puts the image after the first question (and after a caption or describe request); the questions,
    answers and images are those of the `before_text` data."""
    common = dict(num_samples=40, tasks={"vqa": 0.5, "describe": 0.25, "caption": 0.25}, seed=3)
    before = ShapesWorldConversations("sft", **common)
    after = ShapesWorldConversations("sft", image_placement="after_text", **common)
    for index in range(40):
        b, a = before[index], after[index]
        assert a["task"] == b["task"]
        first_b, first_a = b["messages"][0]["content"], a["messages"][0]["content"]
        assert [i["type"] for i in first_b] == ["image", "text"] and [i["type"] for i in first_a] == ["text", "image"]
        assert first_a[0]["text"] == first_b[1]["text"] + "\n"
        assert first_a[1]["image"].tobytes() == first_b[0]["image"].tobytes()
        assert a["messages"][1:] == b["messages"][1:]  # later turns carry text only, unchanged
    stage_args, _ = parse_stage_args("sft", ["--output-dir", str(tmp_path), "--init-from", "none", "--deepspeed",
                                             "none", "--image-placement", "after_text"])
    assert stage_args.image_placement == "after_text"
    with pytest.raises(ValueError, match="--image-placement='middle'"):
        parse_stage_args("sft", ["--output-dir", str(tmp_path), "--init-from", "none", "--deepspeed", "none",
                                 "--image-placement", "middle"])
    with pytest.raises(ValueError, match="image_placement='middle'"):
        ShapesWorldConversations("sft", image_placement="middle")


def _vqa_turns(tmp_path, *flags: str, count: int = 30):
    """(ShapesWorld train sample, [(question, reply)]) of the first `count` conversations the stage builds from the
    VQA task alone with every question of an image asked, and `flags`."""
    stage_args, _ = parse_stage_args("sft", ["--output-dir", str(tmp_path), "--init-from", "none", "--deepspeed",
                                             "none", "--shapesworld-tasks", "vqa:1", "--questions-per-image", "6",
                                             *flags])
    data = build_dataset("sft", stage_args, seed=0)
    world = ShapesWorld("train", size=64, num_samples=count)
    for index in range(count):
        messages = data[index]["messages"]
        asked = [next(item["text"] for item in m["content"] if item["type"] == "text") for m in messages[::2]]
        yield world[index], list(zip(asked, [m["content"][0]["text"] for m in messages[1::2]]))


def test_question_types_restrict_what_shapesworld_asks(tmp_path):
    for sample, turns in _vqa_turns(tmp_path, "--question-types", "exists,relation,count"):
        expected = {qa.question: qa.answer for qa in sample.vqa if qa.type in ("exists", "relation", "count")}
        assert sorted(q for q, _ in turns) == sorted(expected)  # every question of those types, no other
        assert [reply for _, reply in turns] == [expected[q] for q, _ in turns]
    with pytest.raises(ValueError, match="question types \\['relation'\\]"):
        ShapesWorldConversations("sft", question_types=["relation"])
    with pytest.raises(ValueError, match="question types \\['colour'\\]"):
        ShapesWorldConversations("sft", question_types=["colour"])


def test_reasoned_answers_put_the_relation_reasoning_before_its_answer(tmp_path):
    reasoned = 0
    for sample, turns in _vqa_turns(tmp_path, "--reasoned-answers", "relation"):
        by_question = {qa.question: qa for qa in sample.vqa}
        assert len(turns) == len(sample.vqa)
        for question, reply in turns:
            qa = by_question[question]
            expected = f"{qa.reasoning}, so {qa.answer}" if qa.type == "relation" else qa.answer
            assert reply == expected
            reasoned += qa.type == "relation"
    assert reasoned >= 15
    with pytest.raises(ValueError, match="reasoned answer types \\['count'\\]"):
        ShapesWorldConversations("sft", reasoned_types=["count"])


def test_extra_questions_ask_more_of_one_type_beside_the_others(tmp_path):
    extra_relations = 0
    plain = [turns for _, turns in _vqa_turns(tmp_path, "--reasoned-answers", "relation")]
    for sample, turns in _vqa_turns(tmp_path, "--reasoned-answers", "relation", "--extra-questions", "relation:2"):
        questions = [q for q, _ in turns]
        assert len(set(questions)) == len(questions)  # never the same question twice
        assert {qa.question for qa in sample.vqa} <= set(questions)  # every other question is still asked
        extra = [q for q in questions if q not in {qa.question for qa in sample.vqa}]
        assert len(extra) <= 2 and all(q.startswith("Is the ") for q in extra)
        if any(qa.type == "relation" for qa in sample.vqa):
            assert len(extra) >= 1
        for question, reply in turns:
            if question in extra:  # answered as the world's own relation questions are, reasoning first
                assert implied_relation_answer(question, reply) == final_answer(reply) in ("yes", "no")
        extra_relations += len(extra)
    assert extra_relations >= 30
    # Without extras the draws are those of the world's own questions alone.
    assert plain == [turns for _, turns in _vqa_turns(tmp_path, "--reasoned-answers", "relation", "--extra-questions",
                                                       "relation:0")]
    for bad, message in (("relation", "--extra-questions 'relation': expected comma-separated name:value"),
                         ("relation:1.5", "--extra-questions relation:1.5: the count must be a whole number"),
                         ("relation:-1", "--extra-questions relation:-1: the count must be a whole number")):
        with pytest.raises(ValueError, match=message):
            build_dataset("sft", parse_stage_args("sft", ["--output-dir", str(tmp_path), "--extra-questions",
                                                          bad])[0], seed=0)
    with pytest.raises(ValueError, match="which question types \\['exists'\\] exclude"):
        ShapesWorldConversations("sft", question_types=["exists"], extra_questions={"relation": 1})
    with pytest.raises(ValueError, match="question types \\['size'\\]"):
        ShapesWorldConversations("sft", extra_questions={"size": 1})


def test_embedding_init_std_sets_a_new_backbones_text_embeddings(workdir, tmp_path):
    def built(*flags):
        stage_args, _ = parse_stage_args("sft", ["--output-dir", str(tmp_path), "--init-from", "none", "--deepspeed",
                                                 "none", "--tokenizer", str(workdir / "tokenizer"), "--backbone",
                                                 "shapesworld-tiny", *flags])
        return build_model(stage_args)[0].get_input_embeddings().weight

    default, scaled = built(), built("--embedding-init-std", "1.0")
    assert abs(default.std().item() - 0.125) < 0.01  # the shape's initializer_range, 1/sqrt(64)
    stage_args, _ = parse_stage_args("sft", ["--output-dir", str(tmp_path), "--init-from", "none", "--deepspeed",
                                             "none", "--tokenizer", str(workdir / "tokenizer"), "--backbone",
                                             "shapesworld-tiny", "--initializer-range", "0.125"])
    wide = build_model(stage_args)[0]
    assert wide.config.text_config.initializer_range == 0.125
    for name in ("language_model.model.embed_tokens.weight", "language_model.model.layers.0.self_attn.q_proj.weight",
                 "language_model.model.layers.1.mlp.down_proj.weight", "language_model.lm_head.weight",
                 "image_head.weight"):
        assert abs(wide.get_parameter(name).std().item() - 0.125) < 0.01, name
    with pytest.raises(ValueError, match="--initializer-range=-1.0 must be > 0"):
        parse_stage_args("sft", ["--output-dir", str(tmp_path), "--initializer-range", "-1"])
    with pytest.raises(ValueError, match="--initializer-range applies to a new named backbone"):
        parse_stage_args("sft", ["--output-dir", str(tmp_path), "--backbone", str(tmp_path), "--initializer-range",
                                 "0.1"])
    assert abs(scaled.std().item() - 1.0) < 0.05 and abs(scaled.mean().item()) < 0.05
    with pytest.raises(ValueError, match="--embedding-init-std=0.0 must be > 0"):
        built("--embedding-init-std", "0")
    with pytest.raises(ValueError, match="applies to a new named backbone"):
        parse_stage_args("sft", ["--output-dir", str(tmp_path), "--backbone", str(tmp_path), "--embedding-init-std",
                                 "1"])


def test_slot_labels_ride_on_every_looked_at_shapesworld_image(tmp_path):
    from unimodal.shapesworld.labels import slot_description

    data = ShapesWorldConversations("sft", num_samples=30, seed=2, slot_label_side=8,
                                    tasks={"vqa": 1, "describe": 1, "caption": 1, "t2i": 1})
    plain = ShapesWorldConversations("sft", num_samples=30, seed=2, tasks={"vqa": 1, "describe": 1, "caption": 1,
                                                                            "t2i": 1})
    tasks = set()
    for index in range(30):
        conversation = data[index]
        items = conversation_images(conversation)
        tasks.add(conversation["task"])
        looked_at = [i for m in conversation["messages"] if m["role"] == "user" for i in m["content"]
                     if i["type"] == "image"]
        for item in looked_at:
            assert torch.equal(item["slot_labels"], slot_description(data.world[index].scene, 8))
        assert all("slot_labels" not in i for i in items if not any(i is j for j in looked_at))  # drawn: none
        stripped = [{k: v for k, v in i.items() if k != "slot_labels"} for i in items]
        assert [i["image"].tobytes() for i in stripped] == [i["image"].tobytes() for i in conversation_images(
            plain[index])]  # the same conversation otherwise
    assert tasks == {"vqa", "describe", "caption", "t2i"}
    with pytest.raises(ValueError, match="slot_label_side=0"):
        ShapesWorldConversations("sft", slot_label_side=0)
    with pytest.raises(ValueError, match="--slot-loss-weight 1.0 needs the per-slot labels of ShapesWorld"):
        parse_stage_args("sft", ["--output-dir", str(tmp_path), "--data", f"llava:{tmp_path / 'chat.json'}",
                                 "--slot-loss-weight", "1", "--init-from", "none", "--deepspeed", "none"])


def test_slot_loss_weight_trains_a_slot_head_that_learns(workdir):
    output = workdir / "sft-slot"
    sft.main(stage_argv(workdir, output, "--shapesworld-tasks", "vqa:1", "--slot-loss-weight", "0.5",
                        "--learning-rate", "3e-3", steps=30))
    rows = read_log(output)
    losses = [float(r["slot_loss"]) for r in rows]
    assert len(losses) == 30 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0, losses  # the cell row alone is learnable from positions
    model = llm.TokenFlowMLLM.from_pretrained(str(output))
    assert model.config.slot_label_classes == [7, 9, 9] and model.config.slot_loss_weight == 0.5
    assert model.slot_head is not None


def test_scale_reveal_prob_trains_a_reveal_projector(workdir, tmp_path):
    output = workdir / "sft-reveal"
    sft.main(stage_argv(workdir, output, "--shapesworld-tasks", "t2i:1", "--scale-reveal-prob", "0.5", steps=6))
    model = llm.TokenFlowMLLM.from_pretrained(str(output))
    assert model.config.scale_reveal_prob == 0.5
    assert model.reveal_projector is not None and model.reveal_projector.weight.any()  # it left zero: it trained
    assert all(math.isfinite(float(r["image_loss"])) for r in read_log(output))
    with pytest.raises(ValueError, match=r"--scale-reveal-prob=1.5 must be in \[0, 1\]"):
        parse_stage_args("sft", ["--output-dir", str(tmp_path), "--scale-reveal-prob", "1.5", "--init-from", "none",
                                 "--deepspeed", "none"])
