"""Dual-codebook quantizer and multi-scale residual quantization, checked against brute-force definitions."""

import copy
import os

import pytest
import torch
import torch.nn.functional as F

from tokenizer.quantizer import DualCodebookQuantizer, MultiScaleResidualQuantizer, codebook_stats

SCALES = (1, 2, 3, 4)


# ---------------------------------------------------------------------- independent reference implementations
def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def reference_codebook(q: DualCodebookQuantizer) -> torch.Tensor:
    """[K, 40] float64, each half divided by its norm."""
    w_s, w_p = q.embedding_vqkd.weight.detach().double(), q.embedding_vqgan.weight.detach().double()
    return torch.cat([unit(w_s), unit(w_p)], dim=-1)


def reference_nearest(q: DualCodebookQuantizer, z: torch.Tensor, w: float) -> torch.Tensor:
    """argmin_k d_sem + w·d_pix with both N×K squared-distance matrices written out (float64)."""
    z = z.double()
    z_hat = torch.cat([unit(z[:, :32]), unit(z[:, 32:])], dim=-1)
    codes = reference_codebook(q)
    d_sem = ((z_hat[:, None, :32] - codes[None, :, :32]) ** 2).sum(-1)
    d_pix = ((z_hat[:, None, 32:] - codes[None, :, 32:]) ** 2).sum(-1)
    return (d_sem + w * d_pix).argmin(dim=1)


def reference_multiscale(q: MultiScaleResidualQuantizer, h: torch.Tensor, scales):
    """The residual loop from its definition: area (= adaptive average pool) down, nearest code, straight-through,
    bicubic up, residual minus the detached upsampled code."""
    side = scales[-1]
    codes = reference_codebook(q).float()
    residual, features, indices, vq_losses = h, torch.zeros_like(h), [], []
    for s in scales:
        r = F.adaptive_avg_pool2d(residual, s)
        rows = r.permute(0, 2, 3, 1).reshape(-1, 40)
        idx = reference_nearest(q, rows.detach(), q.pixel_weight)
        z_hat = torch.cat([unit(rows[:, :32]), unit(rows[:, 32:])], dim=-1)
        vq_losses.append(((codes[idx] - z_hat.detach()) ** 2).mean())
        straight_through = z_hat + (codes[idx] - z_hat).detach()
        code_map = straight_through.view(h.shape[0], s, s, 40).permute(0, 3, 1, 2)
        up = F.interpolate(code_map, size=(side, side), mode="bicubic", align_corners=False)
        features, residual = features + up, residual - up.detach()
        indices.append(idx.view(h.shape[0], s * s))
    return features, torch.cat(indices, dim=1), torch.stack(vq_losses).mean()


def make_msq(k: int = 16, scales=SCALES, **kwargs) -> MultiScaleResidualQuantizer:
    return MultiScaleResidualQuantizer(k, scales, **kwargs)


# ---------------------------------------------------------------------- single-scale quantizer
@pytest.mark.parametrize("w", [1.0, 0.3])
def test_nearest_equals_bruteforce_distance_argmin(w):
    q = DualCodebookQuantizer(64, pixel_weight=w)
    z = torch.randn(300, 40) * 3
    assert torch.equal(q.nearest(z), reference_nearest(q, z, w))


def test_pixel_weight_changes_the_choice():
    # Guards the weighting itself: with w = 0 only the semantic half decides.
    q = DualCodebookQuantizer(64, pixel_weight=0.0)
    z = torch.randn(300, 40)
    sem_only = (unit(z[:, :32]).double() @ reference_codebook(q)[:, :32].T).argmax(1)
    assert torch.equal(q.nearest(z), sem_only)
    assert not torch.equal(q.nearest(z), reference_nearest(q, z, 1.0))


def test_nearest_is_chunk_invariant():
    z = torch.randn(101, 40)
    small, large = DualCodebookQuantizer(50, chunk_size=7), DualCodebookQuantizer(50, chunk_size=4096)
    large.load_state_dict(small.state_dict())
    assert torch.equal(small.nearest(z), large.nearest(z))


def test_nearest_stays_fp32_under_autocast():
    q = DualCodebookQuantizer(2048)
    z = torch.randn(512, 40)
    expected = q.nearest(z)
    # A bf16 search picks different codes for some rows here; the quantizer must not.
    query = q.normalize(z)
    bf16 = (query.bfloat16() @ q.codebook().bfloat16().T).float().argmax(1)
    assert not torch.equal(bf16, expected)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(q.nearest(z), expected)


