import json

import open_clip
import torch

from train.train_teacher import caption_retrieval, load_teacher, main


class _FakeClip:
    """Image i and caption j embed to one-hot vectors chosen by the test: retrieval is then known by hand."""

    def __init__(self, image_ids, text_ids, dim):
        self.image_ids, self.text_ids, self.dim = image_ids, text_ids, dim

    def eval(self):
        return self

    def encode_image(self, images):
        return torch.nn.functional.one_hot(torch.tensor(self.image_ids[: len(images)]), self.dim).float()

    def encode_text(self, tokens):
        return torch.nn.functional.one_hot(torch.tensor(self.text_ids[: len(tokens)]), self.dim).float()


class _World:
    def __init__(self, captions):
        self.captions = captions

    def __getitem__(self, i):
        from PIL import Image

        return type("S", (), {"image": Image.new("RGB", (8, 8)), "captions": [self.captions[i]]})()


def test_caption_retrieval_counts_hand_worked_matches():
    # 4 scenes; images 0,1 point at their own captions, image 2 at caption 3, image 3 at caption 2.
    # Scenes 2 and 3 share no caption, so i2t = 2/4; t2i the same by symmetry of the one-hot construction.
    world = _World(["a", "b", "c", "d"])
    model = _FakeClip(image_ids=[0, 1, 3, 2], text_ids=[0, 1, 2, 3], dim=4)
    got = caption_retrieval(model, lambda texts: list(texts), world, 4, batch_size=3)
    assert got["image_to_text_top1"] == 0.5 and got["text_to_image_top1"] == 0.5 and got["chance"] == 0.25
    # when scenes 2 and 3 have the same caption, either counts as right
    got = caption_retrieval(model, lambda texts: list(texts), _World(["a", "b", "c", "c"]), 4)
    assert got["image_to_text_top1"] == 1.0 and got["text_to_image_top1"] == 1.0


def test_teacher_trains_saves_in_open_clip_format_and_reloads(tmp_path):
    metrics = main(["--max-steps", "3", "--batch-size", "4", "--num-eval-scenes", "8", "--warmup-steps", "1",
                    "--output-dir", str(tmp_path), "--threads", "1"])
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["num_scenes"] == 8 and saved["steps"] == 3 and 0.0 <= saved["image_to_text_top1"] <= 1.0
    assert saved == json.loads(json.dumps(metrics))
    assert len((tmp_path / "train_log.csv").read_text().strip().splitlines()) == 1 + 3
    # open_clip's own loader reads the folder; the tokenizer's tower reads the weights file
    model = load_teacher(tmp_path)
    assert isinstance(model, open_clip.CLIP)
    from tokenizer.configuration_tokenflow import TINY_OPEN_CLIP_CFG
    from unimodal.vision_towers import build_vision_tower

    tower = build_vision_tower({"type": "open_clip", "model_cfg": TINY_OPEN_CLIP_CFG,
                                "pretrained": str(tmp_path / "open_clip_model.safetensors")}).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        # the distillation target's tower is exactly open_clip's visual of the saved model
        for (name, a), b in zip(tower.visual.state_dict().items(), model.visual.state_dict().values()):
            assert torch.equal(a, b), name
        assert torch.allclose(tower.visual(x), model.visual(x), atol=1e-5)
        for name, value in model.state_dict().items():  # stored fp16, loaded fp32
            assert value.dtype == torch.float32 or not value.is_floating_point(), name


def test_image_outputs_are_encode_image_and_the_tokens_a_tokenizer_distils():
    from tokenizer.configuration_tokenflow import TINY_OPEN_CLIP_CFG
    from train.train_teacher import build_clip, image_outputs
    from unimodal.vision_towers import build_vision_tower

    torch.manual_seed(0)
    model = build_clip().eval()
    tower = build_vision_tower({"type": "open_clip", "model_cfg": TINY_OPEN_CLIP_CFG}).eval()
    tower.visual.load_state_dict(model.visual.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        pooled, tokens = image_outputs(model, x)
        torch.testing.assert_close(pooled, model.encode_image(x, normalize=True))
        torch.testing.assert_close(tokens, tower.project(tower(x)))
        assert model.encode_image(x).shape == (2, 64)  # the tower is left as it was


def test_dense_loss_reads_each_label_row_from_its_own_logits():
    from train.train_teacher import dense_loss
    from unimodal.shapesworld.labels import LABEL_CLASSES

    labels = torch.tensor([[[1, 0], [2, 0], [1, 0]]])  # [B=1, 3, g²=2]
    logits = torch.full((1, 2, sum(LABEL_CLASSES)), -30.0)
    for offset, row in zip((0, LABEL_CLASSES[0], LABEL_CLASSES[0] + LABEL_CLASSES[1]), labels[0]):
        logits[0, torch.arange(2), offset + row] = 30.0  # every label predicted right
    assert dense_loss(logits, labels) < 1e-6
    logits[0, 0, LABEL_CLASSES[0] + 2] = -30.0  # the colour of patch 0 now wrong: only the colour term grows
    logits[0, 0, LABEL_CLASSES[0] + 5] = 30.0
    assert abs(dense_loss(logits, labels).item() - 60.0 / 2) < 1e-3  # one of two patches off by a 60 logit gap


def test_dense_teacher_learns_to_name_what_each_patch_holds(tmp_path):
    log = main(["--max-steps", "40", "--batch-size", "16", "--num-eval-scenes", "32", "--warmup-steps", "2",
                "--dense-weight", "1", "--output-dir", str(tmp_path), "--threads", "1"])
    rows = (tmp_path / "train_log.csv").read_text().strip().splitlines()
    dense = [float(row.split(",")[5]) for row in rows[1:]]
    assert sum(dense[-5:]) / 5 < 0.8 * sum(dense[:5]) / 5  # the dense loss falls
    assert log["dense_weight"] == 1.0 and log["dense_occupied_accuracy"] > 0.7  # empty vs occupied patches


def test_a_teacher_continues_from_a_saved_one(tmp_path):
    common = ["--batch-size", "4", "--num-eval-scenes", "4", "--warmup-steps", "0", "--threads", "1"]
    main(["--max-steps", "2", "--output-dir", str(tmp_path / "a"), *common])
    main(["--max-steps", "1", "--lr", "1e-12", "--init-from", str(tmp_path / "a"), "--output-dir", str(tmp_path / "b"),
          *common])
    first, second = load_teacher(tmp_path / "a").state_dict(), load_teacher(tmp_path / "b").state_dict()
    for name, value in first.items():
        torch.testing.assert_close(second[name], value, atol=1e-3, rtol=1e-3, msg=name)  # fp16 on disk
