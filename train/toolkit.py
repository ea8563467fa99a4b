"""What the tokenizer trainer and the LLM stages share: option files, the CSV log and its plot, distributed setup,
checkpoint files that never run code when read, the resume check, and export folders that never lose a user's files.

Safety rules kept here for both trainers:
- a checkpoint is read with `torch.load(..., weights_only=True)`: tensors and plain Python values only, so a crafted
  pickle cannot run code (what the trainers store is made of those: RNG states are kept as tensors and tuples);
- an export replaces only a folder that is missing, empty, or a previous export of the same files, and goes through
  a temporary folder renamed into place;
- a resume compares the options it runs with against those saved with the checkpoint and warns (or refuses).
"""

from __future__ import annotations

import argparse
import csv
import difflib
import json
import logging
import math
import os
import pickle
import random
import shutil
import socket
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml

logger = logging.getLogger("train.toolkit")


# ---------------------------------------------------------------------------------------------------- options

def check_known_keys(values: dict, allowed: Iterable[str], what: str, noun: str = "keys") -> None:
    """Raise naming the keys of `values` outside `allowed` (with the closest valid spellings) and the valid ones."""
    allowed = sorted(allowed)
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        hints = {k: difflib.get_close_matches(k, allowed, n=1) for k in unknown}
        did_you_mean = "; ".join(f"{k!r}: did you mean {m[0]!r}?" for k, m in hints.items() if m)
        raise ValueError(f"{what}: unknown {noun} {unknown}" + (f" ({did_you_mean})" if did_you_mean else "")
                         + f"; valid {noun}: {allowed}")


def load_options_file(path: str | os.PathLike, allowed: Iterable[str] | None = None) -> dict[str, Any]:
    """A YAML (.yaml/.yml) or JSON file of `option: value` → a dict with dashes in names turned into underscores;
    with `allowed`, any other option is an error naming the valid ones."""
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    if not path.endswith((".yaml", ".yml", ".json")):
        raise ValueError(f"config file {path!r}: expected a .yaml, .yml or .json file")
    with open(path, encoding="utf-8") as f:
        values = json.load(f) if path.endswith(".json") else yaml.safe_load(f)
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise ValueError(f"config file {path!r} must hold a mapping of option: value, got {type(values).__name__}")
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    if allowed is not None:
        check_known_keys(values, allowed, f"config file {path!r}", noun="options")
    return values


def positive_int(text: str) -> int:
    """argparse type of counts and intervals that must be >= 1 (rejected at parse time, before any model is built)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


# ---------------------------------------------------------------------------------------------------- CSV log

def read_log_rows(path: str | os.PathLike, before_step: int) -> list[dict]:
    """The rows of a train_log.csv with step < `before_step` (what a resumed run keeps; the rest it redoes)."""
    path = Path(path)
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return [r for r in csv.DictReader(f) if int(r["step"]) < before_step]


def write_log_rows(path: str | os.PathLike, rows: Sequence[dict]) -> None:
    """Rewrite a train_log.csv atomically. The header is the union of the rows' keys in first-seen order: terms can
    appear later in a run (e.g. the GAN loss), and earlier rows stay blank there."""
    path = Path(path)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def plot_log(csv_path: str | os.PathLike, png_path: str | os.PathLike,
             panels: Sequence[tuple[Sequence[str] | str, str, bool]]) -> None:
    """One figure of side-by-side panels from a train_log.csv. A panel is (columns, y label, log scale); `columns` is
    a list of column names or a prefix such as "loss/" (matching columns are labelled without it). Columns that are
    blank throughout are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    steps = [int(r["step"]) for r in rows]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (columns, ylabel, log_scale) in zip(axes[0], panels):
        if isinstance(columns, str):
            names = {k: k[len(columns):] for k in rows[0] if k.startswith(columns)}
        else:
            names = {k: k for k in columns}
        for column, label in names.items():
            values = [float(r[column]) if r.get(column) not in (None, "") else math.nan for r in rows]
            if any(not math.isnan(v) for v in values):
                ax.plot(steps, values, label=label)
        if log_scale:
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(names) > 1:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------- distributed

def single_process_launch_env() -> None:
    """Let a plain `python train/...py` run like a one-process launch (the launchers set these variables themselves),
    and pick DeepSpeed's CPU accelerator when there is no GPU."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "WORLD_SIZE" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                           ("MASTER_PORT", str(port))):
            os.environ.setdefault(key, value)


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device) from torchrun/deepspeed env vars (the process group is started for more than one
    process, or under a launcher); a plain run is rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 or "LOCAL_RANK" in os.environ:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
        return dist.get_rank(), dist.get_world_size(), device
    return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ---------------------------------------------------------------------------------------------------- checkpoints

def atomic_torch_save(obj: Any, path: Path) -> None:
    """`torch.save` to a temporary file renamed into place: a kill during the save leaves the previous file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def safe_torch_load(path: str | os.PathLike, allowed_globals: Sequence = (), mmap: bool = False) -> Any:
    """`torch.load` that never runs code: tensors, containers and plain values only (plus `allowed_globals`)."""
    try:
        with torch.serialization.safe_globals(list(allowed_globals)):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{str(path)!r} is not a checkpoint of plain tensors and values; refusing to unpickle it "
                         f"(it may run code): {first_line}") from None
    except (RuntimeError, EOFError) as error:
        raise ValueError(f"{str(path)!r} is not a readable torch checkpoint: {error}") from None


