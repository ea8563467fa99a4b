"""Chat and draw in one conversation.

One assistant turn of `chat`::

    prompt = the conversation so far + an opened assistant turn (+ <boi> when draw=True)
    loop:
        text = model.generate(prompt, stop at the turn's end or <boi>)   (skipped when the prompt ends in <boi>)
        if it stopped at <boi> (and fewer than `max_images` were drawn this turn):
            indices = model.draw_indices(processor.drawing_batch([prompt + text]))   # CFG against the empty prompt
            prompt += text + <boi> + N slots + <eoi>               # the span as drawn, fed from its indices
        else: done

`draw=None` lets the model decide (it emits `<boi>`), `draw=True` opens the turn with `<boi>`, `draw=False` forbids
`<boi>` (text only). A `stop` event set from another thread ends the turn between text tokens and between drawing
scales; the reply then says `stopped=True` and keeps what was finished (a drawing cut short is left out).

The reply is the conversation with the new assistant message appended. Its drawn images are content items
``{"type": "image", "image": PIL, "indices": LongTensor [N], "in_history": True}``: in the next turn the model looks at
them as images (features rebuilt from the indices, no pixel re-encoding), so the user can ask about what was drawn.
Images the user gives are ordinary `{"type": "image", "image": ...}` items.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image
from transformers import StoppingCriteria, StoppingCriteriaList

from .generation import DEFAULT_SAMPLER, resolve_sampler, sampler_defaults, tag_drawing
from .self_check import best_candidate, drawing_checks
from .sampling import seeded_generator

if TYPE_CHECKING:
    from .modeling_tokenflow_mllm import TokenFlowMLLM
    from .processing_tokenflow_mllm import TokenFlowProcessor

# `draw_indices` options a chat drawing takes (a drawing in a conversation has all scales: its span is fed back).
DRAWING_OPTIONS = ("use_cache", "callback")


@dataclass
class ChatReply:
    """Result of [`chat`].

    messages: the input conversation followed by the new assistant message.
    text: the assistant's text (drawn images left out).
    images: the images drawn in this turn (PIL, with prompt/seed/settings metadata), and `indices` their codes [N].
    stopped: the `stop` event ended the turn early.
    """

    messages: list[dict]
    text: str
    images: list[Image.Image] = field(default_factory=list)
    indices: list[torch.LongTensor] = field(default_factory=list)
    stopped: bool = False


class StopOnEvent(StoppingCriteria):
    """Stops `generate` as soon as `event` is set (checked after every token)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def _history_messages(messages: Sequence[dict]) -> list[dict]:
    """Copy of the conversation in which every image an assistant drew earlier is looked at, not drawn again."""
    out = []
    for message in messages:
        content = message["content"]
        if message["role"] == "assistant" and not isinstance(content, str):
            content = [dict(item, in_history=True) if item.get("type") == "image" else item for item in content]
        out.append({**message, "content": content})
    return out


def _text_of(content: str | Sequence[dict]) -> str:
    if isinstance(content, str):
        return content
    return " ".join(item["text"] for item in content if item.get("type") == "text")


@torch.no_grad()
def understanding_features(model: "TokenFlowMLLM", images: Sequence[tuple[str, torch.Tensor]]) -> torch.Tensor | None:
    """Items `("pixels", [3, H, W])` / `("indices", [N])` (from `encode_conversation`) → features [n, S², 40]."""
    if not images:
        return None
    features = []
    for kind, value in images:
        value = value.unsqueeze(0).to(model.device)
        if kind == "pixels":
            features.append(model.get_image_features(value.to(model.image_tokenizer.dtype)))
        else:
            features.append(model.image_features_from_indices(value))
    return torch.cat(features)


