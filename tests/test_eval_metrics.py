import math

import numpy as np
import pytest
import torch

from eval.metrics import frechet_distance, gaussian_window, psnr, ssim


def test_psnr_known_values():
    x = torch.zeros(2, 3, 8, 8)
    y = x.clone()
    y[0] += 0.1          # MSE 0.01 → 20 dB
    y[1, :, :4] = 1.0    # half the pixels off by 1 → MSE 0.5 → 10·log10(2)
    assert psnr(y, x).tolist() == pytest.approx([20.0, 10 * math.log10(2)], abs=1e-4)
    assert psnr(y * 255, x * 255, data_range=255.0)[0].item() == pytest.approx(20.0, abs=1e-4)
    assert math.isinf(psnr(x, x)[0].item())


def _ssim_brute_force(x: np.ndarray, y: np.ndarray, data_range: float, size: int = 11, sigma: float = 1.5):
    """Wang et al.'s SSIM written out window by window (one channel, Gaussian weights, valid positions)."""
    c = np.arange(size) - (size - 1) / 2
    g = np.exp(-c ** 2 / (2 * sigma ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    values = []
    for i in range(x.shape[0] - size + 1):
        for j in range(x.shape[1] - size + 1):
            a, b = x[i:i + size, j:j + size], y[i:i + size, j:j + size]
            ma, mb = (w * a).sum(), (w * b).sum()
            va, vb = (w * (a - ma) ** 2).sum(), (w * (b - mb) ** 2).sum()
            cov = (w * (a - ma) * (b - mb)).sum()
            values.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    return float(np.mean(values))


def test_ssim_equals_brute_force_definition():
    rng = np.random.default_rng(0)
    x = rng.random((2, 3, 14, 15))
    y = np.clip(x + 0.2 * rng.standard_normal(x.shape), 0, 1)
    got = ssim(torch.tensor(x), torch.tensor(y))
    for b in range(2):
        expected = np.mean([_ssim_brute_force(x[b, ch], y[b, ch], 1.0) for ch in range(3)])
        assert got[b].item() == pytest.approx(expected, abs=1e-6)
    # data range 2 (the reference's setting) inflates the score
    assert (ssim(torch.tensor(x), torch.tensor(y), data_range=2.0) > got).all()


def test_ssim_identity_constant_shift_and_errors():
    x = torch.rand(1, 3, 16, 16)
    assert ssim(x, x).item() == pytest.approx(1.0, abs=1e-6)
    # a constant image vs a different constant: only the luminance term remains, (2ab + C1)/(a² + b² + C1)
    a, b = torch.full((1, 1, 11, 11), 0.2), torch.full((1, 1, 11, 11), 0.6)
    c1 = 0.01 ** 2
    assert ssim(a, b).item() == pytest.approx((2 * 0.12 + c1) / (0.04 + 0.36 + c1), abs=1e-6)
    assert gaussian_window().sum().item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="same shape"):
        ssim(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 17))


def test_frechet_distance_closed_form():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4000, 2)) * [1.0, 2.0]
    b = rng.standard_normal((4000, 2)) * [3.0, 2.0] + [1.0, 0.0]
    # diagonal Gaussians: ‖Δμ‖² + Σ (σa − σb)², with the samples' own moments
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + ((a.std(0, ddof=1) - b.std(0, ddof=1)) ** 2).sum()
    assert frechet_distance(a, b) == pytest.approx(expected, rel=0.02)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="same D"):
        frechet_distance(a, b[:, :1])
