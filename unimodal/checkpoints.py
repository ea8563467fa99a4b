"""Checked loading of `save_pretrained` folders: a damaged or mismatched checkpoint raises instead of loading.

`PreTrainedModel.from_pretrained` is lenient by design: it re-initialises missing weights, drops unexpected ones,
loads a folder of another model type with a warning and guesses that a missing local path is a Hub repository id.
For our own model folders each of those is a fault, so `load_checked` wraps it:

- the path: a missing local folder (or, offline, one that is not a cached Hub model) is "no such folder"; a file is
  not a folder;
- `config.json`: present, valid JSON, an object, and of the expected `model_type`;
- the weights: safetensors only (`model.safetensors` or a sharded index), every file's header readable (a truncated
  or overwritten header is named) and, when the file records one, the SHA-256 of its tensor data matching (our
  `save_pretrained` records it with `stamp_data_digests`, so bytes overwritten anywhere in our own files are found);
- the load itself (transformers' loading info): no missing, unexpected or mis-shaped weights;
- the values: every loaded floating-point tensor is finite.

What it cannot see: in files without a recorded digest (saved by other code), bytes overwritten inside a tensor's
data that still decode to finite numbers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
DIGEST_KEY = "data_sha256"  # safetensors metadata entry: SHA-256 of the bytes after the header
_CHUNK = 1 << 24
_LISTED = 4


class CheckpointError(ValueError):
    """A checkpoint folder is damaged, incomplete or holds another kind of model."""


def _one_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _hub_form(path: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(path)
    except HFValidationError:
        return False
    return True


def local_folder(path: str | os.PathLike) -> str | None:
    """The folder `path` names, None if it is a Hub repository id to resolve; raises if it is neither.

    A missing path is "no such folder" unless it has the form of a Hub id and the Hub can be reached (or, offline,
    holds it in the local cache)."""
    from huggingface_hub import try_to_load_from_cache

    path = os.fspath(path)
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise CheckpointError(f"{path!r} is a file; a checkpoint is a folder written by save_pretrained "
                              f"({CONFIG_NAME} and {WEIGHTS_NAME})")
    if _hub_form(path):
        if not _offline() or isinstance(try_to_load_from_cache(path, CONFIG_NAME), str):
            return None
        raise FileNotFoundError(f"no such folder: {path!r} (nor a cached Hub model: HF_HUB_OFFLINE is set)")
    raise FileNotFoundError(f"no such folder: {path!r}")


def read_json(path: str) -> Any:
    """A JSON file's content; invalid UTF-8 or JSON is a `CheckpointError` naming the file, line and column."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: invalid JSON at line {error.lineno}, column {error.colno} ({error.msg})") from None
    except UnicodeDecodeError as error:
        raise CheckpointError(f"{path}: not UTF-8 text (byte {error.start}: {error.reason})") from None


def check_config(folder: str, model_type: str, class_name: str) -> dict:
    """`folder/config.json` as a dict; raises unless it exists, parses and has `model_type` == `model_type`."""
    path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(path):
        raise CheckpointError(f"{folder!r} has no {CONFIG_NAME}; it is not a folder written by save_pretrained")
    config = read_json(path)
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(config).__name__}")
    found = config.get("model_type")
    if found != model_type:
        raise CheckpointError(
            f"{folder!r} holds a {found!r} model (model_type in {CONFIG_NAME}), but {class_name} loads "
            f"{model_type!r} folders")
    return config


