import pytest
import torch

from tokenizer.losses import (
    LPIPS, PatchDiscriminator, adversarial_weight, hinge_discriminator_loss, hinge_generator_loss,
    reconstruction_loss, semantic_distillation_loss,
)


def test_hinge_losses_match_their_definitions():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 3.0])
    # ½(mean relu(1 − real) + mean relu(1 + fake)) = ½((0 + 0.5 + 2)/3 + (0 + 1 + 4)/3)
    assert hinge_discriminator_loss(real, fake).item() == pytest.approx(0.5 * (2.5 / 3 + 5 / 3))
    assert hinge_generator_loss(fake).item() == pytest.approx(-1 / 3)
    # a discriminator that separates by the margin has zero loss
    assert hinge_discriminator_loss(torch.full((4,), 1.5), torch.full((4,), -1.5)).item() == 0.0


def test_adversarial_weight_starts_at_the_start_step():
    assert adversarial_weight(8, 0.5, 10) == 0.0
    assert adversarial_weight(9, 0.5, 10) == 0.5  # step index 9 is the 10th step
    assert adversarial_weight(100, 0.5, 10) == 0.5


def test_patch_discriminator_shape_keys_and_init():
    disc = PatchDiscriminator(3, ndf=8, n_layers=3)
    out = disc(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 1, 6, 6)  # 64 → 32 → 16 → 8 (stride 2) → 7 → 6 (stride 1, k4 p1)
    keys = {k.split(".")[1] for k in disc.state_dict()}
    assert keys == {"0", "2", "3", "5", "6", "8", "9", "11"}
    assert isinstance(disc.main[3], torch.nn.BatchNorm2d) and disc.main[2].bias is None
    assert disc.main[0].weight.std().item() == pytest.approx(0.02, rel=0.3)


def test_reconstruction_losses():
    x, y = torch.zeros(1, 3, 4, 4), torch.full((1, 3, 4, 4), 0.5)
    assert reconstruction_loss(y, x, "l2").item() == pytest.approx(0.25)
    assert reconstruction_loss(y, x, "l1").item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="l3"):
        reconstruction_loss(y, x, "l3")


def test_semantic_distillation_is_one_minus_cosine():
    t = torch.randn(2, 5, 7)
    assert semantic_distillation_loss(3.0 * t, t).item() == pytest.approx(0.0, abs=1e-6)  # scale-invariant
    assert semantic_distillation_loss(-t, t).item() == pytest.approx(2.0, abs=1e-6)
    a = torch.tensor([[[1.0, 0.0]]])
    b = torch.tensor([[[0.0, 2.0]]])
    assert semantic_distillation_loss(a, b).item() == pytest.approx(1.0)
    pred = t.clone().requires_grad_(True)
    target = torch.randn(2, 5, 7, requires_grad=True)
    semantic_distillation_loss(pred, target).backward()
    assert target.grad is None and pred.grad is not None  # the teacher is never trained
    with pytest.raises(ValueError, match="same shape"):
        semantic_distillation_loss(torch.randn(2, 5, 7), torch.randn(2, 4, 7))


def test_lpips_structure_identity_and_weight_files(tmp_path):
    torch.manual_seed(0)
    lpips = LPIPS()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    d = lpips(x, y)
    assert d.shape == (2,) and (d > 0).all()
    assert torch.allclose(lpips(x, x), torch.zeros(2))
    assert not any(p.requires_grad for p in lpips.parameters())
    lpips.train()
    assert not lpips.training  # always eval
    # weights load from local files in torchvision's and the released linear-layer layouts
    from torchvision.models.vgg import cfgs, make_layers
    features = make_layers(cfgs["D"])  # VGG16's conv part, saved with torchvision's `features.` prefix
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, tmp_path / "vgg16.pth")
    lins = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate((64, 128, 256, 512, 512))}
    torch.save(lins, tmp_path / "vgg.pth")
    loaded = LPIPS(tmp_path / "vgg16.pth", tmp_path / "vgg.pth")
    assert torch.equal(getattr(loaded.stages[2], "10").weight, features[10].weight)  # conv3_1
    assert torch.equal(loaded.lins[4].model[1].weight, lins["lin4.model.1.weight"])
    # brute force for the first stage only: unit-normalised channel differences, weighted, spatially averaged
    fx = loaded.stages[0]((x - loaded.shift) / loaded.scale)
    fy = loaded.stages[0]((y - loaded.shift) / loaded.scale)
    unit = lambda f: f / (f.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)  # noqa: E731
    first = ((unit(fx) - unit(fy)) ** 2 * lins["lin0.model.1.weight"]).sum(1).mean(dim=(1, 2))
    assert (loaded(x, y) > first).all()
    with pytest.raises(FileNotFoundError, match="not a local file"):
        LPIPS(tmp_path / "missing.pth", tmp_path / "vgg.pth")
    with pytest.raises(ValueError, match="both"):
        LPIPS(tmp_path / "vgg16.pth", None)
