"""Damaged, mismatched or malformed inputs raise one clear error instead of loading or running silently.

Checkpoints (strict loads, model types, truncated files, non-finite weights), the encode pixel range, generation inputs,
question files, the command lines' one-line errors, evaluation runs that survive unreadable images, and the tokenizer
CLI never overwriting its input.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import llm
from eval import report, t2i, vqa
from tokenizer import TokenFlowConfig, TokenFlowTokenizer
from tokenizer import __main__ as tokenizer_cli
from tokenizer.convert import convert
from unimodal.checkpoints import CheckpointError
from unimodal.cli import run_main
from unimodal.shapesworld import ShapesWorld

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    model = TokenFlowTokenizer(TokenFlowConfig.from_preset("tiny", codebook_size=256)).eval()
    directory = tmp_path_factory.mktemp("tokenizer")
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def mllm(tmp_path_factory):
    model, processor = llm.build_tiny(seed=0)
    directory = tmp_path_factory.mktemp("mllm")
    model.save_pretrained(directory)
    return directory, model, processor


def damaged_copy(source, target, edit) -> str:
    """A copy of the checkpoint folder `source` whose weights are `edit(state_dict)`."""
    shutil.copytree(source, target)
    weights = load_file(os.path.join(source, "model.safetensors"))
    save_file(edit(weights), os.path.join(target, "model.safetensors"), metadata={"format": "pt"})
    return str(target)


def image_file(path, index=0):
    ShapesWorld("test", 32, index + 1)[index].image.save(path)
    return path


# ---------------------------------------------------------------------------------------------------- checkpoints
def test_clean_round_trip_still_loads(tokenizer_dir):
    model, info = TokenFlowTokenizer.from_pretrained(tokenizer_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert isinstance(model, TokenFlowTokenizer)


def test_missing_pixel_decoder_weights_raise(tokenizer_dir, tmp_path):
    folder = damaged_copy(tokenizer_dir, tmp_path / "no-decoder",
                          lambda sd: {k: v for k, v in sd.items() if not k.startswith("decoder.")})
    with pytest.raises(CheckpointError, match=r"do not fit TokenFlowTokenizer: missing \d+ \(decoder\."):
        TokenFlowTokenizer.from_pretrained(folder)


def test_unexpected_weights_raise(tokenizer_dir, tmp_path):
    folder = damaged_copy(tokenizer_dir, tmp_path / "extra", lambda sd: {**sd, "stray.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match=r"unexpected 1 \(stray.weight\)"):
        TokenFlowTokenizer.from_pretrained(folder)


def test_mis_shaped_weights_raise(tokenizer_dir, tmp_path):
    def shrink(sd):
        sd["quant_conv.weight"] = sd["quant_conv.weight"][:4].clone()
        return sd

    folder = damaged_copy(tokenizer_dir, tmp_path / "shape", shrink)
    with pytest.raises(CheckpointError, match=r"wrong shape 1 \(quant_conv.weight"):
        TokenFlowTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_raise(tokenizer_dir, tmp_path, value):
    def poison(sd):
        sd["decoder.conv_out.weight"] = sd["decoder.conv_out.weight"].clone()
        sd["decoder.conv_out.weight"].view(-1)[:3] = value
        return sd

    folder = damaged_copy(tokenizer_dir, tmp_path / "nan", poison)
    expected = r"NaN or infinite values, tensors 1 \(decoder.conv_out.weight: 3 of \d+ values"
    with pytest.raises(CheckpointError, match=expected):
        TokenFlowTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("damage", ["truncated", "header overwritten"])
def test_damaged_safetensors_is_one_line(tokenizer_dir, tmp_path, damage):
    folder = tmp_path / "damaged"
    shutil.copytree(tokenizer_dir, folder)
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:
        data[8:40] = b"\xff" * 32
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model.safetensors is damaged \(truncated or overwritten\)") as error:
        TokenFlowTokenizer.from_pretrained(folder)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("fill", [b"\x00", b"\x3c"])
def test_overwritten_tensor_data_is_found_by_the_recorded_digest(tokenizer_dir, tmp_path, fill):
    # Zeros (or these bytes, 0x3c3c3c3c = 0.0115 as float32) are finite: only the digest can tell.
    folder = tmp_path / "overwritten"
    shutil.copytree(tokenizer_dir, folder)
    weights = folder / "model.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        assert len(f.metadata()["data_sha256"]) == 64
    data = bytearray(weights.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4096] = fill * 4096
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match the SHA-256 recorded when it was saved"):
        TokenFlowTokenizer.from_pretrained(folder)


def test_invalid_config_json_names_file_and_position(tokenizer_dir, tmp_path):
    folder = tmp_path / "bad-config"
    shutil.copytree(tokenizer_dir, folder)
    (folder / "config.json").write_text('{"model_type": "tokenflow",\n  "scales": [1, 2,]\n}')
    with pytest.raises(CheckpointError, match=r"config.json: invalid JSON at line 2, column \d+"):
        TokenFlowTokenizer.from_pretrained(folder)


def test_wrong_model_type_is_named_both_ways(tokenizer_dir, mllm):
    with pytest.raises(CheckpointError, match="holds a 'tokenflow_mllm' model .* TokenFlowTokenizer loads 'tokenflow'"):
        TokenFlowTokenizer.from_pretrained(mllm[0])
    with pytest.raises(CheckpointError, match="holds a 'tokenflow' model .* TokenFlowMLLM loads 'tokenflow_mllm'"):
        llm.TokenFlowMLLM.from_pretrained(tokenizer_dir)


def test_damaged_mllm_weights_raise(mllm, tmp_path):
    directory = mllm[0]
    folder = damaged_copy(directory, tmp_path / "mllm-nan", lambda sd: {
        **sd, "image_head.weight": torch.full_like(sd["image_head.weight"], float("nan"))})
    with pytest.raises(CheckpointError, match="image_head.weight"):
        llm.TokenFlowMLLM.from_pretrained(folder)
    folder = damaged_copy(directory, tmp_path / "mllm-nodec", lambda sd: {
        k: v for k, v in sd.items() if not k.startswith("image_tokenizer.decoder.")})
    with pytest.raises(CheckpointError, match=r"missing \d+ \(image_tokenizer.decoder\."):
        llm.TokenFlowMLLM.from_pretrained(folder)


@pytest.mark.parametrize("path", ["runs/no-such-run", "no-such-model", "./no/such/folder"])
def test_missing_folder_says_no_such_folder(tmp_path, monkeypatch, path):
    monkeypatch.chdir(tmp_path)
    for load in (TokenFlowTokenizer.from_pretrained, llm.TokenFlowMLLM.from_pretrained):
        with pytest.raises(FileNotFoundError, match=f"no such folder: '{path}'"):
            load(path)


def test_file_instead_of_folder(tmp_path):
    path = image_file(tmp_path / "a.png")
    with pytest.raises(CheckpointError, match="is a file; a checkpoint is a folder"):
        TokenFlowTokenizer.from_pretrained(path)


@pytest.mark.parametrize("content", [b"\xd8" + os.urandom(200), b"hello world\n"])
def test_convert_names_a_file_that_is_not_a_checkpoint(tmp_path, content):
    path = tmp_path / "random.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="random.pt is not a readable checkpoint"):
        convert(path, "clipb-256", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------- inputs
def test_encode_rejects_pixels_outside_minus_one_one(tokenizer_dir):
    model = TokenFlowTokenizer.from_pretrained(tokenizer_dir)
    size = model.config.image_size
    for high in (255.0, 2.0):  # a 0-255 image, and one scaled twice
        pixels = torch.rand(1, 3, size, size) * high
        pixels[0, 0, 0, 0] = high
        with pytest.raises(ValueError, match=rf"must lie in \[-1, 1\].*got values in \[.*, {high:g}\].*TokenFlowImageProcessor"):
            model.encode(pixels)
    edge = torch.full((1, 3, size, size), 1.005)
    edge[..., 0, 0] = -1.005
    model.encode(edge)  # within the tolerance
    processed = model.image_processor(ShapesWorld("test", size, 1)[0].image)["pixel_values"]
    assert processed.min() >= -1 and processed.max() <= 1
    model.encode(processed)
    with pytest.raises(ValueError, match="batch size 0"):
        model.encode(torch.zeros(0, 3, size, size))


def test_generation_inputs_are_checked(mllm):
    _, model, processor = mllm
    vocab = model.get_input_embeddings().num_embeddings
    with pytest.raises(ValueError, match=rf"input_ids must lie in \[0, {vocab}\).*\[1, {vocab + 4}\]"):
        model(input_ids=torch.tensor([[1, vocab + 4]]))
    with pytest.raises(ValueError, match=r"B, L >= 1, got shape \(0, 5\)"):
        model(input_ids=torch.zeros(0, 5, dtype=torch.long))
    for seed in (1.5, -1, 2**64, "7", True):
        with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*64\)"):
            model.generate_image("a red circle", seed=seed, num_scales=1)
    with pytest.raises(ValueError, match="cfg_scale must be a finite number"):
        model.generate_image("a red circle", cfg_scale=float("inf"), num_scales=1)
    with pytest.raises(ValueError, match="temperature must be a finite number"):
        model.generate_image("a red circle", temperature=float("inf"), num_scales=1)
    out = model.generate_image("a red circle", seed=2**63, num_scales=1, cfg_scale=0.0)
    assert out.seed == 2**63


@pytest.mark.parametrize("content, message", [
    (b'{"image": "a.png", "question": "q", "answer": "x"}\n[1, 2]\n', r"questions.jsonl:2: expected one JSON object"),
    (b'{"image": "a.png", "question": "q", "answer": "x"}\n"text"\n', r"questions.jsonl:2: expected one JSON object"),
    (b'\n{"image": "a.png", "question": "caf\xe9", "answer": "x"}\n', r"questions.jsonl:2: not UTF-8 text"),
    (b'{"image": "a.png", "question": "q", "answer": "x"\n', r"questions.jsonl:1: not valid JSON"),
])
def test_question_file_lines_name_themselves(tmp_path, content, message):
    image_file(tmp_path / "a.png")
    path = tmp_path / "questions.jsonl"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        vqa.load_questions(path)


def test_prompt_list_names_invalid_utf8(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes(b"a red circle\ntwo \xff stars\n")
    with pytest.raises(ValueError, match=r"prompts.txt:2: not UTF-8 text"):
        t2i.read_prompts(path)


# ---------------------------------------------------------------------------------------------------- command lines
def test_cli_prints_one_line_and_debug_shows_traceback(tmp_path, capsys):
    missing = str(tmp_path / "nowhere")
    argv = ["encode", "--model", missing, str(image_file(tmp_path / "a.png"))]
    with pytest.raises(SystemExit) as exit_info:
        run_main(tokenizer_cli.main, argv)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: no such folder: '{missing}'")
    assert "Traceback" not in err
    with pytest.raises(FileNotFoundError, match="no such folder"):
        run_main(tokenizer_cli.main, argv + ["--debug"])


def test_module_entry_point_uses_run_main(tmp_path):
    # One real process: `python -m tokenizer.convert` on a file that is not a checkpoint.
    path = tmp_path / "random.pt"
    path.write_bytes(b"\xd8" * 64)
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run(
        [sys.executable, "-m", "tokenizer.convert", "--checkpoint", str(path), "--preset", "clipb-256",
         "--output", str(tmp_path / "out")], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 1
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert error_lines == [line for line in result.stderr.splitlines() if "random.pt" in line]
    assert len(error_lines) == 1 and "is not a readable checkpoint" in error_lines[0]
    assert "Traceback" not in result.stderr


ENTRY_POINTS = ["tokenizer/__main__.py", "tokenizer/convert.py", "llm/convert.py", "unimodal/shapesworld/__main__.py",
                "eval/vqa.py", "eval/t2i.py", "eval/report.py", "eval/reconstruction.py", "eval/probe.py",
                "eval/speed.py", "eval/bench_tokenizer.py", "eval/bench_generation.py", "train/train_tokenizer.py",
                "train/train_teacher.py", "train/pretokenize.py", "train/pretrain.py", "train/sft.py",
                "demo/__main__.py"]


@pytest.mark.parametrize("path", ENTRY_POINTS)
def test_every_entry_point_ends_through_run_main(path):
    source = open(os.path.join(REPO, path), encoding="utf-8").read()
    assert source.rstrip().endswith('if __name__ == "__main__":\n    run_main(main)'), path


@pytest.mark.parametrize("command", ["reconstruct", "encode"])
def test_tokenizer_cli_refuses_to_overwrite_its_input(tokenizer_dir, tmp_path, command):
    image = image_file(tmp_path / "in.png")
    before = image.read_bytes()
    same = str(tmp_path / "." / "in.png")
    argv = ([command, "--model", str(tokenizer_dir), str(image), same] if command == "reconstruct"
            else [command, "--model", str(tokenizer_dir), "--output", same, str(image)])
    with pytest.raises(ValueError, match="is the input image"):
        tokenizer_cli.main(argv)
    assert image.read_bytes() == before
    out = tmp_path / "out.png"
    tokenizer_cli.main(["reconstruct", "--model", str(tokenizer_dir), str(image), str(out)])
    assert out.is_file() and image.read_bytes() == before


# ---------------------------------------------------------------------------------------------------- evaluation runs
def interrupted_at_call(number, function):
    """`function`, except that its `number`-th call raises KeyboardInterrupt (a run stopped midway)."""
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == number:
            raise KeyboardInterrupt
        return function(*args, **kwargs)

    return wrapper


def test_vqa_skips_and_counts_unreadable_images_and_writes_as_it_goes(mllm, tmp_path, monkeypatch):
    _, model, processor = mllm
    records = []
    for i in range(4):
        image_file(tmp_path / f"{i}.png", i)
        records.append({"question_id": f"q{i}", "image": f"{i}.png", "question": "What colour?", "answer": "red"})
    (tmp_path / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    questions = vqa.load_questions(path)
    predictions = tmp_path / "predictions.jsonl"
    summary, written = vqa.run(model, processor, questions, "exact", batch_size=2, max_new_tokens=2,
                               predictions_path=predictions)
    assert summary["num_questions"] == 3 and [r["question_id"] for r in written] == ["q0", "q2", "q3"]
    assert summary["skipped"]["count"] == 1
    assert summary["skipped"]["questions"][0]["question_id"] == "q1"
    assert [json.loads(line) for line in predictions.read_text().splitlines()] == written

    # Interrupted after the first batch: what was answered is on disk.
    monkeypatch.setattr(vqa, "generate_answers", interrupted_at_call(2, vqa.generate_answers))
    with pytest.raises(KeyboardInterrupt):
        vqa.run(model, processor, questions, "exact", batch_size=2, max_new_tokens=2, predictions_path=predictions)
    assert [json.loads(line)["question_id"] for line in predictions.read_text().splitlines()] == ["q0"]


def test_vqa_with_only_unreadable_images_says_so(mllm, tmp_path):
    _, model, processor = mllm
    (tmp_path / "a.png").write_bytes(b"not an image")
    path = tmp_path / "questions.jsonl"
    path.write_text(json.dumps({"image": "a.png", "question": "q", "answer": "x"}) + "\n")
    with pytest.raises(ValueError, match="none of the 1 questions could be answered.*a.png"):
        vqa.run(model, processor, vqa.load_questions(path), "exact", max_new_tokens=2)


@pytest.mark.parametrize("module", [vqa, t2i, report])
def test_unusable_output_dir_fails_before_loading_the_model(mllm, tmp_path, monkeypatch, module):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the output folder was checked")

    for owner in (vqa, module):  # eval.report calls vqa.load_model; eval.t2i imported its own name
        if hasattr(owner, "load_model"):
            monkeypatch.setattr(owner, "load_model", must_not_load)
    with pytest.raises(OSError, match=r"--output-dir .*file/out' is not a writable folder"):
        module.main(["--model", str(mllm[0]), "--output-dir", str(blocker / "out")])


def test_t2i_writes_grades_as_it_goes(mllm, tmp_path, monkeypatch):
    _, model, processor = mllm
    metadata = t2i.shapes_prompt_metadata(3)
    monkeypatch.setattr(model, "generate_image", interrupted_at_call(3, model.generate_image))
    with pytest.raises(KeyboardInterrupt):
        t2i.run(model, processor, metadata, tmp_path / "out", grade=True, num_scales=1)
    lines = (tmp_path / "out" / "t2i_grades.jsonl").read_text().splitlines()
    assert [json.loads(line)["index"] for line in lines] == [0, 1]
    assert sorted(p.name for p in (tmp_path / "out" / "images").iterdir()) == ["00000", "00001"]
