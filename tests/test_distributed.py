"""Training on two processes on the CPU (DeepSpeed's CPU accelerator, gloo), tiny model, a few steps.

One launch of each kind serves several assertions: two processes under ZeRO-2 and under ZeRO-3 against one process
with the same global batch (gradient accumulation 2) and data order; a two-node launch (two launchers on 127.0.0.1)
that resumes the two-process run from its first checkpoint and must end with its weights; a world-size change on
resume, refused; the tokenizer trainer under torchrun.

The launching tests are marked slow (every launch starts fresh interpreters); `pytest -m "not slow"` skips them.
"""

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import llm
from tokenizer import TokenFlowTokenizer
from train import sft
from train.trainer import COMPLETE_MARKER, last_complete_checkpoint

# One xdist worker runs this module, so that the module's launched runs happen once.
pytestmark = pytest.mark.xdist_group("launches")

REPO = Path(__file__).resolve().parents[1]
STEPS = 4
LOSS_COLUMNS = ("loss", "grad_norm", "text_loss", "image_loss")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env() -> dict:
    return dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
                TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions")))


def deepspeed_command(*launcher_options) -> list[str]:
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--master_port", str(free_port()), *launcher_options]


def run(command: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=launch_env())
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    return result


def stage_options(workdir: Path, output: Path, zero: str = "zero2", *extra) -> list[str]:
    return ["--bf16", "false", "--tokenizer", str(workdir / "tokenizer"), "--backbone", "shapesworld-tiny",
            "--init-from", "none", "--output-dir", str(output), "--max-steps", str(STEPS), "--save-steps", "2",
            "--per-device-train-batch-size", "2", "--num-samples", "40", "--logging-steps", "1", "--report-to", "none",
            "--num-sample-prompts", "1", "--record-sample-ids", "true", "--deepspeed", zero, *extra]


def read_log(output: Path) -> list[dict]:
    with open(output / "train_log.csv", newline="") as f:
        return list(csv.DictReader(f))


def trained_positions(output: Path, rank: int) -> list[int]:
    lines = (output / "sample_ids" / f"rank-{rank}.jsonl").read_text().splitlines()
    return [p for line in lines for p in json.loads(line)["positions"]]


def assert_losses_close(output: Path, reference: Path) -> None:
    got, expected = read_log(output), read_log(reference)
    assert [int(r["step"]) for r in got] == [int(r["step"]) for r in expected] == list(range(1, STEPS + 1))
    for row, expected_row in zip(got, expected):
        for column in LOSS_COLUMNS:
            if expected_row.get(column):
                assert float(row[column]) == pytest.approx(float(expected_row[column]), rel=2e-4, abs=1e-5), (
                    row["step"], column)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, random_tiny_tokenizer):
    root = tmp_path_factory.mktemp("distributed")
    shutil.copytree(random_tiny_tokenizer, root / "tokenizer")
    return root


@pytest.fixture(scope="module")
def one_process(workdir):
    """The reference: one process, gradient accumulation 2 (the two-process runs' global batch of 4)."""
    output = workdir / "one-process"
    run([sys.executable, str(REPO / "train" / "sft.py"),
         *stage_options(workdir, output, "zero2", "--gradient-accumulation-steps", "2")])
    return output


def two_processes(workdir: Path, zero: str) -> Path:
    output = workdir / f"{zero}-two-processes"
    run(deepspeed_command("--num_gpus", "2") + ["train/sft.py", *stage_options(workdir, output, zero)])
    return output


@pytest.fixture(scope="module")
def zero2_two_processes(workdir):
    return two_processes(workdir, "zero2")


@pytest.fixture(scope="module")
def zero3_two_processes(workdir):
    return two_processes(workdir, "zero3")


