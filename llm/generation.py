"""Drawing images with a TokenFlowMLLM: next-scale sampling with a KV cache, batched classifier-free guidance,
top-k / top-p / temperature, seeds, progressive previews, PNG metadata.

One drawing, ``L`` scales, ``R`` rows (``C`` conditional rows, then ``C`` unconditional rows when guided)::

    prompt forward (rows end in <boi>)         → image logits at <boi>            → scale 0 (1 code)
    for k = 1 .. n-1:
        block_k = next-scale input of the codes so far  [R, s_k², 40]
        one forward over its s_k² positions against the KV cache (they see the whole cache and each other)
                                                  → image logits [R, s_k², K]     → scale k
    per scale: logits = (1 + t_k)·cond − t_k·uncond, then temperature, top-k, top-p, multinomial (or argmax)

Both halves of a guided batch append the same sampled codes, so the unconditional row always describes the image
being drawn. ``use_cache=False`` runs the reference's way instead: each scale re-runs the whole sequence (prompt +
span so far) through `forward`; it is the baseline the cached loop must reproduce exactly.
"""

from __future__ import annotations

import json
import numbers
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .sampling import apply_cfg, cfg_weight, resolve_seed, sample_codes, seeded_generator, validate_sampling_args

if TYPE_CHECKING:
    from .processing_tokenflow_mllm import TokenFlowProcessor

PNG_METADATA_KEYS = ("prompt", "seed", "settings")

# The drawing sampler's built-in defaults; a checkpoint overrides them with `generation_config.image_sampling`.
DEFAULT_SAMPLER = {"cfg_scale": 7.5, "cfg_schedule": "linear", "top_k": 600, "top_p": 0.6, "temperature": 1.0}


def sampler_defaults(model) -> dict[str, Any]:
    """Drawing settings (cfg_scale, cfg_schedule, top_k, top_p, temperature) of `model`: its generation config's
    `image_sampling` dict where it sets them, the built-in `DEFAULT_SAMPLER` otherwise."""
    overrides = getattr(getattr(model, "generation_config", None), "image_sampling", None) or {}
    unknown = set(overrides) - set(DEFAULT_SAMPLER)
    if unknown:
        raise ValueError(f"generation_config.image_sampling has unknown keys {sorted(unknown)}; "
                         f"allowed: {sorted(DEFAULT_SAMPLER)}")
    return {**DEFAULT_SAMPLER, **overrides}


@dataclass
class ImageGenerationOutput:
    """Result of [`ImageGenerationMixin.generate_image`].

    images: one PIL image per drawn image (prompt-major: all images of prompt 0 first), each carrying `prompt`,
        `seed` and `settings` (JSON) in `image.info`; `save_png` writes them as PNG text chunks.
    indices: [N, P] drawn codes (P = Σs² over the drawn scales).
    prompts: the prompt of each image.
    seed: seed of the generator used.
    settings: the sampler settings.
    """

    images: list[Image.Image]
    indices: torch.LongTensor
    prompts: list[str]
    seed: int
    settings: dict[str, Any] = field(default_factory=dict)


def save_png(image: Image.Image, path: str) -> None:
    """Save `image` as PNG keeping its drawing metadata (prompt, seed, settings) as PNG text chunks."""
    info = PngInfo()
    for key in PNG_METADATA_KEYS:
        if key in image.info:
            info.add_text(key, str(image.info[key]))
    image.save(path, format="PNG", pnginfo=info)


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


class _CachedScaleLogits:
    """Image logits of the next scale, one forward over the new block per scale against the KV cache."""

    def __init__(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_features):
        self.model = model
        self.input_ids, self.attention_mask, self.image_features = input_ids, attention_mask, image_features
        self.cache = None
        self.padding_mask = attention_mask.bool()

    def __call__(self, indices: torch.Tensor) -> torch.Tensor:
        model = self.model
        if indices.shape[1] == 0:
            out = model(input_ids=self.input_ids, attention_mask=self.attention_mask,
                        image_features=self.image_features, use_cache=True, logits_to_keep=1)
            self.cache = out.cache
            return out.image_logits[:, -1:]
        code_inputs = model.image_tokenizer.quantize.next_scale_block(indices)  # [R, s², 40]
        rows, num_new = code_inputs.shape[:2]
        embeds = model.span_input_embeddings(code_inputs, first_offset=indices.shape[1])
        embeds = embeds.to(model.get_input_embeddings().weight.dtype)
        past = self.padding_mask.shape[1]
        device = self.padding_mask.device
        self.padding_mask = torch.cat([self.padding_mask, torch.ones(rows, num_new, dtype=torch.bool, device=device)], 1)
        # The whole new block is one scale block: it sees every real cached key and itself.
        block_ids = torch.cat([torch.full((rows, past), -1, device=device), torch.zeros(rows, num_new, device=device)],
                              dim=1).long()
        out = model.decoder_forward(embeds, self.padding_mask, block_ids, cache=self.cache, use_cache=True)
        self.cache = out.cache
        return model.image_head(out.last_hidden_state)


