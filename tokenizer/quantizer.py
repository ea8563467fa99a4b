"""TokenFlow quantization: a shared-index dual codebook, applied as VAR-style multi-scale residual quantization.

Every code has a 32-d semantic half and an 8-d pixel half; both halves of inputs and codebook rows are l2-normalised
separately, and one index is chosen for both by

    argmin_k  d_sem(ẑ_s, e_s,k) + w · d_pix(ẑ_p, e_p,k)          (squared L2 on unit vectors, d = 2 − 2cos)
  = argmax_k  [ẑ_s ; w·ẑ_p] · [e_s,k ; e_p,k]

so the search is one fp32 matmul against the concatenated normalised codebook, chunked over rows: memory stays at
chunk × K and no N × K distance or one-hot matrix is ever built.

Multi-scale (coarse → fine, S = last scale = grid side), on h [B, 40, S, S]:

    residual = h, f̂ = 0
    for s in scales:  r = area(residual → s×s);  q = quantize(r);  u = bicubic(q → S×S)
                      f̂ += u;  residual −= sg(u)

Indices come out as [B, Σs²], scale-major and row-major inside each scale.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .configuration_tokenflow import prefix_lengths


@dataclass
class QuantizerOutput:
    """Result of quantizing one map.

    quantized: [B, C, h, w]; its value is the looked-up codes, its gradient goes to the input (straight-through).
    indices: [B, h·w] int64, row-major.
    vq_loss / commit_loss: scalars in training, None otherwise.
    """

    quantized: torch.Tensor
    indices: torch.Tensor
    vq_loss: torch.Tensor | None = None
    commit_loss: torch.Tensor | None = None


@dataclass
class MultiScaleOutput:
    """Result of multi-scale residual quantization.

    features: f̂ [B, C, S, S], the sum of every used scale's codes upsampled to S (straight-through in training).
    indices: [B, Σ s² over used scales] int64, scale-major, row-major inside each scale.
    vq_loss / commit_loss: means over the used scales in training, None otherwise.
    code_counts: [num used scales, K] int64, how often each code was picked at each used scale.
    used_scales: the sides actually quantized (one may be missing in training, see `scale_drop_prob`).
    """

    features: torch.Tensor
    indices: torch.Tensor
    vq_loss: torch.Tensor | None
    commit_loss: torch.Tensor | None
    code_counts: torch.Tensor
    used_scales: tuple[int, ...]


def codebook_stats(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Usage fraction and perplexity from code counts.

    counts: [..., K] non-negative counts (e.g. `code_counts`, one row per scale).
    Returns (usage [...], perplexity [...]): the fraction of the K codes used at least once, and exp(entropy) of the
    empirical code distribution (K when uniform, 1 when one code takes everything).
    """
    if counts.ndim == 0:
        raise ValueError("counts must have a last dimension of size K, got a scalar")
    totals = counts.sum(dim=-1, keepdim=True)
    if (totals <= 0).any():
        raise ValueError("every row of counts must have a positive total; got a row with no codes")
    counts = counts.double()
    usage = (counts > 0).double().mean(dim=-1)
    probs = counts / totals.double()
    entropy = -torch.special.xlogy(probs, probs).sum(dim=-1)
    return usage, entropy.exp()


