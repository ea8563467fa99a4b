"""Train a TokenFlow tokenizer (default: the `tiny` preset on ShapesWorld, distilled from the ShapesWorld teacher).

    python train/train_tokenizer.py                                    # defaults; CPU, fp32
    python train/train_tokenizer.py --config my.yaml --max-steps 5000 --output-dir runs/tok
    python train/train_tokenizer.py --output-dir runs/tok --resume auto
    torchrun --nproc_per_node 8 train/train_tokenizer.py --mixed-precision bf16 --data imagefolder --data-path ...
    deepspeed train/train_tokenizer.py ...                             # same DDP path (env:// rendezvous)

Losses (reference VQLoss): pixel L2 (or L1) + LPIPS-VGG16 (only with local weights) + semantic 1 − cos against the
frozen teacher + VQ + 0.25·commitment (inside the quantizer) + hinge PatchGAN from `disc_start`. Adam with
betas (0.9, 0.95), gradient clipping, constant LR by default, optional EMA. `--finetune-decoder` trains the pixel
decoder alone (from `--init-from`, optionally re-initialised with `--decoder-from-scratch`).

Every option is a field of `TrainConfig`; a `--config` YAML/JSON file sets any of them and command-line flags
override the file. Output folder:
    checkpoints/last.pt      full training state (atomic writes), what `--resume` reads
    tokenizer/               save_pretrained folder of the final model (EMA weights when EMA is on), also copied
                             to --export-dir (default tokenizer/pretrained/shapesworld-tiny; `none` to skip)
    train_log.csv, tb/       every loss term, codebook usage and perplexity per scale
    samples/step_*.png       inputs (top) vs reconstructions (bottom);   loss_curves.png
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from tokenizer import TokenFlowConfig, TokenFlowTokenizer
from tokenizer.losses import (
    LPIPS, RECONSTRUCTION_LOSSES, PatchDiscriminator, adversarial_weight, hinge_discriminator_loss,
    hinge_generator_loss, reconstruction_loss, semantic_distillation_loss,
)
from tokenizer.quantizer import codebook_stats
from tokenizer.teacher import DEFAULT_TEACHER, load_frozen_teacher_tower
from unimodal.cli import run_main
from unimodal.images import ImageLoadError, list_image_files, load_image
from unimodal.shapesworld import ShapesWorld
from unimodal.vqgan import PixelDecoder

logger = logging.getLogger("train_tokenizer")

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_EXPORT = REPO_ROOT / "tokenizer" / "pretrained" / "shapesworld-tiny"  # where every other entry point looks
DATA_SOURCES = ("shapesworld", "imagefolder", "hf_disk")


@dataclass
class TrainConfig:
    # model
    preset: str = "tiny"
    model_overrides: dict = field(default_factory=dict)  # TokenFlowConfig fields that replace the preset's
    init_from: str | None = None          # a save_pretrained folder to start from (required by finetune_decoder)
    teacher: str | None = str(DEFAULT_TEACHER)  # local weights of the config's teacher; None: no semantic loss
    init_semantic_from_teacher: bool = True     # the student tower starts as a copy of the teacher (as the reference)
    # data
    data: str = "shapesworld"
    data_path: str | None = None
    image_column: str = "image"
    num_train_samples: int = 100_000      # ShapesWorld train scenes cycled through
    num_workers: int = 0
    # optimisation
    # ShapesWorld defaults: small batches and a cosine decay learn the most per CPU-second. Measured on 2 CPU cores
    # in about 15 minutes each: 3000 steps of batch 4 give 26.9 dB PSNR, 1800 of batch 8 25.1 dB, 4400 of batch 2
    # 23.9 dB; batch 8 learns as much per step as 16 at half the cost; the decay to 0 is worth ~5 dB over a constant LR
    max_steps: int = 3000
    batch_size: int = 4                   # per process
    lr: float = 4e-4
    beta1: float = 0.9
    beta2: float = 0.95
    max_grad_norm: float = 1.0
    lr_schedule: str = "cosine"           # cosine (to 0 at max_steps) | constant (the reference's) ; warmup linear
    warmup_steps: int = 0
    ema: bool = False
    ema_decay: float = 0.999
    mixed_precision: str = "no"           # no | bf16 (CUDA autocast; codebook search stays fp32)
    # losses
    reconstruction_loss: str = "l2"
    reconstruction_weight: float = 1.0
    lpips_weight: float = 1.0
    lpips_vgg_weights: str | None = None  # torchvision VGG16 state dict (local file)
    lpips_lin_weights: str | None = None  # LPIPS linear heads, lin0..lin4 (local file)
    semantic_weight: float = 1.0
    disc_weight: float = 0.5
    disc_start: int = 20_000
    disc_ndf: int = 64
    disc_layers: int = 3
    # decoder fine-tuning
    finetune_decoder: bool = False
    decoder_from_scratch: bool = False
    # bookkeeping
    output_dir: str = "runs/tokenizer"
    export_dir: str | None = str(DEFAULT_EXPORT)  # also copy the final save_pretrained folder here (None: don't)
    resume: str | None = None             # a checkpoint file, or "auto" for <output_dir>/checkpoints/last.pt
    seed: int = 0
    log_every: int = 10
    image_every: int = 250
    ckpt_every: int = 250
    threads: int | None = None


# ------------------------------------------------------------------------------------------------ config

def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {text!r}")


def _optional(kind):
    def parse(text: str):
        return None if text.lower() in ("none", "null", "") else kind(text)
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML or JSON file of TrainConfig options (flags override it)")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # deepspeed passes it
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if f.type in ("bool", bool):
            parser.add_argument(flag, type=_parse_bool, nargs="?", const=True, default=argparse.SUPPRESS,
                                help=f"(default {default})")
        elif f.type in ("dict", dict):
            parser.add_argument(flag, type=json.loads, default=argparse.SUPPRESS, help=f"JSON (default {default})")
        else:
            kind = {"int": int, "float": float}.get(f.type.split(" ")[0], str)
            parser.add_argument(flag, type=_optional(kind) if "None" in f.type else kind,
                                default=argparse.SUPPRESS, help=f"(default {default})")
    return parser


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    text = Path(path).read_text()
    if str(path).endswith((".yaml", ".yml")):
        import yaml
        values = yaml.safe_load(text) or {}
    elif str(path).endswith(".json"):
        values = json.loads(text)
    else:
        raise ValueError(f"--config {path!r}: expected a .yaml, .yml or .json file")
    if not isinstance(values, dict):
        raise ValueError(f"--config {path!r} must hold a mapping of option names to values")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(k.replace("-", "_") for k in values) - known)
    if unknown:
        raise ValueError(f"--config {path!r}: unknown options {unknown}; allowed: {sorted(known)}")
    return {k.replace("-", "_"): v for k, v in values.items()}


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    args = vars(build_parser().parse_args(argv))
    values = load_config_file(args.pop("config")) if args.get("config") else {}
    args.pop("config", None)
    args.pop("local_rank", None)
    values.update(args)
    cfg = TrainConfig(**values)
    check_config(cfg)
    return cfg


def check_config(cfg: TrainConfig) -> None:
    if cfg.data not in DATA_SOURCES:
        raise ValueError(f"data={cfg.data!r}; allowed: {DATA_SOURCES}")
    if cfg.data != "shapesworld" and not cfg.data_path:
        raise ValueError(f"data={cfg.data!r} needs --data-path")
    if cfg.reconstruction_loss not in RECONSTRUCTION_LOSSES:
        raise ValueError(f"reconstruction_loss={cfg.reconstruction_loss!r}; allowed: {RECONSTRUCTION_LOSSES}")
    if cfg.lr_schedule not in ("constant", "cosine"):
        raise ValueError(f"lr_schedule={cfg.lr_schedule!r}; allowed: 'constant', 'cosine'")
    if cfg.mixed_precision not in ("no", "bf16"):
        raise ValueError(f"mixed_precision={cfg.mixed_precision!r}; allowed: 'no', 'bf16'")
    if cfg.max_steps < 1 or cfg.batch_size < 1:
        raise ValueError(f"max_steps and batch_size must be >= 1, got {cfg.max_steps}, {cfg.batch_size}")
    if cfg.finetune_decoder and not cfg.init_from:
        raise ValueError("finetune_decoder needs --init-from <a trained tokenizer folder>")
    if cfg.decoder_from_scratch and not cfg.finetune_decoder:
        raise ValueError("decoder_from_scratch only applies with --finetune-decoder")
    if not 0.0 <= cfg.ema_decay < 1.0:
        raise ValueError(f"ema_decay={cfg.ema_decay} must be in [0, 1)")


# ------------------------------------------------------------------------------------------------ data

def to_model_input(image, size: int) -> torch.Tensor:
    """An RGB PIL image → [3, size, size] in [-1, 1] (plain resize, bicubic, when the size differs)."""
    from PIL import Image
    if image.size != (size, size):
        image = image.resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float()
    return x / 127.5 - 1.0


class ShapesWorldImages(Dataset):
    def __init__(self, size: int, num_samples: int, seed: int):
        self.world = ShapesWorld("train", size=size, num_samples=num_samples, seed=seed)

    def __len__(self) -> int:
        return len(self.world)

    def __getitem__(self, i: int):
        return to_model_input(self.world[i].image, self.world.size)


class FolderImages(Dataset):
    """Every image file under a folder (recursive, sorted). Corrupt files come back as ImageLoadError."""

    def __init__(self, root: str, size: int):
        self.paths = list_image_files(root)
        self.size = size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return to_model_input(load_image(self.paths[i]), self.size)
        except ImageLoadError as error:
            return error


class DiskDatasetImages(Dataset):
    """A Hugging Face dataset saved with `save_to_disk`; images in `column` (PIL images, bytes dicts or paths)."""

    def __init__(self, path: str, column: str, size: int):
        import datasets
        data = datasets.load_from_disk(path)
        if isinstance(data, datasets.DatasetDict):
            if "train" not in data:
                raise ValueError(f"{path!r} holds splits {list(data)}; expected a 'train' split or a single Dataset")
            data = data["train"]
        if column not in data.column_names:
            raise ValueError(f"{path!r} has no column {column!r}; columns: {data.column_names}")
        self.data, self.column, self.size = data, column, size

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        value = self.data[i][self.column]
        if isinstance(value, dict):
            value = value.get("bytes") or value.get("path")
        try:
            return to_model_input(load_image(value), self.size)
        except ImageLoadError as error:
            return error


def build_dataset(cfg: TrainConfig, size: int) -> Dataset:
    if cfg.data == "shapesworld":
        return ShapesWorldImages(size, cfg.num_train_samples, cfg.seed)
    if cfg.data == "imagefolder":
        return FolderImages(cfg.data_path, size)
    return DiskDatasetImages(cfg.data_path, cfg.image_column, size)


def collate_skipping_corrupt(items: list) -> tuple[torch.Tensor | None, list[str]]:
    """Stacks the good images; corrupt ones are dropped from the batch and reported (never replaced)."""
    good = [x for x in items if isinstance(x, torch.Tensor)]
    errors = [str(x) for x in items if not isinstance(x, torch.Tensor)]
    return (torch.stack(good) if good else None), errors


def batches(dataset: Dataset, cfg: TrainConfig, rank: int, world: int, start_step: int) -> Iterator:
    """Endless batches in a fixed order per (seed, epoch); starting at `start_step` reproduces an uninterrupted run."""
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed, drop_last=True)
    steps_per_epoch = len(sampler) // cfg.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"{len(dataset)} images are fewer than one batch of {cfg.batch_size} per process "
                         f"across {world} processes")
    epoch, skip = divmod(start_step, steps_per_epoch)
    while True:
        sampler.set_epoch(epoch)
        order = list(sampler)[skip * cfg.batch_size: steps_per_epoch * cfg.batch_size]
        loader = DataLoader(torch.utils.data.Subset(dataset, order), batch_size=cfg.batch_size, shuffle=False,
                            num_workers=cfg.num_workers, collate_fn=collate_skipping_corrupt)
        yield from loader
        epoch, skip = epoch + 1, 0


# ------------------------------------------------------------------------------------------------ model

def build_model(cfg: TrainConfig) -> TokenFlowTokenizer:
    if cfg.init_from:
        model = TokenFlowTokenizer.from_pretrained(cfg.init_from)
        if cfg.model_overrides:
            raise ValueError("model_overrides cannot change a model loaded with --init-from")
    else:
        model = TokenFlowTokenizer(TokenFlowConfig.from_preset(cfg.preset, **cfg.model_overrides))
    if cfg.decoder_from_scratch:
        model.decoder = PixelDecoder(**model.config.pixel_decoder)
    return model


def build_teacher(cfg: TrainConfig, config: TokenFlowConfig) -> tuple[nn.Module, nn.Module] | tuple[None, None]:
    if cfg.teacher is None or cfg.semantic_weight == 0 or cfg.finetune_decoder:
        return None, None
    if config.teacher is None:
        raise ValueError(f"the {config.preset or 'given'} tokenizer config names no teacher; set --semantic-weight 0")
    if config.teacher.get("type") != "open_clip":
        raise ValueError(f"--teacher loads open_clip teachers only; this config's teacher is {config.teacher['type']!r}")
    return load_frozen_teacher_tower(config, cfg.teacher)


class EMA:
    """Exponential moving average of the trainable parameters (buffers are copied)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for name, value in model.state_dict().items():
            if value.is_floating_point():
                self.shadow[name].lerp_(value, 1.0 - self.decay)
            else:
                self.shadow[name].copy_(value)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# ------------------------------------------------------------------------------------------------ logging

