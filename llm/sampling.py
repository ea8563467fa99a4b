"""Sampling image codes from per-position logits: classifier-free guidance, top-k / top-p filtering, temperature.

Order of operations for one scale ``k`` of ``K`` (what the drawing loop does with the image head's logits)::

    t      = cfg_weight(k, K, cfg_scale, schedule)
    logits = apply_cfg(cond_logits, uncond_logits, t)          # (1 + t) * cond - t * uncond
    codes  = sample_codes(logits, temperature, top_k, top_p, generator)

``sample_codes`` divides by the temperature first, then filters (so top-p acts on the tempered distribution), then
draws from the softmax of what is left. Temperature 0 means greedy argmax.

Ties: both filters keep every token whose logit equals the smallest kept logit, so the result depends only on the
values, never on the order of equal entries. Top-k may therefore keep more than k tokens when the k-th largest
value is tied, and top-p keeps a tied group whole.
"""

from __future__ import annotations

import math
import numbers

import torch

__all__ = [
    "CFG_SCHEDULES",
    "apply_cfg",
    "cfg_weight",
    "filter_logits",
    "is_int",
    "keep_at_random",
    "resolve_seed",
    "sample_codes",
    "seeded_generator",
    "validate_sampling_args",
]

CFG_SCHEDULES = ("constant", "linear")


