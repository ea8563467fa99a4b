"""Train the ShapesWorld semantic teacher: a tiny open_clip CLIP, contrastive on ShapesWorld images and captions,
and told patch by patch what the scene holds there.

    python train/train_teacher.py                                  # defaults: outputs/shapesworld-teacher
    python train/train_teacher.py --output-dir train/pretrained/shapesworld-teacher   # replace the shipped teacher
    python train/train_teacher.py --max-steps 20 --output-dir /tmp/teacher
    python train/train_teacher.py --dense-weight 1 --init-from runs/teacher-a --output-dir runs/teacher-b   # continue

The model is open_clip's own `CLIP` built from `TINY_OPEN_CLIP_CFG` (the `tiny` tokenizer preset's teacher and
semantic tower), trained with open_clip's `ClipLoss` and tokenised with open_clip's `SimpleTokenizer` (its BPE
vocabulary ships inside the package, so nothing is downloaded). Images are fed exactly as the tokenizer feeds its
teacher: [0, 1] pixels normalised with the CLIP mean/std.

Dense supervision (`--dense-weight W`, default 1; 0 trains on captions alone): a linear head on every projected
patch token (the features a tokenizer distils, `ln_post(tokens) @ proj`) classifies the shape, colour and size of
the object in the patch's 3×3 cell (empty included), and W times its cross-entropy joins the contrastive loss. A
caption names what a scene holds but not where, so a contrastive teacher's patch tokens carry colour well and shape
poorly; the dense loss is the world's ground truth standing in for what CLIP/SigLIP patch features carry on real
photos. The head is a training device and is not saved; `metrics.json` reports how well held-out patches are read by
it.

The output folder is in open_clip's formats:
    open_clip_model.safetensors   the full CLIP state dict (stored fp16, loaded as fp32)
    open_clip_config.json         {"model_cfg", "preprocess_cfg"}: open_clip.create_model("local-dir:<folder>")
    shapesworld-teacher.json      the bare model config: open_clip.add_model_config(<folder>), then
                                  open_clip.create_model("shapesworld-teacher", pretrained=<folder>/open_clip_model.safetensors)
    metrics.json, train_log.csv   zero-shot caption retrieval on held-out test scenes, and the loss per step
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from tokenizer.configuration_tokenflow import CLIP_MEAN, CLIP_STD, TINY_OPEN_CLIP_CFG
from tokenizer.teacher import TEACHER_WEIGHTS_NAME
from train.toolkit import positive_int
from unimodal.cli import run_main
from unimodal.shapesworld import ShapesWorld
from unimodal.shapesworld.labels import LABEL_CLASSES, LABEL_NAMES, slot_labels

# Untracked: replacing the shipped teacher (tokenizer.teacher.DEFAULT_TEACHER_DIR) is explicit (--output-dir).
DEFAULT_OUTPUT_DIR = Path("outputs") / "shapesworld-teacher"
MODEL_NAME = "shapesworld-teacher"


def build_clip(model_cfg: dict | None = None) -> open_clip.CLIP:
    """open_clip's CLIP from a model config dict (default: the tiny ShapesWorld teacher)."""
    cfg = copy.deepcopy(model_cfg or TINY_OPEN_CLIP_CFG)
    return open_clip.CLIP(embed_dim=cfg["embed_dim"], vision_cfg=cfg["vision_cfg"], text_cfg=cfg["text_cfg"],
                          quick_gelu=cfg.get("quick_gelu", False))


def images_to_tensor(images) -> torch.Tensor:
    """PIL RGB images → [B, 3, H, W] CLIP-normalised (the teacher's input convention)."""
    x = torch.from_numpy(np.stack([np.asarray(im, dtype=np.uint8) for im in images])).permute(0, 3, 1, 2)
    x = x.float() / 255.0
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def caption_retrieval(model: open_clip.CLIP, text_tokenizer, world: ShapesWorld, num_scenes: int,
                      batch_size: int = 128) -> dict[str, float]:
    """Zero-shot retrieval between `num_scenes` scenes and their first (complete) captions.

    image→text top-1: the best-scoring caption among all `num_scenes` captions describes the image (its text equals
    the scene's own caption; two scenes can share a caption, and then either counts). text→image likewise.
    """
    model.eval()
    image_feats, text_feats, captions = [], [], []
    for start in range(0, num_scenes, batch_size):
        samples = [world[i] for i in range(start, min(num_scenes, start + batch_size))]
        captions += [s.captions[0] for s in samples]
        image_feats.append(F.normalize(model.encode_image(images_to_tensor([s.image for s in samples])), dim=-1))
        text_feats.append(F.normalize(model.encode_text(text_tokenizer([s.captions[0] for s in samples])), dim=-1))
    sims = torch.cat(image_feats) @ torch.cat(text_feats).t()  # [N, N]
    same = torch.tensor([[a == b for b in captions] for a in captions])
    i2t = same[torch.arange(len(captions)), sims.argmax(dim=1)].float().mean().item()
    t2i = same[sims.argmax(dim=0), torch.arange(len(captions))].float().mean().item()
    return {"image_to_text_top1": i2t, "text_to_image_top1": t2i, "num_scenes": num_scenes,
            "chance": 1.0 / num_scenes}


