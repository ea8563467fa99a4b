"""Speed card arithmetic (bounds, work counts) against hand-worked numbers, a tiny speed card, and the report card end
to end on a tiny saved model (twice: same numbers)."""

import json

import pytest

from eval.speed import card_markdown, drawing_work, physical_lower_bound, position_ratio, speed_card
from llm.flops import gpu_spec, llm_parameter_count, peak_tflops, training_mfu


def test_physical_lower_bound_hand_worked():
    # 14 GB of weights read 9 times at 4800 GB/s: 14e9·9 / 4.8e12 = 0.02625 s; 1e15 FLOPs at 989 TFLOP/s = 1.0111 s.
    bound = physical_lower_bound(14e9, 9, 1e15, bandwidth_gbs=4800, peak_tflops=989)
    assert bound["memory_s"] == pytest.approx(0.02625)
    assert bound["compute_s"] == pytest.approx(1 / 0.989)
    assert bound["bound_s"] == bound["compute_s"]
    memory_only = physical_lower_bound(14e9, 9, 1e15, bandwidth_gbs=4800, peak_tflops=None)
    assert memory_only["compute_s"] is None and memory_only["bound_s"] == pytest.approx(0.02625)


def test_position_ratio_and_drawing_work_hand_worked():
    # scales 1, 2 with a 3-token prompt: cached 3 + 5 − 1 = 7 positions; recompute (3 + 1) + (3 + 5) = 12.
    assert position_ratio([1, 2], 3) == pytest.approx(12 / 7)
    # clipb-256 without prompt: Σ prefixes 1+5+21+57+121+221+365+561+817 = 2169 over 816.
    assert position_ratio([1, 2, 4, 6, 8, 10, 12, 14, 16], 0) == pytest.approx(2169 / 816)
    # 2 rows: 2·(3 + 5 − 1) = 14 backbone positions at 2·(100 − 40) FLOPs, head 2·40 at 2·5 code positions.
    work = drawing_work({"matmul": 100, "image_head": 40}, [1, 2], rows=2, prompt_tokens=3, num_conditional=1)
    assert work == {"forwards": 2, "flops": 2 * 60 * 14 + 2 * 40 * 10, "positions": 14, "images": 1}


def test_gpu_spec_lookup_and_overrides():
    assert gpu_spec("NVIDIA H200")["bandwidth_gbs"] == 4800
    assert gpu_spec("NVIDIA H100 80GB HBM3")["bandwidth_gbs"] == 3350
    assert gpu_spec("NVIDIA H100 PCIe")["bandwidth_gbs"] == 2000
    assert gpu_spec("Some Future GPU") is None
    custom = gpu_spec("Some Future GPU", {"bandwidth_gbs": 100.0, "bf16_tflops": None})
    assert custom == {"bandwidth_gbs": 100.0, "bf16_tflops": None, "fp32_tflops": None}
    assert gpu_spec("NVIDIA A100-SXM4-40GB", {"bf16_tflops": 1.0}) == {
        "bandwidth_gbs": 1555, "bf16_tflops": 1.0, "fp32_tflops": 19.5}


def test_training_mfu_hand_worked():
    # A 0.5B-matmul-parameter model at 100k tokens/s on an H200 in bf16: 6 · 5e8 · 1e5 = 3e14 FLOP/s of 989e12.
    params = {"matmul": 500_000_000}
    h200 = gpu_spec("NVIDIA H200")
    assert peak_tflops(h200, "bfloat16") == 989 and peak_tflops(h200, "float32") == 67
    assert training_mfu(params, 1e5, peak_tflops(h200, "bfloat16")) == pytest.approx(3e14 / 989e12)
    assert training_mfu(params, 1e5, peak_tflops(None, "bfloat16")) is None  # unknown GPU


@pytest.fixture(scope="module")
def tiny():
    from llm import build_tiny

    return build_tiny(seed=0)


def test_parameter_count_leaves_out_the_image_tokenizer(tiny):
    model, _ = tiny
    counts = llm_parameter_count(model)
    everything = sum(p.numel() for p in model.parameters())
    tokenizer = sum(p.numel() for p in model.image_tokenizer.parameters())
    assert counts["total"] == everything - tokenizer
    assert counts["image_head"] == 64 * 2048
    assert counts["matmul"] == counts["total"] - counts["embedding"]


