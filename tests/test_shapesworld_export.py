"""ShapesWorld exporters round-trip through plain json and Hugging Face `imagefolder`; the CLI writes them."""

import json

import datasets
import numpy as np
import pytest
from PIL import Image

from unimodal.shapesworld import (
    PROMPT_TAGS, Scene, ShapesPrompts, ShapesWorld, check_prompt_meta, contact_sheet, export_captions,
    export_geneval, export_imagefolder, export_llava, score_scene,
)
from unimodal.shapesworld.__main__ import main

NUM = 12


@pytest.fixture(scope="module")
def world():
    return ShapesWorld("test", size=64, num_samples=NUM)


def _same_image(path, image) -> bool:
    return np.array_equal(np.asarray(Image.open(path).convert("RGB")), np.asarray(image))


def test_imagefolder_round_trip(tmp_path, world):
    metadata = export_imagefolder(world, tmp_path)
    assert metadata == tmp_path / "test" / "metadata.jsonl"
    rows = [json.loads(line) for line in metadata.read_text().splitlines()]
    assert len(rows) == NUM
    for i, row in enumerate(rows):
        sample = world[i]
        assert _same_image(tmp_path / "test" / row["file_name"], sample.image)
        assert row["caption"] == sample.captions[0] and row["captions"] == sample.captions
        assert [(q["question"], q["answer"], q["type"]) for q in row["vqa"]] == [
            (q.question, q.answer, q.type) for q in sample.vqa]
        assert Scene.from_dict(row["scene"]) == sample.scene
        # The exported image and scene agree according to the judge.
        assert score_scene(Image.open(tmp_path / "test" / row["file_name"]), Scene.from_dict(row["scene"]))["exact"]


def test_imagefolder_loads_with_hugging_face_datasets_offline(tmp_path, world):
    export_imagefolder(world, tmp_path / "data")
    loaded = datasets.load_dataset("imagefolder", data_dir=str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"))
    assert list(loaded) == ["test"] and len(loaded["test"]) == NUM
    rows = sorted(loaded["test"], key=lambda r: r["caption"])
    expected = sorted((world[i] for i in range(NUM)), key=lambda s: s.captions[0])
    for row, sample in zip(rows, expected):
        assert row["caption"] == sample.captions[0]
        assert np.array_equal(np.asarray(row["image"].convert("RGB")), np.asarray(sample.image))
        assert row["vqa"][0]["answer"] == sample.vqa[0].answer
        assert row["scene"]["objects"][0]["shape"] == sample.scene.objects[0].shape


def test_llava_round_trip(tmp_path, world):
    path = export_llava(world, tmp_path)
    records = json.loads(path.read_text())
    assert len(records) == NUM and len({r["id"] for r in records}) == NUM
    for i, record in enumerate(records):
        sample = world[i]
        assert _same_image(tmp_path / record["image"], sample.image)
        turns = record["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * len(sample.vqa)
        assert turns[0]["value"] == "<image>\n" + sample.vqa[0].question
        assert all("<image>" not in t["value"] for t in turns[1:])
        assert [t["value"] for t in turns[1::2]] == [q.answer for q in sample.vqa]


def test_captions_round_trip(tmp_path, world):
    path = export_captions(world, tmp_path)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == NUM
    for i, record in enumerate(records):
        sample = world[i]
        assert _same_image(tmp_path / record["image"], sample.image)
        assert record["caption"] in sample.captions and record["captions"] == sample.captions
    # Rotating through the templates: every template is some image's caption.
    assert {r["captions"].index(r["caption"]) for r in records} == set(range(len(records[0]["captions"])))


def test_geneval_round_trip(tmp_path):
    prompts = ShapesPrompts("test", num_samples=24)
    path = export_geneval(prompts, tmp_path)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert records == [prompts.prompt(i).meta for i in range(24)]
    assert [r["tag"] for r in records] == list(PROMPT_TAGS) * 4
    for record in records:
        check_prompt_meta(record)
        assert set(record) <= {"prompt", "tag", "include", "exclude"}


def test_cli_export_and_show(tmp_path, capsys):
    for fmt, written in [("imagefolder", "test/metadata.jsonl"), ("llava", "llava_test.json"),
                         ("captions", "captions_test.jsonl"), ("geneval", "geneval_test.jsonl")]:
        main(["export", "--format", fmt, "--split", "test", "--num", "5", "--out", str(tmp_path / "out")])
        assert (tmp_path / "out" / written).is_file()
    assert len(list((tmp_path / "out" / "test").glob("*.png"))) == 5
    main(["show", "--split", "train", "--num", "6", "--out", str(tmp_path / "grid.png"), "--tile", "96"])
    grid = Image.open(tmp_path / "grid.png")
    assert grid.width == 3 * (96 + 12)  # three columns of tile + margins
    main(["show", "--split", "test", "--num", "4", "--size", "128", "--prompts", "--out", str(tmp_path / "p.png")])
    assert Image.open(tmp_path / "p.png").width == 2 * (192 + 12)
    with pytest.raises(SystemExit):
        main(["export", "--format", "coco", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        main(["export", "--format", "llava", "--split", "train", "--held-out", "only", "--out", str(tmp_path)])
    assert "held_out" in capsys.readouterr().err


def test_contact_sheet_layout_and_errors():
    images = [Image.new("RGB", (64, 64), (255, 0, 0))] * 5
    sheet = contact_sheet(images, ["a"] * 5, tile=64, columns=2)
    assert sheet.size[0] == 2 * (64 + 12)
    assert sheet.getpixel((6 + 10, 6 + 10)) == (255, 0, 0)
    with pytest.raises(ValueError, match="labels"):
        contact_sheet(images, ["a"], tile=64)