def test_codebook_init_is_unit_norm_per_half():
    q = DualCodebookQuantizer(100)
    assert torch.allclose(q.embedding_vqkd.weight.norm(dim=1), torch.ones(100), atol=1e-6)
    assert torch.allclose(q.embedding_vqgan.weight.norm(dim=1), torch.ones(100), atol=1e-6)
    assert torch.allclose(q.codebook().double(), reference_codebook(q), atol=1e-6)


def test_lookup_returns_normalised_rows_and_rejects_bad_indices():
    q = DualCodebookQuantizer(10)
    with torch.no_grad():
        q.embedding_vqkd.weight.mul_(torch.rand(10, 1) + 0.5)  # rows no longer unit: lookup must normalise
    idx = torch.tensor([[0, 9], [3, 3]])
    assert q.lookup(idx).shape == (2, 2, 40)
    assert torch.allclose(q.lookup(idx).double(), reference_codebook(q)[idx], atol=1e-6)
    for bad in (torch.tensor([10]), torch.tensor([-1])):
        with pytest.raises(ValueError, match=r"\[0, 10\)"):
            q.lookup(bad)
    with pytest.raises(ValueError, match=r"integer"):
        q.lookup(torch.tensor([1.0]))


def test_forward_value_indices_and_straight_through_gradient():
    q = DualCodebookQuantizer(32).train()
    z = torch.randn(2, 40, 3, 5, requires_grad=True)
    out = q(z)
    rows = z.detach().permute(0, 2, 3, 1).reshape(-1, 40)
    assert out.indices.shape == (2, 15) and out.indices.dtype == torch.int64
    assert torch.equal(out.indices.reshape(-1), reference_nearest(q, rows, 1.0))  # (b, row, col) order
    expected = q.lookup(out.indices).permute(0, 2, 1).reshape(2, 40, 3, 5)
    assert out.quantized.shape == (2, 40, 3, 5)
    assert torch.allclose(out.quantized, expected, atol=1e-6)

    # Straight-through: d quantized / d z is the Jacobian of the per-half normalisation.
    grad_out = torch.randn_like(z)
    (out.quantized * grad_out).sum().backward()
    z2 = z.detach().clone().requires_grad_(True)
    z_hat = torch.cat([unit(z2[:, :32].movedim(1, -1)), unit(z2[:, 32:].movedim(1, -1))], dim=-1).movedim(-1, 1)
    (z_hat * grad_out).sum().backward()
    assert torch.allclose(z.grad, z2.grad, atol=1e-6)

    q.eval()
    with torch.no_grad():
        value = q(z).quantized
    assert torch.equal(value, expected.detach())


def test_losses_follow_the_formulas():
    q = DualCodebookQuantizer(32, commit_beta=0.25).train()
    z = torch.randn(2, 40, 4, 4, requires_grad=True)
    out = q(z)
    rows = z.detach().permute(0, 2, 3, 1).reshape(-1, 40).double()
    z_hat = torch.cat([unit(rows[:, :32]), unit(rows[:, 32:])], dim=-1)
    mse = ((reference_codebook(q)[out.indices.reshape(-1)] - z_hat) ** 2).mean()
    assert out.vq_loss.item() == pytest.approx(mse.item(), rel=1e-5)
    assert out.commit_loss.item() == pytest.approx(0.25 * mse.item(), rel=1e-5)

    # vq_loss moves only the codebook, commit_loss only the input.
    out.vq_loss.backward(retain_graph=True)
    assert z.grad is None and q.embedding_vqkd.weight.grad.abs().sum() > 0
    q.zero_grad(set_to_none=True)
    out.commit_loss.backward()
    assert q.embedding_vqkd.weight.grad is None and z.grad.abs().sum() > 0

    q.eval()
    out = q(z)
    assert out.vq_loss is None and out.commit_loss is None


def test_forward_rejects_non_finite_and_bad_shapes():
    q = DualCodebookQuantizer(8)
    for bad_value in (float("nan"), float("inf")):
        z = torch.randn(1, 40, 2, 2)
        z[0, 3, 1, 1] = bad_value
        with pytest.raises(ValueError, match="NaN or infinite"):
            q(z)
    with pytest.raises(ValueError, match=r"\[B, 40, h, w\]"):
        q(torch.randn(1, 39, 2, 2))


