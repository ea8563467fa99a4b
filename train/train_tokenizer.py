"""Train a TokenFlow tokenizer (default: the `tiny` preset on ShapesWorld, distilled from the ShapesWorld teacher).

    python train/train_tokenizer.py                                    # defaults; CPU, fp32 -> runs/tokenizer
    python train/train_tokenizer.py --config my.yaml --max-steps 5000 --output-dir runs/tok
    python train/train_tokenizer.py --output-dir runs/tok --resume auto
    python train/train_tokenizer.py ... --export-dir tokenizer/pretrained/shapesworld-tiny   # ship the result
    torchrun --nproc_per_node 8 train/train_tokenizer.py --mixed-precision bf16 --data imagefolder --data-path ...
    deepspeed train/train_tokenizer.py ...                             # same DDP path (env:// rendezvous)

Losses (reference VQLoss): pixel L2 (or L1) + LPIPS-VGG16 (only with local weights) + semantic 1 − cos against the
frozen teacher + VQ + 0.25·commitment (inside the quantizer) + hinge PatchGAN from `disc_start`. Adam with
betas (0.9, 0.95), gradient clipping, constant LR by default, optional EMA. `--finetune-decoder` trains the pixel
decoder alone (from `--init-from`, optionally re-initialised with `--decoder-from-scratch`).

Every option is a field of `TrainConfig`; a `--config` YAML/JSON file sets any of them and command-line flags
override the file (unknown options, and unknown `--model-overrides` keys, are an error). A resume checks its options
against the checkpoint's (a warning, or an error with `--strict-resume`); checkpoints are read without unpickling
code. Unreadable images are skipped and counted; `max_consecutive_skips` of them in a row, or an epoch without one
readable image, stops the run naming the first failing files. Output folder:
    checkpoints/last.pt      full training state (atomic writes), what `--resume` reads
    tokenizer/               save_pretrained folder of the final model (EMA weights when EMA is on); with
                             --export-dir also copied there (a folder that is missing, empty or an earlier export;
                             outside the output folder; its README.md is kept)
    train_log.csv, tb/       every loss term, codebook usage and perplexity per scale
    samples/step_*.png       inputs (top) vs reconstructions (bottom);   loss_curves.png
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import inspect
import json
import logging
import math
import random
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
from train.toolkit import (
    atomic_torch_save, check_export_target, check_known_keys, check_resume_options, export_folder, init_distributed,
    load_options_file, paths_overlap, plot_log, positive_int, read_log_rows, rng_states, safe_torch_load,
    set_rng_states, write_log_rows,
)
from unimodal.cli import run_main
from unimodal.images import ImageLoadError, list_image_files, load_image
from unimodal.shapesworld import ShapesWorld
from unimodal.vqgan import PixelDecoder

logger = logging.getLogger("train_tokenizer")

DATA_SOURCES = ("shapesworld", "imagefolder", "hf_disk")
EXPORT_FILES = ("config.json", "model.safetensors", "preprocessor_config.json")  # what save_pretrained writes
EXPORT_KEPT_FILES = ("README.md",)  # a model card in the export folder is carried over into the new export
POSITIVE_OPTIONS = ("max_steps", "batch_size", "log_every", "image_every", "ckpt_every", "max_consecutive_skips")
# Options that change neither the data order nor the losses: a resume may change them without a warning.
BOOKKEEPING_OPTIONS = ("output_dir", "export_dir", "resume", "strict_resume", "log_every", "image_every", "ckpt_every",
                       "threads", "num_workers")


@dataclass
class TrainConfig:
    # model
    preset: str = "tiny"
    model_overrides: dict = field(default_factory=dict)  # TokenFlowConfig fields that replace the preset's
    init_from: str | None = None          # a save_pretrained folder to start from (required by finetune_decoder)
    teacher: str | None = str(DEFAULT_TEACHER)  # local weights of the config's teacher; None: no semantic loss
    init_semantic_from_teacher: bool = True     # the student tower starts as a copy of the teacher (as the reference)
    # With init_from: the student tower still restarts from the (new) teacher, everything else continues, e.g. to
    # give a trained tokenizer a teacher whose patch features carry more (train_teacher.py --dense-weight).
    swap_teacher: bool = False
    # data
    data: str = "shapesworld"
    data_path: str | None = None
    image_column: str = "image"
    num_train_samples: int = 100_000      # ShapesWorld train scenes cycled through
    num_workers: int = 0
    max_consecutive_skips: int = 100      # unreadable images in a row before the run stops
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
    export_dir: str | None = None         # also copy the final save_pretrained folder here (e.g. to ship it)
    resume: str | None = None             # a checkpoint file, or "auto" for <output_dir>/checkpoints/last.pt
    strict_resume: bool = False           # refuse a resume whose options differ from the checkpoint's
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
        elif f.name in POSITIVE_OPTIONS:
            parser.add_argument(flag, type=positive_int, default=argparse.SUPPRESS, help=f"(default {default})")
        else:
            kind = {"int": int, "float": float}.get(f.type.split(" ")[0], str)
            parser.add_argument(flag, type=_optional(kind) if "None" in f.type else kind,
                                default=argparse.SUPPRESS, help=f"(default {default})")
    return parser


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    args = vars(build_parser().parse_args(argv))
    config_file = args.pop("config", None)
    values = load_options_file(config_file, [f.name for f in dataclasses.fields(TrainConfig)]) if config_file else {}
    args.pop("local_rank", None)
    values.update(args)
    cfg = TrainConfig(**values)
    check_config(cfg)
    return cfg


# TokenFlowConfig fields `model_overrides` may set (its other keyword arguments would be stored unused)
TOKENFLOW_CONFIG_FIELDS = tuple(name for name, p in inspect.signature(TokenFlowConfig.__init__).parameters.items()
                                if name not in ("self", "preset") and p.kind is p.POSITIONAL_OR_KEYWORD)


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
    for name in POSITIVE_OPTIONS:
        if not isinstance(getattr(cfg, name), int) or getattr(cfg, name) < 1:
            raise ValueError(f"{name}={getattr(cfg, name)!r} must be an integer >= 1")
    if not isinstance(cfg.model_overrides, dict):
        raise ValueError(f"model_overrides must be a JSON object of TokenFlowConfig fields, got "
                         f"{cfg.model_overrides!r}")
    check_known_keys(cfg.model_overrides, TOKENFLOW_CONFIG_FIELDS, "model_overrides")
    if cfg.finetune_decoder and not cfg.init_from:
        raise ValueError("finetune_decoder needs --init-from <a trained tokenizer folder>")
    if cfg.swap_teacher and not (cfg.init_from and cfg.teacher):
        raise ValueError("swap_teacher needs --init-from <a trained tokenizer folder> and --teacher <weights>")
    if cfg.decoder_from_scratch and not cfg.finetune_decoder:
        raise ValueError("decoder_from_scratch only applies with --finetune-decoder")
    if not 0.0 <= cfg.ema_decay < 1.0:
        raise ValueError(f"ema_decay={cfg.ema_decay} must be in [0, 1)")
    check_output_paths(cfg)


def check_output_paths(cfg: TrainConfig) -> None:
    """Before training: the export folder neither overlaps the output folder nor holds anything but an earlier
    export, so that the export at the end deletes nothing it did not write."""
    if not cfg.export_dir:
        return
    if paths_overlap(cfg.export_dir, cfg.output_dir):
        raise ValueError(f"export_dir={cfg.export_dir!r} and output_dir={cfg.output_dir!r} overlap (one is, or lies "
                         "inside, the other); the export must go to a separate folder")
    check_export_target(cfg.export_dir, EXPORT_FILES, EXPORT_KEPT_FILES, model_type=TokenFlowConfig.model_type)


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


class ReadableBatches:
    """Endless batches of readable images in a fixed order per (seed, epoch); starting at `start_step` reproduces an
    uninterrupted run. Unreadable images are dropped from their batch and counted (`skipped`), never replaced.

    The run stops (`RuntimeError` naming the counts and the first failing files) after `max_consecutive_skips`
    unreadable images in a row, or after a whole epoch without a readable one, instead of looping forever."""

    FIRST_FAILURES = 5  # failing files the stop message names

    def __init__(self, dataset: Dataset, cfg: TrainConfig, rank: int, world: int, start_step: int):
        self.dataset, self.cfg, self.rank, self.world = dataset, cfg, rank, world
        self.sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed,
                                          drop_last=True)
        self.steps_per_epoch = len(self.sampler) // cfg.batch_size
        if self.steps_per_epoch < 1:
            raise ValueError(f"{len(dataset)} images are fewer than one batch of {cfg.batch_size} per process "
                             f"across {world} processes")
        self.skipped = self.read = self.consecutive_skips = 0
        self.failures: list[str] = []
        self.loader = self._batches(*divmod(start_step, self.steps_per_epoch))

    def _batches(self, epoch: int, skip: int) -> Iterator[tuple[torch.Tensor | None, list[str]]]:
        while True:
            self.sampler.set_epoch(epoch)
            order = list(self.sampler)[skip * self.cfg.batch_size: self.steps_per_epoch * self.cfg.batch_size]
            loader = DataLoader(torch.utils.data.Subset(self.dataset, order), batch_size=self.cfg.batch_size,
                                shuffle=False, num_workers=self.cfg.num_workers, collate_fn=collate_skipping_corrupt)
            readable = 0
            for x, errors in loader:
                readable += 0 if x is None else x.shape[0]
                yield x, errors
            if readable == 0:
                self.stop(f"epoch {epoch} had no readable image ({len(order)} tried)")
            epoch, skip = epoch + 1, 0

    def next(self, step: int) -> torch.Tensor:
        """The next batch [B', 3, H, W] with at least one readable image (B' ≤ batch size)."""
        while True:
            x, errors = next(self.loader)
            self.read += len(errors) + (0 if x is None else x.shape[0])
            self.skipped += len(errors)
            self.failures += errors[: self.FIRST_FAILURES - len(self.failures)]
            if errors:
                logger.warning("step %d: skipped %d unreadable image(s) (%d so far), e.g. %s", step, len(errors),
                               self.skipped, errors[0])
            self.consecutive_skips = self.consecutive_skips + len(errors) if x is None else 0
            if self.consecutive_skips >= self.cfg.max_consecutive_skips:
                self.stop(f"{self.consecutive_skips} unreadable images in a row (max_consecutive_skips="
                          f"{self.cfg.max_consecutive_skips})")
            if x is not None:
                return x

    def stop(self, reason: str) -> None:
        raise RuntimeError(f"stopping: {reason}; {self.skipped} of {self.read} images read so far were unreadable "
                           f"(process {self.rank} of {self.world}). First failures: " + "; ".join(self.failures))


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
        self.enabled, self.path = enabled, output_dir / "train_log.csv"
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter
        self.rows = read_log_rows(self.path, before_step=start_step + 1) if start_step > 0 else []
        self.writer = SummaryWriter(str(output_dir / "tb"), purge_step=start_step + 1 if start_step else None)

    def write(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.rows.append({"step": step, **values})
        write_log_rows(self.path, self.rows)
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
    """Every loss term (log scale) and the codebook usage per scale."""
    plot_log(csv_path, out_path, [("loss/", "loss", True), ("usage/", "codebook usage (fraction of K)", False)])


# ------------------------------------------------------------------------------------------------ training

@dataclass
class Parts:
    """What one training run updates or consults."""
    model: TokenFlowTokenizer
    params: list[nn.Parameter]                       # the trainable ones
    optimizer: torch.optim.Optimizer
    teacher: nn.Module | None = None                 # frozen; None: no semantic loss
    teacher_scaling: nn.Module | None = None
    lpips: nn.Module | None = None
    discriminator: nn.Module | None = None           # DDP-wrapped in a multi-process run
    disc_optimizer: torch.optim.Optimizer | None = None
    ema: EMA | None = None
    train_model: nn.Module | None = None             # the model as trained (DDP-wrapped in a multi-process run)


def mean_over_processes(values: torch.Tensor, world: int) -> torch.Tensor:
    """The mean of `values` over the `world` processes (a collective when world > 1)."""
    if world == 1:
        return values
    values = values.clone()
    dist.all_reduce(values)
    return values / world


def lr_at(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "cosine":
        t = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))
    return cfg.lr


def start_run(cfg: TrainConfig) -> tuple[int, int, torch.device, Path]:
    """Threads, processes, logging, the output folder and the seeds: (rank, world size, device, output folder)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rank, world, device = init_distributed()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    output_dir = Path(cfg.output_dir)
    if rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    torch.manual_seed(cfg.seed * world + rank)
    np.random.seed(cfg.seed * world + rank)
    random.seed(cfg.seed * world + rank)
    return rank, world, device, output_dir


