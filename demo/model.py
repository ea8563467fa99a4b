"""The demo's model: loading it once, describing it for the page header, warming it up."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.generation.streamers import BaseStreamer

import llm

from .checkpoint import CheckpointError

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


__all__ = ["ModelCard", "describe", "load_model", "resolve_device", "warm_up"]
