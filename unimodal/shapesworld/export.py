"""Write ShapesWorld to disk in the formats real data comes in, so one set of loaders serves both.

    imagefolder  <out>/<split>/000000.png … + <out>/<split>/metadata.jsonl   (Hugging Face `imagefolder`)
    llava        <out>/<split>/000000.png … + <out>/llava_<split>.json       (LLaVA conversations)
    captions     <out>/<split>/000000.png … + <out>/captions_<split>.jsonl   (image–caption pairs)
    geneval      <out>/geneval_<split>.jsonl                                  (GenEval prompt metadata)

Image paths inside the metadata are relative to the file that names them. All formats of one split share the
same image files, so several can be written into one folder.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

from .dataset import ShapesPrompts, ShapesSample, ShapesWorld

EXPORT_FORMATS: tuple[str, ...] = ("imagefolder", "llava", "captions", "geneval")


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    with path.open("w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return path


def _saved_samples(world: ShapesWorld, out_dir: Path, what: str) -> Iterator[tuple[ShapesSample, str]]:
    """Each sample of `world`, after saving its image; yields the image path relative to `out_dir`."""
    (out_dir / world.split).mkdir(parents=True, exist_ok=True)
    for index in tqdm(range(len(world)), desc=f"{what} {world.split}", unit="img"):
        sample = world[index]
        relative = f"{world.split}/{index:06d}.png"
        sample.image.save(out_dir / relative)
        yield sample, relative


def export_imagefolder(world: ShapesWorld, out_dir: str | Path) -> Path:
    """Images and metadata.jsonl (file_name, caption, captions, vqa, scene) per split; returns metadata.jsonl."""
    out_dir = Path(out_dir)
    records = [{
        "file_name": Path(relative).name,
        "caption": sample.captions[0],
        "captions": sample.captions,
        "vqa": [{"question": q.question, "answer": q.answer, "type": q.type} for q in sample.vqa],
        "scene": sample.description,
    } for sample, relative in _saved_samples(world, out_dir, "imagefolder")]
    return _write_jsonl(out_dir / world.split / "metadata.jsonl", records)


def export_llava(world: ShapesWorld, out_dir: str | Path) -> Path:
    """One conversation per image holding all its questions, the image token in the first turn."""
    out_dir = Path(out_dir)
    records = []
    for sample, relative in _saved_samples(world, out_dir, "llava"):
        turns = []
        for k, qa in enumerate(sample.vqa):
            turns.append({"from": "human", "value": ("<image>\n" if k == 0 else "") + qa.question})
            turns.append({"from": "gpt", "value": qa.answer})
        records.append({"id": f"shapesworld-{world.split}-{sample.index:06d}", "image": relative,
                        "conversations": turns})
    path = out_dir / f"llava_{world.split}.json"
    path.write_text(json.dumps(records))
    return path


def export_captions(world: ShapesWorld, out_dir: str | Path) -> Path:
    """One line per image: `caption` rotates through the caption templates by index (so a loader that reads
    one caption per image still sees every template); `captions` holds them all."""
    out_dir = Path(out_dir)
    records = [{"image": relative, "caption": sample.captions[sample.index % len(sample.captions)],
                "captions": sample.captions}
               for sample, relative in _saved_samples(world, out_dir, "captions")]
    return _write_jsonl(out_dir / f"captions_{world.split}.jsonl", records)


def export_geneval(prompts: ShapesPrompts, out_dir: str | Path) -> Path:
    """One GenEval metadata dict per line (prompt, tag, include[, exclude])."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    indices = tqdm(range(len(prompts)), desc=f"geneval {prompts.split}", unit="prompt")
    records = [prompts.prompt(i).meta for i in indices]
    return _write_jsonl(out_dir / f"geneval_{prompts.split}.jsonl", records)


def export(format: str, out_dir: str | Path, split: str = "test", num: int = 200, size: int = 64, seed: int = 0,
           held_out: str | None = None) -> Path:
    """Export `num` samples of `split` in `format` (one of EXPORT_FORMATS); returns the metadata file written."""
    if format not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {format!r}; allowed: {', '.join(EXPORT_FORMATS)}")
    if format == "geneval":
        return export_geneval(ShapesPrompts(split, size, num, seed, held_out), out_dir)
    world = ShapesWorld(split, size, num, seed, held_out)
    writer = {"imagefolder": export_imagefolder, "llava": export_llava, "captions": export_captions}[format]
    return writer(world, out_dir)
