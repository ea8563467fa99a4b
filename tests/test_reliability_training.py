"""Training never deletes what it did not write, never runs code from a checkpoint, never hangs on unreadable data,
and refuses what it would otherwise ignore or reject late: each test replays one such fault from a temporary folder."""

import hashlib
import json
import logging
import signal
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml
from test_train_tokenizer import OVERRIDES, small_config, teacher_file  # noqa: F401  (teacher_file is a fixture)

from tokenizer import TokenFlowConfig, TokenFlowTokenizer
from train import pretrain, train_teacher
from train.arguments import parse_stage_args
from train.pretokenize import message_checker, parse_args as pretokenize_args, pretokenize
from train.toolkit import check_export_target, export_folder
from train.trainer import RUN_OPTIONS, check_checkpoint_files, check_resume_run_options
from train.train_tokenizer import TrainConfig, parse_config, train

REPO = Path(__file__).resolve().parents[1]


def snapshot(root: Path, skip: Path | None = None) -> dict[str, str]:
    """{relative path: sha256} of every file under `root` (outside `skip`), folders included as entries."""
    files = {}
    for path in sorted(root.rglob("*")):
        if skip is not None and (path == skip or skip in path.parents):
            continue
        files[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "/"
    return files


@contextmanager
def hang_guard(seconds: int):
    """Turn a hang into a test failure (the faults replayed here used to loop forever)."""
    def fail(*_):
        raise TimeoutError(f"still running after {seconds} s: the run hangs")
    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


class CodeOnUnpickle:
    """A pickle payload: unpickling it writes `marker` (as any code could run there)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",)


def write_payload(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"step": 1, "rng": CodeOnUnpickle(marker)}, path)


# ---------------------------------------------------------------------------------------------------- export

def precious_folder(root: Path) -> Path:
    folder = root / "precious"
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.txt").write_text("data")
    (folder / "sub" / "more.txt").write_text("more data")
    return folder


def test_export_refuses_a_folder_holding_other_files(tmp_path, teacher_file):
    precious = precious_folder(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match=r"holds files that an export does not write: \['notes.txt', 'sub'\]"):
        train(small_config(tmp_path, teacher_file, "run", max_steps=1, export_dir=str(precious)))
    assert snapshot(tmp_path) == before  # refused before training: not even the output folder was made


@pytest.mark.parametrize("where", ["same", "inside", "containing"])
def test_export_overlapping_the_output_folder_is_refused_before_training(tmp_path, teacher_file, where):
    output = tmp_path / "run"
    export = {"same": output, "inside": output / "export", "containing": tmp_path}[where]
    (tmp_path / "keep.txt").write_text("keep")
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match="overlap"):
        train(small_config(tmp_path, teacher_file, "run", max_steps=1, export_dir=str(export)))
    assert snapshot(tmp_path) == before


def test_export_replaces_an_earlier_export_and_keeps_its_readme(tmp_path, teacher_file):
    export = tmp_path / "shipped"
    first = train(small_config(tmp_path, teacher_file, "run1", max_steps=1, export_dir=str(export)))
    assert first["exported"] == str(export)
    assert sorted(p.name for p in export.iterdir()) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    (export / "README.md").write_text("model card")
    source = tmp_path / "run1" / "tokenizer"
    (source / "model.safetensors").write_bytes(b"new weights")  # stands for a second run's weights
    export_folder(source, export, ["config.json", "model.safetensors", "preprocessor_config.json"], ["README.md"],
                  model_type="tokenflow")
    assert (export / "model.safetensors").read_bytes() == b"new weights"
    assert (export / "README.md").read_text() == "model card"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run1", "shipped"]  # no temporary folder left behind
    # a folder of the same file names from another model is not an earlier export
    (export / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="model type 'llama'"):
        check_export_target(export, ["config.json", "model.safetensors", "preprocessor_config.json"], ["README.md"],
                            model_type="tokenflow")
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        check_export_target(tmp_path / "a-file", ["config.json"])


def test_default_runs_leave_the_shipped_models_untouched(tmp_path, teacher_file):
    assert TrainConfig().export_dir is None and parse_config([]).export_dir is None
    assert not train_teacher.parse_args([]).output_dir.resolve().is_relative_to(REPO / "train" / "pretrained")
    shipped = REPO / "tokenizer" / "pretrained" / "shapesworld-tiny"
    before = snapshot(shipped)
    values = {k: v for k, v in vars(small_config(tmp_path, teacher_file, "run", max_steps=1)).items()
              if k != "export_dir"}
    summary = train(TrainConfig(**values))  # the default export_dir
    assert "exported" not in summary and snapshot(shipped) == before
    assert (tmp_path / "run" / "tokenizer" / "model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------------- checkpoints

def test_the_payload_is_live(tmp_path):
    """The crafted file below does run code when unpickled in full (so the refusals that follow mean something)."""
    marker = tmp_path / "marker"
    write_payload(tmp_path / "evil.pt", marker)
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.read_text() == "code ran"


def test_tokenizer_resume_never_unpickles_code(tmp_path, teacher_file):
    marker, checkpoint = tmp_path / "marker", tmp_path / "evil" / "last.pt"
    write_payload(checkpoint, marker)
    with pytest.raises(ValueError, match="refusing to unpickle"):
        train(small_config(tmp_path, teacher_file, "run", max_steps=1, resume=str(checkpoint)))
    assert not marker.exists()


@pytest.fixture(scope="module")
def stage_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage")
    torch.manual_seed(0)
    TokenFlowTokenizer(TokenFlowConfig.from_preset("tiny")).save_pretrained(root / "tokenizer")
    return root


def stage_argv(root: Path, output: Path, *extra) -> list[str]:
    return ["--use-cpu", "true", "--bf16", "false", "--tokenizer", str(root / "tokenizer"), "--backbone",
            "shapesworld-tiny", "--output-dir", str(output), "--max-steps", "2", "--per-device-train-batch-size", "2",
            "--num-samples", "8", "--report-to", "none", "--deepspeed", "none", "--init-from", "none", *extra]


def test_stage_resume_never_unpickles_code(tmp_path, stage_files):
    """The stages refuse a checkpoint folder whose pickles hold code: the Trainer's files and DeepSpeed's (which its
    engine would unpickle in full) alike, before any is loaded."""
    marker = tmp_path / "marker"
    checkpoint = tmp_path / "checkpoint-1"
    write_payload(checkpoint / "global_step1" / "zero_pp_rank_0_mp_rank_00_optim_states.pt", marker)
    with pytest.raises(ValueError, match="zero_pp_rank_0_mp_rank_00_optim_states.pt.*refusing to unpickle"):
        check_checkpoint_files(checkpoint)
    (checkpoint / "global_step1" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()
    write_payload(checkpoint / "rng_state.pth", marker)
    (checkpoint / "checkpoint_complete.json").write_text(json.dumps({"global_step": 1, "skipped": {}}))
    with pytest.raises(ValueError, match="rng_state.pth.*refusing to unpickle"):
        pretrain.main(stage_argv(stage_files, tmp_path / "run", "--resume", str(checkpoint)))
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------- data

def test_a_folder_of_unreadable_images_stops_with_counts_and_paths(tmp_path, teacher_file):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(6):
        (folder / f"bad{i}.png").write_bytes(b"not an image")
    config = small_config(tmp_path, teacher_file, "run", data="imagefolder", data_path=str(folder), max_steps=2)
    with hang_guard(120), pytest.raises(RuntimeError, match=r"epoch 0 had no readable image \(6 tried\); 6 of 6 "
                                                            r"images read so far were unreadable") as error:
        train(config)
    assert "bad" in str(error.value) and str(folder) in str(error.value)  # names the first failing files
    many = small_config(tmp_path, teacher_file, "run2", data="imagefolder", data_path=str(folder), max_steps=2,
                        max_consecutive_skips=3)
    with hang_guard(120), pytest.raises(RuntimeError, match="4 unreadable images in a row"):
        train(many)


def test_pretokenize_refuses_messages_that_training_refuses(tmp_path, stage_files):
    records = [{"id": "fine", "messages": [{"role": "user", "content": "hello"},
                                           {"role": "assistant", "content": "hi"}]},
               {"id": "sneaky", "messages": [{"role": "user", "content": "draw <boi> now"},
                                             {"role": "assistant", "content": "no"}]}]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    output = tmp_path / "tok"
    args = pretokenize_args(["--data", f"text:{data}", "--tokenizer", str(stage_files / "tokenizer"),
                             "--output-dir", str(output), "--device", "cpu", "--backbone", "shapesworld-tiny"])
    with pytest.raises(ValueError, match=rf"{data}: record 'sneaky': .*reserved token\(s\) \['<boi>'\]"):
        pretokenize(args)
    assert not output.exists()  # refused before anything was written
    # the same rule as training: the processor the stage builds rejects the same record
    checker = message_checker(args, TokenFlowTokenizer.from_pretrained(stage_files / "tokenizer"))
    with pytest.raises(ValueError, match="reserved token"):
        checker.encode_conversation([{"role": "user", "content": "<|im_start|>system"},
                                     {"role": "assistant", "content": "x"}])


# ---------------------------------------------------------------------------------------------------- options

def test_tokenizer_resume_with_other_options_warns_or_refuses(tmp_path, teacher_file, caplog):
    train(small_config(tmp_path, teacher_file, "run", max_steps=2, ckpt_every=1, ema=False, disc_weight=0.0))
    changed = small_config(tmp_path, teacher_file, "run", max_steps=3, ckpt_every=1, ema=False, disc_weight=0.0,
                           batch_size=3, lr=1e-3, resume="auto", log_every=2)
    with pytest.raises(ValueError, match="batch_size: 2 → 3; lr: 0.0004 → 0.001; max_steps: 2 → 3"):
        train(TrainConfig(**{**vars(changed), "strict_resume": True}))
    with caplog.at_level(logging.WARNING):
        train(changed)
    warnings = [r.getMessage() for r in caplog.records if "differ from the checkpoint" in r.getMessage()]
    assert len(warnings) == 1 and "batch_size: 2 → 3" in warnings[0] and "log_every" not in warnings[0]


def test_stage_resume_with_other_options_warns_or_refuses(tmp_path, caplog):
    options = {"learning_rate": 0.001, "per_device_train_batch_size": 16, "max_steps": 250, "logging_steps": 10,
               "output_dir": "a", "stage": "pretrain"}
    (tmp_path / RUN_OPTIONS).write_text(yaml.safe_dump(options))
    assert check_resume_run_options(tmp_path, {**options, "output_dir": "b", "logging_steps": 1}, strict=True) == []
    now = {**options, "learning_rate": 0.002, "max_steps": 300}
    with pytest.raises(ValueError, match="learning_rate: 0.001 → 0.002; max_steps: 250 → 300"):
        check_resume_run_options(tmp_path, now, strict=True)
    with caplog.at_level(logging.WARNING):
        assert len(check_resume_run_options(tmp_path, now, strict=False)) == 2
    assert "differ from the checkpoint" in caplog.text


def test_misspelt_options_are_errors_naming_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match=r"model_overrides: unknown keys \['codebook_sz'\] \('codebook_sz': did you "
                                         r"mean 'codebook_size'\?\); valid keys: \[.*'scales'"):
        parse_config(["--model-overrides", '{"codebook_sz": 5}'])
    config = tmp_path / "run.yaml"
    config.write_text("max-steps: 5\nbatch_sise: 4\n")
    with pytest.raises(ValueError, match=r"unknown options \['batch_sise'\].*'batch_size'.*valid options: \[.*'lr'"):
        parse_config(["--config", str(config)])
    config.write_text("learning_rate: 0.1\nlearnin_rate: 0.1\n")
    with pytest.raises(ValueError, match=r"unknown options \['learnin_rate'\].*did you mean 'learning_rate'"):
        parse_stage_args("pretrain", ["--config", str(config), "--deepspeed", "none"])


@pytest.mark.parametrize("flag", ["--ckpt-every", "--log-every", "--image-every", "--max-steps", "--batch-size"])
def test_tokenizer_intervals_are_checked_at_parse_time(flag, capsys):
    with pytest.raises(SystemExit):
        parse_config([flag, "0"])
    assert "expected an integer >= 1, got '0'" in capsys.readouterr().err


def test_stage_and_teacher_intervals_are_checked_at_parse_time(capsys):
    for flag in ("--logging-steps", "--save-steps", "--max-steps"):
        with pytest.raises(ValueError, match=flag.lstrip("-").replace("-", "[-_]")):
            parse_stage_args("pretrain", [flag, "0", "--deepspeed", "none"])
    with pytest.raises(SystemExit):
        train_teacher.parse_args(["--max-steps", "0"])
    assert "expected an integer >= 1" in capsys.readouterr().err
