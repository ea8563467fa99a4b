"""The shared benchmark timing: interleaving order, per-round seconds, medians and spreads, ratios flagged within
noise — all with a fake clock and fake callables, so nothing here depends on how fast the machine is."""

import argparse

import pytest

from eval.benchmarking import Spread, int_list, per_round, print_table, ratio, time_call, time_rounds
from eval.speed import decode_rate


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def fake_call(name: str, durations: list[float], clock: FakeClock, log: list[str]):
    """A callable that logs its name, advances the clock by its next duration and returns its call number."""
    remaining = iter(durations)

    def call():
        log.append(name)
        clock.now += next(remaining)
        return f"{name}{log.count(name)}"

    return call


def test_rounds_interleave_the_sides_and_time_only_after_warmup():
    clock, log = FakeClock(), []
    calls = {"a": fake_call("a", [50.0, 1.0, 2.0, 3.0], clock, log),
             "b": fake_call("b", [70.0, 2.0, 2.0, 9.0], clock, log)}
    seconds, results = time_rounds(calls, repeats=3, warmup=1, clock=clock)
    assert log == ["a", "b", "a", "b", "a", "b", "a", "b"]  # A B A B …, warm-up round first
    assert seconds == {"a": [1.0, 2.0, 3.0], "b": [2.0, 2.0, 9.0]}  # the warm-up's 50 s and 70 s are not counted
    assert results == {"a": "a4", "b": "b4"}  # the last call's result
    times, last = time_call(fake_call("c", [5.0, 4.0], FakeClock(), []), repeats=2, warmup=0)
    assert last == "c2" and len(times) == 2


def test_rounds_refuse_nonsense_counts():
    with pytest.raises(ValueError, match="repeats"):
        time_rounds({"a": lambda: None}, repeats=0, warmup=1)
    with pytest.raises(ValueError, match="warmup"):
        time_rounds({"a": lambda: None}, repeats=3, warmup=-1)


def test_spread_median_and_min_max():
    assert Spread.of([3.0, 1.0, 10.0, 2.0, 4.0]) == Spread(3.0, 1.0, 10.0)
    assert Spread.of([4.0, 1.0, 2.0, 3.0]).median == 2.5  # even count: mean of the middle two
    with pytest.raises(ValueError):
        Spread.of([])
    row = {"x": 1.0, **Spread(2.0, 1.5, 3.0).fields("speedup")}
    assert row == {"x": 1.0, "speedup": 2.0, "speedup_spread": [1.5, 3.0]}
    assert Spread.from_fields(row, "speedup") == Spread(2.0, 1.5, 3.0)


def test_ratio_is_taken_per_round_and_flagged_within_noise():
    # Round by round the recompute took 3, 2.5 and 2.6 times the cached draw.
    clear = ratio([3.0, 5.0, 2.6], [1.0, 2.0, 1.0])
    assert clear == Spread(2.6, 2.5, 3.0) and not clear.within_noise
    assert clear.describe(".2f", "x") == "2.60x (2.50–3.00)"
    # Median 0.9 but one round went the other way: the interval holds 1.0.
    noisy = ratio([0.8, 0.9, 1.2], [1.0, 1.0, 1.0])
    assert noisy.median == pytest.approx(0.9) and noisy.within_noise
    assert noisy.describe(".2f", "x") == "0.90x (0.80–1.20, within noise)"
    assert Spread(5.0, 0.5, 6.0).describe() == "5 (0.5–6)"  # not a ratio: no flag
    with pytest.raises(ValueError):
        per_round(lambda a, b: a / b, [1.0, 2.0], [1.0])


def test_decode_rate_from_interleaved_first_token_and_answer():
    # 11 tokens: 10 after the first; per round the answer took 1.0, 0.5, 2.0 s longer than the first token.
    rate = decode_rate(11, [0.1, 0.1, 0.2], [1.1, 0.6, 2.2])
    assert rate == {"tokens_per_s": 10.0, "tokens_per_s_spread": [5.0, 20.0], "tokens_per_s_within_noise": False}
    # One round's answer was no slower than its first token: within noise, no spread.
    noisy = decode_rate(11, [0.5, 0.1, 0.1], [0.4, 1.1, 1.1])
    assert noisy == {"tokens_per_s": 10.0, "tokens_per_s_spread": None, "tokens_per_s_within_noise": True}


def test_table_and_int_list(capsys):
    print_table([{"name": "a", "speedup": 2.0, "speedup_spread": [1.5, 3.25]}])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["name", "speedup", "speedup_spread"] and lines[2].split() == ["a", "2", "1.5–3.25"]
    assert int_list("0,128") == [0, 128]
    with pytest.raises(argparse.ArgumentTypeError, match="ints >= 1"):
        int_list("0,8", minimum=1)
    with pytest.raises(argparse.ArgumentTypeError, match="comma-separated"):
        int_list("one")
