"""Resizing learned ViT position embeddings to a new patch grid.

The reference TokenFlow models resize position embeddings the DINO way: bicubic interpolation driven by a
*scale factor* of (new_grid + 0.1) / old_grid rather than by a target size. The +0.1 makes the floor inside
`F.interpolate` land on `new_grid`, but the sampling positions follow the slightly larger scale, so the numbers
differ from `size=(new_grid, new_grid)`. Released weights were trained and evaluated with this rule, so matching
it is required for numerical parity.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def resize_patch_pos_embed(pos_embed: Tensor, new_grid: int, num_prefix: int = 1) -> Tensor:
    """Resize the patch part of a position embedding to a `new_grid × new_grid` patch grid.

    Args:
        pos_embed: `[P, D]` or `[1, P, D]`, the first `num_prefix` rows are prefix (class) positions,
            the remaining `P - num_prefix = g0²` rows are the patch positions of a `g0 × g0` grid, row-major.
        new_grid: side of the target patch grid.
        num_prefix: number of leading prefix positions, kept unchanged in front.

    Returns:
        `[num_prefix + new_grid², D]` (or `[1, num_prefix + new_grid², D]`, matching the input form) in the input
        dtype. The input itself is returned when `new_grid == g0`.
    """
    if pos_embed.dim() not in (2, 3) or (pos_embed.dim() == 3 and pos_embed.shape[0] != 1):
        raise ValueError(f"pos_embed must have shape [P, D] or [1, P, D], got {tuple(pos_embed.shape)}")
    if not isinstance(new_grid, int) or new_grid < 1:
        raise ValueError(f"new_grid must be a positive int, got {new_grid!r}")
    num_positions = pos_embed.shape[-2]
    if not isinstance(num_prefix, int) or not 0 <= num_prefix < num_positions:
        raise ValueError(f"num_prefix must be an int in [0, {num_positions}), got {num_prefix!r}")
    old_grid = math.isqrt(num_positions - num_prefix)
    if old_grid * old_grid != num_positions - num_prefix:
        raise ValueError(
            f"pos_embed has {num_positions - num_prefix} patch positions after {num_prefix} prefix positions, "
            "which is not a square grid"
        )
    if new_grid == old_grid:
        return pos_embed

    table = pos_embed.reshape(num_positions, -1)
    dim = table.shape[-1]
    prefix, patches = table[:num_prefix], table[num_prefix:]
    # bicubic is not implemented for every low-precision dtype on every device: resize in fp32, cast back
    patches = patches.reshape(1, old_grid, old_grid, dim).permute(0, 3, 1, 2).float()
    scale = (new_grid + 0.1) / old_grid
    patches = F.interpolate(patches, scale_factor=(scale, scale), mode="bicubic", align_corners=False)
    assert patches.shape[-2:] == (new_grid, new_grid), f"resized to {tuple(patches.shape[-2:])}, wanted {new_grid}"
    patches = patches.permute(0, 2, 3, 1).reshape(new_grid * new_grid, dim).to(pos_embed.dtype)
    resized = torch.cat([prefix, patches], dim=0)
    return resized.unsqueeze(0) if pos_embed.dim() == 3 else resized
