"""The frozen semantic teacher a tokenizer distils from (training) and is measured against (evaluation).

The default is the ShapesWorld teacher that `train/train_teacher.py` writes into the repository's
`train/pretrained/shapesworld-teacher/` (a data folder; nothing is imported from there).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from unimodal.vision_towers import build_vision_tower

from .modeling_tokenflow import scaling_layer_for

DEFAULT_TEACHER_DIR = Path(__file__).resolve().parents[1] / "train" / "pretrained" / "shapesworld-teacher"
TEACHER_WEIGHTS_NAME = "open_clip_model.safetensors"
DEFAULT_TEACHER = DEFAULT_TEACHER_DIR / TEACHER_WEIGHTS_NAME  # what the tiny tokenizer distils from


def load_frozen_teacher_tower(config, path: str | os.PathLike):
    """The tokenizer `config`'s teacher tower with the weights at `path`, frozen, and the layer that maps [-1, 1]
    pixels to its input: (tower [B, 3, H, W] → [B, g², D], scaling)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"teacher weights {str(path)!r} not found; train them with "
                                "`python train/train_teacher.py`, or pass --teacher none to go without the teacher")
    tower = build_vision_tower({**config.teacher, "pretrained": str(path)}).eval().requires_grad_(False)
    return tower, scaling_layer_for(config.teacher_input) or torch.nn.Identity()  # "raw": pixels as they are
