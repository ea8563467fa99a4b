"""The training loop of both LLM stages: the transformers `Trainer` (with its DeepSpeed integration) plus what our
data and model need: a collator that skips unusable samples, per-process data shares that refill and count them
(`train.batches`), per-modality losses and throughput over all processes, a NaN guard, completion markers on
checkpoints holding the data position, CSV logs, a loss-curve plot, and periodic answer/drawing samples.

We use the stock `Trainer` rather than a loop of our own: it already handles DeepSpeed ZeRO-2/3 (+ offload), gradient
accumulation, mixed precision, checkpoint/resume with optimizer, scheduler and RNG, and multi-node launch; the
additions here are hooks, not a second loop.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from llm.flops import gpu_spec, llm_parameter_count, peak_tflops, training_mfu
from unimodal.images import ImageLoadError, load_image

from .batches import SKIP_REASONS, DataLayout, DataState, ShardedBatches, read_position
from .conversations import conversation_images
from .samples import write_samples
from .toolkit import check_resume_options, plot_log, read_log_rows, safe_torch_load, write_log_rows

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "checkpoint_complete.json"
# The model's loss terms, logged one by one (mean over the logging window of the batches that have each).
LOSS_NAMES = ("text_loss", "image_loss", "slot_loss")
RUN_OPTIONS = "run_config.yaml"  # the run's resolved options, also copied into each checkpoint
# Options that change neither the data order nor the losses: a resume may change them without a warning.
BOOKKEEPING_OPTIONS = ("output_dir", "logging_dir", "resume", "strict_resume", "resume_from_checkpoint", "config",
                       "sample_every", "num_sample_prompts", "report_to", "run_name", "overwrite_output_dir",
                       "dataloader_num_workers", "dataloader_persistent_workers", "dataloader_prefetch_factor",
                       "disable_tqdm", "save_total_limit", "record_sample_ids", "max_skip_fraction")
BOOKKEEPING_PREFIXES = ("logging_", "save_", "hub_", "push_to_hub")


# ---------------------------------------------------------------------------------------------------- collator

class ConversationCollator:
    """Conversations → one padded batch for `TokenFlowMLLM.forward`, via `processor.encode_conversation`.

    A sample is skipped — never replaced silently — when an image cannot be read (`ImageLoadError`), when it is
    longer than `max_length`, or when nothing in it is supervised (all labels masked and no drawn image); each skip is
    logged by sample id. In training, `train.batches.ShardedBatches` calls `encode` and refills the batch from the
    next samples of the same process's share, counting the skips; called on a list, the collator counts them in the
    batch (`data_stats`, in `SKIP_REASONS` order) and raises if none is left.
    """

    def __init__(self, processor, max_length: int = 512):
        self.processor, self.max_length = processor, max_length

    def load_images(self, conversation: dict) -> dict:
        for item in conversation_images(conversation):
            if "image" in item and not hasattr(item["image"], "mode"):  # a path or bytes, not yet a PIL image
                item["image"] = load_image(item["image"])
        return conversation

    def encode(self, conversation: dict) -> tuple[dict | None, str | None]:
        """(example, None) for a usable conversation, (None, reason) for a skipped one (reason in SKIP_REASONS)."""
        sample_id = conversation.get("id", "?")
        try:
            example = self.processor.encode_conversation(self.load_images(conversation)["messages"])
        except ImageLoadError as error:
            logger.warning("skipping sample %s: %s", sample_id, error)
            return None, "unreadable_image"
        if len(example["input_ids"]) > self.max_length:
            logger.warning("skipping sample %s: %d tokens > max_length %d", sample_id, len(example["input_ids"]),
                           self.max_length)
            return None, "too_long"
        if bool((example["labels"] == -100).all()) and not example["drawn_images"]:
            logger.warning("skipping sample %s: every label is masked and it draws no image", sample_id)
            return None, "unsupervised"
        return example, None

    def collate(self, examples: list[dict]) -> dict[str, Any]:
        return self.processor.collate(examples)

    def __call__(self, conversations: Sequence[dict]) -> dict[str, Any]:
        examples, skipped = [], Counter()
        for conversation in conversations:
            example, reason = self.encode(conversation)
            if reason is None:
                examples.append(example)
            else:
                skipped[reason] += 1
        if not examples:
            raise RuntimeError(f"every sample of a batch was skipped ({dict(skipped)}); ids: "
                               f"{[c.get('id', '?') for c in conversations]}")
        batch = self.collate(examples)
        batch["data_stats"] = torch.tensor([skipped[r] for r in SKIP_REASONS], dtype=torch.long)
        return batch


# ---------------------------------------------------------------------------------------------------- trainer

class TokenFlowTrainer(Trainer):
    """`Trainer` that reads its data through `ShardedBatches` (each process its own share, skipped samples refilled
    and counted, the position saved with every checkpoint and resumed per process), logs text/image losses,
    throughput and the run's global skip counts, stops on a non-finite loss, and marks each checkpoint complete once
    every file of it is written.

    Args (beyond `Trainer`'s):
        max_skip_fraction: see `ShardedBatches`.
        sample_ids_dir: if set, each process appends the ids and stream positions of the samples of every batch it
            trains on to `sample_ids_dir/rank-R.jsonl`.
    """

    def __init__(self, *args, max_skip_fraction: float = 0.1, sample_ids_dir: str | os.PathLike | None = None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        # Our forward averages its own losses; the Trainer must not pass num_items_in_batch into it.
        self.model_accepts_loss_kwargs = False
        # The loader continues from the checkpoint's data position itself; the Trainer must not skip batches too.
        self.args.ignore_data_skip = True
        self.max_skip_fraction = max_skip_fraction
        self.sample_ids_dir = Path(sample_ids_dir) if sample_ids_dir is not None else None
        self.data_state: DataState | None = None
        self._window: dict[str, float] = defaultdict(float)
        self._window_start = time.perf_counter()
        self._mfu_inputs: tuple[dict[str, int], float | None] | None = None

    # ------------------------------------------------------------------------------------------------ data

    def data_layout(self) -> DataLayout:
        args = self.args
        return DataLayout(world_size=args.world_size, num_workers=max(args.dataloader_num_workers, 1),
                          batch_size=self._train_batch_size,
                          seed=args.data_seed if args.data_seed is not None else args.seed)

    def get_train_dataloader(self) -> DataLoader:
        layout = self.data_layout()
        if self.data_state is None:
            self.data_state = DataState.start(layout)
        stream = ShardedBatches(self.train_dataset, self.data_collator.encode, self.data_collator.collate, layout,
                                self.args.process_index, self.data_state, self.max_skip_fraction,
                                record_ids=self.sample_ids_dir is not None,
                                positions_per_step=layout.batch_size * layout.world_size
                                * self.args.gradient_accumulation_steps)
        workers = self.args.dataloader_num_workers
        return DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=self.args.dataloader_pin_memory,
                          persistent_workers=workers > 0 and self.args.dataloader_persistent_workers,
                          prefetch_factor=self.args.dataloader_prefetch_factor if workers > 0 else None)

    def consume_data_position(self, inputs: dict) -> None:
        """Move the run's data position past a batch that is being trained on (and record its ids if asked)."""
        shard, position = read_position(inputs.pop("data_position"))
        self.data_state.shards[shard] = position
        self.data_state.batches[self.args.process_index] += 1
        ids, positions = inputs.pop("sample_ids", None), inputs.pop("stream_positions", None)
        if self.sample_ids_dir is not None:
            self.sample_ids_dir.mkdir(parents=True, exist_ok=True)
            with open(self.sample_ids_dir / f"rank-{self.args.process_index}.jsonl", "a") as f:
                f.write(json.dumps({"step": self.state.global_step + 1, "ids": ids, "positions": positions}) + "\n")

    def own_shards(self) -> list:
        per_process = self.data_state.layout.num_workers
        first = self.args.process_index * per_process
        return self.data_state.shards[first:first + per_process]

    def gathered_data_state(self) -> DataState:
        """The run's data position with every process's shards (a collective: every process must call it)."""
        rank, state = self.args.process_index, self.data_state
        parts = [(rank, self.own_shards(), state.batches[rank])]
        if self.args.world_size > 1:
            parts = [None] * self.args.world_size
            torch.distributed.all_gather_object(parts, (rank, self.own_shards(), state.batches[rank]))
        gathered = DataState(state.layout, list(state.shards), list(state.batches))
        per_process = state.layout.num_workers
        for other, shards, batches in parts:
            gathered.shards[other * per_process:(other + 1) * per_process] = shards
            gathered.batches[other] = batches
        return gathered

    # ------------------------------------------------------------------------------------------------ steps

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "data_position" in inputs:
            self.consume_data_position(inputs)
        if model.training and self.args.world_size > 1:
            inputs["run_every_branch"] = True  # the same modules in the same order on every process
        outputs = model(**inputs)
        loss = outputs.loss
        if not torch.isfinite(loss.detach()).all():
            raise FloatingPointError(
                f"non-finite loss {loss.detach().float().item()} at step {self.state.global_step + 1} (text loss "
                f"{_item(outputs.text_loss)}, image loss {_item(outputs.image_loss)}, slot loss "
                f"{_item(outputs.slot_loss)}); lower --learning-rate, check "
                "the data, or resume from the last checkpoint")
        if model.training:
            window = self._window
            for name in LOSS_NAMES:
                value = getattr(outputs, name)
                if value is not None:
                    window[name] += float(value.detach())
                    window[f"{name}_n"] += 1
            window["tokens"] += float(inputs["attention_mask"].sum())
            window["samples"] += inputs["input_ids"].shape[0]
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._window:
            window, elapsed = self.global_window(), max(time.perf_counter() - self._window_start, 1e-9)
            for name in LOSS_NAMES:
                if window[f"{name}_n"]:
                    logs[name] = round(window[name] / window[f"{name}_n"], 4)
            logs["tokens_per_s"] = round(window["tokens"] / elapsed, 1)
            mfu = self.model_flops_utilisation(window["tokens"] / elapsed / self.args.world_size)
            if mfu is not None:
                logs["mfu"] = round(mfu, 4)
            logs["samples_per_s"] = round(window["samples"] / elapsed, 2)
            logs["samples_read"] = int(window["samples_read"])
            logs.update({f"skipped_{r}": int(window[f"skipped_{r}"]) for r in SKIP_REASONS if window[f"skipped_{r}"]})
            self._window = defaultdict(float)
            self._window_start = time.perf_counter()
        super().log(logs, start_time)

    def global_window(self) -> dict[str, float]:
        """The logging window's sums (losses, tokens, samples) and the run's data counts (samples read, skipped by
        reason), over every process: a collective, which every process reaches at the same steps."""
        own = self.own_shards()
        data = {"samples_read": sum(s.cursor for s in own),
                **{f"skipped_{r}": sum(s.skipped.get(r, 0) for s in own) for r in SKIP_REASONS}}
        sums = (*(n for name in LOSS_NAMES for n in (name, f"{name}_n")), "tokens", "samples")
        names = (*sums, *data)
        values = torch.tensor([self._window[n] for n in sums] + list(data.values()), dtype=torch.float64,
                              device=self.args.device)
        if self.args.world_size > 1:
            torch.distributed.all_reduce(values)
        return dict(zip(names, values.tolist()))

    def model_flops_utilisation(self, tokens_per_s: float) -> float | None:
        """`llm.flops.training_mfu` of this process's GPU at the training precision; None on CPU or on a GPU
        missing from `llm.flops.GPU_SPECS`."""
        if self.args.device.type != "cuda":
            return None
        if self._mfu_inputs is None:  # fixed for the run: parameter counts and the GPU's peak
            spec = gpu_spec(torch.cuda.get_device_name(self.args.device))
            self._mfu_inputs = (llm_parameter_count(self.model),
                                peak_tflops(spec, "bfloat16" if self.args.bf16 else "float32"))
        params, peak = self._mfu_inputs
        return training_mfu(params, tokens_per_s, peak)

    def _save_checkpoint(self, model, trial) -> None:
        data_state = self.gathered_data_state()
        super()._save_checkpoint(model, trial)
        if self.args.world_size > 1:
            torch.distributed.barrier()
        if self.args.should_save:
            output_dir = Path(self._get_output_dir(trial=trial))
            folder = output_dir / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            if (output_dir / RUN_OPTIONS).is_file():  # what a resume compares its options with
                shutil.copy2(output_dir / RUN_OPTIONS, folder / RUN_OPTIONS)
            write_json_atomic(folder / COMPLETE_MARKER, {"global_step": self.state.global_step,
                                                         "skipped": dict(data_state.skipped()),
                                                         "data": data_state.to_dict()})

    def train(self, resume_from_checkpoint: str | None = None, **kwargs):
        # The data position is ours, not the Trainer's: a resumed run continues every shard from the checkpoint's
        # marker, and refuses a layout (processes, workers, batch size, seed) the position does not fit.
        if isinstance(resume_from_checkpoint, (str, os.PathLike)):
            check_checkpoint_files(resume_from_checkpoint)
            marker_path = Path(resume_from_checkpoint) / COMPLETE_MARKER
            if not marker_path.is_file():
                raise ValueError(f"{resume_from_checkpoint} is not a complete checkpoint (no {COMPLETE_MARKER}); "
                                 "resume from another one or with --resume auto")
            marker = json.loads(marker_path.read_text())
            if "data" not in marker:
                raise ValueError(f"{resume_from_checkpoint} holds no data position (written by an older version); "
                                 "start a new run from its weights with --init-from <checkpoint> --resume no")
            self.data_state = DataState.from_dict(marker["data"], self.data_layout())
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)


