"""TokenFlowProcessor: text tokenizer + TokenFlow image processor + chat template, and the training-side
conversation encoder and padding collator.

Token layout (see `llm.modeling_tokenflow_mllm` for what the model does with it)::

    understood image   <image>                 → S² copies of <image>             (labels -100)
    drawn image        <boi><eoi>              → <boi> + N copies of <image> + <eoi>  (N = Σs²; slot labels -100,
                                                  <boi> and <eoi> supervised like the rest of the assistant turn)

Chat templates (stored in the text tokenizer, `tokenizer.chat_template`) render a conversation to text in which each
image item is `<image>` (user / system turns: an image the model looks at) or `<boi><eoi>` (assistant turns: an image
the model draws); the processor then expands those into slots. An assistant image marked `"in_history": True` is an
image the model drew in an earlier turn: it is rendered as `<image>` and looked at (its features rebuilt from its
indices, no pixel re-encoding), which is how `llm.chat` keeps drawn images in the conversation so later turns can
refer to them. Two templates ship:

- `CHATML_TEMPLATE` (default; Qwen-style)::

      <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n
      <|im_start|>user\\n{user content}<|im_end|>\\n
      <|im_start|>assistant\\n{assistant content}<|im_end|>\\n

- `VICUNA_TEMPLATE` (LLaVA-v1, for Llama-style backbones)::

      <s>{system} USER: {user content} ASSISTANT: {assistant content}</s> USER: ...

  The prompt for an answer ends in "ASSISTANT:" and the answer's first token carries the space (as in LLaVA-v1).

Only assistant content and the token that closes the turn (`<|im_end|>` / `</s>`) are supervised; the system and user
turns and the turn headers get -100.

Drawing prompt (what `generate_image` feeds the model and what text-to-image training data looks like): the
conversation ``[user: <prompt text>, assistant: <drawn image>]`` rendered by the template and cut right after
``<boi>``. With ChatML and prompt "a red circle"::

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\na red circle<|im_end|>\\n
    <|im_start|>assistant\\n<boi>

The unconditional prompt of classifier-free guidance is the same with an empty user text.

Reserved tokens in user text: message text must not contain the tokenizer's special tokens (`<boi>`, `<eoi>`,
`<|im_start|>`, ...) — they would silently become control ids. The processor raises `ValueError` instead of escaping
them. `<image>` is the one exception: inside string content it is the LLaVA-style placeholder of the next image.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from transformers import BatchFeature
from transformers.processing_utils import ProcessorMixin

from tokenizer.image_processing_tokenflow import TokenFlowImageProcessor

from .configuration_tokenflow_mllm import IGNORE_INDEX, IMAGE_PLACEMENTS

IMAGE_TOKEN, BOI_TOKEN, EOI_TOKEN = "<image>", "<boi>", "<eoi>"
IMAGE_SPECIAL_TOKENS = (IMAGE_TOKEN, BOI_TOKEN, EOI_TOKEN)

# Item rendering shared by both templates: text as is, images as <image> (looked at) or <boi><eoi> (drawn).
_RENDER_CONTENT = (
    "{%- macro render(message) -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'text' -%}{{ item['text'] }}"
    "{%- elif message['role'] == 'assistant' and not item['in_history'] -%}<boi><eoi>"
    "{%- else -%}<image>{{ '\\n' }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
)

CHATML_TEMPLATE = _RENDER_CONTENT + (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{ render(message) }}{{ '<|im_end|>' }}{%- endgeneration -%}{{ '\\n' }}"
    "{%- else -%}{{ render(message) }}{{ '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

VICUNA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the human's questions.")
VICUNA_TEMPLATE = _RENDER_CONTENT + (
    "{{ bos_token }}"
    "{%- if messages and messages[0]['role'] == 'system' -%}{{ render(messages[0]) }}"
    "{%- else -%}{{ '" + VICUNA_SYSTEM.replace("'", "\\'") + "' }}{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{ ' USER: ' }}{{ render(message) }}"
    "{%- elif message['role'] == 'assistant' -%}{{ ' ASSISTANT:' }}"
    "{%- generation -%}{{ ' ' }}{{ render(message) }}{{ eos_token }}{%- endgeneration -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ ' ASSISTANT:' }}{%- endif -%}"
)

CHAT_TEMPLATES = {"chatml": CHATML_TEMPLATE, "vicuna": VICUNA_TEMPLATE}
ROLES = ("system", "user", "assistant")


def add_image_special_tokens(tokenizer) -> dict[str, int]:
    """Give a text tokenizer `<image>`, `<boi>`, `<eoi>` (and a pad token if it has none); returns their ids.

    The backbone's embeddings must then cover `len(tokenizer)` rows (`resize_token_embeddings`).
    """
    missing = [t for t in IMAGE_SPECIAL_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
    return {"image_token_id": tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
            "boi_token_id": tokenizer.convert_tokens_to_ids(BOI_TOKEN),
            "eoi_token_id": tokenizer.convert_tokens_to_ids(EOI_TOKEN),
            "pad_token_id": tokenizer.pad_token_id}


def user_content(text: str, images: Sequence[Any] = (None,), placement: str = "before_text") -> list[dict]:
    """The content items of a user turn that shows `images` (one item each: an image, an image item dict kept as it
    is, or None = an image given to the processor separately) and says `text`: the images first (`"before_text"`,
    LLaVA's ``<image>\n{text}``) or after the text on a line of their own (`"after_text"`, ``{text}\n<image>\n``).
    Empty `text` gives the images alone."""
    if placement not in IMAGE_PLACEMENTS:
        raise ValueError(f"image placement {placement!r}; allowed: {IMAGE_PLACEMENTS}")
    shown = [{"type": "image"} if image is None else image if isinstance(image, dict) and image.get("type") == "image"
             else {"type": "image", "image": image} for image in images]
    if not text:
        return shown
    if placement == "before_text":
        return [*shown, {"type": "text", "text": text}]
    return [{"type": "text", "text": text + "\n" if shown else text}, *shown]


class TokenFlowProcessor(ProcessorMixin):
    r"""Processor of [`TokenFlowMLLM`]: a text tokenizer holding the chat template and the image special tokens, and
    the TokenFlow image processor.

    Image pipelines: every image the processor reads (an image the model looks at, or a drawn-image target given as
    pixels) goes through `image_processor`, whose `resize_mode` fits it to the tokenizer's square input: `"pad"` (pad
    to a square with (127, 127, 127), then bicubic resize; converted reference understanding models, as the reference
    runs them), `"resize"` (bicubic stretch; the siglip-384 and tiny tokenizer presets) or `"center_crop"` (the ADM
    crop; the clipb-256 preset and the reference text-to-image data). `from_model_config` takes the model config's
    `image_resize_mode`, else the tokenizer's own. Drawn images come out of the tokenizer's decoder at its size.

    Args:
        image_processor: a `TokenFlowImageProcessor`.
        tokenizer: a fast text tokenizer containing `<image>`, `<boi>`, `<eoi>` (see `add_image_special_tokens`).
        scales: the image tokenizer's scales; they fix S² (slots per understood image) and N = Σs² (per drawn image).
        image_placement: where `user_content` puts the images of a user turn relative to its text (the model config's
            `image_placement`, which `from_model_config` passes on).
    """

    def __init__(self, image_processor=None, tokenizer=None, scales: Sequence[int] | None = None,
                 image_placement: str = "before_text", **kwargs):
        if scales is None or not len(scales):
            raise ValueError("scales (the image tokenizer's scale sides, e.g. [1, 2, 3, 4, 6, 8]) are required")
        if image_placement not in IMAGE_PLACEMENTS:
            raise ValueError(f"image_placement={image_placement!r}; allowed: {IMAGE_PLACEMENTS}")
        self.scales = [int(s) for s in scales]
        self.image_placement = image_placement
        super().__init__(image_processor, tokenizer, **kwargs)
        missing = [t for t in IMAGE_SPECIAL_TOKENS if t not in tokenizer.get_vocab()]
        if missing:
            raise ValueError(f"the text tokenizer lacks the image tokens {missing}; call add_image_special_tokens")
        if not tokenizer.is_fast:
            raise ValueError("TokenFlowProcessor needs a fast tokenizer (labels use its offset mapping)")

    @classmethod
    def from_model_config(cls, config, tokenizer) -> "TokenFlowProcessor":
        """The processor of a `TokenFlowMLLMConfig`: its tokenizer's image processor (resize mode
        `config.image_resize_mode` when set) and the fast text `tokenizer`."""
        image_processor = TokenFlowImageProcessor.from_tokenizer_config(config.tokenizer_config)
        if config.image_resize_mode is not None:
            image_processor.resize_mode = config.image_resize_mode
        return cls(image_processor, tokenizer, scales=config.tokenizer_config.scales,
                   image_placement=config.image_placement)

    def user_content(self, text: str, images: Sequence[Any] = (None,)) -> list[dict]:
        """Content items of a user turn showing `images` with `text`, laid out as the model was trained
        (`image_placement`; see the module function `user_content`)."""
        return user_content(text, images, self.image_placement)

    # ------------------------------------------------------------------ ids and sizes
    @property
    def turn_end_ids(self) -> list[int]:
        """Ids that end an assistant turn: EOS and `<|im_end|>` where the vocabulary has it."""
        tokenizer = self.tokenizer
        ids = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
        return sorted({i for i in ids if i is not None and i != tokenizer.unk_token_id})

    @property
    def num_image_slots(self) -> int:
        """S², slots per understood image."""
        return self.scales[-1] ** 2

    @property
    def num_image_codes(self) -> int:
        """N = Σs², slots per drawn image (the span holds <boi>, N slots, <eoi>)."""
        return sum(s * s for s in self.scales)

    @property
    def image_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    @property
    def boi_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(BOI_TOKEN)

    @property
    def eoi_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(EOI_TOKEN)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values"]

    # ------------------------------------------------------------------ checks
    def _reserved_tokens(self) -> list[str]:
        tokens = set(self.tokenizer.all_special_tokens) | {
            t.content for t in self.tokenizer.added_tokens_decoder.values() if t.special}
        return sorted(tokens - {IMAGE_TOKEN}, key=len, reverse=True)

    def check_user_text(self, text: str, allow_image_placeholder: bool = True) -> None:
        """Raise ValueError if `text` (message content) contains a special token other than the `<image>`
        placeholder (or any at all when `allow_image_placeholder` is False)."""
        if not isinstance(text, str):
            raise TypeError(f"message text must be a str, got {type(text).__name__}")
        reserved = self._reserved_tokens() + ([] if allow_image_placeholder else [IMAGE_TOKEN])
        found = [t for t in reserved if t in text]
        if found:
            raise ValueError(
                f"message text contains the reserved token(s) {found}: {text!r}; special tokens cannot be typed in "
                "messages (images are content items {'type': 'image', ...}, drawn images come from the model)")

    # ------------------------------------------------------------------ slots
    def _expand(self, ids: Sequence[int], labels: Sequence[int] | None = None) -> tuple[list[int], list[int]]:
        """<image> → S² slots; <boi><eoi> → <boi>, N slots, <eoi>. Slots get label -100."""
        labels = list(ids) if labels is None else list(labels)
        image_id, boi_id, eoi_id = self.image_token_id, self.boi_token_id, self.eoi_token_id
        out_ids, out_labels = [], []
        for position, (token, label) in enumerate(zip(ids, labels)):
            if token == image_id:
                out_ids += [image_id] * self.num_image_slots
                out_labels += [IGNORE_INDEX] * self.num_image_slots
                continue
            if token == eoi_id:
                if position == 0 or ids[position - 1] != boi_id:
                    raise ValueError("<eoi> must directly follow <boi> in rendered text (the processor fills the span)")
                out_ids += [image_id] * self.num_image_codes
                out_labels += [IGNORE_INDEX] * self.num_image_codes
            out_ids.append(token)
            out_labels.append(label)
        return out_ids, out_labels

    # ------------------------------------------------------------------ plain call
    def __call__(
        self,
        text: str | Sequence[str] | None = None,
        images: Any = None,
        return_tensors: str | None = "pt",
        padding_side: str | None = None,
        **kwargs: Any,
    ) -> BatchFeature:
        """Tokenize already-templated prompts and expand each `<image>` into the S² slots of the next image.

        Args:
            text: one prompt or a batch rendered by `apply_chat_template(..., add_generation_prompt=True)`; it is
                tokenized without adding special tokens (the template writes BOS where the backbone wants one), so the
                ids equal those of `encode_conversation` for the same messages.
            images: the images of the `<image>` placeholders in reading order over the batch (a flat list, or one list
                per prompt); anything `TokenFlowImageProcessor` reads (paths, PIL, numpy), or drawn images as index
                tensors [N] (looked at through `image_features_from_indices`, no pixel re-encoding).
            padding_side: "left" (default of the tokenizer, right for generation) or "right".

        Returns:
            `BatchFeature` with `input_ids` [B, L], `attention_mask` [B, L] and, with images, `pixel_values`
            [N_img, 3, H, W] (or `image_indices` [N_img, N] for index tensors).
        """
        if kwargs:
            raise TypeError(f"unexpected arguments {sorted(kwargs)}; TokenFlowProcessor takes text, images, "
                            "return_tensors and padding_side")
        if return_tensors not in ("pt", None):
            raise ValueError(f"return_tensors={return_tensors!r}; only 'pt' is supported")
        if text is None and images is None:
            raise ValueError("pass text, images or both")
        flat_images = _flatten_images(images)
        data: dict[str, Any] = {}
        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            if not texts or not all(isinstance(t, str) for t in texts):
                raise ValueError(f"text must be a string or a non-empty list of strings, got {text!r}")
            for t in texts:
                for token in (BOI_TOKEN, EOI_TOKEN):
                    if token in t:
                        raise ValueError(
                            f"text contains {token!r}: drawn-image spans need their indices; encode conversations "
                            "with drawn images through encode_conversation")
            counts = [t.count(IMAGE_TOKEN) for t in texts]
            if isinstance(images, (list, tuple)) and images and all(isinstance(x, (list, tuple)) for x in images):
                per_sample = [len(x) for x in images]
                if per_sample != counts:
                    raise ValueError(f"the prompts hold {counts} <image> placeholders but {per_sample} images were "
                                     "given per prompt")
            if sum(counts) != len(flat_images):
                raise ValueError(
                    f"the text holds {sum(counts)} <image> placeholders but {len(flat_images)} images were given; "
                    "give exactly one image per <image>")
            # The chat template writes any BOS itself (and `apply_chat_template` tokenizes without special tokens), so
            # a tokenizer whose post-processor adds BOS must not add a second one here.
            rows = [self._expand(self._token_ids(t))[0] for t in texts]
            data["input_ids"], data["attention_mask"] = self.pad_sequences(
                rows, padding_side=padding_side or self.tokenizer.padding_side)
        drawn = ["indices" in _as_image_item(x) for x in flat_images]
        if any(drawn) and not all(drawn):
            raise ValueError("images mixes pixel images and index tensors; pass one kind per call (or compute "
                             "image_features with the model)")
        if flat_images and all(drawn):
            data["image_indices"] = torch.stack([self._image_item({"indices": x})[1] for x in flat_images])
        elif flat_images:
            data["pixel_values"] = self.image_processor(flat_images, return_tensors="pt")["pixel_values"]
        return BatchFeature(data=data, tensor_type=None)

    def pad_sequences(
        self, rows: Sequence[Sequence[int]], padding_side: str = "left", pad_value: int | None = None
    ) -> tuple[torch.LongTensor, torch.LongTensor]:
        """Lists of ids → (padded ids [B, L], attention mask [B, L]); pads with the tokenizer's pad id."""
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side={padding_side!r}; allowed: 'left', 'right'")
        pad_value = self.tokenizer.pad_token_id if pad_value is None else pad_value
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), pad_value, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            span = slice(length - len(row), length) if padding_side == "left" else slice(0, len(row))
            ids[i, span] = torch.tensor(list(row), dtype=torch.long)
            mask[i, span] = 1
        return ids, mask

    # ------------------------------------------------------------------ chat template
    def check_messages(self, messages: Sequence[dict]) -> None:
        """Validate a conversation: roles, content types, and no reserved tokens in text (see module docstring)."""
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError(f"messages must be a non-empty list of {{'role', 'content'}} dicts, got {messages!r}")
        for number, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in ROLES or "content" not in message:
                raise ValueError(f"message {number} must be a dict with role in {ROLES} and content, got {message!r}")
            content = message["content"]
            if isinstance(content, str):
                self.check_user_text(content, allow_image_placeholder=message["role"] != "assistant")
                continue
            if not isinstance(content, (list, tuple)):
                raise ValueError(f"message {number} content must be a str or a list of items, got {content!r}")
            for item in content:
                kind = item.get("type") if isinstance(item, dict) else None
                if kind == "text":
                    self.check_user_text(item.get("text"), allow_image_placeholder=False)
                elif kind != "image":
                    raise ValueError(f"message {number} has an item {item!r}; items are {{'type': 'text', 'text': "
                                     "...} or {'type': 'image', 'image' | 'indices': ...}")

    def apply_chat_template(self, conversation: Sequence[dict], add_generation_prompt: bool = False,
                            **kwargs: Any) -> str:
        """Render a conversation with the text tokenizer's chat template (text only; see module docstring)."""
        self.check_messages(conversation)
        kwargs.setdefault("tokenize", False)
        return self.tokenizer.apply_chat_template(
            list(conversation), add_generation_prompt=add_generation_prompt, **kwargs)

    def drawing_prompt(self, prompt: str | None) -> str:
        """The text of the drawing prompt for `prompt` (None or "" = the unconditional prompt), ending in `<boi>`."""
        prompt = "" if prompt is None else prompt
        self.check_user_text(prompt, allow_image_placeholder=False)
        rendered = self.apply_chat_template(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": [{"type": "image"}]}])
        return rendered[: rendered.index(BOI_TOKEN) + len(BOI_TOKEN)]

    def drawing_prompt_ids(self, prompt: str | None) -> list[int]:
        """Token ids of `drawing_prompt(prompt)`; the last id is `<boi>`."""
        return self._token_ids(self.drawing_prompt(prompt))

    def drawing_batch(self, prompts: Sequence[str | Sequence[int]], guidance: bool = True) -> BatchFeature:
        """The batch `TokenFlowMLLM.draw_indices` draws from: one conditional row per prompt, then (with `guidance`)
        as many unconditional rows, the drawing prompt of the empty text, all left-padded.

        Args:
            prompts: drawing prompt texts (rendered by `drawing_prompt`), or token ids that already end in their
                only `<boi>` (e.g. a conversation whose assistant turn opens an image).
            guidance: add the unconditional rows classifier-free guidance compares against.

        Returns:
            `BatchFeature` with `input_ids` and `attention_mask` [R, L], R = len(prompts) (× 2 with guidance).
        """
        if isinstance(prompts, str) or not prompts:
            raise ValueError(f"prompts must be a non-empty list of texts or id lists, got {prompts!r}")
        rows = [self.drawing_prompt_ids(p) if isinstance(p, str) else [int(i) for i in p] for p in prompts]
        if guidance:
            rows += [self.drawing_prompt_ids(None)] * len(prompts)
        input_ids, attention_mask = self.pad_sequences(rows, padding_side="left")
        return BatchFeature(data={"input_ids": input_ids, "attention_mask": attention_mask})

    def _token_ids(self, rendered: str) -> list[int]:
        """Ids of template-rendered text, tokenized as `apply_chat_template` does (no special tokens added)."""
        return self.tokenizer(rendered, add_special_tokens=False)["input_ids"]

    # ------------------------------------------------------------------ training encoder
    def encode_conversation(
        self, messages: Sequence[dict], images: Sequence[Any] | None = None, add_generation_prompt: bool = False
    ) -> dict[str, Any]:
        """One conversation → model inputs with labels (the format the training scripts consume).

        Content items:
            `{"type": "text", "text": str}`;
            `{"type": "image", "image": <path | PIL | array>}` or `{"type": "image", "indices": LongTensor [N]}`:
                in a user/system turn an image the model looks at (pixels, or a drawn image fed from its indices
                without re-encoding); in an assistant turn an image the model draws (its target indices, or its
                pixels for the frozen tokenizer to encode), unless marked `"in_history": True` (drawn earlier, now
                looked at). When both `indices` and `image` are given the indices are used.
                A looked-at image may carry `"slot_labels"`: LongTensor [R, S²] per-slot targets for a model with a
                `slot_head` (`config.slot_label_classes`).
            String content may hold `<image>` placeholders filled from `images` in order (LLaVA data; integer tensors
                in `images` are indices).
        add_generation_prompt: end with an opened assistant turn (a prompt for the model to answer).

        Returns:
            dict with 1-D `input_ids`, `attention_mask`, `labels` [L] (assistant tokens incl. `<boi>`/`<eoi>`
            supervised, slots -100), `understanding_images` and `drawn_images`: lists of `("pixels", [3, H, W])` or
            `("indices", [N])` in reading order, and `understanding_slot_labels` ([R, S²] or None per looked-at
            image). `collate` batches them.
        """
        self.check_messages(messages)
        images = list(images or [])
        placeholders = sum(m["content"].count(IMAGE_TOKEN) for m in messages if isinstance(m["content"], str))
        if placeholders != len(images):
            raise ValueError(f"the messages hold {placeholders} <image> placeholders but {len(images)} images were "
                             "given; give exactly one image per <image>")
        understanding, drawn, slot_labels = [], [], []
        pending = iter(images)
        for message in messages:
            content = message["content"]
            if isinstance(content, str):
                for _ in range(content.count(IMAGE_TOKEN)):
                    understanding.append(self._image_item(_as_image_item(next(pending))))
                    slot_labels.append(None)
                continue
            for item in content:
                if item["type"] != "image":
                    continue
                if message["role"] == "assistant" and not item.get("in_history", False):
                    drawn.append(self._image_item(item))
                else:
                    understanding.append(self._image_item(item))
                    slot_labels.append(self._slot_labels(item))

        encoded = self.tokenizer.apply_chat_template(
            list(messages), add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=True,
            return_assistant_tokens_mask=True)
        ids = list(encoded["input_ids"])
        labels = [t if m else IGNORE_INDEX for t, m in zip(ids, encoded["assistant_masks"])]
        ids, labels = self._expand(ids, labels)
        return {"input_ids": torch.tensor(ids), "attention_mask": torch.ones(len(ids), dtype=torch.long),
                "labels": torch.tensor(labels), "understanding_images": understanding, "drawn_images": drawn,
                "understanding_slot_labels": slot_labels}

    def _slot_labels(self, item: dict) -> torch.Tensor | None:
        if item.get("slot_labels") is None:
            return None
        labels = torch.as_tensor(item["slot_labels"])
        if labels.ndim != 2 or labels.shape[1] != self.num_image_slots or labels.is_floating_point():
            raise ValueError(f"an image item's slot_labels must be integer [R, {self.num_image_slots}] (a row of "
                             f"labels per slot), got {labels.dtype} {tuple(labels.shape)}")
        return labels.long()

    def _image_item(self, item: dict) -> tuple[str, torch.Tensor]:
        if "image" not in item and "indices" not in item:
            raise ValueError(f"an image item needs 'image' (pixels) or 'indices', got keys {sorted(item)}")
        if "indices" in item:
            indices = torch.as_tensor(item["indices"])
            if indices.ndim == 2 and indices.shape[0] == 1:
                indices = indices[0]
            if indices.ndim != 1 or indices.shape[0] != self.num_image_codes:
                raise ValueError(f"image indices must have shape [{self.num_image_codes}] (all scales), got "
                                 f"{tuple(indices.shape)}")
            return "indices", indices.long()
        return "pixels", self.image_processor(item["image"], return_tensors="pt")["pixel_values"][0]

    def collate(self, examples: Sequence[dict[str, Any]], padding_side: str = "right") -> dict[str, torch.Tensor]:
        """Pad encoded conversations into a batch for `TokenFlowMLLM.forward`.

        Returns:
            `input_ids`, `attention_mask`, `labels` [B, L] (padding labelled -100), and as present:
            `pixel_values` [N_img, 3, H, W] or `image_indices` [N_img, N] for the understood images (a batch must use
            one kind; mix them by passing `image_features` computed with the model), and `generation_indices`
            [M, N] or `generation_pixel_values` [M, 3, H, W] for the drawn images, and `slot_labels` [N_img, R, S²]
            when some looked-at image carries them (-100 for those that do not).
        """
        if not examples:
            raise ValueError("no examples to collate")
        input_ids, attention_mask = self.pad_sequences([e["input_ids"].tolist() for e in examples], padding_side)
        labels, _ = self.pad_sequences([e["labels"].tolist() for e in examples], padding_side, IGNORE_INDEX)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        for key, by_kind in (("understanding_images", {"pixels": "pixel_values", "indices": "image_indices"}),
                             ("drawn_images", {"pixels": "generation_pixel_values", "indices": "generation_indices"})):
            items = [item for e in examples for item in e[key]]
            kinds = {kind for kind, _ in items}
            if len(kinds) > 1:
                raise ValueError(f"a batch mixes {key} given as pixels and as indices; convert them to one kind "
                                 "(or pass image_features computed with the model)")
            if items:
                batch[by_kind[kinds.pop()]] = torch.stack([value for _, value in items])
        slot_labels = [labels for e in examples for labels in e.get("understanding_slot_labels", ())]
        shapes = {tuple(labels.shape) for labels in slot_labels if labels is not None}
        if len(shapes) > 1:
            raise ValueError(f"the looked-at images of a batch carry slot_labels of different shapes {sorted(shapes)}")
        if shapes:
            shape = shapes.pop()
            batch["slot_labels"] = torch.stack([torch.full(shape, IGNORE_INDEX) if labels is None else labels
                                                for labels in slot_labels])
        return batch

    # ------------------------------------------------------------------ decoding
    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)


def _as_image_item(image: Any) -> dict[str, Any]:
    """An image given by itself → an image item: integer tensors are drawn-image indices, anything else pixels."""
    if isinstance(image, torch.Tensor) and not image.is_floating_point():
        return {"indices": image}
    return {"image": image}


def _flatten_images(images: Any) -> list[Any]:
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        flat = []
        for image in images:
            flat += list(image) if isinstance(image, (list, tuple)) else [image]
        return flat
    return [images]


__all__ = [
    "BOI_TOKEN", "CHATML_TEMPLATE", "CHAT_TEMPLATES", "EOI_TOKEN", "IGNORE_INDEX", "IMAGE_SPECIAL_TOKENS",
    "IMAGE_TOKEN", "TokenFlowProcessor", "VICUNA_TEMPLATE", "add_image_special_tokens", "user_content",
]
