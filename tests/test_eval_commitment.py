"""eval.commitment: redraws from a drawing's first scales, and the pass rates after a pass and after a failure."""

import json

import pytest

import llm
from eval import commitment
from eval.t2i import shapes_prompt_metadata


@pytest.fixture(scope="module")
def tiny():
    return llm.build_tiny(seed=0)


def test_a_verdict_fixed_by_the_first_code_is_settled_from_the_first_scale(tiny):
    model, processor = tiny
    metadata = shapes_prompt_metadata(8, "validation")
    results = commitment.commitment_study(model, processor, metadata, redraws=2, seed=3, cfg_scale=1.0,
                                          verdict=lambda image, codes, meta: int(codes[0]) % 2 == 0)
    assert results["num_passed"] > 0 and results["num_failed"] > 0
    assert [row["kept_scales"] for row in results["rows"]] == list(range(1, len(model.scales)))
    for row in results["rows"]:  # every redraw keeps the first code, so it keeps the verdict
        assert row["pass_after_pass"] == 1.0 and row["pass_after_fail"] == 0.0


def test_command_line_writes_the_report(tiny, tmp_path):
    model, processor = tiny
    model.save_pretrained(tmp_path / "model")
    results = commitment.main(["--model", str(tmp_path / "model"), "--num-samples", "2", "--redraws", "1",
                               "--output-dir", str(tmp_path / "out"), "--cfg-scale", "1"])
    assert json.loads((tmp_path / "out" / "commitment.json").read_text())["rows"] == results["rows"]
    assert "| 1 | 1×1 |" in (tmp_path / "out" / "commitment.md").read_text()
    with pytest.raises(SystemExit):
        commitment.parse_args(["--model", "x", "--redraws", "0"])
