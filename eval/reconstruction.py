"""Reconstruction quality of a TokenFlow tokenizer.

    python -m eval.reconstruction --tokenizer tokenizer/pretrained/shapesworld-tiny
    python -m eval.reconstruction --tokenizer DIR --data imagefolder --data-path imgs/ --inception-weights pt_inception.pth

Encodes held-out images (default: 500 ShapesWorld test scenes, held-out colour–shape pairs included), decodes them
and reports, in <output-dir>/metrics.json and report.md (plus plots):
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
from tokenizer import TokenFlowTokenizer
from tokenizer.losses import LPIPS
from tokenizer.quantizer import codebook_stats
from tokenizer.teacher import DEFAULT_TEACHER, load_frozen_teacher_tower
from unimodal.images import list_image_files, load_image
from unimodal.shapesworld import ShapesEval, ShapesWorld



def to_uint8_images(pixels: torch.Tensor) -> list[Image.Image]:
    """[-1, 1] pixels → 8-bit RGB images (round(127.5·x + 127.5), the saved-PNG quantisation)."""
    arr = ((pixels.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).cpu().numpy()) for a in arr]


def from_images(images: list[Image.Image]) -> torch.Tensor:
    """8-bit RGB images → [B, 3, H, W] in [0, 1]."""
    return torch.from_numpy(np.stack([np.asarray(im, dtype=np.uint8) for im in images])).permute(0, 3, 1, 2) / 255.0


def load_data(args: argparse.Namespace, size: int):
    """(list of [-1, 1] image tensors [3, H, W], list of scenes or None)."""
    if args.data == "shapesworld":
        world = ShapesWorld(args.split, size=size, num_samples=args.num_images, seed=args.seed)
        samples = [world[i] for i in range(len(world))]
        return [from_images([s.image])[0] * 2 - 1 for s in samples], [s.scene for s in samples]
    if args.data_path is None:
        raise ValueError("--data imagefolder needs --data-path")
    paths = list_image_files(args.data_path)[: args.num_images]
    images = [load_image(p).resize((size, size), Image.BICUBIC) for p in paths]
    return [from_images([im])[0] * 2 - 1 for im in images], None


def build_teacher(model: TokenFlowTokenizer, path: str | None):
    if path is None or model.config.teacher is None:
        return None, None
    return load_frozen_teacher_tower(model.config, path)


@torch.no_grad()
def evaluate(args: argparse.Namespace) -> dict:
    model = TokenFlowTokenizer.from_pretrained(args.tokenizer).eval()
    config = model.config
    teacher, teacher_scaling = build_teacher(model, args.teacher)
    lpips = LPIPS(args.lpips_vgg_weights, args.lpips_lin_weights) if args.lpips_vgg_weights else None
    inception = FIDInception(args.inception_weights) if args.inception_weights else None
    images, scenes = load_data(args, config.image_size)

    prefixes = config.prefix_lengths
    totals = {k: [] for k in ("psnr", "ssim", "lpips", "semantic_cosine")}
    per_scale = {n: {"psnr": [], "ssim": []} for n in range(1, len(prefixes) + 1)}
    counts = torch.zeros(len(config.scales), config.codebook_size, dtype=torch.long)
    feats = {"teacher_real": [], "teacher_recon": [], "inception_real": [], "inception_recon": []}
    recon_eval, original_eval = ShapesEval(), ShapesEval()
    grid_inputs, grid_recons = [], []
    for start in tqdm(range(0, len(images), args.batch_size), desc="reconstruction", dynamic_ncols=True):
        x = torch.stack(images[start:start + args.batch_size])
        enc = model.encode(x)
        counts += enc.code_counts.cpu()
        target01 = (x + 1) / 2
        recon_images = to_uint8_images(model.decode_pixels(enc.features))
        recon01 = from_images(recon_images)
        totals["psnr"].append(psnr(recon01, target01))
        totals["ssim"].append(ssim(recon01, target01))
        if lpips is not None:
            totals["lpips"].append(lpips(recon01 * 2 - 1, x))
        for n, length in enumerate(prefixes, start=1):
            partial = from_images(to_uint8_images(model.decode_indices(enc.indices[:, :length])))
            per_scale[n]["psnr"].append(psnr(partial, target01))
            per_scale[n]["ssim"].append(ssim(partial, target01))
        if teacher is not None:
            target = teacher.project(teacher(teacher_scaling(x)))
            totals["semantic_cosine"].append(
                F.cosine_similarity(model.decode_semantic(enc.features), target, dim=-1).mean(dim=1))
            feats["teacher_real"].append(teacher.visual(teacher_scaling(x)))
            feats["teacher_recon"].append(teacher.visual(teacher_scaling(recon01 * 2 - 1)))
        if inception is not None:
            feats["inception_real"].append(inception(target01))
            feats["inception_recon"].append(inception(recon01))
        if scenes is not None:
            for image, original, scene in zip(recon_images, to_uint8_images(x), scenes[start:start + len(x)]):
                recon_eval.add_scene(image, scene)
                original_eval.add_scene(original, scene)
        if len(grid_inputs) < 16:
            grid_inputs += list(x[: 16 - len(grid_inputs)])
            grid_recons += list(model.decode_pixels(enc.features)[: len(grid_inputs) - len(grid_recons)])

    def mean(values: list[torch.Tensor]) -> float | None:
        return float(torch.cat(values).mean()) if values else None

    usage, perplexity = codebook_stats(counts)
    quality = [{"scales": n, "side": config.scales[n - 1], "tokens": prefixes[n - 1],
                "psnr": mean(per_scale[n]["psnr"]), "ssim": mean(per_scale[n]["ssim"])}
               for n in per_scale]
    results = {
        "tokenizer": str(args.tokenizer),
        "data": args.data if args.data != "shapesworld" else f"shapesworld/{args.split}",
        "num_images": len(images),
        "psnr": mean(totals["psnr"]),
        "ssim": mean(totals["ssim"]),
        "lpips": mean(totals["lpips"]),
        "semantic_cosine": mean(totals["semantic_cosine"]),
        "rfid_inception": (frechet_distance(torch.cat(feats["inception_real"]), torch.cat(feats["inception_recon"]))
                           if inception is not None else None),
        "fid_teacher": (frechet_distance(torch.cat(feats["teacher_real"]), torch.cat(feats["teacher_recon"]))
                        if teacher is not None else None),
        "codebook": [{"side": s, "usage": float(u), "perplexity": float(p), "codes_used": int((c > 0).sum())}
                     for s, u, p, c in zip(config.scales, usage, perplexity, counts)],
        "codebook_size": config.codebook_size,
        "quality_vs_scales": quality,
        "quality_monotonic": all(b["psnr"] > a["psnr"] for a, b in zip(quality, quality[1:])),
    }
    if scenes is not None:
        results["readback_reconstructions"] = recon_eval.summary()["scenes"]
        results["readback_originals"] = original_eval.summary()["scenes"]
    if not args.lpips_vgg_weights:
        results["notes"] = ["LPIPS off: no local weights (--lpips-vgg-weights/--lpips-lin-weights)"]
    if not args.inception_weights:
        results.setdefault("notes", []).append("rFID off: no local FID-Inception weights (--inception-weights)")
    write_outputs(Path(args.output_dir), results, torch.stack(grid_inputs), torch.stack(grid_recons))
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
             f"{results['num_images']} images from {results['data']}.", "",
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
    main()
