"""TokenFlowMLLM as an lmms-eval model (`--model tokenflow_mllm`).

Request interface (lmms-eval's simple models): each `Instance.args` of a `generate_until` request is
``(context, gen_kwargs, doc_to_visual, doc_id, task, split)``; the images are
``doc_to_visual(self.task_dict[task][split][doc_id])`` (lmms-eval fills `task_dict` before asking). The context is
put in one user turn of the checkpoint's chat template, after one ``<image>`` per image when the context has none
(as lmms-eval's LLaVA models do); greedy decoding unless `gen_kwargs` set a temperature > 0; the reply is cut at the
first of the `until` strings. Requests are batched in order, `batch_size` at a time, among neighbours with equal
`gen_kwargs`.

`loglikelihood` (used by lmms-eval's perplexity-style multiple-choice tasks) and multi-round generation raise
NotImplementedError: use the generation variants of those tasks.

When lmms-eval's model base class cannot be imported (lmms-eval not installed, or installed without its
dependencies, as in this project's test environment) the class derives from `LMMSStandIn` below, which provides
the same attributes (`rank`, `world_size`, `task_dict`, `cache_hook`, `create_from_arg_string`); the tests drive it
with lmms-eval's own `Instance` objects where that module imports, and with an equivalent stand-in otherwise.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from PIL import Image

from eval.vqa import generate_answers, load_model


class _NoCacheHook:
    def add_partial(self, attr: str, request: Any, result: Any) -> None:
        return None


class LMMSStandIn:
    """The part of `lmms_eval.api.model.lmms` a simple model relies on, for use without lmms-eval."""

    is_simple = True

    def __init__(self) -> None:
        self._rank = 0
        self._world_size = 1
        self.cache_hook = _NoCacheHook()
        self.task_dict: dict = {}

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """`"pretrained=DIR,dtype=bfloat16"` (+ lmms-eval's batch_size/device config) → an instance."""
        args = {}
        for item in filter(None, (part.strip() for part in arg_string.split(","))):
            if "=" not in item:
                raise ValueError(f"model argument {item!r} is not key=value (in {arg_string!r})")
            key, value = item.split("=", 1)
            args[key.strip()] = value.strip()
        args.update({k: v for k, v in (additional_config or {}).items() if v is not None})
        return cls(**args)


try:
    from lmms_eval.api.model import lmms as _LMMSBase
except ImportError:  # lmms-eval or one of its dependencies is missing: the plugin still works on its own
    _LMMSBase = LMMSStandIn


class TokenFlowMLLMForLMMSEval(_LMMSBase):
    """lmms-eval model wrapping a TokenFlowMLLM checkpoint folder.

    Args (lmms-eval `--model_args` strings are accepted):
        pretrained: the checkpoint folder.
        device: torch device (default cuda when available).
        dtype: float32 / bfloat16 / float16 for the LLM (the image tokenizer stays fp32).
        batch_size: requests per `generate` call.
        max_new_tokens: default reply budget when a task's gen_kwargs do not set one.
        max_batch_size: accepted (lmms-eval passes it) and ignored.
    """

    def __init__(self, pretrained: str, device: str | None = None, dtype: str = "float32", batch_size: int | str = 1,
                 max_new_tokens: int | str = 128, max_batch_size: Any = None, **unexpected: Any) -> None:
        super().__init__()
        if unexpected:
            raise TypeError(f"unknown model arguments {sorted(unexpected)}; allowed: pretrained, device, dtype, "
                            "batch_size, max_new_tokens")
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size}, {max_new_tokens}")
        self.model, self.processor = load_model(pretrained, self.device, dtype)

    # ------------------------------------------------------------------ lmms-eval interface
    def generate_until(self, requests) -> list[str]:
        replies: list[str | None] = [None] * len(requests)
        prepared = [self._prepare(request) for request in requests]
        start = 0
        while start < len(prepared):
            # Neighbours with the same generation settings share a batch; order is kept.
            key = prepared[start][2]
            stop = start
            while stop < len(prepared) and stop - start < self.batch_size and prepared[stop][2] == key:
                stop += 1
            chunk = prepared[start:stop]
            settings = json.loads(key)
            until = settings.pop("until")
            texts = generate_answers(
                self.model, self.processor, [c[0] for c in chunk], [c[1] for c in chunk], batch_size=len(chunk),
                desc=f"lmms-eval {start + 1}-{stop}/{len(prepared)}", **settings)
            for offset, text in enumerate(texts):
                for marker in until:
                    if marker and marker in text:
                        text = text[: text.index(marker)]
                replies[start + offset] = text
                self.cache_hook.add_partial("generate_until", requests[start + offset].args[:2], text)
            start = stop
        return replies

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        raise NotImplementedError("tokenflow_mllm does not score loglikelihood requests; run the generation variant "
                                  "of the task (generate_until)")

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("tokenflow_mllm does not support multi-round generation requests")

    # ------------------------------------------------------------------ helpers
    def _prepare(self, request) -> tuple[str, list[Image.Image], str]:
        """(chat-template prompt, its images, generation settings as a JSON key) of one generate_until request."""
        context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
        visuals = [v for v in (visuals or []) if v is not None]
        for visual in visuals:
            if not isinstance(visual, Image.Image):
                raise NotImplementedError(f"tokenflow_mllm reads images only; task {task!r} gave a "
                                          f"{type(visual).__name__} ({visual!r:.80})")
        # A task's own <image> placeholders stay where it put them; otherwise the model's layout places the images.
        content = context if "<image>" in context else self.processor.user_content(context, [None] * len(visuals))
        prompt = self.processor.apply_chat_template([{"role": "user", "content": content}],
                                                    add_generation_prompt=True)
        return prompt, [v.convert("RGB") for v in visuals], json.dumps(self._settings(gen_kwargs), sort_keys=True)

    def _settings(self, gen_kwargs: dict) -> dict:
        gen_kwargs = dict(gen_kwargs or {})
        until = gen_kwargs.pop("until", [])
        until = [until] if isinstance(until, str) else list(until)
        temperature = float(gen_kwargs.pop("temperature", 0) or 0)
        top_p = gen_kwargs.pop("top_p", None)
        num_beams = int(gen_kwargs.pop("num_beams", 1) or 1)
        settings = {"until": until, "max_new_tokens": int(gen_kwargs.pop("max_new_tokens", self.max_new_tokens)),
                    "do_sample": temperature > 0, "num_beams": num_beams}
        if temperature > 0:
            settings["temperature"] = temperature
            if top_p is not None:
                settings["top_p"] = float(top_p)
        # Other task keys (image_aspect_ratio, ...) concern other models' preprocessing and have no meaning here.
        return settings


__all__ = ["LMMSStandIn", "TokenFlowMLLMForLMMSEval"]
