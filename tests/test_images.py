"""load_image: every supported mode maps to the documented RGB values; every bad input raises ImageLoadError."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from unimodal.images import DEFAULT_MAX_PIXELS, ImageLoadError, load_image

WHITE = (255, 255, 255)


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def pixels(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height, with no pixel data (a decompression-bomb header)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


# ---------------------------------------------------------------------- modes
def test_rgb_and_grey_modes():
    rgb = Image.new("RGB", (3, 2), (10, 200, 30))
    out = load_image(rgb)
    assert out is not rgb and out.size == (3, 2)
    assert (pixels(out) == (10, 200, 30)).all()
    assert (pixels(load_image(Image.new("L", (2, 2), 128))) == 128).all()
    bilevel = Image.new("1", (2, 1), 0)
    bilevel.putpixel((1, 0), 1)
    assert pixels(load_image(bilevel)).tolist() == [[[0, 0, 0], [255, 255, 255]]]


def test_transparent_modes_are_composited_on_white():
    rgba = Image.new("RGBA", (3, 1), (200, 10, 20, 0))
    rgba.putpixel((1, 0), (200, 10, 20, 255))
    rgba.putpixel((2, 0), (0, 0, 0, 128))
    out = pixels(load_image(rgba))
    assert tuple(out[0, 0]) == WHITE
    assert tuple(out[0, 1]) == (200, 10, 20)
    assert np.abs(out[0, 2].astype(int) - 127).max() <= 1  # 255 · (1 - 128/255)

    la = Image.new("LA", (2, 1), (50, 0))
    la.putpixel((1, 0), (50, 255))
    assert pixels(load_image(la)).tolist() == [[list(WHITE), [50, 50, 50]]]


def test_palette_with_and_without_transparency(tmp_path):
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
    palette.putpixel((0, 0), 0)
    palette.putpixel((1, 0), 1)
    assert pixels(load_image(palette)).tolist() == [[[255, 0, 0], [0, 0, 255]]]

    path = tmp_path / "transparent.png"
    palette.save(path, transparency=0)  # palette index 0 fully transparent
    assert Image.open(path).mode == "P"
    assert pixels(load_image(path)).tolist() == [[list(WHITE), [0, 0, 255]]]


def test_cmyk():
    cmyk = Image.new("CMYK", (3, 1), (0, 0, 0, 0))
    cmyk.putpixel((1, 0), (255, 0, 0, 0))
    cmyk.putpixel((2, 0), (0, 0, 0, 255))
    assert pixels(load_image(cmyk)).tolist() == [[list(WHITE), [0, 255, 255], [0, 0, 0]]]


def sixteen_bit(mode: str, values: list[int]) -> Image.Image:
    fmt = ">H" if mode == "I;16B" else "<H"
    return Image.frombytes(mode, (len(values), 1), b"".join(struct.pack(fmt, v) for v in values))


@pytest.mark.parametrize("mode", ["I;16", "I;16B"])
def test_sixteen_bit_is_scaled_not_clipped(mode):
    # 65535 -> 255, 128·257 -> 128 (mid grey), 100·257 -> 100, 1000 -> round(3.89) = 4 (clipping would give 255)
    image = sixteen_bit(mode, [0, 65535, 128 * 257, 100 * 257, 1000])
    assert image.mode == mode
    assert pixels(load_image(image))[0, :, 0].tolist() == [0, 255, 128, 100, 4]


def test_sixteen_bit_png_file_round_trip():
    data = encode(sixteen_bit("I;16", [0, 65535, 128 * 257]))
    out = pixels(load_image(data))
    assert out[0].tolist() == [[0, 0, 0], [255, 255, 255], [128, 128, 128]]


def test_int32_mode_is_read_as_sixteen_bit():
    image = Image.new("I", (5, 1))
    for x, v in enumerate([-5, 0, 128 * 257, 65535, 70_000]):
        image.putpixel((x, 0), v)
    assert pixels(load_image(image))[0, :, 0].tolist() == [0, 0, 128, 255, 255]


def test_float_mode_is_unit_interval():
    image = Image.new("F", (4, 1))
    for x, v in enumerate([0.0, 0.2, 0.75, 1.0]):
        image.putpixel((x, 0), v)
    assert pixels(load_image(image))[0, :, 0].tolist() == [0, 51, 191, 255]
    image.putpixel((0, 0), 2.0)
    with pytest.raises(ImageLoadError, match=r"\[0, 1\]"):
        load_image(image)
    image.putpixel((0, 0), float("nan"))
    with pytest.raises(ImageLoadError, match="NaN"):
        load_image(image)


def test_multi_frame_file_uses_first_frame():
    frames = [Image.new("RGB", (4, 4), c) for c in ((255, 0, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert (pixels(load_image(data)) == (255, 0, 0)).all()


# ---------------------------------------------------------------------- numpy arrays
def test_numpy_layouts_and_dtypes():
    grey = np.array([[0, 128], [255, 7]], dtype=np.uint8)
    for array in (grey, grey[:, :, None]):
        out = pixels(load_image(array))
        assert out.shape == (2, 2, 3) and (out == grey[:, :, None]).all()
    rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    assert (pixels(load_image(rgb)) == rgb).all()
    rgba = np.zeros((1, 2, 4), dtype=np.uint8)
    rgba[0, 1] = (9, 8, 7, 255)
    assert pixels(load_image(rgba)).tolist() == [[list(WHITE), [9, 8, 7]]]
    floats = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    assert pixels(load_image(floats))[0, :, 0].tolist() == [0, 128, 255]
    noncontiguous = rgb[:, ::-1]
    assert (pixels(load_image(noncontiguous)) == noncontiguous).all()


@pytest.mark.parametrize(
    "array, message",
    [
        (np.zeros((2, 2, 2), dtype=np.uint8), "shape"),
        (np.zeros((1, 2, 2, 3), dtype=np.uint8), "shape"),
        (np.zeros(5, dtype=np.uint8), "shape"),
        (np.zeros((2, 2), dtype=np.int32), "dtype must be uint8 or floating point"),
        (np.zeros((2, 2), dtype=bool), "dtype"),
        (np.array([[0.0, np.nan]]), "NaN"),
        (np.array([[0.0, np.inf]]), "infinity"),
        (np.array([[-0.1, 0.5]]), r"range \[-0.1, 0.5\]"),
        (np.array([[0.0, 255.0]]), r"\[0, 1\]"),
    ],
)
def test_bad_arrays_raise(array, message):
    with pytest.raises(ImageLoadError, match=message) as info:
        load_image(array)
    assert "array shape=" in str(info.value)


# ---------------------------------------------------------------------- files, bytes and bad data
def test_path_and_bytes_sources(tmp_path):
    image = Image.new("RGB", (5, 4), (1, 2, 3))
    path = tmp_path / "ok.png"
    image.save(path)
    for source in (path, str(path), path.read_bytes(), bytearray(path.read_bytes())):
        out = load_image(source)
        assert out.size == (5, 4) and (pixels(out) == (1, 2, 3)).all()


def test_missing_empty_and_non_image_files(tmp_path):
    missing = tmp_path / "missing.png"
    with pytest.raises(ImageLoadError, match="file not found") as info:
        load_image(missing)
    assert str(missing) in str(info.value)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageLoadError, match="empty"):
        load_image(empty)
    with pytest.raises(ImageLoadError, match="not a regular file"):
        load_image(tmp_path)
    text = tmp_path / "notes.png"
    text.write_text("not an image at all")
    with pytest.raises(ImageLoadError, match="not a recognised image format"):
        load_image(text)
    with pytest.raises(ImageLoadError, match="0 bytes"):
        load_image(b"")
    with pytest.raises(ImageLoadError, match="URLs are not fetched"):
        load_image("https://example.com/cat.png")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP"])
def test_truncated_data_is_detected(fmt):
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), fmt)
    assert load_image(data).size == (32, 32)
    with pytest.raises(ImageLoadError, match="truncated"):
        load_image(data[: len(data) // 2])
    lazily_opened = Image.open(io.BytesIO(data[: len(data) // 2]))  # header fine, pixels missing
    with pytest.raises(ImageLoadError, match="truncated"):
        load_image(lazily_opened)


def test_decompression_bombs():
    data = encode(Image.new("RGB", (20, 20)))
    assert load_image(data, max_pixels=400).size == (20, 20)
    with pytest.raises(ImageLoadError, match="decompression bomb.*400 pixels exceeds max_pixels=399"):
        load_image(data, max_pixels=399)
    with pytest.raises(ImageLoadError, match="decompression bomb"):
        load_image(np.zeros((20, 20), dtype=np.uint8), max_pixels=100)
    # a header claiming 20000 x 20000 is refused before any pixel memory is allocated, by default ...
    bomb = png_header_only(20_000, 20_000)
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageLoadError, match="decompression bomb"):
        load_image(bomb)
    # ... and by PIL's own hard limit even without ours; PIL's global setting is left untouched
    with pytest.raises(ImageLoadError, match="decompression bomb"):
        load_image(bomb, max_pixels=None)
    assert Image.MAX_IMAGE_PIXELS == before
    assert DEFAULT_MAX_PIXELS == 2 * 89_478_485


def test_bad_arguments():
    with pytest.raises(TypeError, match="image source"):
        load_image(42)
    with pytest.raises(ValueError, match="max_pixels"):
        load_image(np.zeros((2, 2), dtype=np.uint8), max_pixels=0)
    assert issubclass(ImageLoadError, ValueError)
