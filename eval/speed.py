"""Speed card: how fast a checkpoint (or a named shape with random weights) tokenizes, draws and answers.

    python -m eval.speed --model DIR                                  # a checkpoint folder
    python -m eval.speed --config tiny                                # named shapes, random weights
    python -m eval.speed --config clipb-256-schedule                  # 9 scales, K = 32768, a 512x8 backbone
    python -m eval.speed --config clipb-256-schedule --prompt-tokens 0,128,768 --batch-sizes 1   # + a long context
    python -m eval.speed --config clipb-256+llama-7b --device cuda    # the real shapes (GPU; CPU allowed, slow)

Sections (each a row group of speed_card.json / speed_card.md in --output-dir):
- tokenizer: encode and decode images/s at batch 1 and 8 (`eval.bench_tokenizer.encode_decode_speed`).
- drawing: per batch size (1 and 8) and prompt length (the plain drawing prompt, and the reference's 128-token caption
  window), CFG on, greedy: the KV-cached loop against the full-recompute baseline in the same run
  (`eval.bench_generation.bench_batch`): seconds per drawing, the ratio, whether both drew the same indices, pixel
  decode time, images/s (draw + decode); beside them the ratio of backbone positions the two run (the linear-layer
  part of the ratio: P + Σs² − 1 against Σ_k (P + n_k)).
- answering: time to first token and tokens/s (greedy, forced length) for one image question at batch 1.
- memory: peak process RSS on CPU; peak CUDA memory allocated per section on CUDA.
- on CUDA: the drawing and answering sections again in bf16, each GPU figure beside its physical lower bound
  max(weight bytes × forwards / memory bandwidth, FLOPs / peak) from `llm.flops.GPU_SPECS` (matched on the device name;
  override with --bandwidth-gbs / --bf16-tflops / --fp32-tflops), and a training step (forward + backward on
  drawing conversations) with its model-FLOPs utilisation, MFU = 6 · params · tokens / time / peak.

FLOPs counted: 2 per weight per token for the backbone's and adapters' matmuls, the image head at the positions
that predict codes; attention score FLOPs and the image tokenizer are left out, so the bound stays a lower bound.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from eval.bench_generation import bench_batch, build_model
from eval.bench_tokenizer import encode_decode_speed
from eval.benchmarking import Spread, int_list, per_round, positive_int_list, time_call, time_rounds
from eval.vqa import load_model
from llm import assemble, build_shapesworld_text_tokenizer, build_tiny
from llm.flops import gpu_spec, llm_parameter_count, peak_tflops, training_flops, training_mfu
from tokenizer import TokenFlowConfig, TokenFlowTokenizer
from unimodal.cli import run_main
from unimodal.shapesworld import ShapesWorld

NAMED_CONFIGS = ("tiny", "clipb-256-schedule", "clipb-256+llama-7b")
# Shapes of random-weight backbones (Llama-2-7B / Vicuna-7B layout).
LLAMA_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
                tie_word_embeddings=False)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
BYTES_PER_PARAM = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}


# ---------------------------------------------------------------------------------------------------- models
def build_named(name: str, device: str = "cpu", seed: int = 0, prompt_tokens: int = 0):
    """A named shape with random weights → (model in eval mode on `device`, processor). See NAMED_CONFIGS.

    `prompt_tokens`: the longest drawing prompt to be measured (the schedule config's context is sized to fit it).
    """
    if name == "tiny":
        model, processor = build_tiny(seed=seed)
        return model.to(device), processor
    if name == "clipb-256-schedule":
        # 512 x 8: wide enough that the backbone, not the 32768-way image head (the same work with and without the
        # cache), dominates a forward, as in real models; still quick on a CPU.
        model, processor = build_model("clipb-256", hidden_size=512, layers=8, heads=8, codebook_size=None, seed=seed,
                                       prompt_tokens=prompt_tokens)
        return model.to(device), processor
    if name == "clipb-256+llama-7b":
        return build_random_llama("clipb-256", LLAMA_7B, device, seed)
    raise ValueError(f"config={name!r}; allowed: {NAMED_CONFIGS}")


def build_random_llama(tokenizer_preset: str, shape: dict, device: str = "cpu", seed: int = 0,
                       dtype: torch.dtype = torch.float32):
    """TokenFlow tokenizer preset + a Llama backbone of `shape` (LlamaConfig fields), random weights, built directly
    on `device` (the Vicuna chat template; the ShapesWorld text tokenizer supplies ids, the vocabulary keeps the
    shape's size). Refuses, naming the sizes, when the weights cannot fit in free CPU memory."""
    import psutil

    config = LlamaConfig(**shape)
    approx_params = config.num_hidden_layers * (4 * config.hidden_size ** 2 + 3 * config.hidden_size
                                                * config.intermediate_size) + 2 * config.vocab_size * config.hidden_size
    if torch.device(device).type == "cpu":
        needed, free = approx_params * BYTES_PER_PARAM[dtype], psutil.virtual_memory().available
        if needed > 0.9 * free:
            raise MemoryError(f"a {approx_params / 1e9:.1f}B-parameter backbone in {dtype} needs ~{needed / 2**30:.1f} "
                              f"GiB but only {free / 2**30:.1f} GiB of CPU memory is free; use --device cuda")
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        with torch.device(device):
            image_tokenizer = TokenFlowTokenizer(TokenFlowConfig.from_preset(tokenizer_preset)).eval()
            language_model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
            text_tokenizer = build_shapesworld_text_tokenizer(chat_format="vicuna")
            model, processor = assemble(language_model, text_tokenizer, image_tokenizer, "vicuna")
    finally:
        torch.random.set_rng_state(generator_state)
    model = model.to(device=device, dtype=dtype).eval()
    model.image_tokenizer.float()  # the quantizer and pixel decoder stay fp32
    return model, processor


# ---------------------------------------------------------------------------------------------------- bounds
def physical_lower_bound(weight_bytes: float, forwards: int, flops: float, bandwidth_gbs: float | None,
                         peak_tflops: float | None) -> dict[str, float | None]:
    """Seconds at least needed: reading the weights once per forward at full bandwidth, and the FLOPs at peak.

    Returns {"memory_s", "compute_s", "bound_s" (the larger)}; a part is None when its rate is unknown."""
    memory_s = weight_bytes * forwards / (bandwidth_gbs * 1e9) if bandwidth_gbs else None
    compute_s = flops / (peak_tflops * 1e12) if peak_tflops else None
    parts = [s for s in (memory_s, compute_s) if s is not None]
    return {"memory_s": memory_s, "compute_s": compute_s, "bound_s": max(parts) if parts else None}


def drawing_work(params: dict[str, int], scales: list[int], rows: int, prompt_tokens: int, num_conditional: int
                 ) -> dict[str, float]:
    """Forwards and FLOPs of one cached drawing: one prompt forward, then one per further scale.

    Backbone/adapters: 2 · (matmul params − image head) per position, rows · (P + Σs² − 1) positions; image head:
    2 · its params per code-predicting position, rows · Σs²; the text head at the prompt's last position is counted in
    the matmul params (negligible). rows includes the unconditional CFG rows."""
    codes = sum(s * s for s in scales)
    positions = rows * (prompt_tokens + codes - 1)
    flops = 2 * (params["matmul"] - params["image_head"]) * positions + 2 * params["image_head"] * rows * codes
    return {"forwards": len(scales), "flops": float(flops), "positions": positions,
            "images": num_conditional}


def position_ratio(scales: list[int], prompt_tokens: int) -> float:
    """Backbone positions of a full recompute per scale over those of the cached loop:
    Σ_k (P + n_k) / (P + Σs² − 1), n_k = codes up to and including scale k (the linear-layer part of the speed-up)."""
    prefix, recompute = 0, 0
    for s in scales:
        prefix += s * s
        recompute += prompt_tokens + prefix
    return recompute / (prompt_tokens + prefix - 1)


# ---------------------------------------------------------------------------------------------------- measuring
def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


@torch.no_grad()
def measure_tokenizer(model, batch_sizes: list[int], repeats: int, warmup: int, device: torch.device
                      ) -> list[dict[str, Any]]:
    """Encode / decode images/s of the model's own image tokenizer on random images at its input size."""
    rows = []
    for batch_size in batch_sizes:
        _reset_peak(device)
        speeds = encode_decode_speed(model.image_tokenizer, batch_size, repeats, warmup, device)
        row = {"batch": batch_size, "image_size": model.image_tokenizer.config.image_size}
        for name, speed in speeds.items():
            row.update(speed.fields(name))
        rows.append({**row, "peak_cuda_gib": _peak_gib(device)})
    return rows


def measure_drawing(model, processor, batch_sizes: list[int], prompt_lengths: list[int], cfg_scale: float,
                    repeats: int, warmup: int, device: torch.device, dtype: str, spec: dict | None
                    ) -> list[dict[str, Any]]:
    """Cached vs recomputed drawing (greedy, CFG) per batch size and prompt length, with the lower bound."""
    params = llm_parameter_count(model)
    weight_bytes = params["total"] * BYTES_PER_PARAM[DTYPES[dtype]]
    rows = []
    for prompt_tokens in prompt_lengths:
        for batch_size in batch_sizes:
            _reset_peak(device)
            row = bench_batch(model, processor, batch_size, cfg_scale, repeats, warmup, True, device, prompt_tokens)
            row = {"dtype": dtype, **row}
            row["prompt_tokens_requested"] = prompt_tokens
            row["draw_and_decode_s"] = row["cached_s"] + row["decode_s"]
            row["img_per_s"] = batch_size / row["draw_and_decode_s"]
            row["position_ratio"] = position_ratio(model.scales, row["prompt_tokens"])
            row["peak_cuda_gib"] = _peak_gib(device)
            if spec is not None:
                work = drawing_work(params, model.scales, row["rows"], row["prompt_tokens"], batch_size)
                peak = peak_tflops(spec, dtype)
                bound = physical_lower_bound(weight_bytes, work["forwards"], work["flops"], spec["bandwidth_gbs"],
                                             peak)
                row.update({f"lower_bound_{k}": v for k, v in bound.items()})
                if bound["bound_s"]:
                    row["cached_vs_bound"] = row["cached_s"] / bound["bound_s"]
            rows.append(row)
            print(f"  drawing {dtype} batch {batch_size} prompt {row['prompt_tokens']} tokens: cached "
                  f"{row['cached_s']:.3f}s, recompute {row['recompute_s']:.3f}s, KV-cache ratio "
                  f"{Spread.from_fields(row, 'speedup').describe('.2f', 'x')} "
                  f"(positions {row['position_ratio']:.2f}x), identical {row['identical']}", flush=True)
    return rows


def decode_rate(produced: int, ttft_seconds: list[float], total_seconds: list[float]) -> dict[str, Any]:
    """Tokens/s after the first token, per round from the interleaved (first token, whole answer) pair:
    (produced − 1) / (total − ttft). When some round's whole answer took no longer than its first token the rate is
    within noise: the median rate is kept if it is positive, the spread is dropped."""
    decode_s = [total - first for first, total in zip(ttft_seconds, total_seconds, strict=True)]
    if min(decode_s) > 0:
        return {**per_round(lambda s: (produced - 1) / s, decode_s).fields("tokens_per_s"),
                "tokens_per_s_within_noise": False}
    median = statistics.median(decode_s)
    return {"tokens_per_s": (produced - 1) / median if median > 0 else None, "tokens_per_s_spread": None,
            "tokens_per_s_within_noise": True}


@torch.no_grad()
def measure_answering(model, processor, new_tokens: int, repeats: int, warmup: int, device: torch.device,
                      dtype: str, spec: dict | None) -> dict[str, Any]:
    """Time to first token and decode tokens/s for one image question at batch 1 (greedy, exactly `new_tokens`)."""
    if new_tokens < 2:
        raise ValueError(f"new_tokens must be >= 2 to measure decoding, got {new_tokens}")
    sample = ShapesWorld("test", size=model.config.tokenizer_config.image_size, num_samples=1)[0]
    question = processor.user_content(sample.vqa[0].question)
    prompt = processor.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    batch = {k: v.to(device) for k, v in processor(text=[prompt], images=[sample.image]).items()}
    if "pixel_values" in batch:
        batch["pixel_values"] = batch["pixel_values"].to(model.image_tokenizer.dtype)
    pad = processor.tokenizer.pad_token_id

    def generate(count: int):
        return model.generate(**batch, max_new_tokens=count, min_new_tokens=count, do_sample=False, pad_token_id=pad,
                              suppress_tokens=[processor.image_token_id, processor.eoi_token_id])

    _reset_peak(device)
    seconds, outputs = time_rounds({"ttft": lambda: generate(1), "total": lambda: generate(new_tokens)}, repeats,
                                   warmup, device)
    produced = outputs["total"].shape[1] - batch["input_ids"].shape[1]
    row = {"dtype": dtype, "prompt_tokens": int(batch["input_ids"].shape[1]), "new_tokens": produced,
           **Spread.of(seconds["ttft"]).fields("ttft_s"), **Spread.of(seconds["total"]).fields("total_s"),
           **decode_rate(produced, seconds["ttft"], seconds["total"]), "peak_cuda_gib": _peak_gib(device)}
    if spec is not None:
        params = llm_parameter_count(model)
        weight_bytes = params["total"] * BYTES_PER_PARAM[DTYPES[dtype]]
        peak = peak_tflops(spec, dtype)
        first = physical_lower_bound(weight_bytes, 1, 2.0 * params["matmul"] * row["prompt_tokens"],
                                     spec["bandwidth_gbs"], peak)
        per_token = physical_lower_bound(weight_bytes, 1, 2.0 * params["matmul"], spec["bandwidth_gbs"], peak)
        row["ttft_lower_bound_s"] = first["bound_s"]
        row["tokens_per_s_upper_bound"] = 1.0 / per_token["bound_s"] if per_token["bound_s"] else None
    print(f"  answering {dtype}: time to first token {row['ttft_s'] * 1e3:.1f} ms, {_fmt(row['tokens_per_s'])} tokens/s",
          flush=True)
    return row


def measure_training(model, processor, batch_size: int, repeats: int, warmup: int, device: torch.device,
                     dtype: str, spec: dict | None) -> dict[str, Any]:
    """One forward + backward over `batch_size` drawing conversations (text prompt, drawn image as indices) with
    labels; tokens/s and MFU = 6 · LLM params · tokens / time / peak (no optimizer step)."""
    world = ShapesWorld("train", size=model.config.tokenizer_config.image_size, num_samples=batch_size)
    generator = torch.Generator().manual_seed(0)
    codebook = model.config.tokenizer_config.codebook_size
    examples = []
    for i in range(batch_size):
        indices = torch.randint(0, codebook, (model.num_image_codes,), generator=generator)
        messages = [{"role": "user", "content": world[i].captions[0]},
                    {"role": "assistant", "content": [{"type": "image", "indices": indices}]}]
        examples.append(processor.encode_conversation(messages))
    batch = {k: v.to(device) for k, v in processor.collate(examples).items()}
    tokens = int(batch["attention_mask"].sum())
    model.train()
    model.zero_grad(set_to_none=True)

    def step():
        loss = model(**batch).loss
        loss.backward()
        return loss

    try:
        _reset_peak(device)
        step_seconds, _ = time_call(step, repeats, warmup, device)
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()
    params = llm_parameter_count(model)
    step = Spread.of(step_seconds)
    step_s = step.median
    row = {"dtype": dtype, "batch": batch_size, "tokens": tokens, **step.fields("step_s"),
           **per_round(lambda s: tokens / s, step_seconds).fields("tokens_per_s"),
           "model_flops": training_flops(params, tokens), "peak_cuda_gib": _peak_gib(device)}
    row["mfu"] = training_mfu(params, row["tokens_per_s"], peak_tflops(spec, dtype))
    print(f"  training {dtype}: {step_s:.3f}s per step of {tokens} tokens"
          + (f", MFU {row['mfu']:.3f}" if row["mfu"] is not None else ""), flush=True)
    return row


# ---------------------------------------------------------------------------------------------------- card
def speed_card(model, processor, *, name: str, device: str = "cpu", dtypes: list[str] | None = None,
               tokenizer_batch_sizes: list[int] = (1, 8), drawing_batch_sizes: list[int] = (1, 8),
               prompt_lengths: list[int] = (0, 128), cfg_scale: float = 7.5, new_tokens: int = 32,
               train_batch_size: int | None = None, repeats: int = 5, warmup: int = 1,
               spec_overrides: dict | None = None) -> dict[str, Any]:
    """Measure every section; returns the card (see the module docstring). `dtypes` default: float32, plus bfloat16
    on CUDA. `train_batch_size` None = a training step only on CUDA (batch 4)."""
    dev = torch.device(device)
    if dtypes is None:
        dtypes = ["float32", "bfloat16"] if dev.type == "cuda" else ["float32"]
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        raise ValueError(f"dtypes {bad} not allowed; allowed: {sorted(DTYPES)}")
    if train_batch_size is None and dev.type == "cuda":
        train_batch_size = 4
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or "cpu")
    spec = gpu_spec(device_name, spec_overrides) if dev.type == "cuda" else (
        gpu_spec("", spec_overrides) if spec_overrides and any(v is not None for v in spec_overrides.values())
        else None)
    params = llm_parameter_count(model)
    card: dict[str, Any] = {
        "name": name, "device": device_name, "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "scales": model.scales, "codes_per_image": model.num_image_codes,
        "codebook_size": model.config.tokenizer_config.codebook_size, "llm_parameters": params["total"],
        "tokenizer_parameters": sum(p.numel() for p in model.image_tokenizer.parameters()),
        "cfg_scale": cfg_scale, "repeats": repeats, "warmup": warmup, "gpu_spec": spec,
    }
    print(f"speed card of {name} on {device_name}: {params['total'] / 1e6:.1f}M LLM parameters, scales "
          f"{model.scales}, K={card['codebook_size']}", flush=True)
    model.to(dev)
    card["tokenizer"] = measure_tokenizer(model, list(tokenizer_batch_sizes), repeats, warmup, dev)
    card["drawing"], card["answering"], card["training"] = [], [], []
    for dtype in dtypes:
        model.to(dtype=DTYPES[dtype])
        model.image_tokenizer.float()
        card["drawing"] += measure_drawing(model, processor, list(drawing_batch_sizes), list(prompt_lengths),
                                           cfg_scale, repeats, warmup, dev, dtype, spec)
        card["answering"].append(measure_answering(model, processor, new_tokens, repeats, warmup, dev, dtype, spec))
        if train_batch_size:
            card["training"].append(measure_training(model, processor, train_batch_size, repeats, warmup, dev, dtype,
                                                     spec))
    model.to(dtype=torch.float32)
    # ru_maxrss is in KiB on Linux: the process's peak resident memory over the whole run.
    card["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return card


def _fmt(value: Any, spec: str = ".3g") -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value)
    return format(value, spec) if isinstance(value, float) else str(value)


def _figure(row: dict[str, Any], name: str, spec: str = ".3g", scale: float = 1.0) -> str:
    """A row's median with its min–max over the timed rounds ("—" when absent)."""
    if row.get(name) is None:
        return "—"
    if row.get(f"{name}_spread") is None:
        return _fmt(row[name] * scale, spec) + (" (within noise)" if row.get(f"{name}_within_noise") else "")
    spread = Spread.from_fields(row, name)
    return Spread(spread.median * scale, spread.low * scale, spread.high * scale).describe(spec)


def _ratio(row: dict[str, Any], name: str) -> str:
    """**median×** (min–max), flagged "within noise" when the interval holds 1.0."""
    spread = Spread.from_fields(row, name)
    noise = ", within noise" if spread.within_noise else ""
    return f"**{spread.median:.2f}x** ({spread.low:.2f}–{spread.high:.2f}{noise})"


def card_markdown(card: dict[str, Any]) -> str:
    lines = [f"# Speed card: {card['name']}", "",
             f"{card['device']}, torch {card['torch']} ({card['torch_threads']} threads). LLM {card['llm_parameters'] / 1e6:.1f}M "
             f"parameters, image tokenizer {card['tokenizer_parameters'] / 1e6:.1f}M; scales {card['scales']} "
             f"({card['codes_per_image']} codes, K = {card['codebook_size']}). Medians (min–max in brackets) of "
             f"{card['repeats']} timed rounds after {card['warmup']} warm-up; the two sides of a ratio alternate "
             f"round by round, and a ratio whose min–max holds 1.0 is within noise. "
             f"Peak RSS {card['peak_rss_gib']:.2f} GiB.", ""]
    if card["gpu_spec"]:
        lines += [f"Lower bounds from {json.dumps(card['gpu_spec'])}.", ""]
    lines += ["## Tokenizer", "", "| batch | encode img/s | decode img/s | peak CUDA GiB |", "|---|---|---|---|"]
    lines += [f"| {r['batch']} | {_figure(r, 'encode_img_per_s')} | {_figure(r, 'decode_img_per_s')} | "
              f"{_fmt(r['peak_cuda_gib'])} |" for r in card["tokenizer"]]
    lines += ["", "## Drawing (CFG, greedy; KV cache vs full recompute in the same run)", "",
              "| dtype | batch | prompt tokens | cached s | recompute s | **ratio** | positions ratio | identical | "
              "decode s | img/s | lower bound s | cached / bound | peak CUDA GiB |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['dtype']} | {r['batch']} | {r['prompt_tokens']} | {_figure(r, 'cached_s')} | "
              f"{_figure(r, 'recompute_s')} | {_ratio(r, 'speedup')} | {r['position_ratio']:.2f}x | {r['identical']} | "
              f"{_figure(r, 'decode_s')} | "
              f"{_fmt(r['img_per_s'])} | {_fmt(r.get('lower_bound_bound_s'))} | {_fmt(r.get('cached_vs_bound'))} | "
              f"{_fmt(r['peak_cuda_gib'])} |" for r in card["drawing"]]
    lines += ["", "## Answering (batch 1, greedy)", "",
              "| dtype | prompt tokens | new tokens | TTFT ms | tokens/s | TTFT bound ms | tokens/s bound | "
              "peak CUDA GiB |", "|---|---|---|---|---|---|---|---|"]
    for r in card["answering"]:
        bound = r.get("ttft_lower_bound_s")
        lines.append(f"| {r['dtype']} | {r['prompt_tokens']} | {r['new_tokens']} | {_figure(r, 'ttft_s', '.1f', 1e3)} | "
                     f"{_figure(r, 'tokens_per_s')} | {_fmt(None if bound is None else bound * 1e3)} | "
                     f"{_fmt(r.get('tokens_per_s_upper_bound'))} | {_fmt(r['peak_cuda_gib'])} |")
    if card["training"]:
        lines += ["", "## Training step (forward + backward)", "",
                  "| dtype | batch | tokens | step s | tokens/s | MFU | peak CUDA GiB |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['dtype']} | {r['batch']} | {r['tokens']} | {_figure(r, 'step_s')} | "
                  f"{_figure(r, 'tokens_per_s')} | {_fmt(r['mfu'])} | {_fmt(r['peak_cuda_gib'])} |" for r in card["training"]]
    return "\n".join(lines) + "\n"


def write_card(card: dict, output_dir: str | os.PathLike) -> Path:
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed_card.json").write_text(json.dumps(card, indent=2))
    (out / "speed_card.md").write_text(card_markdown(card))
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m eval.speed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a TokenFlowMLLM checkpoint folder")
    source.add_argument("--config", choices=NAMED_CONFIGS, help="a named shape with random weights")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", default=None, help="comma-separated: float32,bfloat16 (default: +bfloat16 on CUDA)")
    p.add_argument("--tokenizer-batch-sizes", type=positive_int_list, default=[1, 8])
    p.add_argument("--batch-sizes", type=positive_int_list, default=[1, 8], help="drawing batch sizes")
    p.add_argument("--prompt-tokens", type=int_list, default=[0, 128],
                   help="drawing prompt lengths: 0 = the plain drawing prompt; N = lengthened to >= N tokens")
    p.add_argument("--cfg-scale", type=float, default=7.5)
    p.add_argument("--new-tokens", type=int, default=32, help="answer length for tokens/s")
    p.add_argument("--train-batch-size", type=int, default=None, help="0 = skip; default 4 on CUDA, skip on CPU")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed rounds after the warm-up; the two sides of every ratio alternate (A B A B …) and each "
                        "figure is the median with its min–max")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--bandwidth-gbs", type=float, default=None, help="override the memory bandwidth (GB/s)")
    p.add_argument("--bf16-tflops", type=float, default=None, help="override the dense bf16 peak")
    p.add_argument("--fp32-tflops", type=float, default=None, help="override the fp32 peak")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default=None, help="default: <model>/eval/speed or eval_outputs/speed-<config>")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.new_tokens < 2:
        p.error("need --repeats >= 1, --warmup >= 0, --new-tokens >= 2")
    args.dtypes = args.dtypes.split(",") if args.dtypes else None
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model:
        model, processor = load_model(args.model, args.device)
        name, default_out = str(args.model), Path(args.model) / "eval" / "speed"
    else:
        model, processor = build_named(args.config, args.device, args.seed, max(args.prompt_tokens))
        name, default_out = f"{args.config} (random weights)", Path("eval_outputs") / f"speed-{args.config}"
    start = time.perf_counter()
    card = speed_card(
        model, processor, name=name, device=args.device, dtypes=args.dtypes,
        tokenizer_batch_sizes=args.tokenizer_batch_sizes, drawing_batch_sizes=args.batch_sizes,
        prompt_lengths=args.prompt_tokens, cfg_scale=args.cfg_scale, new_tokens=args.new_tokens,
        train_batch_size=args.train_batch_size, repeats=args.repeats, warmup=args.warmup,
        spec_overrides={"bandwidth_gbs": args.bandwidth_gbs, "bf16_tflops": args.bf16_tflops,
                        "fp32_tflops": args.fp32_tflops})
    card["wall_s"] = time.perf_counter() - start
    out = write_card(card, args.output_dir or default_out)
    print()
    print(card_markdown(card))
    print(f"-> {out}")
    return card


if __name__ == "__main__":
    run_main(main)
