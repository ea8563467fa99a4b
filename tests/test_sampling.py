"""Image-code sampling: guidance, filters and draws checked against loop-by-loop definitions."""

import math

import pytest
import torch

from llm.sampling import apply_cfg, cfg_weight, filter_logits, sample_codes, validate_sampling_args

NEG_INF = float("-inf")


# ----------------------------------------------------------------------------------------------- definitions


def brute_top_k(row, k):
    """Keep every entry at least as large as the k-th largest value."""
    values = sorted(row, reverse=True)
    if k == 0 or k >= len(row):
        return list(row)
    threshold = values[k - 1]
    return [x if x >= threshold else NEG_INF for x in row]


def brute_top_p(row, p):
    """Walk tokens from most to least probable, adding whole groups of equal logits, until the mass reaches p."""
    finite = [x for x in row if x != NEG_INF]
    top = max(finite)
    total = sum(math.exp(x - top) for x in finite)
    mass, kept_values = 0.0, set()
    for value in sorted(set(finite), reverse=True):
        if mass >= p and kept_values:
            break
        kept_values.add(value)
        mass += sum(math.exp(x - top) for x in finite if x == value) / total
    return [x if x in kept_values else NEG_INF for x in row]


def kept(filtered):
    return [i for i, x in enumerate(filtered.tolist()) if x != NEG_INF]


# ----------------------------------------------------------------------------------------------- guidance


def test_cfg_weight_schedules():
    assert [cfg_weight(k, 9, 7.5, "linear") for k in range(9)] == pytest.approx([7.5 * k / 8 for k in range(9)])
    assert cfg_weight(0, 9, 7.5, "linear") == 0.0 and cfg_weight(8, 9, 7.5, "linear") == 7.5
    assert [cfg_weight(k, 9, 3.0) for k in range(9)] == [3.0] * 9
    assert cfg_weight(0, 1, 2.0, "linear") == 2.0
    with pytest.raises(ValueError, match=r"scale_index must be an int in \[0, 8\]"):
        cfg_weight(9, 9, 1.0)


def test_apply_cfg_equals_elementwise_definition():
    cond, uncond = torch.randn(3, 7), torch.randn(3, 7)
    for t in (0.0, 0.5, 7.5):
        guided = apply_cfg(cond, uncond, t)
        for i in range(3):
            for j in range(7):
                expected = (1 + t) * cond[i, j].item() - t * uncond[i, j].item()
                assert guided[i, j].item() == pytest.approx(expected, abs=1e-5)
    assert torch.equal(apply_cfg(cond, uncond, 0.0), cond)
    per_row = torch.tensor([[0.0], [1.0], [2.0]])
    torch.testing.assert_close(apply_cfg(cond, uncond, per_row)[2], 3 * cond[2] - 2 * uncond[2])


# ----------------------------------------------------------------------------------------------- filters


def test_filters_equal_brute_force_on_random_rows():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(20, 12, generator=generator) * 2
    logits[:5, :4] = logits[:5, 4:8]  # some ties
    for top_k in (0, 1, 3, 12, 50):
        filtered = filter_logits(logits, top_k=top_k)
        for row, out in zip(logits.tolist(), filtered.tolist()):
            assert out == brute_top_k(row, top_k)
    for top_p in (0.05, 0.3, 0.5, 0.9, 0.999, 1.0):
        filtered = filter_logits(logits, top_p=top_p)
        for row, out in zip(logits.tolist(), filtered.tolist()):
            assert out == brute_top_p(row, top_p)
    for top_k, top_p in ((4, 0.5), (2, 0.99)):
        filtered = filter_logits(logits, top_k=top_k, top_p=top_p)
        for row, out in zip(logits.tolist(), filtered.tolist()):
            assert out == brute_top_p(brute_top_k(row, top_k), top_p)