def test_tiny_speed_card(tiny, tmp_path):
    model, processor = tiny
    card = speed_card(model, processor, name="tiny", tokenizer_batch_sizes=[1], drawing_batch_sizes=[1],
                      prompt_lengths=[0], new_tokens=3, train_batch_size=1, repeats=1, warmup=0,
                      spec_overrides={"bandwidth_gbs": 10.0, "fp32_tflops": 0.1})
    (draw,) = card["drawing"]
    assert draw["identical"] and draw["batch"] == 1 and draw["rows"] == 2
    assert draw["speedup"] == pytest.approx(draw["recompute_s"] / draw["cached_s"])
    assert draw["position_ratio"] == pytest.approx(position_ratio([1, 2, 3, 4, 6, 8], draw["prompt_tokens"]))
    assert draw["lower_bound_bound_s"] > 0
    (answer,) = card["answering"]
    assert answer["new_tokens"] == 3 and answer["ttft_s"] > 0
    assert answer["tokens_per_s"] is None or answer["tokens_per_s"] > 0  # None only when timing noise wins
    assert card["training"][0]["mfu"] > 0
    assert model.training is False
    markdown = card_markdown(card)
    assert "KV cache vs full recompute" in markdown and f"**{draw['speedup']:.2f}x**" in markdown
    json.dumps(card)


def _numbers(card: dict) -> dict:
    return {"vqa": card["vqa"], "t2i": card["t2i"]["shapes_eval"],
            "reconstruction": {k: card["reconstruction"][k] for k in ("psnr", "ssim", "quality_vs_scales")}}


def test_report_end_to_end_twice_gives_the_same_numbers(tiny, tmp_path):
    from eval.report import PLOTS, main
    from eval.vqa import load_model

    model, _ = tiny
    model.save_pretrained(tmp_path / "ckpt")
    arguments = ["--model", str(tmp_path / "ckpt"), "--num-vqa", "4", "--num-t2i", "6", "--num-recon", "2",
                 "--device", "cpu", "--no-speed"]
    first = main(arguments + ["--output-dir", str(tmp_path / "one")])
    second = main(arguments + ["--output-dir", str(tmp_path / "two")])
    assert _numbers(first) == _numbers(second)
    out = tmp_path / "one"
    for name in ("report_card.json", "report_card.md", "model_card.md", "reconstruction/reconstructions.png",
                 "t2i/images/00005/samples/0000.png", "vqa/vqa_predictions.jsonl"):
        assert (out / name).is_file(), name
    for plot in PLOTS:
        assert (out / "plots" / plot).stat().st_size > 1000, plot
    saved = json.loads((out / "report_card.json").read_text())
    assert saved["vqa"]["num_questions"] == 4 and saved["t2i"]["num_prompts"] == 6
    assert saved["reconstruction"]["num_images"] == 2
    table = (out / "model_card.md").read_text()
    assert "| Drawing | ShapesEval, GenEval rules (6 prompts) | overall (mean over categories) |" in table
    assert f"{first['vqa']['overall']['accuracy']:.4f}" in table
    # The reloaded checkpoint answers like the in-memory model it was saved from.
    reloaded, _ = load_model(str(tmp_path / "ckpt"))
    assert all((a == b).all() for a, b in zip(reloaded.image_head.parameters(), model.image_head.parameters()))


def test_trainer_logs_the_mfu_of_its_gpu(tiny, monkeypatch):
    """The training logs' `mfu` is `training_mfu` of the model at the GPU's peak for the training precision, and is
    left out on a CPU (the device is faked: the formula needs no GPU)."""
    from types import SimpleNamespace

    import torch

    from train.trainer import TokenFlowTrainer

    model, _ = tiny
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    on_gpu = SimpleNamespace(args=SimpleNamespace(device=torch.device("cuda", 0), bf16=True), model=model,
                             _mfu_inputs=None)
    expected = training_mfu(llm_parameter_count(model), 2e4, 989)
    assert TokenFlowTrainer.model_flops_utilisation(on_gpu, 2e4) == pytest.approx(expected)
    on_cpu = SimpleNamespace(args=SimpleNamespace(device=torch.device("cpu"), bf16=False), model=model,
                             _mfu_inputs=None)
    assert TokenFlowTrainer.model_flops_utilisation(on_cpu, 2e4) is None
