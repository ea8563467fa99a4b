"""TokenFlowTokenizer: dual-codebook, multi-scale image tokenizer (arXiv 2412.03069).

    image [B,3,H,W] in [-1,1]
      ├─ semantic tower ─▶ encode_task_layer ─▶ [B,32,S,S] ┐
      └─ pixel CNN ─────▶ quant_conv ─────────▶ [B, 8,S,S] ┴▶ h [B,40,S,S]
    multi-scale residual quantization of h (one shared index per position and scale)
      ─▶ indices [B, Σs²] (coarse→fine, row-major)  and  f̂ [B,40,S,S]
    f̂ ─▶ semantic decoder ─▶ decode_task_layer ─▶ teacher-feature reconstruction [B,S²,T]
    f̂ ─▶ post_quant_conv ─▶ pixel decoder ─▶ pixels [B,3,H,W]

Submodule names equal the reference checkpoint's prefixes (`encoder_vqkd`, `encoder`, `quantize`, ...), so a
released state dict loads without renaming.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from unimodal.checkpoints import load_checked, stamp_data_digests
from unimodal.vision_towers import build_vision_tower
from unimodal.vqgan import PixelDecoder, PixelEncoder

from .configuration_tokenflow import CLIP_MEAN, CLIP_STD, TokenFlowConfig
from .image_processing_tokenflow import TokenFlowImageProcessor
from .quantizer import MultiScaleResidualQuantizer, map_to_tokens
from .semantic_decoder import SemanticDecoder, TaskLayer


# How far outside [-1, 1] encode's input may stray (resampling overshoot, half-precision rounding) before it is
# taken for another convention (0-1 or 0-255 images).
PIXEL_RANGE_TOLERANCE = 1e-2


class ScalingLayer(nn.Module):
    """Maps [-1, 1] pixels to a vision model's normalised input: to [0, 255] (clamped), /255, then (u - shift) / scale.

    The buffers are persistent because the reference siglip checkpoint stores them (`scaling_layer.{shift,scale}`).
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.register_buffer("shift", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = ((x + 1.0) * 127.5).clamp(0.0, 255.0) / 255.0
        # The buffers stay fp32 when mixed-precision engines cast only the parameters (DeepSpeed bf16 does); the
        # result keeps the input's precision so the tower's first layer gets the dtype of its weights.
        return ((u - self.shift) / self.scale).to(x.dtype)


def scaling_layer_for(mode: str) -> ScalingLayer | None:
    """The input mapping for `semantic_input` / `teacher_input` modes; `raw` means none."""
    if mode == "raw":
        return None
    if mode == "clip":
        return ScalingLayer(CLIP_MEAN, CLIP_STD)
    if mode == "siglip":
        return ScalingLayer((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    raise ValueError(f"unknown semantic input mode {mode!r}; allowed: 'raw', 'clip', 'siglip'")


@dataclass
class TokenFlowEncoderOutput(ModelOutput):
    """Result of [`TokenFlowTokenizer.encode`].

    indices: [B, Σs²] int64, scale-major and row-major inside each scale.
    features: f̂ [B, 40, S, S], the sum of the upsampled code vectors of every scale (straight-through in training).
    pre_quant: h [B, 40, S, S], the continuous features before quantization.
    vq_loss / commit_loss: codebook losses averaged over the used scales (training only, else None).
    code_counts: [L, K] how often each code was picked at each used scale.
    used_scales: the scale sides actually quantized (all of them unless one was dropped in training).
    """

    indices: torch.LongTensor | None = None
    features: torch.FloatTensor | None = None
    pre_quant: torch.FloatTensor | None = None
    vq_loss: torch.FloatTensor | None = None
    commit_loss: torch.FloatTensor | None = None
    code_counts: torch.LongTensor | None = None
    used_scales: tuple[int, ...] | None = None


@dataclass
class TokenFlowOutput(TokenFlowEncoderOutput):
    """Result of [`TokenFlowTokenizer.forward`]: everything `encode` returns, plus the pixel reconstructions
    [B, 3, H, W] and the semantic decoder's features [B, g², D] (None with `return_semantic=False`)."""

    pixel_values: torch.FloatTensor | None = None
    semantic_features: torch.FloatTensor | None = None


class TokenFlowPreTrainedModel(PreTrainedModel):
    config_class = TokenFlowConfig
    base_model_prefix = "tokenflow"
    main_input_name = "pixel_values"
    _supports_sdpa = True
    _no_split_modules = ["SemanticDecoder", "PixelDecoder", "PixelEncoder"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # Every submodule initialises itself in its constructor exactly as the reference does (torch defaults for the
        # CNN, truncated normal for the ViT parts, normalised uniform codebooks); the generic HF init would undo that.
        pass


class TokenFlowTokenizer(TokenFlowPreTrainedModel):
    """TokenFlow image tokenizer. Images in [-1, 1] ⇄ multi-scale shared indices into a dual codebook."""

    def __init__(self, config: TokenFlowConfig):
        super().__init__(config)
        self.encoder_vqkd = build_vision_tower(config.semantic_tower)
        scaling = scaling_layer_for(config.semantic_input)
        if scaling is not None:
            self.scaling_layer = scaling
        else:
            self.scaling_layer = None
        semantic_width = self.encoder_vqkd.hidden_size
        self.encode_task_layer = TaskLayer(semantic_width, config.semantic_code_dim)

        self.encoder = PixelEncoder(**config.pixel_encoder)
        self.quant_conv = nn.Conv2d(config.pixel_encoder["z_channels"], config.pixel_code_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.pixel_code_dim, config.pixel_decoder["z_channels"], 1)
        self.decoder = PixelDecoder(**config.pixel_decoder)

        self.quantize = MultiScaleResidualQuantizer(
            codebook_size=config.codebook_size,
            scales=config.scales,
            semantic_dim=config.semantic_code_dim,
            pixel_dim=config.pixel_code_dim,
            pixel_weight=config.pixel_weight,
            commit_beta=config.commit_beta,
            chunk_size=config.quantizer_chunk_size,
            scale_drop_prob=config.scale_drop_prob,
        )

        dec = config.semantic_decoder
        self.decoder_vqkd = SemanticDecoder(
            grid=dec["grid"], in_dim=config.semantic_code_dim, embed_dim=dec["embed_dim"], depth=dec["depth"],
            num_heads=dec["num_heads"])
        self.decode_task_layer = TaskLayer(dec["embed_dim"], config.semantic_target_dim)
        self.post_init()

    # ------------------------------------------------------------------ properties
    @property
    def scales(self) -> list[int]:
        return list(self.config.scales)

    @property
    def num_tokens(self) -> int:
        return self.config.num_tokens

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def code_dim(self) -> int:
        return self.config.code_dim

    @property
    def image_processor(self) -> TokenFlowImageProcessor:
        """The matching image processor (its settings live in the config, so there is one source of truth)."""
        return TokenFlowImageProcessor.from_tokenizer_config(self.config)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """`PreTrainedModel.from_pretrained`, strict: a missing folder, another model type, a damaged file, missing
        or unexpected weights and non-finite values raise (see `unimodal.checkpoints`)."""
        return load_checked(super().from_pretrained, pretrained_model_name_or_path, cls.config_class.model_type,
                            cls.__name__, *model_args, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            stamp_data_digests(save_directory)
        # Written beside the weights so AutoImageProcessor.from_pretrained(save_directory) works too.
        self.image_processor.save_pretrained(save_directory)

    # ------------------------------------------------------------------ input checks
    def _check_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(
                f"pixel_values must have shape [B, 3, H, W], got {tuple(pixel_values.shape)}; convert grayscale/RGBA "
                "images to RGB first (the image processor does)")
        size = self.config.image_size
        if tuple(pixel_values.shape[-2:]) != (size, size):
            raise ValueError(
                f"pixel_values are {pixel_values.shape[-2]}x{pixel_values.shape[-1]} but this tokenizer takes "
                f"{size}x{size} images; use its image processor to resize")
        if not pixel_values.is_floating_point():
            raise TypeError(f"pixel_values must be a float tensor in [-1, 1], got dtype {pixel_values.dtype}")
        if pixel_values.shape[0] == 0:
            raise ValueError("pixel_values hold no images (batch size 0); pass at least one image")
        if not torch.isfinite(pixel_values).all():
            raise ValueError("pixel_values contain NaN or infinite values")
        low, high = float(pixel_values.min()), float(pixel_values.max())
        if low < -1.0 - PIXEL_RANGE_TOLERANCE or high > 1.0 + PIXEL_RANGE_TOLERANCE:
            raise ValueError(
                f"pixel_values must lie in [-1, 1] (RGB scaled as x / 127.5 - 1), got values in [{low:.4g}, {high:.4g}]; "
                "0-255 or 0-1 images go through the tokenizer's image processor (TokenFlowImageProcessor, "
                "`tokenizer.image_processor(images)`), which produces that range")
        return pixel_values.to(self.dtype)

    def check_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Validates an index tensor [B, L] (L a prefix length, values in [0, K)) and returns it as int64."""
        if not isinstance(indices, torch.Tensor):
            raise TypeError(f"indices must be a torch.Tensor, got {type(indices).__name__}")
        if indices.dtype.is_floating_point or indices.dtype == torch.bool or indices.is_complex():
            raise TypeError(f"indices must be an integer tensor, got dtype {indices.dtype}")
        if indices.ndim != 2:
            raise ValueError(f"indices must have shape [B, L], got {tuple(indices.shape)}")
        valid = self.config.prefix_lengths
        if indices.shape[1] not in valid:
            raise ValueError(
                f"indices have length {indices.shape[1]}, which is not a whole number of scales; valid lengths for "
                f"scales {self.config.scales} are {valid}")
        if indices.numel() and (indices.min() < 0 or indices.max() >= self.config.codebook_size):
            raise ValueError(
                f"indices must lie in [0, {self.config.codebook_size}), got values in "
                f"[{int(indices.min())}, {int(indices.max())}]")
        return indices.long()

    # ------------------------------------------------------------------ encoding
    def semantic_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Semantic half before quantization: [B,3,H,W] → [B, 32, S, S]."""
        x = self.scaling_layer(pixel_values) if self.scaling_layer is not None else pixel_values
        tokens = self.encode_task_layer(self.encoder_vqkd(x))  # [B, S², 32]
        b, n, c = tokens.shape
        side = int(round(n ** 0.5))
        return tokens.transpose(1, 2).reshape(b, c, side, side)

    def pixel_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pixel half before quantization: [B,3,H,W] → [B, 8, S, S]."""
        size = self.config.pixel_input_size
        if size is not None and size != pixel_values.shape[-1]:
            pixel_values = F.interpolate(pixel_values, size=(size, size), mode="bicubic", align_corners=False)
        return self.quant_conv(self.encoder(pixel_values))

    def encode(self, pixel_values: torch.Tensor) -> TokenFlowEncoderOutput:
        """Images [B,3,H,W] in [-1,1] → indices [B, Σs²] and quantized features f̂ [B, 40, S, S]."""
        pixel_values = self._check_pixels(pixel_values)
        h = torch.cat([self.semantic_features(pixel_values), self.pixel_features(pixel_values)], dim=1)
        q = self.quantize(h)
        return TokenFlowEncoderOutput(
            indices=q.indices, features=q.features, pre_quant=h, vq_loss=q.vq_loss, commit_loss=q.commit_loss,
            code_counts=q.code_counts, used_scales=tuple(q.used_scales))

    # ------------------------------------------------------------------ decoding
    def decode_pixels(self, features: torch.Tensor) -> torch.Tensor:
        """f̂ [B,40,S,S] → pixels [B,3,H,W] (roughly [-1, 1]; no output activation, as in the reference)."""
        pixel_half = features[:, self.config.semantic_code_dim:]
        pixels = self.decoder(self.post_quant_conv(pixel_half))
        size = self.config.image_size
        if pixels.shape[-1] != size:
            pixels = F.interpolate(pixels, size=(size, size), mode="bicubic", align_corners=False)
        return pixels

    def decode_semantic(self, features: torch.Tensor) -> torch.Tensor:
        """f̂ [B,40,S,S] → teacher-feature reconstruction [B, S², T]."""
        return self.decode_task_layer(self.decoder_vqkd(features[:, : self.config.semantic_code_dim]))

    def decode(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """f̂ [B,40,S,S] → (semantic reconstruction [B,S²,T], pixels [B,3,H,W])."""
        if features.ndim != 4 or features.shape[1] != self.config.code_dim:
            raise ValueError(f"features must have shape [B, {self.config.code_dim}, S, S], got {tuple(features.shape)}")
        return self.decode_semantic(features), self.decode_pixels(features)

    def indices_to_features(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices [B, L] (any whole number of scales) → f̂ [B, 40, S, S]."""
        return self.quantize.indices_to_features(self.check_indices(indices))

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices [B, L] → pixels [B,3,H,W] in [-1,1]; a prefix of the scales gives a coarser image."""
        return self.decode_pixels(self.indices_to_features(indices))

    # ------------------------------------------------------------------ for the LLM
    def next_scale_inputs(self, indices: torch.Tensor) -> torch.Tensor:
        """VAR teacher-forcing inputs [B, Σs² - 1, 40] for scales 2..L (see the quantizer for prefixes)."""
        return self.quantize.next_scale_inputs(self.check_indices(indices))

    def next_scale_block(self, indices_prefix: torch.Tensor) -> torch.Tensor:
        """Input block of the next scale after a prefix of whole scales: [B, Σ_{k<n} s_k²] → [B, s_n², 40]."""
        return self.quantize.next_scale_block(self.check_indices(indices_prefix))

    def understanding_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Images → quantized features as a token sequence [B, S², 40] (row-major), what the LLM reads."""
        return map_to_tokens(self.encode(pixel_values).features)

    def indices_to_understanding_features(self, indices: torch.Tensor) -> torch.Tensor:
        """Drawn indices [B, Σs²] → [B, S², 40] without re-encoding pixels."""
        return map_to_tokens(self.indices_to_features(indices))

    # ------------------------------------------------------------------ training forward
    def forward(self, pixel_values: torch.Tensor, return_semantic: bool = True) -> TokenFlowOutput:
        enc = self.encode(pixel_values)
        semantic = self.decode_semantic(enc.features) if return_semantic else None
        pixels = self.decode_pixels(enc.features)
        return TokenFlowOutput(**enc, pixel_values=pixels, semantic_features=semantic)