def test_top_p_boundaries():
    # Probabilities 1/2, 1/4, 1/8, 1/16, 1/16 are exact in fp32, so the boundary is hit exactly.
    probabilities = [0.5, 0.25, 0.125, 0.0625, 0.0625]
    logits = torch.tensor([[math.log(x) for x in probabilities]])
    assert logits.softmax(-1)[0].tolist() == probabilities
    assert kept(filter_logits(logits, top_p=0.5)[0]) == [0]  # exactly p: stop there
    assert kept(filter_logits(logits, top_p=0.5001)[0]) == [0, 1]
    assert kept(filter_logits(logits, top_p=0.75)[0]) == [0, 1]
    assert kept(filter_logits(logits, top_p=0.7501)[0]) == [0, 1, 2]
    assert kept(filter_logits(logits, top_p=0.875)[0]) == [0, 1, 2]
    assert kept(filter_logits(logits, top_p=0.8751)[0]) == [0, 1, 2, 3, 4]  # the tied pair enters together
    assert kept(filter_logits(logits, top_p=1e-6)[0]) == [0]  # the most probable token always stays
    assert kept(filter_logits(logits, top_p=1.0)[0]) == [0, 1, 2, 3, 4]


def test_ties_are_kept_whole():
    uniform = torch.zeros(1, 4)
    assert kept(filter_logits(uniform, top_p=0.25)[0]) == [0, 1, 2, 3]
    assert kept(filter_logits(uniform, top_k=1)[0]) == [0, 1, 2, 3]
    tied_second = torch.tensor([[2.0, 1.0, 1.0, 0.0]])
    assert kept(filter_logits(tied_second, top_k=2)[0]) == [0, 1, 2]
    assert kept(filter_logits(tied_second, top_p=0.7)[0]) == [0, 1, 2]


# ----------------------------------------------------------------------------------------------- sampling


def test_greedy_is_argmax():
    logits = torch.randn(6, 10)
    logits[0, 3] = logits[0, 7] = 10.0
    codes = sample_codes(logits, temperature=0)
    assert codes.tolist() == [max(range(10), key=lambda j: (row[j], -j)) for row in logits.tolist()]
    assert codes[0] == 3


def test_same_seed_same_codes():
    logits = torch.randn(64, 50)
    first = sample_codes(logits, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(7))
    again = sample_codes(logits, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(7))
    other = sample_codes(logits, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(8))
    assert torch.equal(first, again) and not torch.equal(first, other)


@pytest.mark.parametrize(
    "temperature, top_k, top_p",
    [(1.0, 0, 1.0), (1.0, 3, 1.0), (0.5, 0, 0.8), (2.0, 4, 0.9)],
)
def test_draws_follow_filtered_distribution(temperature, top_k, top_p):
    row = [1.5, 1.0, 0.4, 0.0, -0.3, -1.2]
    tempered = [x / temperature for x in row]
    filtered = brute_top_p(brute_top_k(tempered, top_k), top_p)
    weights = [math.exp(x) for x in filtered]
    expected = torch.tensor([w / sum(weights) for w in weights])

    draws = 40_000
    logits = torch.tensor([row]).expand(draws, -1)
    codes = sample_codes(logits, temperature, top_k, top_p, generator=torch.Generator().manual_seed(0))
    frequency = torch.bincount(codes, minlength=len(row)).double() / draws
    assert (frequency[expected == 0] == 0).all()
    standard_error = (expected * (1 - expected) / draws).sqrt()
    assert ((frequency - expected).abs() <= 5 * standard_error + 1e-9).all(), (frequency, expected)


# ----------------------------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(top_p=float("nan")), r"top_p must be in \(0, 1\]"),
        (dict(temperature=-0.1), "temperature must be a finite number >= 0"),
        (dict(temperature=float("nan")), "temperature must be a finite number >= 0"),
        (dict(cfg_scale=-1.0), "cfg_scale must be a finite number >= 0"),
        (dict(temperature=float("inf")), "temperature must be a finite number >= 0"),
        (dict(cfg_scale=float("inf")), "cfg_scale must be a finite number >= 0"),
        (dict(top_k=-1), "top_k must be an int >= 0"),
        (dict(top_k=2.5), "top_k must be an int >= 0"),
        (dict(top_k=True), "top_k must be an int >= 0"),
        (dict(schedule="cosine"), r"schedule must be one of \('constant', 'linear'\)"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        validate_sampling_args(**kwargs)


def test_entry_points_validate():
    logits = torch.randn(2, 5)
    with pytest.raises(ValueError, match="top_p"):
        filter_logits(logits, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        sample_codes(logits, temperature=-1.0)
    with pytest.raises(ValueError, match="schedule"):
        cfg_weight(0, 3, 1.0, "cosine")
    with pytest.raises(ValueError, match=r"\[N, V\]"):
        filter_logits(torch.randn(5), top_k=2)
