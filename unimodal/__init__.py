"""Single-modality building blocks: vision towers, the VQGAN pixel CNN, image loading, ShapesWorld."""

from .images import ImageLoadError, load_image
from .pos_embed import resize_patch_pos_embed
from .vision_towers import (
    OpenAIClipVisionTower, OpenClipVisionTower, SiglipVisionTower, VisionTower, build_vision_tower,
)
from .vqgan import PixelDecoder, PixelEncoder

__all__ = [
    "ImageLoadError", "OpenAIClipVisionTower", "OpenClipVisionTower", "PixelDecoder", "PixelEncoder",
    "SiglipVisionTower", "VisionTower", "build_vision_tower", "load_image", "resize_patch_pos_embed",
]