class RunLog:
    """CSV + TensorBoard, rank 0 only. Rows are keyed by steps done (1-based); a run resumed after `start_step`
    steps keeps rows 1..start_step and drops any later ones, which it is about to redo."""

    def __init__(self, output_dir: Path, start_step: int, enabled: bool):
        self.enabled, self.path, self.columns = enabled, output_dir / "train_log.csv", None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter
        rows = []
        if start_step > 0 and self.path.exists():
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= start_step]
        self.rows = rows
        self.writer = SummaryWriter(str(output_dir / "tb"), purge_step=start_step + 1 if start_step else None)

    def write(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **values}
        if self.columns is None:
            self.columns = list(self.rows[0]) if self.rows else []
        # terms can appear later (the GAN from disc_start): the header is the union, earlier rows stay blank there
        self.columns += [k for k in row if k not in self.columns]
        self.rows.append(row)
        with open(self.path.with_suffix(".csv.tmp"), "w", newline="") as f:
            out = csv.DictWriter(f, fieldnames=self.columns, restval="")
            out.writeheader()
            out.writerows(self.rows)
        os.replace(self.path.with_suffix(".csv.tmp"), self.path)
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        if self.enabled:
            self.writer.close()


def save_sample_grid(path: Path, inputs: torch.Tensor, reconstructions: torch.Tensor, count: int = 8) -> None:
    from torchvision.utils import save_image
    n = min(count, inputs.shape[0])
    grid = torch.cat([inputs[:n], reconstructions[:n]]).detach().float().clamp(-1, 1) * 0.5 + 0.5
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, str(path), nrow=n, padding=1)