class _AssistantTurn:
    """The assistant turn being written: the prompt ids so far, the content items and the drawings."""

    def __init__(self, model: "TokenFlowMLLM", processor: "TokenFlowProcessor", messages: Sequence[dict],
                 stop: threading.Event | None):
        self.model, self.processor, self.messages, self.stop = model, processor, messages, stop
        encoded = processor.encode_conversation(_history_messages(messages), add_generation_prompt=True)
        self.image_features = understanding_features(model, encoded["understanding_images"])
        self.ids = encoded["input_ids"].unsqueeze(0).to(model.device)
        self.end_ids = processor.turn_end_ids
        self.content: list[dict] = []
        self.drawn: list[torch.Tensor] = []
        self.images: list[Image.Image] = []
        self.stopped = False

    def stop_requested(self) -> bool:
        self.stopped = self.stopped or (self.stop is not None and self.stop.is_set())
        return self.stopped

    @property
    def opens_image(self) -> bool:
        return int(self.ids[0, -1]) == self.processor.boi_token_id

    def open_image(self) -> None:
        self.ids = torch.cat([self.ids, self.ids.new_tensor([[self.processor.boi_token_id]])], dim=1)

    def write_text(self, max_new_tokens: int, allow_image: bool, streamer, generate_kwargs: dict) -> int:
        """Generate text until the turn ends, `<boi>` (when `allow_image`), the budget or `stop`; returns the number of
        tokens written (`<boi>` included, which then ends the prompt)."""
        boi = self.processor.boi_token_id
        kwargs = dict(generate_kwargs)
        # Image slots and <eoi> only come with a drawing; a stray one in text would break the next drawing's prompt.
        banned = [self.processor.image_token_id, self.processor.eoi_token_id] + ([] if allow_image else [boi])
        kwargs["suppress_tokens"] = list(kwargs.get("suppress_tokens") or []) + banned
        if self.stop is not None:
            kwargs["stopping_criteria"] = StoppingCriteriaList(list(kwargs.get("stopping_criteria") or []) +
                                                               [StopOnEvent(self.stop)])
        generation_indices = torch.stack(self.drawn).to(self.model.device) if self.drawn else None
        output = self.model.generate(
            input_ids=self.ids, attention_mask=torch.ones_like(self.ids), image_features=self.image_features,
            generation_indices=generation_indices, max_new_tokens=max_new_tokens,
            eos_token_id=self.end_ids + ([boi] if allow_image else []),
            pad_token_id=self.processor.tokenizer.pad_token_id, streamer=streamer, **kwargs)
        new = output[0, self.ids.shape[1]:]
        ends = new.shape[0] and int(new[-1]) in self.end_ids + [boi]
        text = self.processor.decode(new[:-1] if ends else new, skip_special_tokens=True)
        if text:
            self.content.append({"type": "text", "text": text})
        self.ids = torch.cat([self.ids, new.unsqueeze(0)], dim=1)
        self.stop_requested()
        return new.shape[0]

    def draw(self, generator: torch.Generator, seed: int, sampler: dict, options: dict) -> None:
        """Draw the image the prompt opens and close its span; a drawing cut short by `stop` is dropped.

        With `self_check` C > 1 and checks in the user's request (`llm.self_check.drawing_checks`), C candidates are
        drawn in one batch (previews show the first) and the one the model's answers support best is kept."""
        model, processor = self.model, self.processor
        checks = drawing_checks(_text_of(self.messages[-1]["content"])) if sampler["self_check"] > 1 else []
        copies = sampler["self_check"] if checks else 1
        batch = processor.drawing_batch([self.ids[0].tolist()] * copies,
                                        guidance=sampler["cfg_scale"] > 0).to(model.device)
        # The conversation's images, once per candidate row, in the batch's reading order.
        features = None if self.image_features is None else self.image_features.repeat(copies, 1, 1)
        settings = {k: v for k, v in sampler.items() if k != "self_check"}
        if copies > 1 and options.get("callback") is not None:
            callback = options["callback"]
            options = {**options, "callback": lambda k, previews: callback(k, previews[:1])}
        candidates = model.draw_indices(batch["input_ids"], batch["attention_mask"], copies, features, **settings,
                                        generator=generator, stop=self.stop, **options)
        if candidates.shape[1] < model.num_image_codes:  # only `stop` ends a drawing early
            self.stopped = True
            return
        indices = candidates[:1]
        if copies > 1 and not self.stop_requested():  # a stop during the drawing skips the checks
            best = best_candidate(model, processor, candidates, checks)[0]
            indices = candidates[best:best + 1]
        image = tag_drawing(model.decode_images(indices)[0], _text_of(self.messages[-1]["content"]), seed, sampler)
        self.drawn.append(indices[0])
        self.images.append(image)
        self.content.append({"type": "image", "image": image, "indices": indices[0].cpu(), "in_history": True})
        span = self.ids.new_tensor([[processor.image_token_id] * processor.num_image_codes + [processor.eoi_token_id]])
        self.ids = torch.cat([self.ids, span], dim=1)

    def reply(self) -> ChatReply:
        text = "".join(item["text"] for item in self.content if item["type"] == "text")
        return ChatReply(messages=list(self.messages) + [{"role": "assistant", "content": self.content}], text=text,
                         images=self.images, indices=[d.cpu() for d in self.drawn], stopped=self.stopped)


