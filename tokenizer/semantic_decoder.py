"""Semantic decoder of TokenFlow: a 3-block BEiT-v2-style ViT over the quantized 32-d semantic map, plus task layers.

    x [B, 32, S, S] ─ 1×1 conv ─▶ [B, S², D] ─ prepend cls, + pos_embed ─▶ blocks ─▶ fc_norm(tokens 1..S²) ─▶ [B, S², D]

Module and parameter names are the reference checkpoint's (under `decoder_vqkd.`, `encode_task_layer.`,
`decode_task_layer.`), so released weights load without renaming.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from unimodal.pos_embed import resize_patch_pos_embed

LAYER_NORM_EPS = 1e-6
INIT_STD = 0.02


class Attention(nn.Module):
    """Multi-head self-attention with BEiT's bias layout: q and v have biases, k has none.

    The biases live outside `qkv` (keys `q_bias`, `v_bias`) and are concatenated with zeros for k at run time.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim={dim} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, D] → [B, N, D]."""
        b, n, d = x.shape
        qkv_bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, qkv_bias)
        q, k, v = qkv.view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, N, hd]
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q kᵀ · hd^-0.5) v
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()  # exact (erf) GELU, as in the reference
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-LN transformer block without layer scale: x += attn(norm1(x)); x += mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """1×1 convolution from the code map to tokens (patch size 1): [B, C, S, S] → [B, S², D], row-major."""

    def __init__(self, in_dim: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_dim, embed_dim, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class SemanticDecoder(nn.Module):
    """BEiT-v2-style ViT that turns the quantized semantic map back into teacher-like features.

    Args:
        grid: side of the token grid the position embedding is built for (14 clipb, 27 siglip); other sides are
            served by resizing it (the reference's (g + 0.1) / grid bicubic rule).
        in_dim: channels of the semantic code map (32).
        embed_dim / depth / num_heads / mlp_ratio: transformer shape (768 or 1152 / 3 / 12 / 4.0 in the reference).
    """

    def __init__(self, grid: int, in_dim: int = 32, embed_dim: int = 768, depth: int = 3, num_heads: int = 12,
                 mlp_ratio: float = 4.0):
        super().__init__()
        for name, value in (("grid", grid), ("in_dim", in_dim), ("embed_dim", embed_dim), ("depth", depth),
                            ("num_heads", num_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        self.grid = grid
        self.in_dim = in_dim
        self.patch_embed = PatchEmbed(in_dim, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, embed_dim))
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth))
        # Mean-pooling heads in BEiT normalise the output tokens with `fc_norm` (the final `norm` is the identity).
        self.fc_norm = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Truncated normal (std 0.02) for embeddings and linears, unit LayerNorms; the output projections of block
        i (1-based) are shrunk by sqrt(2i) so the residual stream does not grow with depth. The 1×1 conv keeps the
        torch default."""
        nn.init.trunc_normal_(self.pos_embed, std=INIT_STD)
        nn.init.trunc_normal_(self.cls_token, std=INIT_STD)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=INIT_STD)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, Attention):
                nn.init.zeros_(module.q_bias)
                nn.init.zeros_(module.v_bias)
        with torch.no_grad():
            for layer_id, block in enumerate(self.blocks, start=1):
                block.attn.proj.weight.div_(math.sqrt(2.0 * layer_id))
                block.mlp.fc2.weight.div_(math.sqrt(2.0 * layer_id))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Semantic code map [B, in_dim, S, S] → features [B, S², D] (any S; position embedding resized if S ≠ grid)."""
        if x.ndim != 4 or x.shape[1] != self.in_dim or x.shape[2] != x.shape[3]:
            raise ValueError(f"input must be a square map [B, {self.in_dim}, S, S], got {tuple(x.shape)}")
        tokens = self.patch_embed(x)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        pos_embed = resize_patch_pos_embed(self.pos_embed, x.shape[-1], num_prefix=1)
        h = torch.cat([cls, tokens], dim=1) + pos_embed
        for block in self.blocks:
            h = block(h)
        return self.fc_norm(h[:, 1:])


class TaskLayer(nn.Sequential):
    """Linear(in, in) → Tanh → Linear(in, out), keys `0.*` and `2.*` as in the reference; input cast to its dtype."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__(nn.Linear(in_dim, in_dim), nn.Tanh(), nn.Linear(in_dim, out_dim))
        for linear in (self[0], self[2]):
            nn.init.trunc_normal_(linear.weight, std=INIT_STD)
            nn.init.zeros_(linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[..., in_dim] → [..., out_dim]."""
        return super().forward(x.to(self[0].weight.dtype))
