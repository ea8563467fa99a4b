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
# The understanding projector may also mix neighbouring slots: one slot of a small tokenizer carries little of an
# object's shape, its 3×3 neighbourhood carries most of it (`python -m eval.probe cells`).
UNDERSTANDING_PROJECTOR_TYPES = ("mlp2x_gelu", "conv2x_gelu")
UNDERSTANDING_POSITIONS = ("none", "sincos2d")
# Where an image the user shows sits in its turn. After the text, its slots can already read the question under
# causal attention (the VQA probe found yes/no questions learned sooner that way: `python -m eval.probe study`).
IMAGE_PLACEMENTS = ("before_text", "after_text")


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
        understanding_positions: what tells the understanding slots where they lie on the S×S grid besides the
            backbone's 1-D sequence positions: `"none"` (nothing, as the reference does) or `"sincos2d"` (a fixed 2-D
            sin/cos table of the slot's row and column added to the projector output, scaled per image to its root
            mean square). Text and drawn-image spans are never touched.
        projector_type: architecture of the generation projector, and of the understanding projector unless
            `understanding_projector_type` says otherwise; `"mlp2x_gelu"` = Linear · GELU · Linear.
        understanding_projector_type: architecture of the understanding projector; None = `projector_type`;
            `"conv2x_gelu"` = Conv3×3 · GELU · Conv3×3 over the S×S slot grid (each slot also sees its 8 neighbours).
        image_resize_mode: how the processor fits images to the tokenizer's square input (`"resize"` stretches,
            `"pad"` pads to a square with (127, 127, 127) first, `"center_crop"` crops); None = the tokenizer's own
            mode. Converted reference understanding models use `"pad"`, as the reference does at inference.
        image_placement: where the processor puts an image the user shows relative to the text of the same turn when
            it builds a prompt (`TokenFlowProcessor.user_content`), and where ShapesWorld training conversations put
            it: `"before_text"` (LLaVA's `<image>\n{question}`, as the reference) or `"after_text"`
            (`{question}\n<image>`: the slots come after the question and can attend to it).
        image_token_id: id of `<image>`, the image feature slot (understanding slots and drawn-image span slots).
        boi_token_id / eoi_token_id: ids of `<boi>` / `<eoi>`, which open and close a drawn-image span.
        pad_token_id: id of the padding token of the text tokenizer.
        image_loss_weight / text_loss_weight: weights of the image-code and text cross-entropies in `loss`.
        slot_label_classes: classes of each row of per-slot labels (e.g. ShapesWorld's shape, colour and cell of every
            understanding slot, `unimodal.shapesworld.SLOT_LABEL_CLASSES`); when set, the model has a `slot_head` that
            reads each understanding slot's last hidden state, and `forward` takes `slot_labels`. None = no head.
        slot_loss_weight: weight of that per-slot cross-entropy in `loss` (dense supervision of what each slot holds:
            without it the LLM never left the answer prior on yes/no questions, see the README).
        scale_reveal_prob: None = the model draws every code of a scale at once from the coarser scales (VAR). A
            number in [0, 1] gives it a `reveal_projector` that adds a code's own vector to the input predicting it,
            so a scale can be drawn in rounds (`scale_rounds` of the sampler), each round seeing the codes kept so
            far; in training that fraction of drawn spans shows a random part of each scale's codes (each scale a
            fraction drawn uniformly), the image loss counting only the hidden ones.
    """

    model_type = "tokenflow_mllm"
    sub_configs_defaults = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2"),
        "tokenizer_config": SubConfigSpec(config_class=TokenFlowConfig),
    }

    text_config: dict | PreTrainedConfig | None = None
    tokenizer_config: dict | PreTrainedConfig | None = None
    understanding_features: str = "semantic"
    understanding_positions: str = "none"
    projector_type: str = "mlp2x_gelu"
    understanding_projector_type: str | None = None
    image_resize_mode: str | None = None
    image_placement: str = "before_text"
    image_token_id: int | None = None
    boi_token_id: int | None = None
    eoi_token_id: int | None = None
    pad_token_id: int | None = None
    image_loss_weight: float = 1.0
    text_loss_weight: float = 1.0
    slot_label_classes: list[int] | None = None
    slot_loss_weight: float = 1.0
    scale_reveal_prob: float | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.understanding_features not in UNDERSTANDING_FEATURES:
            raise ValueError(
                f"understanding_features={self.understanding_features!r}; allowed: {UNDERSTANDING_FEATURES}")
        if self.understanding_positions not in UNDERSTANDING_POSITIONS:
            raise ValueError(f"understanding_positions={self.understanding_positions!r}; allowed: "
                             f"{UNDERSTANDING_POSITIONS}")
        if self.projector_type not in PROJECTOR_TYPES:
            raise ValueError(f"projector_type={self.projector_type!r}; allowed: {PROJECTOR_TYPES}")
        if self.understanding_projector_type is not None and \
                self.understanding_projector_type not in UNDERSTANDING_PROJECTOR_TYPES:
            raise ValueError(f"understanding_projector_type={self.understanding_projector_type!r}; allowed: None (the "
                             f"projector_type) or one of {UNDERSTANDING_PROJECTOR_TYPES}")
        if self.image_resize_mode is not None and self.image_resize_mode not in RESIZE_MODES:
            raise ValueError(f"image_resize_mode={self.image_resize_mode!r}; allowed: None (the tokenizer's own mode) "
                             f"or one of {RESIZE_MODES}")
        if self.image_placement not in IMAGE_PLACEMENTS:
            raise ValueError(f"image_placement={self.image_placement!r}; allowed: {IMAGE_PLACEMENTS}")
        if self.slot_label_classes is not None and (
                not self.slot_label_classes or any(not isinstance(c, int) or c < 2 for c in self.slot_label_classes)):
            raise ValueError(f"slot_label_classes={self.slot_label_classes!r} must be None or a non-empty list of "
                             "class counts >= 2")
        for name in ("image_loss_weight", "text_loss_weight", "slot_loss_weight"):
            value = getattr(self, name)
            if not value >= 0:
                raise ValueError(f"{name}={value!r} must be a number >= 0")
        if self.scale_reveal_prob is not None and not 0 <= self.scale_reveal_prob <= 1:
            raise ValueError(f"scale_reveal_prob={self.scale_reveal_prob!r} must be None or a number in [0, 1]")
        special_ids = {"image_token_id": self.image_token_id, "boi_token_id": self.boi_token_id,
                       "eoi_token_id": self.eoi_token_id}
        given = [v for v in special_ids.values() if v is not None]
        if len(set(given)) != len(given):
            raise ValueError(f"the image special tokens must have distinct ids, got {special_ids}")

    @property
    def understanding_projector(self) -> str:
        """Architecture of the understanding projector (`understanding_projector_type`, else `projector_type`)."""
        return self.understanding_projector_type or self.projector_type

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


__all__ = ["IGNORE_INDEX", "IMAGE_PLACEMENTS", "PROJECTOR_TYPES", "UNDERSTANDING_FEATURES", "UNDERSTANDING_POSITIONS",
           "UNDERSTANDING_PROJECTOR_TYPES", "TokenFlowMLLMConfig"]
