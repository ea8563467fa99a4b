"""Drawing speed: next-scale sampling with the KV cache against a full recompute per scale (the reference's way).

    python -m eval.bench_generation                                   # clipb-256 schedule, batch 1 and 8, CFG on
    python -m eval.bench_generation --scales tiny --batch-sizes 1 --repeats 3 --json results.json

One random model, built in the run: a Qwen2 backbone of `--layers` x `--hidden-size` and a TokenFlow tokenizer
whose scale schedule and codebook size are those of `--scales` (clipb-256: scales 1,2,4,6,8,10,12,14,16 = 817
codes, K = 32768) but with the tiny preset's narrow CNN / ViT widths (they are not run while drawing).

For each batch size B the same B ShapesWorld prompts (plus B unconditional rows: CFG on) are drawn greedily with
`draw_indices(use_cache=True)` and `draw_indices(use_cache=False)`, alternating round by round (`eval.benchmarking`);
the report gives the median wall time of each with its min–max over --repeats rounds, their ratio (median of the
per-round ratios, min–max, and "within noise" when that interval holds 1.0), and whether the indices are identical
(they must be: the cached loop computes the same logits). With
`--decode` the pixel decode of the drawn indices is timed too (the same work for both paths) and the ratio of the
totals is printed as well.

Work per drawing (P prompt tokens, prefix lengths n_k = Σ_{j≤k} s_j², L scales): the cached loop runs P + Σs² - 1
positions through the backbone and the image head on Σs² of them; the recompute runs Σ_k (P + n_k) positions through
both, plus attention over ever longer sequences. For clipb-256 and a short chat prompt that bounds the ratio near 3x
for the linear layers; longer prompts (the reference always runs a 128-token caption window) and attention raise it.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from eval.benchmarking import Spread, per_round, positive_int_list, print_table, ratio, time_call, time_rounds
from llm.build import assemble
from llm.text_tokenizer import build_shapesworld_text_tokenizer
from tokenizer.configuration_tokenflow import TINY_OPEN_CLIP_CFG, TokenFlowConfig
from tokenizer.modeling_tokenflow import TokenFlowTokenizer
from unimodal.cli import run_main
from unimodal.shapesworld import ShapesWorld

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def schedule_tokenizer_config(preset: str, codebook_size: int | None = None) -> TokenFlowConfig:
    """The scale schedule and codebook size of `preset` on the tiny preset's widths (grid = last scale)."""
    schedule = TokenFlowConfig.from_preset(preset)
    grid = schedule.grid_size
    tiny = TokenFlowConfig.from_preset("tiny")
    downsample = tiny.pixel_downsample
    clip_cfg = json.loads(json.dumps(TINY_OPEN_CLIP_CFG))
    clip_cfg["vision_cfg"].update(image_size=grid * downsample, patch_size=downsample)
    return TokenFlowConfig.from_preset(
        "tiny", scales=list(schedule.scales), codebook_size=codebook_size or schedule.codebook_size,
        image_size=grid * downsample, semantic_tower={"type": "open_clip", "model_cfg": clip_cfg},
        teacher={"type": "open_clip", "model_cfg": clip_cfg},
        semantic_decoder={**tiny.semantic_decoder, "grid": grid})


def build_model(preset: str, hidden_size: int, layers: int, heads: int, codebook_size: int | None, seed: int,
                prompt_tokens: int = 0):
    torch.manual_seed(seed)
    image_tokenizer = TokenFlowTokenizer(schedule_tokenizer_config(preset, codebook_size)).eval()
    text_tokenizer = build_shapesworld_text_tokenizer(chat_format="chatml")
    backbone = Qwen2Config(
        vocab_size=len(text_tokenizer), hidden_size=hidden_size, intermediate_size=4 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
        # room for the span, the prompt (lengthened prompts overshoot by up to one caption) and the chat template
        max_position_embeddings=image_tokenizer.config.num_tokens + max(512, prompt_tokens + 256),
        tie_word_embeddings=False)
    language_model = AutoModelForCausalLM.from_config(backbone, attn_implementation="sdpa")
    model, processor = assemble(language_model, text_tokenizer, image_tokenizer, "chatml")
    return model.eval(), processor


