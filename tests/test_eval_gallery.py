"""The README gallery on a tiny random checkpoint: every figure written at its size, the VQA table holds the
model's own answers, the markdown names the command."""

from PIL import Image

from eval import gallery
from eval.vqa import load_model, run, shapesworld_questions


def test_gallery_of_a_tiny_checkpoint(tmp_path):
    from llm import build_tiny

    model, _ = build_tiny(seed=0)
    model.save_pretrained(tmp_path / "ckpt")
    argv = ["--model", str(tmp_path / "ckpt"), "--output-dir", str(tmp_path / "gallery"), "--num-drawn", "4",
            "--num-vqa", "2", "--num-recon", "3", "--device", "cpu"]
    out = gallery.main(argv)
    for name in gallery.FIGURES:
        with Image.open(out / name) as figure:
            assert figure.width > 300 and figure.height > 150, name
    with Image.open(out / "reconstructions.png") as recon, Image.open(out / "coarse_to_fine.png") as strip:
        assert recon.width > recon.height  # 3 columns, 2 rows
        assert strip.width > strip.height  # 6 scales across, 4 drawings down at 1.6 : 1.8 in
    markdown = (out / "gallery.md").read_text()
    assert f"python -m eval.gallery --model {tmp_path / 'ckpt'}" in markdown
    assert all(f"({name})" in markdown for name in gallery.FIGURES)

    rows = (out / "vqa.md").read_text().splitlines()[2:]
    assert len(rows) == 2 and len({row.split("|")[1] for row in rows}) == 2  # two different images
    reloaded, processor = load_model(tmp_path / "ckpt")
    first = shapesworld_questions(1, "test")
    _, records = run(reloaded, processor, first, "exact")
    assert rows[0].split("|")[2].strip() == first[0].question
    assert rows[0].split("|")[3].strip().startswith(records[0]["reply"])
