"""Tokenizer speed benchmarks.

    python -m eval.bench_tokenizer --only quantizer
    python -m eval.bench_tokenizer --only presets --presets tiny,clipb-256 --batch-sizes 1,8
    python -m eval.bench_tokenizer --only quantizer --codebook-size 32768 --num-vectors 4096 --repeats 5

presets: encode and decode images/s of each tokenizer preset (random weights, real sizes) at batch 1 and 8.

quantizer: our nearest-code search (one fp32 matmul against the concatenated normalised codebook, chunked, argmax)
against the reference-style search written out below (two full N×K squared-distance matrices in expanded form,
their weighted sum, argmin, and the N×K one-hot the reference also builds), on the same random inputs in the same
process. Reports both times, the speed ratio, and whether the chosen indices are identical.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from tokenizer import TokenFlowConfig, TokenFlowTokenizer
from tokenizer.quantizer import DualCodebookQuantizer


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


def time_call(fn: Callable[[], object], warmup: int, repeats: int, device: torch.device) -> tuple[float, object]:
    """Median wall time in seconds of `fn()` over `repeats` runs after `warmup` runs, and its last result."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    result = None
    for _ in range(warmup):
        result = fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


@torch.no_grad()
def bench_quantizer(codebook_size: int = 32768, num_vectors: int = 4096, repeats: int = 5, warmup: int = 1,
                    chunk_size: int = 4096, pixel_weight: float = 1.0, device: str = "cpu",
                    seed: int = 0) -> dict[str, object]:
    """Times ours vs the reference-style nearest-code search; returns a row for the results table."""
    torch.manual_seed(seed)
    dev = torch.device(device)
    quantizer = DualCodebookQuantizer(codebook_size, pixel_weight=pixel_weight, chunk_size=chunk_size).to(dev)
    z = torch.randn(num_vectors, quantizer.code_dim, device=dev)
    ours_s, ours_idx = time_call(lambda: quantizer.nearest(z), warmup, repeats, dev)
    ref_s, (ref_idx, _) = time_call(
        lambda: reference_style_nearest(z, quantizer.embedding_vqkd.weight, quantizer.embedding_vqgan.weight,
                                        pixel_weight),
        warmup, repeats, dev)
    mismatches = int((ours_idx != ref_idx).sum())
    return {
        "benchmark": "quantizer.nearest",
        "setting": f"K={codebook_size} N={num_vectors} chunk={chunk_size} {dev.type}",
        "ours_ms": 1e3 * ours_s,
        "reference_ms": 1e3 * ref_s,
        "speedup": ref_s / ours_s,
        "identical": mismatches == 0,
        "mismatches": mismatches,
    }


@torch.no_grad()
def bench_preset(preset: str, batch_size: int, repeats: int = 2, warmup: int = 1, device: str = "cpu",
                 seed: int = 0) -> dict[str, object]:
    """Encode and decode throughput (images/s) of a preset with random weights at its real size."""
    torch.manual_seed(seed)
    dev = torch.device(device)
    config = TokenFlowConfig.from_preset(preset)
    model = TokenFlowTokenizer(config).eval().to(dev)
    x = torch.rand(batch_size, 3, config.image_size, config.image_size, device=dev) * 2 - 1
    encode_s, out = time_call(lambda: model.encode(x), warmup, repeats, dev)
    decode_s, _ = time_call(lambda: model.decode_indices(out.indices), warmup, repeats, dev)
    return {
        "benchmark": f"tokenizer {preset}",
        "setting": f"batch={batch_size} {config.image_size}px {config.num_tokens} codes {dev.type}",
        "encode_img_per_s": batch_size / encode_s,
        "decode_img_per_s": batch_size / decode_s,
        "encode_ms": 1e3 * encode_s,
        "decode_ms": 1e3 * decode_s,
    }


def print_table(rows: list[dict[str, object]]) -> None:
    columns = list(rows[0])
    cells = [[f"{v:.3g}" if isinstance(v, float) else str(v) for v in row.values()] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m eval.bench_tokenizer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["quantizer", "presets", "all"], default="all",
                        help="which benchmarks to run")
    parser.add_argument("--presets", default="tiny,clipb-256,siglip-384", help="comma-separated tokenizer presets")
    parser.add_argument("--batch-sizes", default="1,8", help="comma-separated batch sizes for the preset benchmark")
    parser.add_argument("--codebook-size", type=int, default=32768, help="K, codes in the codebook")
    parser.add_argument("--num-vectors", type=int, default=4096, help="N, vectors to quantize per call")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs (the median is reported)")
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
            for batch_size in (int(b) for b in args.batch_sizes.split(",")):
                preset_rows.append(bench_preset(preset.strip(), batch_size, args.repeats, args.warmup,
                                                device=args.device))
                row = preset_rows[-1]
                print(f"  {row['benchmark']} {row['setting']}: encode {row['encode_img_per_s']:.3g} img/s, "
                      f"decode {row['decode_img_per_s']:.3g} img/s", flush=True)
        print_table(preset_rows)


if __name__ == "__main__":
    main()