def resume_checkpoint(cfg: TrainConfig, output_dir: Path) -> Path | None:
    """The checkpoint file `--resume` names (None: a fresh start; "auto" on a fresh output folder is one)."""
    if cfg.resume is None:
        return None
    path = output_dir / "checkpoints" / "last.pt" if cfg.resume == "auto" else Path(cfg.resume)
    if path.is_file():
        return path
    if cfg.resume == "auto":
        return None
    raise FileNotFoundError(f"--resume {cfg.resume!r}: no checkpoint at {path}")


def build_parts(cfg: TrainConfig, device: torch.device, resuming: bool) -> Parts:
    """Model, teacher, LPIPS, optimizers, discriminator and EMA, in the order that fixes the random streams."""
    model = build_model(cfg).to(device)
    teacher, teacher_scaling = build_teacher(cfg, model.config)
    if teacher is not None:
        teacher, teacher_scaling = teacher.to(device), teacher_scaling.to(device)
        if (cfg.swap_teacher or cfg.init_semantic_from_teacher and not cfg.init_from) and not resuming:
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
    parts = Parts(model, params, torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2)), teacher,
                  teacher_scaling, lpips)
    # Built whenever the GAN loss is on, even if this run stops before `disc_start`: a later `--resume` with more
    # steps then finds the same discriminator (and the same random-number stream) as an uninterrupted run.
    if cfg.disc_weight > 0:
        parts.discriminator = PatchDiscriminator(3, cfg.disc_ndf, cfg.disc_layers).to(device)
        parts.disc_optimizer = torch.optim.Adam(parts.discriminator.parameters(), lr=cfg.lr,
                                                betas=(cfg.beta1, cfg.beta2))
    parts.ema = EMA(model, cfg.ema_decay) if cfg.ema else None
    return parts


