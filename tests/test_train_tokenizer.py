import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from tokenizer import TokenFlowTokenizer
from train.train_teacher import build_clip, save_teacher
from train.train_tokenizer import TrainConfig, parse_config, train

# A miniature of the tiny preset (same layout, a fraction of the width) so that a step takes a fraction of a second.
SMALL_CLIP = {
    "embed_dim": 16, "quick_gelu": False,
    "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
}
PIXEL = {"ch": 8, "ch_mult": [1, 1, 2, 2], "num_res_blocks": 1, "z_channels": 16, "norm_groups": 4}
OVERRIDES = {
    "codebook_size": 64, "pixel_encoder": PIXEL, "pixel_decoder": PIXEL,
    "semantic_tower": {"type": "open_clip", "model_cfg": SMALL_CLIP},
    "teacher": {"type": "open_clip", "model_cfg": SMALL_CLIP},
    "semantic_decoder": {"grid": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}, "semantic_target_dim": 16,
}


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("teacher")
    save_teacher(build_clip(SMALL_CLIP), folder, SMALL_CLIP)
    return str(folder / "open_clip_model.safetensors")


def small_config(tmp_path, teacher_file, name, **changes) -> TrainConfig:
    values = dict(model_overrides=OVERRIDES, teacher=teacher_file, max_steps=6, batch_size=2, log_every=1,
                  ckpt_every=3, image_every=3, num_train_samples=40, disc_start=4, disc_ndf=8, ema=True,
                  ema_decay=0.9, output_dir=str(tmp_path / name), export_dir=None, threads=1)
    values.update(changes)
    return TrainConfig(**values)


