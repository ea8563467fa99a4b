"""The frozen-teacher loader training and evaluation share: the saved CLIP's visual tower, frozen, with the tokenizer
config's input scaling; a missing file is named."""

import pytest
import torch

from tokenizer import TokenFlowConfig
from tokenizer.configuration_tokenflow import CLIP_MEAN, CLIP_STD
from tokenizer.teacher import DEFAULT_TEACHER, load_frozen_teacher_tower
from train.train_teacher import build_clip, save_teacher

SMALL_CLIP = {
    "embed_dim": 16, "quick_gelu": False,
    "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
}


def test_loads_the_saved_visual_tower_frozen(tmp_path):
    torch.manual_seed(0)
    clip = build_clip(SMALL_CLIP)
    save_teacher(clip, tmp_path, SMALL_CLIP)
    config = TokenFlowConfig.from_preset("tiny", teacher={"type": "open_clip", "model_cfg": SMALL_CLIP})
    tower, scaling = load_frozen_teacher_tower(config, tmp_path / "open_clip_model.safetensors")
    assert not tower.training and not any(p.requires_grad for p in tower.parameters())
    # The weights are the saved CLIP's visual tower as stored (fp16 on disk, fp32 in memory).
    stored = clip.half().float().visual.state_dict()
    assert stored.keys() == tower.visual.state_dict().keys()
    assert all(torch.equal(stored[k], v) for k, v in tower.visual.state_dict().items())
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert tower(scaling(x)).shape == (2, 64, 32)  # 8×8 patch tokens of width 32
    # The tiny preset feeds its teacher CLIP-normalised pixels: grey 0 in [-1, 1] → (0.5 − mean) / std.
    expected = (0.5 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(scaling(torch.zeros(1, 3, 1, 1)).flatten(), expected)
    raw = TokenFlowConfig.from_preset("tiny", teacher=config.teacher, teacher_input="raw")
    _, identity = load_frozen_teacher_tower(raw, tmp_path / "open_clip_model.safetensors")
    assert torch.equal(identity(x), x)

def test_missing_weights_are_named(tmp_path):
    config = TokenFlowConfig.from_preset("tiny")
    missing = tmp_path / "nothing.safetensors"
    with pytest.raises(FileNotFoundError, match="nothing.safetensors.*--teacher none"):
        load_frozen_teacher_tower(config, missing)
    assert DEFAULT_TEACHER.name == "open_clip_model.safetensors"