def load_checkpoint(path: Path, parts: Parts, cfg: TrainConfig, rank: int, device: torch.device) -> int:
    """Restore `parts` and the random generators from a checkpoint (read without unpickling code); returns its
    step. Options that differ from the checkpoint's are reported (`check_resume_options`)."""
    state = safe_torch_load(path)
    check_resume_options(state.get("config", {}), dataclasses.asdict(cfg), BOOKKEEPING_OPTIONS, cfg.strict_resume,
                         str(path))
    parts.model.load_state_dict(state["model"])
    parts.optimizer.load_state_dict(state["optimizer"])
    if parts.discriminator is not None:
        if "discriminator" not in state:
            raise ValueError(f"{path} has no discriminator state but this run uses the GAN loss")
        parts.discriminator.load_state_dict(state["discriminator"])
        parts.disc_optimizer.load_state_dict(state["disc_optimizer"])
    if parts.ema is not None:
        if "ema" not in state:
            raise ValueError(f"{path} has no EMA state but this run uses --ema")
        parts.ema.shadow = {k: v.to(device) for k, v in state["ema"].items()}
    parts.model.quantize.set_drop_rng_state(state["drop_rng"])
    set_rng_states(state["rng"][rank] if isinstance(state["rng"], list) else state["rng"])
    logger.info("resumed from %s at step %d", path, state["step"])
    return state["step"]


