"""TokenFlowMLLMConfig: one causal LM backbone + one frozen TokenFlow image tokenizer, and the glue between them."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from tokenizer.configuration_tokenflow import RESIZE_MODES, TokenFlowConfig

UNDERSTANDING_FEATURES = ("semantic", "joint")
# Label of positions that carry no text loss (slots, prompts, padding); the value PyTorch's cross-entropy skips.
IGNORE_INDEX = -100
PROJECTOR_TYPES = ("mlp2x_gelu",)


@strict
class TokenFlowMLLMConfig(PreTrainedConfig):
    r"""Configuration of a [`TokenFlowMLLM`].

    Args:
        text_config: config of any causal-LM backbone (a dict with `model_type`, or a config object); built with
            `AutoModelForCausalLM.from_config`, so Qwen2, Llama and any registered decoder work unchanged.
        tokenizer_config: [`TokenFlowConfig`] of the frozen image tokenizer (its scales, codebook size and grid fix
            the number of image slots, the span length and the image head's width).
        understanding_features: which part of the tokenizer's quantized features f̂ the understanding projector
            reads: `"semantic"` (the 32-d semantic half) or `"joint"` (all 40 dims, as the reference does).
        projector_type: architecture of both input projectors; `"mlp2x_gelu"` = Linear · GELU · Linear.
        image_resize_mode: how the processor fits images to the tokenizer's square input (`"resize"` stretches,
            `"pad"` pads to a square with (127, 127, 127) first, `"center_crop"` crops); None = the tokenizer's own
            mode. Converted reference understanding models use `"pad"`, as the reference does at inference.
        image_token_id: id of `<image>`, the image feature slot (understanding slots and drawn-image span slots).
        boi_token_id / eoi_token_id: ids of `<boi>` / `<eoi>`, which open and close a drawn-image span.
        pad_token_id: id of the padding token of the text tokenizer.
        image_loss_weight / text_loss_weight: weights of the image-code and text cross-entropies in `loss`.
    """

    model_type = "tokenflow_mllm"
    sub_configs_defaults = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2"),
        "tokenizer_config": SubConfigSpec(config_class=TokenFlowConfig),
    }

    text_config: dict | PreTrainedConfig | None = None
    tokenizer_config: dict | PreTrainedConfig | None = None
    understanding_features: str = "semantic"
    projector_type: str = "mlp2x_gelu"
    image_resize_mode: str | None = None
    image_token_id: int | None = None
    boi_token_id: int | None = None
    eoi_token_id: int | None = None
    pad_token_id: int | None = None
    image_loss_weight: float = 1.0
    text_loss_weight: float = 1.0
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.understanding_features not in UNDERSTANDING_FEATURES:
            raise ValueError(
                f"understanding_features={self.understanding_features!r}; allowed: {UNDERSTANDING_FEATURES}")
        if self.projector_type not in PROJECTOR_TYPES:
            raise ValueError(f"projector_type={self.projector_type!r}; allowed: {PROJECTOR_TYPES}")
        if self.image_resize_mode is not None and self.image_resize_mode not in RESIZE_MODES:
            raise ValueError(f"image_resize_mode={self.image_resize_mode!r}; allowed: None (the tokenizer's own mode) "
                             f"or one of {RESIZE_MODES}")
        for name in ("image_loss_weight", "text_loss_weight"):
            value = getattr(self, name)
            if not value >= 0:
                raise ValueError(f"{name}={value!r} must be a number >= 0")
        special_ids = {"image_token_id": self.image_token_id, "boi_token_id": self.boi_token_id,
                       "eoi_token_id": self.eoi_token_id}
        given = [v for v in special_ids.values() if v is not None]
        if len(set(given)) != len(given):
            raise ValueError(f"the image special tokens must have distinct ids, got {special_ids}")

    @property
    def understanding_dim(self) -> int:
        """Width of the features the understanding projector reads (32 for "semantic", 40 for "joint")."""
        if self.understanding_features == "semantic":
            return self.tokenizer_config.semantic_code_dim
        return self.tokenizer_config.code_dim

    @property
    def num_image_slots(self) -> int:
        """`<image>` slots per understood image: S² (the last scale's grid)."""
        return self.tokenizer_config.grid_size**2

    @property
    def num_image_codes(self) -> int:
        """Codes per drawn image: Σs²."""
        return self.tokenizer_config.num_tokens


__all__ = ["IGNORE_INDEX", "PROJECTOR_TYPES", "UNDERSTANDING_FEATURES", "TokenFlowMLLMConfig"]
