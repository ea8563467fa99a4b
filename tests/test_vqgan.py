"""VQGAN pixel encoder/decoder: exact reference key layout and parameter counts, block definitions by brute force."""

import os

import pytest
import torch
import torch.nn.functional as F

from unimodal.vqgan import AttnBlock, Downsample, PixelDecoder, PixelEncoder, ResnetBlock, Upsample

DATA = os.path.join(os.path.dirname(__file__), "data")
TINY = dict(ch=32, ch_mult=(1, 2, 2, 4), num_res_blocks=1, z_channels=64)


def reference_keys(filename: str, prefix: str) -> list[tuple[str, tuple[int, ...]]]:
    """Ordered (key without prefix, shape) pairs of one module from a reference key listing."""
    rows = []
    with open(os.path.join(DATA, filename)) as f:
        for line in f:
            key, rest = line.split(" ", 1)
            if key.startswith(prefix):
                shape = rest[rest.index("[") + 1 : rest.index("]")]
                rows.append((key[len(prefix) :], tuple(int(s) for s in shape.split(",") if s.strip())))
    return rows


def our_keys(module: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(v.shape)) for k, v in module.state_dict().items()]


def num_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------- layout of the released checkpoints
@pytest.mark.parametrize("filename", ["reference_keys_clipb_enhanced.txt", "reference_keys_siglip.txt"])
def test_encoder_matches_reference_keys_shapes_and_count(filename):
    with torch.device("meta"):
        encoder = PixelEncoder()
    expected = reference_keys(filename, "encoder.")
    assert len(expected) == 144
    assert our_keys(encoder) == expected
    assert num_params(encoder) == 29_298_176
    assert encoder.downsample_factor == 16


@pytest.mark.parametrize(
    "filename, kwargs, n_keys, n_params",
    [
        ("reference_keys_siglip.txt", {}, 194, 42_449_795),
        ("reference_keys_clipb_enhanced.txt", dict(ch=256, num_res_blocks=4), 294, 237_117_187),
    ],
    ids=["normal", "enhanced"],
)
def test_decoder_matches_reference_keys_shapes_and_count(filename, kwargs, n_keys, n_params):
    with torch.device("meta"):
        decoder = PixelDecoder(**kwargs)
    expected = reference_keys(filename, "decoder.")
    assert len(expected) == n_keys
    assert our_keys(decoder) == expected
    assert num_params(decoder) == n_params


# ---------------------------------------------------------------------- shapes of a tiny config
def test_tiny_encoder_decoder_shapes():
    encoder, decoder = PixelEncoder(**TINY), PixelDecoder(**TINY)
    x = torch.randn(2, 3, 64, 64)
    z = encoder(x)
    assert z.shape == (2, 64, 8, 8)
    y = decoder(z)
    assert y.shape == (2, 3, 64, 64)
    assert torch.isfinite(y).all()
    # non-square grids work too: 16x32 -> 2x4 -> 16x32
    assert decoder(encoder(torch.randn(1, 3, 16, 32))).shape == (1, 3, 16, 32)


def test_invalid_inputs_and_configs_raise():
    encoder, decoder = PixelEncoder(**TINY), PixelDecoder(**TINY)
    with pytest.raises(ValueError, match="multiples of 8"):
        encoder(torch.randn(1, 3, 60, 64))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        encoder(torch.randn(1, 4, 64, 64))
    with pytest.raises(ValueError, match=r"\[B, 64, h, w\]"):
        decoder(torch.randn(1, 8, 4, 4))
    with pytest.raises(ValueError, match="ch_mult"):
        PixelEncoder(ch_mult=())
    with pytest.raises(ValueError, match="num_res_blocks"):
        PixelDecoder(num_res_blocks=0)