def is_int(value: object) -> bool:
    """True for integers (`numbers.Integral`, numpy ints included), False for bools."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def validate_sampling_args(
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    cfg_scale: float = 0.0,
    schedule: str = "constant",
    scale_rounds: int = 1,
) -> None:
    """Raise ``ValueError`` naming the allowed range for any out-of-range sampling setting.

    Allowed: finite ``temperature >= 0`` (0 = greedy), ``top_k`` an int ``>= 0`` (0 = off), ``0 < top_p <= 1`` (1 = off),
    finite ``cfg_scale >= 0`` (0 = no guidance), ``schedule`` in ``CFG_SCHEDULES``, ``scale_rounds`` an int ``>= 1``.
    """
    if not is_int(scale_rounds) or scale_rounds < 1:
        raise ValueError(f"scale_rounds must be an int >= 1 (1 = every code of a scale at once), got {scale_rounds!r}")
    # Written as `not (x >= 0)` so NaN is rejected too.
    if not isinstance(temperature, numbers.Real) or not 0 <= temperature < math.inf:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if not is_int(top_k) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 = off), got {top_k!r}")
    if not isinstance(top_p, numbers.Real) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1.0 = off), got {top_p!r}")
    if not isinstance(cfg_scale, numbers.Real) or not 0 <= cfg_scale < math.inf:
        raise ValueError(f"cfg_scale must be a finite number >= 0 (0 = no guidance), got {cfg_scale!r}")
    if schedule not in CFG_SCHEDULES:
        raise ValueError(f"schedule must be one of {CFG_SCHEDULES}, got {schedule!r}")


def resolve_seed(seed: int | None) -> int:
    """The seed to draw with: `seed` itself (an int in [0, 2**64), torch's seed range), or a fresh one from torch's
    global generator when None (so `torch.manual_seed` makes even unseeded drawings repeatable)."""
    if seed is None:
        return int(torch.randint(0, 2**31 - 1, ()).item())
    if not is_int(seed) or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an int in [0, 2**64) or None (a fresh seed), got {seed!r}")
    return int(seed)


def seeded_generator(seed: int | None, generator: torch.Generator | None, device) -> tuple[torch.Generator, int]:
    """The generator a drawing uses and its seed: `generator` as given (with its initial seed), else a new one on
    `device` seeded with `resolve_seed(seed)`. The one place drawings get their randomness."""
    if generator is not None and seed is not None:
        raise ValueError("pass generator or seed, not both")
    if generator is not None:
        return generator, generator.initial_seed()
    seed = resolve_seed(seed)
    return torch.Generator(device=device).manual_seed(seed), seed


def cfg_weight(scale_index: int, num_scales: int, cfg_scale: float, schedule: str = "constant") -> float:
    """Guidance weight ``t`` for one scale.

    ``"constant"``: ``t = cfg_scale`` at every scale. ``"linear"``: the reference ramp ``t = cfg_scale * k / (K - 1)``,
    no guidance at the 1x1 scale and full guidance at the last one (with a single scale, that scale is the last and
    gets ``cfg_scale``).
    """
    validate_sampling_args(cfg_scale=cfg_scale, schedule=schedule)
    if not is_int(num_scales) or num_scales < 1:
        raise ValueError(f"num_scales must be an int >= 1, got {num_scales!r}")
    if not is_int(scale_index) or not 0 <= scale_index < num_scales:
        raise ValueError(f"scale_index must be an int in [0, {num_scales - 1}], got {scale_index!r}")
    if schedule == "constant" or num_scales == 1:
        return float(cfg_scale)
    return float(cfg_scale) * scale_index / (num_scales - 1)


def apply_cfg(cond: torch.Tensor, uncond: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance on logits: ``(1 + t) * cond - t * uncond`` (``t = 0`` returns ``cond``).

    Args:
        cond, uncond: logits of the conditional and unconditional rows, same shape (e.g. ``[N, V]``).
        t: guidance weight, a float or a tensor broadcastable to the logits (e.g. one weight per row ``[N, 1]``).
    """
    if cond.shape != uncond.shape:
        raise ValueError(
            f"cond and uncond logits must have the same shape, got {tuple(cond.shape)} and {tuple(uncond.shape)}"
        )
    return (1 + t) * cond - t * uncond


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set the logits outside the top-k and the top-p nucleus to ``-inf`` (ties kept whole, see module docstring).

    Args:
        logits: ``[N, V]``.
        top_k: keep the ``top_k`` largest logits of each row; 0 = off (and ``top_k >= V`` keeps everything).
        top_p: keep the smallest set of most probable tokens whose total probability is ``>= top_p``; the most
            probable token is always kept; 1.0 = off. Probabilities are the softmax of the row in fp32 after top-k.

    Returns:
        ``[N, V]``, same dtype as ``logits``.
    """
    validate_sampling_args(top_k=top_k, top_p=top_p)
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, V], got shape {tuple(logits.shape)}")
    vocab_size = logits.shape[-1]
    if 0 < top_k < vocab_size:
        kth_largest = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p < 1.0:
        sorted_logits = logits.sort(dim=-1, descending=True).values
        sorted_probs = sorted_logits.float().softmax(dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        # A token joins the nucleus while the tokens above it hold less than top_p; the first always joins.
        num_kept = (mass_before < top_p).sum(dim=-1, keepdim=True).clamp(min=1)
        smallest_kept = sorted_logits.gather(-1, num_kept - 1)
        logits = logits.masked_fill(logits < smallest_kept, float("-inf"))
    return logits


def keep_at_random(kept: torch.Tensor, num_kept: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """One round of drawing a scale in rounds: which codes to keep, in a uniformly random order.

    Random, as training's reveals are: keeping the surest draws first keeps background codes first and leaves the
    objects' codes to the last round, all at once (it drew worse, see the README).

    Args:
        kept: ``[R, n]`` bool, codes kept in earlier rounds (they stay kept).
        num_kept: how many codes of each row are kept after this round (``>= kept.sum(1)``).
        generator: ``torch.Generator`` on ``kept``'s device.

    Returns:
        ``[R, n]`` bool: ``kept`` plus codes chosen uniformly among the others, ``num_kept`` per row.
    """
    scores = torch.rand(kept.shape, generator=generator, device=kept.device).masked_fill(kept, 2.0)
    return kept.scatter(1, scores.topk(num_kept, dim=-1).indices, True)


def sample_codes(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw one code per row.

    Args:
        logits: ``[N, V]`` (already guided).
        temperature: divides the logits before filtering; 0 = greedy argmax (first index among equal maxima).
        top_k, top_p: see ``filter_logits``.
        generator: ``torch.Generator`` on the logits' device, for reproducible draws.

    Returns:
        ``LongTensor [N]``.
    """
    validate_sampling_args(temperature=temperature, top_k=top_k, top_p=top_p)
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, V], got shape {tuple(logits.shape)}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
