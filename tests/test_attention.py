"""Block-causal masks: the rule itself, and that Hugging Face backbones honour it (sdpa, eager, flex, KV cache)."""

import pytest
import torch
import transformers.integrations.flex_attention as hf_flex
from torch.nn.attention.flex_attention import create_mask, flex_attention
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from llm.attention import (
    append_scale_block,
    block_causal_mask_mod,
    build_block_causal_mask,
    image_span_length,
    span_block_ids,
    to_backbone_mask,
)
from llm.backbones import PostNormLlamaConfig, PostNormLlamaForCausalLM

SCALES = (1, 2, 3)  # 14 codes, spans of 16 positions
SPAN = 16


def tiny_backbone(kind: str, attn_implementation: str = "sdpa"):
    common = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=256,
    )
    config_class, model_class = {
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "llama": (LlamaConfig, LlamaForCausalLM),
        "postnorm_llama": (PostNormLlamaConfig, PostNormLlamaForCausalLM),
    }[kind]
    model = model_class(config_class(**common)).eval()
    model.set_attn_implementation(attn_implementation)
    return model


def two_sample_batch():
    """Sample 0: 3 left pads, text 4, span, text 3, span, text 2. Sample 1: text 2, span, text 5, span, text 1,
    4 right pads. Both 44 long; returns (boi_mask, padding_mask, span starts)."""
    length = 44
    starts = [[7, 26], [2, 23]]
    boi = torch.zeros(2, length, dtype=torch.bool)
    for sample, sample_starts in enumerate(starts):
        boi[sample, sample_starts] = True
    padding = torch.ones(2, length, dtype=torch.bool)
    padding[0, :3] = False
    padding[1, 40:] = False
    return boi, padding, starts


def expected_block_ids(length, starts, scales):
    """Written out from the documented layout: <boi> = scale 0, then s_k^2 positions per scale k, then two
    causal positions (end-of-image slot and <eoi>)."""
    ids = [[-1] * length for _ in starts]
    for sample, sample_starts in enumerate(starts):
        for span, start in enumerate(sample_starts):
            position = start
            for k, side in enumerate(scales):
                count = 1 if k == 0 else side * side
                for _ in range(count):
                    ids[sample][position] = span * len(scales) + k
                    position += 1
    return torch.tensor(ids)


def brute_force_mask(block_ids, padding):
    batch, length = block_ids.shape
    mask = torch.zeros(batch, 1, length, length, dtype=torch.bool)
    for b in range(batch):
        for q in range(length):
            for k in range(length):
                if k == q:
                    mask[b, 0, q, k] = True  # padded queries see themselves only
                    continue
                same_block = block_ids[b, q] >= 0 and block_ids[b, k] == block_ids[b, q]
                mask[b, 0, q, k] = bool(padding[b, k]) and (k <= q or bool(same_block))
    return mask


# ----------------------------------------------------------------------------------------------- the rule


def test_span_block_ids_follow_layout():
    boi, _, starts = two_sample_batch()
    assert image_span_length(SCALES) == SPAN
    assert torch.equal(span_block_ids(boi, SCALES), expected_block_ids(44, starts, SCALES))


def test_span_cut_by_sequence_end_keeps_prefix_ids():
    boi, _, _ = two_sample_batch()
    full = span_block_ids(boi, SCALES)
    for cut in (8, 12, 30, 33):
        assert torch.equal(span_block_ids(boi[:, :cut], SCALES), full[:, :cut])


def test_span_block_ids_reject_bad_input():
    boi = torch.zeros(1, 40, dtype=torch.bool)
    boi[0, [2, 2 + SPAN - 1]] = True
    with pytest.raises(ValueError, match="overlap"):
        span_block_ids(boi, SCALES)
    boi[0, 2 + SPAN - 1] = False
    boi[0, 2 + SPAN] = True  # back to back is fine
    span_block_ids(boi, SCALES)
    with pytest.raises(ValueError, match="start with 1"):
        span_block_ids(boi, (2, 3))
    with pytest.raises(ValueError, match="positive ints"):
        span_block_ids(boi, (1, 0))