@pytest.mark.slow
@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_two_processes_match_one_process_and_write_once(zero, request, one_process):
    """ZeRO-3 partitions the weights too: every process must make the same gathers (see `_or_zero_images`)."""
    output = request.getfixturevalue(f"{zero}_two_processes")
    assert_losses_close(output, one_process)
    # One writer: every file of the run and of each checkpoint written once (a second writer would duplicate log
    # rows and record its own world in the marker).
    assert [int(r["step"]) for r in read_log(output)] == list(range(1, STEPS + 1))
    marker = json.loads((output / f"checkpoint-{STEPS}" / COMPLETE_MARKER).read_text())
    assert marker["data"]["layout"]["world_size"] == 2 and len(marker["data"]["shards"]) == 2
    assert last_complete_checkpoint(output) == str(output / f"checkpoint-{STEPS}")
    assert (output / "checkpoint-2" / "latest").exists()  # the DeepSpeed engine state
    trained = llm.TokenFlowMLLM.from_pretrained(str(output)).state_dict()
    reference = llm.TokenFlowMLLM.from_pretrained(str(one_process)).state_dict()
    for name in reference:
        torch.testing.assert_close(trained[name], reference[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
def test_the_two_processes_read_disjoint_samples_whose_union_is_the_one_process_data(zero2_two_processes,
                                                                                         one_process):
    rank0, rank1 = trained_positions(zero2_two_processes, 0), trained_positions(zero2_two_processes, 1)
    assert len(rank0) == len(rank1) == STEPS * 2
    assert not set(rank0) & set(rank1)
    assert sorted(rank0 + rank1) == sorted(trained_positions(one_process, 0))
    marker = json.loads((zero2_two_processes / f"checkpoint-{STEPS}" / COMPLETE_MARKER).read_text())
    skipped = sum(marker["skipped"].values())
    assert marker["data"]["samples_read"] == len(rank0) + len(rank1) + skipped  # a global position and count


@pytest.mark.slow
def test_two_node_launch_resumes_the_two_process_run_to_identical_weights(workdir, zero2_two_processes):
    """Two `deepspeed --no_ssh --node_rank N` launchers on 127.0.0.1, one process each, continue the two-process
    run from its step-2 checkpoint (as if killed right after saving it) with --resume auto."""
    output = workdir / "two-nodes"
    output.mkdir()
    shutil.copytree(zero2_two_processes / "checkpoint-2", output / "checkpoint-2")
    hostfile = workdir / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    launcher = deepspeed_command("--hostfile", str(hostfile), "--no_ssh", "--master_addr", "127.0.0.1")
    nodes = [subprocess.Popen(launcher + ["--node_rank", str(rank), "train/sft.py",
                                          *stage_options(workdir, output, "zero2", "--resume", "auto")],
                              cwd=REPO, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (0, 1)]
    logs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], logs[0][-4000:] + logs[1][-4000:]
    assert f"resuming from {output / 'checkpoint-2'}" in logs[0]
    final, expected = load_file(output / "model.safetensors"), load_file(zero2_two_processes / "model.safetensors")
    assert final.keys() == expected.keys() and all(torch.equal(final[k], expected[k]) for k in expected)
    assert llm.TokenFlowMLLM.from_pretrained(str(output / f"checkpoint-{STEPS}")) is not None  # its checkpoint loads


@pytest.mark.slow
def test_a_world_size_change_on_resume_is_refused_with_what_to_do(workdir, zero2_two_processes):
    output = workdir / "one-process-resume"
    output.mkdir()
    shutil.copytree(zero2_two_processes / "checkpoint-2", output / "checkpoint-2")
    options = stage_options(workdir, output, "none", "--use-cpu", "true")
    with pytest.raises(ValueError, match=r"world_size 2 → 1.*deepspeed --num_gpus 2.*--init-from <checkpoint> "
                                         r"--resume no"):
        sft.main(options)


@pytest.mark.slow
def test_tokenizer_trainer_on_two_processes_matches_one_process(tmp_path):
    """`torchrun --nproc_per_node 2 train/train_tokenizer.py` with batch 2 per process against one process with
    batch 4: the same losses (logged over both processes), one writer of the log, checkpoint and final folder."""
    from test_train_tokenizer import OVERRIDES, SMALL_CLIP

    from train.train_teacher import build_clip, save_teacher
    from train.train_tokenizer import TrainConfig, train

    torch.manual_seed(0)
    save_teacher(build_clip(SMALL_CLIP), tmp_path / "teacher", SMALL_CLIP)
    options = dict(model_overrides=OVERRIDES, teacher=str(tmp_path / "teacher" / "open_clip_model.safetensors"),
                   max_steps=3, log_every=1, ckpt_every=3, image_every=3, num_train_samples=40, disc_start=10**6,
                   ema=False, export_dir=None, threads=1)
    train(TrainConfig(**options, batch_size=4, output_dir=str(tmp_path / "one")))
    (tmp_path / "two.json").write_text(json.dumps({**options, "batch_size": 2, "output_dir": str(tmp_path / "two")}))
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         "train/train_tokenizer.py", "--config", str(tmp_path / "two.json")])
    one, two = read_log(tmp_path / "one"), read_log(tmp_path / "two")
    assert [r["step"] for r in two] == [r["step"] for r in one] == ["1", "2", "3"]
    for row, expected in zip(two, one):
        for key in [k for k in expected if k.startswith("loss/")]:
            assert float(row[key]) == pytest.approx(float(expected[key]), rel=1e-4, abs=1e-6), (row["step"], key)
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == sorted(
        p.name for p in (tmp_path / "one" / "checkpoints").iterdir())
    TokenFlowTokenizer.from_pretrained(str(tmp_path / "two" / "tokenizer"))
