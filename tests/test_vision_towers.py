"""Semantic vision towers and the position-embedding resize: reference layouts, equivalence with open_clip and
transformers, and bicubic resizing checked against a from-scratch implementation."""

import math
import os

import numpy as np
import open_clip
import pytest
import torch
from open_clip.transformer import QuickGELU as OpenClipQuickGELU
from open_clip.transformer import VisionTransformer as OpenClipVisionTransformer
from transformers import SiglipVisionConfig

from unimodal.pos_embed import resize_patch_pos_embed
from unimodal.vision_towers import (
    OpenAIClipVisionTower,
    OpenClipVisionTower,
    SiglipVisionTower,
    VisionTower,
    build_vision_tower,
)

DATA = os.path.join(os.path.dirname(__file__), "data")

TINY_SIGLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, patch_size=8,
                   image_size=32)
TINY_OPEN_CLIP = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 16, "pool_type": "avg"},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}


def reference_keys(filename: str, prefix: str) -> list[tuple[str, tuple[int, ...]]]:
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


# ---------------------------------------------------------------------- bicubic resize written out from its definition
def cubic_taps(t: float, a: float = -0.75) -> list[float]:
    """Keys' cubic convolution weights of the 4 taps around a source position with fractional part t."""
    near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1  # noqa: E731  |x| <= 1
    far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a  # noqa: E731  1 < |x| < 2
    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


def bicubic_matrix(n_in: int, n_out: int, scale: float) -> np.ndarray:
    """[n_out, n_in] interpolation matrix, half-pixel centres, source = (o + 0.5) / scale - 0.5, edge-clamped taps."""
    m = np.zeros((n_out, n_in))
    for o in range(n_out):
        src = (o + 0.5) / scale - 0.5
        base = math.floor(src)
        for k, w in enumerate(cubic_taps(src - base)):
            m[o, min(max(base - 1 + k, 0), n_in - 1)] += w
    return m


def brute_force_resize(pos_embed: torch.Tensor, new_grid: int, num_prefix: int, scale: float) -> torch.Tensor:
    """[P, D] -> [num_prefix + new_grid², D] in float64, separable bicubic with the given scale."""
    table = pos_embed.double().numpy()
    g0 = math.isqrt(table.shape[0] - num_prefix)
    grid = table[num_prefix:].reshape(g0, g0, -1)
    m = bicubic_matrix(g0, new_grid, scale)
    resized = np.einsum("ai,bj,ijd->abd", m, m, grid).reshape(new_grid * new_grid, -1)
    return torch.from_numpy(np.concatenate([table[:num_prefix], resized]))


# ---------------------------------------------------------------------- resize_patch_pos_embed
@pytest.mark.parametrize("g0, new_grid, num_prefix", [(14, 16, 1), (4, 6, 1), (6, 4, 1), (27, 24, 0), (3, 7, 2)])
def test_resize_follows_the_plus_point_one_scale_factor(g0, new_grid, num_prefix):
    pos = torch.randn(num_prefix + g0 * g0, 8)
    out = resize_patch_pos_embed(pos, new_grid, num_prefix=num_prefix)
    assert out.shape == (num_prefix + new_grid**2, 8) and out.dtype == pos.dtype
    assert torch.equal(out[:num_prefix], pos[:num_prefix])
    expected = brute_force_resize(pos, new_grid, num_prefix, scale=(new_grid + 0.1) / g0)
    assert torch.allclose(out.double(), expected, atol=1e-5)
    # and it is not the target-size rule (scale new_grid / g0), which samples at different positions
    by_size = brute_force_resize(pos, new_grid, num_prefix, scale=new_grid / g0)
    assert (out.double() - by_size).abs().max() > 1e-3


def test_resize_keeps_form_dtype_and_is_identity_at_native_grid():
    pos = torch.randn(1, 1 + 16, 6, dtype=torch.float64)
    assert resize_patch_pos_embed(pos, 4) is pos
    out = resize_patch_pos_embed(pos, 5)
    assert out.shape == (1, 26, 6) and out.dtype == torch.float64
    assert torch.allclose(out[0], resize_patch_pos_embed(pos[0], 5))
    half = resize_patch_pos_embed(pos.to(torch.bfloat16), 5)
    assert half.dtype == torch.bfloat16


def test_resize_rejects_bad_inputs():
    with pytest.raises(ValueError, match="not a square grid"):
        resize_patch_pos_embed(torch.randn(1 + 15, 4), 4)
    with pytest.raises(ValueError, match="new_grid"):
        resize_patch_pos_embed(torch.randn(1 + 16, 4), 0)
    with pytest.raises(ValueError, match="shape"):
        resize_patch_pos_embed(torch.randn(2, 17, 4), 4)


