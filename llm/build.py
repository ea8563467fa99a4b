"""Assembling a TokenFlowMLLM from parts, and the tiny random model used by tests, benchmarks and quick checks."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel, Qwen2Config

from tokenizer.configuration_tokenflow import TokenFlowConfig
from tokenizer.modeling_tokenflow import TokenFlowTokenizer

from .configuration_tokenflow_mllm import TokenFlowMLLMConfig
from .modeling_tokenflow_mllm import TokenFlowMLLM
from .processing_tokenflow_mllm import CHAT_TEMPLATES, TokenFlowProcessor, add_image_special_tokens
from .text_tokenizer import build_shapesworld_text_tokenizer

TINY_BACKBONES = ("qwen2", "llama")
# Named decoder shapes for new models with random weights (the training stages offer them as backbone names). The
# ShapesWorld shapes initialise every linear layer and embedding at N(0, 1/width): at the configs' usual 0.02, a
# narrow decoder's attention logits start near zero and VQA's question-conditioned lookups stall for thousands of
# steps (README, LLM rows 9-10).
BACKBONE_SHAPES = {
    "shapesworld-tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, initializer_range=64 ** -0.5),
    "shapesworld-narrow": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                               num_key_value_heads=2, initializer_range=128 ** -0.5),
    "shapesworld-small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                              num_key_value_heads=4, initializer_range=256 ** -0.5),
    "qwen2-0.5b-shaped": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                              num_key_value_heads=2),
}


def prepare_text_tokenizer(text_tokenizer, chat_format: str = "chatml") -> dict[str, int]:
    """Add `<image>`, `<boi>`, `<eoi>` (and a pad if missing) and the chat template to `text_tokenizer`, in place;
    returns the special token ids as `TokenFlowMLLMConfig` fields."""
    if chat_format not in CHAT_TEMPLATES:
        raise ValueError(f"chat_format={chat_format!r}; allowed: {sorted(CHAT_TEMPLATES)}")
    special_ids = add_image_special_tokens(text_tokenizer)
    text_tokenizer.chat_template = CHAT_TEMPLATES[chat_format]
    return special_ids


def assemble(
    language_model: PreTrainedModel,
    text_tokenizer,
    image_tokenizer: TokenFlowTokenizer,
    chat_format: str = "chatml",
    **config_kwargs,
) -> tuple[TokenFlowMLLM, TokenFlowProcessor]:
    """Wrap a causal-LM backbone and a TokenFlow tokenizer into a TokenFlowMLLM and its processor.

    Adds `<image>`, `<boi>`, `<eoi>` (and a pad if missing) to `text_tokenizer`, sets its chat template, resizes the
    backbone's embeddings to the new vocabulary (new rows get the mean of the old ones, as the reference does for its
    pad row), and builds the adapters and image head freshly initialised.

    Args:
        language_model: any `AutoModelForCausalLM` (e.g. loaded from a local Qwen2 / Llama folder).
        text_tokenizer: its fast tokenizer (modified in place).
        image_tokenizer: the (trained) TokenFlow tokenizer; it is frozen inside the model.
        chat_format: "chatml" or "vicuna" (see `llm.processing_tokenflow_mllm`).
        config_kwargs: further `TokenFlowMLLMConfig` fields (`understanding_features`, `image_resize_mode`, loss
            weights, ...).
    """
    special_ids = prepare_text_tokenizer(text_tokenizer, chat_format)
    if language_model.get_input_embeddings().num_embeddings < len(text_tokenizer):
        language_model.resize_token_embeddings(len(text_tokenizer), mean_resizing=True)
    config = TokenFlowMLLMConfig(
        text_config=language_model.config, tokenizer_config=image_tokenizer.config, **special_ids, **config_kwargs)
    model = TokenFlowMLLM(config, language_model=language_model, image_tokenizer=image_tokenizer)
    processor = TokenFlowProcessor.from_model_config(config, text_tokenizer)
    model.processor = processor
    return model, processor


def tiny_backbone_config(backbone: str, vocab_size: int, max_position_embeddings: int = 1024):
    """Config of a 2-layer, 64-wide Qwen2 or Llama decoder (`BACKBONE_SHAPES["shapesworld-tiny"]`)."""
    shape = dict(vocab_size=vocab_size, max_position_embeddings=max_position_embeddings, tie_word_embeddings=False,
                 **BACKBONE_SHAPES["shapesworld-tiny"])
    if backbone == "qwen2":
        return Qwen2Config(**shape)
    if backbone == "llama":
        return LlamaConfig(**shape)
    raise ValueError(f"backbone={backbone!r}; allowed: {TINY_BACKBONES}")


def build_tiny(
    seed: int = 0, backbone: str = "qwen2", max_position_embeddings: int = 1024, **config_kwargs
) -> tuple[TokenFlowMLLM, TokenFlowProcessor]:
    """A tiny random TokenFlowMLLM and its processor: the `tiny` TokenFlow preset (64 px, scales 1-2-3-4-6-8, 2048
    codes), the ShapesWorld text tokenizer, and a 2-layer Qwen2 (ChatML) or Llama (Vicuna template) backbone.

    Same seed → same weights. The model is in eval mode.
    """
    if backbone not in TINY_BACKBONES:
        raise ValueError(f"backbone={backbone!r}; allowed: {TINY_BACKBONES}")
    chat_format = "chatml" if backbone == "qwen2" else "vicuna"
    text_tokenizer = build_shapesworld_text_tokenizer(chat_format=chat_format)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        image_tokenizer = TokenFlowTokenizer(TokenFlowConfig.from_preset("tiny"))
        language_model = AutoModelForCausalLM.from_config(
            tiny_backbone_config(backbone, len(text_tokenizer), max_position_embeddings), attn_implementation="sdpa")
        model, processor = assemble(language_model, text_tokenizer, image_tokenizer, chat_format, **config_kwargs)
    finally:
        torch.random.set_rng_state(generator_state)
    return model.eval(), processor


__all__ = ["BACKBONE_SHAPES", "TINY_BACKBONES", "assemble", "build_tiny", "prepare_text_tokenizer", "tiny_backbone_config"]
