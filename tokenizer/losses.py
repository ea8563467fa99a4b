"""Training losses of the TokenFlow tokenizer (the reference `VQLoss`, split into one module per idea).

    L_G = w_rec·rec(x, x̂) + w_lpips·LPIPS(x, x̂) + w_sem·(1 − cos(ŝ, t)) + vq + commit + λ_adv(t)·(−mean D(x̂))
    L_D = λ_adv(t)·½(mean ReLU(1 − D(x)) + mean ReLU(1 + D(sg x̂)))              λ_adv(t) = w_adv once t ≥ start

Images are in [-1, 1]. Nothing here downloads anything: LPIPS needs its VGG16 and linear-layer weights as local
files, and callers that have none simply leave the perceptual term off.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from unimodal.checkpoints import load_tensor_file


# ----------------------------------------------------------------------------------------------- pixel terms

RECONSTRUCTION_LOSSES = ("l2", "l1")


def reconstruction_loss(reconstruction: torch.Tensor, target: torch.Tensor, kind: str = "l2") -> torch.Tensor:
    """Mean pixel error: `l2` (MSE, the reference default) or `l1`."""
    if kind == "l2":
        return F.mse_loss(reconstruction, target)
    if kind == "l1":
        return F.l1_loss(reconstruction, target)
    raise ValueError(f"reconstruction loss {kind!r}; allowed: {RECONSTRUCTION_LOSSES}")


# ----------------------------------------------------------------------------------------------- semantic term

def semantic_distillation_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over batch and tokens of 1 − cos(ŝ, t): prediction and teacher target [B, N, T]."""
    if prediction.shape != target.shape:
        raise ValueError(f"semantic prediction {tuple(prediction.shape)} and teacher target {tuple(target.shape)} "
                         "must have the same shape [B, N, T]")
    return (1.0 - F.cosine_similarity(prediction, target.detach(), dim=-1)).mean()


# ----------------------------------------------------------------------------------------------- LPIPS

# VGG16 `features` indices ending each compared stage: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
_VGG_STAGE_ENDS = (4, 9, 16, 23, 30)
_VGG_STAGE_CHANNELS = (64, 128, 256, 512, 512)


class LinearHead(nn.Module):
    """One LPIPS per-channel weighting: a 1×1 conv without bias (key `model.1.weight`, as in the released file)."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(p=0.0), nn.Conv2d(channels, 1, kernel_size=1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class LPIPS(nn.Module):
    """Learned perceptual distance with VGG16 features (Zhang et al. 2018), always frozen and in eval mode.

    Args:
        vgg_weights: local file of torchvision's VGG16 state dict (`features.*` keys are used; a bare `features`
            state dict also works).
        lin_weights: local file of the LPIPS linear layers (`lin0.model.1.weight` … `lin4.model.1.weight`).
        Both None builds random weights (tests only; the distance is then meaningless beyond its structure).

    forward(x, y) with x, y [B, 3, H, W] in [-1, 1] → distance [B] (0 for identical images).
    """

    shift: torch.Tensor
    scale: torch.Tensor

    def __init__(self, vgg_weights: str | os.PathLike | None = None, lin_weights: str | os.PathLike | None = None):
        super().__init__()
        from torchvision.models.vgg import cfgs, make_layers

        if (vgg_weights is None) != (lin_weights is None):
            raise ValueError("LPIPS needs both vgg_weights and lin_weights (local files), or neither for random "
                             f"weights; got vgg_weights={vgg_weights!r}, lin_weights={lin_weights!r}")
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        # VGG16's `features` (its classifier is never used: building it would cost 120M parameters)
        features = make_layers(cfgs["D"])[: _VGG_STAGE_ENDS[-1]]
        starts = (0,) + _VGG_STAGE_ENDS[:-1]
        self.stages = nn.ModuleList(features[a:b] for a, b in zip(starts, _VGG_STAGE_ENDS))
        self.lins = nn.ModuleList(LinearHead(c) for c in _VGG_STAGE_CHANNELS)
        if vgg_weights is not None:
            self._load(vgg_weights, lin_weights)
        else:
            for lin in self.lins:  # non-negative like trained heads, so the distance stays a distance
                nn.init.uniform_(lin.model[1].weight, 0.0, 1.0 / lin.model[1].in_channels)
        self.requires_grad_(False)
        self.eval()

    def _load(self, vgg_weights: str | os.PathLike, lin_weights: str | os.PathLike) -> None:
        vgg = _load_state_dict(vgg_weights, "LPIPS VGG16 weights")
        vgg = {k[len("features."):]: v for k, v in vgg.items() if k.startswith("features.")} or vgg
        own = {}
        starts = (0,) + _VGG_STAGE_ENDS[:-1]
        for stage, (a, b) in enumerate(zip(starts, _VGG_STAGE_ENDS)):
            for i in range(a, b):
                for name in ("weight", "bias"):
                    if f"{i}.{name}" in vgg:
                        own[f"stages.{stage}.{i}.{name}"] = vgg[f"{i}.{name}"]  # slices keep indices
        lin = _load_state_dict(lin_weights, "LPIPS linear-layer weights")
        own.update({f"lins.{k[3:]}": v for k, v in lin.items() if k.startswith("lin")})
        missing, unexpected = self.load_state_dict(own, strict=False)
        if missing or unexpected:
            raise ValueError(f"LPIPS weights from {os.fspath(vgg_weights)!r} and {os.fspath(lin_weights)!r} do not "
                             f"match VGG16 + 5 linear heads: missing {missing}, unexpected {unexpected}")

    def train(self, mode: bool = True) -> "LPIPS":
        # Always eval: the reference's training-time dropout in the heads was an accident (see the reference notes).
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"LPIPS compares two [B, 3, H, W] batches of the same shape, got {tuple(x.shape)} and "
                             f"{tuple(y.shape)}")
        fx, fy = (x - self.shift) / self.scale, (y - self.shift) / self.scale
        distance = x.new_zeros(x.shape[0])
        for stage, lin in zip(self.stages, self.lins):
            fx, fy = stage(fx), stage(fy)
            diff = (_unit_channels(fx) - _unit_channels(fy)).pow(2)
            distance = distance + lin(diff).mean(dim=(1, 2, 3))
        return distance


def _unit_channels(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


def _load_state_dict(path: str | os.PathLike, what: str) -> dict[str, torch.Tensor]:
    if not isinstance(path, (str, os.PathLike)) or not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: {path!r} is not a local file (nothing is downloaded)")
    state = load_tensor_file(path)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return state


# ----------------------------------------------------------------------------------------------- adversarial

class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator (pix2pix `NLayerDiscriminator`): [B, 3, H, W] → logit map [B, 1, h, w].

    conv(3→ndf, s2), LReLU; (n_layers − 1)× conv(s2, no bias), BN, LReLU; conv(s1, no bias), BN, LReLU; conv(→1, s1).
    Kernel 4, padding 1; channel multipliers capped at 8. Keys `main.{i}` as in the reference.
    """

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=False), nn.BatchNorm2d(ndf * mult),
                       nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def hinge_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """½(mean ReLU(1 − D(x)) + mean ReLU(1 + D(x̂)))."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """−mean D(x̂)."""
    return -logits_fake.mean()


def adversarial_weight(step: int, weight: float, start_step: int) -> float:
    """λ_adv(t): `weight` from `start_step` on (t counts completed steps + 1, as in the reference), else 0."""
    return weight if step + 1 >= start_step else 0.0
