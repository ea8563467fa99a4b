"""Drawing images with a TokenFlowMLLM: next-scale sampling with a KV cache, batched classifier-free guidance,
top-k / top-p / temperature, seeds, progressive previews, PNG metadata.

One drawing, ``L`` scales, ``R`` rows (``C`` conditional rows, then ``C`` unconditional rows when guided)::

    prompt forward (rows end in <boi>)         → image logits at <boi>            → scale 0 (1 code)
    for k = 1 .. n-1:
        block_k = next-scale input of the codes so far  [R, s_k², 40]
        one forward over its s_k² positions against the KV cache (they see the whole cache and each other)
                                                  → image logits [R, s_k², K]     → scale k
    per scale: logits = (1 + t_k)·cond − t_k·uncond, then temperature, top-k, top-p, multinomial (or argmax)

With ``scale_rounds = R > 1`` (models trained with revealed codes, ``config.scale_reveal_prob``) each scale of more
than one code is drawn in R rounds: every round draws the codes not yet kept and keeps some of them, chosen at
random, up to ⌈r·s²/R⌉ after round r; the next round re-runs the block with the kept codes shown (the block's cache
entries replaced), so its draws depend on them. The codes kept when the last round ran are the ones shown in the
cache.

With ``self_check = C > 1`` `generate_image` (and `llm.chat`) draw C candidates for every image whose prompt states
requirements that can be asked about (ShapesWorld's prompts), and keep the one whose expected answers the model
itself finds most likely, looking at each candidate from its indices (`llm.self_check`).

Both halves of a guided batch append the same sampled codes, so the unconditional row always describes the image
being drawn. ``use_cache=False`` runs the reference's way instead: each scale re-runs the whole sequence (prompt +
span so far) through `forward`; it is the baseline the cached loop must reproduce exactly.

Who does what (a one-way path)::

    TokenFlowProcessor.drawing_batch   prompts → left-padded ids, conditional rows then their unconditional partners
    TokenFlowMLLM.draw_indices         ids → indices (this loop)
    llm.self_check.best_candidate      candidates of one image → the one kept (self_check > 1)
    TokenFlowMLLM.decode_images        indices → PIL images (through the frozen tokenizer)
    tag_drawing / save_png             the PNG metadata (prompt, seed, settings)

and this module holds the one set of sampler defaults (`sampler_defaults`, read from the checkpoint's generation
config); the one seed rule (`resolve_seed`, `seeded_generator`) lives in `llm.sampling` and is re-exported here.
`generate_image` and `llm.chat` are both built from these pieces.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .attention import append_scale_block
from .sampling import (  # resolve_seed and seeded_generator are re-exported: drawing's seed rule
    apply_cfg,
    cfg_weight,
    is_int,
    keep_at_random,
    resolve_seed,
    sample_codes,
    seeded_generator,
    validate_sampling_args,
)
from .self_check import best_candidate, drawing_checks

if TYPE_CHECKING:
    from .processing_tokenflow_mllm import TokenFlowProcessor

PNG_METADATA_KEYS = ("prompt", "seed", "settings")
# The drawing sampler's built-in defaults (the reference's sampling settings); a checkpoint overrides them with the
# dict `generation_config.image_sampling` (`set_sampler_defaults`; saved in generation_config.json).
DEFAULT_SAMPLER = {"cfg_scale": 7.5, "cfg_schedule": "linear", "top_k": 600, "top_p": 0.6, "temperature": 1.0,
                   "scale_rounds": 1, "self_check": 1}
SAMPLER_CONFIG_ATTRIBUTE = "image_sampling"


@dataclass
class ImageGenerationOutput:
    """Result of [`ImageGenerationMixin.generate_image`].

    images: one PIL image per drawn image (prompt-major: all images of prompt 0 first), each carrying `prompt`,
        `seed` and `settings` (JSON) in `image.info`; `save_png` writes them as PNG text chunks.
    indices: [N, P] drawn codes (P = Σs² over the drawn scales).
    prompts: the prompt of each image.
    seed: seed of the generator used.
    settings: the sampler settings.
    stopped: the `stop` event ended the drawing early (indices then hold fewer scales, images are their coarser
        decodes; none when it ended before the first scale).
    """

    images: list[Image.Image]
    indices: torch.LongTensor
    prompts: list[str]
    seed: int
    settings: dict[str, Any] = field(default_factory=dict)
    stopped: bool = False


# ---------------------------------------------------------------------------------------------------- settings
def sampler_defaults(model) -> dict[str, Any]:
    """The drawing sampler's defaults for `model`: `cfg_scale, cfg_schedule, top_k, top_p, temperature, scale_rounds`.

    Read from `model.generation_config.image_sampling` (a dict saved in the checkpoint's generation_config.json),
    each missing key falling back to `DEFAULT_SAMPLER`.
    """
    stored = getattr(getattr(model, "generation_config", None), SAMPLER_CONFIG_ATTRIBUTE, None) or {}
    if not isinstance(stored, Mapping):
        raise ValueError(f"generation_config.{SAMPLER_CONFIG_ATTRIBUTE} must be a dict, got {stored!r}")
    unknown = set(stored) - set(DEFAULT_SAMPLER)
    if unknown:
        raise ValueError(f"generation_config.{SAMPLER_CONFIG_ATTRIBUTE} has unknown keys {sorted(unknown)}; "
                         f"allowed: {sorted(DEFAULT_SAMPLER)}")
    return resolve_sampler({**DEFAULT_SAMPLER, **stored})


def set_sampler_defaults(model, **settings: Any) -> dict[str, Any]:
    """Store drawing sampler defaults in `model.generation_config` (saved with the checkpoint); returns them all.

    Only the given keys are stored, the others keep following `DEFAULT_SAMPLER`.
    """
    stored = dict(getattr(model.generation_config, SAMPLER_CONFIG_ATTRIBUTE, None) or {})
    resolve_sampler(DEFAULT_SAMPLER, **settings)  # checks names and values
    stored.update({key: value for key, value in settings.items() if value is not None})
    setattr(model.generation_config, SAMPLER_CONFIG_ATTRIBUTE, stored)
    # A generation config derived from the model config drops extra attributes when it is loaded back.
    model.generation_config._from_model_config = False
    return sampler_defaults(model)


def resolve_sampler(defaults: Mapping[str, Any], **overrides: Any) -> dict[str, Any]:
    """`defaults` updated with the overrides that are not None, checked (see `llm.sampling.validate_sampling_args`)."""
    unknown = set(overrides) - set(DEFAULT_SAMPLER)
    if unknown:
        raise ValueError(f"unknown sampler settings {sorted(unknown)}; allowed: {sorted(DEFAULT_SAMPLER)}")
    settings = {**defaults, **{key: value for key, value in overrides.items() if value is not None}}
    validate_sampling_args(temperature=settings["temperature"], top_k=settings["top_k"], top_p=settings["top_p"],
                           cfg_scale=settings["cfg_scale"], schedule=settings["cfg_schedule"],
                           scale_rounds=settings["scale_rounds"])
    check_positive_int("self_check", settings["self_check"])
    return settings


def add_sampler_arguments(p: argparse.ArgumentParser) -> None:
    """Drawing-sampler flags; each left unset follows the checkpoint's own defaults (`sampler_defaults`)."""
    group = p.add_argument_group("sampler (default: the checkpoint's generation_config.image_sampling)")
    group.add_argument("--cfg-scale", type=float, default=None)
    group.add_argument("--cfg-schedule", choices=("constant", "linear"), default=None)
    group.add_argument("--top-k", type=int, default=None)
    group.add_argument("--top-p", type=float, default=None)
    group.add_argument("--temperature", type=float, default=None)
    group.add_argument("--scale-rounds", type=int, default=None,
                       help="draw each scale in this many rounds, later rounds seeing the codes kept so far (models "
                            "trained with --scale-reveal-prob); 1 = every code of a scale at once")
    group.add_argument("--self-check", type=int, default=None,
                       help="draw this many candidates for each image whose prompt states checkable requirements "
                            "and keep the one the model's own answers support best (llm.self_check); 1 = off")


def sampler_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """The sampler flags of `add_sampler_arguments` as `resolve_sampler` overrides (None: not given)."""
    return {name: getattr(args, name) for name in DEFAULT_SAMPLER}


def check_positive_int(name: str, value: Any) -> None:
    if not is_int(value) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


# ---------------------------------------------------------------------------------------------------- metadata
def tag_drawing(image: Image.Image, prompt: str, seed: int, settings: Mapping[str, Any]) -> Image.Image:
    """Record what drew `image` in `image.info` (prompt, seed, settings as JSON); `save_png` keeps it."""
    image.info.update({"prompt": prompt, "seed": str(seed), "settings": json.dumps(dict(settings), sort_keys=True)})
    return image


def save_png(image: Image.Image, path: str) -> None:
    """Save `image` as PNG keeping its drawing metadata (prompt, seed, settings) as PNG text chunks."""
    info = PngInfo()
    for key in PNG_METADATA_KEYS:
        if key in image.info:
            info.add_text(key, str(image.info[key]))
    image.save(path, format="PNG", pnginfo=info)


# ---------------------------------------------------------------------------------------------------- the loop
class _CachedScaleLogits:
    """Image logits of the next scale, one forward over the new block per scale against the KV cache."""

    def __init__(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_features):
        self.model = model
        self.input_ids, self.attention_mask, self.image_features = input_ids, attention_mask, image_features
        self.cache = None
        self.padding_mask = attention_mask.bool()
        self.block_start, self.padding_before_block = None, None

    def __call__(self, indices: torch.Tensor, revealed: torch.Tensor, block_codes: torch.Tensor | None = None,
                 block_revealed: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [R, s², K] of the scale after `indices` [R, P]; `block_codes` / `block_revealed` [R, s²]: that
        scale's codes shown so far (a later round). `revealed` (shown codes of the earlier scales) is in the cache."""
        model = self.model
        if indices.shape[1] == 0:
            out = model(input_ids=self.input_ids, attention_mask=self.attention_mask,
                        image_features=self.image_features, use_cache=True, logits_to_keep=1)
            self.cache = out.cache
            return out.image_logits[:, -1:]
        if self.block_start == indices.shape[1]:  # the same scale again: its previous round leaves the cache
            self.cache.crop(self.padding_before_block.shape[1] - self.padding_mask.shape[1])
            self.padding_mask = self.padding_before_block
        self.block_start, self.padding_before_block = indices.shape[1], self.padding_mask
        code_inputs = model.image_tokenizer.next_scale_block(indices)  # [R, s², 40]
        embeds = model.span_input_embeddings(code_inputs, first_offset=indices.shape[1])
        if block_codes is not None:
            embeds = embeds + model.reveal_embeddings(block_codes, block_revealed)
        embeds = embeds.to(model.get_input_embeddings().weight.dtype)
        # The whole new block is one scale block: it sees every real cached key and itself.
        block_ids, self.padding_mask = append_scale_block(self.padding_mask, code_inputs.shape[1])
        out = model.decoder_forward(embeds, self.padding_mask, block_ids, cache=self.cache, use_cache=True)
        self.cache = out.cache
        return model.image_head(out.last_hidden_state)

    def feed(self, indices: torch.Tensor, revealed: torch.Tensor) -> None:
        """Put the scale after `indices` into the cache without drawing from it (a kept prefix scale)."""
        self(indices, revealed)


class _RecomputedScaleLogits:
    """Image logits of the next scale from a full forward over prompt + span so far (no cache)."""

    def __init__(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_features):
        self.model = model
        self.input_ids, self.attention_mask, self.image_features = input_ids, attention_mask, image_features

    def __call__(self, indices: torch.Tensor, revealed: torch.Tensor, block_codes: torch.Tensor | None = None,
                 block_revealed: torch.Tensor | None = None) -> torch.Tensor:
        """As `_CachedScaleLogits`, with the shown codes of every scale passed in."""
        model = self.model
        prefix_lengths = model.config.tokenizer_config.prefix_lengths
        scale = prefix_lengths.index(indices.shape[1]) + 1 if indices.shape[1] else 0
        # Offsets 0 .. prefix_lengths[scale]-1 (<boi> and the slots) predict every code up to this scale.
        num_slots = prefix_lengths[scale] - 1
        rows = self.input_ids.shape[0]
        slots = self.input_ids.new_full((rows, num_slots), model.config.image_token_id)
        input_ids = torch.cat([self.input_ids, slots], dim=1)
        attention_mask = torch.cat([self.attention_mask, torch.ones_like(slots, dtype=self.attention_mask.dtype)], 1)
        if block_codes is not None:  # the block's own codes only feed the reveals (and inputs of a later scale)
            indices, revealed = torch.cat([indices, block_codes], 1), torch.cat([revealed, block_revealed], 1)
        out = model(input_ids=input_ids, attention_mask=attention_mask, image_features=self.image_features,
                    generation_indices=indices if indices.shape[1] else None, use_cache=False, logits_to_keep=1,
                    revealed_codes=revealed if bool(revealed.any()) else None)
        side = model.scales[scale]
        return out.image_logits[:, -side * side:]

    def feed(self, indices: torch.Tensor, revealed: torch.Tensor) -> None:
        """Nothing to do: every call recomputes the whole sequence."""


class ImageGenerationMixin:
    """Adds `generate_image` / `draw_indices` / `decode_images` to [`TokenFlowMLLM`]."""

    @torch.no_grad()
    def decode_images(self, indices: torch.Tensor) -> list[Image.Image]:
        """Indices [N, P] (any whole number of scales) → N RGB PIL images; fewer scales give a coarser image."""
        tokenizer = self.image_tokenizer
        return tokenizer.image_processor.postprocess(tokenizer.decode_indices(indices))

    def _check_drawing_rows(self, input_ids: torch.Tensor, num_conditional: int, cfg_scale: float,
                            num_scales: int | None) -> int:
        """Raise ValueError for a batch `draw_indices` cannot draw; returns the number of scales to draw."""
        scales = self.scales
        num_scales = len(scales) if num_scales is None else num_scales
        if not is_int(num_scales) or not 1 <= num_scales <= len(scales):
            raise ValueError(f"num_scales must be an int in [1, {len(scales)}] (the tokenizer's scales {scales}), "
                             f"got {num_scales!r}")
        check_positive_int("num_conditional", num_conditional)
        rows = input_ids.shape[0]
        if rows not in (num_conditional, 2 * num_conditional):
            raise ValueError(f"input_ids must hold num_conditional={num_conditional} conditional rows, optionally "
                             f"followed by as many unconditional rows; got {rows} rows")
        if cfg_scale > 0 and rows == num_conditional:
            raise ValueError(f"cfg_scale={cfg_scale} needs unconditional rows after the conditional ones")
        boi_count = (input_ids == self.config.boi_token_id).sum(dim=1)
        if bool((boi_count != 1).any()) or bool((input_ids[:, -1] != self.config.boi_token_id).any()):
            raise ValueError("every prompt row must be left-padded and end in its only <boi> token")
        return num_scales

    def _check_prefix(self, prefix: torch.Tensor | None, num_conditional: int, num_scales: int) -> int:
        """Raise ValueError for a `prefix` that is not whole scales of valid codes; returns its number of scales."""
        if prefix is None:
            return 0
        lengths = self.config.tokenizer_config.prefix_lengths
        codebook_size = self.config.tokenizer_config.codebook_size
        if (prefix.ndim != 2 or prefix.shape[0] != num_conditional or prefix.shape[1] not in lengths[:num_scales]
                or prefix.is_floating_point()):
            raise ValueError(f"prefix must be integer codes [{num_conditional}, n] with n the codes of whole scales "
                             f"among the drawn ones ({lengths[:num_scales]}), got {prefix.dtype} {tuple(prefix.shape)}")
        if int(prefix.min()) < 0 or int(prefix.max()) >= codebook_size:
            raise ValueError(f"prefix codes must lie in [0, {codebook_size}), got values in "
                             f"[{int(prefix.min())}, {int(prefix.max())}]")
        return lengths.index(prefix.shape[1]) + 1

    @torch.no_grad()
    def draw_indices(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor,
        num_conditional: int,
        image_features: torch.Tensor | None = None,
        *,
        cfg_scale: float | None = None,
        cfg_schedule: str | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        temperature: float | None = None,
        scale_rounds: int | None = None,
        generator: torch.Generator | None = None,
        num_scales: int | None = None,
        prefix: torch.LongTensor | None = None,
        use_cache: bool = True,
        callback: Callable[[int, list[Image.Image]], None] | None = None,
        stop: threading.Event | None = None,
    ) -> torch.LongTensor:
        """Draw the span that every row's prompt opens with its final `<boi>`.

        Args:
            input_ids: [R, L] left-padded prompts, each ending in its only `<boi>`; the first `num_conditional` rows
                are conditional, the others (none, or as many, in the same order) their unconditional partners
                (`TokenFlowProcessor.drawing_batch` builds them).
            attention_mask: [R, L], 1 = real token.
            image_features: [N_img, S², 40] for the `<image>` slots of the prompts (reading order).
            cfg_scale, cfg_schedule, top_k, top_p, temperature: see `llm.sampling` (temperature 0 = greedy); None
                takes the checkpoint's default (`sampler_defaults`).
            scale_rounds: draw each scale in this many rounds (see the module docstring; needs a model trained with
                revealed codes); 1 = every code of a scale at once; None = the checkpoint's default.
            generator: torch.Generator on the model's device for the draws.
            num_scales: stop after this many scales (a coarse image); all of them by default.
            prefix: [num_conditional, Σ_{k<m} s_k²] codes of the first m whole scales to keep (e.g. a drawing's
                coarse layout, to redraw only its finer scales); the drawing goes on after them.
            use_cache: one forward per scale against the KV cache (True) or a full recompute per scale (False).
            callback: called as `callback(scale_index, previews)` after every scale with one PIL preview per
                conditional row (the prefix decoded).
            stop: when set (e.g. from another thread), the drawing ends after the current scale.

        Returns:
            [num_conditional, Σ_{k<n} s_k²] drawn indices (fewer scales when `stop` ended the drawing).
        """
        settings = resolve_sampler(sampler_defaults(self), cfg_scale=cfg_scale, cfg_schedule=cfg_schedule,
                                   top_k=top_k, top_p=top_p, temperature=temperature, scale_rounds=scale_rounds)
        num_scales = self._check_drawing_rows(input_ids, num_conditional, settings["cfg_scale"], num_scales)
        if settings["scale_rounds"] > 1 and self.reveal_projector is None:
            raise ValueError(f"scale_rounds={settings['scale_rounds']} needs a model trained with revealed codes "
                             "(config.scale_reveal_prob, the stages' --scale-reveal-prob); this one draws every code "
                             "of a scale at once: use scale_rounds=1")
        copies = input_ids.shape[0] // num_conditional
        kept_scales = self._check_prefix(prefix, num_conditional, num_scales)
        logits_for = (_CachedScaleLogits if use_cache else _RecomputedScaleLogits)(
            self, input_ids, attention_mask, image_features)
        codebook_size = self.config.tokenizer_config.codebook_size
        indices = input_ids.new_zeros(num_conditional, 0)
        revealed = torch.zeros_like(indices, dtype=torch.bool)  # codes shown when their scale's last round ran
        for k in range(num_scales):
            if stop is not None and stop.is_set():
                break
            size = self.scales[k] ** 2
            rounds = min(settings["scale_rounds"], size)
            block, kept = indices.new_zeros(num_conditional, size), revealed.new_zeros(num_conditional, size)
            if k < kept_scales:  # a kept scale: nothing to draw, but the cached loop needs its block
                logits_for.feed(indices.repeat(copies, 1), revealed.repeat(copies, 1))
                rounds = 0
                block = prefix[:, indices.shape[1]:indices.shape[1] + size].to(indices)
            for r in range(rounds):
                shown = (block.repeat(copies, 1), kept.repeat(copies, 1)) if r else ()
                logits = logits_for(indices.repeat(copies, 1), revealed.repeat(copies, 1), *shown).float()
                if copies > 1:  # [R, s², K] → guided [C, s², K]
                    t = cfg_weight(k, len(self.scales), settings["cfg_scale"], settings["cfg_schedule"])
                    logits = apply_cfg(logits[:num_conditional], logits[num_conditional:], t)
                draws = sample_codes(logits.reshape(-1, codebook_size), settings["temperature"], settings["top_k"],
                                     settings["top_p"], generator).view(num_conditional, size)
                block = torch.where(kept, block, draws)
                if r < rounds - 1:
                    kept = keep_at_random(kept, math.ceil(size * (r + 1) / rounds), generator)
            indices = torch.cat([indices, block], dim=1)
            revealed = torch.cat([revealed, kept], dim=1)
            if callback is not None:
                callback(k, self.decode_images(indices))
        return indices

    @torch.no_grad()
    def generate_image(
        self,
        prompts: str | Sequence[str],
        *,
        processor: "TokenFlowProcessor | None" = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        num_images_per_prompt: int = 1,
        **drawing: Any,
    ) -> ImageGenerationOutput:
        """Draw images for text prompts: `processor.drawing_batch` → `draw_indices` → `decode_images` → metadata.

        Each prompt becomes `processor.drawing_prompt(prompt)`: the chat-template conversation "user: <prompt>"
        followed by an assistant turn opened with `<boi>`; with `cfg_scale > 0` every image is batched with an
        unconditional row (the same template with empty user text, as in caption-dropout training). Pass either
        `generator` or `seed` (`resolve_seed` draws a fresh one when neither is given); the same seed and settings
        give the same indices.

        Args:
            prompts: one prompt or a list.
            processor: the model's `TokenFlowProcessor` (default: `self.processor`, attached at build / load time).
            num_images_per_prompt: images drawn for each prompt (each with its own draws).
            drawing: sampler settings: cfg_scale, cfg_schedule, top_k, top_p, temperature, scale_rounds, self_check
                (None or left out: the checkpoint's `sampler_defaults`; `self_check=C` draws C candidates for each image
                whose prompt states checkable requirements and keeps the best, see `llm.self_check`), and
                `draw_indices` options: num_scales, prefix, use_cache, callback (previews of each image's first
                candidate), stop. Partial drawings (num_scales) and prefix redraws are not checked.

        Returns:
            `ImageGenerationOutput` with PIL images (metadata in `image.info`) and indices [N, P].
        """
        processor = processor if processor is not None else self.processor
        if processor is None:
            raise ValueError("generate_image needs the model's TokenFlowProcessor: pass processor= or attach it as "
                             "model.processor")
        prompts = [prompts] if isinstance(prompts, str) else prompts
        if not isinstance(prompts, Sequence) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompts must be a string or a non-empty list of strings, got {prompts!r}")
        check_positive_int("num_images_per_prompt", num_images_per_prompt)
        settings = resolve_sampler(sampler_defaults(self), **{k: drawing.pop(k) for k in DEFAULT_SAMPLER
                                                              if k in drawing})
        generator, seed = seeded_generator(seed, generator, self.device)

        image_prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        # Self-check: every image of a prompt with checks is drawn as `self_check` candidates, then one is kept.
        # Partial drawings and redraws after a kept prefix are drawn once: checks read whole drawings of a prompt.
        checked = (settings["self_check"] > 1 and drawing.get("num_scales") in (None, len(self.scales))
                   and drawing.get("prefix") is None)
        checks = [drawing_checks(p) if checked else [] for p in image_prompts]
        groups = [settings["self_check"] if c else 1 for c in checks]
        drawn_prompts = [p for p, n in zip(image_prompts, groups) for _ in range(n)]
        firsts = [0, *itertools.accumulate(groups)][:-1]  # each image's first candidate row
        if "callback" in drawing and drawing["callback"] is not None and len(drawn_prompts) > len(image_prompts):
            callback = drawing["callback"]  # previews of each image's first candidate
            drawing["callback"] = lambda k, previews: callback(k, [previews[i] for i in firsts])
        batch = processor.drawing_batch(drawn_prompts, guidance=settings["cfg_scale"] > 0).to(self.device)
        sampler = {k: v for k, v in settings.items() if k != "self_check"}
        candidates = self.draw_indices(batch["input_ids"], batch["attention_mask"], len(drawn_prompts), **sampler,
                                       generator=generator, **drawing)
        complete = candidates.shape[1] == self.num_image_codes  # a stopped drawing is not checked
        chosen = [first + (best_candidate(self, processor, candidates[first:first + n], c)[0] if n > 1 and complete
                           else 0) for first, n, c in zip(firsts, groups, checks)]
        indices = candidates[chosen]
        settings.update(num_scales=drawing.get("num_scales") or len(self.scales),
                        num_images_per_prompt=num_images_per_prompt)
        stopped = indices.shape[1] < self.config.tokenizer_config.prefix_lengths[settings["num_scales"] - 1]
        images = self.decode_images(indices) if indices.shape[1] else []
        for number, (image, prompt) in enumerate(zip(images, image_prompts)):
            tag_drawing(image, prompt, seed, {**settings, "index": number})
        return ImageGenerationOutput(images=images, indices=indices, prompts=image_prompts, seed=seed,
                                     settings=settings, stopped=stopped)


__all__ = [
    "DEFAULT_SAMPLER", "PNG_METADATA_KEYS", "ImageGenerationMixin", "ImageGenerationOutput", "add_sampler_arguments",
    "resolve_sampler", "resolve_seed", "sampler_arguments", "sampler_defaults", "save_png", "seeded_generator",
    "set_sampler_defaults", "tag_drawing",
]
