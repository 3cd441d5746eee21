"""Per-modality preprocessing: decoded sample -> model input, random in training, fixed for embedding.

Randomness comes from an explicit ``torch.Generator`` seeded per (step, index), so a resumed
run sees exactly the crops an uninterrupted run would have seen, whatever the worker count.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torchvision.transforms.v2.functional as TF

import torch.nn.functional as F

from multijepa.recipe import AudioConfig, ImageConfig


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


def crop_or_pad_audio(wave: torch.Tensor, length: int, g: Optional[torch.Generator]) -> torch.Tensor:
    """[C, S] -> [C, length]: a crop of a longer clip or a zero-padded shorter one.

    With a generator the crop, or the clip's place inside the padding, is uniformly random
    (training); without one the crop starts at 0 and padding goes at the end.
    """
    s = wave.shape[1]
    if s == length:
        return wave
    offset = int(torch.randint(0, abs(s - length) + 1, (1,), generator=g)) if g is not None else 0
    if s > length:
        return wave[:, offset:offset + length]
    return F.pad(wave, (offset, length - s - offset))


def audio_windows(wave: torch.Tensor, window: int, hop: int, unit: int = 1) -> torch.Tensor:
    """[C, S] -> [W, C, L]: windows every ``hop`` samples covering the whole clip.

    A clip of at least one window gives W = 1 + ceil((S - window) / hop) windows of L = ``window``
    samples, the end zero-padded so the last window reaches past the last sample. A shorter clip
    gives one window of its own length, zero-padded only up to a multiple of ``unit`` samples (a whole
    time patch), so its embedding is not diluted by silence it never had.
    """
    s = wave.shape[1]
    if s < window:
        return F.pad(wave, (0, -(-s // unit) * unit - s)).unsqueeze(0)
    count = 1 + math.ceil((s - window) / hop)
    total = window + (count - 1) * hop
    padded = F.pad(wave, (0, total - s)) if total > s else wave
    return padded.unfold(1, window, hop).permute(1, 0, 2)  # a view: no copy of long files


def change_speed(wave: torch.Tensor, factor: float, sample_rate: int) -> torch.Tensor:
    """[C, S] -> [C, ~S / factor]: the clip played ``factor`` times faster (pitch moves with it), by resampling."""
    import numpy as np
    import soxr

    out = soxr.resample(wave.T.numpy(), round(sample_rate * factor), sample_rate, quality="HQ")
    return torch.from_numpy(np.ascontiguousarray(out.T, dtype=np.float32))


def audio_transform(wave: torch.Tensor, cfg: AudioConfig, g: Optional[torch.Generator]) -> torch.Tensor:
    """float [C, S] at cfg.sample_rate -> a model input.

    With a generator (training): speed perturbation by a factor drawn from ``speed_perturb``, then a
    random crop or padding to ``clip_seconds``, [C, clip_samples].
    Without (embedding): windows covering the whole file, [W, C, window_samples], or one shorter
    window for a file shorter than a window (padded to whole time patches).
    """
    if g is not None:
        low, high = cfg.speed_perturb
        if high > low or low != 1.0:
            factor = low + (high - low) * torch.rand((), generator=g).item()
            if wave.shape[1] > 1 and abs(factor - 1.0) > 1e-3:
                wave = change_speed(wave, factor, cfg.sample_rate)
        return crop_or_pad_audio(wave, cfg.clip_samples, g)
    return audio_windows(wave, cfg.window_samples, cfg.window_hop_samples, cfg.hop_length * cfg.patch_size[1])