def weight_files(folder: str) -> list[str]:
    """The safetensors files of `folder` (one file, or the shards its index names); raises if there are none."""
    index = os.path.join(folder, WEIGHTS_INDEX_NAME)
    if os.path.isfile(index):
        content = read_json(index)
        weight_map = content.get("weight_map") if isinstance(content, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: expected a 'weight_map' object naming the shard of every weight")
        files = [os.path.join(folder, name) for name in sorted(set(weight_map.values()))]
    elif os.path.isfile(os.path.join(folder, WEIGHTS_NAME)):
        files = [os.path.join(folder, WEIGHTS_NAME)]
    else:
        present = sorted(os.listdir(folder))[:8]
        raise CheckpointError(f"{folder!r} has no {WEIGHTS_NAME} (only safetensors weights are loaded); it holds "
                              f"{present}")
    for file in files:
        if not os.path.isfile(file):
            raise CheckpointError(f"{file}: weight shard named in {WEIGHTS_INDEX_NAME} is missing")
        try:
            with safe_open(file, framework="pt") as f:
                recorded = (f.metadata() or {}).get(DIGEST_KEY)
        except SafetensorError as error:
            raise CheckpointError(
                f"{file} is damaged (truncated or overwritten): {_one_line(error)}; save or copy it again") from None
        if recorded is not None and _data_digest(file) != recorded:
            raise CheckpointError(f"{file} is damaged (overwritten): its tensor data does not match the SHA-256 recorded "
                                  "when it was saved; save or copy it again")
    return files


def _header(file: str) -> tuple[int, dict]:
    """(header length in bytes, parsed header) of a safetensors file."""
    with open(file, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        return length, json.loads(f.read(length))


def _data_digest(file: str) -> str:
    """SHA-256 of everything after the header (the tensor data), independent of the metadata."""
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        f.seek(8 + int.from_bytes(f.read(8), "little"))
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def stamp_data_digests(folder: str | os.PathLike) -> None:
    """Records the SHA-256 of each weight file's tensor data in its safetensors metadata (each file is rewritten through
    a temporary file beside it), so a later load finds any overwritten byte. Folders without the standard weight names
    (a `variant` save) are left as they are."""
    folder = os.fspath(folder)
    if not any(os.path.isfile(os.path.join(folder, name)) for name in (WEIGHTS_NAME, WEIGHTS_INDEX_NAME)):
        return
    for file in weight_files(folder):
        length, header = _header(file)
        header.setdefault("__metadata__", {})[DIGEST_KEY] = _data_digest(file)
        encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
        encoded += b" " * (-len(encoded) % 8)  # the data stays 8-byte aligned, as safetensors writes it
        partial = file + ".partial"
        with open(file, "rb") as source, open(partial, "wb") as target:
            target.write(len(encoded).to_bytes(8, "little") + encoded)
            source.seek(8 + length)
            shutil.copyfileobj(source, target, _CHUNK)
        os.replace(partial, file)


def _listing(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:_LISTED])
    return f"{len(keys)} ({shown}{', ...' if len(keys) > _LISTED else ''})"


def check_loading_info(info: dict, source: str, class_name: str) -> None:
    """Raises if transformers' loading info reports missing, unexpected or mis-shaped weights."""
    problems = []
    if info.get("missing_keys"):
        problems.append(f"missing {_listing(info['missing_keys'])}")
    if info.get("unexpected_keys"):
        problems.append(f"unexpected {_listing(info['unexpected_keys'])}")
    if info.get("mismatched_keys"):
        shapes = [f"{key} {tuple(ckpt)} vs {tuple(model)}" for key, ckpt, model in info["mismatched_keys"]]
        problems.append(f"wrong shape {_listing(shapes)}")
    if problems:
        raise CheckpointError(f"weights of {source!r} do not fit {class_name}: " + "; ".join(problems)
                              + " (an incomplete folder, or one saved from another configuration)")


def check_finite(model: torch.nn.Module, source: str) -> None:
    """Raises if any floating-point weight or buffer of `model` holds NaN or infinity (meta tensors are skipped)."""
    bad = []
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not tensor.is_meta and not bool(torch.isfinite(tensor).all()):
            count = int((~torch.isfinite(tensor)).sum())
            bad.append(f"{name}: {count} of {tensor.numel()} values")
    if bad:
        raise CheckpointError(f"weights of {source!r} hold NaN or infinite values, tensors {_listing(bad)}; the file is "
                              "damaged or training diverged")


def load_tensor_file(path: str | os.PathLike) -> Any:
    """A `.safetensors` file's tensors, or a torch checkpoint read with `weights_only=True` (no code runs).

    A file that is neither (text, an image, a truncated download, a pickle with foreign objects) is a
    `CheckpointError` naming it, instead of the unpickler's opcode error."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path!r}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as error:  # noqa: BLE001 - the unpickler fails on foreign bytes with any exception type
        raise CheckpointError(f"{path} is not a readable checkpoint (expected a torch .pt/.bin file or .safetensors; "
                              f"{type(error).__name__}: {_one_line(error)})") from None


@contextmanager
def _load_report_silenced():
    """Drops transformers' multi-line load report (we raise a shorter error on the same findings)."""
    logger = logging.getLogger("transformers.modeling_utils")

    def keep(record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def check_folder(path: str | os.PathLike, model_type: str, class_name: str) -> str | None:
    """The checks before loading: the folder exists, its config is of `model_type` and its weight files are readable.
    Returns the folder (None for a Hub id left to transformers)."""
    folder = local_folder(path)
    if folder is not None:
        check_config(folder, model_type, class_name)
        weight_files(folder)
    return folder


def load_checked(load: Callable[..., Any], path: str | os.PathLike, model_type: str, class_name: str,
                 *args: Any, **kwargs: Any) -> Any:
    """`load(path, *args, **kwargs)` (a `from_pretrained`) with the checks of the module docstring.

    `output_loading_info=True` is honoured (the info is returned beside the model, as transformers does)."""
    check_folder(path, model_type, class_name)
    want_info = kwargs.pop("output_loading_info", False)
    # Mis-shaped weights are reported through the loading info (and raised below) rather than as transformers'
    # generic RuntimeError after its report.
    kwargs.setdefault("ignore_mismatched_sizes", True)
    with _load_report_silenced():
        model, info = load(path, *args, output_loading_info=True, **kwargs)
    source = os.fspath(path)
    check_loading_info(info, source, class_name)
    check_finite(model, source)
    return (model, info) if want_info else model