def test_mask_equals_brute_force_rule():
    boi, padding, _ = two_sample_batch()
    block_ids = span_block_ids(boi, SCALES)
    mask = build_block_causal_mask(block_ids, padding)
    assert mask.shape == (2, 1, 44, 44) and mask.dtype == torch.bool
    assert torch.equal(mask, brute_force_mask(block_ids, padding))
    # The last rows alone are the rows a cached forward needs.
    assert torch.equal(build_block_causal_mask(block_ids, padding, num_queries=5), mask[:, :, -5:])


def test_appended_scale_block_mask_equals_rows_of_full_mask():
    boi, padding, _ = two_sample_batch()
    block_ids = span_block_ids(boi, SCALES)
    full = build_block_causal_mask(block_ids, padding)
    start, size = 7 + 5, 9  # sample 0's first span, the 3x3 block
    step = build_block_causal_mask(*append_scale_block(padding[:1, :start], size), num_queries=size)
    assert torch.equal(step, full[:1, :, start : start + size, : start + size])


def test_mask_inputs_are_validated():
    ids = torch.full((1, 4), -1)
    with pytest.raises(ValueError, match="padding_mask"):
        build_block_causal_mask(ids, torch.ones(1, 4))
    with pytest.raises(ValueError, match="num_queries"):
        build_block_causal_mask(ids, torch.ones(1, 4, dtype=torch.bool), num_queries=5)
    with pytest.raises(ValueError, match="flash_attention_2"):
        to_backbone_mask(torch.ones(1, 1, 4, 4, dtype=torch.bool), "flash_attention_2")


def test_eager_mask_is_additive():
    mask = torch.tensor([[[[True, False], [True, True]]]])
    additive = to_backbone_mask(mask, "eager", torch.bfloat16)
    assert additive.dtype == torch.bfloat16
    assert additive[0, 0, 0, 0] == 0 and additive[0, 0, 0, 1] == torch.finfo(torch.bfloat16).min


# ----------------------------------------------------------------------------------------------- backbones


@pytest.fixture(params=["qwen2", "llama", "postnorm_llama"])
def backbone(request):
    return tiny_backbone(request.param)


@pytest.fixture
def uncompiled_flex(monkeypatch):
    """Transformers always wraps flex attention in torch.compile, ~20 s per cold start on a CPU; run the same
    kernel uncompiled (same semantics, unfused) instead. Yields the block masks the backbone passed in."""
    block_masks = []

    def flex_attention_uncompiled(query, key, value, training=False, **kwargs):
        block_masks.append(kwargs["block_mask"])
        assert kwargs["block_mask"] is not None
        return flex_attention(query, key, value, **kwargs)

    monkeypatch.setattr(hf_flex, "compile_friendly_flex_attention", flex_attention_uncompiled)
    return block_masks


def logits(model, mask, attn_implementation, **inputs):
    model.set_attn_implementation(attn_implementation)
    with torch.no_grad():
        return model(attention_mask=to_backbone_mask(mask, attn_implementation), **inputs).logits


