"""Export a trained TokenFlowMLLM into a clean model folder: the one way a run becomes a shipped checkpoint.

    python train/export.py --model runs/sft --export-dir demo/shapesworld-tiny \
        --cfg-scale 3 --top-k 2048 --top-p 1          # the drawing sampler the model's card was measured with

The model is loaded strictly (`TokenFlowMLLM.from_pretrained`: damaged or missing weights raise), the sampler flags
given are stored as the checkpoint's drawing defaults (`llm.generation.set_sampler_defaults`, in
generation_config.json, so the demo and `generate_image` use them without flags), and `save_pretrained` writes the
folder: config (without the training machine's paths), weights, text tokenizer, chat template, processor config.
Nothing of the training run comes along (optimizer state, logs, samples, checkpoints). The export folder must be
missing, empty or an earlier export; a model card (README.md) and its figures already there are carried over, and
the old folder is replaced only once the new one is complete.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from train.toolkit import check_export_target, export_folder
from unimodal.cli import run_main

# What TokenFlowMLLM.save_pretrained writes with its processor (demo.checkpoint.REQUIRED_FILES are among them).
EXPORT_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                "chat_template.jinja", "processor_config.json")
# The model card and the figures it shows (`python -m eval.curve`, `python -m eval.gallery` and `python -m
# eval.report` output copied there).
EXPORT_KEPT_FILES = ("README.md", "curve.png", "drawn.png", "coarse_to_fine.png", "vqa.png", "reconstructions.png",
                     "vqa_accuracy.png", "shapes_eval.png")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def without_local_paths(config: Any) -> Any:
    """`config` with every `_name_or_path` that names a folder of this machine (an absolute path, e.g. where the
    tokenizer was loaded from during training) emptied: a shipped folder names no path of the machine it came from."""
    if isinstance(config, dict):
        return {key: "" if key == "_name_or_path" and isinstance(value, str) and os.path.isabs(value)
                else without_local_paths(value) for key, value in config.items()}
    if isinstance(config, list):
        return [without_local_paths(value) for value in config]
    return config


def export_model(model_dir: str | Path, export_dir: str | Path, dtype: str = "float32", **sampler) -> dict:
    """Write `model_dir`'s model (weights in `dtype`, sampler defaults updated with the `sampler` settings that are not
    None) into `export_dir`; returns the checkpoint's drawing sampler defaults."""
    from llm import TokenFlowMLLM
    from llm.generation import sampler_defaults, set_sampler_defaults

    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; allowed: {sorted(DTYPES)}")
    check_export_target(export_dir, EXPORT_FILES, EXPORT_KEPT_FILES, model_type=TokenFlowMLLM.config_class.model_type)
    model = TokenFlowMLLM.from_pretrained(model_dir, dtype=DTYPES[dtype])
    if model.processor is None:
        raise ValueError(f"{str(model_dir)!r} holds no processor (processor_config.json): a shipped model needs one")
    given = {key: value for key, value in sampler.items() if value is not None}
    settings = set_sampler_defaults(model, **given) if given else sampler_defaults(model)
    Path(export_dir).resolve().parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".export-", dir=Path(export_dir).resolve().parent) as tmp:
        model.save_pretrained(tmp)
        config = Path(tmp) / "config.json"
        config.write_text(json.dumps(without_local_paths(json.loads(config.read_text())), indent=2, sort_keys=True)
                          + "\n")
        export_folder(Path(tmp), export_dir, EXPORT_FILES, EXPORT_KEPT_FILES,
                      model_type=TokenFlowMLLM.config_class.model_type)
    return settings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from llm.generation import add_sampler_arguments

    p = argparse.ArgumentParser(prog="python train/export.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a TokenFlowMLLM checkpoint folder (a run's output or checkpoint-N)")
    p.add_argument("--export-dir", required=True,
                   help="folder to write (missing, empty, or an earlier export, which is replaced)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the written weights")
    add_sampler_arguments(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    from llm.generation import sampler_arguments

    args = parse_args(argv)
    settings = export_model(args.model, args.export_dir, args.dtype, **sampler_arguments(args))
    print(f"exported {args.model} -> {args.export_dir} (drawing sampler {settings})")
    return settings


if __name__ == "__main__":
    run_main(main)
