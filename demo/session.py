"""One conversation of the demo: uploads checked into images, turns run through `llm.chat`, and what the chat shows.

A conversation is a list of `Turn`s. A finished turn holds the user's message and the assistant's reply as
`llm.chat` messages, so the model's context is just those messages in order (`history`); a turn that failed holds
an error note instead of a reply and is shown, but never sent to the model. The Chatbot's value is derived from
the turns (`to_chatbot`), so Undo / Regenerate / Clear only edit the list of turns.

`run_turn` runs one `llm.chat` call in a worker thread and yields after each streamed text piece and each drawing
preview, so the page updates while the model works; setting the `stop` event ends the turn early.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field

from PIL import Image
from transformers import TextStreamer

import llm
from llm.generation import DEFAULT_SAMPLER, resolve_seed, save_png
from llm.processing_tokenflow_mllm import user_content
from llm.sampling import validate_sampling_args
from unimodal.images import ImageLoadError, load_image

logger = logging.getLogger("demo")
MAX_SELF_CHECK = 32  # candidates a drawing may be checked among (each costs a drawing and a few answers)


class UserError(ValueError):
    """A problem with what the user sent or set; its message is shown in the chat."""


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; anything beyond is refused with a message in the chat."""

    max_upload_bytes: int = 10 * 2**20
    max_pixels: int = 4096 * 4096  # checked from the image header, before decoding (decompression bombs)
    max_images_per_message: int = 4
    max_prompt_chars: int = 2000
    max_new_tokens: int = 512
    max_images_per_prompt: int = 4

    def describe(self) -> str:
        return (f"uploads up to {self.max_upload_bytes // 2**20} MiB and {self.max_pixels:,} pixels each, "
                f"{self.max_images_per_message} images and {self.max_prompt_chars} characters per message, "
                f"{self.max_new_tokens} new tokens and {self.max_images_per_prompt} images per prompt")


