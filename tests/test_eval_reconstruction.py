import json

import numpy as np
import pytest
import torch
from PIL import Image

from eval.metrics import psnr
from eval.reconstruction import from_images, load_data, main, parse_args, to_uint8_images
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


@pytest.fixture
def wide_images(tmp_path):
    """Two non-square RGB noise images: 100×60 (one resize) and 300×200 (one BOX halving first, as in ADM)."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "imgs"
    folder.mkdir()
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in ((100, 60), (300, 200))]
    for k, image in enumerate(images):
        image.save(folder / f"{k}.png")
    return folder, images


def test_image_folders_are_centre_cropped_by_default(tokenizer_dir, wide_images):
    folder, (small, large) = wide_images
    args = parse_args(["--tokenizer", str(tokenizer_dir), "--data", "imagefolder", "--data-path", str(folder)])
    images, scenes, preprocessing = load_data(args, 64)
    # by hand: 100×60 → short side 64: 107×64 bicubic, crop x from (107 − 64) // 2 = 21
    small_crop = small.resize((107, 64), Image.BICUBIC).crop((21, 0, 85, 64))
    # 300×200: short side ≥ 2·64, so BOX-halve to 150×100 first; then 96×64 bicubic, crop x from 16
    large_crop = large.resize((150, 100), Image.BOX).resize((96, 64), Image.BICUBIC).crop((16, 0, 80, 64))
    expected = from_images([small_crop, large_crop]) * 2 - 1
    assert scenes is None and "centre crop" in preprocessing
    assert torch.equal(torch.stack(images), expected)

    stretched, _, how = load_data(parse_args([
        "--tokenizer", str(tokenizer_dir), "--data", "imagefolder", "--data-path", str(folder),
        "--resize-mode", "resize"]), 64)
    assert "stretched" in how
    assert torch.equal(stretched[0], from_images([small.resize((64, 64), Image.BICUBIC)])[0] * 2 - 1)


def test_report_says_how_folder_images_were_brought_to_size(tokenizer_dir, wide_images, tmp_path):
    folder, _ = wide_images
    out = tmp_path / "eval"
    results = main(["--tokenizer", str(tokenizer_dir), "--data", "imagefolder", "--data-path", str(folder),
                    "--teacher", "none", "--output-dir", str(out)])
    assert results["num_images"] == 2 and results["preprocessing"].startswith("centre crop")
    assert results["preprocessing"] in (out / "report.md").read_text()
    assert "readback_reconstructions" not in results
