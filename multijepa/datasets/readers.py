"""Decoders: file or bytes -> tensor, raising :class:`DecodeError` that names the file.

Each modality lists its file extensions here; ``modality_of`` picks the modality of a path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

import torch
from torchvision.io import ImageReadMode, decode_image

from multijepa.errors import DecodeError

EXTENSIONS: dict[str, tuple[str, ...]] = {
    "image": (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"),
    "timeseries": (".ts", ".csv", ".npy", ".npz"),  # read by multijepa.datasets.series
}

Source = Union[str, Path, bytes]


def modality_of(path: Union[str, Path]) -> str:
    """The modality a file belongs to, from its extension.

    >>> modality_of("cat.JPG")
    'image'
    """
    suffix = Path(path).suffix.lower()
    for modality, exts in EXTENSIONS.items():
        if suffix in exts:
            return modality
    known = ", ".join(e for exts in EXTENSIONS.values() for e in exts)
    raise DecodeError(f"{path}: unknown file type {suffix or '(no extension)'!r}; multijepa reads {known}")


def _read_bytes(src: Source, name: str) -> bytes:
    if isinstance(src, bytes):
        data = src
    else:
        try:
            data = Path(src).read_bytes()
        except FileNotFoundError:
            raise DecodeError(f"{name}: no such file") from None
        except IsADirectoryError:
            raise DecodeError(f"{name}: is a folder, not a file") from None
        except OSError as e:
            raise DecodeError(f"{name}: cannot read ({e.strerror})") from None
    if not data:
        raise DecodeError(f"{name}: the file is empty (0 bytes); remove it or replace it with a valid file")
    return data


def _decode_with_pil(data: bytes, channels: int) -> torch.Tensor:
    import io

    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("L" if channels == 1 else "RGB")
        arr = np.asarray(im, dtype=np.uint8)
    t = torch.from_numpy(arr.copy())
    return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)


def read_image(src: Source, channels: int = 3, name: str = "") -> torch.Tensor:
    """Decode an image to uint8 [C, H, W] with C = ``channels``; grayscale, palette and RGBA are converted.

    Args:
        src: a path, or the encoded bytes (then ``name`` is used in errors).
        channels: 3 for RGB, 1 for grayscale.

    Raises:
        DecodeError: the file is missing, empty, truncated or not an image.

    >>> read_image("photo.png").shape  # doctest: +SKIP
    torch.Size([3, 480, 640])
    """
    name = name or str(src)
    data = _read_bytes(src, name)
    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    try:
        image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=mode)
    except (RuntimeError, ValueError) as first:
        # torchvision covers JPEG/PNG/WebP/GIF; PIL covers the rest (BMP, TIFF) and is stricter on truncation.
        try:
            image = _decode_with_pil(data, channels)
        except Exception:
            raise DecodeError(f"{name}: cannot decode as an image ({first}); the file is corrupt, "
                              f"truncated or not an image: remove it or re-export it") from None
    if image.ndim == 4:  # animated GIF: keep the first frame
        image = image[0]
    if image.shape[0] != channels:  # torchvision cannot convert some (WebP to grayscale): PIL can
        image = _decode_with_pil(data, channels)
    if image.shape[0] != channels or image.shape[1] == 0 or image.shape[2] == 0:
        raise DecodeError(f"{name}: decoded to an unusable image of shape {tuple(image.shape)}")
    return image
