"""Converter from the reference release files: strict keys, container layouts, clear errors; and the CLI."""

import json
import os
import shutil

import pytest
import torch

from tokenizer import TokenFlowTokenizer
from tokenizer.convert import CheckpointMismatchError, extract_state_dict, main as convert_main, \
    tokenizer_from_state_dict

from conftest import DATA_DIR


def reference_state_dict(name: str) -> dict[str, torch.Tensor]:
    """Every key of a released file, built from the key list. Values are zero-stride views of one random number per
    key, so a 1.5 GB checkpoint costs nothing to build or to save (torch.save keeps the stride)."""
    g = torch.Generator().manual_seed(0)
    out = {}
    with open(os.path.join(DATA_DIR, f"reference_keys_{name}.txt")) as f:
        for line in f:
            key, rest = line.split(" ", 1)
            shape = [int(v) for v in rest[rest.index("[") + 1: rest.index("]")].split(",") if v.strip()]
            out[key] = torch.rand(1, generator=g).expand(shape) if shape else torch.rand((), generator=g)
    return out


@pytest.mark.parametrize("name,preset,num_keys", [("clipb_enhanced", "clipb-256", 649), ("siglip", "siglip-384", 848)])
def test_all_reference_keys_load_strictly(name, preset, num_keys):
    state = reference_state_dict(name)
    assert len(state) == num_keys
    model = tokenizer_from_state_dict(extract_state_dict({"model": state}), preset)
    loaded = model.state_dict()
    for key in ("quantize.embedding_vqkd.weight", "decoder.conv_out.weight", "decoder_vqkd.blocks.2.attn.v_bias"):
        assert torch.equal(loaded[key], state[key].float())
    assert not model.training


def test_missing_extra_and_misshaped_keys_are_named():
    state = reference_state_dict("clipb_enhanced")
    missing = dict(state)
    del missing["decoder_vqkd.blocks.1.attn.q_bias"]
    with pytest.raises(CheckpointMismatchError, match=r"missing keys \(1\): decoder_vqkd.blocks.1.attn.q_bias"):
        tokenizer_from_state_dict(missing, "clipb-256")
    extra = dict(state, **{"encoder_vqkd.proj": torch.zeros(768, 512)})
    with pytest.raises(CheckpointMismatchError, match=r"unexpected keys \(1\): encoder_vqkd.proj"):
        tokenizer_from_state_dict(extra, "clipb-256")
    wrong = dict(state, **{"quantize.embedding_vqgan.weight": torch.zeros(16384, 8)})
    with pytest.raises(CheckpointMismatchError, match=r"quantize.embedding_vqgan.weight: checkpoint \(16384, 8\)"):
        tokenizer_from_state_dict(wrong, "clipb-256")


def test_wrong_preset_is_detected_and_named():
    with pytest.raises(CheckpointMismatchError, match="try --preset siglip-384"):
        tokenizer_from_state_dict(reference_state_dict("siglip"), "clipb-256")


def test_container_layouts_and_ignored_buffers():
    state = {"a.weight": torch.zeros(2), "quantize.codebook_used": torch.zeros(4),
             "encoder_vqkd.vision_model.embeddings.position_ids": torch.zeros(1, 4)}
    for wrapped in ({"ema": state, "model": {"x": torch.ones(1)}}, {"model": state}, {"state_dict": state}, state):
        assert list(extract_state_dict(wrapped)) == ["a.weight"]
    with pytest.raises(CheckpointMismatchError, match="no tensors"):
        extract_state_dict({"args": "namespace", "steps": 3})
    with pytest.raises(CheckpointMismatchError, match="dict-like"):
        extract_state_dict([torch.zeros(1)])


def test_cli_writes_a_folder_that_from_pretrained_loads(tmp_path, capsys):
    state = reference_state_dict("clipb_enhanced")
    state["quantize.codebook_used"] = torch.zeros(131072)
    checkpoint = tmp_path / "tokenflow_clipb_32k_enhanced.pt"
    torch.save({"model": state}, checkpoint)
    assert checkpoint.stat().st_size < 5_000_000  # zero-stride views stay small on disk
    out = tmp_path / "converted"
    convert_main(["--checkpoint", str(checkpoint), "--preset", "clipb-256", "--output", str(out)])
    assert "376,569,643 parameters" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "tokenflow" and config["scales"][-1] == 16
    model = TokenFlowTokenizer.from_pretrained(out)
    assert torch.equal(model.state_dict()["encoder_vqkd.class_embedding"], state["encoder_vqkd.class_embedding"])
    with pytest.raises(FileNotFoundError, match="no such file: .*nope.pt"):
        convert_main(["--checkpoint", str(tmp_path / "nope.pt"), "--preset", "clipb-256", "--output", str(out)])
    shutil.rmtree(out)  # 1.5 GB of weights; pytest keeps its last three temporary folders


def test_tokenizer_cli_reconstruct_and_encode(tmp_path, capsys):
    from PIL import Image

    from tokenizer.__main__ import main as cli
    from tokenizer import TokenFlowConfig

    model = TokenFlowTokenizer(TokenFlowConfig.from_preset("tiny", codebook_size=64)).eval()
    model.save_pretrained(tmp_path / "tok")
    Image.new("RGBA", (80, 50), (200, 30, 30, 255)).save(tmp_path / "in.png")  # non-square RGBA on purpose
    cli(["reconstruct", "--model", str(tmp_path / "tok"), "--scales", "2", str(tmp_path / "in.png"),
         str(tmp_path / "out.png")])
    assert Image.open(tmp_path / "out.png").size == (64, 64)
    assert "5 codes (2 of 6 scales)" in capsys.readouterr().out
    cli(["encode", "--model", str(tmp_path / "tok"), "--output", str(tmp_path / "codes.json"), str(tmp_path / "in.png")])
    record = json.loads((tmp_path / "codes.json").read_text())
    assert len(record["indices"]) == 130 and all(0 <= i < 64 for i in record["indices"])
    with torch.no_grad():
        expected = model.encode(model.image_processor(str(tmp_path / "in.png"))["pixel_values"]).indices[0].tolist()
    assert record["indices"] == expected
    with pytest.raises(SystemExit):
        cli(["reconstruct", "--model", str(tmp_path / "tok"), "--scales", "7", str(tmp_path / "in.png"),
             str(tmp_path / "o.png")])
