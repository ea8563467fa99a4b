"""Reconstruction quality of a TokenFlow tokenizer.

    python -m eval.reconstruction --tokenizer tokenizer/pretrained/shapesworld-tiny
    python -m eval.reconstruction --tokenizer DIR --data imagefolder --data-path imgs/ --inception-weights pt_inception.pth

Encodes held-out images (default: 500 ShapesWorld test scenes, held-out colour–shape pairs included; image-folder
images are centre-cropped to the input size by default, as the reference evaluates: see --resize-mode), decodes them
and reports, in <output-dir>/metrics.json and report.md (plus plots), with how the images were brought to size:
- PSNR (data range 1 on [0, 1]) and SSIM (Gaussian window, data range 1) of the 8-bit reconstructions;
- LPIPS-VGG16 (only with local weights) and rFID with FID-Inception (only with local weights: pytorch-fid's
  pt_inception file), plus an FID in the teacher's image-embedding space that always works offline;
- codebook usage (fraction of K used) and perplexity per scale;
- quality against the number of scales decoded (1×1 up to the full grid), with a plot and a monotonicity check;
- semantic cosine between the semantic decoder's output and the teacher's features;
- ShapesEval read-back of the reconstructions (the scorer grades each reconstruction against its scene), next to the
  read-back of the original renders.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from eval.metrics import FIDInception, frechet_distance, psnr, ssim
from tokenizer import TokenFlowImageProcessor, TokenFlowTokenizer
from tokenizer.losses import LPIPS
from tokenizer.quantizer import codebook_stats
from tokenizer.teacher import DEFAULT_TEACHER, load_frozen_teacher_tower
from unimodal.cli import run_main
from unimodal.images import list_image_files, load_image
from unimodal.shapesworld import ShapesEval, ShapesWorld


def to_uint8_images(pixels: torch.Tensor) -> list[Image.Image]:
    """[-1, 1] pixels → 8-bit RGB images (round(127.5·x + 127.5), the saved-PNG quantisation)."""
    arr = ((pixels.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).cpu().numpy()) for a in arr]


def from_images(images: list[Image.Image]) -> torch.Tensor:
    """8-bit RGB images → [B, 3, H, W] in [0, 1]."""
    return torch.from_numpy(np.stack([np.asarray(im, dtype=np.uint8) for im in images])).permute(0, 3, 1, 2) / 255.0


# How --resize-mode brings an image-folder image to the tokenizer's square input (TokenFlowImageProcessor.resize).
PREPROCESSING = {
    "center_crop": "centre crop (ADM: short side resized to {size} px, then the central {size}×{size})",
    "resize": "stretched to {size}×{size} (aspect ratio not kept)",
    "pad": "padded to square with grey (127, 127, 127), then resized to {size}×{size}",
}


def load_data(args: argparse.Namespace, size: int):
    """(list of [-1, 1] image tensors [3, H, W], list of scenes or None, how the images were brought to size)."""
    if args.data == "shapesworld":
        world = ShapesWorld(args.split, size=size, num_samples=args.num_images, seed=args.seed)
        samples = [world[i] for i in range(len(world))]
        tensors = [from_images([s.image])[0] * 2 - 1 for s in samples]
        return tensors, [s.scene for s in samples], f"rendered at {size}×{size}"
    if args.data_path is None:
        raise ValueError("--data imagefolder needs --data-path")
    resizer = TokenFlowImageProcessor(size=size, resize_mode=args.resize_mode)
    images = [resizer.resize(load_image(p)) for p in list_image_files(args.data_path)[: args.num_images]]
    return [from_images([im])[0] * 2 - 1 for im in images], None, PREPROCESSING[args.resize_mode].format(size=size)


def build_teacher(model: TokenFlowTokenizer, path: str | None):
    if path is None or model.config.teacher is None:
        return None, None
    return load_frozen_teacher_tower(model.config, path)


def _mean(values: list[torch.Tensor]) -> float | None:
    return float(torch.cat(values).mean()) if values else None


class ReconstructionMeters:
    """Everything measured batch by batch: per-image metrics, per-scale quality, code counts, features for the
    Fréchet distances, ShapesEval read-back, and the first 16 inputs and reconstructions for the grid."""

    def __init__(self, config, teacher=(None, None), lpips: LPIPS | None = None,
                 inception: FIDInception | None = None):
        self.config = config
        self.teacher, self.teacher_scaling = teacher
        self.lpips, self.inception = lpips, inception
        self.totals = {k: [] for k in ("psnr", "ssim", "lpips", "semantic_cosine")}
        self.per_scale = {n: {"psnr": [], "ssim": []} for n in range(1, len(config.prefix_lengths) + 1)}
        self.counts = torch.zeros(len(config.scales), config.codebook_size, dtype=torch.long)
        self.feats = {"teacher_real": [], "teacher_recon": [], "inception_real": [], "inception_recon": []}
        self.recon_eval, self.original_eval = ShapesEval(), ShapesEval()
        self.grid_inputs, self.grid_recons = [], []

    def add(self, model: TokenFlowTokenizer, x: torch.Tensor, scenes: list | None) -> None:
        """One batch x [B, 3, H, W] in [-1, 1] (and its scenes, when they are known)."""
        enc = model.encode(x)
        self.counts += enc.code_counts.cpu()
        target01 = (x + 1) / 2
        recon_pixels = model.decode_pixels(enc.features)
        recon_images = to_uint8_images(recon_pixels)
        recon01 = from_images(recon_images)
        self.totals["psnr"].append(psnr(recon01, target01))
        self.totals["ssim"].append(ssim(recon01, target01))
        if self.lpips is not None:
            self.totals["lpips"].append(self.lpips(recon01 * 2 - 1, x))
        for n, length in enumerate(self.config.prefix_lengths, start=1):
            partial = from_images(to_uint8_images(model.decode_indices(enc.indices[:, :length])))
            self.per_scale[n]["psnr"].append(psnr(partial, target01))
            self.per_scale[n]["ssim"].append(ssim(partial, target01))
        if self.teacher is not None:
            target = self.teacher.project(self.teacher(self.teacher_scaling(x)))
            self.totals["semantic_cosine"].append(
                F.cosine_similarity(model.decode_semantic(enc.features), target, dim=-1).mean(dim=1))
            self.feats["teacher_real"].append(self.teacher.visual(self.teacher_scaling(x)))
            self.feats["teacher_recon"].append(self.teacher.visual(self.teacher_scaling(recon01 * 2 - 1)))
        if self.inception is not None:
            self.feats["inception_real"].append(self.inception(target01))
            self.feats["inception_recon"].append(self.inception(recon01))
        for image, original, scene in zip(recon_images, to_uint8_images(x), scenes or []):
            self.recon_eval.add_scene(image, scene)
            self.original_eval.add_scene(original, scene)
        missing = 16 - len(self.grid_inputs)
        self.grid_inputs += list(x[:missing])
        self.grid_recons += list(recon_pixels[:missing])

    def frechet(self, name: str) -> float | None:
        real, recon = self.feats[f"{name}_real"], self.feats[f"{name}_recon"]
        return frechet_distance(torch.cat(real), torch.cat(recon)) if real else None

    def summary(self) -> dict:
        config = self.config
        usage, perplexity = codebook_stats(self.counts)
        quality = [{"scales": n, "side": config.scales[n - 1], "tokens": config.prefix_lengths[n - 1],
                    "psnr": _mean(values["psnr"]), "ssim": _mean(values["ssim"])}
                   for n, values in self.per_scale.items()]
        results = {name: _mean(values) for name, values in self.totals.items()}
        results.update({
            "rfid_inception": self.frechet("inception"),
            "fid_teacher": self.frechet("teacher"),
            "codebook": [{"side": s, "usage": float(u), "perplexity": float(p), "codes_used": int((c > 0).sum())}
                         for s, u, p, c in zip(config.scales, usage, perplexity, self.counts)],
            "codebook_size": config.codebook_size,
            "quality_vs_scales": quality,
            "quality_monotonic": all(b["psnr"] > a["psnr"] for a, b in zip(quality, quality[1:])),
        })
        return results


@torch.no_grad()
def evaluate(args: argparse.Namespace) -> dict:
    model = TokenFlowTokenizer.from_pretrained(args.tokenizer).eval()
    images, scenes, preprocessing = load_data(args, model.config.image_size)
    lpips = LPIPS(args.lpips_vgg_weights, args.lpips_lin_weights) if args.lpips_vgg_weights else None
    inception = FIDInception(args.inception_weights) if args.inception_weights else None
    meters = ReconstructionMeters(model.config, build_teacher(model, args.teacher), lpips, inception)
    for start in tqdm(range(0, len(images), args.batch_size), desc="reconstruction", dynamic_ncols=True):
        batch_scenes = scenes[start:start + args.batch_size] if scenes is not None else None
        meters.add(model, torch.stack(images[start:start + args.batch_size]), batch_scenes)

    results = {
        "tokenizer": str(args.tokenizer),
        "data": args.data if args.data != "shapesworld" else f"shapesworld/{args.split}",
        "preprocessing": preprocessing,
        "num_images": len(images),
        **meters.summary(),
    }
    if scenes is not None:
        results["readback_reconstructions"] = meters.recon_eval.summary()["scenes"]
        results["readback_originals"] = meters.original_eval.summary()["scenes"]
    notes = []
    if not args.lpips_vgg_weights:
        notes.append("LPIPS off: no local weights (--lpips-vgg-weights/--lpips-lin-weights)")
    if not args.inception_weights:
        notes.append("rFID off: no local FID-Inception weights (--inception-weights)")
    if notes:
        results["notes"] = notes
    write_outputs(Path(args.output_dir), results, torch.stack(meters.grid_inputs), torch.stack(meters.grid_recons))
    return results


def write_outputs(out: Path, results: dict, inputs: torch.Tensor, recons: torch.Tensor) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchvision.utils import save_image

    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(results, indent=2))
    quality = results["quality_vs_scales"]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    labels = [f"{q['side']}×{q['side']}" for q in quality]
    ax[0].plot(labels, [q["psnr"] for q in quality], marker="o")
    ax[0].set_ylabel("PSNR (dB)")
    ax[1].plot(labels, [q["ssim"] for q in quality], marker="o")
    ax[1].set_ylabel("SSIM")
    for a in ax:
        a.set_xlabel("finest scale decoded")
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "quality_vs_scales.png", dpi=100)
    plt.close(fig)
    grid = torch.cat([inputs, recons]).float().clamp(-1, 1) * 0.5 + 0.5
    save_image(grid, str(out / "reconstructions.png"), nrow=len(inputs), padding=1)

    def fmt(v, spec=".4f"):
        return "—" if v is None else format(v, spec)

    lines = [f"# Reconstruction: `{results['tokenizer']}`", "",
             f"{results['num_images']} images from {results['data']}, {results['preprocessing']}.", "",
             "| metric | value |", "|---|---|",
             f"| PSNR (dB) | {fmt(results['psnr'], '.2f')} |", f"| SSIM | {fmt(results['ssim'])} |",
             f"| LPIPS | {fmt(results['lpips'])} |", f"| rFID (Inception) | {fmt(results['rfid_inception'], '.3f')} |",
             f"| FID (teacher embedding) | {fmt(results['fid_teacher'], '.4f')} |",
             f"| semantic cosine to teacher | {fmt(results['semantic_cosine'])} |"]
    if "readback_reconstructions" in results:
        r, o = results["readback_reconstructions"], results["readback_originals"]
        lines.append(f"| ShapesEval read-back, exact (reconstructions / originals) | {r['exact']:.4f} / "
                     f"{o['exact']:.4f} |")
    lines += ["", "## Quality vs scales decoded", "", "| scales | finest | tokens | PSNR | SSIM |", "|---|---|---|---|---|"]
    lines += [f"| {q['scales']} | {q['side']}×{q['side']} | {q['tokens']} | {q['psnr']:.2f} | {q['ssim']:.4f} |"
              for q in quality]
    lines += ["", f"Monotonic: {results['quality_monotonic']}", "", "## Codebook (K = "
              f"{results['codebook_size']})", "", "| scale | usage | codes used | perplexity |", "|---|---|---|---|"]
    lines += [f"| {c['side']}×{c['side']} | {c['usage']:.3f} | {c['codes_used']} | {c['perplexity']:.1f} |"
              for c in results["codebook"]]
    lines += [""] + [f"- {n}" for n in results.get("notes", [])]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m eval.reconstruction", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", required=True, help="a TokenFlowTokenizer save_pretrained folder")
    p.add_argument("--teacher", default=str(DEFAULT_TEACHER),
                   help="local weights of the tokenizer's teacher ('none' to skip the semantic metrics)")
    p.add_argument("--data", choices=("shapesworld", "imagefolder"), default="shapesworld")
    p.add_argument("--data-path", default=None)
    p.add_argument("--resize-mode", choices=tuple(PREPROCESSING), default="center_crop",
                   help="how image-folder images become square (default: the reference's ADM centre crop, so PSNR "
                        "and rFID compare with published numbers; resize = stretch)")
    p.add_argument("--split", default="test", choices=("validation", "test"))
    p.add_argument("--num-images", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lpips-vgg-weights", default=None)
    p.add_argument("--lpips-lin-weights", default=None)
    p.add_argument("--inception-weights", default=None, help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth")
    p.add_argument("--output-dir", default=None, help="default: <tokenizer>/eval")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.teacher and args.teacher.lower() == "none":
        args.teacher = None
    if args.output_dir is None:
        args.output_dir = str(Path(args.tokenizer) / "eval")
    if args.num_images < 2 or args.batch_size < 1:
        raise ValueError(f"need --num-images >= 2 and --batch-size >= 1, got {args.num_images}, {args.batch_size}")
    if bool(args.lpips_vgg_weights) != bool(args.lpips_lin_weights):
        raise ValueError("LPIPS needs both --lpips-vgg-weights and --lpips-lin-weights")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = evaluate(args)
    readback = results.get("readback_reconstructions", {}).get("exact")
    print(f"PSNR {results['psnr']:.2f} dB  SSIM {results['ssim']:.4f}  semantic cos "
          f"{results['semantic_cosine'] if results['semantic_cosine'] is not None else float('nan'):.4f}  "
          f"last-scale usage {results['codebook'][-1]['usage']:.3f}  read-back "
          f"{readback if readback is not None else float('nan'):.4f}  monotonic {results['quality_monotonic']}  "
          f"-> {args.output_dir}")
    return results


if __name__ == "__main__":
    run_main(main)