def test_codebook_stats_match_one_hot_computation():
    k = 6
    indices = torch.randint(0, 4, (50,))  # codes 4 and 5 unused
    counts = DualCodebookQuantizer(k).code_counts(indices)
    one_hot = F.one_hot(indices, k).double()
    assert torch.equal(counts, one_hot.sum(0).long())
    probs = one_hot.mean(0)
    used = probs > 0
    usage, perplexity = codebook_stats(counts)
    assert usage.item() == pytest.approx(used.double().mean().item())
    assert perplexity.item() == pytest.approx(torch.exp(-(probs[used] * probs[used].log()).sum()).item())

    usage, perplexity = codebook_stats(torch.tensor([[5, 5, 5, 5], [0, 7, 0, 0]]))  # one row per scale
    assert usage.tolist() == [1.0, 0.25] and perplexity.tolist() == pytest.approx([4.0, 1.0])
    with pytest.raises(ValueError, match="positive total"):
        codebook_stats(torch.zeros(4, dtype=torch.long))


# ---------------------------------------------------------------------- multi-scale
def test_keys_match_the_reference_quantize_entries():
    with open(os.path.join(os.path.dirname(__file__), "data", "reference_keys_clipb_enhanced.txt")) as f:
        reference = [line.split(" [")[0][len("quantize."):] + " [" + line.split(" [")[1].split("]")[0] + "]"
                     for line in f if line.startswith("quantize.") and "codebook_used" not in line]
    with torch.device("meta"):
        msq = MultiScaleResidualQuantizer(32768, (1, 2, 4, 6, 8, 10, 12, 14, 16))
    ours = [f"{k} [{', '.join(map(str, v.shape))}]" for k, v in msq.state_dict().items()]
    assert ours == reference


def test_prefix_lengths_and_length_validation():
    clipb = MultiScaleResidualQuantizer(4, (1, 2, 4, 6, 8, 10, 12, 14, 16))
    assert clipb.prefix_lengths == [1, 5, 21, 57, 121, 221, 365, 561, 817]
    siglip = MultiScaleResidualQuantizer(4, (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 14, 17, 22, 27))
    assert siglip.prefix_lengths[-1] == 2227 and siglip.prefix_lengths[12] == 1014
    assert clipb.num_scales_for_length(121) == 5
    with pytest.raises(ValueError, match=r"\[1, 5, 21, 57, 121, 221, 365, 561, 817\]"):
        clipb.num_scales_for_length(122)


@pytest.mark.parametrize("w", [1.0, 0.3])
def test_multiscale_forward_equals_bruteforce_loop(w):
    msq = make_msq(pixel_weight=w, scale_drop_prob=0.0).train()
    h = torch.randn(2, 40, 4, 4)
    features, indices, vq_loss = reference_multiscale(msq, h, SCALES)
    out = msq(h)
    assert out.used_scales == SCALES
    assert torch.equal(out.indices, indices)
    assert out.indices.shape == (2, 30)
    assert torch.allclose(out.features, features, atol=1e-5)
    assert out.vq_loss.item() == pytest.approx(vq_loss.item(), rel=1e-5)
    assert out.commit_loss.item() == pytest.approx(0.25 * vq_loss.item(), rel=1e-5)
    per_scale = [F.one_hot(i, 16).sum(0) for i in indices.split([1, 4, 9, 16], dim=1)]
    assert torch.equal(out.code_counts, torch.stack([c.sum(0) for c in per_scale]))


def test_multiscale_gradients_equal_bruteforce_and_skip_the_codebook():
    msq = make_msq(scale_drop_prob=0.0).train()
    h = torch.randn(1, 40, 4, 4, requires_grad=True)
    grad_out = torch.randn(1, 40, 4, 4)
    (msq(h).features * grad_out).sum().backward()
    assert msq.embedding_vqkd.weight.grad is None  # the codebook learns from vq_loss only
    h_ref = h.detach().clone().requires_grad_(True)
    (reference_multiscale(msq, h_ref, SCALES)[0] * grad_out).sum().backward()
    assert h.grad.abs().sum() > 0
    assert torch.allclose(h.grad, h_ref.grad, atol=1e-5)
    assert not msq(h.detach()).features.requires_grad  # nor when the input takes no gradient


