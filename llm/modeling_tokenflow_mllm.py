"""TokenFlowMLLM: one causal LM that reads images (LLaVA style) and draws them scale by scale (VAR style).

Sequence conventions
====================

Every image enters or leaves the LLM through the frozen TokenFlow tokenizer (scales ``s_0 = 1 < s_1 < ... < s_{L-1}
= S``, ``N = Σ s²`` codes per image, codebook of ``K`` 40-d entries: 32-d semantic half + 8-d pixel half).

Understanding (an image the model looks at)
    The processor expands each ``<image>`` of the prompt into ``S²`` copies of the ``<image>`` id, the *image feature
    slots*. The model overwrites slot ``i`` of an image with ``understanding_projector(f̂_i)``, where ``f̂ [S², 40]`` is
    the tokenizer's accumulated quantized feature map in raster order (its first 32 dims when
    ``config.understanding_features == "semantic"``), plus, when ``config.understanding_positions == "sincos2d"``,
    row ``i`` of a fixed 2-D sin/cos table of the slot's grid row and column (``sincos_2d``) at the projected
    features' root mean square, so that the slots say where they lie on the grid (the VQA probe read positions only
    with such a table). ``f̂`` comes from ``pixel_values`` through the tokenizer, from
    precomputed ``image_features``, or from drawn indices (``image_features_from_indices``, no pixel re-encoding).
    Several images per sample are consumed in reading order over the batch. Slots carry no loss and use plain causal
    attention.

Drawing (an image the model writes), one span of ``N + 2`` positions::

    offset   0          1 ... N-1                              N                 N+1
    token    <boi>      <image> x (N-1)                        <image>           <eoi>
    input    embed      generation_projector(next-scale input) 0 (zero vector)   embed
    adds     scale 0    scale k, position j                    scale L           nothing
    predicts code 0     code j (scale k) at offset j           <eoi> (text head) next text token

    Offset ``j < N`` predicts code ``j`` through ``image_head``; its input is the VAR teacher-forcing feature of the
    scale block it belongs to (``tokenizer.next_scale_inputs``: the cascaded accumulation of coarser scales resized to
    the block's grid). ``scale_embedding`` row ``k`` is added where scale ``k`` is predicted (row 0 at ``<boi>``, row
    ``L`` at the end slot) and ``position_embedding`` row ``j`` where code ``j`` is predicted. Text positions get
    nothing added. Attention is causal outside spans and block-causal inside them (every position of a scale block
    sees the whole block and everything before it), see ``llm.attention``.

    Revealed codes (models with ``config.scale_reveal_prob``): offset ``j`` may also get
    ``reveal_projector(codebook[code j])``, its own code shown. The block's other positions then see it, so a scale
    can be drawn in rounds, each round's codes conditioned on those kept before (``scale_rounds`` of the sampler):
    two objects decided at the same scale no longer decide independently. ``revealed_codes [M, N]`` says which
    codes are shown; in training they are drawn by ``random_scale_reveal``.

Loss
    ``text_loss``: next-token cross-entropy of the text head against ``labels`` (``-100`` on slots and on anything the
    processor does not supervise; ``<boi>`` and ``<eoi>`` are ordinary supervised tokens inside assistant turns).
    ``image_loss``: cross-entropy of ``image_head`` at every code-predicting span position against the span's indices
    (``generation_indices [M, N]``, one row per ``<boi>`` of the batch in reading order, or
    ``generation_pixel_values`` encoded by the frozen tokenizer), revealed codes excepted.
    ``slot_loss`` (models with ``config.slot_label_classes``): cross-entropy of ``slot_head`` at every understanding
    slot against ``slot_labels [N_img, R, S²]`` (row r has ``slot_label_classes[r]`` classes, ``-100`` ignored), dense
    supervision of what each slot holds. ``loss = text_loss_weight · text_loss + image_loss_weight · image_loss +
    slot_loss_weight · slot_loss`` over the terms present.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_utils import slice_logits_to_keep
from transformers.utils import ModelOutput

from tokenizer.modeling_tokenflow import TokenFlowTokenizer
from unimodal.checkpoints import check_folder, load_checked, read_json, stamp_data_digests

from .attention import build_block_causal_mask, image_span_length, span_block_ids, to_backbone_mask
from .configuration_tokenflow_mllm import IGNORE_INDEX, TokenFlowMLLMConfig
from .generation import ImageGenerationMixin
from .processing_tokenflow_mllm import TokenFlowProcessor

FLASH_ATTN_IMPLEMENTATIONS = ("flash_attention_2", "flash_attention_3")
# Image inputs `generate` hands to the first forward (the prompt's), see `prepare_inputs_for_generation`.
IMAGE_INPUT_NAMES = ("pixel_values", "image_features", "image_indices", "generation_indices")


def sincos_2d(side: int, dim: int) -> torch.Tensor:
    """[side², dim]: sin/cos of the row in the first half of the channels and of the column in the second, raster
    order, each in [-1, 1] (the fixed 2-D position code of ViT-style encoders; zeros pad `dim` to a multiple of 4)."""
    quarter = dim // 4
    frequencies = 1.0 / (side ** (torch.arange(quarter) / quarter))  # periods from 2π up to 2π·side
    angles = torch.arange(side)[:, None] * frequencies[None]  # [side, dim/4]
    code = torch.cat([angles.sin(), angles.cos()], -1)  # [side, dim/2]
    rows, cols = code[:, None].expand(side, side, -1), code[None].expand(side, side, -1)
    table = torch.cat([rows, cols], -1).reshape(side * side, -1)
    return F.pad(table, (0, dim - table.shape[1]))


def unused_branch(output: torch.Tensor) -> torch.Tensor:
    """A zero that depends on `output`: adding it keeps the branch that made `output` in the backward pass."""
    return 0.0 * output.float().sum()


@dataclass
class TokenFlowMLLMOutput(ModelOutput):
    """Output of [`TokenFlowMLLM.forward`].

    loss: weighted sum of the losses present (when `labels` are given).
    text_loss / image_loss / slot_loss: the cross-entropies, each a mean over its own supervised positions (None if
        none).
    logits: text-head logits [B, Q', V] (Q' = Q, or the last `logits_to_keep` positions).
    image_logits: image-head logits [M, T, K] at the T code-predicting positions present in each of the M spans.
    cache / hidden_states / attentions: as returned by the backbone.
    """

    loss: torch.FloatTensor | None = None
    text_loss: torch.FloatTensor | None = None
    image_loss: torch.FloatTensor | None = None
    slot_loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    image_logits: torch.FloatTensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


class MultimodalProjector(nn.Module):
    """`mlp2x_gelu`: Linear(in, hidden) · GELU · Linear(hidden, hidden). [..., in] → [..., hidden]."""

    def __init__(self, in_features: int, hidden_size: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, hidden_size)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(features.to(self.linear_1.weight.dtype))))


class ConvProjector(nn.Module):
    """`conv2x_gelu`: Conv3×3(in, hidden) · GELU · Conv3×3(hidden, hidden) over the S×S slot grid, zero-padded at the
    border, so each slot's output also reads its 8 neighbours. [N, S², in] (raster order) → [N, S², hidden]."""

    def __init__(self, in_features: int, hidden_size: int):
        super().__init__()
        self.conv_1 = nn.Conv2d(in_features, hidden_size, 3, padding=1)
        self.act = nn.GELU()
        self.conv_2 = nn.Conv2d(hidden_size, hidden_size, 3, padding=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        batch, num_slots, channels = features.shape
        side = math.isqrt(num_slots)
        if side * side != num_slots:
            raise ValueError(f"conv2x_gelu needs a square grid of slots, got {num_slots}")
        grid = features.to(self.conv_1.weight.dtype).transpose(1, 2).reshape(batch, channels, side, side)
        return self.conv_2(self.act(self.conv_1(grid))).flatten(2).transpose(1, 2)


def build_projector(kind: str, in_features: int, hidden_size: int) -> nn.Module:
    """The input projector named `kind` (`PROJECTOR_TYPES` / `UNDERSTANDING_PROJECTOR_TYPES`)."""
    projectors = {"mlp2x_gelu": MultimodalProjector, "conv2x_gelu": ConvProjector}
    if kind not in projectors:
        raise ValueError(f"projector {kind!r}; allowed: {tuple(projectors)}")
    return projectors[kind](in_features, hidden_size)


class FrozenTokenFlowTokenizer(TokenFlowTokenizer):
    """The TokenFlow tokenizer with gradients off and evaluation mode pinned.

    In training mode the tokenizer randomly drops a scale, which would silently change the model's targets, so
    `train()` (called recursively by `model.train()`) always leaves it in evaluation mode.
    """

    # The tokenizer's towers choose their own attention kernels; the LLM's `attn_implementation` never reaches them,
    # so any choice made for the whole model (e.g. `set_attn_implementation("flex_attention")`) is accepted here.
    _supports_flash_attn = True
    _supports_flex_attn = True

    def __init__(self, config):
        super().__init__(config)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "FrozenTokenFlowTokenizer":
        return super().train(False)


class TokenFlowMLLMPreTrainedModel(PreTrainedModel):
    config_class = TokenFlowMLLMConfig
    config: TokenFlowMLLMConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _skip_keys_device_placement = ["cache"]
    # The quantizer's nearest-code search and the pixel decoder stay in fp32 when the LLM is loaded in bf16/fp16.
    _keep_in_fp32_modules_strict = ["image_tokenizer"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # The backbone and the tokenizer are PreTrainedModels and initialise themselves; this covers the adapters.
        hidden_size = self.config.text_config.hidden_size
        std = getattr(self.config.text_config, "initializer_range", 0.02)
        # The reference initialises its level and position embeddings with this std.
        embedding_std = math.sqrt(1.0 / (3.0 * hidden_size))
        if isinstance(module, TokenFlowMLLM):
            init.trunc_normal_(module.position_embedding, mean=0.0, std=embedding_std)
        elif isinstance(module, nn.Embedding):
            init.trunc_normal_(module.weight, mean=0.0, std=embedding_std)
        elif isinstance(module, nn.Linear) and module is getattr(self, "reveal_projector", None):
            init.zeros_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)


class TokenFlowMLLM(TokenFlowMLLMPreTrainedModel, GenerationMixin, ImageGenerationMixin):
    """Backbone + frozen TokenFlow tokenizer + understanding/generation projectors + scale/position embeddings +
    image head. See the module docstring for the sequence layout.

    Args:
        config: the model config.
        language_model / image_tokenizer: already built modules to use instead of building them from the config
            (e.g. a pretrained backbone whose embeddings were resized for the image special tokens); their configs
            must be `config.text_config` / `config.tokenizer_config`.
    """

    def __init__(
        self,
        config: TokenFlowMLLMConfig,
        language_model: PreTrainedModel | None = None,
        image_tokenizer: TokenFlowTokenizer | None = None,
    ):
        super().__init__(config)
        for name in ("image_token_id", "boi_token_id", "eoi_token_id"):
            if getattr(config, name) is None:
                raise ValueError(f"config.{name} is None; set the ids of <image>, <boi> and <eoi> in the text vocabulary")
        self.language_model = language_model if language_model is not None else AutoModelForCausalLM.from_config(
            config.text_config)
        # The composite config's own attention setting is pushed down to its sub-configs when it is created, which
        # can leave the backbone's unset; the backbone then follows the composite's choice.
        if self.language_model.config._attn_implementation is None:
            self.language_model.config._attn_implementation = self.config._attn_implementation
        if image_tokenizer is None:
            image_tokenizer = FrozenTokenFlowTokenizer(config.tokenizer_config)
        elif not isinstance(image_tokenizer, FrozenTokenFlowTokenizer):
            frozen = FrozenTokenFlowTokenizer(image_tokenizer.config)
            frozen.load_state_dict(image_tokenizer.state_dict())
            image_tokenizer = frozen
        self.image_tokenizer = image_tokenizer

        hidden_size = config.text_config.hidden_size
        tokenizer_config = config.tokenizer_config
        num_scales = len(tokenizer_config.scales)
        self.understanding_projector = build_projector(config.understanding_projector, config.understanding_dim,
                                                       hidden_size)
        self.generation_projector = build_projector(config.projector_type, tokenizer_config.code_dim, hidden_size)
        # Row k is added where scale k is predicted; row L (one past the last scale) at the end-of-image slot.
        self.scale_embedding = nn.Embedding(num_scales + 1, hidden_size)
        self.position_embedding = nn.Parameter(torch.empty(tokenizer_config.num_tokens, hidden_size))
        self.image_head = nn.Linear(hidden_size, tokenizer_config.codebook_size, bias=False)
        # Shows a code of the block at the position that predicts it (see "Revealed codes"); starts at zero, so adding
        # it to a trained model changes nothing until it is trained.
        self.reveal_projector = None if config.scale_reveal_prob is None else nn.Linear(tokenizer_config.code_dim,
                                                                                          hidden_size)
        # Reads what each understanding slot holds (training signal only; see `slot_label_loss`).
        self.slot_head = None if config.slot_label_classes is None else nn.Linear(
            hidden_size, sum(config.slot_label_classes))

        # Scale predicted at each span offset 0..N (offset N, the end slot, gets the extra row L). A plain list, not a
        # buffer: it is derived from the config and must survive meta-device construction in `from_pretrained`.
        self.span_scale_of_offset = [k for k, s in enumerate(tokenizer_config.scales) for _ in range(s * s)]
        self.span_scale_of_offset.append(num_scales)
        # The matching TokenFlowProcessor, attached by `llm.assemble` / `from_pretrained`; used by `generate_image`
        # and `chat` when no processor is passed, and saved by `save_pretrained`.
        self.processor = None
        self.post_init()

    # ------------------------------------------------------------------ layout and plumbing
    @property
    def scales(self) -> list[int]:
        return list(self.config.tokenizer_config.scales)

    @property
    def num_image_codes(self) -> int:
        """N = Σs², codes per drawn image."""
        return self.config.num_image_codes

    @property
    def num_image_slots(self) -> int:
        """S², `<image>` slots per understood image."""
        return self.config.num_image_slots

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_output_embeddings(value)

    def get_decoder(self) -> nn.Module:
        return self.language_model.get_decoder()

    # ------------------------------------------------------------------ image inputs
    @torch.no_grad()
    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Images [N, 3, H, W] in [-1, 1] → the tokenizer's quantized features [N, S², 40] (raster order)."""
        return self.image_tokenizer.understanding_features(pixel_values)

    @torch.no_grad()
    def image_features_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Drawn indices [N, Σs²] → the features an encode of their pixels would feed the LLM, [N, S², 40]."""
        return self.image_tokenizer.indices_to_understanding_features(indices)

    @torch.no_grad()
    def encode_generation_targets(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Images to be drawn [M, 3, H, W] → their indices [M, Σs²] (the image-loss targets)."""
        return self.image_tokenizer.encode(pixel_values).indices

    def _or_zero_images(self, pixel_values: torch.Tensor | None) -> torch.Tensor:
        """`pixel_values`, or one black image as a stand-in for an unused path (see `forward`'s run_every_branch)."""
        if pixel_values is not None:
            return pixel_values
        # Device and dtype come from `parameters()`, never from a parameter attribute such as `linear.weight`: under
        # ZeRO-3 reading a partitioned parameter by attribute during the forward gathers it across the processes, and
        # a stand-in is made on some processes only, so the others would never join that gather.
        size, tokenizer = self.config.tokenizer_config.image_size, self.image_tokenizer
        return torch.zeros(1, 3, size, size, device=tokenizer.device, dtype=tokenizer.dtype)

    def _or_zero_indices(self, indices: torch.Tensor | None) -> torch.Tensor:
        if indices is not None:
            return indices
        # Read by the tokenizer; its device comes from `parameters()` (see `_or_zero_images`).
        return torch.zeros(1, self.num_image_codes, dtype=torch.long, device=self.image_tokenizer.device)

    def project_image_features(self, image_features: torch.Tensor) -> torch.Tensor:
        """Tokenizer features [N, S², 40] → LLM inputs for the understanding slots [N, S², hidden] (projected, plus
        2-D positions when `config.understanding_positions` says so)."""
        expected = (self.num_image_slots, self.config.tokenizer_config.code_dim)
        if image_features.ndim != 3 or tuple(image_features.shape[1:]) != expected:
            raise ValueError(
                f"image_features must have shape [N, {expected[0]}, {expected[1]}] (the tokenizer's quantized features "
                f"f̂ as a token sequence), got {tuple(image_features.shape)}")
        projected = self.understanding_projector(image_features[..., : self.config.understanding_dim])
        if self.config.understanding_positions == "sincos2d":
            projected = projected + self.slot_positions(projected)
        return projected

    def slot_positions(self, projected: torch.Tensor) -> torch.Tensor:
        """The 2-D positions added to projected slots [N, S², hidden]: `sincos_2d` scaled to unit root mean square,
        times each image's root mean square (not differentiated), so position and content keep the same magnitude
        whatever the projector's scale → [N, S², hidden]."""
        table = sincos_2d(self.config.tokenizer_config.grid_size, projected.shape[-1]).to(projected)
        table = table / table.pow(2).mean().sqrt()
        return table * projected.detach().pow(2).mean(dim=(-2, -1), keepdim=True).sqrt()

    def span_position_additions(self, offsets: torch.Tensor) -> torch.Tensor:
        """What is added to the input at span offsets [...] (0..N): scale embedding + position embedding → [..., hidden].

        Offset j < N predicts code j: scale row = scale of code j, position row j. Offset N (the end slot) gets scale
        row L and no position row.
        """
        position_table = F.pad(self.position_embedding, (0, 0, 0, 1))  # zero row for the end slot
        scale_of_offset = torch.tensor(self.span_scale_of_offset, device=offsets.device)
        return self.scale_embedding(scale_of_offset[offsets]) + position_table[offsets]

    def span_input_embeddings(self, code_inputs: torch.Tensor, first_offset: int) -> torch.Tensor:
        """Inputs of consecutive code-predicting span positions.

        Args:
            code_inputs: next-scale teacher-forcing features [M, n, 40] for span offsets first_offset .. first_offset+n-1
                (all of `tokenizer.next_scale_inputs` from offset 1, or one block of `quantize.next_scale_block`).
            first_offset: span offset of the first of them (≥ 1).

        Returns:
            [M, n, hidden] = generation_projector(code_inputs) + scale and position embeddings of those offsets.
        """
        offsets = torch.arange(first_offset, first_offset + code_inputs.shape[1], device=code_inputs.device)
        return self.generation_projector(code_inputs) + self.span_position_additions(offsets)

    def reveal_embeddings(self, codes: torch.LongTensor, revealed: torch.BoolTensor) -> torch.Tensor:
        """What revealing codes adds to the inputs that predict them: codes, revealed [...] → [..., hidden]
        (`reveal_projector` of the code's vector where revealed, zero elsewhere)."""
        if self.reveal_projector is None:
            raise ValueError("revealed codes need a model trained to read them (config.scale_reveal_prob set, see "
                             "`add_reveal_projector` and the stages' --scale-reveal-prob); this one draws every code "
                             "of a scale at once: use scale_rounds=1")
        if revealed.shape != codes.shape or revealed.dtype != torch.bool:
            raise ValueError(f"revealed must be a bool tensor shaped like the codes {tuple(codes.shape)}, got "
                             f"{revealed.dtype} {tuple(revealed.shape)}")
        vectors = self.image_tokenizer.quantize.lookup(codes).to(self.reveal_projector.weight.dtype)
        return self.reveal_projector(vectors) * revealed.unsqueeze(-1).to(vectors.dtype)

    def add_reveal_projector(self, prob: float) -> None:
        """Let the model read revealed codes (see "Revealed codes" in the module docstring), training with a random
        reveal on a fraction `prob` of the drawn spans. A model that has the projector keeps it."""
        if not 0 <= prob <= 1:
            raise ValueError(f"scale reveal probability {prob!r} must be in [0, 1]")
        self.config.scale_reveal_prob = float(prob)
        if self.reveal_projector is None:
            weight = self.image_head.weight
            self.reveal_projector = nn.Linear(self.config.tokenizer_config.code_dim,
                                              self.config.text_config.hidden_size, device=weight.device,
                                              dtype=weight.dtype)
            self._init_weights(self.reveal_projector)

    def _span_offsets(self, input_ids: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        """Offset of every real position inside a drawn-image span (0 at `<boi>`, up to N+1 at `<eoi>`), -1 outside.

        [B, L] → [B, L]. A span cut off by the end of the sequence keeps the offsets it has.
        """
        boi_mask = input_ids == self.config.boi_token_id
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        last_boi = torch.where(boi_mask, positions, -1).cummax(dim=1).values
        offsets = positions - last_boi
        inside = (last_boi >= 0) & (offsets < image_span_length(self.scales)) & padding_mask
        offsets = torch.where(inside, offsets, -1)

        num_codes = self.num_image_codes
        slot_offset = (offsets >= 1) & (offsets <= num_codes)
        bad = (slot_offset & (input_ids != self.config.image_token_id)) | (
            (offsets == num_codes + 1) & (input_ids != self.config.eoi_token_id))
        if bad.any():
            sample, position = bad.nonzero()[0].tolist()
            raise ValueError(
                f"malformed drawn-image span in sample {sample}: token id {int(input_ids[sample, position])} at span "
                f"offset {int(offsets[sample, position])} (position {position}); a span is <boi>, {num_codes} <image> "
                f"slots (id {self.config.image_token_id}), then <eoi> (id {self.config.eoi_token_id})")
        return offsets

    def check_input_ids(self, input_ids: torch.Tensor) -> None:
        """Raises unless `input_ids` is a non-empty integer batch [B, L] of ids in the text vocabulary."""
        if input_ids.ndim != 2 or 0 in input_ids.shape:
            raise ValueError(f"input_ids must be a batch [B, L] with B, L >= 1, got shape {tuple(input_ids.shape)}")
        if input_ids.is_floating_point() or input_ids.dtype == torch.bool:
            raise TypeError(f"input_ids must be an integer tensor, got dtype {input_ids.dtype}")
        vocab_size = self.get_input_embeddings().num_embeddings
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= vocab_size:
            raise ValueError(
                f"input_ids must lie in [0, {vocab_size}) (the text vocabulary with <image>, <boi>, <eoi>), got values "
                f"in [{low}, {high}]; encode text with the model's processor")

    def embed_inputs(
        self,
        input_ids: torch.LongTensor,
        padding_mask: torch.BoolTensor | None = None,
        image_features: torch.Tensor | None = None,
        generation_indices: torch.LongTensor | None = None,
        run_every_branch: bool = False,
        revealed_codes: torch.BoolTensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids → LLM input embeddings with understanding slots and drawn-image spans filled in.

        Args:
            input_ids: [B, L].
            padding_mask: [B, L] bool, True = real token (all real when None).
            image_features: [N_img, S², 40], one per understanding image in reading order over the batch.
            generation_indices: [M, P], one row per `<boi>` of the batch in reading order; P ≥ the codes whose
                next-scale inputs the spans hold (a whole number of scales).
            run_every_branch: run the image branches this batch does not use with weight 0 (see `forward`).
            revealed_codes: [M, P] bool, True where a span shows its own code (see "Revealed codes").

        Returns:
            inputs_embeds [B, L, hidden] and span offsets [B, L] (see `_span_offsets`).
        """
        self.check_input_ids(input_ids)
        padding_mask = torch.ones_like(input_ids, dtype=torch.bool) if padding_mask is None else padding_mask
        embeds = self.get_input_embeddings()(input_ids)
        offsets = self._span_offsets(input_ids, padding_mask)

        slots = (input_ids == self.config.image_token_id) & (offsets < 0)
        num_slots = int(slots.sum())
        num_images = 0 if image_features is None else image_features.shape[0]
        if num_slots != num_images * self.num_image_slots:
            raise ValueError(
                f"the input has {num_slots} <image> slots outside drawn-image spans "
                f"({num_slots / self.num_image_slots:g} images of {self.num_image_slots} slots) but {num_images} "
                f"images were given; pass one image (pixel_values or image_features) per <image> in the prompt")
        if num_images:
            projected = self.project_image_features(image_features).to(embeds.dtype)
            embeds = embeds.masked_scatter(slots.unsqueeze(-1), projected)
        elif run_every_branch:
            code_dim = self.config.tokenizer_config.code_dim
            embeds = embeds + unused_branch(self.project_image_features(embeds.new_zeros(1, self.num_image_slots,
                                                                                         code_dim)))

        is_input = (offsets >= 1) & (offsets < self.num_image_codes)
        if is_input.any():
            span_index = self._span_index(input_ids)
            num_spans = int((input_ids == self.config.boi_token_id).sum())
            if generation_indices is None:
                raise ValueError(
                    f"the input holds {num_spans} drawn-image spans with image slots but no generation_indices "
                    "(or generation_pixel_values) were given")
            if generation_indices.shape[0] != num_spans:
                raise ValueError(
                    f"generation_indices has {generation_indices.shape[0]} rows but the input holds {num_spans} "
                    "drawn-image spans (<boi> tokens); give one row per span in reading order")
            code_inputs = self.image_tokenizer.next_scale_inputs(generation_indices)  # [M, n_in, 40]
            needed = int(offsets[is_input].max())
            if needed > code_inputs.shape[1]:
                raise ValueError(
                    f"generation_indices of {generation_indices.shape[1]} codes give next-scale inputs for span "
                    f"offsets 1..{code_inputs.shape[1]}, but a span reaches offset {needed}")
            span_inputs = self.span_input_embeddings(code_inputs, first_offset=1)
            if revealed_codes is not None:
                if revealed_codes.shape != generation_indices.shape:
                    raise ValueError(f"revealed_codes must have the shape of generation_indices "
                                     f"{tuple(generation_indices.shape)}, got {tuple(revealed_codes.shape)}")
                # Offset j shows code j; the inputs of the scale after the given codes show nothing.
                shown = self.reveal_embeddings(generation_indices[:, 1:], revealed_codes[:, 1:])
                span_inputs = span_inputs + F.pad(shown, (0, 0, 0, span_inputs.shape[1] - shown.shape[1]))
            span_inputs = span_inputs.to(embeds.dtype)
            embeds = embeds.clone()
            embeds[is_input] = span_inputs[span_index[is_input], offsets[is_input] - 1]
        elif run_every_branch:
            code_inputs = self.image_tokenizer.next_scale_inputs(self._or_zero_indices(None))
            embeds = embeds + unused_branch(self.span_input_embeddings(code_inputs, first_offset=1))
            if self.reveal_projector is not None:
                codes = self._or_zero_indices(None)
                embeds = embeds + unused_branch(self.reveal_embeddings(codes, torch.ones_like(codes, dtype=torch.bool)))

        # <boi> keeps its token embedding, the end slot a zero vector; both get their span additions.
        span_ends = (offsets == 0) | (offsets == self.num_image_codes)
        if span_ends.any():
            embeds = embeds.clone()
            end_slot = (offsets == self.num_image_codes).unsqueeze(-1)
            embeds = torch.where(end_slot, torch.zeros_like(embeds), embeds)
            embeds[span_ends] = embeds[span_ends] + self.span_position_additions(offsets[span_ends]).to(embeds.dtype)
        elif run_every_branch:
            embeds = embeds + unused_branch(self.span_position_additions(offsets.new_zeros(1)))
        return embeds, offsets

    def _span_index(self, input_ids: torch.Tensor) -> torch.Tensor:
        """For each position, the batch-wide index of the latest `<boi>` at or before it (rows in reading order)."""
        boi_mask = input_ids == self.config.boi_token_id
        return boi_mask.flatten().long().cumsum(0).view_as(input_ids) - 1

    # ------------------------------------------------------------------ backbone
    def decoder_forward(
        self,
        inputs_embeds: torch.Tensor,
        padding_mask: torch.BoolTensor,
        block_ids: torch.LongTensor,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ):
        """Runs the backbone's decoder over Q new positions with the block-causal rule of `llm.attention`.

        Args:
            inputs_embeds: [B, Q, hidden].
            padding_mask: [B, P + Q] bool over cached and new positions.
            block_ids: [B, P + Q] (see `llm.attention`; -1 = plain causal).
            position_ids: [B, Q]; by default the count of real tokens before each position (left pads share 0).
        """
        num_queries = inputs_embeds.shape[1]
        if position_ids is None:
            position_ids = (padding_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -num_queries:]
        implementation = self.language_model.config._attn_implementation
        if implementation in FLASH_ATTN_IMPLEMENTATIONS:
            attention_mask, kwargs["is_causal"] = self._flash_attention_inputs(padding_mask, block_ids, num_queries)
        else:
            mask = build_block_causal_mask(block_ids, padding_mask, num_queries=num_queries)
            attention_mask = to_backbone_mask(mask, implementation, inputs_embeds.dtype)
        return self.get_decoder()(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
            cache=cache, use_cache=use_cache, **kwargs)

    @staticmethod
    def _flash_attention_inputs(
        padding_mask: torch.BoolTensor, block_ids: torch.LongTensor, num_queries: int
    ) -> tuple[torch.Tensor, bool]:
        # Flash kernels take a 2-D padding mask plus a causal flag, which expresses two of our cases: queries with no
        # shared block (plain causal), and queries that are exactly one scale block over the cache (drawing step,
        # every query sees every real key).
        query_blocks = block_ids[:, -num_queries:]
        if num_queries > 1 and bool((query_blocks == query_blocks[:, :1]).all()) and bool((query_blocks >= 0).all()):
            return padding_mask.long(), False
        multi = query_blocks >= 0
        same_as_next = multi[:, :-1] & (query_blocks[:, :-1] == query_blocks[:, 1:])
        if bool(same_as_next.any()):
            raise ValueError(
                "flash attention cannot express the block-causal attention inside drawn-image spans; load the model "
                "with attn_implementation='sdpa' or 'flex_attention' for forwards over whole spans (training, drawing "
                "without cache)")
        return padding_mask.long(), True

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        image_features: torch.FloatTensor | None = None,
        image_indices: torch.LongTensor | None = None,
        generation_indices: torch.LongTensor | None = None,
        generation_pixel_values: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        slot_labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        run_every_branch: bool = False,
        revealed_codes: torch.BoolTensor | None = None,
        **kwargs,
    ) -> TokenFlowMLLMOutput:
        r"""
        Args:
            input_ids: [B, Q] token ids with `<image>` slots and `<boi>` spans laid out as in the module docstring.
            attention_mask: [B, P + Q], 1 = real token (P cached positions). Padding may be left or right.
            position_ids: [B, Q]; by default counted over real tokens (see `decoder_forward`).
            cache: KV cache of P positions. A cached forward must not split a drawn-image span inside a
                scale block (the drawing loop feeds one block per forward itself).
            inputs_embeds: [B, Q, hidden] instead of `input_ids` (text only: no image inputs allowed then).
            pixel_values: [N_img, 3, H, W] in [-1, 1], one per understanding image in reading order.
            image_features: [N_img, S², 40] precomputed tokenizer features instead of `pixel_values`.
            image_indices: [N_img, Σs²] indices of drawn images to look at instead (`image_features_from_indices`).
            generation_indices: [M, P'] indices of the drawn-image spans (one row per `<boi>`).
            generation_pixel_values: [M, 3, H, W] images of the spans, encoded by the frozen tokenizer instead.
            labels: [B, Q] text targets, -100 = ignored (text loss); the image loss uses the span indices.
            slot_labels: [N_img, R, S²] per-slot targets of the understood images (models with a `slot_head`, see
                `config.slot_label_classes`), -100 = ignored; needs `labels`.
            logits_to_keep: compute text logits for the last `logits_to_keep` positions only (0 = all).
            run_every_branch: training under data parallelism: the image paths this batch does not use (the
                tokenizer's encoder and index lookups, the understanding projector, the generation projector with
                the span embeddings, the image head) run on a zero input, their results dropped or added with
                weight 0, so that every process calls the same modules in the same order whatever its batch holds.
                DeepSpeed needs that: ZeRO-2 reduces gradients in the order they become ready, ZeRO-3 also gathers
                each module's weights when it is called. The loss and gradients are unchanged (an unused trainable
                branch gets a zero gradient instead of none).
            revealed_codes: [M, P'] bool, True where a span shows its own code (models with `reveal_projector`, see
                "Revealed codes"); those codes carry no image loss. In training mode a model with a
                `reveal_projector` draws them with `random_scale_reveal` (`config.scale_reveal_prob`) when none are
                given.
        """
        self._check_inputs(input_ids, inputs_embeds, pixel_values, image_features, image_indices, generation_indices,
                           generation_pixel_values)
        past_length = cache.get_seq_length() if cache is not None else 0
        padding_mask = self._padding_mask(input_ids if input_ids is not None else inputs_embeds, attention_mask,
                                          past_length)
        image_features, generation_indices = self._resolve_image_inputs(
            pixel_values, image_features, image_indices, generation_indices, generation_pixel_values, run_every_branch)

        # A model with the projector always runs it in training (an all-hidden draw at probability 0), so every
        # process of a data-parallel run uses it in every batch that draws.
        if (revealed_codes is None and self.training and generation_indices is not None
                and self.reveal_projector is not None):
            revealed_codes = random_scale_reveal(generation_indices.shape[0], self.scales,
                                                 self.config.scale_reveal_prob or 0.0, generation_indices.device)[
                :, :generation_indices.shape[1]]
        block_ids = torch.full(padding_mask.shape, -1, dtype=torch.long, device=padding_mask.device)
        offsets = None
        if input_ids is not None:
            inputs_embeds, offsets = self.embed_inputs(
                input_ids, padding_mask[:, past_length:], image_features, generation_indices, run_every_branch,
                revealed_codes)
            block_ids[:, past_length:] = span_block_ids(input_ids == self.config.boi_token_id, self.scales)
        outputs = self.decoder_forward(
            inputs_embeds, padding_mask, block_ids, position_ids=position_ids, cache=cache, use_cache=use_cache,
            **kwargs)
        hidden_states = outputs.last_hidden_state
        logits = self.get_output_embeddings()(slice_logits_to_keep(hidden_states, logits_to_keep))
        image_logits = None if offsets is None else self._image_logits(hidden_states, input_ids, offsets)
        unused_head = 0.0
        if run_every_branch and image_logits is None:
            unused_head = unused_branch(self.image_head(hidden_states[:, :1]))
        slot_loss = None
        if slot_labels is not None:
            if labels is None:
                raise ValueError("slot_labels supervise training; pass labels too")
            slot_loss = self._slot_loss(hidden_states, input_ids, offsets, slot_labels)
        elif run_every_branch and self.slot_head is not None:
            unused_head = unused_head + unused_branch(self.slot_head(hidden_states[:, :1]))
        losses = {} if labels is None else self._losses(logits, image_logits, labels, generation_indices,
                                                         logits_to_keep, slot_loss, revealed_codes)
        if losses:
            losses["loss"] = losses["loss"] + unused_head
        return TokenFlowMLLMOutput(
            **losses, logits=logits, image_logits=image_logits, cache=outputs.cache,
            hidden_states=outputs.hidden_states, attentions=outputs.attentions)

    @staticmethod
    def _check_inputs(input_ids, inputs_embeds, pixel_values, image_features, image_indices, generation_indices,
                      generation_pixel_values) -> None:
        """Raise ValueError for combinations of inputs `forward` cannot take."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if sum(x is not None for x in (pixel_values, image_features, image_indices)) > 1:
            raise ValueError("pass at most one of pixel_values, image_features and image_indices")
        if generation_indices is not None and generation_pixel_values is not None:
            raise ValueError("pass generation_indices or generation_pixel_values, not both")
        has_images = any(x is not None for x in (pixel_values, image_features, image_indices, generation_indices,
                                                 generation_pixel_values))
        if inputs_embeds is not None and has_images:
            raise ValueError("image inputs need input_ids (to find their slots); inputs_embeds is for text only")

    def _padding_mask(self, inputs: torch.Tensor, attention_mask: torch.Tensor | None,
                      past_length: int) -> torch.BoolTensor:
        """The 2-D padding mask [B, past + new] (all real when None), checked against the backbone's context."""
        batch_size, num_queries = inputs.shape[:2]
        total = past_length + num_queries
        context = self.config.text_config.max_position_embeddings
        if total > context:
            raise ValueError(
                f"the sequence is {total} positions long ({past_length} cached + {num_queries} new, image slots "
                f"included) but the backbone's context is max_position_embeddings={context}; shorten the prompt or "
                "use fewer images")
        if attention_mask is None:
            return torch.ones(batch_size, total, dtype=torch.bool, device=inputs.device)
        if attention_mask.ndim != 2 or attention_mask.shape != (batch_size, total):
            raise ValueError(f"attention_mask must be a 2-D padding mask [B, past + new] = [{batch_size}, {total}], "
                             f"got {tuple(attention_mask.shape)}")
        return attention_mask.bool()

    def _resolve_image_inputs(self, pixel_values, image_features, image_indices, generation_indices,
                              generation_pixel_values, run_every_branch: bool = False
                              ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Whichever form the images came in → (understanding features [N_img, S², 40], span indices [M, N]).

        With `run_every_branch` the tokenizer paths this batch does not use run on a stand-in input, results dropped.
        """
        if pixel_values is not None or run_every_branch:
            features = self.get_image_features(self._or_zero_images(pixel_values))
            image_features = features if pixel_values is not None else image_features
        if image_indices is not None or run_every_branch:
            features = self.image_features_from_indices(self._or_zero_indices(image_indices))
            image_features = features if image_indices is not None else image_features
        if generation_pixel_values is not None or run_every_branch:
            indices = self.encode_generation_targets(self._or_zero_images(generation_pixel_values))
            generation_indices = indices if generation_pixel_values is not None else generation_indices
        return image_features, generation_indices

    def _image_logits(self, hidden_states: torch.Tensor, input_ids: torch.Tensor,
                      offsets: torch.Tensor) -> torch.Tensor | None:
        """Image-head logits [M, T, K] at the T code-predicting positions of each of the M spans (None if none)."""
        code_positions = (offsets >= 0) & (offsets < self.num_image_codes)
        if not code_positions.any():
            return None
        counts = torch.bincount(self._span_index(input_ids)[code_positions])
        if bool((counts != counts[0]).any()):
            raise ValueError(
                f"drawn-image spans in one batch must hold the same number of code positions, got {counts.tolist()}")
        return self.image_head(hidden_states[code_positions]).view(len(counts), int(counts[0]), -1)

    def _slot_loss(self, hidden_states: torch.Tensor, input_ids: torch.Tensor | None, offsets: torch.Tensor | None,
                   slot_labels: torch.Tensor) -> torch.Tensor | None:
        """`slot_label_loss` of `slot_head` at the understanding slots of hidden_states [B, L, hidden]."""
        if self.slot_head is None:
            raise ValueError("slot_labels were given but this model has no slot_head (config.slot_label_classes is "
                             "None); build it with `add_slot_head` (the stages' --slot-loss-weight)")
        classes = self.config.slot_label_classes
        expected = (len(classes), self.num_image_slots)
        if slot_labels.ndim != 3 or tuple(slot_labels.shape[1:]) != expected:
            raise ValueError(f"slot_labels must have shape [N_img, {expected[0]}, {expected[1]}] (one row per entry of "
                             f"slot_label_classes={classes}, one column per slot), got {tuple(slot_labels.shape)}")
        slots = (input_ids == self.config.image_token_id) & (offsets < 0)
        num_images = int(slots.sum()) // self.num_image_slots
        if num_images != slot_labels.shape[0]:
            raise ValueError(f"slot_labels hold {slot_labels.shape[0]} images but the input looks at {num_images}; "
                             "give one row per understood image in reading order")
        logits = self.slot_head(hidden_states[slots]).view(num_images, self.num_image_slots, -1)
        return slot_label_loss(logits, slot_labels.to(logits.device), classes)

    def add_slot_head(self, classes: list[int], weight: float = 1.0) -> None:
        """Give the model a `slot_head` for per-slot labels of `classes` (see `config.slot_label_classes`), weighted
        `weight` in the loss. A model that has one keeps it (the same classes only)."""
        classes = [int(c) for c in classes]
        if not classes or min(classes) < 2 or not weight >= 0:
            raise ValueError(f"slot head classes {classes} must be a non-empty list of counts >= 2 and its weight "
                             f"{weight!r} a number >= 0")
        if self.slot_head is not None and list(self.config.slot_label_classes) != classes:
            raise ValueError(f"the model's slot_head reads classes {self.config.slot_label_classes}, not {classes}")
        self.config.slot_label_classes, self.config.slot_loss_weight = classes, float(weight)
        if self.slot_head is None:
            device = self.image_head.weight.device
            self.slot_head = nn.Linear(self.config.text_config.hidden_size, sum(classes), device=device,
                                       dtype=self.image_head.weight.dtype)
            self._init_weights(self.slot_head)

    def _losses(self, logits: torch.Tensor, image_logits: torch.Tensor | None, labels: torch.Tensor,
                generation_indices: torch.Tensor | None, logits_to_keep: int | torch.Tensor,
                slot_loss: torch.Tensor | None = None,
                revealed_codes: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """`loss`, `text_loss`, `image_loss` and `slot_loss` (see the module docstring)."""
        if not isinstance(logits_to_keep, int) or logits_to_keep != 0:
            raise ValueError("labels need logits at every position; call with logits_to_keep=0")
        if labels.shape != logits.shape[:2]:
            raise ValueError(f"labels must have shape {tuple(logits.shape[:2])}, got {tuple(labels.shape)}")
        text_loss = next_token_loss(logits, labels)
        image_loss = None if image_logits is None else self._image_loss(image_logits, generation_indices,
                                                                         revealed_codes)
        weighted = [w * l for w, l in ((self.config.text_loss_weight, text_loss),
                                       (self.config.image_loss_weight, image_loss),
                                       (self.config.slot_loss_weight, slot_loss)) if l is not None]
        if not weighted:
            raise ValueError("labels were given but nothing is supervised: every label is -100 and there is no "
                             "drawn-image span")
        return {"loss": sum(weighted), "text_loss": text_loss, "image_loss": image_loss, "slot_loss": slot_loss}

    @staticmethod
    def _image_loss(image_logits: torch.Tensor, generation_indices: torch.Tensor,
                    revealed_codes: torch.Tensor | None = None) -> torch.Tensor:
        """Mean CE of image_logits [M, T, K] against the first T codes of generation_indices [M, ≥T], codes shown by
        revealed_codes [M, ≥T] left out."""
        num_spans, num_positions, codebook_size = image_logits.shape
        if generation_indices.shape[1] < num_positions:
            raise ValueError(
                f"the spans predict {num_positions} codes but generation_indices hold only "
                f"{generation_indices.shape[1]}; give the full indices of every supervised span")
        targets = generation_indices[:, :num_positions].to(image_logits.device)
        if revealed_codes is not None:
            targets = targets.masked_fill(revealed_codes[:, :num_positions].to(targets.device), IGNORE_INDEX)
        return F.cross_entropy(image_logits.float().reshape(-1, codebook_size), targets.reshape(-1))

    # ------------------------------------------------------------------ generation plumbing
    def generate(self, *args, suppress_tokens: list[int] | None = None, **kwargs):
        """`GenerationMixin.generate` that never emits `<image>`: the processor fills that placeholder with an image's
        slots, so a generated one would be a slot without an image (a weakly trained model does sample it)."""
        configured = self.generation_config.suppress_tokens if suppress_tokens is None else suppress_tokens
        return super().generate(*args, suppress_tokens=sorted({*(configured or []), self.config.image_token_id}),
                                **kwargs)

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        cache: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        is_first_iteration: bool | None = False,
        **kwargs,
    ):
        image_inputs = {name: kwargs.pop(name, None) for name in IMAGE_INPUT_NAMES}
        model_inputs = super().prepare_inputs_for_generation(
            input_ids, cache=cache, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
            is_first_iteration=is_first_iteration, **kwargs)
        # Images fill the prompt's slots once; later cached steps only see new text tokens. Without a cache every
        # step re-reads the whole prompt, slots included.
        if is_first_iteration or not kwargs.get("use_cache", True):
            model_inputs.update(image_inputs)
        return model_inputs

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """`PreTrainedModel.from_pretrained`, strict (see `unimodal.checkpoints`: a missing folder, another model type,
        a damaged file, missing or unexpected weights and non-finite values raise), after checking that a local
        checkpoint's image head and tokenizer codebook agree (a mismatch means the head predicts codes of a different
        tokenizer)."""
        directory = check_folder(pretrained_model_name_or_path, cls.config_class.model_type, cls.__name__)
        if directory is not None:
            check_checkpoint_codebook(directory)
        loaded = load_checked(super().from_pretrained, pretrained_model_name_or_path, cls.config_class.model_type,
                              cls.__name__, *model_args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        if directory is not None and os.path.isfile(os.path.join(directory, "processor_config.json")):
            model.processor = TokenFlowProcessor.from_pretrained(directory)
        return loaded

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Writes one folder: config, weights (backbone, adapters, image head, tokenizer; the SHA-256 of their data in
        the safetensors metadata) and, when the model holds its processor (`model.processor`), the text tokenizer with
        its chat template and the processor config."""
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            stamp_data_digests(save_directory)
        if self.processor is not None:
            self.processor.save_pretrained(save_directory)


def random_scale_reveal(num_spans: int, scales: list[int], prob: float, device=None,
                        generator: torch.Generator | None = None) -> torch.BoolTensor:
    """Training reveals [num_spans, Σs²]: each span is picked with probability `prob`; in a picked span every scale
    but the 1×1 shows each of its codes with a probability drawn uniformly per scale, so the model sees every stage
    of a scale drawn in rounds, from nothing shown to nearly all."""
    sizes = torch.tensor([s * s for s in scales], device=device)
    picked = torch.rand(num_spans, 1, device=device, generator=generator) < prob
    fraction = torch.rand(num_spans, len(scales), device=device, generator=generator) * picked
    fraction[:, sizes == 1] = 0
    per_code = fraction.repeat_interleave(sizes, dim=1)  # [M, Σs²]
    return torch.rand(per_code.shape, device=device, generator=generator) < per_code


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
    """Mean CE of logits [B, L, V] at position t against labels [B, L] at t+1 (-100 ignored); None if nothing counts."""
    targets = labels[:, 1:].to(logits.device)
    if not bool((targets != IGNORE_INDEX).any()):
        return None
    return F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX)


def slot_label_loss(logits: torch.Tensor, labels: torch.Tensor, classes) -> torch.Tensor | None:
    """Per-slot cross-entropy: logits [B, S², ΣC] against labels [B, R, S²], row r read from its own slice of
    `classes[r]` logits; the sum over rows of each row's mean over its labelled slots (-100 ignored; a row with none
    adds nothing). None when no slot is labelled."""
    if logits.shape[-1] != sum(classes):
        raise ValueError(f"logits have {logits.shape[-1]} classes per slot, slot_label_classes {list(classes)} need "
                         f"{sum(classes)}")
    terms = []
    for part, target in zip(logits.float().split(list(classes), -1), labels.unbind(1)):
        target = target.reshape(-1)
        if bool((target != IGNORE_INDEX).any()):
            terms.append(F.cross_entropy(part.reshape(target.shape[0], -1), target, ignore_index=IGNORE_INDEX))
    return sum(terms) if terms else None


def _checkpoint_shapes(directory: str, keys: tuple[str, ...]) -> dict[str, list[int]]:
    """Shapes of `keys` in the safetensors weights of `directory` (single file or sharded)."""
    index_file = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index_file):
        with open(index_file, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        files = {key: os.path.join(directory, weight_map[key]) for key in keys if key in weight_map}
    else:
        single = os.path.join(directory, "model.safetensors")
        files = {key: single for key in keys} if os.path.isfile(single) else {}
    shapes = {}
    for key, path in files.items():
        with safe_open(path, framework="pt") as f:
            if key in f.keys():
                shapes[key] = list(f.get_slice(key).get_shape())
    return shapes


def check_checkpoint_codebook(directory: str) -> None:
    """Raise ValueError if the checkpoint in `directory` has an image head whose width differs from its tokenizer's
    codebook size (weights or config)."""
    config_file = os.path.join(directory, "config.json")
    if not os.path.isfile(config_file):
        return
    config = read_json(config_file)
    if not isinstance(config, dict) or config.get("model_type") != TokenFlowMLLMConfig.model_type:
        return
    head_key, codebook_key = "image_head.weight", "image_tokenizer.quantize.embedding_vqkd.weight"
    shapes = _checkpoint_shapes(directory, (head_key, codebook_key))
    sizes = {"config tokenizer_config.codebook_size": config.get("tokenizer_config", {}).get("codebook_size")}
    if head_key in shapes:
        sizes["image head rows"] = shapes[head_key][0]
    if codebook_key in shapes:
        sizes["tokenizer codebook rows"] = shapes[codebook_key][0]
    known = {name: size for name, size in sizes.items() if size is not None}
    if len(set(known.values())) > 1:
        raise ValueError(
            f"checkpoint {directory!r} is inconsistent: {known}; the image head must predict exactly the codes of the "
            "bundled TokenFlow tokenizer (codes are not interchangeable between tokenizers)")


__all__ = [
    "ConvProjector",
    "FrozenTokenFlowTokenizer",
    "MultimodalProjector",
    "TokenFlowMLLM",
    "TokenFlowMLLMOutput",
    "TokenFlowMLLMPreTrainedModel",
    "build_projector",
    "check_checkpoint_codebook",
    "next_token_loss",
    "random_scale_reveal",
    "slot_label_loss",
    "sincos_2d",
]
