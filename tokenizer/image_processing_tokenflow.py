"""Image processor of the TokenFlow tokenizer: files / PIL / numpy → normalised tensors, and back to PIL.

Resize modes (the reference uses each in one place):
- `center_crop`: the ADM rule used for the clipb tokenizer and text-to-image data — halve with BOX while the short side
  is at least twice the target, then BICUBIC so the short side equals the target, then a centre crop.
- `resize`: stretch to size x size with BICUBIC (the reference understanding pipeline).
- `pad`: pad to a square with `pad_color` (LLaVA's "pad" aspect mode), then stretch.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import torch
from PIL import Image
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature

from unimodal.images import load_image

from .configuration_tokenflow import RESIZE_MODES


def center_crop_arr(image: Image.Image, size: int) -> Image.Image:
    """ADM centre crop: BOX-halve while the short side ≥ 2·size, BICUBIC to short side = size, crop the centre."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    left = (image.size[0] - size) // 2
    top = (image.size[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


def pad_to_square(image: Image.Image, color: tuple[int, int, int]) -> Image.Image:
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), color)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


class TokenFlowImageProcessor(BaseImageProcessor):
    """Prepares images for [`TokenFlowTokenizer`]: any image → RGB → resize per `resize_mode` → [-1, 1] tensor.

    Call it like any transformers image processor: `processor(images, return_tensors="pt")["pixel_values"]`.
    Images may be paths, bytes, PIL images or numpy arrays; grayscale, palette, RGBA, CMYK and 16-bit images are
    converted (see `unimodal.images.load_image`), corrupt or empty files raise `ImageLoadError`.
    """

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        size: int = 64,
        resize_mode: str = "resize",
        image_mean: Iterable[float] = (0.5, 0.5, 0.5),
        image_std: Iterable[float] = (0.5, 0.5, 0.5),
        pad_color: Iterable[int] = (127, 127, 127),
        **kwargs: Any,
    ):
        # Bypass the backend machinery of BaseImageProcessor: this processor has one fixed pipeline.
        super(BaseImageProcessor, self).__init__(**kwargs)
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode={resize_mode!r}; allowed: {RESIZE_MODES}")
        if int(size) != size or size < 1:
            raise ValueError(f"size={size!r} must be a positive integer")
        self.size = int(size)
        self.resize_mode = resize_mode
        self.image_mean = [float(v) for v in image_mean]
        self.image_std = [float(v) for v in image_std]
        self.pad_color = [int(v) for v in pad_color]

    @classmethod
    def from_tokenizer_config(cls, config) -> "TokenFlowImageProcessor":
        """The processor matching a `TokenFlowConfig`."""
        return cls(size=config.image_size, resize_mode=config.resize_mode, image_mean=config.image_mean,
                   image_std=config.image_std)

    def resize(self, image: Image.Image) -> Image.Image:
        if self.resize_mode == "center_crop":
            return center_crop_arr(image, self.size)
        if self.resize_mode == "pad":
            image = pad_to_square(image, tuple(self.pad_color))
        if image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), resample=Image.BICUBIC)
        return image

    def to_tensor(self, image: Image.Image) -> torch.Tensor:
        """RGB PIL → [3, H, W] float, normalised with `image_mean`/`image_std` (0.5/0.5 gives [-1, 1])."""
        array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        mean = torch.tensor(self.image_mean).view(3, 1, 1)
        std = torch.tensor(self.image_std).view(3, 1, 1)
        return (array - mean) / std

    def preprocess(self, images: Any, return_tensors: str | None = "pt", **kwargs: Any) -> BatchFeature:
        """One image or a list of images → `BatchFeature(pixel_values=[B, 3, size, size])`."""
        if kwargs:
            raise TypeError(f"unexpected arguments {sorted(kwargs)}; TokenFlowImageProcessor takes images and "
                            "return_tensors only")
        if return_tensors not in ("pt", None):
            raise ValueError(f"return_tensors={return_tensors!r}; only 'pt' is supported")
        if not isinstance(images, (list, tuple)):
            images = [images]
        if len(images) == 0:
            raise ValueError("no images given")
        pixel_values = torch.stack([self.to_tensor(self.resize(load_image(image))) for image in images])
        return BatchFeature(data={"pixel_values": pixel_values}, tensor_type=None)

    def postprocess(self, pixel_values: torch.Tensor) -> list[Image.Image]:
        """[B, 3, H, W] (or [3, H, W]) in the normalised space → list of RGB PIL images.

        Uses the reference's rounding: uint8(clamp(127.5·x + 128, 0, 255)) for the default 0.5/0.5 normalisation.
        """
        if pixel_values.ndim == 3:
            pixel_values = pixel_values[None]
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"expected [B, 3, H, W] pixels, got {tuple(pixel_values.shape)}")
        mean = torch.tensor(self.image_mean, device=pixel_values.device).view(1, 3, 1, 1)
        std = torch.tensor(self.image_std, device=pixel_values.device).view(1, 3, 1, 1)
        unit = pixel_values.detach().float() * std + mean  # [0, 1]
        array = (unit * 255.0 + 0.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(a) for a in array]

    def to_dict(self) -> dict[str, Any]:
        out = super(BaseImageProcessor, self).to_dict()
        out.pop("_valid_kwargs_names", None)
        out.pop("_valid_processor_keys", None)
        return out

