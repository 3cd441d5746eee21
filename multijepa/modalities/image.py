"""Images: the ``image`` recipe section, and images as 2D patch tokens with (row, col) coords.

>>> from multijepa.modalities import MODALITIES
>>> MODALITIES["image"].token_grid(ImageConfig(size=32, patch_size=4))
(8, 8)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Union

import torch

from multijepa.errors import check, check_range
from multijepa.readers import IMAGE_EXTENSIONS, read_image
from multijepa.spec import ModalitySpec, Source
from multijepa.tokenizers.image import image_tokenizer
from multijepa.transforms import image_transform


@dataclass(frozen=True)
class ImageConfig:
    """Image decoding, augmentation and the 2D patch tokenizer."""

    size: int = 32  # square side in pixels after cropping
    channels: Literal[1, 3] = 3
    patch_size: int = 4
    crop_scale: tuple[float, float] = (0.3, 1.0)  # RandomResizedCrop area range in training
    hflip: bool = True
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)


def validate_image(im: ImageConfig, where: str) -> None:
    check(im.patch_size > 0 and im.size % im.patch_size == 0, where, "image.patch_size",
          f"must divide image.size={im.size}, got {im.patch_size}")
    check(len(im.mean) == im.channels and len(im.std) == im.channels, where, "image.mean",
          f"image.mean and image.std need {im.channels} values (one per channel)")
    check_range(im.crop_scale, where, "image.crop_scale", 0.01, 1.0)


def image_grid(im: ImageConfig) -> tuple[int, int]:
    """(rows, cols) of patches, e.g. (8, 8) for 32 px in 4 px patches."""
    side = im.size // im.patch_size
    return (side, side)


def _load(src: Source, im: ImageConfig, name: str, part: Optional[int], g: Optional[torch.Generator]) -> torch.Tensor:
    return image_transform(read_image(src, im.channels, name), im, g)


def _from_tensor(x: torch.Tensor, im: ImageConfig, g: Optional[torch.Generator]) -> torch.Tensor:
    """A raw image uint8 [C, H, W] (or float in [0, 1]) as a training input."""
    if x.is_floating_point():
        x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    return image_transform(x, im, g)


def _embed_views(item: Union[Source, torch.Tensor], im: ImageConfig, name: str) -> list[list[torch.Tensor]]:
    """One view: the centre crop (a tensor is taken as a preprocessed image [C, H, W])."""
    if isinstance(item, torch.Tensor):
        return [[item]]
    return [[image_transform(read_image(item, im.channels, name), im, None)]]


SPEC = ModalitySpec(
    name="image", config=ImageConfig, extensions=IMAGE_EXTENSIONS, validate=validate_image,
    tokenizer=lambda im, dim: image_tokenizer(im.channels, im.patch_size, dim),
    load=_load, from_tensor=_from_tensor, embed_views=_embed_views, token_grid=image_grid)
