"""What a TokenFlowMLLM costs: its parameter counts, the model FLOPs of training on a number of tokens, and the
model-FLOPs utilisation (MFU) of a GPU, in the manner of nanoGPT's `estimate_mfu`.

FLOPs counted: 2 per weight per token forward (4 backward) for the backbone's and adapters' matmuls; embedding
lookups and attention-score FLOPs are left out.
"""

from __future__ import annotations

import torch

# Dense peak throughput and memory bandwidth (vendor data sheets; fp32 = non-tensor-core FMA rate, which is what
# PyTorch's default fp32 matmuls use). Keys are matched as substrings of torch.cuda.get_device_name(), first match.
GPU_SPECS: dict[str, dict[str, float]] = {
    "H200": {"bandwidth_gbs": 4800, "bf16_tflops": 989, "fp32_tflops": 67},
    "H100 PCIe": {"bandwidth_gbs": 2000, "bf16_tflops": 756, "fp32_tflops": 51},
    "H100": {"bandwidth_gbs": 3350, "bf16_tflops": 989, "fp32_tflops": 67},
    "A100-SXM4-80GB": {"bandwidth_gbs": 2039, "bf16_tflops": 312, "fp32_tflops": 19.5},
    "A100": {"bandwidth_gbs": 1555, "bf16_tflops": 312, "fp32_tflops": 19.5},
    "L40S": {"bandwidth_gbs": 864, "bf16_tflops": 362, "fp32_tflops": 91.6},
    "RTX 4090": {"bandwidth_gbs": 1008, "bf16_tflops": 165, "fp32_tflops": 82.6},
    "A10G": {"bandwidth_gbs": 600, "bf16_tflops": 70, "fp32_tflops": 31.2},
}
# Forward + backward of a matmul: 2 FLOPs per weight per token forward, 4 backward.
TRAINING_FLOPS_PER_PARAM = 6.0


def llm_parameter_count(model) -> dict[str, int]:
    """Parameters the drawing / answering loops read: everything but the image tokenizer; split so FLOPs can skip
    embedding lookups (ZeRO-3-partitioned parameters count at full size). Returns {"total", "matmul", "image_head",
    "embedding"}."""
    total = sum(_numel(p) for name, p in model.named_parameters() if not name.startswith("image_tokenizer."))
    embedding = _numel(model.get_input_embeddings().weight)
    embedding += _numel(model.scale_embedding.weight) + _numel(model.position_embedding)
    image_head = _numel(model.image_head.weight)
    return {"total": total, "matmul": total - embedding, "image_head": image_head, "embedding": embedding}


def _numel(parameter: torch.Tensor) -> int:
    # Under ZeRO-3 a parameter is an empty placeholder; DeepSpeed keeps its full size in ds_numel.
    return getattr(parameter, "ds_numel", parameter.numel())


def gpu_spec(device_name: str, overrides: dict[str, float | None] | None = None) -> dict[str, float] | None:
    """Bandwidth (GB/s) and peak TFLOPs of a GPU by name (first key of GPU_SPECS inside the name), with overrides.
    None when the GPU is unknown and nothing is overridden."""
    spec = next((dict(v) for k, v in GPU_SPECS.items() if k.lower() in device_name.lower()), None)
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    if spec is None and not given:
        return None
    return {"bandwidth_gbs": None, "bf16_tflops": None, "fp32_tflops": None, **(spec or {}), **given}


def peak_tflops(spec: dict[str, float] | None, dtype: str) -> float | None:
    """The dense peak of `spec` for a `dtype` name: bf16 tensor cores for "bfloat16", else the fp32 rate."""
    return None if spec is None else spec.get("bf16_tflops" if dtype == "bfloat16" else "fp32_tflops")


def training_flops(params: dict[str, int], tokens: float) -> float:
    """Model FLOPs of training on `tokens` tokens: 6 · matmul params (`llm_parameter_count`) · tokens. Attention-score
    FLOPs are not counted."""
    return TRAINING_FLOPS_PER_PARAM * params["matmul"] * tokens


def training_mfu(params: dict[str, int], tokens_per_s: float, peak: float | None) -> float | None:
    """Model-FLOPs utilisation of training: `training_flops` per second over the peak (TFLOP/s); None when the peak
    is unknown."""
    return training_flops(params, tokens_per_s) / (peak * 1e12) if peak else None
