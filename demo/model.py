"""The demo's checkpoint: checking a folder before loading it, loading it once, describing it, warming it up."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.generation.streamers import BaseStreamer

import llm

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
    if model_type != llm.TokenFlowMLLMConfig.model_type:
        raise CheckpointError(f"{str(directory)!r} holds a {model_type!r} model, not a "
                              f"{llm.TokenFlowMLLMConfig.model_type!r} checkpoint")
    return directory


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise CheckpointError("--device cuda was asked for, but no CUDA device is available (use auto or cpu)")
    return device


def load_model(directory: Path, device: str) -> llm.TokenFlowMLLM:
    """The checkpoint in eval mode on `device` (bfloat16 on CUDA, float32 on CPU), with its processor attached."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = llm.TokenFlowMLLM.from_pretrained(directory, dtype=dtype).to(device).eval()
    if model.processor is None:
        raise CheckpointError(f"{str(directory)!r} has no processor files next to the weights")
    return model


@dataclass
class ModelCard:
    name: str
    tokenizer_preset: str
    parameters: int
    device: str

    def header(self) -> str:
        return (f"**{self.name}** · tokenizer `{self.tokenizer_preset}` · {self.parameters / 1e6:.1f} M parameters · "
                f"{self.device}")


def describe(model: llm.TokenFlowMLLM, directory: Path, device: str) -> ModelCard:
    preset = model.config.tokenizer_config.preset or "custom"
    return ModelCard(directory.name, preset, sum(p.numel() for p in model.parameters()), device)


class _FirstToken(BaseStreamer):
    """Records when the first generated token arrives (the prompt is the first `put`)."""

    def __init__(self):
        self.calls, self.first = 0, None

    def put(self, value):
        self.calls += 1
        if self.calls == 2 and self.first is None:
            self.first = time.perf_counter()

    def end(self):
        pass


def warm_up(model: llm.TokenFlowMLLM, max_new_tokens: int = 16) -> dict[str, float]:
    """Time one text turn (to its first token) and one drawing (to the full image), in seconds."""
    streamer = _FirstToken()
    start = time.perf_counter()
    llm.chat(model, [{"role": "user", "content": "What is in the picture?"}], draw=False,
             max_new_tokens=max_new_tokens, streamer=streamer)
    first_token = (streamer.first or time.perf_counter()) - start
    start = time.perf_counter()
    llm.chat(model, [{"role": "user", "content": "Draw a red circle."}], draw=True, max_new_tokens=1, seed=0,
             image_settings=llm.generation.sampler_defaults(model))
    return {"time_to_first_token_s": first_token, "time_to_drawing_s": time.perf_counter() - start}


__all__ = ["BUNDLED_MODEL", "CheckpointError", "HOW_TO_GET_A_MODEL", "ModelCard", "check_checkpoint", "describe",
           "load_model", "resolve_device", "warm_up"]