def save_checkpoint(output_dir: Path, step: int, cfg: TrainConfig, parts: Parts, rank: int, world: int) -> None:
    """Everything a resume needs, as tensors and plain values (`safe_torch_load` reads it back)."""
    rng = rng_states()
    if world > 1:  # every rank's generators, so each resumes its own stream
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, rng)
        rng = gathered
    if rank != 0:
        return
    state = {"step": step, "config": dataclasses.asdict(cfg), "model": parts.model.state_dict(),
             "optimizer": parts.optimizer.state_dict(), "drop_rng": parts.model.quantize.drop_rng_state(), "rng": rng}
    if parts.discriminator is not None:
        state["discriminator"] = unwrap(parts.discriminator).state_dict()
        state["disc_optimizer"] = parts.disc_optimizer.state_dict()
    if parts.ema is not None:
        state["ema"] = parts.ema.shadow
    atomic_torch_save(state, output_dir / "checkpoints" / "last.pt")


def wrap_distributed(parts: Parts, world: int) -> None:
    parts.train_model = parts.model
    if world > 1:
        # find_unused_parameters: the semantic tower's output projection (and frozen parts) get no gradient
        parts.train_model = nn.parallel.DistributedDataParallel(parts.model, find_unused_parameters=True)
        if parts.discriminator is not None:
            parts.discriminator = nn.parallel.DistributedDataParallel(parts.discriminator)


