"""Attention masks for sequences that mix text with drawn-image spans.

Layout of one drawn-image span (``K`` scales ``s_0 = 1, s_1, ..., s_{K-1}``, ``N = sum(s_k^2)`` codes)::

    offset 0                 <boi>                 predicts the single 1x1 code (scale 0)
    offsets 1 .. N-1         next-scale inputs     the s_k^2 positions of block k predict scale k, k = 1..K-1
    offset N                 end-of-image slot     predicts <eoi>                      (plain causal)
    offset N+1               <eoi>                 an ordinary text token from here on (plain causal)

so a span is ``N + 2`` positions long (``image_span_length``). Position ``i`` of block ``k`` predicts code ``i``
of scale ``k`` in raster order.

Masks are described by two per-position tensors:

- ``block_ids: LongTensor [B, L]``: -1 for ordinary causal positions, otherwise a non-negative id shared by the
  positions of one scale block and unique within the sample across all of its spans. ``span_block_ids`` gives
  block ``k`` of the ``j``-th span of a sample the id ``j * K + k``, so ``block_id % K`` is the scale a position
  predicts (the ``<boi>`` position is block 0 of its span; a one-position block is the same as plain causal).
- ``padding_mask: BoolTensor [B, L]``: True for real tokens; padding may sit on the left, right or both.

The rule (query ``q``, key ``k``)::

    attend(q, k) = real[k] and (k <= q or (block[q] >= 0 and block[k] == block[q]))   or   k == q

The trailing ``k == q`` only matters for padded queries: they attend to themselves, so no row of the mask is
empty and SDPA never produces NaNs (their outputs are meaningless and must be ignored by the loss).

Feeding a mask to a Hugging Face backbone (transformers 5.x, Llama/Qwen2 and every model built on
``masking_utils.create_causal_mask``): a 4-D ``attention_mask`` is returned as-is by ``create_causal_mask`` and
reaches the attention function untouched, so pass ``to_backbone_mask(mask, config._attn_implementation, dtype)`` as
``attention_mask=`` to the backbone's ``forward``:

- ``"sdpa"``: the boolean mask itself (True = attend); SDPA's ``is_causal`` is switched off because a mask is given.
- ``"eager"``: eager attention *adds* the mask to the scores, so it must be additive float (0 / dtype minimum) in
  the dtype of the attention scores, i.e. the model's compute dtype. A boolean mask would be silently wrong.
- ``"flex_attention"``: a ``BlockMask``; a plain tensor would be treated as an additive score bias.
- flash-attention kernels only accept 2-D padding masks and cannot express block-causal attention.

A 4-D mask is also used unchanged by sliding-window layers (e.g. Qwen2 with ``use_sliding_window=True``), so such
a window is not applied; released Qwen2.5 configs have it off. ``generate`` cannot extend a custom 4-D mask step by
step, so sequences with image spans are run by calling ``forward`` directly.

``position_ids`` may be omitted: the backbone then numbers positions ``past_length .. past_length + Q - 1`` for every
sample (left pads included), which is what RoPE needs for relative positions and matches between a full forward
and a cached one. Whatever numbering the caller chooses, a cached step must continue it exactly.

KV cache: with ``cache`` holding ``P`` positions and ``Q`` new inputs, the mask must be
``[B, 1, Q, P + Q]`` (queries = the new positions, keys = cached + new). When drawing, every forward after the
prompt covers exactly one scale block, so its mask is "every real cached key and every new key", the mask of
``append_scale_block(padding_mask_of_cache, Q)``. The prompt forward itself takes
``build_block_causal_mask`` on the prompt (its ``<boi>`` ends it). Both are rows of the full-sequence mask, which
is why a cached run reproduces a full forward. Pass ``cache=cache, use_cache=True`` (a
``transformers.DynamicCache``) with every such forward; a text token decoded after an image is a block of one,
``append_scale_block(padding_mask_of_cache, 1)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

from .sampling import is_int

__all__ = [
    "SUPPORTED_ATTN_IMPLEMENTATIONS",
    "block_causal_mask_mod",
    "append_scale_block",
    "build_block_causal_mask",
    "image_span_length",
    "span_block_ids",
    "to_backbone_mask",
]

SUPPORTED_ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention")

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _check_scales(scales: Sequence[int]) -> list[int]:
    scales = list(scales)
    if not scales or any(not is_int(s) or s < 1 for s in scales):
        raise ValueError(f"scales must be a non-empty sequence of positive ints, got {scales!r}")
    scales = [int(s) for s in scales]
    if scales[0] != 1:
        raise ValueError(f"scales must start with 1 (the <boi> position predicts a single 1x1 code), got {scales!r}")
    return scales


def image_span_length(scales: Sequence[int]) -> int:
    """Positions one drawn-image span occupies: ``<boi>``, the ``sum(s^2) - 1`` next-scale inputs, the
    end-of-image slot and ``<eoi>``, i.e. ``sum(s^2) + 2``."""
    return sum(s * s for s in _check_scales(scales)) + 2


def span_block_ids(boi_mask: torch.Tensor, scales: Sequence[int]) -> torch.Tensor:
    """Block ids for every span that starts at a ``<boi>`` position.

    Args:
        boi_mask: ``BoolTensor [B, L]``, True at each ``<boi>`` position.
        scales: side of each scale, starting with 1 (e.g. ``(1, 2, 4, 6, 8, 10, 12, 14, 16)``).

    Returns:
        ``LongTensor [B, L]``: ``j * K + k`` on the positions that predict scale ``k`` of the sample's ``j``-th
        span, -1 everywhere else. A span cut off by the end of the sequence (e.g. a prompt ending in ``<boi>``)
        keeps the ids of the positions it has, so a prefix of a sequence gets the prefix of its block ids.

    Raises:
        ValueError: if two spans of a sample overlap, or ``scales`` is invalid.
    """
    if boi_mask.dim() != 2 or boi_mask.dtype != torch.bool:
        raise ValueError(f"boi_mask must be a bool tensor [B, L], got {boi_mask.dtype} {tuple(boi_mask.shape)}")
    scales = _check_scales(scales)
    device = boi_mask.device
    num_scales = len(scales)
    span_length = image_span_length(scales)
    num_predicting = span_length - 2

    positions = torch.arange(boi_mask.shape[1], device=device)
    boi_positions = torch.where(boi_mask, positions, -1)
    last_boi = boi_positions.cummax(dim=1).values  # [B, L], -1 before the first span
    span_index = boi_mask.long().cumsum(dim=1) - 1  # [B, L]

    # Two <boi> closer than a span length would make one span swallow the next one's start.
    previous_boi = torch.where(boi_mask, torch.nn.functional.pad(last_boi[:, :-1], (1, 0), value=-1), -1)
    overlapping = boi_mask & (previous_boi >= 0) & (positions - previous_boi < span_length)
    if overlapping.any():
        sample, position = overlapping.nonzero()[0].tolist()
        raise ValueError(
            f"image spans overlap in sample {sample}: <boi> at position {position} is inside the span that starts "
            f"at {int(previous_boi[sample, position])} (a span is {span_length} positions for scales {scales})"
        )

    # offset -> scale it predicts: offset 0 is <boi> (scale 0); scale k then takes s_k^2 offsets.
    scale_of_offset = torch.repeat_interleave(
        torch.arange(num_scales, device=device), torch.tensor([s * s for s in scales], device=device)
    )
    offset = positions - last_boi  # [B, L]
    in_image = (last_boi >= 0) & (offset < num_predicting)
    scale = scale_of_offset[offset.clamp(0, num_predicting - 1)]
    return torch.where(in_image, span_index * num_scales + scale, -1)


def block_causal_mask_mod(block_ids: torch.Tensor, padding_mask: torch.Tensor, query_offset: int = 0) -> MaskMod:
    """The attention rule as a flex-attention ``mask_mod`` ``(batch, head, q, kv) -> bool``.

    This is the single definition of the rule: ``build_block_causal_mask`` evaluates it on broadcast index
    grids, and ``create_block_mask(block_causal_mask_mod(...), B, None, Q, K)`` builds a flex ``BlockMask``
    straight from the block ids without a dense mask (useful for very long sequences).

    Args:
        block_ids: ``LongTensor [B, K]`` over all key positions.
        padding_mask: ``BoolTensor [B, K]``, True = real token.
        query_offset: position of query 0 among the keys (``K - Q`` when the queries are the last ``Q`` positions).
    """

    def mask_mod(batch: torch.Tensor, head: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        q_position = q + query_offset
        q_block = block_ids[batch, q_position]
        same_block = (q_block >= 0) & (block_ids[batch, kv] == q_block)
        return (padding_mask[batch, kv] & ((kv <= q_position) | same_block)) | (kv == q_position)

    return mask_mod


def _check_block_inputs(block_ids: torch.Tensor, padding_mask: torch.Tensor) -> None:
    if block_ids.dim() != 2 or block_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"block_ids must be an integer tensor [B, L], got {block_ids.dtype} {tuple(block_ids.shape)}")
    if padding_mask.dtype != torch.bool or padding_mask.shape != block_ids.shape:
        raise ValueError(
            f"padding_mask must be a bool tensor shaped like block_ids {tuple(block_ids.shape)}, "
            f"got {padding_mask.dtype} {tuple(padding_mask.shape)}"
        )


def build_block_causal_mask(
    block_ids: torch.Tensor, padding_mask: torch.Tensor, num_queries: int | None = None
) -> torch.Tensor:
    """Dense boolean mask (True = attend) following the rule in the module docstring.

    Args:
        block_ids: ``LongTensor [B, L]`` (see ``span_block_ids``).
        padding_mask: ``BoolTensor [B, L]``, True = real token.
        num_queries: keep only the rows of the last ``Q`` positions (the new inputs of a cached forward whose
            cache holds the first ``L - Q``); all ``L`` when None.

    Returns:
        ``BoolTensor [B, 1, Q, L]``.
    """
    _check_block_inputs(block_ids, padding_mask)
    batch_size, length = block_ids.shape
    num_queries = length if num_queries is None else num_queries
    if not is_int(num_queries) or not 1 <= num_queries <= length:
        raise ValueError(f"num_queries must be in [1, {length}] (the sequence length), got {num_queries}")
    device = block_ids.device
    mask_mod = block_causal_mask_mod(block_ids, padding_mask, query_offset=length - num_queries)
    batch = torch.arange(batch_size, device=device).view(-1, 1, 1, 1)
    head = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=device)
    q = torch.arange(num_queries, device=device).view(1, 1, -1, 1)
    kv = torch.arange(length, device=device).view(1, 1, 1, -1)
    return mask_mod(batch, head, q, kv)


def append_scale_block(past_padding_mask: torch.Tensor, num_new: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block ids and padding of a cached forward over one new scale block: each new query sees every real cached key
    and every new key (all new positions are real and form one block). The drawing loop's mask inputs.

    Args:
        past_padding_mask: ``BoolTensor [B, P]``, padding of the ``P`` cached positions (e.g. a left-padded prompt).
        num_new: number of new positions ``N`` (``s^2`` for a scale block, 1 for a single token).

    Returns:
        ``(block_ids [B, P + N], padding_mask [B, P + N])``: -1 on the cached positions and 0 on the new ones, and the
        cached padding followed by ``N`` real positions; ``build_block_causal_mask(..., num_queries=N)`` of them is
        ``[B, 1, N, P + N]``.
    """
    if past_padding_mask.dim() != 2 or past_padding_mask.dtype != torch.bool:
        raise ValueError(
            f"past_padding_mask must be a bool tensor [B, P], got {past_padding_mask.dtype} "
            f"{tuple(past_padding_mask.shape)}"
        )
    if not is_int(num_new) or num_new < 1:
        raise ValueError(f"num_new must be a positive int, got {num_new!r}")
    batch_size, past_length = past_padding_mask.shape
    device = past_padding_mask.device
    block_ids = torch.cat(
        [
            torch.full((batch_size, past_length), -1, dtype=torch.long, device=device),
            torch.zeros(batch_size, num_new, dtype=torch.long, device=device),
        ],
        dim=1,
    )
    padding_mask = torch.cat(
        [past_padding_mask, torch.ones(batch_size, num_new, dtype=torch.bool, device=device)], dim=1
    )
    return block_ids, padding_mask