def rng_states() -> dict[str, Any]:
    """Every random generator's state as tensors and tuples, so `safe_torch_load` reads it back."""
    _, key, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss), float(cached))}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_states(state: dict[str, Any]) -> None:
    key, pos, has_gauss, cached = state["numpy"]
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", key.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_resume_options(saved: dict, current: dict, ignored: Iterable[str], strict: bool, source: str) -> list[str]:
    """Compare the options of a resumed run with those saved with its checkpoint (`source` names where they come
    from). Differences outside `ignored` (bookkeeping that does not change the losses) are logged as a warning, or
    raise with `strict`; returns them as "name: saved → now" lines."""
    ignored = set(ignored)
    names = sorted((set(saved) | set(current)) - ignored)
    changes = [f"{name}: {_shown(saved, name)} → {_shown(current, name)}" for name in names
               if _comparable(saved, name) != _comparable(current, name)]
    if changes:
        message = (f"resuming from {source} with options that differ from the checkpoint's, so the run will not "
                   f"reproduce an uninterrupted one: {'; '.join(changes)}")
        if strict:
            raise ValueError(message + " (without --strict-resume this is a warning)")
        logger.warning(message + " (--strict-resume refuses such a resume)")
    return changes


def _shown(options: dict, name: str) -> str:
    return repr(options[name]) if name in options else "unset"


def _comparable(options: dict, name: str) -> Any:
    """An option as it reads back from JSON/YAML (tuples as lists), so a saved option equals the same option now;
    a missing one equals nothing."""
    return json.loads(json.dumps(options[name], default=str)) if name in options else ("unset", object())


# ---------------------------------------------------------------------------------------------------- export

def paths_overlap(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether one folder is, or lies inside, the other (after resolving links and relative parts)."""
    a, b = Path(a).resolve(), Path(b).resolve()
    return a == b or a in b.parents or b in a.parents


def check_export_target(target: str | os.PathLike, export_files: Iterable[str], kept_files: Iterable[str] = (),
                        model_type: str | None = None) -> None:
    """Raise unless `target` may receive an export: missing, an empty folder, or a folder holding only files of an
    earlier export (`export_files`, with a config.json of `model_type` when given) and files carried over into the
    new one (`kept_files`)."""
    target = Path(target)
    if not target.exists():
        return
    if not target.is_dir():
        raise ValueError(f"export folder {str(target)!r} is a file; name a folder (missing, empty, or an earlier "
                         "export)")
    known = set(export_files) | set(kept_files)
    foreign = sorted(p.name for p in target.iterdir() if p.name not in known or not p.is_file())
    if foreign:
        raise ValueError(f"export folder {str(target)!r} holds files that an export does not write: {foreign[:5]}"
                         f"{' ...' if len(foreign) > 5 else ''}; exports go to a missing or empty folder, or replace "
                         f"an earlier export ({', '.join(sorted(export_files))}); choose another --export-dir")
    config = target / "config.json"
    if model_type is not None and config.is_file():
        try:
            found = json.loads(config.read_text()).get("model_type")
        except (ValueError, AttributeError):
            found = None
        if found != model_type:
            raise ValueError(f"export folder {str(target)!r} holds a config.json of model type {found!r}, not an "
                             f"earlier {model_type!r} export; choose another --export-dir")


def export_folder(source: Path, target: str | os.PathLike, export_files: Iterable[str],
                  kept_files: Iterable[str] = (), model_type: str | None = None) -> None:
    """Copy the files of `source` into `target` through a temporary sibling folder renamed into place; files of
    `kept_files` already in `target` (e.g. a model card) are carried over. `target` is checked first
    (`check_export_target`); the old folder is removed only once the new one is in place."""
    target = Path(target)
    check_export_target(target, export_files, kept_files, model_type)
    written = sorted(p.name for p in Path(source).iterdir())
    if not set(written) <= set(export_files):
        raise ValueError(f"{str(source)!r} holds {written}, more than an export writes ({sorted(export_files)})")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.export-", dir=target.parent))  # same file system: rename
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.replaced-", dir=target.parent))
    shutil.copytree(source, tmp, dirs_exist_ok=True)
    for name in kept_files:
        if (target / name).is_file() and not (tmp / name).exists():
            shutil.copy2(target / name, tmp / name)
    if target.exists():
        os.replace(target, old)  # onto the empty folder reserved above
    os.replace(tmp, target)
    shutil.rmtree(old)