def generator_losses(parts: Parts, cfg: TrainConfig, x: torch.Tensor, adv: float):
    """One forward of the tokenizer on x [B, 3, H, W]: (total loss, {term: value}, model output)."""
    out = parts.train_model(x, return_semantic=parts.teacher is not None)
    terms: dict[str, torch.Tensor] = {"rec": reconstruction_loss(out.pixel_values.float(), x, cfg.reconstruction_loss)}
    loss = cfg.reconstruction_weight * terms["rec"]
    if parts.lpips is not None:
        terms["lpips"] = parts.lpips(out.pixel_values.float(), x).mean()
        loss = loss + cfg.lpips_weight * terms["lpips"]
    if parts.teacher is not None:
        with torch.no_grad():
            target = parts.teacher.project(parts.teacher(parts.teacher_scaling(x)))
        terms["semantic"] = semantic_distillation_loss(out.semantic_features.float(), target.float())
        loss = loss + cfg.semantic_weight * terms["semantic"]
    if out.vq_loss is not None:
        terms["vq"], terms["commit"] = out.vq_loss, out.commit_loss
        loss = loss + out.vq_loss + out.commit_loss
    if adv > 0:
        terms["gen_adv"] = hinge_generator_loss(parts.discriminator(out.pixel_values))
        loss = loss + adv * terms["gen_adv"]
    return loss, terms, out


def train_step(parts: Parts, cfg: TrainConfig, x: torch.Tensor, step: int, autocast):
    """One optimisation step of the tokenizer (and of the discriminator once the GAN loss is on):
    (total loss, {term: value}, gradient norm, model output)."""
    adv = adversarial_weight(step, cfg.disc_weight, cfg.disc_start) if parts.discriminator is not None else 0.0
    parts.train_model.train()
    if cfg.finetune_decoder:
        parts.model.quantize.eval()  # the decoder learns on exactly the features inference produces (no scale drop)
    with autocast:
        loss, terms, out = generator_losses(parts, cfg, x, adv)
    parts.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(parts.params, cfg.max_grad_norm)
    parts.optimizer.step()
    if parts.ema is not None:
        parts.ema.update(parts.model)
    if adv > 0:
        with autocast:
            terms["disc"] = hinge_discriminator_loss(parts.discriminator(x),
                                                     parts.discriminator(out.pixel_values.detach()))
        parts.disc_optimizer.zero_grad(set_to_none=True)
        (adv * terms["disc"]).backward()
        torch.nn.utils.clip_grad_norm_(parts.discriminator.parameters(), cfg.max_grad_norm)
        parts.disc_optimizer.step()
    return loss, terms, grad_norm, out


def logged_values(terms: dict, loss, grad_norm, lr: float, skipped: int, seconds: float,
                  window_counts: dict[int, torch.Tensor], scales, world: int = 1) -> dict[str, float]:
    """One row of train_log.csv: every loss term (the mean over the `world` processes: the global batch's), the
    images skipped by all processes, and codebook usage and perplexity per scale over this process's window."""
    means = mean_over_processes(torch.stack([v.detach().float() for v in (*terms.values(), loss)]), world)
    values = {f"loss/{k}": float(v) for k, v in zip([*terms, "total"], means)}
    skipped_by_all = round(float(mean_over_processes(torch.tensor(float(skipped), device=loss.device), world)) * world)
    values.update({"grad_norm": float(grad_norm), "lr": lr, "skipped_images": skipped_by_all,
                   "seconds": round(seconds, 2)})
    for side in scales:
        if side in window_counts:
            usage, perplexity = codebook_stats(window_counts[side])
            values[f"usage/{side}x{side}"] = float(usage)
            values[f"perplexity/{side}x{side}"] = float(perplexity)
    return values