class _RecomputedScaleLogits:
    """Image logits of the next scale from a full forward over prompt + span so far (no cache)."""

    def __init__(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_features):
        self.model = model
        self.input_ids, self.attention_mask, self.image_features = input_ids, attention_mask, image_features

    def __call__(self, indices: torch.Tensor) -> torch.Tensor:
        model = self.model
        prefix_lengths = model.config.tokenizer_config.prefix_lengths
        scale = prefix_lengths.index(indices.shape[1]) + 1 if indices.shape[1] else 0
        # Offsets 0 .. prefix_lengths[scale]-1 (<boi> and the slots) predict every code up to this scale.
        num_slots = prefix_lengths[scale] - 1
        rows = self.input_ids.shape[0]
        slots = self.input_ids.new_full((rows, num_slots), model.config.image_token_id)
        input_ids = torch.cat([self.input_ids, slots], dim=1)
        attention_mask = torch.cat([self.attention_mask, torch.ones_like(slots, dtype=self.attention_mask.dtype)], 1)
        out = model(input_ids=input_ids, attention_mask=attention_mask, image_features=self.image_features,
                    generation_indices=indices if indices.shape[1] else None, use_cache=False, logits_to_keep=1)
        side = model.scales[scale]
        return out.image_logits[:, -side * side:]


