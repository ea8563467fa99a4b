"""Semantic vision towers: ViTs that turn an image into a grid of patch tokens.

Every tower follows one contract (`VisionTower`):

    tower(pixel_values [B, 3, H, W]) -> patch tokens [B, N, hidden_size]   (row-major patches, no class token)
    tower.hidden_size, tower.patch_size, tower.image_size                 (ints)
    tower.output_dim                                                      (int, or None without a projection)
    tower.project(tokens [B, N, hidden_size]) -> [B, N, output_dim]       (identity when output_dim is None)

`project` maps tokens into a joint image-text space, which is what a distillation teacher provides (the reference
CLIP-B/16 teacher target is `ln_post(tokens) @ proj`).

Towers:
- `OpenAIClipVisionTower`: the OpenAI CLIP ViT visual tower with the OpenAI parameter names (reference clipb
  semantic encoder and teacher). Other input sizes resize the position embedding with the (g + 0.1) rule.
- `SiglipVisionTower`: Hugging Face `SiglipVisionModel` under `vision_model.`, returning `hidden_states[-2]`
  (reference siglip semantic encoder and teacher); fixed input size.
- `OpenClipVisionTower`: the visual ViT of any `open_clip` model (by name or config dict), random or from a local file.

`build_vision_tower(spec)` builds one from a `{"type": ..., **kwargs}` dict, the form configs store.
"""

from __future__ import annotations

import copy
import os
from collections import OrderedDict
from typing import Any, Protocol, runtime_checkable

import open_clip
import torch
import torch.nn.functional as F
from open_clip.factory import load_state_dict as load_open_clip_state_dict
from open_clip.model import _build_vision_tower as build_open_clip_visual
from open_clip.transformer import VisionTransformer as OpenClipVisionTransformer
from torch import Tensor, nn
from transformers import SiglipVisionConfig, SiglipVisionModel

from .pos_embed import resize_patch_pos_embed


@runtime_checkable
class VisionTower(Protocol):
    """What the tokenizer and the distillation loss rely on (see the module docstring)."""

    hidden_size: int
    patch_size: int
    image_size: int
    output_dim: int | None

    def __call__(self, pixel_values: Tensor) -> Tensor: ...

    def project(self, tokens: Tensor) -> Tensor: ...


def check_pixel_values(pixel_values: Tensor, patch_size: int, image_size: int | None = None) -> None:
    """Raise a ValueError/TypeError unless `pixel_values` is a float `[B, 3, H, W]` batch of square images of at least
    one patch (whose side equals `image_size` when that is given). Sides need not be multiples of the patch: the
    patch convolution floors, as SigLIP/14 at 384 px (27 patches) relies on."""
    if not isinstance(pixel_values, Tensor):
        raise TypeError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
    if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
        raise ValueError(f"pixel_values must have shape [B, 3, H, W], got {tuple(pixel_values.shape)}")
    if not pixel_values.is_floating_point():
        raise TypeError(f"pixel_values must be a float tensor, got dtype {pixel_values.dtype}")
    height, width = pixel_values.shape[-2:]
    if image_size is not None and (height, width) != (image_size, image_size):
        raise ValueError(f"this tower takes {image_size}x{image_size} images, got {height}x{width}")
    if height != width or height < patch_size:
        raise ValueError(
            f"this tower takes square images of at least one {patch_size}-px patch, got {height}x{width}"
        )


# --------------------------------------------------------------------------- OpenAI CLIP ViT


class QuickGELU(nn.Module):
    """x · σ(1.702 x), the activation the OpenAI CLIP weights were trained with."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class PackedSelfAttention(nn.Module):
    """Multi-head self-attention with one packed q/k/v projection, the parameter layout of `nn.MultiheadAttention`
    (`in_proj_weight` [3W, W] in q, k, v order, `in_proj_bias`, `out_proj`), computed with SDPA."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} must be divisible by heads {heads}")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        # the initialisation nn.MultiheadAttention uses
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        """`[B, L, W] -> [B, L, W]`."""
        b, length, width = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.reshape(b, length, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(b, length, width))