def drawing_prompts(processor, batch_size: int, min_tokens: int) -> list[str]:
    """`batch_size` ShapesWorld drawing prompts, each lengthened with further captions until its drawing prompt holds
    at least `min_tokens` tokens (0: as is)."""
    world = ShapesWorld("test", 64, 10_000, seed=0)
    prompts, extra = [], iter(range(batch_size, 10_000))
    for i in range(batch_size):
        text = world[i].prompts[0].text
        while len(processor.drawing_prompt_ids(text)) < min_tokens:
            text += " " + world[next(extra)].captions[0]
        prompts.append(text)
    return prompts


@torch.no_grad()
def bench_batch(model, processor, batch_size: int, cfg_scale: float, repeats: int, warmup: int, decode: bool,
                device: torch.device, prompt_tokens: int = 0) -> dict[str, object]:
    batch = processor.drawing_batch(drawing_prompts(processor, batch_size, prompt_tokens), guidance=cfg_scale > 0)
    input_ids, attention_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)

    def draw(use_cache: bool):
        return model.draw_indices(input_ids, attention_mask, batch_size, cfg_scale=cfg_scale, temperature=0.0,
                                  use_cache=use_cache)

    seconds, drawn = time_rounds({"cached": lambda: draw(True), "recompute": lambda: draw(False)}, repeats, warmup,
                                 device)
    speedup = ratio(seconds["recompute"], seconds["cached"])
    row = {
        "batch": batch_size,
        "rows": input_ids.shape[0],
        "prompt_tokens": int(attention_mask.sum(1).max()),
        **Spread.of(seconds["cached"]).fields("cached_s"),
        **Spread.of(seconds["recompute"]).fields("recompute_s"),
        **speedup.fields("speedup"),
        "speedup_within_noise": speedup.within_noise,
        "identical": bool(torch.equal(drawn["cached"], drawn["recompute"])),
        "codes_per_s_cached": batch_size * drawn["cached"].shape[1] / statistics.median(seconds["cached"]),
    }
    if decode:
        decode_seconds, _ = time_call(lambda: model.decode_images(drawn["cached"]), repeats, 0, device)
        decode_s = statistics.median(decode_seconds)
        with_decode = per_round(lambda r, c: (r + decode_s) / (c + decode_s), seconds["recompute"], seconds["cached"])
        row.update(Spread.of(decode_seconds).fields("decode_s"))
        row.update(with_decode.fields("speedup_with_decode"))
    return row


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    parser = argparse.ArgumentParser(prog="python -m eval.bench_generation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scales", choices=TokenFlowConfig.available_presets(), default="clipb-256",
                        help="tokenizer preset whose scale schedule and codebook size are used")
    parser.add_argument("--codebook-size", type=int, default=None, help="override the preset's codebook size")
    parser.add_argument("--batch-sizes", type=positive_int_list, default=[1, 8])
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed rounds, cached and recompute alternating (median and min–max reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--prompt-tokens", type=int, default=0,
                        help="lengthen each prompt with captions to at least this many tokens (the reference runs a "
                             "128-token caption window); 0 = the plain drawing prompt")
    parser.add_argument("--cfg-scale", type=float, default=7.5, help="0 turns CFG (and the unconditional rows) off")
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the LLM parts")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--decode", action="store_true", help="also time the pixel decode of the drawn indices")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the results (and settings) to this JSON file")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    model, processor = build_model(args.scales, args.hidden_size, args.layers, args.heads, args.codebook_size,
                                   args.seed, args.prompt_tokens)
    model.to(device=device, dtype=DTYPES[args.dtype])
    model.image_tokenizer.float()  # the quantizer and pixel decoder stay fp32
    tokenizer_config = model.config.tokenizer_config
    print(f"scales {tokenizer_config.scales} ({tokenizer_config.num_tokens} codes), K={tokenizer_config.codebook_size}, "
          f"backbone {args.layers}x{args.hidden_size}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
          f"params, {args.dtype} on {device}, {torch.get_num_threads()} threads, cfg {args.cfg_scale}, greedy")
    rows = []
    for batch_size in args.batch_sizes:
        rows.append(bench_batch(model, processor, batch_size, args.cfg_scale, args.repeats, args.warmup, args.decode,
                                device, args.prompt_tokens))
        print_table(rows[-1:])
    print()
    print_table(rows)
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k != "json"}
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"settings": settings, "scales": tokenizer_config.scales, "results": rows}, f, indent=2)
        print(f"wrote {args.json}")
    return rows


if __name__ == "__main__":
    run_main(main)