class ImageGenerationMixin:
    """Adds `generate_image` / `draw_indices` / `decode_images` to [`TokenFlowMLLM`]."""

    @torch.no_grad()
    def decode_images(self, indices: torch.Tensor) -> list[Image.Image]:
        """Indices [N, P] (any whole number of scales) → N RGB PIL images; fewer scales give a coarser image."""
        tokenizer = self.image_tokenizer
        return tokenizer.image_processor.postprocess(tokenizer.decode_indices(indices))

    @torch.no_grad()
    def draw_indices(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor,
        num_conditional: int,
        image_features: torch.Tensor | None = None,
        *,
        cfg_scale: float = 7.5,
        cfg_schedule: str = "linear",
        top_k: int = 600,
        top_p: float = 0.6,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        num_scales: int | None = None,
        use_cache: bool = True,
        callback: Callable[[int, list[Image.Image]], None] | None = None,
        stop: threading.Event | None = None,
    ) -> torch.LongTensor:
        """Draw the span that every row's prompt opens with its final `<boi>`.

        Args:
            input_ids: [R, L] left-padded prompts, each ending in its only `<boi>`; the first `num_conditional` rows
                are conditional, the others (none, or as many, in the same order) their unconditional partners.
            attention_mask: [R, L], 1 = real token.
            image_features: [N_img, S², 40] for the `<image>` slots of the prompts (reading order).
            cfg_scale, cfg_schedule, top_k, top_p, temperature: see `llm.sampling` (temperature 0 = greedy).
            generator: torch.Generator on the model's device for the draws.
            num_scales: stop after this many scales (a coarse image); all of them by default.
            use_cache: one forward per scale against the KV cache (True) or a full recompute per scale (False).
            callback: called as `callback(scale_index, previews)` after every scale with one PIL preview per
                conditional row (the prefix decoded).
            stop: when set (from another thread), drawing ends after the current scale.

        Returns:
            [num_conditional, Σ_{k<n} s_k²] drawn indices (fewer scales when stopped).
        """
        scales = self.scales
        validate_sampling_args(temperature=temperature, top_k=top_k, top_p=top_p, cfg_scale=cfg_scale,
                               schedule=cfg_schedule)
        num_scales = len(scales) if num_scales is None else num_scales
        if isinstance(num_scales, bool) or not isinstance(num_scales, numbers.Integral) or not (
                1 <= num_scales <= len(scales)):
            raise ValueError(f"num_scales must be an int in [1, {len(scales)}] (the tokenizer's scales {scales}), "
                             f"got {num_scales!r}")
        _check_positive_int("num_conditional", num_conditional)
        rows = input_ids.shape[0]
        if rows not in (num_conditional, 2 * num_conditional):
            raise ValueError(f"input_ids must hold num_conditional={num_conditional} conditional rows, optionally "
                             f"followed by as many unconditional rows; got {rows} rows")
        if cfg_scale > 0 and rows == num_conditional:
            raise ValueError(f"cfg_scale={cfg_scale} needs unconditional rows after the conditional ones")
        boi_count = (input_ids == self.config.boi_token_id).sum(dim=1)
        if bool((boi_count != 1).any()) or bool((input_ids[:, -1] != self.config.boi_token_id).any()):
            raise ValueError("every prompt row must be left-padded and end in its only <boi> token")

        logits_for = (_CachedScaleLogits if use_cache else _RecomputedScaleLogits)(
            self, input_ids, attention_mask, image_features)
        codebook_size = self.config.tokenizer_config.codebook_size
        indices = input_ids.new_zeros(num_conditional, 0)
        for k in range(num_scales):
            logits = logits_for(indices.repeat(rows // num_conditional, 1)).float()  # [R, s², K]
            if rows > num_conditional:
                t = cfg_weight(k, len(scales), cfg_scale, cfg_schedule)
                logits = apply_cfg(logits[:num_conditional], logits[num_conditional:], t)
            codes = sample_codes(logits.reshape(-1, codebook_size), temperature, top_k, top_p, generator)
            indices = torch.cat([indices, codes.view(num_conditional, -1)], dim=1)
            if callback is not None:
                callback(k, self.decode_images(indices))
            if stop is not None and stop.is_set():
                break
        return indices

    @torch.no_grad()
    def generate_image(
        self,
        prompts: str | Sequence[str],
        *,
        processor: "TokenFlowProcessor | None" = None,
        cfg_scale: float = 7.5,
        cfg_schedule: str = "linear",
        top_k: int = 600,
        top_p: float = 0.6,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        num_images_per_prompt: int = 1,
        num_scales: int | None = None,
        use_cache: bool = True,
        callback: Callable[[int, list[Image.Image]], None] | None = None,
    ) -> ImageGenerationOutput:
        """Draw images for text prompts.

        Each prompt becomes `processor.drawing_prompt(prompt)`: the chat-template conversation "user: <prompt>"
        followed by an assistant turn opened with `<boi>`; with `cfg_scale > 0` every image is batched with an
        unconditional row (the same template with empty user text, as in caption-dropout training). Pass either
        `generator` or `seed` (a fresh seed is drawn from torch's global generator when neither is given); the same
        seed and settings give the same indices.

        Args:
            prompts: one prompt or a list.
            processor: the model's `TokenFlowProcessor` (default: `self.processor`, attached at build / load time).
            cfg_scale, cfg_schedule, top_k, top_p, temperature, num_scales, use_cache, callback: see `draw_indices`.
            num_images_per_prompt: images drawn for each prompt (each with its own draws).

        Returns:
            `ImageGenerationOutput` with PIL images (metadata in `image.info`) and indices [N, P].
        """
        processor = processor if processor is not None else self.processor
        if processor is None:
            raise ValueError("generate_image needs the model's TokenFlowProcessor: pass processor= or attach it as "
                             "model.processor")
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, Sequence) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompts must be a string or a non-empty list of strings, got {prompts!r}")
        _check_positive_int("num_images_per_prompt", num_images_per_prompt)
        validate_sampling_args(temperature=temperature, top_k=top_k, top_p=top_p, cfg_scale=cfg_scale,
                               schedule=cfg_schedule)
        generator, seed = seeded_generator(seed, generator, self.device)

        image_prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        rows = [processor.drawing_prompt_ids(p) for p in image_prompts]
        if cfg_scale > 0:
            rows += [processor.drawing_prompt_ids(None)] * len(image_prompts)
        input_ids, attention_mask = processor.pad_sequences(rows, padding_side="left")
        indices = self.draw_indices(
            input_ids.to(self.device), attention_mask.to(self.device), len(image_prompts),
            cfg_scale=cfg_scale, cfg_schedule=cfg_schedule, top_k=top_k, top_p=top_p, temperature=temperature,
            generator=generator, num_scales=num_scales, use_cache=use_cache, callback=callback)

        settings = {"cfg_scale": cfg_scale, "cfg_schedule": cfg_schedule, "top_k": top_k, "top_p": top_p,
                    "temperature": temperature, "num_scales": num_scales or len(self.scales),
                    "num_images_per_prompt": num_images_per_prompt}
        images = self.decode_images(indices)
        for number, (image, prompt) in enumerate(zip(images, image_prompts)):
            image.info.update({"prompt": prompt, "seed": str(seed),
                               "settings": json.dumps({**settings, "index": number}, sort_keys=True)})
        return ImageGenerationOutput(images=images, indices=indices, prompts=image_prompts, seed=seed,
                                     settings=settings)


__all__ = ["DEFAULT_SAMPLER", "PNG_METADATA_KEYS", "ImageGenerationMixin", "ImageGenerationOutput", "resolve_seed",
           "sampler_defaults", "save_png"]