def image_outputs(model: open_clip.CLIP, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass of the visual tower → (normalised image features [B, embed_dim] as `encode_image` gives them, the
    projected patch tokens [B, g², embed_dim]: the teacher features a tokenizer distils)."""
    model.visual.output_tokens = True
    try:
        pooled, tokens = model.visual(images)
    finally:
        model.visual.output_tokens = False
    return F.normalize(pooled, dim=-1), tokens @ model.visual.proj


def dense_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropies of shape, colour and size: logits [B, g², ΣLABEL_CLASSES] against labels [B, 3, g²]."""
    return sum(F.cross_entropy(part.flatten(0, 1), target.flatten())
               for part, target in zip(logits.split(LABEL_CLASSES, -1), labels.unbind(1)))


@torch.no_grad()
def dense_accuracy(model: open_clip.CLIP, head: torch.nn.Module, world: ShapesWorld, num_scenes: int,
                   batch_size: int = 128) -> dict[str, float]:
    """How well `head` reads held-out patches: accuracy of shape, colour and size over patches whose cell holds an
    object, and of telling empty patches from occupied ones."""
    model.eval()
    hits = {name: [] for name in (*LABEL_NAMES, "occupied")}
    for start in range(0, num_scenes, batch_size):
        samples = [world[i] for i in range(start, min(num_scenes, start + batch_size))]
        images = images_to_tensor([s.image for s in samples])
        tokens = image_outputs(model, images)[1]
        labels = torch.stack([slot_labels(s.scene, math.isqrt(tokens.shape[1])) for s in samples])
        predicted = [part.argmax(-1) for part in head(tokens).split(LABEL_CLASSES, -1)]
        occupied = labels[:, 0] > 0
        for name, guess, target in zip(LABEL_NAMES, predicted, labels.unbind(1)):
            hits[name].append((guess == target)[occupied])
        hits["occupied"].append(((predicted[0] > 0) == occupied).flatten())
    return {f"dense_{name}_accuracy": torch.cat(h).float().mean().item() for name, h in hits.items()}


def save_teacher(model: open_clip.CLIP, output_dir: Path, model_cfg: dict) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    # fp16 on disk halves the file (most of it is the 49408-token embedding); open_clip loads it into fp32.
    state = {k: (v.half() if v.is_floating_point() else v).detach().contiguous().clone()
             for k, v in model.state_dict().items()}
    tmp = output_dir / (TEACHER_WEIGHTS_NAME + ".tmp")
    save_file(state, str(tmp))
    os.replace(tmp, output_dir / TEACHER_WEIGHTS_NAME)
    vision = model_cfg["vision_cfg"]
    preprocess = {"size": vision["image_size"], "mean": list(CLIP_MEAN), "std": list(CLIP_STD),
                  "interpolation": "bicubic", "resize_mode": "squash"}
    (output_dir / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess}, indent=2))
    (output_dir / f"{MODEL_NAME}.json").write_text(json.dumps(model_cfg, indent=2))


