"""Semantic decoder and task layers: exact reference key lists, and numbers against a hand-written ViT."""

import math
import os

import pytest
import torch

from tokenizer.semantic_decoder import Attention, SemanticDecoder, TaskLayer
from unimodal.pos_embed import resize_patch_pos_embed

DATA = os.path.join(os.path.dirname(__file__), "data")


def reference_entries(filename: str, prefix: str) -> list[str]:
    """`key [shape]` lines under `prefix` (prefix removed), in file order."""
    with open(os.path.join(DATA, filename)) as f:
        return [line.rsplit(" ", 1)[0][len(prefix):] for line in f if line.startswith(prefix)]


def entries(module: torch.nn.Module) -> list[str]:
    return [f"{k} [{', '.join(map(str, v.shape))}]" for k, v in module.state_dict().items()]


@pytest.mark.parametrize("filename, width, grid, target_dim, num_params", [
    ("reference_keys_clipb_enhanced.txt", 768, 14, 512, 21_440_256),
    ("reference_keys_siglip.txt", 1152, 27, 1152, 48_699_648),
])
def test_keys_shapes_and_sizes_equal_the_reference(filename, width, grid, target_dim, num_params):
    with torch.device("meta"):
        decoder = SemanticDecoder(grid=grid, in_dim=32, embed_dim=width, depth=3, num_heads=12)
        encode_task = TaskLayer(width, 32)
        decode_task = TaskLayer(width, target_dim)
    assert entries(decoder) == reference_entries(filename, "decoder_vqkd.")
    assert sum(p.numel() for p in decoder.parameters()) == num_params
    assert entries(encode_task) == reference_entries(filename, "encode_task_layer.")
    assert entries(decode_task) == reference_entries(filename, "decode_task_layer.")


def randomize_(module: torch.nn.Module, std: float = 0.3) -> None:
    """Large random values everywhere (biases included) so every term shows in the output."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, std)


def reference_attention(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    b, n, d = x.shape
    h = attn.num_heads
    weight = attn.qkv.weight
    q = x @ weight[:d].T + attn.q_bias
    k = x @ weight[d:2 * d].T  # k has no bias
    v = x @ weight[2 * d:].T + attn.v_bias
    q, k, v = (t.reshape(b, n, h, d // h) for t in (q, k, v))
    scores = torch.einsum("bqhc,bkhc->bhqk", q, k) / math.sqrt(d // h)
    out = torch.einsum("bhqk,bkhc->bqhc", scores.softmax(dim=-1), v).reshape(b, n, d)
    return out @ attn.proj.weight.T + attn.proj.bias


def test_attention_equals_einsum_softmax():
    attn = Attention(24, num_heads=4)
    randomize_(attn)
    x = torch.randn(2, 7, 24)
    assert torch.allclose(attn(x), reference_attention(attn, x), atol=1e-5)


def reference_decoder(dec: SemanticDecoder, x: torch.Tensor) -> torch.Tensor:
    """Hand-written forward: 1×1 conv as a matmul, cls + pos, pre-LN blocks with erf GELU, fc_norm on patches."""
    b, c, s, _ = x.shape
    w = dec.patch_embed.proj.weight[:, :, 0, 0]
    tokens = x.permute(0, 2, 3, 1).reshape(b, s * s, c) @ w.T + dec.patch_embed.proj.bias
    h = torch.cat([dec.cls_token.expand(b, -1, -1), tokens], dim=1) + dec.pos_embed
    d = h.shape[-1]

    def layer_norm(t, norm):
        mean, var = t.mean(-1, keepdim=True), t.var(-1, unbiased=False, keepdim=True)
        return (t - mean) / torch.sqrt(var + 1e-6) * norm.weight + norm.bias

    for blk in dec.blocks:
        h = h + reference_attention(blk.attn, layer_norm(h, blk.norm1))
        hidden = layer_norm(h, blk.norm2) @ blk.mlp.fc1.weight.T + blk.mlp.fc1.bias
        hidden = 0.5 * hidden * (1.0 + torch.erf(hidden / math.sqrt(2.0)))
        h = h + hidden @ blk.mlp.fc2.weight.T + blk.mlp.fc2.bias
    assert h.shape[-1] == d
    return layer_norm(h[:, 1:], dec.fc_norm)


def test_decoder_forward_equals_hand_written_vit():
    dec = SemanticDecoder(grid=4, in_dim=6, embed_dim=32, depth=2, num_heads=4)
    randomize_(dec)
    x = torch.randn(2, 6, 4, 4)
    out = dec(x)
    assert out.shape == (2, 16, 32)
    assert torch.allclose(out, reference_decoder(dec, x), atol=1e-4)


def test_decoder_interpolates_position_embedding_at_other_grids():
    dec = SemanticDecoder(grid=4, in_dim=6, embed_dim=32, depth=1, num_heads=4)
    randomize_(dec)
    x = torch.randn(1, 6, 6, 6)
    out = dec(x)
    assert out.shape == (1, 36, 32)
    # Same weights, but built for a 6x6 grid with the resized table: must give the same result.
    wide = SemanticDecoder(grid=6, in_dim=6, embed_dim=32, depth=1, num_heads=4)
    state = dict(dec.state_dict(), pos_embed=resize_patch_pos_embed(dec.pos_embed.detach(), 6, num_prefix=1))
    wide.load_state_dict(state)
    assert torch.allclose(out, wide(x), atol=1e-5)


def test_decoder_rejects_wrong_input():
    dec = SemanticDecoder(grid=4, in_dim=6, embed_dim=32, depth=1, num_heads=4)
    with pytest.raises(ValueError, match=r"\[B, 6, S, S\]"):
        dec(torch.randn(1, 5, 4, 4))
    with pytest.raises(ValueError, match="divisible"):
        SemanticDecoder(grid=4, embed_dim=30, num_heads=4)


def test_decoder_init():
    torch.manual_seed(0)
    dec = SemanticDecoder(grid=8, in_dim=32, embed_dim=128, depth=3, num_heads=4)
    assert dec.pos_embed.std().item() == pytest.approx(0.02, rel=0.05)
    assert dec.blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    for i, blk in enumerate(dec.blocks, start=1):
        expected = 0.02 / math.sqrt(2 * i)
        assert blk.attn.proj.weight.std().item() == pytest.approx(expected, rel=0.05)
        assert blk.mlp.fc2.weight.std().item() == pytest.approx(expected, rel=0.05)
        assert blk.mlp.fc1.weight.std().item() == pytest.approx(0.02, rel=0.05)
        for zero in (blk.attn.q_bias, blk.attn.v_bias, blk.attn.proj.bias, blk.mlp.fc1.bias, blk.norm1.bias):
            assert torch.count_nonzero(zero) == 0
        assert torch.equal(blk.norm2.weight, torch.ones(128))
    norms = [m for m in dec.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 7 and all(m.eps == 1e-6 for m in norms)


def test_task_layer_math_dtype_and_init():
    layer = TaskLayer(16, 5)
    assert [type(m).__name__ for m in layer] == ["Linear", "Tanh", "Linear"]
    assert torch.count_nonzero(layer[0].bias) == 0 and torch.count_nonzero(layer[2].bias) == 0
    randomize_(layer)
    x = torch.randn(3, 4, 16, dtype=torch.float64)
    out = layer(x)
    assert out.dtype == torch.float32 and out.shape == (3, 4, 5)
    xf = x.float()
    expected = torch.tanh(xf @ layer[0].weight.T + layer[0].bias) @ layer[2].weight.T + layer[2].bias
    assert torch.allclose(out, expected, atol=1e-5)
