"""One-folder checkpoints: save/load round trips, Auto classes, dtype / device_map, and mismatched checkpoints."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoProcessor

import llm


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model, processor = llm.build_tiny(seed=0)
    directory = str(tmp_path_factory.mktemp("tiny-mllm"))
    model.save_pretrained(directory)
    return model, processor, directory


def test_folder_holds_everything(saved):
    _, _, directory = saved
    files = set(os.listdir(directory))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "processor_config.json",
            "chat_template.jinja"} <= files
    keys = load_file(os.path.join(directory, "model.safetensors")).keys()
    for prefix in ("language_model.", "image_tokenizer.quantize.", "image_tokenizer.decoder.", "understanding_projector.",
                   "generation_projector.", "scale_embedding.", "image_head."):
        assert any(k.startswith(prefix) for k in keys), prefix
    assert "position_embedding" in keys


def test_round_trip_gives_identical_logits_and_drawings(saved):
    model, processor, directory = saved
    loaded = llm.TokenFlowMLLM.from_pretrained(directory)
    loaded_processor = AutoProcessor.from_pretrained(directory)
    assert isinstance(loaded_processor, llm.TokenFlowProcessor) and isinstance(loaded.processor, llm.TokenFlowProcessor)
    assert loaded_processor.tokenizer.chat_template == processor.tokenizer.chat_template
    assert loaded_processor.drawing_prompt_ids("a red circle") == processor.drawing_prompt_ids("a red circle")
    assert loaded_processor.scales == processor.scales
    assert not loaded.training and not loaded.image_tokenizer.training

    indices = torch.randint(0, 2048, (1, 130), generator=torch.Generator().manual_seed(0))
    batch = processor.collate([processor.encode_conversation(
        [{"role": "user", "content": "draw"}, {"role": "assistant", "content": [{"type": "image", "indices": indices[0]}]}])])
    with torch.no_grad():
        a, b = model(**batch), loaded(**batch)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.image_logits, b.image_logits)
    settings = dict(seed=4, cfg_scale=2.0, top_k=100)
    assert torch.equal(model.generate_image("a red circle", **settings).indices,
                       loaded.generate_image("a red circle", **settings).indices)


def test_auto_classes_dtype_and_device_map(saved):
    _, _, directory = saved
    assert isinstance(AutoConfig.from_pretrained(directory), llm.TokenFlowMLLMConfig)
    assert isinstance(AutoModel.from_pretrained(directory), llm.TokenFlowMLLM)
    half = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16, device_map="cpu")
    assert isinstance(half, llm.TokenFlowMLLM)
    assert half.language_model.dtype == torch.bfloat16 and half.image_head.weight.dtype == torch.bfloat16
    assert half.image_tokenizer.dtype == torch.float32  # nearest-code search and pixel decoding stay fp32
    assert half.generate_image("a red circle", seed=0, temperature=0).indices.shape == (1, 130)


def test_codebook_mismatch_is_refused(saved, tmp_path):
    _, _, directory = saved
    weights = load_file(os.path.join(directory, "model.safetensors"))
    weights["image_head.weight"] = weights["image_head.weight"][:1024].clone()
    for name in os.listdir(directory):
        if name != "model.safetensors":
            with open(os.path.join(directory, name), "rb") as src, open(tmp_path / name, "wb") as dst:
                dst.write(src.read())
    save_file(weights, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="inconsistent.*image head rows': 1024"):
        llm.TokenFlowMLLM.from_pretrained(str(tmp_path))

    config = json.loads((tmp_path / "config.json").read_text())
    config["tokenizer_config"]["codebook_size"] = 1024
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="tokenizer codebook rows': 2048"):
        llm.TokenFlowMLLM.from_pretrained(str(tmp_path))
