"""Image reconstruction metrics: PSNR, SSIM, Fréchet distance (rFID with FID-Inception, or any feature space).

Images are float tensors [B, 3, H, W] in [0, 1] unless stated otherwise. Per-image values come back as [B] tensors
so callers average over a dataset the same way the reference does (mean of per-image scores).
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"expected two image batches [B, C, H, W] of the same shape, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image PSNR in dB: 10·log10(range² / MSE) → [B] (inf for identical images)."""
    _check_pair(x, y)
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(dim=1)
    return (10.0 * torch.log10(data_range ** 2 / mse)).float()


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Normalised 1-D Gaussian [size] (the SSIM paper's 11-tap, σ = 1.5 window)."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-coords.pow(2) / (2 * sigma ** 2))
    return g / g.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, window_size: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004) with a Gaussian window → [B].

    Local means, variances and covariance are Gaussian-weighted over each window fully inside the image ("valid",
    as skimage crops its borders); the SSIM map is averaged over positions and then channels.
    C1 = (k1·L)², C2 = (k2·L)² with L = data_range (1.0 for [0, 1] images; the reference used 2.0 by mistake).
    """
    _check_pair(x, y)
    if min(x.shape[-2:]) < window_size:
        raise ValueError(f"SSIM needs images of at least {window_size}x{window_size}, got {tuple(x.shape[-2:])}")
    c = x.shape[1]
    g = gaussian_window(window_size, sigma).to(x.device)
    kernel = (g[:, None] * g[None, :]).expand(c, 1, window_size, window_size).contiguous()
    x, y = x.double(), y.double()

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kernel, groups=c)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(y * y) - mu_y ** 2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return ssim_map.mean(dim=(2, 3)).mean(dim=1).float()


def frechet_distance(features_a: np.ndarray | torch.Tensor, features_b: np.ndarray | torch.Tensor) -> float:
    """‖μa − μb‖² + Tr(Σa + Σb − 2(ΣaΣb)^½) between two feature sets [N, D] (FID's formula)."""
    from scipy import linalg

    a = np.asarray(features_a, dtype=np.float64)
    b = np.asarray(features_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"need two feature sets [N, D] with N >= 2 and the same D, got {a.shape} and {b.shape}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(covmean).all():  # singular product: jitter the diagonals as pytorch-fid does
        offset = np.eye(a.shape[1]) * 1e-6
        covmean = linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean))


class FIDInception(nn.Module):
    """pytorch-fid's InceptionV3 (the TF FID graph) with weights from a local `pt_inception-2015-12-05-*.pth`.

    forward(images [B, 3, H, W] in [0, 1]) → pool3 features [B, 2048]: bilinear resize to 299, then 2x − 1.
    The architecture comes from the `pytorch-fid` package (`pip install pytorch-fid`, or the `eval` extra);
    nothing is downloaded.
    """

    def __init__(self, weights: str | os.PathLike):
        super().__init__()
        try:
            from pytorch_fid import inception as pf
        except ImportError as error:
            raise ImportError("rFID needs the pytorch-fid package for the Inception architecture: "
                              "pip install pytorch-fid (or pip install -e '.[eval]')") from error
        if weights is None or not os.path.isfile(weights):
            raise FileNotFoundError(
                f"FID Inception weights {weights!r} not found: pass the local path of pytorch-fid's "
                "pt_inception-2015-12-05-6726825d.pth (nothing is downloaded)")
        net = pf._inception_v3(num_classes=1008, aux_logits=False, weights=None)
        net.Mixed_5b = pf.FIDInceptionA(192, pool_features=32)
        net.Mixed_5c = pf.FIDInceptionA(256, pool_features=64)
        net.Mixed_5d = pf.FIDInceptionA(288, pool_features=64)
        net.Mixed_6b = pf.FIDInceptionC(768, channels_7x7=128)
        net.Mixed_6c = pf.FIDInceptionC(768, channels_7x7=160)
        net.Mixed_6d = pf.FIDInceptionC(768, channels_7x7=160)
        net.Mixed_6e = pf.FIDInceptionC(768, channels_7x7=192)
        net.Mixed_7b = pf.FIDInceptionE_1(1280)
        net.Mixed_7c = pf.FIDInceptionE_2(2048)
        net.load_state_dict(torch.load(os.fspath(weights), map_location="cpu", weights_only=True))
        self.blocks = nn.Sequential(
            net.Conv2d_1a_3x3, net.Conv2d_2a_3x3, net.Conv2d_2b_3x3, nn.MaxPool2d(3, 2),
            net.Conv2d_3b_1x1, net.Conv2d_4a_3x3, nn.MaxPool2d(3, 2),
            net.Mixed_5b, net.Mixed_5c, net.Mixed_5d, net.Mixed_6a, net.Mixed_6b, net.Mixed_6c, net.Mixed_6d,
            net.Mixed_6e, net.Mixed_7a, net.Mixed_7b, net.Mixed_7c, nn.AdaptiveAvgPool2d(1))
        self.requires_grad_(False)
        self.eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False)
        return self.blocks(2 * x - 1).flatten(1)