def to_backbone_mask(
    mask: torch.Tensor, attn_implementation: str, dtype: torch.dtype = torch.float32
) -> torch.Tensor | BlockMask:
    """Convert a boolean ``[B, 1, Q, K]`` mask into what ``attn_implementation`` expects as ``attention_mask``.

    Args:
        mask: ``BoolTensor [B, 1, Q, K]``, True = attend (``build_block_causal_mask``).
        attn_implementation: the backbone's ``config._attn_implementation``.
        dtype: compute dtype of the attention scores; used only for the additive ``"eager"`` mask.

    Returns:
        ``"sdpa"``: the bool mask; ``"eager"``: float ``[B, 1, Q, K]`` with 0 (attend) / ``finfo(dtype).min``;
        ``"flex_attention"``: a ``BlockMask`` over ``B`` batches, all heads, ``Q`` queries and ``K`` keys.
    """
    if mask.dim() != 4 or mask.dtype != torch.bool or mask.shape[1] != 1:
        raise ValueError(f"mask must be a bool tensor [B, 1, Q, K], got {mask.dtype} {tuple(mask.shape)}")
    if attn_implementation == "sdpa":
        return mask
    if attn_implementation == "eager":
        if not dtype.is_floating_point:
            raise ValueError(f"dtype for an eager mask must be a floating dtype, got {dtype}")
        zero = torch.zeros((), dtype=dtype, device=mask.device)
        return torch.where(mask, zero, torch.finfo(dtype).min)
    if attn_implementation == "flex_attention":
        batch_size, _, num_queries, num_keys = mask.shape

        def mask_mod(batch, head, q, kv):
            return mask[batch, 0, q, kv]

        return create_block_mask(mask_mod, batch_size, None, num_queries, num_keys, device=mask.device)
    raise ValueError(
        f"attn_implementation {attn_implementation!r} cannot take a block-causal mask; "
        f"use one of {SUPPORTED_ATTN_IMPLEMENTATIONS}"
    )