def run_steps(cfg: TrainConfig, parts: Parts, data: ReadableBatches, log: RunLog, start_step: int,
              output_dir: Path, rank: int, world: int, device: torch.device) -> dict[str, float]:
    """The training loop from `start_step` to `max_steps`; returns the last logged values."""
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.mixed_precision == "bf16")
    window_counts: dict[int, torch.Tensor] = {}
    last_values, t0 = {}, time.time()
    bar = tqdm(range(start_step, cfg.max_steps), desc="tokenizer", initial=start_step, total=cfg.max_steps,
               disable=rank != 0, dynamic_ncols=True)
    for step in bar:
        x = data.next(step).to(device)
        lr = lr_at(cfg, step)
        for group in parts.optimizer.param_groups:
            group["lr"] = lr
        loss, terms, grad_norm, out = train_step(parts, cfg, x, step, autocast)
        for side, counts in zip(out.used_scales, out.code_counts):
            window_counts[side] = window_counts.get(side, 0) + counts.detach().cpu()
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.max_steps:
            last_values = logged_values(terms, loss, grad_norm, lr, data.skipped, time.time() - t0, window_counts,
                                        parts.model.config.scales, world)
            window_counts = {}
            log.write(done, last_values)
            bar.set_postfix(rec=f"{last_values['loss/rec']:.4f}", sem=f"{last_values.get('loss/semantic', 0):.3f}")
        if rank == 0 and (done % cfg.image_every == 0 or done == cfg.max_steps):
            save_sample_grid(output_dir / "samples" / f"step_{done:07d}.png", x, out.pixel_values)
        if done % cfg.ckpt_every == 0 or done == cfg.max_steps:
            save_checkpoint(output_dir, done, cfg, parts, rank, world)
    log.close()
    return last_values


def finish(cfg: TrainConfig, parts: Parts, output_dir: Path, summary: dict[str, Any]) -> None:
    """Rank 0: the final save_pretrained folder (EMA weights when EMA is on), the export, the plot, summary.json."""
    final = copy.deepcopy(parts.model).cpu()
    if parts.ema is not None:
        final.load_state_dict({k: v.cpu() for k, v in parts.ema.shadow.items()})
    final.save_pretrained(str(output_dir / "tokenizer"))
    summary["tokenizer"] = str(output_dir / "tokenizer")
    if cfg.export_dir:
        export_folder(output_dir / "tokenizer", cfg.export_dir, EXPORT_FILES, EXPORT_KEPT_FILES,
                      model_type=TokenFlowConfig.model_type)
        summary["exported"] = cfg.export_dir
        logger.info("exported to %s", cfg.export_dir)
    if (output_dir / "train_log.csv").exists():
        plot_loss_curves(output_dir / "train_log.csv", output_dir / "loss_curves.png")
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    logger.info("done: %d steps in %.0f s; tokenizer saved to %s", cfg.max_steps, summary["seconds"],
                summary["tokenizer"])


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Runs the training described by `cfg`; returns a summary (final step, last logged values, output paths)."""
    check_config(cfg)
    rank, world, device, output_dir = start_run(cfg)
    resume_path = resume_checkpoint(cfg, output_dir)
    parts = build_parts(cfg, device, resuming=resume_path is not None)
    start_step = load_checkpoint(resume_path, parts, cfg, rank, device) if resume_path else 0
    wrap_distributed(parts, world)
    data = ReadableBatches(build_dataset(cfg, parts.model.config.image_size), cfg, rank, world, start_step)
    t0 = time.time()
    last_values = run_steps(cfg, parts, data, RunLog(output_dir, start_step, rank == 0), start_step, output_dir,
                            rank, world, device)
    summary = {"step": cfg.max_steps, "last": last_values, "skipped_images": data.skipped,
               "seconds": round(time.time() - t0, 1)}
    if rank == 0:
        finish(cfg, parts, output_dir, summary)
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return train(parse_config(argv))


if __name__ == "__main__":
    run_main(main)
