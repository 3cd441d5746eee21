"""Per-modality preprocessing: decoded sample -> model input, random in training, fixed for embedding.

Randomness comes from an explicit ``torch.Generator`` seeded per (step, index), so a resumed
run sees exactly the crops an uninterrupted run would have seen, whatever the worker count.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import torch
import torchvision.transforms.v2.functional as TF

import torch.nn.functional as F

from multijepa.errors import DecodeError
from multijepa.recipe import AudioConfig, ImageConfig, PointCloudConfig

if TYPE_CHECKING:
    from multijepa.datasets.readers import PointSet


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


def crop_and_resize(x: torch.Tensor, size: int, crop_scale: tuple[float, float], hflip: bool,
                    g: Optional[torch.Generator]) -> torch.Tensor:
    """[..., H, W] -> [..., size, size], one geometry for every leading index (a video's frames).

    With a generator: a random resized crop and, if ``hflip``, a coin-flip mirror (training).
    Without: the short side resized to ``size`` and the centre cropped (embedding and probing).
    """
    h, w = x.shape[-2:]
    if g is not None:
        top, left, ch, cw = _random_resized_crop_box(h, w, crop_scale, g)
        x = TF.resized_crop(x, top, left, ch, cw, [size, size], antialias=True)
        if hflip and torch.rand((), generator=g).item() < 0.5:
            x = TF.horizontal_flip(x)
        return x
    if min(h, w) != size:
        x = TF.resize(x, [size], antialias=True)
    return TF.center_crop(x, [size, size])


def image_transform(image: torch.Tensor, cfg: ImageConfig, g: Optional[torch.Generator]) -> torch.Tensor:
    """uint8 [C, H, W] -> normalised float [C, size, size] (random crop and flip with a generator)."""
    out = crop_and_resize(image, cfg.size, cfg.crop_scale, cfg.hflip, g).float().div_(255.0)
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
    """[C, S] -> [C, length]: a crop of a longer clip or a shorter one padded with NaN (NaN marks
    padding: its tokens are left out of masks, attention and the loss, see ``audio_valid_tokens``).

    With a generator the crop, or the clip's place inside the padding, is uniformly random
    (training); without one the crop starts at 0 and padding goes at the end.

    >>> crop_or_pad_audio(torch.ones(1, 2), 3, None).tolist()
    [[1.0, 1.0, nan]]
    """
    s = wave.shape[1]
    if s == length:
        return wave
    offset = int(torch.randint(0, abs(s - length) + 1, (1,), generator=g)) if g is not None else 0
    if s > length:
        return wave[:, offset:offset + length]
    return F.pad(wave, (offset, length - s - offset), value=float("nan"))


def audio_windows(wave: torch.Tensor, window: int, hop: int, unit: int = 1) -> torch.Tensor:
    """[C, S] -> [W, C, L]: windows every ``hop`` samples covering the whole clip.

    A clip of at least one window gives W = 1 + ceil((S - window) / hop) windows of L = ``window``
    samples, the end padded (NaN) so the last window reaches past the last sample. A shorter clip
    gives one window of its own length, padded only up to a multiple of ``unit`` samples (a whole
    time patch). Padding tokens are left out of the pooled embedding.
    """
    s = wave.shape[1]
    if s < window:
        return F.pad(wave, (0, -(-s // unit) * unit - s), value=float("nan")).unsqueeze(0)
    count = 1 + math.ceil((s - window) / hop)
    total = window + (count - 1) * hop
    padded = F.pad(wave, (0, total - s), value=float("nan")) if total > s else wave
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
        # A clip shorter than two time patches keeps a little silence as real: masking needs two tokens.
        shortest = min(2 * cfg.hop_length * cfg.patch_size[1], cfg.clip_samples)
        if wave.shape[1] < shortest:
            wave = F.pad(wave, (0, shortest - wave.shape[1]))
        return crop_or_pad_audio(wave, cfg.clip_samples, g)
    return audio_windows(wave, cfg.window_samples, cfg.window_hop_samples, cfg.hop_length * cfg.patch_size[1])
# --------------------------------------------------------------------------- point clouds


def _uniform(low: float, high: float, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=g)


def normalize_points(xyz: torch.Tensor) -> torch.Tensor:
    """Centre on the centroid and scale into the unit sphere: [P, 3] -> [P, 3] with max norm 1.

    >>> normalize_points(torch.tensor([[0.0, 0, 0], [4.0, 0, 0]])).tolist()
    [[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]
    """
    xyz = xyz - xyz.mean(0)
    return xyz / xyz.norm(dim=1).max().clamp_min(1e-12)


def resample_points(n_in: int, n_out: int, g: torch.Generator) -> torch.Tensor:
    """Indices [n_out] into n_in points: a random subset, or every point plus random repeats when too few."""
    if n_in >= n_out:
        return torch.randperm(n_in, generator=g)[:n_out]
    extra = torch.randint(0, n_in, (n_out - n_in,), generator=g)
    return torch.cat([torch.randperm(n_in, generator=g), extra])


def up_axis_rotation(angle: float, up: int) -> torch.Tensor:
    """The [3, 3] matrix rotating by ``angle`` radians about axis ``up`` (0, 1 or 2)."""
    c, s = math.cos(angle), math.sin(angle)
    a, b = [i for i in range(3) if i != up]
    rot = torch.eye(3)
    rot[a, a], rot[a, b], rot[b, a], rot[b, b] = c, -s, s, c
    return rot


def pointcloud_transform(points: PointSet, cfg: PointCloudConfig, g: Optional[torch.Generator],
                         name: str = "") -> torch.Tensor:
    """Points read from a file -> the model input [num_points, 3 + F]: xyz, then the kept features.

    Always: centre and scale to the unit sphere, then take ``num_points`` points (a random subset,
    or repeats when the file has fewer). With a generator (training) also: point dropout (drop up
    to ``dropout`` of the points, refilled with repeats of kept ones), a random rotation about the
    up axis, per-axis scaling and clipped Gaussian jitter. Without one (embedding) the subset is
    fixed, so a file always embeds the same way. Normals follow rotation and scaling; colours stay.
    """
    xyz = normalize_points(points.xyz)
    channels = [xyz]
    for feature in cfg.features:
        values = points.normals if feature == "normals" else points.colors
        if values is None:
            raise DecodeError(f"{name}: the file has no {feature}, but pointcloud.features asks for them; "
                              f"remove '{feature}' from pointcloud.features or supply files with {feature}")
        channels.append(values)
    x = torch.cat(channels, dim=1)
    rng = g if g is not None else torch.Generator().manual_seed(0)
    x = x[resample_points(len(x), cfg.num_points, rng)]
    if g is None:
        return x.contiguous()
    if cfg.dropout > 0:
        keep = max(1, round(cfg.num_points * (1.0 - cfg.dropout * torch.rand((), generator=g).item())))
        x = x[:keep][resample_points(keep, cfg.num_points, g)]
    xyz = x[:, :3]
    n0 = 3 + 3 * cfg.features.index("normals") if "normals" in cfg.features else None
    normals = x[:, n0:n0 + 3] if n0 is not None else None
    if cfg.rotate:
        rot = up_axis_rotation(2 * math.pi * torch.rand((), generator=g).item(), "xyz".index(cfg.up_axis))
        xyz = xyz @ rot.T
        normals = normals @ rot.T if normals is not None else None
    scale = _uniform(cfg.scale[0], cfg.scale[1], (3,), g)
    xyz = xyz * scale
    if normals is not None:  # a surface scaled by S has normals along S^-1 n
        normals = torch.nn.functional.normalize(normals / scale, dim=1)
    if cfg.jitter > 0:
        xyz = xyz + (torch.randn(xyz.shape, generator=g) * cfg.jitter).clamp(-3 * cfg.jitter, 3 * cfg.jitter)
    x = x.clone()
    x[:, :3] = xyz
    if normals is not None:
        x[:, n0:n0 + 3] = normals
    return x
