"""Video: the ``video`` recipe section, and clips as 3D tubelet tokens with (t, row, col) coords.

Decoding goes through decord, or PyAV where decord is missing or cannot time the file
(:mod:`multijepa.readers.video`). Training takes one clip at a random start; embedding pools
``embed_clips`` clips spread evenly over the video.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional, Union

import numpy as np
import torch

from multijepa.errors import check, check_range
from multijepa.readers import Source
from multijepa.readers.video import VIDEO_EXTENSIONS, open_video
from multijepa.spec import ModalitySpec
from multijepa.tokenizers.video import video_tokenizer
from multijepa.transforms import crop_and_resize, normalize, rgb_to_gray


@dataclass(frozen=True)
class VideoConfig:
    """Video decoding, clip sampling, augmentation and the 3D tubelet tokenizer.

    A clip is ``frames`` frames, every ``frame_stride``-th frame of the file, or, with ``fps`` > 0,
    the frames shown at ``fps`` sampling times (by timestamp, so variable frame rates work). Training
    takes one clip at a random start; ``embed`` pools ``embed_clips`` clips spread evenly over the file.
    """

    frames: int = 8  # frames per clip
    frame_stride: int = 2  # take every k-th frame (when fps is 0)
    fps: float = 0.0  # > 0: sample frames at this rate by their timestamps instead of frame_stride
    size: int = 64  # square side in pixels after cropping
    channels: Literal[1, 3] = 3
    tubelet_size: int = 2  # frames per token
    patch_size: int = 16  # pixels per token side: tokens are tubelet_size x patch_size x patch_size
    crop_scale: tuple[float, float] = (0.3, 1.0)  # training: one random resized crop per clip (area range)
    hflip: bool = True  # training: flip a clip's frames left-right with probability 0.5
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    backend: Literal["auto", "decord", "pyav"] = "auto"  # auto: decord where installed, else PyAV
    embed_clips: int = 4  # embed: clips spread evenly over a video, pooled (fewer for a short video)


def validate_video(v: VideoConfig, where: str) -> None:
    check(v.frames >= 1, where, "video.frames", "must be at least 1")
    check(v.tubelet_size >= 1 and v.frames % v.tubelet_size == 0, where, "video.tubelet_size",
          f"must divide video.frames={v.frames} (tokens are tubelet_size frames deep), got {v.tubelet_size}")
    check(v.patch_size >= 1 and v.size % v.patch_size == 0, where, "video.patch_size",
          f"must divide video.size={v.size}, got {v.patch_size}")
    check(v.frame_stride >= 1, where, "video.frame_stride", "must be at least 1 (1 = every frame)")
    check(v.fps >= 0, where, "video.fps", "must be 0 (use video.frame_stride) or a positive rate")
    check(v.embed_clips >= 1, where, "video.embed_clips", "must be at least 1")
    check(len(v.mean) == v.channels and len(v.std) == v.channels, where, "video.mean",
          f"video.mean and video.std need {v.channels} values (one per channel)")
    check_range(v.crop_scale, where, "video.crop_scale", 0.01, 1.0)


# --------------------------------------------------------------------------- clip sampling


def clip_span(cfg: VideoConfig) -> float:
    """A clip's length: in frames (frame_stride mode) or in seconds (fps mode)."""
    return (cfg.frames - 1) / cfg.fps if cfg.fps > 0 else float((cfg.frames - 1) * cfg.frame_stride + 1)


def clip_indices(timestamps: np.ndarray, cfg: VideoConfig, start: float) -> list[int]:
    """The ``cfg.frames`` frame indices of a clip starting at frame ``start`` (stride mode) or at
    ``start`` seconds (fps mode: the frame shown at each sampling time, so variable frame rates work).
    Past the end of the video the last frame repeats.

    >>> clip_indices(np.arange(10) / 25, VideoConfig(frames=4, frame_stride=3), 2)
    [2, 5, 8, 9]
    >>> clip_indices(np.array([0, .04, .12, .16, .24]), VideoConfig(frames=4, fps=10), 0.0)
    [0, 1, 3, 4]
    """
    n = len(timestamps)
    if cfg.fps > 0:
        times = start + np.arange(cfg.frames) / cfg.fps
        idx = np.searchsorted(timestamps, times + 1e-6, side="right") - 1
        return [int(i) for i in np.clip(idx, 0, n - 1)]
    return [min(int(start) + k * cfg.frame_stride, n - 1) for k in range(cfg.frames)]