def test_sdpa_and_eager_agree_and_text_is_plain_causal(backbone):
    boi, padding, _ = two_sample_batch()
    mask = build_block_causal_mask(span_block_ids(boi, SCALES), padding)
    ids = torch.randint(0, 128, (2, 44))
    sdpa = logits(backbone, mask, "sdpa", input_ids=ids)
    eager = logits(backbone, mask, "eager", input_ids=ids)
    torch.testing.assert_close(sdpa, eager, atol=1e-5, rtol=1e-5)

    text_mask = build_block_causal_mask(torch.full((2, 44), -1), torch.ones(2, 44, dtype=torch.bool))
    with torch.no_grad():
        causal = backbone(input_ids=ids).logits
    for implementation in ("sdpa", "eager"):
        text = logits(backbone, text_mask, implementation, input_ids=ids)
        torch.testing.assert_close(text, causal, atol=1e-5, rtol=1e-5)

    # Left and right padding in pure text: the same as the backbone's own 2-D padding mask on real positions.
    text_padded = build_block_causal_mask(torch.full((2, 44), -1), padding)
    with torch.no_grad():
        own = backbone(input_ids=ids, attention_mask=padding.long()).logits
    ours = logits(backbone, text_padded, "sdpa", input_ids=ids)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours[padding], own[padding], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_backbone_honours_block_mask(backbone, attn_implementation):
    boi, padding, _ = two_sample_batch()
    mask = build_block_causal_mask(span_block_ids(boi, SCALES), padding)
    embeds = torch.randn(2, 44, 64)
    base = logits(backbone, mask, attn_implementation, inputs_embeds=embeds)

    # Sample 0, first span starts at 7: block 1 = 8..11, block 2 (3x3) = 12..20.
    changed = embeds.clone()
    changed[0, 20] += torch.randn(64)
    moved = logits(backbone, mask, attn_implementation, inputs_embeds=changed)
    torch.testing.assert_close(moved[0, :12], base[0, :12], atol=1e-6, rtol=0)  # earlier blocks and text
    torch.testing.assert_close(moved[1], base[1], atol=1e-6, rtol=0)  # the other sample
    difference = (moved[0, 12:20] - base[0, 12:20]).abs().amax(dim=-1)
    assert (difference > 1e-4).all(), "positions of the same block before the change must see it"


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager", "flex_attention"])
def test_cached_scale_by_scale_equals_full_forward(backbone, attn_implementation, uncompiled_flex):
    # Left-padded prompts of 6 and 4 tokens, the last being <boi>, then blocks 4 and 9, end-of-image slot, <eoi>.
    prompt_length, steps = 6, [4, 9, 1, 1]
    length = prompt_length + sum(steps)
    padding = torch.ones(2, length, dtype=torch.bool)
    padding[1, :2] = False
    boi = torch.zeros(2, length, dtype=torch.bool)
    boi[:, prompt_length - 1] = True
    block_ids = span_block_ids(boi, SCALES)
    embeds = torch.randn(2, length, 64)
    full = logits(backbone, build_block_causal_mask(block_ids, padding), attn_implementation, inputs_embeds=embeds)

    cache = DynamicCache(config=backbone.config)
    prompt_mask = build_block_causal_mask(span_block_ids(boi[:, :prompt_length], SCALES), padding[:, :prompt_length])
    pieces = [
        logits(backbone, prompt_mask, attn_implementation, inputs_embeds=embeds[:, :prompt_length],
               cache=cache, use_cache=True)
    ]
    start = prompt_length
    for size in steps:
        step_mask = build_block_causal_mask(*append_scale_block(padding[:, :start], size), num_queries=size)
        pieces.append(
            logits(backbone, step_mask, attn_implementation, inputs_embeds=embeds[:, start : start + size],
                   cache=cache, use_cache=True)
        )
        start += size
    assert cache.get_seq_length() == length
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------- flex attention


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_block_masks_match_dense_mask():
    scales = (1, 2, 4, 6, 8)  # 121 codes: spans longer than one 128-wide flex block
    length = 300
    boi = torch.zeros(2, length, dtype=torch.bool)
    boi[0, [10, 140]] = True
    boi[1, [0, 170]] = True
    padding = torch.ones(2, length, dtype=torch.bool)
    padding[0, :5] = False
    padding[1, 290:] = False
    block_ids = span_block_ids(boi, scales)
    dense = build_block_causal_mask(block_ids, padding)

    from_rule = create_mask(block_causal_mask_mod(block_ids, padding), 2, 1, length, length, device="cpu")
    assert torch.equal(from_rule, dense)
    block_mask = to_backbone_mask(dense, "flex_attention")
    assert block_mask.shape == (2, 1, length, length)
    assert torch.equal(create_mask(block_mask.mask_mod, 2, 1, length, length, device="cpu"), dense)

    query, key, value = (torch.randn(2, 2, length, 8) for _ in range(3))
    expected = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=dense)
    flex = flex_attention(query, key, value, block_mask=block_mask)
    torch.testing.assert_close(flex, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_backbone_matches_sdpa(backbone, uncompiled_flex):
    boi, padding, _ = two_sample_batch()
    block_ids = span_block_ids(boi, SCALES)
    mask = build_block_causal_mask(block_ids, padding)
    embeds = torch.randn(2, 44, 64)
    expected = logits(backbone, mask, "sdpa", inputs_embeds=embeds)
    flex = logits(backbone, mask, "flex_attention", inputs_embeds=embeds)
    assert len(uncompiled_flex) == backbone.config.num_hidden_layers
    torch.testing.assert_close(flex, expected, atol=1e-5, rtol=1e-5)
