"""Preprocessing: decoded sample -> model input, random in training, fixed for embedding.

Randomness comes from an explicit ``torch.Generator`` seeded per (step, index), so a resumed
run sees exactly the crops an uninterrupted run would have seen, whatever the worker count.
Functions that take ``cfg`` take the modality's recipe section (``multijepa.modalities.<name>``).
"""

from __future__ import annotations

import math
import platform
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

from multijepa.errors import DecodeError, require
from multijepa.readers import PointSet


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


def _native_uint8_resize() -> bool:
    # Where the CPU has the vector units for it, torch resizes uint8 images natively; elsewhere
    # through float32 (torchvision's rule, kept so that both give the same pixels).
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or platform.machine() in ("aarch64", "arm64")


def resize(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear, antialiased resize of images [..., C, H, W] (uint8 or float) to [..., C, height, width].

    The same pixels as torchvision's ``v2.functional.resize`` (tested equal), without importing
    torchvision, whose import costs every process about 1.5 s.
    """
    shape = x.shape
    if tuple(shape[-2:]) == (height, width):
        return x
    c, h, w = shape[-3:]
    flat = x.reshape(-1, c, h, w)
    native = flat.is_floating_point() or (flat.dtype == torch.uint8 and flat.device.type == "cpu"
                                          and _native_uint8_resize())
    out = F.interpolate(flat if native else flat.float(), size=[height, width], mode="bilinear",
                        align_corners=False, antialias=True)
    if not native:
        out = out.round_().to(x.dtype)
    return out.reshape(shape[:-2] + (height, width))


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """float [..., C, H, W] -> (x - mean) / std per channel."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return (x - m) / s


def rgb_to_gray(x: torch.Tensor) -> torch.Tensor:
    """[..., 3, H, W] -> [..., 1, H, W] of the same dtype, ITU-R 601 luma (0.2989 R + 0.587 G + 0.114 B)."""
    r, g, b = x.unbind(dim=-3)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(-3).to(x.dtype)


def crop_and_resize(x: torch.Tensor, size: int, crop_scale: tuple[float, float], hflip: bool,
                    g: Optional[torch.Generator]) -> torch.Tensor:
    """[..., H, W] -> [..., size, size], one geometry for every leading index (a video's frames).

    With a generator: a random resized crop and, if ``hflip``, a coin-flip mirror (training).
    Without: the short side resized to ``size`` and the centre cropped (embedding and probing).
    """
    h, w = x.shape[-2:]
    if g is not None:
        top, left, ch, cw = _random_resized_crop_box(h, w, crop_scale, g)
        x = resize(x[..., top:top + ch, left:left + cw], size, size)
        if hflip and torch.rand((), generator=g).item() < 0.5:
            x = x.flip(-1)
        return x
    if min(h, w) != size:  # the short side to size, the long one in proportion (truncated)
        x = resize(x, size, int(size * w / h)) if h <= w else resize(x, int(size * h / w), size)
    h, w = x.shape[-2:]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return x[..., top:top + size, left:left + size]


def image_transform(image: torch.Tensor, cfg: Any, g: Optional[torch.Generator]) -> torch.Tensor:
    """uint8 [C, H, W] -> normalised float [C, size, size] (random crop and flip with a generator; ``cfg``:
    the ``image`` section)."""
    out = crop_and_resize(image, cfg.size, cfg.crop_scale, cfg.hflip, g).float().div_(255.0)
    return normalize(out, cfg.mean, cfg.std)


def crop_or_pad(x: torch.Tensor, length: int, g: Optional[torch.Generator], pad_anywhere: bool = False
                ) -> torch.Tensor:
    """[C, S] -> [C, length] along the last axis: a window of a longer series or clip, or a shorter one
    padded with NaN (NaN marks padding: its tokens are left out of masks, attention and the loss).

    With a generator the window starts at random (training), else at 0. Padding goes at the end, or,
    with ``pad_anywhere`` and a generator, around the sample at a random offset (audio clips).

    >>> crop_or_pad(torch.ones(1, 3), 5, None).tolist()
    [[1.0, 1.0, 1.0, nan, nan]]
    """
    s = x.shape[1]
    if s == length:
        return x
    random = g is not None and (s > length or pad_anywhere)
    offset = int(torch.randint(0, abs(s - length) + 1, (1,), generator=g)) if random else 0
    if s > length:
        return x[:, offset:offset + length]
    return F.pad(x, (offset, length - s - offset), value=float("nan"))


def windows(x: torch.Tensor, length: int, hop: int, flush: bool, unit: int = 0) -> torch.Tensor:
    """[C, S] -> [W, C, length]: windows every ``hop`` samples covering the whole of ``x``.

    The last window ends flush with the last sample (``flush``: it overlaps its neighbour more) or
    reaches past it, NaN-padded. A sample shorter than ``length`` is one window: NaN-padded to
    ``length``, or, with ``unit`` > 0, only up to a whole multiple of ``unit`` samples (a time patch).

    >>> [w[0, 0].item() for w in windows(torch.arange(10.0)[None], 4, 4, flush=True)]
    [0.0, 4.0, 6.0]
    >>> windows(torch.arange(10.0)[None], 4, 4, flush=False)[-1, 0].tolist()
    [8.0, 9.0, nan, nan]
    """
    s = x.shape[1]
    if s < length:
        padded = -(-s // unit) * unit if unit > 0 else length
        return F.pad(x, (0, padded - s), value=float("nan")).unsqueeze(0)
    if flush:
        starts = list(range(0, s - length + 1, hop))
        if starts[-1] != s - length:
            starts.append(s - length)
        return torch.stack([x[:, a:a + length] for a in starts])
    count = 1 + math.ceil((s - length) / hop)
    total = length + (count - 1) * hop
    padded = F.pad(x, (0, total - s), value=float("nan")) if total > s else x
    return padded.unfold(1, length, hop).permute(1, 0, 2)  # a view: no copy of long files


def change_speed(wave: torch.Tensor, factor: float, sample_rate: int) -> torch.Tensor:
    """[C, S] -> [C, ~S / factor]: the clip played ``factor`` times faster (pitch moves with it), by resampling."""
    import numpy as np

    soxr = require("soxr", "audio speed augmentation")

    out = soxr.resample(wave.T.numpy(), round(sample_rate * factor), sample_rate, quality="HQ")
    return torch.from_numpy(np.ascontiguousarray(out.T, dtype=np.float32))


def audio_transform(wave: torch.Tensor, cfg: Any, g: Optional[torch.Generator]) -> torch.Tensor:
    """float [C, S] at cfg.sample_rate -> a model input (``cfg``: the ``audio`` section).

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
        return crop_or_pad(wave, cfg.clip_samples, g, pad_anywhere=True)
    return windows(wave, cfg.window_samples, cfg.window_hop_samples, flush=False,
                   unit=cfg.hop_length * cfg.patch_size[1])
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


def pointcloud_transform(points: PointSet, cfg: Any, g: Optional[torch.Generator],
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