def check_checkpoint_files(folder: str | os.PathLike) -> None:
    """Read every pickle-based file a resume loads from `folder` as `safe_torch_load` does (tensors and plain values,
    plus the few state classes DeepSpeed and numpy store), and raise naming the first one that holds anything else.

    The Trainer loads its own files with `weights_only=True`, but DeepSpeed's engine unpickles its checkpoint files in
    full; checked first, a crafted file is refused before anything could run its code. `training_args.bin` is never
    read on resume and is not checked."""
    import numpy as np
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    allowed = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address,  # DeepSpeed's optimizer states
               np._core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]  # numpy RNG state
    for path in sorted(Path(folder).rglob("*")):
        if path.suffix in (".pt", ".pth", ".bin") and path.name != "training_args.bin" and path.is_file():
            safe_torch_load(path, allowed, mmap=True)  # mmap: no copy of large states


def check_resume_run_options(checkpoint: str | os.PathLike, options: dict, strict: bool) -> list[str]:
    """Compare this run's resolved `options` with those saved in the checkpoint folder (`RUN_OPTIONS`): differences
    in anything but bookkeeping are a warning, or an error with `strict` (see `toolkit.check_resume_options`)."""
    saved_path = Path(checkpoint) / RUN_OPTIONS
    if not saved_path.is_file():
        message = f"{checkpoint} holds no {RUN_OPTIONS}, so its options cannot be compared with this run's"
        if strict:
            raise ValueError(message + " (--strict-resume)")
        logger.warning(message)
        return []
    current = yaml.safe_load(yaml.safe_dump(options))  # as the saved file reads back
    saved = yaml.safe_load(saved_path.read_text()) or {}
    ignored = [k for k in {*saved, *current} if k in BOOKKEEPING_OPTIONS or k.startswith(BOOKKEEPING_PREFIXES)]
    return check_resume_options(saved, current, ignored, strict, str(checkpoint))