# ---------------------------------------------------------------------- building blocks against their definitions
def test_attn_block_equals_softmax_definition():
    torch.manual_seed(1)
    block = AttnBlock(32, norm_groups=8).eval()
    for p in block.parameters():  # move away from the identity-like default GroupNorm affine
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 32, 5, 7)

    n = F.group_norm(x, 8, block.norm.weight, block.norm.bias, eps=1e-6)
    q, k, v = (F.conv2d(n, m.weight, m.bias).flatten(2) for m in (block.q, block.k, block.v))  # [B, C, HW]
    weights = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / 32**0.5, dim=-1)  # softmax over keys j
    attended = torch.einsum("bcj,bij->bci", v, weights).reshape(2, 32, 5, 7)
    expected = x + F.conv2d(attended, block.proj_out.weight, block.proj_out.bias)

    assert torch.allclose(block(x), expected, atol=1e-5)


def test_downsample_pads_only_right_and_bottom():
    down = Downsample(1)
    x = torch.arange(1.0, 37.0).reshape(1, 1, 6, 6)
    with torch.no_grad():
        down.conv.bias.zero_()
        # kernel picking the top-left tap: output[i, j] = x[2i, 2j] (a symmetric pad would give x[2i-1, 2j-1])
        down.conv.weight.zero_()
        down.conv.weight[0, 0, 0, 0] = 1.0
        assert torch.equal(down(x), x[:, :, 0::2, 0::2])
        # bottom-right tap: output[i, j] = x[2i+2, 2j+2], zero past the bottom/right edge
        down.conv.weight.zero_()
        down.conv.weight[0, 0, 2, 2] = 1.0
        expected = torch.zeros(1, 1, 3, 3)
        expected[:, :, :2, :2] = x[:, :, 2::2, 2::2]
        assert torch.equal(down(x), expected)
    assert down(torch.randn(1, 1, 8, 8)).shape == (1, 1, 4, 4)


def test_upsample_is_nearest_then_conv():
    up = Upsample(2)
    x = torch.randn(1, 2, 3, 4)
    with torch.no_grad():
        up.conv.weight.zero_()
        up.conv.bias.zero_()
        up.conv.weight[0, 0, 1, 1] = 1.0  # centre taps: identity conv
        up.conv.weight[1, 1, 1, 1] = 1.0
        expected = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
        assert torch.equal(up(x), expected)


def test_resnet_block_definition_and_shortcut():
    torch.manual_seed(2)
    same, change = ResnetBlock(16, 16, norm_groups=4), ResnetBlock(16, 32, norm_groups=4)
    assert same.nin_shortcut is None and "nin_shortcut.weight" not in same.state_dict()
    assert change.nin_shortcut.weight.shape == (32, 16, 1, 1)
    x = torch.randn(2, 16, 6, 6)
    for block in (same, change):
        for norm in (block.norm1, block.norm2):
            torch.nn.init.normal_(norm.weight)
            torch.nn.init.normal_(norm.bias)
        h = F.conv2d(F.silu(F.group_norm(x, 4, block.norm1.weight, block.norm1.bias, 1e-6)), block.conv1.weight,
                     block.conv1.bias, padding=1)
        h = F.conv2d(F.silu(F.group_norm(h, 4, block.norm2.weight, block.norm2.bias, 1e-6)), block.conv2.weight,
                     block.conv2.bias, padding=1)
        shortcut = x if block is same else F.conv2d(x, block.nin_shortcut.weight, block.nin_shortcut.bias)
        assert torch.allclose(block(x), shortcut + h, atol=1e-5)


def test_state_dict_round_trip_reproduces_outputs():
    encoder, decoder = PixelEncoder(**TINY).eval(), PixelDecoder(**TINY).eval()
    encoder2, decoder2 = PixelEncoder(**TINY).eval(), PixelDecoder(**TINY).eval()
    x = torch.randn(1, 3, 32, 32)
    assert not torch.allclose(encoder(x), encoder2(x))
    encoder2.load_state_dict(encoder.state_dict(), strict=True)
    decoder2.load_state_dict(decoder.state_dict(), strict=True)
    assert torch.equal(decoder2(encoder2(x)), decoder(encoder(x)))
