"""VQGAN pixel encoder and decoder (taming / LlamaGen layout).

The module and parameter names reproduce the reference TokenFlow checkpoints exactly (without the `encoder.` /
`decoder.` prefix the tokenizer adds), so released weights load with `load_state_dict(strict=True)`:

    encoder: conv_in, conv_blocks.{i}.res.{j}, conv_blocks.{last}.attn.{j}, conv_blocks.{i}.downsample.conv,
             mid.{0,1,2}, norm_out, conv_out
    decoder: conv_in, mid.{0,1,2}, conv_blocks.{i}.res.{j}, conv_blocks.0.attn.{j}, conv_blocks.{i}.upsample.conv,
             norm_out, conv_out

Reference configurations: the encoder is `PixelEncoder()` (29,298,176 parameters); the "normal" decoder is
`PixelDecoder()` (42,449,795) and the "enhanced" decoder `PixelDecoder(ch=256, num_res_blocks=4)` (237,117,187).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn


def group_norm(channels: int, num_groups: int = 32) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """Pre-activation residual block: `[B, Cin, H, W] -> [B, Cout, H, W]`."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0, norm_groups: int = 32):
        super().__init__()
        self.norm1 = group_norm(in_channels, norm_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = group_norm(out_channels, norm_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        # the 1x1 shortcut exists only when the channel count changes (checkpoints have no identity weights)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        shortcut = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return shortcut + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions, residual: `[B, C, H, W] -> [B, C, H, W]`.

    Attention weights are softmax over keys of `qᵀk / sqrt(C)`; q, k, v and the output projection are 1x1 convs.
    """

    def __init__(self, channels: int, norm_groups: int = 32):
        super().__init__()
        self.norm = group_norm(channels, norm_groups)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)

        def as_sequence(t: Tensor) -> Tensor:  # [B, C, H, W] -> [B, 1, HW, C], one head of width C
            return t.reshape(b, 1, c, h * w).transpose(-1, -2)

        out = F.scaled_dot_product_attention(as_sequence(self.q(n)), as_sequence(self.k(n)), as_sequence(self.v(n)))
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Halve the resolution: zero-pad right and bottom by one, then a 3x3 conv with stride 2 and no padding.

    The asymmetric padding is what the checkpoints were trained with; symmetric padding shifts every output.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class ResolutionLevel(nn.Module):
    """The blocks of one resolution: `res.{j}` (each followed by `attn.{j}` when `with_attn`), then optionally
    a `downsample` or `upsample`."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_blocks: int,
        with_attn: bool,
        resample: str | None,
        dropout: float,
        norm_groups: int,
    ):
        super().__init__()
        channels = [in_channels] + [out_channels] * num_blocks
        self.res = nn.ModuleList(
            ResnetBlock(channels[j], channels[j + 1], dropout, norm_groups) for j in range(num_blocks)
        )
        self.attn = nn.ModuleList(AttnBlock(out_channels, norm_groups) for _ in range(num_blocks if with_attn else 0))
        if resample not in ("down", "up", None):
            raise ValueError(f"resample must be 'down', 'up' or None, got {resample!r}")
        self.downsample = Downsample(out_channels) if resample == "down" else None
        self.upsample = Upsample(out_channels) if resample == "up" else None

    def forward(self, x: Tensor) -> Tensor:
        for j, res in enumerate(self.res):
            x = res(x)
            if len(self.attn) > 0:
                x = self.attn[j](x)
        if self.downsample is not None:
            x = self.downsample(x)
        if self.upsample is not None:
            x = self.upsample(x)
        return x


def middle_blocks(channels: int, dropout: float, norm_groups: int) -> nn.Sequential:
    """`mid.0` Res, `mid.1` Attn, `mid.2` Res at the lowest resolution."""
    return nn.Sequential(
        ResnetBlock(channels, channels, dropout, norm_groups),
        AttnBlock(channels, norm_groups),
        ResnetBlock(channels, channels, dropout, norm_groups),
    )


@dataclass(frozen=True)
class CNNShape:
    """Widths and depths the encoder and decoder share (the reference's `ddconfig`); checked on construction."""

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    z_channels: int = 256
    dropout: float = 0.0
    norm_groups: int = 32

    def __post_init__(self) -> None:
        object.__setattr__(self, "ch_mult", tuple(self.ch_mult))
        if len(self.ch_mult) == 0 or any(not isinstance(m, int) or m < 1 for m in self.ch_mult):
            raise ValueError(f"ch_mult must be a non-empty sequence of positive ints, got {self.ch_mult!r}")
        for name in ("ch", "num_res_blocks", "z_channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")

    @property
    def scale_factor(self) -> int:
        """Pixels per latent cell along a side: 2 ** (levels − 1)."""
        return 2 ** (len(self.ch_mult) - 1)


class PixelEncoder(nn.Module):
    """VQGAN CNN encoder: `[B, in_channels, H, W] -> [B, z_channels, H/f, W/f]` with `f = 2**(len(ch_mult)-1)`.

    `shape`: the `CNNShape` fields (ch, ch_mult, num_res_blocks, z_channels, dropout, norm_groups). Level i has
    `num_res_blocks` res blocks with `ch * ch_mult[i]` output channels; the last (lowest-resolution) level adds an
    attention block after each res block; every level but the last ends with a downsample.
    """

    def __init__(self, in_channels: int = 3, **shape: Any):
        super().__init__()
        config = CNNShape(**shape)
        ch, ch_mult, num_res_blocks = config.ch, config.ch_mult, config.num_res_blocks
        dropout, norm_groups = config.dropout, config.norm_groups
        self.in_channels = in_channels
        self.z_channels = config.z_channels
        self.downsample_factor = config.scale_factor
        last = len(ch_mult) - 1

        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, padding=1)
        level_channels = [ch] + [ch * m for m in ch_mult]
        self.conv_blocks = nn.ModuleList(
            ResolutionLevel(
                level_channels[i],
                level_channels[i + 1],
                num_res_blocks,
                with_attn=i == last,
                resample=None if i == last else "down",
                dropout=dropout,
                norm_groups=norm_groups,
            )
            for i in range(len(ch_mult))
        )
        self.mid = middle_blocks(level_channels[-1], dropout, norm_groups)
        self.norm_out = group_norm(level_channels[-1], norm_groups)
        self.conv_out = nn.Conv2d(level_channels[-1], config.z_channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """`[B, in_channels, H, W]` (H, W multiples of `downsample_factor`) -> `[B, z_channels, H/f, W/f]`."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected images [B, {self.in_channels}, H, W], got {tuple(x.shape)}")
        f = self.downsample_factor
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(f"image height and width must be multiples of {f}, got {tuple(x.shape[-2:])}")
        h = self.conv_in(x)
        for level in self.conv_blocks:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class PixelDecoder(nn.Module):
    """VQGAN CNN decoder: `[B, z_channels, g, g] -> [B, out_channels, f·g, f·g]`, unbounded output (no tanh).

    `shape`: the `CNNShape` fields. Mirror of the encoder with `num_res_blocks + 1` res blocks per level;
    `conv_blocks.0` is the lowest resolution (`ch * ch_mult[-1]` channels, attention after each res block), every level
    but the last ends with an upsample.
    """

    def __init__(self, out_channels: int = 3, **shape: Any):
        super().__init__()
        config = CNNShape(**shape)
        ch, ch_mult, num_res_blocks = config.ch, config.ch_mult, config.num_res_blocks
        dropout, norm_groups = config.dropout, config.norm_groups
        self.z_channels = config.z_channels
        self.upsample_factor = config.scale_factor
        last = len(ch_mult) - 1

        level_channels = [ch * m for m in reversed(ch_mult)]
        self.conv_in = nn.Conv2d(config.z_channels, level_channels[0], kernel_size=3, padding=1)
        self.mid = middle_blocks(level_channels[0], dropout, norm_groups)
        level_channels = [level_channels[0]] + level_channels
        self.conv_blocks = nn.ModuleList(
            ResolutionLevel(
                level_channels[i],
                level_channels[i + 1],
                num_res_blocks + 1,
                with_attn=i == 0,
                resample=None if i == last else "up",
                dropout=dropout,
                norm_groups=norm_groups,
            )
            for i in range(len(ch_mult))
        )
        self.norm_out = group_norm(level_channels[-1], norm_groups)
        self.conv_out = nn.Conv2d(level_channels[-1], out_channels, kernel_size=3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        """`[B, z_channels, h, w] -> [B, out_channels, f·h, f·w]`."""
        if z.dim() != 4 or z.shape[1] != self.z_channels:
            raise ValueError(f"expected latents [B, {self.z_channels}, h, w], got {tuple(z.shape)}")
        h = self.mid(self.conv_in(z))
        for level in self.conv_blocks:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))