class ClipResidualBlock(nn.Module):
    """Pre-LN transformer block: x += attn(ln_1(x)); x += mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        hidden = int(width * mlp_ratio)
        # registration order follows the OpenAI checkpoints (attn, ln_1, mlp, ln_2) so state dicts list identically
        self.attn = PackedSelfAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width, eps=1e-5)
        self.mlp = nn.Sequential(
            OrderedDict(c_fc=nn.Linear(width, hidden), gelu=QuickGELU(), c_proj=nn.Linear(hidden, width))
        )
        self.ln_2 = nn.LayerNorm(width, eps=1e-5)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class ClipTransformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.resblocks = nn.ModuleList(ClipResidualBlock(width, heads, mlp_ratio) for _ in range(layers))

    def forward(self, x: Tensor) -> Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


class OpenAIClipVisionTower(nn.Module):
    """OpenAI CLIP ViT visual tower, OpenAI parameter names, returning `ln_post` patch tokens `[B, g², width]`.

    Parameters: `conv1` (no bias), `class_embedding` [W], `positional_embedding` [1 + g², W], `ln_pre`,
    `transformer.resblocks.{i}`, `ln_post`, and `proj` [W, output_dim] only when `output_dim` is set.
    Inputs of another square size (a multiple of `patch_size`) get the position embedding resized bicubically with
    scale factor (g + 0.1) / g0, as the reference does.
    """

    def __init__(
        self,
        image_size: int = 224,
        patch_size: int = 16,
        width: int = 768,
        layers: int = 12,
        heads: int = 12,
        mlp_ratio: float = 4.0,
        output_dim: int | None = None,
    ):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} must be a multiple of patch_size {patch_size}")
        self.image_size = image_size
        self.patch_size = patch_size
        self.hidden_size = width
        self.output_dim = output_dim
        grid = image_size // patch_size

        # OpenAI's random init for the free parameters: N(0, 1/width)
        scale = width**-0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(1 + grid * grid, width))
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim)) if output_dim is not None else None
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.ln_pre = nn.LayerNorm(width, eps=1e-5)
        self.transformer = ClipTransformer(width, layers, heads, mlp_ratio)
        self.ln_post = nn.LayerNorm(width, eps=1e-5)

    def forward(self, pixel_values: Tensor) -> Tensor:
        """`[B, 3, H, H]` (H a multiple of patch_size) -> patch tokens `[B, (H/patch)², width]`."""
        check_pixel_values(pixel_values, self.patch_size)
        x = self.conv1(pixel_values.to(self.conv1.weight.dtype))  # [B, W, g, g]
        grid = x.shape[-1]
        x = x.flatten(2).transpose(1, 2)  # [B, g², W], row-major
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        pos = resize_patch_pos_embed(self.positional_embedding, grid, num_prefix=1)
        x = torch.cat([cls, x], dim=1) + pos.to(x.dtype)
        x = self.transformer(self.ln_pre(x))
        # ln_post normalises each token on its own, so dropping the class token first gives the same patch tokens
        return self.ln_post(x[:, 1:])

    def project(self, tokens: Tensor) -> Tensor:
        """`[B, N, width] -> [B, N, output_dim]` (tokens unchanged when the tower has no `proj`)."""
        return tokens if self.proj is None else tokens @ self.proj


# --------------------------------------------------------------------------- SigLIP (Hugging Face)

# google/siglip-so400m-patch14-384, the reference siglip tokenizer's semantic encoder
SIGLIP_SO400M_384: dict[str, Any] = {
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "patch_size": 14,
    "image_size": 384,
    "vision_use_head": True,
}


class SiglipVisionTower(nn.Module):
    """SigLIP vision model returning `hidden_states[-2]`: the output of the second-to-last encoder layer,
    `[B, (image_size/patch_size)², hidden_size]`.

    The model is held as `self.vision_model` so state-dict keys read `vision_model.embeddings...`,
    `vision_model.encoder.layers.{i}...`, `vision_model.post_layernorm...`, `vision_model.head...`, as in the
    reference checkpoints. (In transformers ≥ 5 `SiglipVisionModel` has no inner `vision_model` module any more, so a
    subclass would lose the prefix.) The last layer, `post_layernorm` and the pooling head are kept for checkpoint
    compatibility but never run: the output does not depend on them. No position interpolation: inputs must be
    exactly `image_size`.

    Args:
        config: a `SiglipVisionConfig`; when omitted, one is built from `SIGLIP_SO400M_384` updated with
            `config_kwargs` (any `SiglipVisionConfig` argument).
    """

    output_dim: int | None = None  # the teacher target is the tokens themselves

    def __init__(self, config: SiglipVisionConfig | None = None, **config_kwargs: Any):
        super().__init__()
        if config is None:
            config = SiglipVisionConfig(**{**SIGLIP_SO400M_384, **config_kwargs})
        elif config_kwargs:
            raise ValueError(
                f"pass either a SiglipVisionConfig or config kwargs, not both (got kwargs {sorted(config_kwargs)})"
            )
        if config.num_hidden_layers < 2:
            raise ValueError(
                f"hidden_states[-2] needs at least 2 layers, got num_hidden_layers={config.num_hidden_layers}"
            )
        self.vision_model = SiglipVisionModel(config)
        self.hidden_size = config.hidden_size
        self.patch_size = config.patch_size
        self.image_size = config.image_size

    @property
    def config(self) -> SiglipVisionConfig:
        return self.vision_model.config

    def forward(self, pixel_values: Tensor) -> Tensor:
        """`[B, 3, image_size, image_size]` -> `[B, (image_size/patch_size)², hidden_size]`."""
        check_pixel_values(pixel_values, self.patch_size, self.image_size)
        hidden = self.vision_model.embeddings(pixel_values)
        for layer in self.vision_model.encoder.layers[:-1]:
            hidden = layer(hidden, None)  # no attention mask: every patch attends to every patch
        return hidden

    def project(self, tokens: Tensor) -> Tensor:
        """Identity: SigLIP features are used as they are."""
        return tokens


# --------------------------------------------------------------------------- any open_clip ViT


def _open_clip_model_cfg(model_name: str | None, model_cfg: dict | None) -> dict:
    if (model_name is None) == (model_cfg is None):
        raise ValueError("give exactly one of model_name (an open_clip model name) or model_cfg (a config dict)")
    if model_name is not None:
        # only built-in names: "hf-hub:" names would be fetched from the network
        if model_name not in open_clip.list_models():
            raise ValueError(
                f"unknown open_clip model {model_name!r}; allowed: the names in open_clip.list_models() "
                "(e.g. 'ViT-B-16', 'ViT-B-16-quickgelu'), or pass model_cfg"
            )
        return open_clip.get_model_config(model_name)
    if not isinstance(model_cfg, dict) or "embed_dim" not in model_cfg or "vision_cfg" not in model_cfg:
        raise ValueError(f"model_cfg must be a dict with 'embed_dim' and 'vision_cfg' keys, got {model_cfg!r}")
    return copy.deepcopy(model_cfg)


class OpenClipVisionTower(nn.Module):
    """The visual ViT of an `open_clip` model (held as `self.visual`), returning `ln_post` patch tokens.

    Args:
        model_name: a built-in open_clip model name (`open_clip.list_models()`).
        model_cfg: or an open_clip model config dict (`embed_dim`, `vision_cfg`, optional `quick_gelu`, ...).
        pretrained: None for random weights, or the path of a local open_clip checkpoint (.pt/.pth/.bin/.safetensors,
            a full CLIP state dict or this tower's own); its `visual.*` weights are loaded strictly. Hub tags are
            not accepted: nothing is downloaded.

    Only open_clip's own ViT (`VisionTransformer`) without an attentional pooler is supported; timm and ResNet
    visual towers have no patch-token output of this form.
    """

    def __init__(self, model_name: str | None = None, model_cfg: dict | None = None, pretrained: str | None = None):
        super().__init__()
        cfg = _open_clip_model_cfg(model_name, model_cfg)
        vision_cfg = dict(cfg["vision_cfg"])
        if vision_cfg.get("timm_model_name") or isinstance(vision_cfg.get("layers"), (list, tuple)):
            raise ValueError("OpenClipVisionTower supports open_clip ViT towers only, not timm or ResNet towers")
        if vision_cfg.get("attentional_pool"):
            raise ValueError("OpenClipVisionTower does not support vision towers with an attentional pooler")
        self.visual = build_open_clip_visual(cfg["embed_dim"], vision_cfg, cfg.get("quick_gelu", False))
        assert isinstance(self.visual, OpenClipVisionTransformer)
        if pretrained is not None:
            self.load_checkpoint(pretrained)

        self.hidden_size: int = self.visual.transformer.width
        self.patch_size: int = self.visual.patch_size[0]
        self.image_size: int = self.visual.image_size[0]
        # `ds_shape`: under DeepSpeed ZeRO-3 construction the parameter is already partitioned (its `shape` is empty)
        proj = self.visual.proj
        self.output_dim: int | None = None if proj is None else getattr(proj, "ds_shape", proj.shape)[1]

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Load the `visual.*` weights of a local open_clip checkpoint file (strict)."""
        if not isinstance(path, (str, os.PathLike)) or not os.path.isfile(path):
            raise ValueError(
                f"pretrained must be the path of an existing local checkpoint file, got {path!r} "
                "(hub tags are not supported: nothing is downloaded)"
            )
        state_dict = load_open_clip_state_dict(os.fspath(path))
        visual = {k[len("visual.") :]: v for k, v in state_dict.items() if k.startswith("visual.")}
        if not visual:
            raise ValueError(f"checkpoint {os.fspath(path)!r} has no 'visual.*' weights")
        self.visual.load_state_dict(visual, strict=True)

    def forward(self, pixel_values: Tensor) -> Tensor:
        """`[B, 3, image_size, image_size]` -> `[B, g², hidden_size]`."""
        check_pixel_values(pixel_values, self.patch_size, self.image_size)
        # last block's output with ln_post applied and the class token split off
        out = self.visual.forward_intermediates(
            pixel_values, indices=1, normalize_intermediates=True, intermediates_only=True, output_fmt="NLC"
        )
        return out["image_intermediates"][-1]

    def project(self, tokens: Tensor) -> Tensor:
        """`[B, N, hidden_size] -> [B, N, output_dim]` with the visual `proj`."""
        return tokens if self.visual.proj is None else tokens @ self.visual.proj


# --------------------------------------------------------------------------- factory

VISION_TOWERS: dict[str, type[nn.Module]] = {
    "openai_clip": OpenAIClipVisionTower,
    "siglip": SiglipVisionTower,
    "open_clip": OpenClipVisionTower,
}


def build_vision_tower(spec: dict) -> nn.Module:
    """Build a tower from `{"type": "openai_clip" | "siglip" | "open_clip", **constructor_kwargs}`.

    For "siglip" the kwargs are `SiglipVisionConfig` arguments (defaults: so400m/14-384).
    """
    if not isinstance(spec, dict):
        raise TypeError(f"a vision tower spec must be a dict, got {type(spec).__name__}")
    kwargs = copy.deepcopy(spec)
    kind = kwargs.pop("type", None)
    if kind not in VISION_TOWERS:
        raise ValueError(f"unknown vision tower type {kind!r}; allowed: {sorted(VISION_TOWERS)}")
    return VISION_TOWERS[kind](**kwargs)
