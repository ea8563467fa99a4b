"""Tokenizer speed benchmarks.

    python -m eval.bench_tokenizer --only quantizer
    python -m eval.bench_tokenizer --only presets --presets tiny,clipb-256 --batch-sizes 1,8
    python -m eval.bench_tokenizer --only quantizer --codebook-size 32768 --num-vectors 4096 --repeats 5

presets: encode and decode images/s of each tokenizer preset (random weights, real sizes) at batch 1 and 8.

quantizer: our nearest-code search (one fp32 matmul against the concatenated normalised codebook, chunked, argmax)
against the reference-style search written out below (two full N×K squared-distance matrices in expanded form,
their weighted sum, argmin, and the N×K one-hot the reference also builds), on the same random inputs in the same
process. Reports both times, the speed ratio, and whether the chosen indices are identical.

Each figure is the median over --repeats timed rounds after --warmup untimed ones, with its min–max; the two sides of
a ratio run in alternation, round by round, and a ratio whose min–max holds 1.0 is flagged as within noise
(`eval.benchmarking`).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from eval.benchmarking import Spread, per_round, positive_int_list, print_table, ratio, time_rounds
from tokenizer import TokenFlowConfig, TokenFlowTokenizer
from tokenizer.quantizer import DualCodebookQuantizer
from unimodal.cli import run_main


def reference_style_nearest(z: torch.Tensor, semantic_codebook: torch.Tensor, pixel_codebook: torch.Tensor,
                            pixel_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's search: z [N, 40] → (indices [N], one-hot [N, K]) via full distance matrices."""
    semantic_dim = semantic_codebook.shape[1]
    z_sem = F.normalize(z[:, :semantic_dim], dim=-1)
    z_pix = F.normalize(z[:, semantic_dim:], dim=-1)
    e_sem = F.normalize(semantic_codebook, dim=-1)
    e_pix = F.normalize(pixel_codebook, dim=-1)
    d_sem = (z_sem.pow(2).sum(dim=1, keepdim=True) + e_sem.pow(2).sum(dim=1)
             - 2 * torch.einsum("bd,dn->bn", z_sem, e_sem.t()))
    d_pix = (z_pix.pow(2).sum(dim=1, keepdim=True) + e_pix.pow(2).sum(dim=1)
             - 2 * torch.einsum("bd,dn->bn", z_pix, e_pix.t()))
    distances = d_sem + pixel_weight * d_pix
    indices = torch.argmin(distances, dim=1)
    one_hot = torch.zeros(z.shape[0], semantic_codebook.shape[0], dtype=z.dtype, device=z.device)
    one_hot.scatter_(1, indices.unsqueeze(1), 1)
    return indices, one_hot


@torch.no_grad()
def bench_quantizer(codebook_size: int = 32768, num_vectors: int = 4096, repeats: int = 5, warmup: int = 1,
                    chunk_size: int = 4096, pixel_weight: float = 1.0, device: str = "cpu",
                    seed: int = 0) -> dict[str, object]:
    """Times ours vs the reference-style nearest-code search; returns a row for the results table."""
    torch.manual_seed(seed)
    dev = torch.device(device)
    quantizer = DualCodebookQuantizer(codebook_size, pixel_weight=pixel_weight, chunk_size=chunk_size).to(dev)
    z = torch.randn(num_vectors, quantizer.code_dim, device=dev)
    seconds, results = time_rounds({
        "ours": lambda: quantizer.nearest(z),
        "reference": lambda: reference_style_nearest(z, quantizer.embedding_vqkd.weight,
                                                     quantizer.embedding_vqgan.weight, pixel_weight),
    }, repeats, warmup, dev)
    speedup = ratio(seconds["reference"], seconds["ours"])
    mismatches = int((results["ours"] != results["reference"][0]).sum())
    return {
        "benchmark": "quantizer.nearest",
        "setting": f"K={codebook_size} N={num_vectors} chunk={chunk_size} {dev.type}",
        **per_round(lambda s: 1e3 * s, seconds["ours"]).fields("ours_ms"),
        **per_round(lambda s: 1e3 * s, seconds["reference"]).fields("reference_ms"),
        **speedup.fields("speedup"),
        "speedup_within_noise": speedup.within_noise,
        "identical": mismatches == 0,
        "mismatches": mismatches,
    }


@torch.no_grad()
def encode_decode_speed(model: TokenFlowTokenizer, batch_size: int, repeats: int, warmup: int,
                        device: torch.device) -> dict[str, Spread]:
    """Images/s of `model.encode` on random [B, 3, H, W] images and of `model.decode_indices` on their indices, the
    two timed in alternation: {"encode_img_per_s", "decode_img_per_s"} with their spreads over the rounds."""
    size = model.config.image_size
    x = torch.rand(batch_size, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device) * 2 - 1
    indices = model.encode(x).indices
    seconds, _ = time_rounds({"encode": lambda: model.encode(x), "decode": lambda: model.decode_indices(indices)},
                             repeats, warmup, device)
    return {f"{name}_img_per_s": per_round(lambda s: batch_size / s, seconds[name]) for name in seconds}


def bench_preset(preset: str, batch_size: int, repeats: int = 5, warmup: int = 1, device: str = "cpu",
                 seed: int = 0) -> dict[str, object]:
    """Encode and decode throughput (images/s) of a preset with random weights at its real size."""
    torch.manual_seed(seed)
    dev = torch.device(device)
    config = TokenFlowConfig.from_preset(preset)
    speeds = encode_decode_speed(TokenFlowTokenizer(config).eval().to(dev), batch_size, repeats, warmup, dev)
    row = {"benchmark": f"tokenizer {preset}",
           "setting": f"batch={batch_size} {config.image_size}px {config.num_tokens} codes {dev.type}"}
    for name, speed in speeds.items():
        row.update(speed.fields(name))
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m eval.bench_tokenizer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["quantizer", "presets", "all"], default="all",
                        help="which benchmarks to run")
    parser.add_argument("--presets", default="tiny,clipb-256,siglip-384", help="comma-separated tokenizer presets")
    parser.add_argument("--batch-sizes", type=positive_int_list, default=[1, 8],
                        help="comma-separated batch sizes for the preset benchmark")
    parser.add_argument("--codebook-size", type=int, default=32768, help="K, codes in the codebook")
    parser.add_argument("--num-vectors", type=int, default=4096, help="N, vectors to quantize per call")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed rounds (median and min–max reported; the two sides of a ratio alternate)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before timing")
    parser.add_argument("--chunk-size", type=int, default=4096, help="rows per chunk of our search")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    args = parser.parse_args(argv)
    for name in ("codebook_size", "num_vectors", "repeats", "chunk_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")

    rows = []
    if args.only in ("quantizer", "all"):
        rows.append(bench_quantizer(args.codebook_size, args.num_vectors, args.repeats, args.warmup,
                                    args.chunk_size, device=args.device))
        print_table(rows)
    if args.only in ("presets", "all"):
        preset_rows = []
        for preset in args.presets.split(","):
            for batch_size in args.batch_sizes:
                preset_rows.append(bench_preset(preset.strip(), batch_size, args.repeats, args.warmup,
                                                device=args.device))
                encode, decode = (Spread.from_fields(preset_rows[-1], f"{k}_img_per_s") for k in ("encode", "decode"))
                print(f"  {preset_rows[-1]['benchmark']} {preset_rows[-1]['setting']}: encode {encode.describe()} "
                      f"img/s, decode {decode.describe()} img/s", flush=True)
        print_table(preset_rows)


if __name__ == "__main__":
    run_main(main)