def read_log(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_resume_gives_exactly_the_losses_of_an_uninterrupted_run(tmp_path, teacher_file, monkeypatch):
    straight = train(small_config(tmp_path, teacher_file, "straight"))
    # The same run killed during step 4, after its step-3 checkpoint (the LR schedule depends on max_steps, so the
    # interrupted run must be the same 6-step run, not a shorter one).
    import train.train_tokenizer as trainer

    calls, real_loss = [], trainer.reconstruction_loss

    def killed_at_step_4(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt("killed")
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(trainer, "reconstruction_loss", killed_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        train(small_config(tmp_path, teacher_file, "resumed"))
    monkeypatch.setattr(trainer, "reconstruction_loss", real_loss)
    resumed = train(small_config(tmp_path, teacher_file, "resumed", resume="auto"))
    a = read_log(tmp_path / "straight" / "train_log.csv")
    b = read_log(tmp_path / "resumed" / "train_log.csv")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [str(i) for i in range(1, 7)]
    loss_keys = [k for k in a[0] if k.startswith(("loss/", "usage/", "perplexity/"))]
    assert {"loss/rec", "loss/semantic", "loss/vq", "loss/commit", "loss/gen_adv", "loss/disc"} <= set(a[-1])
    assert a[-1]["loss/gen_adv"] != "" and a[0]["loss/gen_adv"] == ""  # the GAN joins at disc_start
    for ra, rb in zip(a, b):
        assert {k: ra[k] for k in loss_keys} == {k: rb[k] for k in loss_keys}
    assert straight["last"] == resumed["last"] or all(
        straight["last"][k] == resumed["last"][k] for k in straight["last"] if k.startswith("loss/"))
    # the final folders hold the same (EMA) weights and load with from_pretrained
    m1 = TokenFlowTokenizer.from_pretrained(str(tmp_path / "straight" / "tokenizer"))
    m2 = TokenFlowTokenizer.from_pretrained(str(tmp_path / "resumed" / "tokenizer"))
    for (k, v1), v2 in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(v1, v2), k
    out = tmp_path / "straight"
    assert (out / "loss_curves.png").exists() and (out / "samples" / "step_0000006.png").exists()
    assert any((out / "tb").iterdir())
    assert not list((out / "checkpoints").glob("*.tmp"))


def test_training_learns_and_semantic_tower_starts_from_teacher(tmp_path, teacher_file):
    summary = train(small_config(tmp_path, teacher_file, "learn", max_steps=12, lr=2e-3, ema=False,
                                 disc_start=10**6, ckpt_every=100))
    rows = read_log(tmp_path / "learn" / "train_log.csv")
    first, last = float(rows[0]["loss/rec"]), np.mean([float(r["loss/rec"]) for r in rows[-3:]])
    assert last < 0.7 * first
    assert summary["skipped_images"] == 0


def test_corrupt_images_are_skipped_and_counted(tmp_path, teacher_file, caplog):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    summary = train(small_config(tmp_path, teacher_file, "folder", data="imagefolder", data_path=str(folder),
                                 max_steps=3, ema=False, disc_start=10**6))
    assert summary["skipped_images"] == 1  # 6 files, 3 batches of 2: the broken one is met once
    assert "skipped 1 unreadable image" in caplog.text and "broken.png" in caplog.text


def test_config_file_and_flags(tmp_path):
    (tmp_path / "c.yaml").write_text("max_steps: 7\nlr: 0.001\nema: true\n")
    cfg = parse_config(["--config", str(tmp_path / "c.yaml"), "--lr", "0.002", "--output-dir", "x"])
    assert (cfg.max_steps, cfg.lr, cfg.ema, cfg.output_dir) == (7, 0.002, True, "x")
    (tmp_path / "c.json").write_text(json.dumps({"no_such_option": 1}))
    with pytest.raises(ValueError, match="no_such_option"):
        parse_config(["--config", str(tmp_path / "c.json")])
    with pytest.raises(ValueError, match="data-path"):
        parse_config(["--data", "imagefolder"])
    with pytest.raises(ValueError, match="init-from"):
        parse_config(["--finetune-decoder"])
    assert parse_config(["--teacher", "none"]).teacher is None


def test_finetune_decoder_trains_only_the_pixel_decoder(tmp_path, teacher_file):
    train(small_config(tmp_path, teacher_file, "base", max_steps=2, ema=False, disc_start=10**6))
    base = TokenFlowTokenizer.from_pretrained(str(tmp_path / "base" / "tokenizer"))
    train(small_config(tmp_path, teacher_file, "ft", max_steps=2, ema=False, disc_start=10**6, model_overrides={},
                       init_from=str(tmp_path / "base" / "tokenizer"), finetune_decoder=True,
                       decoder_from_scratch=True))
    tuned = TokenFlowTokenizer.from_pretrained(str(tmp_path / "ft" / "tokenizer"))
    for (name, a), b in zip(base.state_dict().items(), tuned.state_dict().values()):
        assert torch.equal(a, b) == (not name.startswith("decoder.")), name


def test_swap_teacher_restarts_only_the_semantic_tower_from_the_new_teacher(tmp_path, teacher_file):
    train(small_config(tmp_path, teacher_file, "base", max_steps=2, ema=False, disc_start=10**6))
    base = TokenFlowTokenizer.from_pretrained(str(tmp_path / "base" / "tokenizer"))
    torch.manual_seed(1)
    new_teacher = build_clip(SMALL_CLIP)
    save_teacher(new_teacher, tmp_path / "new-teacher", SMALL_CLIP)
    new_file = str(tmp_path / "new-teacher" / "open_clip_model.safetensors")
    # A step of lr 1e-12: the weights are what the run started from.
    for name, swap in (("kept", False), ("swapped", True)):
        train(small_config(tmp_path, new_file, name, max_steps=1, lr=1e-12, ema=False, disc_start=10**6,
                           model_overrides={}, init_from=str(tmp_path / "base" / "tokenizer"), swap_teacher=swap))
    kept = TokenFlowTokenizer.from_pretrained(str(tmp_path / "kept" / "tokenizer")).state_dict()
    swapped = TokenFlowTokenizer.from_pretrained(str(tmp_path / "swapped" / "tokenizer")).state_dict()
    teacher = {f"encoder_vqkd.visual.{k}": v.half().float() for k, v in new_teacher.visual.state_dict().items()}
    for name, value in base.state_dict().items():
        torch.testing.assert_close(kept[name], value, atol=1e-6, rtol=0)
        expected = teacher[name] if name.startswith("encoder_vqkd.") else value
        torch.testing.assert_close(swapped[name], expected, atol=1e-6, rtol=0, msg=name)
    with pytest.raises(ValueError, match="swap_teacher needs --init-from"):
        train(small_config(tmp_path, new_file, "bad", swap_teacher=True))