def load_teacher(path: str | os.PathLike) -> open_clip.CLIP:
    """The CLIP saved by this script, through open_clip's own loader (folder or weights file)."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if not (folder / "open_clip_config.json").is_file():
        raise FileNotFoundError(f"{folder} has no open_clip_config.json; expected a folder written by "
                                "train/train_teacher.py")
    return open_clip.create_model(f"local-dir:{folder}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT_DIR)
    p.add_argument("--max-steps", type=positive_int, default=100)
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--init-from", type=Path, default=None,
                   help="a teacher folder written by this script to continue from (default: random weights)")
    p.add_argument("--dense-weight", type=float, default=1.0,
                   help="weight of the per-patch shape/colour/size loss next to the contrastive one (0: captions only)")
    p.add_argument("--num-train-scenes", type=int, default=100_000,
                   help="train scenes cycled through (ShapesWorld train split, no held-out colour-shape pairs)")
    p.add_argument("--num-eval-scenes", type=int, default=256, help="held-out test scenes for retrieval")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.max_steps < 1 or args.batch_size < 2:
        raise ValueError(f"need --max-steps >= 1 and --batch-size >= 2 (contrastive), got {args.max_steps}, "
                         f"{args.batch_size}")
    if not args.dense_weight >= 0:
        raise ValueError(f"--dense-weight={args.dense_weight!r} must be >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model_cfg = copy.deepcopy(TINY_OPEN_CLIP_CFG)
    model = build_clip(model_cfg)
    if args.init_from is not None:
        model.load_state_dict(load_teacher(args.init_from).state_dict())
    head = torch.nn.Linear(model_cfg["embed_dim"], sum(LABEL_CLASSES))  # the dense loss's reader, not saved
    context_length = model_cfg["text_cfg"]["context_length"]
    text_tokenizer = open_clip.SimpleTokenizer(context_length=context_length)
    loss_fn = open_clip.ClipLoss()
    named = [*model.named_parameters(), *(head.named_parameters() if args.dense_weight else [])]
    decay = [p for n, p in named if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in named if not (p.ndim >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:  # linear warmup, cosine decay to 0
        if step < args.warmup_steps:
            return args.lr * (step + 1) / args.warmup_steps
        t = (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps)
        return args.lr * 0.5 * (1 + math.cos(math.pi * t))

    train = ShapesWorld("train", size=model_cfg["vision_cfg"]["image_size"], num_samples=args.num_train_scenes,
                        seed=args.seed)
    test = ShapesWorld("test", size=train.size, num_samples=args.num_eval_scenes, seed=args.seed)
    caption_rng = np.random.default_rng(args.seed)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    log_path = args.output_dir / "train_log.csv"
    start = time.time()
    with open(log_path, "w", newline="") as log_file:
        log = csv.writer(log_file)
        log.writerow(["step", "loss", "lr", "logit_scale", "contrastive_loss", "dense_loss"])
        bar = tqdm(range(args.max_steps), desc="teacher", dynamic_ncols=True)
        for step in bar:
            model.train()
            samples = [train[(step * args.batch_size + j) % len(train)] for j in range(args.batch_size)]
            images = images_to_tensor([s.image for s in samples])
            # any of the scene's captions: complete descriptions in several templates, or the short one
            captions = [s.captions[caption_rng.integers(len(s.captions))] for s in samples]
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            image_features, tokens = image_outputs(model, images)
            text_features = model.encode_text(text_tokenizer(captions), normalize=True)
            logit_scale = model.logit_scale.exp()
            contrastive = loss_fn(image_features, text_features, logit_scale)
            dense = torch.zeros(())
            if args.dense_weight:
                labels = torch.stack([slot_labels(s.scene, math.isqrt(tokens.shape[1])) for s in samples])
                dense = dense_loss(head(tokens), labels)
            loss = contrastive + args.dense_weight * dense
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for _, p in named], 1.0)
            optimizer.step()
            with torch.no_grad():  # CLIP's clamp of the temperature at 100
                model.logit_scale.clamp_(0, math.log(100))
            log.writerow([step, f"{loss.item():.6f}", f"{lr_at(step):.3e}", f"{logit_scale.item():.3f}",
                          f"{contrastive.item():.6f}", f"{dense.item():.6f}"])
            bar.set_postfix(loss=f"{loss.item():.3f}")
    train_seconds = round(time.time() - start, 1)
    save_teacher(model, args.output_dir, model_cfg)
    # measured on the saved weights, through open_clip's own loader: what the tokenizer will distil from
    saved = load_teacher(args.output_dir)
    metrics = caption_retrieval(saved, text_tokenizer, test, args.num_eval_scenes)
    if args.dense_weight:
        metrics.update(dense_accuracy(saved, head, test, args.num_eval_scenes))
    metrics.update(steps=args.max_steps, batch_size=args.batch_size, dense_weight=args.dense_weight,
                   train_seconds=train_seconds, final_loss=float(loss.item()))
    (args.output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"caption retrieval on {args.num_eval_scenes} held-out test scenes: image→text top-1 "
          f"{metrics['image_to_text_top1']:.3f}, text→image top-1 {metrics['text_to_image_top1']:.3f} "
          f"(chance {metrics['chance']:.4f})" + "".join(f", {k} {v:.3f}" for k, v in metrics.items()
                                                        if k.startswith("dense_") and k.endswith("accuracy"))
          + f"; saved to {args.output_dir}")
    return metrics


if __name__ == "__main__":
    run_main(main)
