"""Pre-tokenized shards: indices equal the tokenizer's, batches equal the pixel batches, training never encodes."""

import json
import logging
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from tokenizer import TokenFlowConfig, TokenFlowTokenizer
from train.conversations import PretokenizedConversations, check_pretokenized_tokenizer, conversation_images
from train.pretokenize import ShardWriter, build_sources, parse_args, pretokenize
from train.stage import build_model
from train.trainer import ConversationCollator
from unimodal.images import load_image
from unimodal.shapesworld import ShapesWorld


def random_tokenizer(seed: int) -> TokenFlowTokenizer:
    torch.manual_seed(seed)
    return TokenFlowTokenizer(TokenFlowConfig.from_preset("tiny")).eval()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A random tiny tokenizer and a small LLaVA + caption data set on disk (one corrupt image file)."""
    root = tmp_path_factory.mktemp("pretokenize")
    random_tokenizer(0).save_pretrained(root / "tokenizer")
    images = root / "images"
    images.mkdir()
    world = ShapesWorld("train", size=64, num_samples=4, seed=3)
    for i in range(4):
        world[i].image.save(images / f"{i}.png")
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    llava = [
        {"id": "two-images", "image": ["0.png", "1.png"], "conversations": [
            {"from": "human", "value": "<image>\nCompare <image> with the first."},
            {"from": "gpt", "value": "They differ."}]},
        {"id": "broken", "image": "broken.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "Nothing."}]},
        {"id": "role-content", "image": "2.png", "messages": [
            {"role": "user", "content": "How many shapes?"}, {"role": "assistant", "content": "Two."}]},
    ]
    (root / "llava.json").write_text(json.dumps(llava))
    with (root / "captions.jsonl").open("w") as f:
        for i in (0, 3):  # 0.png is also in the LLaVA data: encoded once
            f.write(json.dumps({"image": f"{i}.png", "caption": f"picture number {i}"}) + "\n")
    return root


def pretokenize_args(workdir, output, **overrides):
    argv = ["--data", f"llava:{workdir / 'llava.json'},captions:{workdir / 'captions.jsonl'},shapesworld",
            "--image-folder", str(workdir / "images"), "--tokenizer", str(workdir / "tokenizer"),
            "--output-dir", str(output), "--num-samples", "3", "--shard-size", "3", "--batch-size", "2",
            "--cfg-drop-prob", "0.0", "--device", "cpu"]
    for key, value in overrides.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return parse_args(argv)


@pytest.fixture(scope="module")
def shards(workdir):
    args = pretokenize_args(workdir, workdir / "shards")
    manifest = pretokenize(args)
    return args, manifest


def source_conversations(args):
    """The conversations pretokenize read, with pixels, minus the one whose image is corrupt."""
    out = []
    for kind, dataset in build_sources(args):
        for i in range(len(dataset)):
            conversation = dataset[i]
            if conversation.get("id") != "broken":
                out.append(conversation)
    return out


def test_manifest_counts_shards_and_dedup(shards, workdir):
    args, manifest = shards
    # LLaVA: 2 + 1 (+1 corrupt, skipped); captions (sft → drawing): 2, of which 0.png is shared; ShapesWorld: 3.
    assert manifest["num_skipped_unreadable"] == 1
    assert manifest["sources"] == {"llava": 2, "captions": 2, "shapesworld": 3}
    assert manifest["num_conversations"] == 7
    shapesworld_images = sum(len(conversation_images(c)) for c in source_conversations(args)[4:])
    assert manifest["num_images"] == 4 + shapesworld_images  # 0.png, 1.png, 2.png, 3.png once each
    assert manifest["num_understood_images"] + manifest["num_drawn_images"] == 5 + shapesworld_images
    assert manifest["dtype"] == "int16" and manifest["num_image_codes"] == 130
    assert manifest["shards"] == [f"indices-{i:05d}.safetensors" for i in range(len(manifest["shards"]))]
    rows = [load_file(str(workdir / "shards" / name))["indices"] for name in manifest["shards"]]
    assert [len(r) for r in rows[:-1]] == [3] * (len(rows) - 1) and 1 <= len(rows[-1]) <= 3
    assert sum(len(r) for r in rows) == manifest["num_images"]
    assert all(r.dtype == torch.int16 and r.shape[1] == 130 for r in rows)
    with pytest.raises(FileExistsError, match="--overwrite"):
        pretokenize(pretokenize_args(workdir, workdir / "shards"))


def test_shard_indices_equal_tokenizer_encode(shards, workdir):
    args, _ = shards
    tokenizer = TokenFlowTokenizer.from_pretrained(str(workdir / "tokenizer")).eval()
    processor = tokenizer.image_processor
    dataset = PretokenizedConversations(workdir / "shards")
    originals = source_conversations(args)
    assert len(dataset) == len(originals)
    compared = 0
    for number, original in enumerate(originals):
        stored = dataset[number]
        assert stored["id"] == original["id"]
        for pixels_item, indices_item in zip(conversation_images(original), conversation_images(stored), strict=True):
            pixel_values = processor(load_image(pixels_item["image"]), return_tensors="pt")["pixel_values"]
            with torch.no_grad():
                expected = tokenizer.encode(pixel_values).indices[0]
            assert indices_item["indices"].dtype == torch.long
            assert torch.equal(indices_item["indices"], expected)
            compared += 1
    assert compared == 5 + sum(len(conversation_images(c)) for c in originals[4:])


def test_batches_from_shards_equal_batches_from_images(shards, workdir):
    args, _ = shards
    model, processor = build_model(SimpleNamespace(
        init_from=None, tokenizer=str(workdir / "tokenizer"), backbone="shapesworld-tiny", chat_format="chatml",
        max_length=512, understanding_features="joint", understanding_positions="none",
        understanding_projector="mlp2x_gelu", image_placement="before_text", embedding_init_std=None,
        initializer_range=None))
    model.eval()
    collator = ConversationCollator(processor, max_length=512)
    dataset = PretokenizedConversations(workdir / "shards")
    originals = source_conversations(args)
    # Batches of one kind each (a batch holds images looked at, or drawn, or both): the conversations in order.
    for start in range(0, len(originals), 2):
        from_pixels = collator([originals[i] for i in range(start, min(start + 2, len(originals)))])
        from_indices = collator([dataset[i] for i in range(start, min(start + 2, len(originals)))])
        for key in ("input_ids", "attention_mask", "labels", "data_stats"):
            assert torch.equal(from_pixels[key], from_indices[key]), key
        assert ("pixel_values" in from_pixels) == ("image_indices" in from_indices)
        assert ("generation_pixel_values" in from_pixels) == ("generation_indices" in from_indices)
        with torch.no_grad():
            if "pixel_values" in from_pixels:
                torch.testing.assert_close(model.image_features_from_indices(from_indices["image_indices"]),
                                           model.get_image_features(from_pixels["pixel_values"]),
                                           rtol=1e-5, atol=1e-5)
            if "generation_pixel_values" in from_pixels:
                assert torch.equal(model.encode_generation_targets(from_pixels["generation_pixel_values"]),
                                   from_indices["generation_indices"])
            loss_pixels = model(**{k: v for k, v in from_pixels.items() if k != "data_stats"}).loss
            loss_indices = model(**{k: v for k, v in from_indices.items() if k != "data_stats"}).loss
        torch.testing.assert_close(loss_indices, loss_pixels, rtol=1e-5, atol=1e-5)


def test_training_from_shards_never_runs_the_encoder(shards, workdir, monkeypatch):
    from tokenizer.modeling_tokenflow import TokenFlowTokenizer as Tokenizer
    from train import trainer
    from train.sft import main

    def forbidden(*args, **kwargs):
        raise AssertionError("the tokenizer's encoder ran while training from pre-tokenized shards")

    monkeypatch.setattr(Tokenizer, "encode", forbidden)
    monkeypatch.setattr(trainer.SampleCallback, "write", lambda *a, **k: None)  # samples look at fresh pixels
    output = workdir / "train-from-shards"
    main(["--data", f"pretokenized:{workdir / 'shards'}", "--tokenizer", str(workdir / "tokenizer"),
          "--backbone", "shapesworld-tiny", "--output-dir", str(output), "--max-steps", "3",
          "--per-device-train-batch-size", "2", "--num-samples", "8", "--logging-steps", "1", "--save-steps", "100",
          "--report-to", "none", "--deepspeed", "none", "--use-cpu", "true", "--bf16", "false",
          "--cfg-drop-prob", "0.0", "--init-from", "none"])
    lines = (output / "train_log.csv").read_text().splitlines()
    assert len(lines) == 4 and lines[0].startswith("step,loss")


def test_reader_refuses_other_tokenizer_and_other_cfg_rate(shards, workdir):
    dataset = PretokenizedConversations(workdir / "shards")
    dataset.check_tokenizer(TokenFlowTokenizer.from_pretrained(str(workdir / "tokenizer")))
    with pytest.raises(ValueError, match="another tokenizer"):
        check_pretokenized_tokenizer(dataset, random_tokenizer(1))  # same config, other codebook
    bigger = TokenFlowTokenizer(TokenFlowConfig.from_preset("tiny", scales=[1, 2, 4, 8]))
    with pytest.raises(ValueError, match=r"scales \[1, 2, 3, 4, 6, 8\]"):
        dataset.check_tokenizer(bigger)
    manifest = json.loads((workdir / "shards" / "manifest.json").read_text())
    assert manifest["num_drawn_images"] > 0
    with pytest.raises(ValueError, match="--cfg-drop-prob"):
        PretokenizedConversations(workdir / "shards", cfg_drop_prob=0.1)
    # ShapesWorld's layout was fixed when the shards were written: a model that places images otherwise is refused.
    assert manifest["image_placement"] == "before_text"
    PretokenizedConversations(workdir / "shards", image_placement="before_text")
    with pytest.raises(ValueError, match="--image-placement after_text"):
        PretokenizedConversations(workdir / "shards", image_placement="after_text")
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        PretokenizedConversations(workdir / "images")


def test_large_codebooks_are_written_as_int32(caplog):
    fake = SimpleNamespace(config=SimpleNamespace(codebook_size=65536), image_processor=None)
    with caplog.at_level(logging.INFO, logger="train.pretokenize"):
        writer = ShardWriter(fake, None, shard_size=4, batch_size=2, device="cpu")
    assert writer.dtype == torch.int32
    assert "does not fit int16" in caplog.text
    assert ShardWriter(SimpleNamespace(config=SimpleNamespace(codebook_size=32768), image_processor=None), None,
                       4, 2, "cpu").dtype == torch.int16


def test_slot_labels_travel_through_shards_into_the_slot_loss(shards, workdir, monkeypatch):
    from train import trainer
    from train.sft import main

    argv = ["--data", "shapesworld", "--tokenizer", str(workdir / "tokenizer"), "--output-dir",
            str(workdir / "labelled"), "--num-samples", "6", "--cfg-drop-prob", "0.0", "--device", "cpu",
            "--shapesworld-tasks", "vqa:1,t2i:1", "--question-types", "exists,count", "--slot-labels"]
    args = parse_args(argv)
    manifest = pretokenize(args)
    assert manifest["slot_label_side"] == 8 and manifest["question_types"] == "exists,count"
    dataset = PretokenizedConversations(workdir / "labelled")
    assert dataset.slot_label_side == 8
    [(_, source)] = build_sources(args, slot_label_side=8)
    looked_at = 0
    for index in range(len(dataset)):
        written, original = conversation_images(dataset[index]), conversation_images(source[index])
        assert [("slot_labels" in item) for item in written] == [("slot_labels" in item) for item in original]
        for item, expected in zip(written, original):
            if "slot_labels" in item:
                looked_at += 1
                assert torch.equal(item["slot_labels"], expected["slot_labels"])
    assert looked_at > 0
    questions = [m["content"][-1]["text"] for i in range(len(dataset)) for m in dataset[i]["messages"][::2]
                 if dataset[i]["task"] == "vqa"]
    assert questions and all(q.startswith(("Is there", "How many")) for q in questions), questions

    monkeypatch.setattr(trainer.SampleCallback, "write", lambda *a, **k: None)
    common = ["--tokenizer", str(workdir / "tokenizer"), "--backbone", "shapesworld-tiny", "--max-steps", "3",
              "--per-device-train-batch-size", "2", "--num-samples", "8", "--logging-steps", "1", "--save-steps",
              "100", "--report-to", "none", "--deepspeed", "none", "--use-cpu", "true", "--bf16", "false",
              "--cfg-drop-prob", "0.0", "--init-from", "none", "--slot-loss-weight", "1"]
    main(["--data", f"pretokenized:{workdir / 'labelled'}", "--output-dir", str(workdir / "slot-run"), *common])
    header = (workdir / "slot-run" / "train_log.csv").read_text().splitlines()[0].split(",")
    assert "slot_loss" in header
    with pytest.raises(ValueError, match="the slot loss needs per-slot labels on the model's 8x8 slot grid"):
        main(["--data", f"pretokenized:{workdir / 'shards'}", "--output-dir", str(workdir / "no-labels"), *common])
