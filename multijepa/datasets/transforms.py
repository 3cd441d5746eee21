"""Per-modality preprocessing: decoded sample -> model input, random in training, fixed for embedding.

Randomness comes from an explicit ``torch.Generator`` seeded per (step, index), so a resumed
run sees exactly the crops an uninterrupted run would have seen, whatever the worker count.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torchvision.transforms.v2.functional as TF

from multijepa.recipe import ImageConfig


def _random_resized_crop_box(h: int, w: int, scale: tuple[float, float], g: torch.Generator,
                             ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random crop covering ``scale`` of the area (torchvision's rule)."""
    area = h * w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * (scale[0] + (scale[1] - scale[0]) * torch.rand((), generator=g).item())
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * torch.rand((), generator=g).item())
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(torch.randint(0, h - ch + 1, (1,), generator=g))
            left = int(torch.randint(0, w - cw + 1, (1,), generator=g))
            return top, left, ch, cw
    side = min(h, w)  # fall back to a centre crop
    return (h - side) // 2, (w - side) // 2, side, side


def image_transform(image: torch.Tensor, cfg: ImageConfig, g: Optional[torch.Generator]) -> torch.Tensor:
    """uint8 [C, H, W] -> normalised float [C, size, size].

    With a generator: random resized crop + horizontal flip (training). Without: resize the short
    side to ``size`` and centre-crop (embedding and probing).
    """
    c, h, w = image.shape
    if g is not None:
        top, left, ch, cw = _random_resized_crop_box(h, w, cfg.crop_scale, g)
        out = TF.resized_crop(image, top, left, ch, cw, [cfg.size, cfg.size], antialias=True)
        if cfg.hflip and torch.rand((), generator=g).item() < 0.5:
            out = TF.horizontal_flip(out)
    else:
        out = TF.center_crop(TF.resize(image, [cfg.size], antialias=True), [cfg.size, cfg.size])
    out = out.float().div_(255.0)
    return TF.normalize(out, list(cfg.mean), list(cfg.std))


def crop_or_pad(series: torch.Tensor, length: int, g: Optional[torch.Generator]) -> torch.Tensor:
    """float [C, L] -> [C, length]: a window of a longer series (random with a generator, else the
    start), or a shorter one padded with NaN at the end (NaN marks padding for the tokenizer).

    >>> crop_or_pad(torch.ones(1, 3), 5, None).tolist()
    [[1.0, 1.0, 1.0, nan, nan]]
    """
    c, n = series.shape
    if n >= length:
        start = int(torch.randint(0, n - length + 1, (1,), generator=g)) if g is not None else 0
        return series[:, start:start + length]
    return torch.cat([series, series.new_full((c, length - n), float("nan"))], dim=1)


def series_windows(series: torch.Tensor, length: int, hop: int) -> list[torch.Tensor]:
    """All windows [C, length] of a series [C, L], every ``hop`` samples, the last one flush with the
    end so the tail is covered; one NaN-padded window when the series is not longer than ``length``.

    >>> [w[0, 0].item() for w in series_windows(torch.arange(10.0)[None], 4, 3)]
    [0.0, 3.0, 6.0]
    """
    n = series.shape[1]
    if n <= length:
        return [crop_or_pad(series, length, None)]
    starts = list(range(0, n - length + 1, hop))
    if starts[-1] != n - length:
        starts.append(n - length)
    return [series[:, s:s + length] for s in starts]