@dataclass
class Settings:
    """The page's generation controls. `seed` None = a fresh random seed per turn."""

    cfg_scale: float
    cfg_schedule: str
    top_k: int
    top_p: float
    temperature: float
    scale_rounds: int = 1
    self_check: int = 1
    images_per_prompt: int = 1
    seed: int | None = None
    max_new_tokens: int = 128

    def check(self, limits: Limits) -> None:
        validate_sampling_args(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                               cfg_scale=self.cfg_scale, schedule=self.cfg_schedule, scale_rounds=self.scale_rounds)
        for name, high in (("self_check", MAX_SELF_CHECK), ("images_per_prompt", limits.max_images_per_prompt),
                           ("max_new_tokens", limits.max_new_tokens)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
                raise ValueError(f"{name} must be an int in [1, {high}], got {value!r}")
        if self.seed is not None:
            resolve_seed(self.seed)

    def image_settings(self) -> dict:
        return {key: getattr(self, key) for key in DEFAULT_SAMPLER}


@dataclass
class Drawing:
    path: str  # the PNG (prompt, seed and settings in its text chunks)
    caption: str  # seed and settings, shown under the image


@dataclass
class Turn:
    user: dict  # the llm.chat message
    upload_paths: list[str] = field(default_factory=list)
    assistant: dict | None = None  # the llm.chat reply message; None while running or when the turn failed
    text: str = ""  # the reply's text streamed so far (moves into `parts` when the reply is complete)
    preview: str | None = None  # the latest coarse-to-fine preview while drawing
    parts: list[str | Drawing] = field(default_factory=list)  # the reply in order, then alternative drawings
    note: str = ""  # an error, or that the turn was stopped
    refused: bool = False  # the message itself was refused (empty, too long, a bad upload): never run

    def restart(self) -> Turn:
        """The same message, not yet answered (for Regenerate); a refused message stays refused."""
        return Turn(user=self.user, upload_paths=self.upload_paths, note=self.note if self.refused else "",
                    refused=self.refused)


def new_turn(text: str | None, upload_paths: Sequence[str], limits: Limits,
             image_placement: str = "before_text") -> Turn:
    """The turn a message from the text box starts, its images placed as the model was trained
    (`config.image_placement`); empty, over-long or unreadable input gives a turn that only carries the error note
    (and the text, so the user sees what was refused)."""
    try:
        return _user_turn(text, upload_paths, limits, image_placement)
    except UserError as error:
        shown = (text or "").strip()[:limits.max_prompt_chars] or "(no text)"
        return Turn(user={"role": "user", "content": [{"type": "text", "text": shown}]}, note=f"⚠️ {error}",
                    refused=True)


def _user_turn(text: str | None, upload_paths: Sequence[str], limits: Limits, image_placement: str) -> Turn:
    text = (text or "").strip()
    if not text and not upload_paths:
        raise UserError("the message is empty: type a question or a drawing request")
    if len(text) > limits.max_prompt_chars:
        raise UserError(f"the message has {len(text)} characters; at most {limits.max_prompt_chars} are allowed")
    if len(upload_paths) > limits.max_images_per_message:
        raise UserError(f"{len(upload_paths)} images attached; at most {limits.max_images_per_message} per message")
    content = user_content(text, [load_upload(path, limits) for path in upload_paths], image_placement)
    return Turn(user={"role": "user", "content": content}, upload_paths=list(upload_paths))


def load_upload(path: str, limits: Limits) -> Image.Image:
    """The uploaded file as RGB; size, pixel-count and format problems raise `UserError` naming the file."""
    name = os.path.basename(path)
    size = os.path.getsize(path)
    if size > limits.max_upload_bytes:
        raise UserError(f"{name} is {size:,} bytes; uploads may be at most {limits.max_upload_bytes:,} bytes")
    try:
        return load_image(path, max_pixels=limits.max_pixels)
    except ImageLoadError as error:
        raise UserError(f"{name}: {error.reason}") from error


def history(turns: Sequence[Turn]) -> list[dict]:
    """The llm.chat messages of the finished turns (failed turns are left out)."""
    return [message for turn in turns if turn.assistant is not None for message in (turn.user, turn.assistant)]


def check_context(model: llm.TokenFlowMLLM, messages: list[dict], settings: Settings) -> None:
    """Refuse a turn whose prompt plus its budget (new tokens and one drawing) would not fit the model's context."""
    context = getattr(model.config.text_config, "max_position_embeddings", None)
    if context is None:
        return
    processor = model.processor
    prompt = processor.encode_conversation(messages, add_generation_prompt=True)["input_ids"].shape[0]
    needed = prompt + settings.max_new_tokens + processor.num_image_codes + 2
    if needed > context:
        raise UserError(f"the conversation is {prompt} tokens; with {settings.max_new_tokens} new tokens and room "
                        f"for a drawing it needs {needed}, over the model's context of {context}: press Clear "
                        "(or Undo) or lower max new tokens")


class _QueueStreamer(TextStreamer):
    """Puts each decoded text piece on `events` as ("text", piece)."""

    def __init__(self, tokenizer, events: queue.Queue):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.events = events

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.events.put(("text", text))


def _chat_worker(model, messages, settings: Settings, draw: bool | None, seed: int, stop, events) -> None:
    """Run the turn (and the alternative drawings) and report on `events`; always ends with "done" or "error"."""
    try:
        callback = {"callback": lambda scale, previews: events.put(("preview", previews[0]))}
        reply = llm.chat(model, messages, max_new_tokens=settings.max_new_tokens, draw=draw, seed=seed, stop=stop,
                         image_settings={**settings.image_settings(), **callback},
                         streamer=_QueueStreamer(model.processor.tokenizer, events))
        events.put(("reply", reply))
        for number in range(1, settings.images_per_prompt if reply.images else 1):
            if stop.is_set():
                break
            alternative = llm.chat(model, messages, max_new_tokens=1, draw=True, seed=(seed + number) % 2**64,
                                   stop=stop, image_settings={**settings.image_settings(), **callback})
            events.put(("alternative", alternative))
        events.put(("done", None))
    except Exception as error:  # reported to the page by run_turn, which re-raises it there
        events.put(("error", error))


def run_turn(model: llm.TokenFlowMLLM, turns: list[Turn], settings: Settings, limits: Limits, draw: bool | None,
             stop: threading.Event, out_dir: str) -> Iterator[None]:
    """Answer the last turn of `turns` (filling it in place), yielding after every visible change.

    Errors the user caused end up in `turn.note`; other errors are logged and noted too, so the page always gets an
    answer and the server keeps serving.
    """
    turn = turns[-1]
    if turn.refused:
        yield
        return
    try:
        settings.check(limits)
        messages = history(turns[:-1]) + [turn.user]
        check_context(model, messages, settings)
        seed = resolve_seed(settings.seed)
        events: queue.Queue = queue.Queue()
        worker = threading.Thread(target=_chat_worker, args=(model, messages, settings, draw, seed, stop, events),
                                  daemon=True)
        worker.start()
        while True:
            kind, value = events.get()
            if kind == "text":
                turn.text += value
            elif kind == "preview":
                turn.preview = _save(value, out_dir, "preview-")
            elif kind in ("reply", "alternative"):
                _take_reply(turn, value, out_dir, kind == "reply")
            elif kind == "error":
                raise value
            else:
                break
            yield
    except ValueError as error:  # UserError and the settings' own range checks
        turn.note = f"⚠️ {error}"
    except Exception as error:
        logger.exception("turn failed")
        turn.note = f"⚠️ internal error ({type(error).__name__}: {error}); the server keeps running"
    finally:
        stop_requested = stop.is_set()
        stop.set()  # ends the worker too when the page went away mid-turn
    turn.preview = None
    if stop_requested and not turn.note:
        turn.note = "⏹ stopped"
    yield


def _take_reply(turn: Turn, reply: llm.ChatReply, out_dir: str, is_turn: bool) -> None:
    drawings = []
    for image in reply.images:
        settings = json.loads(image.info["settings"])
        caption = f"seed {image.info['seed']} · " + " · ".join(f"{key} {value}" for key, value in settings.items())
        drawings.append(Drawing(_save(image, out_dir, f"drawing-seed{image.info['seed']}-"),
                                caption + ("" if is_turn else " (alternative)")))
    if is_turn:
        turn.assistant = reply.messages[-1]
        drawn = iter(drawings)
        turn.parts = [item["text"] if item["type"] == "text" else next(drawn) for item in turn.assistant["content"]]
    else:
        turn.parts += drawings
    turn.text, turn.preview = "", None


def _save(image: Image.Image, out_dir: str, prefix: str) -> str:
    handle, path = tempfile.mkstemp(prefix=prefix, suffix=".png", dir=out_dir)
    os.close(handle)
    save_png(image, path)
    return path


def to_chatbot(turns: Sequence[Turn]) -> list[dict]:
    """The Chatbot value (messages format) showing `turns`."""
    shown = []
    for turn in turns:
        text = " ".join(item["text"] for item in turn.user["content"] if item["type"] == "text")
        shown.append({"role": "user", "content": [{"path": path} for path in turn.upload_paths] + [text] * bool(text)})
        content: list = []
        for part in turn.parts:
            is_text = isinstance(part, str)
            content += [part] if is_text else [{"path": part.path, "alt_text": part.caption}, part.caption]
        if turn.text:
            content.append(turn.text)
        if turn.preview:
            content.append({"path": turn.preview, "alt_text": "drawing…"})
        if turn.note:
            content.append(turn.note)
        if content:
            shown.append({"role": "assistant", "content": content})
    return shown


__all__ = ["Drawing", "Limits", "Settings", "Turn", "UserError", "history", "load_upload", "new_turn", "run_turn",
           "to_chatbot"]