def _item(value: torch.Tensor | None) -> str:
    return "n/a" if value is None else f"{float(value.detach()):.4g}"


def write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest `checkpoint-N` folder of `output_dir` that was completely written (None if there is none).

    A run killed while saving leaves a folder without the completion marker; it is never resumed from."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    steps = []
    for folder in output_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        suffix = folder.name[len(PREFIX_CHECKPOINT_DIR) + 1:]
        if suffix.isdigit() and (folder / COMPLETE_MARKER).exists():
            steps.append(int(suffix))
        elif suffix.isdigit():
            logger.warning("ignoring incomplete checkpoint %s (no %s)", folder, COMPLETE_MARKER)
    return str(output_dir / f"{PREFIX_CHECKPOINT_DIR}-{max(steps)}") if steps else None


# ---------------------------------------------------------------------------------------------------- callbacks

class CsvLogCallback(TrainerCallback):
    """Appends every training log to OUTPUT_DIR/train_log.csv (one row per log step, columns grow as needed)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        row = {"step": state.global_step, **{k: v for k, v in logs.items() if isinstance(v, (int, float))}}
        # rows at and after this step are dropped: a resumed run redoes them
        write_log_rows(self.path, [*read_log_rows(self.path, before_step=state.global_step), row])


def plot_losses(log_csv: str | os.PathLike, out_png: str | os.PathLike) -> None:
    """Loss curves (total, text, image) and learning rate from a train_log.csv."""
    plot_log(log_csv, out_png, [(["loss", *LOSS_NAMES], "cross-entropy", False),
                                (["learning_rate"], "learning rate", False)])


class LossPlotCallback(TrainerCallback):
    def __init__(self, log_csv: str | os.PathLike, out_png: str | os.PathLike):
        self.log_csv, self.out_png = log_csv, out_png

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero and os.path.exists(self.log_csv):
            plot_losses(self.log_csv, self.out_png)


class SampleCallback(TrainerCallback):
    """Every `every` steps (and at the end) answers a few held-out questions and draws a few held-out prompts,
    written to OUTPUT_DIR/samples/step-N/ (answers.md, drawings.png). Skipped under ZeRO-3, where no single rank
    holds the weights."""

    def __init__(self, processor, output_dir: str | os.PathLike, every: int = 0, num_prompts: int = 4,
                 enabled: bool = True):
        self.processor, self.output_dir = processor, Path(output_dir)
        self.every, self.num_prompts, self.enabled = every, num_prompts, enabled

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every and state.global_step % self.every == 0:
            self.write(state, model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.write(state, model)

    def write(self, state, model) -> None:
        if not (self.enabled and state.is_world_process_zero and model is not None):
            return
        was_training = model.training
        model.eval()
        try:
            write_samples(model, self.processor, self.output_dir / f"step-{state.global_step}", self.num_prompts)
        finally:
            model.train(was_training)