def clip_starts(timestamps: np.ndarray, cfg: VideoConfig, count: int,
                g: Optional[torch.Generator] = None) -> list[float]:
    """Clip starts: one uniformly random start with a generator (training), else up to ``count``
    evenly spread starts covering the video from its first to its last frame (embedding)."""
    if cfg.fps > 0:
        last = max(0.0, float(timestamps[-1]) - clip_span(cfg))
    else:
        last = float(max(0, len(timestamps) - int(clip_span(cfg))))
    if g is not None:
        if cfg.fps > 0:
            return [last * torch.rand((), generator=g).item()]
        return [float(torch.randint(0, int(last) + 1, (1,), generator=g))]
    if last == 0:
        return [0.0]
    starts = np.linspace(0.0, last, count)
    return list(dict.fromkeys(starts.tolist() if cfg.fps > 0 else np.round(starts).tolist()))


# --------------------------------------------------------------------------- transform


def decode_short_side(cfg: VideoConfig, train: bool) -> int:
    """The short side frames are decoded at: ``size`` for embedding; in training enough that the
    smallest random crop still has ``size`` pixels (frames are never decoded at full 1080p)."""
    return math.ceil(cfg.size / math.sqrt(cfg.crop_scale[0])) if train else cfg.size


def clip_transform(frames: np.ndarray, cfg: VideoConfig, g: Optional[torch.Generator]) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> normalised float [C, T, size, size].

    With a generator: one random resized crop and flip for every frame of the clip (training).
    Without: resize the short side to ``size`` and centre-crop.
    """
    x = torch.from_numpy(frames).permute(0, 3, 1, 2)  # [T, 3, H, W]
    if cfg.channels == 1:
        x = rgb_to_gray(x)
    x = crop_and_resize(x, cfg.size, cfg.crop_scale, cfg.hflip, g)  # one geometry for the whole clip
    x = normalize(x.float().div_(255.0), cfg.mean, cfg.std)
    return x.transpose(0, 1).contiguous()  # [C, T, size, size]


def read_clips(src: Source, cfg: VideoConfig, name: str = "", g: Optional[torch.Generator] = None,
               count: int = 1) -> list[torch.Tensor]:
    """Decode and transform clips of one video: one random clip with a generator (training), else
    up to ``count`` evenly spread clips (embedding), each float [C, frames, size, size].

    Frames are decoded one clip at a time and only those the clip samples, so memory is bounded by
    one clip whatever the length or resolution of the video.

    >>> [c.shape for c in read_clips("clip.mp4", VideoConfig(), count=2)]  # doctest: +SKIP
    [torch.Size([3, 8, 64, 64]), torch.Size([3, 8, 64, 64])]
    """
    name = name or str(src)
    with open_video(src, name, cfg.backend, decode_short_side(cfg, g is not None)) as video:
        return [clip_transform(video.read(clip_indices(video.timestamps, cfg, s)), cfg, g)
                for s in clip_starts(video.timestamps, cfg, count, g)]


def video_grid(v: VideoConfig) -> tuple[int, int, int]:
    """(t, rows, cols) of tubelets, e.g. (4, 4, 4) for 8 frames of 64 px in 2 x 16 x 16 tubelets."""
    side = v.size // v.patch_size
    return (v.frames // v.tubelet_size, side, side)


def _load(src: Source, v: VideoConfig, name: str, part: Optional[int], g: Optional[torch.Generator]) -> torch.Tensor:
    return read_clips(src, v, name, g)[0]


def _embed_views(item: Union[Source, torch.Tensor], v: VideoConfig, name: str) -> list[list[torch.Tensor]]:
    """Clips spread evenly over a video (``video.embed_clips``); a tensor is one clip [C, T, H, W] or
    several [K, C, T, H, W]."""
    if isinstance(item, torch.Tensor):
        return [list(item if item.ndim == 5 else item[None])]
    return [read_clips(item, v, name, None, v.embed_clips)]


SPEC = ModalitySpec(
    name="video", config=VideoConfig, extensions=VIDEO_EXTENSIONS, validate=validate_video,
    tokenizer=lambda v, dim: video_tokenizer(v.channels, v.tubelet_size, v.patch_size, dim),
    load=_load, from_tensor=lambda x, v, g: x.float(), embed_views=_embed_views, token_grid=video_grid,
    window_hop_seconds=lambda v: None, requires=("av",), time_axis=lambda v: 0)