def test_indices_to_features_matches_forward_and_every_prefix_decodes():
    msq = make_msq().eval()
    h = torch.randn(3, 40, 4, 4)
    out = msq(h)
    assert out.vq_loss is None and out.commit_loss is None
    assert torch.equal(msq.indices_to_features(out.indices), out.features)
    previous = torch.zeros_like(out.features)
    for n, length in enumerate(msq.prefix_lengths):
        prefix = msq.indices_to_features(out.indices[:, :length])
        assert prefix.shape == (3, 40, 4, 4)
        start = length - SCALES[n] ** 2
        last = msq.lookup(out.indices[:, start:length]).transpose(1, 2).reshape(3, 40, SCALES[n], SCALES[n])
        step = F.interpolate(last, size=(4, 4), mode="bicubic", align_corners=False)
        assert torch.allclose(prefix - previous, step, atol=1e-5)
        previous = prefix
    with pytest.raises(ValueError, match=r"valid lengths .* \[1, 5, 14, 30\]"):
        msq.indices_to_features(out.indices[:, :6])


def test_forward_rejects_wrong_grid():
    with pytest.raises(ValueError, match="last scale is 4"):
        make_msq()(torch.randn(1, 40, 5, 5))


def reference_next_scale_inputs(msq, indices, scales):
    """VAR teacher forcing from the definition: accumulate at low resolution, resize to the next scale."""
    codes = reference_codebook(msq).float()[indices]  # [B, L, 40]
    b = indices.shape[0]
    maps = [c.reshape(b, s, s, 40).permute(0, 3, 1, 2) for c, s in zip(codes.split([s * s for s in scales], 1), scales)]
    blocks, f_hat = [], maps[0]
    for k in range(len(scales) - 1):
        block = F.interpolate(f_hat, size=(scales[k + 1],) * 2, mode="bicubic", align_corners=False)
        blocks.append(block.flatten(2).transpose(1, 2))
        f_hat = block + maps[k + 1]
    return torch.cat(blocks, dim=1)


def test_next_scale_inputs_and_blocks_match_bruteforce():
    scales = (1, 2, 4, 6)
    msq = make_msq(k=32, scales=scales)
    indices = torch.randint(0, 32, (2, 57))
    full = msq.next_scale_inputs(indices)
    assert full.shape == (2, 56, 40)
    assert torch.allclose(full, reference_next_scale_inputs(msq, indices, scales), atol=1e-6)
    lengths = msq.prefix_lengths
    for n in range(1, len(scales)):
        prefix = indices[:, : lengths[n - 1]]
        assert torch.equal(msq.next_scale_inputs(prefix), full[:, : lengths[n] - 1])
        block = msq.next_scale_block(prefix)
        assert block.shape == (2, scales[n] ** 2, 40)
        assert torch.equal(block, full[:, lengths[n - 1] - 1: lengths[n] - 1])
    with pytest.raises(ValueError, match="no next scale"):
        msq.next_scale_block(indices)
    with pytest.raises(ValueError, match="valid lengths"):
        msq.next_scale_inputs(indices[:, :4])


# ---------------------------------------------------------------------- random scale drop
def drawn_scales(msq, steps):
    h = torch.randn(1, 40, 4, 4)
    used = []
    for _ in range(steps):
        out = msq(h)
        assert out.indices.shape[1] == sum(s * s for s in out.used_scales)
        used.append(out.used_scales)
    return used


def test_scale_drop_rate_and_never_the_first_scale():
    msq = make_msq(k=4, scale_drop_prob=0.3, seed=1).train()
    used = drawn_scales(msq, 600)
    dropped = [set(SCALES) - set(u) for u in used]
    assert all(len(d) <= 1 for d in dropped) and all(1 in u for u in used)
    n_dropped = sum(len(d) == 1 for d in dropped)
    assert 130 <= n_dropped <= 230  # 180 expected, ±4.5σ
    for s in (2, 3, 4):  # uniform over the non-first scales, the last one included
        assert 25 <= sum(d == {s} for d in dropped) <= 100
    assert all(u == SCALES for u in drawn_scales(msq.eval(), 50))


def test_scale_drop_is_seeded_and_restorable():
    a = make_msq(k=4, scale_drop_prob=0.5, seed=7).train()
    b = make_msq(k=4, scale_drop_prob=0.5, seed=7).train()
    c = make_msq(k=4, scale_drop_prob=0.5, seed=8).train()
    seq_a, seq_b, seq_c = drawn_scales(a, 40), drawn_scales(b, 40), drawn_scales(c, 40)
    assert seq_a == seq_b and seq_a != seq_c

    state = a.drop_rng_state()
    twin = copy.deepcopy(a)  # EMA copies keep the same stream
    first = drawn_scales(a, 30)
    assert drawn_scales(twin, 30) == first
    a.set_drop_rng_state(state)
    assert drawn_scales(a, 30) == first
    assert len(set(first)) > 1  # the replayed stream does contain drops