def _check_chat_args(processor, messages: Sequence[dict], max_images: int, draw: bool | None,
                     image_settings: dict) -> None:
    if processor is None:
        raise ValueError("chat needs the model's TokenFlowProcessor: pass processor= or attach model.processor")
    processor.check_messages(messages)
    if messages[-1]["role"] != "user":
        raise ValueError(f"the last message must be the user's, got role {messages[-1]['role']!r}")
    if max_images not in (0, 1) or isinstance(max_images, bool):
        # The sampler's prompts hold one open span each; a second drawing in the same turn would need the first
        # span's codes as context inside the drawing batch, which it does not support.
        raise ValueError(f"max_images must be 0 (text only) or 1, got {max_images!r}")
    if draw not in (None, True, False):
        raise ValueError(f"draw must be None (the model decides), True (draw now) or False (text only), got {draw!r}")
    if draw is True and max_images == 0:
        raise ValueError("draw=True needs max_images=1")
    unknown = set(image_settings) - set(DEFAULT_SAMPLER) - set(DRAWING_OPTIONS)
    if unknown:
        raise ValueError(f"unknown image_settings {sorted(unknown)}; allowed: "
                         f"{sorted(DEFAULT_SAMPLER) + list(DRAWING_OPTIONS)}")


@torch.no_grad()
def chat(
    model: "TokenFlowMLLM",
    messages: Sequence[dict],
    processor: "TokenFlowProcessor | None" = None,
    *,
    max_new_tokens: int = 128,
    max_images: int = 1,
    draw: bool | None = None,
    image_settings: dict[str, Any] | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    streamer=None,
    stop: threading.Event | None = None,
    **generate_kwargs: Any,
) -> ChatReply:
    """Continue a conversation by one assistant turn, drawing an image when the model emits `<boi>` (or `draw=True`).

    Args:
        model: a TokenFlowMLLM.
        messages: the conversation so far (see `TokenFlowProcessor.encode_conversation` for content items); the last
            message must be the user's.
        processor: default `model.processor`.
        max_new_tokens: text-token budget of the turn (drawn-image spans do not count).
        max_images: images the turn may draw (0 or 1); a further `<boi>` ends the turn.
        draw: None = the model decides; True = the turn opens with a drawing; False = text only (`<boi>` suppressed).
        image_settings: sampler settings (cfg_scale, cfg_schedule, top_k, top_p, temperature, scale_rounds, self_check;
            missing ones take `sampler_defaults(model)`) and `draw_indices` options (use_cache, callback).
        seed / generator: randomness of the drawings (one of them; `resolve_seed` draws a fresh seed otherwise).
        streamer: a transformers streamer for the text parts.
        stop: a `threading.Event`; once set, the turn ends between text tokens or drawing scales (`stopped=True`).
        generate_kwargs: passed to `model.generate` for the text (do_sample, temperature, top_p, ...).
    """
    processor = processor if processor is not None else model.processor
    image_settings = dict(image_settings or {})
    _check_chat_args(processor, messages, max_images, draw, image_settings)
    sampler = resolve_sampler(sampler_defaults(model), **{k: image_settings.pop(k) for k in DEFAULT_SAMPLER
                                                           if k in image_settings})
    generator, seed = seeded_generator(seed, generator, model.device)

    turn = _AssistantTurn(model, processor, messages, stop)
    if draw:
        turn.open_image()
    budget = max_new_tokens
    while not turn.stop_requested():
        if turn.opens_image:
            if len(turn.drawn) >= max_images:
                break
            turn.draw(generator, seed, sampler, image_settings)
        elif budget > 0:
            budget -= turn.write_text(budget, draw is not False, streamer, generate_kwargs)
            if not turn.opens_image:
                break
        else:
            break
    return turn.reply()


__all__ = ["ChatReply", "StopOnEvent", "chat", "understanding_features"]
