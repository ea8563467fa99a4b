import json

import pytest
import torch

from eval.metrics import psnr
from eval.reconstruction import from_images, main, to_uint8_images
from tokenizer import TokenFlowConfig, TokenFlowTokenizer
from unimodal.shapesworld import ShapesWorld

PIXEL = {"ch": 8, "ch_mult": [1, 1, 2, 2], "num_res_blocks": 1, "z_channels": 16, "norm_groups": 4}
SMALL_CLIP = {
    "embed_dim": 16, "quick_gelu": False,
    "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = TokenFlowConfig.from_preset(
        "tiny", codebook_size=64, pixel_encoder=PIXEL, pixel_decoder=PIXEL,
        semantic_tower={"type": "open_clip", "model_cfg": SMALL_CLIP}, teacher=None,
        semantic_decoder={"grid": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}, semantic_target_dim=16)
    folder = tmp_path_factory.mktemp("tok")
    TokenFlowTokenizer(config).eval().save_pretrained(str(folder))
    return folder


def test_reconstruction_report_matches_a_direct_computation(tokenizer_dir, tmp_path):
    out = tmp_path / "eval"
    results = main(["--tokenizer", str(tokenizer_dir), "--num-images", "6", "--batch-size", "4", "--teacher", "none",
                    "--output-dir", str(out)])
    assert json.loads((out / "metrics.json").read_text())["psnr"] == pytest.approx(results["psnr"])
    for name in ("report.md", "quality_vs_scales.png", "reconstructions.png"):
        assert (out / name).is_file(), name

    # the same six test scenes, encoded and decoded here: PSNR of the 8-bit reconstructions
    model = TokenFlowTokenizer.from_pretrained(str(tokenizer_dir)).eval()
    world = ShapesWorld("test", size=64, num_samples=6, seed=0)
    x = torch.stack([from_images([world[i].image])[0] * 2 - 1 for i in range(6)])
    with torch.no_grad():
        enc = model.encode(x)
        recon = from_images(to_uint8_images(model.decode_pixels(enc.features)))
        coarse = from_images(to_uint8_images(model.decode_indices(enc.indices[:, :1])))
    assert results["psnr"] == pytest.approx(float(psnr(recon, (x + 1) / 2).mean()), abs=1e-4)
    curve = results["quality_vs_scales"]
    assert [q["side"] for q in curve] == model.config.scales
    assert curve[0]["psnr"] == pytest.approx(float(psnr(coarse, (x + 1) / 2).mean()), abs=1e-4)
    assert curve[-1]["psnr"] == pytest.approx(results["psnr"], abs=1e-4)  # all scales = the full decode
    assert results["codebook"][-1]["codes_used"] == int((enc.code_counts[-1] > 0).sum())  # same 6 images, last scale
    assert results["codebook_size"] == 64
    assert set(results["readback_reconstructions"]) >= {"exact"} and results["readback_originals"]["exact"] == 1.0
    assert results["semantic_cosine"] is None and any("LPIPS off" in n for n in results["notes"])


def test_bad_arguments_are_named(tokenizer_dir):
    with pytest.raises(ValueError, match="--num-images"):
        main(["--tokenizer", str(tokenizer_dir), "--num-images", "1"])
    with pytest.raises(ValueError, match="LPIPS needs both"):
        main(["--tokenizer", str(tokenizer_dir), "--lpips-vgg-weights", "x.pth"])
