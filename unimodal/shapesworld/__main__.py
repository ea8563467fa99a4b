"""Command line for ShapesWorld.

    python -m unimodal.shapesworld export --format imagefolder|llava|captions|geneval --split test --num 200 --out DIR
    python -m unimodal.shapesworld show --split train --num 16 --out grid.png [--prompts]
"""

from __future__ import annotations

import argparse

from unimodal.cli import run_main

from .dataset import SPLITS, ShapesPrompts, ShapesWorld
from .export import EXPORT_FORMATS, export
from .sheet import contact_sheet
from .world import HELD_OUT_MODES


def _export(args: argparse.Namespace) -> None:
    path = export(args.format, args.out, args.split, args.num, args.size, args.seed, args.held_out)
    print(f"wrote {path}")


def _show(args: argparse.Namespace) -> None:
    if args.prompts:
        items = ShapesPrompts(args.split, args.size, args.num, args.seed, args.held_out)
        samples = [items[i] for i in range(len(items))]
        images = [s.image for s in samples]
        labels = [f"#{s.index} [{s.prompt.tag}] {s.prompt.text}" for s in samples]
    else:
        world = ShapesWorld(args.split, args.size, args.num, args.seed, args.held_out)
        samples = [world[i] for i in range(len(world))]
        images = [s.image for s in samples]
        labels = [f"#{s.index} {s.captions[0]}" for s in samples]
    contact_sheet(images, labels, tile=args.tile).save(args.out)
    print(f"wrote {args.out} ({len(images)} {args.split} {'prompts' if args.prompts else 'scenes'})")


def _add_common(parser: argparse.ArgumentParser, num: int) -> None:
    parser.add_argument("--split", choices=SPLITS, default="train")
    parser.add_argument("--num", type=int, default=num, help="number of samples")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--held-out", choices=HELD_OUT_MODES, default=None,
                        help="held-out colour–shape pairs (default: exclude for train, include otherwise)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m unimodal.shapesworld", description="ShapesWorld data")
    sub = parser.add_subparsers(dest="command", required=True)
    exp = sub.add_parser("export", help="write samples in a standard dataset format")
    exp.add_argument("--format", choices=EXPORT_FORMATS, required=True)
    exp.add_argument("--out", required=True, help="output folder")
    _add_common(exp, num=200)
    exp.set_defaults(func=_export)
    show = sub.add_parser("show", help="write a labelled contact sheet PNG")
    show.add_argument("--out", required=True, help="PNG file to write")
    show.add_argument("--prompts", action="store_true", help="show drawing prompts and their target scenes")
    show.add_argument("--tile", type=int, default=192, help="displayed side of each image in pixels")
    _add_common(show, num=16)
    show.set_defaults(func=_show)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except ValueError as error:
        parser.error(str(error))


if __name__ == "__main__":
    run_main(main)
