"""A small built-in image set for the demo and the tests: shapes of four classes.

Four classes (circle, square, triangle, cross) of random size and position, written as PNG files in
class sub-folders so it reads like any user's labelled folder: coloured shapes on noisy backgrounds
of random colour (the tests), or white shapes on black (``plain``: the demo, where the class is the
shape alone and nothing else varies but size and position).
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image

SHAPES = ("circle", "square", "triangle", "cross")


def _shape_mask(kind: str, size: int, cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dx, dy = xx - cx, yy - cy
    if kind == "circle":
        return dx**2 + dy**2 <= r**2
    if kind == "square":
        return (np.abs(dx) <= r * 0.85) & (np.abs(dy) <= r * 0.85)
    if kind == "triangle":
        return (dy <= r * 0.8) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)
    return ((np.abs(dx) <= r * 0.3) & (np.abs(dy) <= r)) | ((np.abs(dy) <= r * 0.3) & (np.abs(dx) <= r))


def make_shapes(out: Union[str, Path], per_class: int = 60, size: int = 32, seed: int = 0,
                plain: bool = False) -> Path:
    """Write ``per_class`` PNG images of each shape under ``out/<shape>/`` and return ``out``.

    ``plain``: white shapes on black, no colours and no noise.

    >>> make_shapes("/tmp/shapes", per_class=2)  # doctest: +SKIP
    PosixPath('/tmp/shapes')
    """
    rng = np.random.default_rng(seed)
    out = Path(out)
    for kind in SHAPES:
        (out / kind).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            background = rng.uniform(0, 1, 3)
            image = np.ones((size, size, 3), np.float32) * background
            image += rng.normal(0, 0.08, (size, size, 3))
            r = rng.uniform(size * 0.18, size * 0.34)
            cx, cy = rng.uniform(r, size - r, 2)
            if plain:  # after the same draws, so a seed gives the coloured set's shapes, sizes and places
                image = _shape_mask(kind, size, cx, cy, r).astype(np.uint8) * 255
                Image.fromarray(image).convert("RGB").save(out / kind / f"{kind}_{i:04d}.png")
                continue
            color = (background + rng.uniform(0.35, 0.65, 3)) % 1.0  # always far from the background
            image[_shape_mask(kind, size, cx, cy, r)] = color
            Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8)).save(out / kind / f"{kind}_{i:04d}.png")
    return out
