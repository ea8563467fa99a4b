"""Checking a model folder before anything heavy is imported, so that a wrong `--model` fails at once."""

from __future__ import annotations

import json
import os
from pathlib import Path

MODEL_TYPE = "tokenflow_mllm"  # TokenFlowMLLMConfig.model_type (tests/test_demo.py checks they agree)

BUNDLED_MODEL = Path(__file__).resolve().parent / "shapesworld-tiny"

HOW_TO_GET_A_MODEL = """\
Get a model in one of two ways:
  * train one (ShapesWorld by default):
        deepspeed train/pretrain.py && deepspeed train/sft.py      # writes outputs/sft
        python -m demo --model outputs/sft
  * or pass any saved TokenFlowMLLM checkpoint folder: python -m demo --model DIR"""

# What `TokenFlowMLLM.save_pretrained` writes; each entry is (what it is, the files that provide it).
REQUIRED_FILES = (
    ("the model config", ("config.json",)),
    ("the weights", ("model.safetensors", "model.safetensors.index.json")),
    ("the text tokenizer", ("tokenizer.json",)),
    ("the processor config", ("processor_config.json",)),
    ("the chat template", ("chat_template.jinja", "chat_template.json")),
)


class CheckpointError(ValueError):
    """The model folder is missing or is not a TokenFlowMLLM checkpoint."""


def check_checkpoint(directory: str | os.PathLike) -> Path:
    """Raise `CheckpointError` naming what `directory` lacks to be a TokenFlowMLLM checkpoint folder."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"model folder {str(directory)!r} does not exist")
    missing = [f"{what} ({' or '.join(names)})" for what, names in REQUIRED_FILES
               if not any((directory / name).is_file() for name in names)]
    if missing:
        raise CheckpointError(f"{str(directory)!r} is not a TokenFlowMLLM checkpoint folder: it lacks "
                              + "; ".join(missing))
    model_type = json.loads((directory / "config.json").read_text()).get("model_type")
    if model_type != MODEL_TYPE:
        raise CheckpointError(f"{str(directory)!r} holds a {model_type!r} model, not a {MODEL_TYPE!r} checkpoint")
    return directory


__all__ = ["BUNDLED_MODEL", "CheckpointError", "HOW_TO_GET_A_MODEL", "MODEL_TYPE", "REQUIRED_FILES",
           "check_checkpoint"]
