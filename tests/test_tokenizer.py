"""TokenFlowTokenizer as a whole: shapes per preset, decode paths agree, prefixes, save/load, bad inputs, quirks."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tokenizer import TokenFlowConfig, TokenFlowTokenizer
from tokenizer.configuration_tokenflow import TINY_OPEN_CLIP_CFG


def small_variant(preset: str) -> TokenFlowConfig:
    """A preset with its image size, scales and grid intact but narrow/shallow modules, so it runs in a second."""
    if preset == "tiny":
        return TokenFlowConfig.from_preset("tiny", codebook_size=256)
    base = TokenFlowConfig.from_preset(preset)
    tower = dict(base.semantic_tower)
    if tower["type"] == "openai_clip":
        tower.update(width=64, layers=1, heads=2)
    else:
        tower.update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    cnn = {"ch": 32, "ch_mult": [1, 1, 1, 1, 2], "num_res_blocks": 1, "z_channels": 32, "norm_groups": 8}
    return TokenFlowConfig.from_preset(
        preset, semantic_tower=tower, pixel_encoder=cnn, pixel_decoder=cnn, codebook_size=512,
        semantic_decoder={**base.semantic_decoder, "embed_dim": 32, "depth": 1, "num_heads": 2},
        semantic_target_dim=16)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return TokenFlowTokenizer(small_variant("tiny")).eval()


def images(config: TokenFlowConfig, batch: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, config.image_size, config.image_size, generator=g) * 2 - 1


@pytest.mark.parametrize("preset,num_tokens,grid", [("clipb-256", 817, 16), ("siglip-384", 2227, 27), ("tiny", 130, 8)])
def test_encode_decode_shapes_per_preset(preset, num_tokens, grid):
    config = small_variant(preset)
    model = TokenFlowTokenizer(config).eval()
    x = images(config, batch=1)
    with torch.no_grad():
        out = model.encode(x)
        assert out.indices.shape == (1, num_tokens) and out.indices.dtype == torch.int64
        assert out.features.shape == (1, 40, grid, grid)
        semantic, pixels = model.decode(out.features)
    assert semantic.shape == (1, grid * grid, config.semantic_target_dim)
    assert pixels.shape == x.shape
    assert model.understanding_features(x).shape == (1, grid * grid, 40)


@pytest.mark.parametrize("preset,num_keys,num_params", [("clipb-256", 649, 376_569_643), ("siglip-384", 848, 554_009_963)])
def test_full_presets_match_reference_keys_and_parameter_counts(preset, num_keys, num_params):
    from conftest import DATA_DIR

    with torch.device("meta"):
        model = TokenFlowTokenizer(TokenFlowConfig.from_preset(preset))
    name = "clipb_enhanced" if preset == "clipb-256" else "siglip"
    reference = {}
    with open(f"{DATA_DIR}/reference_keys_{name}.txt") as f:
        for line in f:
            key, rest = line.split(" ", 1)
            reference[key] = [int(v) for v in rest[rest.index("[") + 1: rest.index("]")].split(",") if v.strip()]
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert len(reference) == num_keys
    # `quantize.codebook_used` is the reference's logging buffer; we count usage without keeping it.
    assert ours == {k: v for k, v in reference.items() if k != "quantize.codebook_used"}
    assert sum(p.numel() for p in model.parameters()) == num_params


def test_every_prefix_decodes_and_refines(tiny):
    x = images(tiny.config)
    with torch.no_grad():
        indices = tiny.encode(x).indices
        full = tiny.decode_indices(indices)
        for n, length in enumerate(tiny.config.prefix_lengths, start=1):
            coarse = tiny.decode_indices(indices[:, :length])
            assert coarse.shape == full.shape
            # A prefix equals decoding the prefix's summed features: the last prefix is the full image.
            if length == indices.shape[1]:
                torch.testing.assert_close(coarse, full)


def test_non_prefix_and_bad_indices_raise(tiny):
    valid = tiny.config.prefix_lengths
    with pytest.raises(ValueError, match=str(valid[2])):
        tiny.decode_indices(torch.zeros(1, valid[1] + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="must lie in"):
        tiny.decode_indices(torch.full((1, valid[0]), tiny.config.codebook_size))
    with pytest.raises(ValueError, match="must lie in"):
        tiny.decode_indices(torch.full((1, valid[0]), -1))
    with pytest.raises(TypeError, match="integer"):
        tiny.decode_indices(torch.zeros(1, valid[0]))
    with pytest.raises(ValueError, match=r"\[B, L\]"):
        tiny.decode_indices(torch.zeros(valid[0], dtype=torch.long))


def test_decode_indices_equals_decode_of_features(tiny):
    x = images(tiny.config)
    with torch.no_grad():
        out = tiny.encode(x)
        from_indices = tiny.decode_indices(out.indices)
        _, from_features = tiny.decode(out.features)
    torch.testing.assert_close(from_indices, from_features, atol=1e-4, rtol=1e-4)


def test_indices_to_understanding_features_equals_encoding(tiny):
    x = images(tiny.config)
    with torch.no_grad():
        out = tiny.encode(x)
        torch.testing.assert_close(tiny.indices_to_understanding_features(out.indices),
                                   tiny.understanding_features(x), atol=1e-5, rtol=1e-5)


def test_next_scale_inputs_length(tiny):
    x = images(tiny.config)
    with torch.no_grad():
        inputs = tiny.next_scale_inputs(tiny.encode(x).indices)
    assert inputs.shape == (2, tiny.num_tokens - 1, 40)


def test_save_load_round_trip_is_identical(tiny, tmp_path):
    import tokenizer  # noqa: F401  (registers the Auto classes)
    from transformers import AutoConfig, AutoImageProcessor, AutoModel

    tiny.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "preprocessor_config.json").is_file()
    loaded = TokenFlowTokenizer.from_pretrained(tmp_path).eval()
    auto = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(auto, TokenFlowTokenizer)
    assert AutoConfig.from_pretrained(tmp_path).scales == tiny.config.scales
    assert AutoImageProcessor.from_pretrained(tmp_path).size == tiny.config.image_size
    x = images(tiny.config)
    with torch.no_grad():
        ref = tiny.encode(x)
        for other in (loaded, auto):
            got = other.encode(x)
            assert torch.equal(got.indices, ref.indices)
            assert torch.equal(other.decode_indices(got.indices), tiny.decode_indices(ref.indices))


def test_training_forward_has_losses_and_gradients():
    config = small_variant("tiny")
    model = TokenFlowTokenizer(config).train()
    out = model(images(config))
    assert out.vq_loss is not None and out.commit_loss is not None
    loss = out.vq_loss + out.commit_loss + F.mse_loss(out.pixel_values, torch.zeros_like(out.pixel_values)) \
        + out.semantic_features.pow(2).mean()
    loss.backward()
    for name in ("encoder.conv_in.weight", "quant_conv.weight", "encode_task_layer.0.weight",
                 "quantize.embedding_vqkd.weight", "quantize.embedding_vqgan.weight", "decoder.conv_out.weight",
                 "decoder_vqkd.patch_embed.proj.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_bad_pixel_inputs_raise(tiny):
    size = tiny.config.image_size
    with pytest.raises(ValueError, match="NaN"):
        tiny.encode(torch.full((1, 3, size, size), float("nan")))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        tiny.encode(torch.zeros(1, 4, size, size))
    with pytest.raises(ValueError, match=f"{size}x{size}"):
        tiny.encode(torch.zeros(1, 3, size + 8, size + 8))
    with pytest.raises(TypeError, match="float"):
        tiny.encode(torch.zeros(1, 3, size, size, dtype=torch.uint8))


def test_clipb_student_sees_raw_pixels_and_siglip_student_sees_scaled_pixels():
    """Reference quirk: the clipb student has no scaling layer; siglip maps [-1,1] through mean=std=0.5."""
    clipb = TokenFlowTokenizer(small_variant("clipb-256")).eval()
    assert clipb.scaling_layer is None
    x = images(clipb.config, batch=1)
    with torch.no_grad():
        tokens = clipb.encode_task_layer(clipb.encoder_vqkd(x))
        side = int(math.isqrt(tokens.shape[1]))
        expected = tokens.transpose(1, 2).reshape(1, 32, side, side)
        torch.testing.assert_close(clipb.semantic_features(x), expected)
    siglip = TokenFlowTokenizer(small_variant("siglip-384")).eval()
    y = torch.tensor([-1.5, -1.0, 0.0, 0.25, 1.0, 2.0]).view(1, 1, 1, 6).expand(1, 3, 1, 6)
    torch.testing.assert_close(siglip.scaling_layer(y), y.clamp(-1, 1), atol=1e-6, rtol=0)


def test_siglip_pixel_branch_runs_at_432_and_decodes_back_to_384():
    model = TokenFlowTokenizer(small_variant("siglip-384")).eval()
    x = images(model.config, batch=1)
    seen = {}
    def record(key, tensor):
        seen[key] = tensor.shape[-1]

    model.encoder.register_forward_hook(lambda m, args, out: record("in", args[0]))
    model.decoder.register_forward_hook(lambda m, args, out: record("out", out))
    with torch.no_grad():
        out = model.encode(x)
        pixels = model.decode_pixels(out.features)
        manual = model.quant_conv(model.encoder(F.interpolate(x, size=(432, 432), mode="bicubic",
                                                              align_corners=False)))
    assert seen == {"in": 432, "out": 432}
    assert pixels.shape[-1] == 384
    torch.testing.assert_close(out.pre_quant[:, 32:], manual)


def test_image_processor_round_trip(tiny, tmp_path):
    from PIL import Image

    processor = tiny.image_processor
    array = torch.randint(0, 256, (tiny.config.image_size, tiny.config.image_size, 3), dtype=torch.uint8).numpy()
    Image.fromarray(array).save(tmp_path / "x.png")
    pixel_values = processor(str(tmp_path / "x.png"))["pixel_values"]
    assert pixel_values.shape == (1, 3, tiny.config.image_size, tiny.config.image_size)
    assert pixel_values.min() >= -1 and pixel_values.max() <= 1
    back = processor.postprocess(pixel_values)[0]
    assert (np.asarray(back) == array).all()


def test_image_processor_center_crop_and_pad():
    from PIL import Image

    from tokenizer import TokenFlowImageProcessor

    wide = Image.new("RGB", (300, 100), (255, 0, 0))
    wide.paste((0, 0, 255), (0, 0, 100, 100))  # a blue left third that a centre crop must cut away
    crop = TokenFlowImageProcessor(size=32, resize_mode="center_crop")(wide)["pixel_values"][0]
    assert crop.shape == (3, 32, 32)
    torch.testing.assert_close(crop[:, 16, 16], torch.tensor([1.0, -1.0, -1.0]))
    assert crop[2, :, 2:].max() < -0.9  # no blue left beyond the bicubic fringe at the cut
    pad = TokenFlowImageProcessor(size=30, resize_mode="pad")(wide)["pixel_values"][0]
    grey = 127 / 255 * 2 - 1
    torch.testing.assert_close(pad[:, 2, 15], torch.full((3,), grey), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="resize_mode"):
        TokenFlowImageProcessor(resize_mode="stretch")


def test_unknown_preset_and_inconsistent_config_raise():
    with pytest.raises(ValueError, match="clipb-256"):
        TokenFlowConfig.from_preset("clipb-512")
    with pytest.raises(ValueError, match="pixel_input_size"):
        TokenFlowConfig.from_preset("siglip-384", pixel_input_size=None)
    with pytest.raises(ValueError, match="strictly increase"):
        TokenFlowConfig.from_preset("tiny", scales=[1, 4, 2, 8])


def test_tiny_open_clip_cfg_is_the_teacher_architecture():
    config = TokenFlowConfig.from_preset("tiny")
    assert config.teacher["model_cfg"] == TINY_OPEN_CLIP_CFG == config.semantic_tower["model_cfg"]