def plot_loss_curves(csv_path: Path, out_path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    keys = [k for k in rows[0] if k.startswith("loss/")]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    steps = [int(r["step"]) for r in rows]
    for k in keys:
        values = [float(r[k]) if r[k] not in ("", None) else math.nan for r in rows]
        axes[0].plot(steps, values, label=k[5:])
    axes[0].set_yscale("log")
    axes[0].set_xlabel("step")
    axes[0].legend(fontsize=7)
    usage = [k for k in rows[0] if k.startswith("usage/")]
    for k in usage:
        axes[1].plot(steps, [float(r[k]) if r[k] else math.nan for r in rows], label=k[6:])
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("codebook usage (fraction of K)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ checkpoints

def atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_states() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_states(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------------ training

def setup_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device) from torchrun/deepspeed env vars; a plain run is rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 or "LOCAL_RANK" in os.environ:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
        return rank, world, device
    return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")


def lr_at(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "cosine":
        t = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))
    return cfg.lr


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Runs the training described by `cfg`; returns a summary (final step, last logged values, output paths)."""
    check_config(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rank, world, device = setup_distributed()
    is_main = rank == 0
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    output_dir = Path(cfg.output_dir)
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    torch.manual_seed(cfg.seed * world + rank)
    np.random.seed(cfg.seed * world + rank)
    random.seed(cfg.seed * world + rank)

    resume_path = output_dir / "checkpoints" / "last.pt" if cfg.resume == "auto" else cfg.resume
    if cfg.resume == "auto" and not resume_path.exists():
        resume_path = None  # "auto" on a fresh output folder starts from scratch
    elif resume_path is not None and not Path(resume_path).is_file():
        raise FileNotFoundError(f"--resume {cfg.resume!r}: no checkpoint at {resume_path}")

    model = build_model(cfg).to(device)
    config = model.config
    teacher, teacher_scaling = build_teacher(cfg, config)
    if teacher is not None:
        teacher, teacher_scaling = teacher.to(device), teacher_scaling.to(device)
        if cfg.init_semantic_from_teacher and not cfg.init_from and resume_path is None:
            model.encoder_vqkd.load_state_dict(teacher.state_dict())
            logger.info("semantic tower initialised from the teacher %s", cfg.teacher)
    elif not cfg.finetune_decoder:
        logger.info("no teacher: the semantic distillation loss is off")

    lpips = None
    if cfg.lpips_weight > 0 and cfg.lpips_vgg_weights and cfg.lpips_lin_weights:
        lpips = LPIPS(cfg.lpips_vgg_weights, cfg.lpips_lin_weights).to(device)
        logger.info("LPIPS on (weight %g)", cfg.lpips_weight)
    elif cfg.lpips_weight > 0:
        logger.info("LPIPS off: no local weights given (--lpips-vgg-weights and --lpips-lin-weights); "
                    "training with the pixel, semantic, codebook and GAN losses only")

    if cfg.finetune_decoder:
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("decoder."))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    # Built whenever the GAN loss is on, even if this run stops before `disc_start`: a later `--resume` with more
    # steps then finds the same discriminator (and the same random-number stream) as an uninterrupted run.
    use_gan = cfg.disc_weight > 0
    discriminator = disc_optimizer = None
    if use_gan:
        discriminator = PatchDiscriminator(3, cfg.disc_ndf, cfg.disc_layers).to(device)
        disc_optimizer = torch.optim.Adam(discriminator.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    ema = EMA(model, cfg.ema_decay) if cfg.ema else None

    start_step = 0
    if resume_path is not None:
        state = torch.load(resume_path, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if discriminator is not None:
            if "discriminator" not in state:
                raise ValueError(f"{resume_path} has no discriminator state but this run uses the GAN loss")
            discriminator.load_state_dict(state["discriminator"])
            disc_optimizer.load_state_dict(state["disc_optimizer"])
        if ema is not None:
            if "ema" not in state:
                raise ValueError(f"{resume_path} has no EMA state but this run uses --ema")
            ema.shadow = {k: v.to(device) for k, v in state["ema"].items()}
        model.quantize.set_drop_rng_state(state["drop_rng"])
        set_rng_states(state["rng"][rank] if isinstance(state["rng"], list) else state["rng"])
        start_step = state["step"]
        logger.info("resumed from %s at step %d", resume_path, start_step)

    train_model: nn.Module = model
    if world > 1:
        # find_unused_parameters: the semantic tower's output projection (and frozen parts) get no gradient
        train_model = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        if discriminator is not None:
            discriminator = nn.parallel.DistributedDataParallel(discriminator)
    if cfg.finetune_decoder:
        model.quantize.eval()  # the decoder learns on exactly the features inference produces (no scale drop)

    dataset = build_dataset(cfg, config.image_size)
    data = batches(dataset, cfg, rank, world, start_step)
    log = RunLog(output_dir, start_step, is_main)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.mixed_precision == "bf16")
    window_counts: dict[int, torch.Tensor] = {}
    skipped_total, last_values, t0 = 0, {}, time.time()
    bar = tqdm(range(start_step, cfg.max_steps), desc="tokenizer", initial=start_step, total=cfg.max_steps,
               disable=not is_main, dynamic_ncols=True)
    for step in bar:
        x, errors = next(data)
        while x is None:  # a batch of corrupt files only: count it and take the next one
            skipped_total += len(errors)
            x, errors = next(data)
        if errors:
            skipped_total += len(errors)
            logger.warning("step %d: skipped %d unreadable image(s) (%d so far), e.g. %s", step, len(errors),
                           skipped_total, errors[0])
        x = x.to(device)
        lr = lr_at(cfg, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        adv = adversarial_weight(step, cfg.disc_weight, cfg.disc_start) if use_gan else 0.0

        train_model.train()
        if cfg.finetune_decoder:
            model.quantize.eval()
        with autocast:
            out = train_model(x, return_semantic=teacher is not None)
            terms: dict[str, torch.Tensor] = {
                "rec": reconstruction_loss(out.pixel_values.float(), x, cfg.reconstruction_loss)}
            loss = cfg.reconstruction_weight * terms["rec"]
            if lpips is not None:
                terms["lpips"] = lpips(out.pixel_values.float(), x).mean()
                loss = loss + cfg.lpips_weight * terms["lpips"]
            if teacher is not None:
                with torch.no_grad():
                    target = teacher.project(teacher(teacher_scaling(x)))
                terms["semantic"] = semantic_distillation_loss(out.semantic_features.float(), target.float())
                loss = loss + cfg.semantic_weight * terms["semantic"]
            if out.vq_loss is not None:
                terms["vq"], terms["commit"] = out.vq_loss, out.commit_loss
                loss = loss + out.vq_loss + out.commit_loss
            if adv > 0:
                terms["gen_adv"] = hinge_generator_loss(discriminator(out.pixel_values))
                loss = loss + adv * terms["gen_adv"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        if ema is not None:
            ema.update(model)
        if adv > 0:
            with autocast:
                terms["disc"] = hinge_discriminator_loss(discriminator(x), discriminator(out.pixel_values.detach()))
            disc_optimizer.zero_grad(set_to_none=True)
            (adv * terms["disc"]).backward()
            torch.nn.utils.clip_grad_norm_(discriminator.parameters(), cfg.max_grad_norm)
            disc_optimizer.step()

        for side, counts in zip(out.used_scales, out.code_counts):
            window_counts[side] = window_counts.get(side, 0) + counts.detach().cpu()
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.max_steps:
            values = {f"loss/{k}": float(v.detach()) for k, v in terms.items()}
            values.update({"loss/total": float(loss.detach()), "grad_norm": float(grad_norm), "lr": lr,
                           "skipped_images": skipped_total, "seconds": round(time.time() - t0, 2)})
            for side in config.scales:
                if side in window_counts:
                    usage, perplexity = codebook_stats(window_counts[side])
                    values[f"usage/{side}x{side}"] = float(usage)
                    values[f"perplexity/{side}x{side}"] = float(perplexity)
            window_counts = {}
            log.write(done, values)
            last_values = values
            bar.set_postfix(rec=f"{values['loss/rec']:.4f}", sem=f"{values.get('loss/semantic', 0):.3f}")
        if is_main and (done % cfg.image_every == 0 or done == cfg.max_steps):
            save_sample_grid(output_dir / "samples" / f"step_{done:07d}.png", x, out.pixel_values)
        if done % cfg.ckpt_every == 0 or done == cfg.max_steps:
            save_checkpoint(output_dir, done, cfg, model, optimizer, discriminator, disc_optimizer, ema, rank, world)
    log.close()

    summary = {"step": cfg.max_steps, "last": last_values, "skipped_images": skipped_total,
               "seconds": round(time.time() - t0, 1)}
    if is_main:
        final = copy.deepcopy(model).cpu()
        if ema is not None:
            final.load_state_dict({k: v.cpu() for k, v in ema.shadow.items()})
        final.save_pretrained(str(output_dir / "tokenizer"))
        summary["tokenizer"] = str(output_dir / "tokenizer")
        if cfg.export_dir:
            if Path(cfg.export_dir).exists():
                shutil.rmtree(cfg.export_dir)
            shutil.copytree(output_dir / "tokenizer", cfg.export_dir)
            summary["exported"] = cfg.export_dir
        if (output_dir / "train_log.csv").exists():
            plot_loss_curves(output_dir / "train_log.csv", output_dir / "loss_curves.png")
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        logger.info("done: %d steps in %.0f s; tokenizer saved to %s", cfg.max_steps, summary["seconds"],
                    summary["tokenizer"])
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return summary


def save_checkpoint(output_dir: Path, step: int, cfg: TrainConfig, model: nn.Module, optimizer, discriminator,
                    disc_optimizer, ema: EMA | None, rank: int, world: int) -> None:
    rng = rng_states()
    if world > 1:  # every rank's generators, so each resumes its own stream
        gathered = [None] * world
        dist.all_gather_object(gathered, rng)
        rng = gathered
    if rank != 0:
        return
    state = {"step": step, "config": dataclasses.asdict(cfg), "model": model.state_dict(),
             "optimizer": optimizer.state_dict(), "drop_rng": model.quantize.drop_rng_state(), "rng": rng}
    if discriminator is not None:
        state["discriminator"] = unwrap(discriminator).state_dict()
        state["disc_optimizer"] = disc_optimizer.state_dict()
    if ema is not None:
        state["ema"] = ema.shadow
    atomic_torch_save(state, output_dir / "checkpoints" / "last.pt")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return train(parse_config(argv))


if __name__ == "__main__":
    run_main(main)
