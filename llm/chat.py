"""Chat and draw in one conversation.

One assistant turn of `chat`::

    prompt = the conversation so far + an opened assistant turn
    loop:
        text = model.generate(prompt, stop at the turn's end or <boi>)
        if it stopped at <boi> (and fewer than `max_images` were drawn this turn):
            indices = model.draw_indices(prompt + text)            # next-scale sampling, CFG against the empty prompt
            prompt += text + <boi> + N slots + <eoi>               # the span as drawn, fed from its indices
        else: done

The reply is the conversation with the new assistant message appended. Its drawn images are content items
``{"type": "image", "image": PIL, "indices": LongTensor [N], "in_history": True}``: in the next turn the model looks at
them as images (features rebuilt from the indices, no pixel re-encoding), so the user can ask about what was drawn.
Images the user gives are ordinary `{"type": "image", "image": ...}` items.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image
from transformers import StoppingCriteria, StoppingCriteriaList

from .sampling import seeded_generator, validate_sampling_args

if TYPE_CHECKING:
    from .modeling_tokenflow_mllm import TokenFlowMLLM
    from .processing_tokenflow_mllm import TokenFlowProcessor


@dataclass
class ChatReply:
    """Result of [`chat`].

    messages: the input conversation followed by the new assistant message.
    text: the assistant's text (drawn images left out).
    images: the images drawn in this turn (PIL, with prompt/seed/settings metadata), and `indices` their codes [N].
    """

    messages: list[dict]
    text: str
    images: list[Image.Image] = field(default_factory=list)
    indices: list[torch.LongTensor] = field(default_factory=list)
    stopped: bool = False


class _StopWhenSet(StoppingCriteria):
    """Ends text generation between tokens once `event` is set."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
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


