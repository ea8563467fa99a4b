"""Command line for the TokenFlow tokenizer.

    python -m tokenizer reconstruct --model DIR in.png out.png [--scales N]
    python -m tokenizer encode --model DIR in.png [--output codes.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from unimodal.cli import run_main

from .modeling_tokenflow import TokenFlowTokenizer


def _load(model_dir: str) -> TokenFlowTokenizer:
    return TokenFlowTokenizer.from_pretrained(model_dir).eval()


def check_output_is_not_input(output: str, input_path: str) -> None:
    """Refuses an output path that names the input file (writing it would destroy the image being read)."""
    if Path(output).resolve() == Path(input_path).resolve():
        raise ValueError(f"output {output!r} is the input image; choose another file name")


@torch.no_grad()
def reconstruct(args: argparse.Namespace) -> None:
    check_output_is_not_input(args.output, args.input)
    model = _load(args.model)
    processor = model.image_processor
    pixel_values = processor(args.input)["pixel_values"]
    indices = model.encode(pixel_values).indices
    num_scales = len(model.scales) if args.scales is None else args.scales
    if not 1 <= num_scales <= len(model.scales):
        raise SystemExit(f"error: --scales must be in [1, {len(model.scales)}], got {num_scales}")
    keep = model.config.prefix_lengths[num_scales - 1]
    pixels = model.decode_indices(indices[:, :keep])
    processor.postprocess(pixels)[0].save(args.output)
    print(f"wrote {args.output} from {keep} codes ({num_scales} of {len(model.scales)} scales)")


@torch.no_grad()
def encode(args: argparse.Namespace) -> None:
    if args.output:
        check_output_is_not_input(args.output, args.input)
    model = _load(args.model)
    pixel_values = model.image_processor(args.input)["pixel_values"]
    indices = model.encode(pixel_values).indices[0].tolist()
    record = {"image": str(args.input), "scales": model.scales, "codebook_size": model.codebook_size,
              "indices": indices}
    if args.output:
        Path(args.output).write_text(json.dumps(record))
        print(f"wrote {len(indices)} indices to {args.output}")
    else:
        json.dump(record, sys.stdout)
        sys.stdout.write("\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tokenizer", description="TokenFlow image tokenizer")
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("reconstruct", help="encode an image and decode it back")
    rec.add_argument("--model", required=True, help="folder written by save_pretrained")
    rec.add_argument("--scales", type=int, default=None, help="decode only the first N scales (coarse preview)")
    rec.add_argument("input")
    rec.add_argument("output")
    rec.set_defaults(func=reconstruct)
    enc = sub.add_parser("encode", help="print or save the multi-scale indices of an image")
    enc.add_argument("--model", required=True, help="folder written by save_pretrained")
    enc.add_argument("--output", default=None, help="JSON file to write (default: print to stdout)")
    enc.add_argument("input")
    enc.set_defaults(func=encode)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    run_main(main)
