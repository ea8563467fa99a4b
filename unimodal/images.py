"""Loading and validating images: anything image-like in, a fully decoded 8-bit RGB `PIL.Image` out.

`load_image` accepts a file path, encoded bytes, a `PIL.Image` or a numpy array, and raises `ImageLoadError`
(a `ValueError`) naming the source and the reason for anything it cannot turn into a trustworthy RGB image:
missing or empty files, undecodable, corrupt or truncated data, decompression bombs, unsupported modes or arrays.

Mode mapping (what "RGB 8-bit" means for each PIL mode):
- RGB: unchanged. L, 1 (0 → 0, 1 → 255), P without transparency, CMYK, YCbCr, LAB, HSV: PIL's own conversion
  (CMYK is converted naively; embedded ICC profiles are not applied).
- Transparent images (RGBA, LA, PA, RGBa, La, and any mode with a `transparency` entry such as P with a transparent
  palette index) are alpha-composited on a **white** background: fully transparent pixels become (255, 255, 255),
  opaque ones keep their colour.
- 16-bit grey (I;16, I;16L, I;16B, I;16N): scaled, not clipped: v → round(v · 255 / 65535), so 65535 → 255.
- I (32-bit signed int): treated as 16-bit data (PIL opens some 16-bit files in this mode): values are clipped to
  [0, 65535] and then scaled like I;16.
- F (32-bit float): intensities in [0, 1], scaled like float arrays; values outside [0, 1] or not finite raise.

numpy arrays: `[H, W]`, `[H, W, 1]` (grey), `[H, W, 3]` (RGB) or `[H, W, 4]` (RGBA, composited on white), dtype uint8
(used as is) or floating point with every value in [0, 1] (v → round(255 · v)).

The first frame of multi-frame files is used. EXIF orientation is not applied (as in torchvision/Hugging Face
pipelines). Global PIL settings are never changed; if `PIL.ImageFile.LOAD_TRUNCATED_IMAGES` was set elsewhere,
truncated files can no longer be detected.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np
from PIL import Image

# PIL refuses images above 2 × Image.MAX_IMAGE_PIXELS (178,956,970 pixels with its defaults); we use the same limit.
DEFAULT_MAX_PIXELS = 178_956_970

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray]

TRANSPARENT_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")

# what decoders raise on data they cannot parse (PIL plugins use all of these)
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError)


class ImageLoadError(ValueError):
    """An image could not be loaded; `source` describes the input, `reason` says why."""

    def __init__(self, source: object, reason: str):
        self.source = describe_source(source)
        self.reason = reason
        super().__init__(f"cannot load image {self.source}: {reason}")


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def list_image_files(folder: str | os.PathLike) -> list[Path]:
    """Every image file under `folder` (recursive, sorted); a folder without any raises."""
    paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ValueError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) under {str(folder)!r}")
    return paths


def describe_source(source: object) -> str:
    """A short human-readable name for an image source (paths verbatim, data by size)."""
    if isinstance(source, str):
        return repr(source)
    if isinstance(source, os.PathLike):
        return repr(os.fspath(source))
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    if isinstance(source, Image.Image):
        return f"<PIL image mode={source.mode} size={source.width}x{source.height}>"
    if isinstance(source, np.ndarray):
        return f"<array shape={tuple(source.shape)} dtype={source.dtype}>"
    return f"<{type(source).__name__}>"


def load_image(source: ImageSource, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Load `source` as a new, fully decoded 8-bit RGB image.

    Args:
        source: a file path, encoded image bytes, a `PIL.Image.Image` or a numpy array (see the module docstring).
        max_pixels: largest accepted width × height (checked from the header, before decoding); None for no limit
            of our own. PIL's hard limit (2 × `PIL.Image.MAX_IMAGE_PIXELS`) still applies to encoded data.

    Raises:
        ImageLoadError: the source is missing, empty, not an image, corrupt, truncated, too large or of an
            unsupported kind.
        TypeError: `source` is of an unsupported Python type.
    """
    if max_pixels is not None and (isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1):
        raise ValueError(f"max_pixels must be a positive int or None, got {max_pixels!r}")

    if isinstance(source, Image.Image):
        check_pixel_count(source, source.size, max_pixels)
        decode(source, source)
        return to_rgb(source, source)
    if isinstance(source, np.ndarray):
        if source.ndim >= 2:
            check_pixel_count(source, (source.shape[1], source.shape[0]), max_pixels)
        return to_rgb(image_from_array(source), source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ImageLoadError(source, "no data (0 bytes)")
        return open_and_convert(io.BytesIO(bytes(source)), source, max_pixels)
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        if path.startswith(("http://", "https://")):
            raise ImageLoadError(source, "URLs are not fetched; download the file and pass its path")
        if not os.path.exists(path):
            raise ImageLoadError(source, "file not found")
        if not os.path.isfile(path):
            raise ImageLoadError(source, "not a regular file")
        if os.path.getsize(path) == 0:
            raise ImageLoadError(source, "file is empty (0 bytes)")
        with open(path, "rb") as fp:
            return open_and_convert(fp, source, max_pixels)
    raise TypeError(
        "image source must be a path, bytes, a PIL.Image.Image or a numpy.ndarray, "
        f"got {type(source).__name__}"
    )


def open_and_convert(fp: BinaryIO, source: object, max_pixels: int | None) -> Image.Image:
    """Open encoded data, check its size from the header, decode all of it and convert it to RGB."""
    try:
        # our own limit decides, so PIL's softer warning threshold is silenced for this call only
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(fp)
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(source, f"decompression bomb: {exc}") from exc
    except Image.UnidentifiedImageError as exc:
        raise ImageLoadError(source, "not a recognised image format (or the header is corrupt)") from exc
    except DECODE_ERRORS as exc:
        raise ImageLoadError(source, f"corrupt image header ({type(exc).__name__}: {exc})") from exc
    with image:
        check_pixel_count(source, image.size, max_pixels)
        decode(image, source)
        return to_rgb(image, source)


def check_pixel_count(source: object, size: tuple[int, int], max_pixels: int | None) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise ImageLoadError(source, f"image has no pixels ({width}x{height})")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageLoadError(
            source,
            f"decompression bomb: {width}x{height} = {width * height} pixels exceeds max_pixels={max_pixels}",
        )


def decode(image: Image.Image, source: object) -> None:
    """Force a full decode so that truncated or corrupt pixel data fails here, not later."""
    try:
        image.load()
    except DECODE_ERRORS as exc:
        raise ImageLoadError(source, f"corrupt or truncated image data ({type(exc).__name__}: {exc})") from exc


def image_from_array(array: np.ndarray) -> Image.Image:
    """`[H, W]`, `[H, W, 1]`, `[H, W, 3]` or `[H, W, 4]` uint8 / float-in-[0, 1] array -> L, RGB or RGBA image."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise ImageLoadError(array, "array must have shape [H, W], [H, W, 1], [H, W, 3] or [H, W, 4]")
    if array.dtype == np.uint8:
        pixels = array
    elif np.issubdtype(array.dtype, np.floating):
        pixels = unit_float_to_uint8(array, array)
    else:
        raise ImageLoadError(array, f"array dtype must be uint8 or floating point in [0, 1], got {array.dtype}")
    return Image.fromarray(np.ascontiguousarray(pixels))  # uint8 [H, W] -> L, [H, W, 3] -> RGB, [H, W, 4] -> RGBA


def unit_float_to_uint8(values: np.ndarray, source: object) -> np.ndarray:
    """Float intensities in [0, 1] -> uint8 by round(255 · v); NaN, ±inf or values outside [0, 1] raise."""
    values = values.astype(np.float64)
    if not np.isfinite(values).all():
        raise ImageLoadError(source, "float pixel values contain NaN or infinity")
    low, high = float(values.min()), float(values.max())
    if low < 0.0 or high > 1.0:
        raise ImageLoadError(source, f"float pixel values must lie in [0, 1], got range [{low:g}, {high:g}]")
    return np.rint(values * 255.0).astype(np.uint8)


def sixteen_bit_to_uint8(values: np.ndarray) -> np.ndarray:
    """Integers in [0, 65535] -> uint8 by round(v · 255 / 65535) = round(v / 257)."""
    return np.rint(values.astype(np.float64) / 257.0).astype(np.uint8)


def composite_on_white(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def to_rgb(image: Image.Image, source: object) -> Image.Image:
    """A new 8-bit RGB image from a decoded image of any mode (mapping in the module docstring)."""
    mode = image.mode
    if mode in TRANSPARENT_MODES or "transparency" in image.info:
        return composite_on_white(image)
    if mode in SIXTEEN_BIT_MODES:
        return Image.fromarray(sixteen_bit_to_uint8(np.asarray(image))).convert("RGB")
    if mode == "I":
        return Image.fromarray(sixteen_bit_to_uint8(np.clip(np.asarray(image), 0, 65535))).convert("RGB")
    if mode == "F":
        return Image.fromarray(unit_float_to_uint8(np.asarray(image), source)).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as exc:
        raise ImageLoadError(source, f"unsupported image mode {mode!r} ({exc})") from exc