class DualCodebookQuantizer(nn.Module):
    """Shared-index quantizer over a semantic codebook [K, semantic_dim] and a pixel codebook [K, pixel_dim].

    Parameter names are the reference checkpoint's (`embedding_vqkd` semantic, `embedding_vqgan` pixel).
    """

    def __init__(
        self,
        codebook_size: int,
        semantic_dim: int = 32,
        pixel_dim: int = 8,
        pixel_weight: float = 1.0,
        commit_beta: float = 0.25,
        chunk_size: int = 4096,
    ):
        super().__init__()
        for name, value in (("codebook_size", codebook_size), ("semantic_dim", semantic_dim),
                            ("pixel_dim", pixel_dim), ("chunk_size", chunk_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if not pixel_weight >= 0 or pixel_weight == float("inf"):
            raise ValueError(f"pixel_weight={pixel_weight!r} must be a finite number >= 0")
        if not commit_beta >= 0:
            raise ValueError(f"commit_beta={commit_beta!r} must be >= 0")
        self.codebook_size = codebook_size
        self.semantic_dim = semantic_dim
        self.pixel_dim = pixel_dim
        self.pixel_weight = float(pixel_weight)
        self.commit_beta = float(commit_beta)
        self.chunk_size = chunk_size
        self.embedding_vqkd = nn.Embedding(codebook_size, semantic_dim)
        self.embedding_vqgan = nn.Embedding(codebook_size, pixel_dim)
        self.reset_parameters()

    @property
    def code_dim(self) -> int:
        return self.semantic_dim + self.pixel_dim

    def reset_parameters(self) -> None:
        bound = 1.0 / self.codebook_size
        for embedding in (self.embedding_vqkd, self.embedding_vqgan):
            nn.init.uniform_(embedding.weight, -bound, bound)
            with torch.no_grad():
                embedding.weight.copy_(F.normalize(embedding.weight, dim=-1))

    # ------------------------------------------------------------------ codebook
    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """l2-normalises the semantic and pixel halves separately: [..., C] → [..., C]."""
        semantic, pixel = z.split([self.semantic_dim, self.pixel_dim], dim=-1)
        return torch.cat([F.normalize(semantic, dim=-1, eps=1e-12), F.normalize(pixel, dim=-1, eps=1e-12)], dim=-1)

    def codebook(self) -> torch.Tensor:
        """All K normalised codes [K, C] (semantic half then pixel half)."""
        return self.normalize(torch.cat([self.embedding_vqkd.weight, self.embedding_vqgan.weight], dim=-1))

    def _gather(self, indices: torch.Tensor) -> torch.Tensor:
        # Normalising only the gathered rows gives the same values as gathering from `codebook()`.
        return self.normalize(torch.cat([self.embedding_vqkd(indices), self.embedding_vqgan(indices)], dim=-1))

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Normalised code vectors for integer indices in [0, K): [...] → [..., C]."""
        if not isinstance(indices, torch.Tensor):
            raise ValueError(f"indices must be an integer torch.Tensor with values in [0, {self.codebook_size}), "
                             f"got {type(indices).__name__}")
        if indices.dtype.is_floating_point or indices.is_complex() or indices.dtype == torch.bool:
            raise ValueError(f"indices must be an integer tensor with values in [0, {self.codebook_size}), "
                             f"got dtype {indices.dtype}")
        if indices.numel() and (indices.min() < 0 or indices.max() >= self.codebook_size):
            raise ValueError(f"indices must lie in [0, {self.codebook_size}), got values in "
                             f"[{int(indices.min())}, {int(indices.max())}]")
        return self._gather(indices.long())

    # ------------------------------------------------------------------ search
    @torch.no_grad()
    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Shared index of the nearest code for each row: z [N, C] (need not be normalised) → [N] int64.

        Always fp32: under fp16/bf16 autocast the ±1e-3 rounding of a half-precision matmul would reorder the
        top candidates among K = 32768 codes.
        """
        if z.ndim != 2 or z.shape[-1] != self.code_dim:
            raise ValueError(f"z must have shape [N, {self.code_dim}], got {tuple(z.shape)}")
        with torch.autocast(device_type=z.device.type, enabled=False):
            query = self.normalize(z.float())
            query[:, self.semantic_dim:] *= self.pixel_weight
            codes_t = self.codebook().float().t().contiguous()  # [C, K]
            num_rows = query.shape[0]
            indices = torch.empty(num_rows, dtype=torch.long, device=z.device)
            # One score buffer reused by every chunk: allocating (and page-faulting) chunk × K floats per chunk
            # costs about as much as the matmul itself on CPU.
            scores = query.new_empty(min(self.chunk_size, num_rows), codes_t.shape[1])
            for start in range(0, num_rows, self.chunk_size):
                chunk = query[start:start + self.chunk_size]
                chunk_scores = scores[: chunk.shape[0]]
                torch.matmul(chunk, codes_t, out=chunk_scores)
                torch.argmax(chunk_scores, dim=1, out=indices[start:start + chunk.shape[0]])
        return indices

    def code_counts(self, indices: torch.Tensor) -> torch.Tensor:
        """How often each code occurs in `indices` (any shape): [K] int64."""
        return torch.bincount(indices.reshape(-1), minlength=self.codebook_size)

    # ------------------------------------------------------------------ forward
    def check_features(self, z: torch.Tensor) -> None:
        """Raises ValueError unless z is a finite float map [B, C, h, w]."""
        if not isinstance(z, torch.Tensor) or not z.is_floating_point():
            raise ValueError(f"input must be a float torch.Tensor [B, {self.code_dim}, h, w], got "
                             f"{getattr(z, 'dtype', type(z).__name__)}")
        if z.ndim != 4 or z.shape[1] != self.code_dim:
            raise ValueError(f"input must have shape [B, {self.code_dim}, h, w], got {tuple(z.shape)}")
        if not torch.isfinite(z).all():
            raise ValueError("input contains NaN or infinite values")

    def quantize_map(self, z: torch.Tensor) -> QuantizerOutput:
        """`forward` without the input check (callers that already checked the whole input use this)."""
        b, c, h, w = z.shape
        z_rows = z.permute(0, 2, 3, 1).reshape(-1, c)  # [B·h·w, C]
        z_hat = self.normalize(z_rows)
        indices = self.nearest(z_rows)
        codes = self._gather(indices).to(z_hat.dtype)
        vq_loss = commit_loss = None
        if self.training:
            vq_loss = F.mse_loss(codes, z_hat.detach())
            commit_loss = self.commit_beta * F.mse_loss(codes.detach(), z_hat)
        # Straight-through: the value is the codes, the gradient goes to the input and never to the codebook (which
        # learns from vq_loss only). Without an input gradient the sum is skipped, which keeps the value
        # bit-identical to a decode from the indices.
        quantized = z_hat + (codes - z_hat).detach() if z_hat.requires_grad else codes.detach()
        return QuantizerOutput(
            quantized=codes_to_map(quantized, b, h, w), indices=indices.view(b, h * w),
            vq_loss=vq_loss, commit_loss=commit_loss)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Quantizes z [B, C, h, w] (halves normalised first) → `QuantizerOutput`."""
        self.check_features(z)
        return self.quantize_map(z)


def codes_to_map(codes: torch.Tensor, batch: int, height: int, width: int) -> torch.Tensor:
    """Row-major code vectors [B·h·w, C] or [B, h·w, C] → map [B, C, h, w].

    Shared by encoding and decoding so both hand bicubic upsampling the same memory layout (and so the same bits).
    """
    return codes.reshape(batch, height, width, -1).permute(0, 3, 1, 2).contiguous()


def map_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """Map [B, C, h, w] → row-major tokens [B, h·w, C]."""
    return x.flatten(2).transpose(1, 2)


def resize_bicubic(x: torch.Tensor, side: int) -> torch.Tensor:
    """Bicubic resize (align_corners False) of [B, C, h, w] to side × side; the identity at the same size."""
    if x.shape[-1] == side and x.shape[-2] == side:
        return x
    return F.interpolate(x, size=(side, side), mode="bicubic", align_corners=False)


class MultiScaleResidualQuantizer(DualCodebookQuantizer):
    """VAR-style multi-scale residual quantization with the dual codebook.

    It *is* the dual-codebook quantizer (it owns the two codebooks, so the tokenizer's checkpoint keys are
    `quantize.embedding_vqkd.weight` / `quantize.embedding_vqgan.weight` as in the reference) whose forward runs the
    coarse-to-fine loop; `quantize_map` quantizes a single map.

    Args (beyond `DualCodebookQuantizer`'s):
        scales: side of each scale, strictly increasing; the last one is the grid side S.
        scale_drop_prob: in training, the probability per forward of skipping one scale drawn uniformly from
            indices 1..L−1 (never the first one; the last one can go, as in the reference).
        seed: seed of the module's own generator for the drop, so runs are reproducible; checkpoint it with
            `drop_rng_state()` / `set_drop_rng_state()`.
    """

    def __init__(
        self,
        codebook_size: int,
        scales: Sequence[int],
        semantic_dim: int = 32,
        pixel_dim: int = 8,
        pixel_weight: float = 1.0,
        commit_beta: float = 0.25,
        chunk_size: int = 4096,
        scale_drop_prob: float = 0.1,
        seed: int = 0,
    ):
        super().__init__(codebook_size, semantic_dim, pixel_dim, pixel_weight, commit_beta, chunk_size)
        scales = tuple(scales)
        if (not scales or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in scales)
                or any(a >= b for a, b in zip(scales, scales[1:]))):
            raise ValueError(f"scales={scales!r} must be a non-empty, strictly increasing sequence of positive ints")
        if not 0.0 <= scale_drop_prob < 1.0:
            raise ValueError(f"scale_drop_prob={scale_drop_prob!r} must be in [0, 1)")
        self.scales = scales
        self.scale_drop_prob = float(scale_drop_prob)
        self._drop_generator = torch.Generator(device="cpu")
        self._drop_generator.manual_seed(seed)

    @property
    def grid_size(self) -> int:
        return self.scales[-1]

    @property
    def prefix_lengths(self) -> list[int]:
        """Valid index lengths: cumulative Σ s² after each scale (e.g. [1, 5, 21, ...])."""
        return prefix_lengths(self.scales)

    def num_scales_for_length(self, length: int) -> int:
        """Number of whole scales in an index sequence of `length` codes."""
        lengths = self.prefix_lengths
        if length not in lengths:
            raise ValueError(f"{length} codes is not a whole number of scales; valid lengths for scales "
                             f"{list(self.scales)} are {lengths}")
        return lengths.index(length) + 1

    # ------------------------------------------------------------------ scale drop
    def drop_rng_state(self) -> torch.Tensor:
        """State of the scale-drop generator (save it with a training checkpoint)."""
        return self._drop_generator.get_state()

    def set_drop_rng_state(self, state: torch.Tensor) -> None:
        self._drop_generator.set_state(state)

    def _scales_for_step(self) -> tuple[int, ...]:
        if not self.training or self.scale_drop_prob == 0.0 or len(self.scales) < 2:
            return self.scales
        if torch.rand((), generator=self._drop_generator).item() >= self.scale_drop_prob:
            return self.scales
        dropped = int(torch.randint(1, len(self.scales), (), generator=self._drop_generator))
        return self.scales[:dropped] + self.scales[dropped + 1:]

    # ------------------------------------------------------------------ encode
    def forward(self, h: torch.Tensor) -> MultiScaleOutput:
        """Quantizes h [B, C, S, S] scale by scale → `MultiScaleOutput`."""
        self.check_features(h)
        side = self.grid_size
        if h.shape[-2:] != (side, side):
            raise ValueError(f"input grid is {h.shape[-2]}x{h.shape[-1]} but the last scale is {side}; "
                             f"expected [B, {self.code_dim}, {side}, {side}]")
        used_scales = self._scales_for_step()
        residual, features = h, torch.zeros_like(h)
        indices, counts, vq_losses, commit_losses = [], [], [], []
        for s in used_scales:
            r = residual if s == side else F.interpolate(residual, size=(s, s), mode="area")
            out = self.quantize_map(r)
            up = resize_bicubic(out.quantized, side)
            features = features + up
            residual = residual - up.detach()
            indices.append(out.indices)
            counts.append(self.code_counts(out.indices))
            vq_losses.append(out.vq_loss)
            commit_losses.append(out.commit_loss)
        return MultiScaleOutput(
            features=features,
            indices=torch.cat(indices, dim=1),
            vq_loss=torch.stack(vq_losses).mean() if self.training else None,
            commit_loss=torch.stack(commit_losses).mean() if self.training else None,
            code_counts=torch.stack(counts),
            used_scales=used_scales,
        )

    # ------------------------------------------------------------------ decode
    def _num_scales_in(self, indices: torch.Tensor) -> int:
        """Checks that indices is [B, L] with L a prefix length and returns the number of scales it holds."""
        if not isinstance(indices, torch.Tensor) or indices.ndim != 2:
            got = tuple(indices.shape) if isinstance(indices, torch.Tensor) else type(indices).__name__
            raise ValueError(f"indices must be a tensor [B, L], got {got}")
        return self.num_scales_for_length(indices.shape[1])

    def _scale_maps(self, indices: torch.Tensor) -> list[torch.Tensor]:
        """Indices [B, L] (L a prefix length) → one code map [B, C, s, s] per scale present."""
        sides = self.scales[: self._num_scales_in(indices)]
        codes = self.lookup(indices)  # [B, L, C]
        per_scale = codes.split([s * s for s in sides], dim=1)
        return [codes_to_map(c, indices.shape[0], s, s) for c, s in zip(per_scale, sides)]

    def indices_to_features(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices [B, L] of the first n scales → f̂ [B, C, S, S] = Σ bicubic(code map → S); fewer scales: coarser."""
        # Summing from 0 as `forward` does keeps the two bit-identical (0 + x == x).
        return sum(resize_bicubic(code_map, self.grid_size) for code_map in self._scale_maps(indices))

    # ------------------------------------------------------------------ next-scale inputs for the LLM
    def _cascade_blocks(self, indices: torch.Tensor) -> list[torch.Tensor]:
        """Teacher-forcing input blocks for the scales after the first, one per scale that can still follow.

        Cascaded low-resolution accumulation (the reference LLM's, not the tokenizer's full-resolution sum):
            f̂_0 = e_0 (at s_0);  block_k = bicubic(f̂_k → s_{k+1});  f̂_{k+1} = block_k + e_{k+1} (at s_{k+1}).
        With the codes of n scales given this returns block_0 … block_{m−1} as tokens [B, s_{k+1}², C], where
        m = n for a prefix (block_{n−1} is the input of scale n, the next one to predict) and m = n − 1 when all
        scales are given (nothing follows the last one).
        """
        maps = self._scale_maps(indices)
        num_blocks = min(len(maps), len(self.scales) - 1)
        blocks, accumulated = [], maps[0]
        for k in range(num_blocks):
            block = resize_bicubic(accumulated, self.scales[k + 1])
            blocks.append(map_to_tokens(block))
            if k + 1 < len(maps):
                accumulated = block + maps[k + 1]
        return blocks

    def next_scale_inputs(self, indices: torch.Tensor) -> torch.Tensor:
        """VAR teacher-forcing inputs: indices [B, L] → [B, L', C], raster order, blocks concatenated coarse → fine.

        Block k is the input that predicts scale k+1 (see `_cascade_blocks`). For the full index tensor
        L' = Σs² − s_0² (816 for scales 1..16 of clipb-256). For the first n < len(scales) scales,
        L' = prefix_lengths[n] − s_0²: the blocks predicting scales 1..n, the last of which is the input of the next
        scale n; it is always the leading part of the full tensor's result.
        """
        blocks = self._cascade_blocks(indices)
        if not blocks:
            return indices.new_zeros(indices.shape[0], 0, self.code_dim, dtype=self.embedding_vqkd.weight.dtype)
        return torch.cat(blocks, dim=1)

    def next_scale_block(self, indices_prefix: torch.Tensor) -> torch.Tensor:
        """Input block of the next scale after the first n scales: [B, prefix_lengths[n−1]] → [B, s_n², C].

        Used by the sampler after each drawn scale. It recomputes the cascade from scale 0: that is a handful of
        lookups and bicubic resizes of maps no larger than S × S with C = 40 channels, negligible next to one LLM
        forward, and it keeps one code path with the training inputs and no state to go stale.
        """
        if self._num_scales_in(indices_prefix) == len(self.scales):
            raise ValueError(f"all {len(self.scales)} scales are given ({indices_prefix.shape[1]} codes); there is no "
                             f"next scale; valid prefix lengths are {self.prefix_lengths[:-1]}")
        return self._cascade_blocks(indices_prefix)[-1]