@torch.no_grad()
def chat(
    model: "TokenFlowMLLM",
    messages: Sequence[dict],
    processor: "TokenFlowProcessor | None" = None,
    *,
    max_new_tokens: int = 128,
    max_images: int = 1,
    image_settings: dict[str, Any] | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    streamer=None,
    draw: bool | None = None,
    stop: threading.Event | None = None,
    **generate_kwargs: Any,
) -> ChatReply:
    """Continue a conversation by one assistant turn, drawing an image whenever the model emits `<boi>`.

    Args:
        model: a TokenFlowMLLM.
        messages: the conversation so far (see `TokenFlowProcessor.encode_conversation` for content items); the last
            message must be the user's.
        processor: default `model.processor`.
        max_new_tokens: text-token budget of the turn (drawn-image spans do not count).
        max_images: images the turn may draw (0 or 1); a further `<boi>` ends the turn.
        image_settings: keyword arguments of `draw_indices` (cfg_scale, cfg_schedule, top_k, top_p, temperature,
            num_scales, use_cache, callback).
        seed / generator: randomness of the drawings (one of them; a fresh seed when neither is given).
        streamer: a transformers streamer for the text parts.
        draw: None: the model decides (it emits `<boi>`); True: the turn opens with `<boi>` and draws at once;
            False: text only (a `<boi>` ends the turn).
        stop: when set (from another thread) the turn ends between text tokens or drawing scales, without the
            unfinished drawing; the reply then has `stopped=True`.
        generate_kwargs: passed to `model.generate` for the text (do_sample, temperature, top_p, ...).
    """
    processor = processor if processor is not None else model.processor
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
        raise ValueError(f"draw must be None (the model decides), True or False, got {draw!r}")
    max_images = 0 if draw is False else max_images
    if draw and max_images == 0:
        raise ValueError("draw=True needs max_images=1")
    image_settings = dict(image_settings or {})
    validate_sampling_args(**{key: image_settings[key] for key in ("temperature", "top_k", "top_p", "cfg_scale")
                              if key in image_settings})
    generator, seed = seeded_generator(seed, generator, model.device)

    history = _history_messages(messages)
    encoded = processor.encode_conversation(history, add_generation_prompt=True)
    image_features = understanding_features(model, encoded["understanding_images"])
    ids = encoded["input_ids"].unsqueeze(0).to(model.device)
    end_ids = [processor.tokenizer.eos_token_id, processor.tokenizer.convert_tokens_to_ids("<|im_end|>")]
    end_ids = sorted({i for i in end_ids if i is not None and i != processor.tokenizer.unk_token_id})
    boi, eoi, slot = processor.boi_token_id, processor.eoi_token_id, processor.image_token_id

    content: list[dict] = []
    texts: list[str] = []
    drawn: list[torch.Tensor] = []
    images: list[Image.Image] = []
    budget = max_new_tokens
    stopping = StoppingCriteriaList([_StopWhenSet(stop)] if stop is not None else [])
    while budget > 0 and not (stop is not None and stop.is_set()):
        if draw and not drawn:
            new = torch.tensor([boi], device=ids.device)  # the turn opens with <boi>
        else:
            generation_indices = torch.stack(drawn).to(model.device) if drawn else None
            output = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), image_features=image_features,
                generation_indices=generation_indices, max_new_tokens=budget, eos_token_id=end_ids + [boi],
                pad_token_id=processor.tokenizer.pad_token_id, streamer=streamer, stopping_criteria=stopping,
                suppress_tokens=[slot, eoi], **generate_kwargs)  # image slots and <eoi> only come with a drawing
            new = output[0, ids.shape[1]:]
            budget -= new.shape[0]
        stopped_at_boi = new.shape[0] > 0 and int(new[-1]) == boi
        text_ids = new[:-1] if new.shape[0] and int(new[-1]) in end_ids + [boi] else new
        text = processor.decode(text_ids, skip_special_tokens=True)
        if text:
            texts.append(text)
            content.append({"type": "text", "text": text})
        if not stopped_at_boi or len(drawn) >= max_images:
            break
        prompt = torch.cat([ids, new.unsqueeze(0)], dim=1)
        indices = _draw(model, processor, prompt, image_features, generator, {**image_settings, "stop": stop})
        if stop is not None and stop.is_set():
            break  # stopped between scales: the unfinished drawing is left out
        image = model.decode_images(indices)[0]
        image.info.update({"prompt": json.dumps(messages[-1]["content"] if isinstance(messages[-1]["content"], str)
                                                else _text_of(messages[-1]["content"])),
                           "seed": str(seed), "settings": json.dumps(
                               {k: v for k, v in image_settings.items() if k != "callback"}, sort_keys=True)})
        drawn.append(indices[0])
        images.append(image)
        content.append({"type": "image", "image": image, "indices": indices[0].cpu(), "in_history": True})
        span = torch.tensor([[slot] * processor.num_image_codes + [eoi]], device=ids.device)
        ids = torch.cat([prompt, span], dim=1)

    reply = {"role": "assistant", "content": content}
    return ChatReply(messages=list(messages) + [reply], text="".join(texts), images=images,
                     indices=[d.cpu() for d in drawn], stopped=stop is not None and stop.is_set())


def _text_of(content: Sequence[dict]) -> str:
    return " ".join(item["text"] for item in content if item.get("type") == "text")


def _draw(model, processor, prompt, image_features, generator, settings) -> torch.Tensor:
    """Draw the span `prompt` [1, L] (ending in its only `<boi>`) opens, with CFG against the empty prompt;
    returns indices [1, N]."""
    settings = dict(settings)
    cfg_scale = settings.get("cfg_scale", 7.5)
    rows = [prompt[0].tolist()]
    if cfg_scale > 0:
        rows.append(processor.drawing_prompt_ids(None))
    input_ids, attention_mask = processor.pad_sequences(rows, padding_side="left")
    return model.draw_indices(input_ids.to(model.device), attention_mask.to(model.device), 1,
                              image_features=image_features, generator=generator, **settings)


__all__ = ["ChatReply", "chat", "understanding_features"]
