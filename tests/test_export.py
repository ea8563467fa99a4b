"""train/export.py: a run becomes a clean, loadable model folder with its drawing defaults, the card kept."""

import json

import pytest
import torch

from llm import TokenFlowMLLM, build_tiny
from llm.generation import DEFAULT_SAMPLER, sampler_defaults
from train.export import EXPORT_FILES, main, without_local_paths


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A saved tiny model with the clutter of a training run beside it."""
    model, _ = build_tiny(seed=0)
    run = tmp_path_factory.mktemp("run")
    model.save_pretrained(run)
    (run / "checkpoint-10").mkdir()
    (run / "train_log.csv").write_text("step,loss\n10,1.0\n")
    return run


def test_export_writes_the_model_alone_with_its_sampler_and_the_same_weights(run_dir, tmp_path):
    target = tmp_path / "shipped"
    settings = main(["--model", str(run_dir), "--export-dir", str(target), "--cfg-scale", "3", "--top-k", "2048",
                     "--top-p", "1"])
    assert settings == {**DEFAULT_SAMPLER, "cfg_scale": 3.0, "top_k": 2048, "top_p": 1.0}
    assert sorted(p.name for p in target.iterdir()) == sorted(EXPORT_FILES)
    assert '"/' not in (target / "config.json").read_text()  # no absolute path of this machine
    source, shipped = TokenFlowMLLM.from_pretrained(run_dir), TokenFlowMLLM.from_pretrained(target)
    assert sampler_defaults(shipped) == settings
    assert shipped.processor is not None
    a, b = source.state_dict(), shipped.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_second_export_replaces_the_first_and_keeps_the_card(run_dir, tmp_path):
    target = tmp_path / "shipped"
    main(["--model", str(run_dir), "--export-dir", str(target), "--top-k", "7"])
    (target / "README.md").write_text("# card\n")
    main(["--model", str(run_dir), "--export-dir", str(target)])  # no sampler flag: the run's own defaults
    assert (target / "README.md").read_text() == "# card\n"
    stored = json.loads((target / "generation_config.json").read_text()).get("image_sampling")
    assert stored is None  # the run had none; the first export's top_k is gone with the folder it replaced


def test_export_refuses_a_folder_holding_other_files(run_dir, tmp_path):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="notes.txt"):
        main(["--model", str(run_dir), "--export-dir", str(target)])
    assert (target / "notes.txt").read_text() == "keep me"


def test_export_refuses_a_bad_sampler_value_before_writing(run_dir, tmp_path):
    with pytest.raises(ValueError, match="top_p"):
        main(["--model", str(run_dir), "--export-dir", str(tmp_path / "x"), "--top-p", "0"])
    assert not (tmp_path / "x").exists()


def test_a_shipped_config_names_no_path_of_the_training_machine():
    config = {"_name_or_path": "/home/me/run", "image_tokenizer_config": {"_name_or_path": "/home/me/tokenizer",
                                                                          "scales": [1, 2]},
              "text_config": [{"_name_or_path": "Qwen/Qwen2-0.5B"}]}
    assert without_local_paths(config) == {
        "_name_or_path": "", "image_tokenizer_config": {"_name_or_path": "", "scales": [1, 2]},
        "text_config": [{"_name_or_path": "Qwen/Qwen2-0.5B"}]}  # a hub name is no local path
