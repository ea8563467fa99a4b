"""TokenFlowConfig: every hyperparameter of the TokenFlow tokenizer, with the reference presets.

The reference release selects its scale list by teacher name and a separate `infer_interpolate` flag; here the
scale list, resolutions and module shapes are explicit fields, and the presets spell them out.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Sequence
from typing import Any

from transformers import PretrainedConfig

SEMANTIC_INPUT_MODES = ("raw", "clip", "siglip")
RESIZE_MODES = ("center_crop", "resize", "pad")


def prefix_lengths(scales: Sequence[int]) -> list[int]:
    """Index lengths that hold whole scales: cumulative Σ s² after each scale (e.g. [1, 5, 14, ...])."""
    return list(itertools.accumulate(s * s for s in scales))


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# A tiny open_clip CLIP for ShapesWorld: 64 px images, 8 px patches -> an 8x8 token grid.
TINY_OPEN_CLIP_CFG: dict[str, Any] = {
    "embed_dim": 64,
    "quick_gelu": False,
    "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 128, "layers": 4, "head_width": 32, "mlp_ratio": 4.0},
    # A narrow text tower: its 49408-row token embedding (open_clip's BPE vocabulary) is most of the teacher's size.
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 3},
}

_PRESETS: dict[str, dict[str, Any]] = {
    # CLIP ViT-B/16 teacher, enhanced decoder, run at 256 px (reference `tokenflow_clipb_32k_enhanced.pt`).
    "clipb-256": {
        "image_size": 256,
        "semantic_tower": {"type": "openai_clip", "image_size": 224, "patch_size": 16, "width": 768, "layers": 12,
                           "heads": 12},
        # The released clipb student was trained on raw [-1, 1] input (no CLIP normalisation), unlike its teacher.
        "semantic_input": "raw",
        "pixel_encoder": {"ch": 128, "ch_mult": [1, 1, 2, 2, 4], "num_res_blocks": 2, "z_channels": 256},
        "pixel_decoder": {"ch": 256, "ch_mult": [1, 1, 2, 2, 4], "num_res_blocks": 4, "z_channels": 256},
        "pixel_input_size": None,
        "codebook_size": 32768,
        "scales": [1, 2, 4, 6, 8, 10, 12, 14, 16],
        "semantic_decoder": {"grid": 14, "embed_dim": 768, "depth": 3, "num_heads": 12},
        "semantic_target_dim": 512,
        "teacher": {"type": "openai_clip", "image_size": 224, "patch_size": 16, "width": 768, "layers": 12,
                    "heads": 12, "output_dim": 512},
        "teacher_input": "clip",
        "resize_mode": "center_crop",
    },
    # SigLIP so400m/14-384 teacher, normal decoder, 432 px pixel branch (reference `tokenflow_siglip_32k.pt`).
    "siglip-384": {
        "image_size": 384,
        "semantic_tower": {"type": "siglip", "hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
                           "num_attention_heads": 16, "patch_size": 14, "image_size": 384},
        "semantic_input": "siglip",
        "pixel_encoder": {"ch": 128, "ch_mult": [1, 1, 2, 2, 4], "num_res_blocks": 2, "z_channels": 256},
        "pixel_decoder": {"ch": 128, "ch_mult": [1, 1, 2, 2, 4], "num_res_blocks": 2, "z_channels": 256},
        # The CNN grid must match SigLIP's 27x27 grid: 16 * 27 = 432.
        "pixel_input_size": 432,
        "codebook_size": 32768,
        "scales": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 14, 17, 22, 27],
        "semantic_decoder": {"grid": 27, "embed_dim": 1152, "depth": 3, "num_heads": 12},
        "semantic_target_dim": 1152,
        "teacher": {"type": "siglip", "hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
                    "num_attention_heads": 16, "patch_size": 14, "image_size": 384},
        "teacher_input": "siglip",
        "resize_mode": "resize",
    },
    # ShapesWorld: 64 px, 8x8 grid, small codebook; trains on a laptop CPU in minutes.
    "tiny": {
        "image_size": 64,
        "semantic_tower": {"type": "open_clip", "model_cfg": TINY_OPEN_CLIP_CFG},
        "semantic_input": "clip",
        "pixel_encoder": {"ch": 32, "ch_mult": [1, 2, 2, 4], "num_res_blocks": 1, "z_channels": 64,
                          "norm_groups": 8},
        "pixel_decoder": {"ch": 32, "ch_mult": [1, 2, 2, 4], "num_res_blocks": 1, "z_channels": 64,
                          "norm_groups": 8},
        "pixel_input_size": None,
        "codebook_size": 2048,
        # Pixel distances weigh 3x in the shared index choice: with 8-d pixel codes beside 32-d semantic ones, equal
        # weights let the semantic half pick the code (default run: 25.1 vs 24.2 dB, read-back 17 % vs 10 %).
        "pixel_weight": 3.0,
        "scales": [1, 2, 3, 4, 6, 8],
        "semantic_decoder": {"grid": 8, "embed_dim": 128, "depth": 3, "num_heads": 4},
        "semantic_target_dim": 64,
        "teacher": {"type": "open_clip", "model_cfg": TINY_OPEN_CLIP_CFG},
        "teacher_input": "clip",
        "resize_mode": "resize",
    },
}


class TokenFlowConfig(PretrainedConfig):
    r"""Configuration of a [`TokenFlowTokenizer`].

    Args:
        image_size: side of the (square) input image in pixels.
        semantic_tower: spec of the semantic encoder, `{"type": "openai_clip" | "siglip" | "open_clip", **kwargs}`.
        semantic_input: how pixels in [-1, 1] are mapped before the semantic encoder: `"raw"` (unchanged),
            `"clip"` or `"siglip"` (to [0, 1], then that model's mean/std, as the reference scaling layers do).
        pixel_encoder / pixel_decoder: VQGAN CNN settings (`ch`, `ch_mult`, `num_res_blocks`, `z_channels`, ...).
        pixel_input_size: if set, the pixel branch sees the image resized to this size (bicubic) and the decoded
            pixels are resized back to `image_size` (the reference siglip variant uses 432 for a 27x27 grid).
        codebook_size: K, number of shared indices.
        semantic_code_dim / pixel_code_dim: dims of the two codebook halves (32 and 8 in the reference).
        pixel_weight: w in `argmin d_sem + w * d_pix`.
        commit_beta: commitment-loss weight.
        scales: side of each quantization scale, coarse to fine; the last equals the token grid.
        scale_drop_prob: probability of dropping one random non-first scale per training forward.
        semantic_decoder: settings of the 3-block ViT that rebuilds the teacher features.
        semantic_target_dim: dim of the teacher features the semantic decoder predicts.
        teacher / teacher_input: the frozen teacher used for distillation during training (never stored in the
            tokenizer weights).
        resize_mode / image_mean / image_std: image preprocessing (see `TokenFlowImageProcessor`).
        quantizer_chunk_size: rows per chunk of the nearest-code search (bounds memory at chunk x K).
    """

    model_type = "tokenflow"

    def __init__(
        self,
        image_size: int = 64,
        semantic_tower: dict | None = None,
        semantic_input: str = "clip",
        pixel_encoder: dict | None = None,
        pixel_decoder: dict | None = None,
        pixel_input_size: int | None = None,
        codebook_size: int = 2048,
        semantic_code_dim: int = 32,
        pixel_code_dim: int = 8,
        pixel_weight: float = 1.0,
        commit_beta: float = 0.25,
        scales: list[int] | None = None,
        scale_drop_prob: float = 0.1,
        semantic_decoder: dict | None = None,
        semantic_target_dim: int = 64,
        teacher: dict | None = None,
        teacher_input: str = "clip",
        resize_mode: str = "resize",
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        quantizer_chunk_size: int = 1024,
        preset: str | None = None,
        **kwargs,
    ):
        tiny = _PRESETS["tiny"]
        self.image_size = image_size
        self.semantic_tower = copy.deepcopy(semantic_tower if semantic_tower is not None else tiny["semantic_tower"])
        self.semantic_input = semantic_input
        self.pixel_encoder = copy.deepcopy(pixel_encoder if pixel_encoder is not None else tiny["pixel_encoder"])
        self.pixel_decoder = copy.deepcopy(pixel_decoder if pixel_decoder is not None else tiny["pixel_decoder"])
        self.pixel_input_size = pixel_input_size
        self.codebook_size = codebook_size
        self.semantic_code_dim = semantic_code_dim
        self.pixel_code_dim = pixel_code_dim
        self.pixel_weight = pixel_weight
        self.commit_beta = commit_beta
        self.scales = list(scales if scales is not None else tiny["scales"])
        self.scale_drop_prob = scale_drop_prob
        self.semantic_decoder = copy.deepcopy(
            semantic_decoder if semantic_decoder is not None else tiny["semantic_decoder"])
        self.semantic_target_dim = semantic_target_dim
        self.teacher = copy.deepcopy(teacher) if teacher is not None else None
        self.teacher_input = teacher_input
        self.resize_mode = resize_mode
        self.image_mean = list(image_mean) if image_mean is not None else [0.5, 0.5, 0.5]
        self.image_std = list(image_std) if image_std is not None else [0.5, 0.5, 0.5]
        self.quantizer_chunk_size = quantizer_chunk_size
        self.preset = preset
        super().__init__(**kwargs)
        self.validate()

    # ------------------------------------------------------------------ derived quantities
    @property
    def code_dim(self) -> int:
        """Dim of one codebook entry: semantic half followed by pixel half."""
        return self.semantic_code_dim + self.pixel_code_dim

    @property
    def grid_size(self) -> int:
        """Side S of the final token grid (the last scale)."""
        return self.scales[-1]

    @property
    def num_tokens(self) -> int:
        """Codes per image, Σ s²."""
        return sum(s * s for s in self.scales)

    @property
    def prefix_lengths(self) -> list[int]:
        """Valid index lengths: cumulative Σ s² after each scale."""
        return prefix_lengths(self.scales)

    @property
    def pixel_downsample(self) -> int:
        return 2 ** (len(self.pixel_encoder["ch_mult"]) - 1)

    # ------------------------------------------------------------------ validation and presets
    def validate(self) -> None:
        if self.semantic_input not in SEMANTIC_INPUT_MODES:
            raise ValueError(f"semantic_input={self.semantic_input!r}; allowed: {SEMANTIC_INPUT_MODES}")
        if self.teacher_input not in SEMANTIC_INPUT_MODES:
            raise ValueError(f"teacher_input={self.teacher_input!r}; allowed: {SEMANTIC_INPUT_MODES}")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode={self.resize_mode!r}; allowed: {RESIZE_MODES}")
        if not self.scales or any(int(s) != s or s < 1 for s in self.scales):
            raise ValueError(f"scales={self.scales!r} must be a non-empty list of positive integers")
        if list(self.scales) != sorted(set(self.scales)) or self.scales[0] != 1:
            raise ValueError(f"scales={self.scales!r} must start at 1 and strictly increase")
        if self.codebook_size < 2:
            raise ValueError(f"codebook_size={self.codebook_size} must be at least 2")
        if not 0.0 <= self.scale_drop_prob < 1.0:
            raise ValueError(f"scale_drop_prob={self.scale_drop_prob} must be in [0, 1)")
        if self.pixel_weight < 0:
            raise ValueError(f"pixel_weight={self.pixel_weight} must be >= 0")
        pixel_size = self.pixel_input_size or self.image_size
        if pixel_size % self.pixel_downsample or pixel_size // self.pixel_downsample != self.grid_size:
            raise ValueError(
                f"the pixel branch sees {pixel_size} px and downsamples by {self.pixel_downsample}, giving a "
                f"{pixel_size / self.pixel_downsample:g} grid, but the last scale is {self.grid_size}; set "
                f"pixel_input_size={self.grid_size * self.pixel_downsample} or change the scales")

    @classmethod
    def available_presets(cls) -> tuple[str, ...]:
        return tuple(_PRESETS)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "TokenFlowConfig":
        """Build the config of a named preset (`clipb-256`, `siglip-384`, `tiny`), optionally overriding fields."""
        if name not in _PRESETS:
            raise ValueError(f"unknown TokenFlow preset {name!r}; available: {', '.join(_PRESETS)}")
        fields = copy.deepcopy(_PRESETS[name])
        fields.update(overrides)
        return cls(preset=name, **fields)
