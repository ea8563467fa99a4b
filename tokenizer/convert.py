"""Convert a reference TokenFlow release file (`.pt`) into a `save_pretrained` folder.

    python -m tokenizer.convert --checkpoint tokenflow_clipb_32k_enhanced.pt --preset clipb-256 --output tokenflow-clipb
    python -m tokenizer.convert --checkpoint tokenflow_siglip_32k.pt --preset siglip-384 --output tokenflow-siglip

The release files hold one fp32 state dict under `ema`, `model` or `state_dict` (the first present wins, as in the
reference loaders); a bare state dict is accepted too. Keys are checked strictly against the preset's architecture,
`quantize.codebook_used` (a logging buffer) and SigLIP's `position_ids` buffer are ignored.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from transformers.initialization import no_init_weights

from unimodal.checkpoints import load_tensor_file
from unimodal.cli import run_main

from .configuration_tokenflow import TokenFlowConfig
from .modeling_tokenflow import TokenFlowTokenizer

CONTAINER_KEYS = ("ema", "model", "state_dict")
IGNORED_KEY_PATTERNS = (re.compile(r"^quantize\.codebook_used$"), re.compile(r"(^|\.)position_ids$"))
_MAX_LISTED = 20


class CheckpointMismatchError(ValueError):
    """The checkpoint does not fit the requested preset (missing, unexpected or mis-shaped keys)."""


def extract_state_dict(checkpoint: Mapping) -> dict[str, torch.Tensor]:
    """Picks the state dict out of a reference checkpoint: `ema`, else `model`, else `state_dict`, else the mapping."""
    if not isinstance(checkpoint, Mapping):
        raise CheckpointMismatchError(f"expected a dict-like checkpoint, got {type(checkpoint).__name__}")
    for key in CONTAINER_KEYS:
        if key in checkpoint and isinstance(checkpoint[key], Mapping):
            checkpoint = checkpoint[key]
            break
    tensors = {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointMismatchError(
            f"no tensors found in the checkpoint (top-level keys: {listing(checkpoint)}); expected a state "
            f"dict, optionally under one of {CONTAINER_KEYS}")
    return drop_ignored_keys(tensors)


def drop_ignored_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Removes the buffers the reference saves but the model does not need (usage window, SigLIP position ids)."""
    return {k: v for k, v in state_dict.items() if not any(p.search(k) for p in IGNORED_KEY_PATTERNS)}


def listing(items) -> str:
    """Sorted, comma-separated, at most `_MAX_LISTED` shown (with how many more)."""
    items = sorted(items)
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f", ... ({len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else "")


def state_dict_mismatches(expected: Mapping[str, tuple[int, ...]], given: Mapping[str, torch.Tensor]) -> list[str]:
    """One line each for the missing, unexpected and mis-shaped keys of `given` against `expected` (key → shape);
    empty when they match. The strict checks of both converters (tokenizer and LLM) report these lines."""
    missing = set(expected) - set(given)
    unexpected = set(given) - set(expected)
    wrong_shape = [f"{k}: checkpoint {tuple(given[k].shape)} vs model {tuple(expected[k])}"
                   for k in set(expected) & set(given) if tuple(given[k].shape) != tuple(expected[k])]
    return [f"{what} ({len(keys)}): {listing(keys)}" for what, keys in (
        ("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", wrong_shape)) if keys]


def _guess_preset(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    if any(k.startswith("encoder_vqkd.vision_model.") for k in state_dict):
        return "siglip-384"
    if "encoder_vqkd.conv1.weight" in state_dict:
        return "clipb-256"
    return None


def check_state_dict(model: TokenFlowTokenizer, state_dict: Mapping[str, torch.Tensor], preset: str) -> None:
    """Raises `CheckpointMismatchError` naming every missing, unexpected and mis-shaped key."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    mismatches = state_dict_mismatches(expected, state_dict)
    if not mismatches:
        return
    lines = [f"checkpoint does not match preset {preset!r} ({len(state_dict)} keys, model expects {len(expected)})"]
    lines += mismatches
    guess = _guess_preset(state_dict)
    if guess is not None and guess != preset:
        lines.append(f"the keys look like the {guess!r} preset; try --preset {guess}")
    raise CheckpointMismatchError("\n".join(lines))


def tokenizer_from_state_dict(state_dict: Mapping[str, torch.Tensor], preset: str,
                              config: TokenFlowConfig | None = None) -> TokenFlowTokenizer:
    """Builds the preset's architecture and loads `state_dict` into it strictly (fp32)."""
    config = config if config is not None else TokenFlowConfig.from_preset(preset)
    state_dict = drop_ignored_keys(state_dict)
    # Allocate without random init (the weights are overwritten) but on a real device, so buffers computed in the
    # constructors (e.g. position ids) are real.
    with no_init_weights():
        model = TokenFlowTokenizer(config)
    check_state_dict(model, state_dict, preset)
    model.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=True)
    return model.eval()


def convert(checkpoint_path: str | Path, preset: str, output_dir: str | Path) -> TokenFlowTokenizer:
    checkpoint = load_tensor_file(checkpoint_path)
    model = tokenizer_from_state_dict(extract_state_dict(checkpoint), preset)
    model.save_pretrained(output_dir)
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tokenizer.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="reference .pt file")
    parser.add_argument("--preset", required=True, choices=["clipb-256", "siglip-384"])
    parser.add_argument("--output", required=True, help="output folder for save_pretrained")
    args = parser.parse_args(argv)
    model = convert(args.checkpoint, args.preset, args.output)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.output}: preset {args.preset}, {n:,} parameters, {len(model.state_dict())} tensors")


if __name__ == "__main__":
    run_main(main)
