"""Encode the images of a training set once with the frozen TokenFlow tokenizer, so the LLM stages train on indices.

    python train/pretokenize.py --output-dir data/shapesworld-sft-tok                 # ShapesWorld, stage-2 tasks
    python train/pretokenize.py --data llava:/data/llava.json --image-folder /data/images --output-dir data/llava-tok \\
        --tokenizer /models/tokenflow-clipb --batch-size 64
    python train/pretokenize.py --data captions:/data/cc3m.jsonl --stage pretrain --output-dir data/cc3m-tok
    deepspeed train/sft.py --data pretokenized:data/llava-tok,text:/data/chat.jsonl --mixture ...

`--data` takes the same sources as the stages (shapesworld, llava:PATH, captions:PATH, text:PATH; comma-separated
sources are written one after the other, each whole). Output folder (read by `train.conversations
.PretokenizedConversations`; see its docstring for the exact layout): `indices-00000.safetensors`, ... ([n, Σs²] int16
indices, scale-major), `conversations.jsonl` (each image item replaced by its `{"shard", "row"}`), and
`manifest.json` (tokenizer fingerprint, codebook size, scales, counts), written last so a folder without it is
an unfinished run. With `--slot-labels`, ShapesWorld's looked-at image items also keep their per-slot labels (for
the stages' `--slot-loss-weight`).

Message text is checked first, by the processor the stages will use (`--backbone`/`--chat-format`, or `--init-from`):
a record with a reserved token (`<boi>`, `<image>` in an item, a chat-template marker) stops the run before anything
is written, naming the record and its file, as training would refuse it. A conversation with an unreadable image is
skipped and counted (`num_skipped_unreadable` in the manifest), never replaced. An image file used by several
conversations is encoded once. Drawing prompts are dropped for classifier-free guidance here, with `--cfg-drop-prob`,
exactly as the stages' sources do it on the fly.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from tqdm import tqdm

from llm.configuration_tokenflow_mllm import IMAGE_PLACEMENTS
from train.conversations import (
    PRETOKENIZED_FORMAT, PRETOKENIZED_VERSION, conversation_images, tokenizer_fingerprint,
)
from unimodal.cli import run_main
from unimodal.images import ImageLoadError, load_image

logger = logging.getLogger("train.pretokenize")

INT16_CODEBOOK_LIMIT = 2**15  # indices 0 .. 32767 fit int16
SHARD_NAME = "indices-{:05d}.safetensors"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from train.arguments import DEFAULT_TOKENIZER

    parser = argparse.ArgumentParser(prog="train/pretokenize.py", description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="shapesworld",
                        help="comma-separated sources: shapesworld, llava:PATH, captions:PATH, text:PATH")
    parser.add_argument("--output-dir", required=True, help="folder for the shards, conversations and manifest")
    parser.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER),
                        help="the TokenFlow tokenizer the model will use (save_pretrained folder or reference .pt)")
    parser.add_argument("--stage", default="sft", choices=("pretrain", "sft"),
                        help="which stage's tasks ShapesWorld and caption sources produce")
    parser.add_argument("--image-folder", default=None, help="folder that image paths are relative to")
    parser.add_argument("--backbone", default="shapesworld-small",
                        help="the backbone the stages will train (a named config or a local folder): its text "
                             "tokenizer's reserved tokens may not appear in message text, as in training")
    parser.add_argument("--chat-format", default="chatml", choices=("chatml", "vicuna"),
                        help="chat template of the model the stages will build")
    parser.add_argument("--init-from", default=None,
                        help="a TokenFlowMLLM folder the stages will start from (its processor checks the messages)")
    parser.add_argument("--num-samples", type=int, default=20000, help="ShapesWorld conversations to write")
    parser.add_argument("--shapesworld-tasks", default=None, help="ShapesWorld task weights, e.g. 'vqa:0.5,t2i:0.5'")
    parser.add_argument("--image-placement", choices=IMAGE_PLACEMENTS, default="before_text",
                        help="where ShapesWorld puts a looked-at image in its user turn; must be the image_placement "
                             "of the model that will train on the shards")
    parser.add_argument("--questions-per-image", type=int, default=3,
                        help="ShapesWorld VQA: questions asked about one image in a conversation")
    parser.add_argument("--question-types", default=None,
                        help="ShapesWorld VQA: ask only these comma-separated types (default all)")
    parser.add_argument("--extra-questions", default=None,
                        help="ShapesWorld VQA: more questions of these types per conversation, as type:count pairs "
                             "(as the stages' --extra-questions), e.g. 'relation:2'")
    parser.add_argument("--reasoned-answers", default=None,
                        help="ShapesWorld VQA: answer these comma-separated types with their reasoning first (as the "
                             "stages' --reasoned-answers)")
    parser.add_argument("--slot-labels", action="store_true",
                        help="ShapesWorld: write each looked-at image's per-slot labels, the targets of the stages' "
                             "--slot-loss-weight")
    parser.add_argument("--cfg-drop-prob", type=float, default=0.1,
                        help="probability of dropping a drawing prompt to '' (train with the same value)")
    parser.add_argument("--seed", type=int, default=0, help="data seed (the stages' --data-seed)")
    parser.add_argument("--shard-size", type=int, default=10000, help="images per shard file")
    parser.add_argument("--batch-size", type=int, default=32, help="images per tokenizer forward")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing pre-tokenized folder")
    args = parser.parse_args(argv)
    for name in ("shard_size", "batch_size", "num_samples"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    if args.questions_per_image < 1:
        parser.error(f"--questions-per-image={args.questions_per_image} must be >= 1")
    if not 0 <= args.cfg_drop_prob <= 1:
        parser.error(f"--cfg-drop-prob={args.cfg_drop_prob} must be in [0, 1]")
    return args


def build_sources(args: argparse.Namespace, slot_label_side: int | None = None
                  ) -> list[tuple[str, torch.utils.data.Dataset]]:
    """--data → [(kind, dataset)], each source built exactly as the stages build it (ShapesWorld's looked-at images
    labelled slot by slot on a `slot_label_side` grid when given)."""
    from train.stage import build_dataset

    sources = []
    for spec in [s.strip() for s in args.data.split(",") if s.strip()]:
        kind = spec.partition(":")[0]
        if kind == "pretokenized":
            raise ValueError(f"--data {spec!r} is already pre-tokenized")
        options = SimpleNamespace(data=spec, mixture=None, image_folder=args.image_folder,
                                  num_samples=args.num_samples, shapesworld_tasks=args.shapesworld_tasks,
                                  cfg_drop_prob=args.cfg_drop_prob, questions_per_image=args.questions_per_image,
                                  question_types=args.question_types, reasoned_answers=args.reasoned_answers,
                                  extra_questions=args.extra_questions,
                                  curriculum_steps=0)  # shards are read by index, without a training step
        sources.append((kind, build_dataset(args.stage, options, args.seed, args.image_placement, slot_label_side)))
    if not sources:
        raise ValueError("--data names no source")
    return sources


class ShardWriter:
    """Encodes queued images in batches and writes their indices into fixed-size shards, rows in queue order.

    A queued image gets its global row at once (`queue` returns `(shard, row)`); the encoding happens when a batch is
    full (or at `close`), and a shard file is written whenever `shard_size` rows are encoded.
    """

    def __init__(self, image_tokenizer, output_dir: Path, shard_size: int, batch_size: int, device: str):
        self.image_tokenizer, self.output_dir = image_tokenizer, output_dir
        self.shard_size, self.batch_size, self.device = shard_size, batch_size, device
        self.processor = image_tokenizer.image_processor
        codebook_size = image_tokenizer.config.codebook_size
        if codebook_size <= INT16_CODEBOOK_LIMIT:
            self.dtype = torch.int16
        else:
            self.dtype = torch.int32
            logger.info("codebook of %d entries does not fit int16; writing int32 indices", codebook_size)
        self.pending: list[torch.Tensor] = []  # pixel values [3, H, W] waiting for a batch
        self.encoded: list[torch.Tensor] = []  # index rows [Σs²] waiting for a full shard
        self.num_images = 0
        self.shard_names: list[str] = []

    def queue(self, image) -> tuple[int, int]:
        """A loaded image → the (shard, row) its indices will have."""
        self.pending.append(self.processor(image, return_tensors="pt")["pixel_values"][0])
        row = self.num_images
        self.num_images += 1
        if len(self.pending) == self.batch_size:
            self._encode_pending()
        return divmod(row, self.shard_size)

    @torch.no_grad()
    def _encode_pending(self) -> None:
        if not self.pending:
            return
        pixel_values = torch.stack(self.pending).to(self.device)
        self.pending = []
        indices = self.image_tokenizer.encode(pixel_values).indices.to("cpu", self.dtype)
        self.encoded.extend(indices)
        while len(self.encoded) >= self.shard_size:
            self._write_shard(self.encoded[: self.shard_size])
            self.encoded = self.encoded[self.shard_size:]

    def _write_shard(self, rows: list[torch.Tensor]) -> None:
        from safetensors.torch import save_file

        name = SHARD_NAME.format(len(self.shard_names))
        save_file({"indices": torch.stack(rows).contiguous()}, str(self.output_dir / name))
        self.shard_names.append(name)

    def close(self) -> None:
        self._encode_pending()
        if self.encoded:
            self._write_shard(self.encoded)
            self.encoded = []


def message_checker(args: argparse.Namespace, image_tokenizer):
    """The processor the stages will encode these conversations with, for its message checks: reserved tokens
    (`<boi>`, `<image>` in items, the chat template's markers) in message text are refused here, not in training."""
    from transformers import AutoProcessor

    from llm import TokenFlowProcessor
    from llm.build import prepare_text_tokenizer
    from train.stage import load_text_tokenizer

    if args.init_from:
        return AutoProcessor.from_pretrained(args.init_from)
    text_tokenizer = load_text_tokenizer(args.backbone, args.chat_format)
    prepare_text_tokenizer(text_tokenizer, args.chat_format)
    return TokenFlowProcessor(image_tokenizer.image_processor, text_tokenizer, scales=image_tokenizer.scales)


def check_conversations(args: argparse.Namespace, sources: list, image_tokenizer) -> None:
    """Before anything is written: raise naming the record and its file when the stages would refuse its messages.
    (ShapesWorld conversations are generated, not read, and are not checked.)"""
    checker = message_checker(args, image_tokenizer)
    files = {spec.strip().partition(":")[0]: spec.strip().partition(":")[2] for spec in args.data.split(",")}
    for kind, dataset in sources:
        if kind == "shapesworld":
            continue
        for index in range(len(dataset)):
            conversation = dataset[index]
            try:
                checker.check_messages(conversation["messages"])
            except (ValueError, TypeError) as error:
                raise ValueError(f"{files[kind]}: record {conversation.get('id', index)!r}: {error}") from None


def load_conversation_images(conversation: dict) -> list:
    """The images of a conversation loaded as the training collator loads them (PIL images pass through)."""
    return [item["image"] if hasattr(item["image"], "mode") else load_image(item["image"])
            for item in conversation_images(conversation)]


def image_key(image) -> str | None:
    """A key under which an image file is encoded only once (None for in-memory images)."""
    return os.path.abspath(os.fspath(image)) if isinstance(image, (str, os.PathLike)) else None


def pretokenize(args: argparse.Namespace) -> dict:
    """Write the pre-tokenized folder for `args` (see `parse_args`); returns the manifest."""
    from train.stage import load_image_tokenizer

    output_dir = Path(args.output_dir)
    existing = [p for p in (output_dir / "manifest.json", output_dir / "conversations.jsonl",
                            *output_dir.glob("indices-*.safetensors")) if p.exists()] if output_dir.is_dir() else []
    if existing and not args.overwrite:
        raise FileExistsError(f"{str(output_dir)!r} already holds pre-tokenized data ({existing[0].name}, ...); "
                              "pass --overwrite to replace it or choose another --output-dir")
    image_tokenizer = load_image_tokenizer(args.tokenizer).to(args.device).eval()
    slot_label_side = image_tokenizer.config.grid_size if args.slot_labels else None
    sources = build_sources(args, slot_label_side)
    check_conversations(args, sources, image_tokenizer)
    for path in existing:
        path.unlink()
    output_dir.mkdir(parents=True, exist_ok=True)

    writer = ShardWriter(image_tokenizer, output_dir, args.shard_size, args.batch_size, args.device)
    rows_of_files: dict[str, tuple[int, int]] = {}
    counts = {"num_conversations": 0, "num_skipped_unreadable": 0, "num_understood_images": 0, "num_drawn_images": 0}
    per_source = {}
    tmp_conversations = output_dir / "conversations.jsonl.tmp"
    with tmp_conversations.open("w", encoding="utf-8") as out:
        for kind, dataset in sources:
            written = 0
            for index in tqdm(range(len(dataset)), desc=f"pretokenize {kind}", unit="conv", dynamic_ncols=True):
                conversation = dataset[index]
                try:
                    images = load_conversation_images(conversation)
                except ImageLoadError as error:
                    counts["num_skipped_unreadable"] += 1
                    logger.warning("skipping sample %s: %s", conversation.get("id", index), error)
                    continue
                for message in conversation["messages"]:
                    if not isinstance(message["content"], list):
                        continue
                    for item in message["content"]:
                        if item["type"] != "image":
                            continue
                        source_image, image = item.pop("image"), images.pop(0)
                        key = image_key(source_image)
                        if key is None or key not in rows_of_files:
                            shard_row = writer.queue(image)
                            if key is not None:
                                rows_of_files[key] = shard_row
                        item["shard"], item["row"] = rows_of_files[key] if key is not None else shard_row
                        if "slot_labels" in item:
                            item["slot_labels"] = item["slot_labels"].tolist()
                        drawn = message["role"] == "assistant" and not item.get("in_history", False)
                        counts["num_drawn_images" if drawn else "num_understood_images"] += 1
                out.write(json.dumps({**conversation, "source": kind}, ensure_ascii=False) + "\n")
                written += 1
            per_source[kind] = written
            counts["num_conversations"] += written
    writer.close()
    os.replace(tmp_conversations, output_dir / "conversations.jsonl")

    config = image_tokenizer.config
    manifest = {
        "format": PRETOKENIZED_FORMAT, "version": PRETOKENIZED_VERSION,
        "tokenizer": {"name_or_path": str(args.tokenizer), **tokenizer_fingerprint(image_tokenizer)},
        "codebook_size": config.codebook_size, "scales": list(config.scales),
        "num_image_codes": sum(s * s for s in config.scales), "dtype": str(writer.dtype).replace("torch.", ""),
        "shard_size": args.shard_size, "shards": writer.shard_names, "num_images": writer.num_images,
        **counts, "sources": per_source, "data": args.data, "stage": args.stage, "seed": args.seed,
        "cfg_drop_prob": args.cfg_drop_prob, "image_placement": args.image_placement,
        "question_types": args.question_types, "reasoned_answers": args.reasoned_answers,
        "extra_questions": args.extra_questions, "slot_label_side": slot_label_side,
    }
    tmp_manifest = output_dir / "manifest.json.tmp"
    tmp_manifest.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp_manifest, output_dir / "manifest.json")
    logger.info("wrote %d conversations, %d encoded images in %d shards to %s (%d skipped: unreadable image)",
                counts["num_conversations"], writer.num_images, len(writer.shard_names), output_dir,
                counts["num_skipped_unreadable"])
    return manifest


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO,
                        stream=sys.stdout)
    return pretokenize(parse_args(argv))


if __name__ == "__main__":
    run_main(main)
