"""What eval/'s benchmarks share: timings that hold on a shared, noisy machine (interleaved rounds, medians with
their min–max spread, ratios flagged when their spread is wider than their effect), the result table and the
comma-separated-ints argument.

Every benchmark in eval/ times through `time_rounds`: after the warm-up rounds, each timed round calls every
compared callable once, in order (A B A B …), so a slow spell of the machine falls on both sides of a ratio alike.
A ratio is taken per round (A_i / B_i, the two runs next to each other) and reported as the median of those with
their min–max; when that interval holds 1.0 the ratio is "within noise".
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Spread:
    """A figure measured over several rounds: the median and the min–max."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float]) -> "Spread":
        if not values:
            raise ValueError("no values to summarise")
        return cls(statistics.median(values), min(values), max(values))

    @classmethod
    def from_fields(cls, row: Mapping[str, object], name: str) -> "Spread":
        """The spread that `fields(name)` wrote into `row`."""
        low, high = row[f"{name}_spread"]
        return cls(row[name], low, high)

    @property
    def within_noise(self) -> bool:
        """True when the min–max interval of a ratio holds 1.0: the measurement cannot tell the two sides apart."""
        return self.low <= 1.0 <= self.high

    def fields(self, name: str) -> dict[str, float | list[float]]:
        """{name: median, name_spread: [low, high]}: the row fields of a benchmark table."""
        return {name: self.median, f"{name}_spread": [self.low, self.high]}

    def describe(self, spec: str = ".3g", unit: str = "") -> str:
        """"2.51x (2.40–2.63)"; a ratio whose interval holds 1.0 ends with ", within noise"."""
        text = f"{self.median:{spec}}{unit} ({self.low:{spec}}–{self.high:{spec}}"
        return text + (", within noise)" if unit == "x" and self.within_noise else ")")


def time_rounds(calls: Mapping[str, Callable[[], object]], repeats: int, warmup: int,
                device: torch.device | None = None, clock: Callable[[], float] = time.perf_counter
                ) -> tuple[dict[str, list[float]], dict[str, object]]:
    """`warmup` untimed rounds, then `repeats` timed rounds; each round calls every one of `calls` once, in their
    order. Returns the seconds of each call per timed round ({name: [repeats]}) and each call's last result. On CUDA
    the device is synchronised around every timed call."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    cuda = device is not None and torch.device(device).type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    seconds: dict[str, list[float]] = {name: [] for name in calls}
    results: dict[str, object] = {}
    for round_index in range(warmup + repeats):
        for name, fn in calls.items():
            sync()
            start = clock()
            results[name] = fn()
            sync()
            if round_index >= warmup:
                seconds[name].append(clock() - start)
    return seconds, results


def time_call(fn: Callable[[], object], repeats: int, warmup: int, device: torch.device | None = None
              ) -> tuple[list[float], object]:
    """`time_rounds` of one callable: its seconds per timed round and its last result."""
    seconds, results = time_rounds({"call": fn}, repeats, warmup, device)
    return seconds["call"], results["call"]


def per_round(fn: Callable[..., float], *series: Sequence[float]) -> Spread:
    """The spread of `fn` applied round by round to paired series (e.g. a ratio or a rate per round)."""
    return Spread.of([fn(*values) for values in zip(*series, strict=True)])


def ratio(numerator: Sequence[float], denominator: Sequence[float]) -> Spread:
    """numerator_i / denominator_i per round (interleaved runs), summarised."""
    return per_round(lambda a, b: a / b, numerator, denominator)


def print_table(rows: list[dict[str, object]]) -> None:
    """Rows of one benchmark as an aligned text table; a [low, high] spread prints as "low–high"."""
    def cell(value: object) -> str:
        if isinstance(value, float):
            return f"{value:.3g}"
        if isinstance(value, list) and len(value) == 2 and all(isinstance(v, float) for v in value):
            return f"{value[0]:.3g}–{value[1]:.3g}"
        return str(value)

    columns = list(rows[0])
    cells = [[cell(v) for v in row.values()] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)))


def int_list(text: str, minimum: int = 0) -> list[int]:
    """An argparse type: "1,8" → [1, 8]; each value at least `minimum`."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None
    if not values or any(v < minimum for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated ints >= {minimum}, got {text!r}")
    return values


def positive_int_list(text: str) -> list[int]:
    """`int_list` of values >= 1 (batch sizes)."""
    return int_list(text, minimum=1)