# ---------------------------------------------------------------------- OpenAI CLIP tower
def test_openai_clip_default_matches_reference_keys_and_count():
    with torch.device("meta"):
        tower = OpenAIClipVisionTower()
    expected = reference_keys("reference_keys_clipb_enhanced.txt", "encoder_vqkd.")
    assert len(expected) == 151
    assert our_keys(tower) == expected
    assert sum(p.numel() for p in tower.parameters()) == 85_799_424
    assert (tower.hidden_size, tower.patch_size, tower.image_size, tower.output_dim) == (768, 16, 224, None)
    assert isinstance(tower, VisionTower)


def small_open_clip_vit() -> OpenClipVisionTransformer:
    torch.manual_seed(3)
    vit = OpenClipVisionTransformer(image_size=32, patch_size=8, width=64, layers=2, heads=4, mlp_ratio=4.0,
                                    output_dim=24, act_layer=OpenClipQuickGELU, output_tokens=True).eval()
    for name, p in vit.named_parameters():  # non-trivial LayerNorm and bias values
        if "ln" in name or name.endswith("bias"):
            torch.nn.init.normal_(p, std=0.5)
    return vit


def test_openai_clip_equals_open_clip_vision_transformer():
    vit = small_open_clip_vit()
    ours = OpenAIClipVisionTower(image_size=32, patch_size=8, width=64, layers=2, heads=4, output_dim=24).eval()
    ours.load_state_dict(vit.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _, ref_tokens = vit(x)
        tokens = ours(x)
    assert tokens.shape == (2, 16, 64)
    assert torch.allclose(tokens, ref_tokens, atol=1e-5)
    assert torch.allclose(ours.project(tokens), ref_tokens @ vit.proj, atol=1e-5)
    assert ours.output_dim == 24


def test_openai_clip_larger_input_resizes_position_embedding_by_scale_factor():
    ours = OpenAIClipVisionTower(image_size=32, patch_size=8, width=64, layers=2, heads=4).eval()
    x = torch.randn(1, 3, 48, 48)  # native grid 4, new grid 6
    with torch.no_grad():
        tokens = ours(x)
    assert tokens.shape == (1, 36, 64)

    def run_with_table(table: torch.Tensor) -> torch.Tensor:
        native48 = OpenAIClipVisionTower(image_size=48, patch_size=8, width=64, layers=2, heads=4).eval()
        native48.load_state_dict(dict(ours.state_dict(), positional_embedding=table.float()), strict=True)
        with torch.no_grad():
            return native48(x)

    pos = ours.positional_embedding.detach()
    by_scale = run_with_table(brute_force_resize(pos, 6, 1, scale=6.1 / 4))
    by_size = run_with_table(brute_force_resize(pos, 6, 1, scale=6 / 4))
    assert torch.allclose(tokens, by_scale, atol=1e-5)
    assert (tokens - by_size).abs().max() > 1e-3


def test_openai_clip_rejects_bad_inputs():
    ours = OpenAIClipVisionTower(image_size=32, patch_size=8, width=64, layers=1, heads=4)
    with pytest.raises(ValueError, match="at least one 8-px patch"):
        ours(torch.randn(1, 3, 4, 4))
    with pytest.raises(ValueError, match="square"):
        ours(torch.randn(1, 3, 32, 48))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        ours(torch.randn(3, 32, 32))
    with pytest.raises(TypeError, match="float"):
        ours(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


# ---------------------------------------------------------------------- SigLIP tower
def test_siglip_equals_full_model_hidden_states_minus_two_and_skips_the_rest():
    torch.manual_seed(4)
    tower = SiglipVisionTower(**TINY_SIGLIP).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        full = tower.vision_model(x, output_hidden_states=True)
        tokens = tower(x)
    assert len(full.hidden_states) == 4  # embeddings + 3 layers
    assert tokens.shape == (2, 16, 32)
    assert torch.equal(tokens, full.hidden_states[-2])
    assert not torch.allclose(tokens, full.hidden_states[-1])
    # the last layer, post_layernorm and head never run: poisoning them changes nothing
    with torch.no_grad():
        for module in (tower.vision_model.encoder.layers[-1], tower.vision_model.post_layernorm,
                       tower.vision_model.head):
            for p in module.parameters():
                p.fill_(float("nan"))
        assert torch.equal(tower(x), tokens)
    assert tower.project(tokens) is tokens and tower.output_dim is None


def test_siglip_so400m_matches_reference_keys_and_count():
    with torch.device("meta"):
        tower = SiglipVisionTower()
    expected = reference_keys("reference_keys_siglip.txt", "encoder_vqkd.")
    assert len(expected) == 448
    # transformers 5 registers layer_norm1 before self_attn (4.x did the reverse): compare as a mapping
    assert dict(our_keys(tower)) == dict(expected)
    assert len(tower.state_dict()) == 448
    assert sum(p.numel() for p in tower.parameters()) == 428_225_600
    assert (tower.hidden_size, tower.patch_size, tower.image_size) == (1152, 14, 384)
    assert isinstance(tower, VisionTower)


def test_siglip_rejects_other_sizes_and_conflicting_args():
    tower = SiglipVisionTower(**TINY_SIGLIP)
    with pytest.raises(ValueError, match="takes 32x32 images, got 40x40"):
        tower(torch.randn(1, 3, 40, 40))
    with pytest.raises(ValueError, match="not both"):
        SiglipVisionTower(SiglipVisionConfig(**TINY_SIGLIP), hidden_size=64)


# ---------------------------------------------------------------------- open_clip tower
def manual_open_clip_tokens(visual: OpenClipVisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """Re-run the open_clip ViT step by step: patchify, class token, positions, ln_pre, blocks, ln_post, drop cls."""
    h = visual.conv1(x).flatten(2).transpose(1, 2)
    h = torch.cat([visual.class_embedding.expand(x.shape[0], 1, -1), h], dim=1) + visual.positional_embedding
    h = visual.ln_pre(h)
    for block in visual.transformer.resblocks:
        h = block(h)
    return visual.ln_post(h)[:, 1:]


@pytest.mark.parametrize("suffix", ["pt", "safetensors"])
def test_open_clip_tower_loads_local_checkpoint_and_matches_open_clip(tmp_path, suffix):
    torch.manual_seed(5)
    clip = open_clip.CLIP(**TINY_OPEN_CLIP).eval()
    for name, p in clip.visual.named_parameters():
        if "ln" in name:
            torch.nn.init.normal_(p, std=0.5)
    path = tmp_path / f"clip.{suffix}"
    if suffix == "pt":
        torch.save(clip.state_dict(), path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(path))

    random_tower = OpenClipVisionTower(model_cfg=TINY_OPEN_CLIP).eval()
    tower = OpenClipVisionTower(model_cfg=TINY_OPEN_CLIP, pretrained=str(path)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = tower(x)
        expected = manual_open_clip_tokens(clip.visual, x)
        pooled = clip.encode_image(x)  # pool_type "avg": mean of ln_post patch tokens, then proj
        assert not torch.allclose(random_tower(x), tokens)
    assert tokens.shape == (2, 16, 64)
    assert (tower.hidden_size, tower.patch_size, tower.image_size, tower.output_dim) == (64, 8, 32, 24)
    assert torch.allclose(tokens, expected, atol=1e-5)
    assert torch.allclose(tower.project(tokens).mean(dim=1), pooled, atol=1e-5)
    assert isinstance(tower, VisionTower)


def test_open_clip_tower_by_name_and_errors(tmp_path):
    with torch.device("meta"):
        tower = OpenClipVisionTower("ViT-B-16-quickgelu")
    assert (tower.hidden_size, tower.patch_size, tower.image_size, tower.output_dim) == (768, 16, 224, 512)
    assert not any(k.startswith("transformer.") or "text" in k for k in tower.state_dict())
    with pytest.raises(ValueError, match="existing local checkpoint file"):
        OpenClipVisionTower(model_cfg=TINY_OPEN_CLIP, pretrained="openai")
    with pytest.raises(ValueError, match="unknown open_clip model 'ViT-Nope'"):
        OpenClipVisionTower("ViT-Nope")
    with pytest.raises(ValueError, match="exactly one"):
        OpenClipVisionTower()
    no_visual = tmp_path / "text_only.pt"
    torch.save({"token_embedding.weight": torch.zeros(2, 2)}, no_visual)
    with pytest.raises(ValueError, match="no 'visual"):
        OpenClipVisionTower(model_cfg=TINY_OPEN_CLIP, pretrained=str(no_visual))
    with pytest.raises(ValueError, match="takes 32x32 images"):
        OpenClipVisionTower(model_cfg=TINY_OPEN_CLIP)(torch.randn(1, 3, 64, 64))


# ---------------------------------------------------------------------- factory
def test_build_vision_tower_dispatches_and_validates():
    spec = {"type": "openai_clip", "image_size": 32, "patch_size": 8, "width": 64, "layers": 1, "heads": 4}
    tower = build_vision_tower(spec)
    assert isinstance(tower, OpenAIClipVisionTower) and tower.hidden_size == 64
    assert spec["type"] == "openai_clip"  # the spec is not consumed
    siglip = build_vision_tower({"type": "siglip", **TINY_SIGLIP})
    assert isinstance(siglip, SiglipVisionTower) and siglip.config.num_hidden_layers == 3
    assert isinstance(build_vision_tower({"type": "open_clip", "model_cfg": TINY_OPEN_CLIP}), OpenClipVisionTower)
    with pytest.raises(ValueError, match=r"unknown vision tower type 'vit'; allowed: \['open_clip', 'openai_clip', "
                                         r"'siglip'\]"):
        build_vision_tower({"type": "vit"})
    with pytest.raises(TypeError):
        build_vision_tower("siglip")
