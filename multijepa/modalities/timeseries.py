"""Time series: the ``timeseries`` recipe section, and series as 1D-CNN patch tokens.

Readers live in :mod:`multijepa.readers.series` (.ts, UCR .tsv/.txt, CSV, .npy/.npz). A sample is a
float tensor [C, L] where NaN marks padding past the series' end: training crops or pads each series
to ``length``; embedding covers a longer one with windows, pooled. ``length`` and ``channels`` may be
0: pretraining then reads them from the training data before it builds the model.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, replace
from typing import Literal, Optional, Union

import numpy as np
import torch

from multijepa.core.masking import MaskConfig, validate_grid_mask
from multijepa.errors import DataError, DecodeError, RecipeError, check
from multijepa.readers import Source
from multijepa.readers.series import SERIES_EXTENSIONS, finish_series, read_series, series_labels
from multijepa.spec import ModalitySpec
from multijepa.tokenizers.timeseries import SeriesTokenizer, valid_tokens
from multijepa.transforms import crop_or_pad, windows


@dataclass(frozen=True)
class TimeSeriesConfig:
    """Time-series reading, cropping and windowing, and the 1D-CNN patch tokenizer.

    ``length`` and ``channels`` may be 0: pretraining then sets them from the training data before
    it builds the model, and the resolved values are saved with the run and its checkpoints.
    """

    # window in samples; 0: the longest training series rounded up to whole patches (at most max_auto_length)
    length: int = 0
    channels: int = 0  # channels per series; 0: from the training data (every series must have the same count)
    patch_size: int = 4  # samples per token
    stride: int = 0  # hop between patches; 0: patch_size (non-overlapping); smaller values overlap
    channel_mode: Literal["independent", "mixed"] = "independent"  # independent: one token per (channel, patch)
    conv_widths: tuple[int, ...] = (32, 32)  # the convolution stack run inside each patch
    kernel_size: int = 3  # odd; zero padding inside the patch, so a token never sees a neighbouring patch
    instance_norm: bool = True  # each series (window) and channel to zero mean, unit variance: scales do not leak
    # with instance_norm, tokens also embed each channel's mean and std that it took out (without it: no effect)
    keep_levels: bool = False
    missing: Literal["interpolate", "zero", "error"] = "interpolate"  # NaN, ? or empty values inside a series
    csv_layout: Literal["long", "wide"] = "long"  # long: one series per file, rows = time, columns = channels
    # A class label column: auto is none for a .csv, first for a .txt/.tsv (the UCR archive's layout)
    csv_label_column: Literal["auto", "none", "first", "last"] = "auto"
    npz_split: Literal["train", "test", "all"] = "train"  # an .npz with X_train/X_test: the split read
    window_hop: int = 0  # embed: hop between windows of series longer than length; 0: length // 2
    max_auto_length: int = 512  # length: 0 takes the longest training series, up to this many samples


def patch_stride(ts: TimeSeriesConfig) -> int:
    """The hop between patches (``stride``, or ``patch_size`` when stride is 0)."""
    return ts.stride or ts.patch_size


def waits_for_data(ts: TimeSeriesConfig) -> tuple[str, ...]:
    """The keys still to be read from the data (left at 0): ``timeseries.length``, ``timeseries.channels``."""
    return tuple(f"timeseries.{key}" for key in ("length", "channels") if getattr(ts, key) == 0)


def validate_timeseries(ts: TimeSeriesConfig, where: str) -> None:
    check(ts.patch_size >= 1, where, "timeseries.patch_size", "must be at least 1")
    check(0 <= ts.stride <= ts.patch_size, where, "timeseries.stride",
          f"must be 0 (= patch_size) or between 1 and patch_size={ts.patch_size} (a larger hop would skip "
          f"samples), got {ts.stride}")
    check(ts.channels >= 0, where, "timeseries.channels", "must be 0 (from the data) or positive")
    check(ts.length >= 0, where, "timeseries.length", "must be 0 (from the data) or positive")
    stride = patch_stride(ts)
    if ts.length:
        fits = ts.length >= ts.patch_size and (ts.length - ts.patch_size) % stride == 0
        nearest = ts.patch_size + max(0, math.ceil((ts.length - ts.patch_size) / stride)) * stride
        check(fits, where, "timeseries.length",
              f"must be patch_size + k * stride so patches tile the window (patch_size={ts.patch_size}, "
              f"stride={stride}); got {ts.length}, try {nearest}")
    check(len(ts.conv_widths) >= 1 and all(w >= 1 for w in ts.conv_widths), where, "timeseries.conv_widths",
          f"must list one or more positive channel widths, got {list(ts.conv_widths)}")
    check(ts.kernel_size >= 1 and ts.kernel_size % 2 == 1, where, "timeseries.kernel_size",
          f"must be odd and positive (same-size padding inside a patch), got {ts.kernel_size}")
    check(ts.window_hop >= 0 and (not ts.length or ts.window_hop <= ts.length), where, "timeseries.window_hop",
          f"must be 0 (= length // 2) or between 1 and timeseries.length={ts.length}, got {ts.window_hop}")
    check(ts.max_auto_length >= ts.patch_size, where, "timeseries.max_auto_length",
          f"must be at least timeseries.patch_size={ts.patch_size}, got {ts.max_auto_length}")
    check(ts.csv_label_column in ("auto", "none") or ts.csv_layout == "wide", where, "timeseries.csv_label_column",
          "needs timeseries.csv_layout: wide (a long CSV holds one series, so it has no label column; .txt and "
          ".tsv files are always wide)")


def series_grid(ts: TimeSeriesConfig) -> tuple[int, ...]:
    """``(patches,)`` with mixed channels, ``(channels, patches)`` with channel-independent tokens."""
    if waits_for_data(ts):
        raise RecipeError("timeseries.length or timeseries.channels is 0 (set from the data when pretraining "
                        "starts); the token grid is not known yet")
    patches = (ts.length - ts.patch_size) // patch_stride(ts) + 1
    return (ts.channels, patches) if ts.channel_mode == "independent" else (patches,)


def check_series_masks(ts: TimeSeriesConfig, mask: MaskConfig, where: str) -> None:
    """Masks on the token grid; while it waits for the data, the axis settings are checked on a
    stand-in grid of the same rank (pretraining checks again once the data has set the grid)."""
    if not waits_for_data(ts):
        validate_grid_mask(mask, series_grid(ts), where, series_time_axis(ts), "timeseries")
        return
    stand_in = (max(ts.channels, 1), 64) if ts.channel_mode == "independent" else (64,)
    validate_grid_mask(mask, stand_in, where, series_time_axis(ts), "timeseries")


def series_time_axis(ts: TimeSeriesConfig) -> int:
    """The token grid's time axis: the patches (after the channels with channel-independent tokens)."""
    return 1 if ts.channel_mode == "independent" else 0


def _checked(x: np.ndarray, ts: TimeSeriesConfig, where: str) -> torch.Tensor:
    if x.shape[0] != ts.channels:
        raise DecodeError(f"{where}: {x.shape[0]} channels, but the recipe's timeseries.channels={ts.channels}")
    return torch.tensor(x)  # a copy: the parsed file is cached


def series_sample(src: Source, ts: TimeSeriesConfig, name: str, part: Optional[int],
                  g: Optional[torch.Generator]) -> torch.Tensor:
    """Series ``part`` of a file (None: the file must hold exactly one) as a model input [C, length].

    With a generator (training) a longer series is cropped at random, and a series too short to
    mask (one patch) raises DecodeError so the trainer skips and reports it; without, the input is
    the series' first window. Shorter series are padded with NaN.
    """
    found = read_series(src, ts, name)
    if part is None:
        if len(found.series) != 1:
            raise DecodeError(f"{name}: holds {len(found.series)} series where one was expected; list it as a data "
                              f"set (data.path=FILE, a folder or a file list) to use every series")
        part = 0
    x = crop_or_pad(_checked(found.series[part], ts, f"{name}, series {part + 1}"), ts.length, g)
    real = min(found.series[part].shape[1], ts.length)
    if g is not None and real <= patch_stride(ts) and ts.length > ts.patch_size:
        raise DecodeError(f"{name}, series {part + 1}: {real} samples fill a single patch (timeseries.stride "
                          f"{patch_stride(ts)}), too short to hide part of it; skipped in training")
    return x


def _from_tensor(x: torch.Tensor, ts: TimeSeriesConfig, g: Optional[torch.Generator]) -> torch.Tensor:
    """A raw series float [C, L] or [L] (NaN = missing) as a training input."""
    x = x.detach().cpu().double().numpy()
    series = finish_series([x[None] if x.ndim == 1 else x], [None], ts, "a tensor").series[0]
    return crop_or_pad(torch.as_tensor(series, dtype=torch.float32), ts.length, g)


def series_views(item: Union[Source, torch.Tensor], ts: TimeSeriesConfig, name: str) -> list[list[torch.Tensor]]:
    """Embedding inputs for one file (or one series tensor [C, L] or [L], NaN = missing): per series
    in file order, its windows [C, length] (hop ``timeseries.window_hop``), to be pooled together."""
    if isinstance(item, torch.Tensor):
        x = item.detach().cpu().double().numpy()
        found = finish_series([x[None] if x.ndim == 1 else x], [None], ts, name).series
    else:
        found = read_series(item, ts, name).series
    hop = ts.window_hop or max(1, ts.length // 2)
    return [list(windows(_checked(x, ts, f"{name}, series {k + 1}"), ts.length, hop, flush=True))
            for k, x in enumerate(found)]


def shape_from_files(ts: TimeSeriesConfig, files: list[str], where: str) -> TimeSeriesConfig:
    """``length`` and ``channels`` filled in where they are 0, from the series in ``files``.

    Channels: the count every series shares (series that differ are an error naming two files).
    Length: the longest series rounded up to whole patches, at most ``max_auto_length`` samples
    (longer series are cropped in training and windowed in embedding).
    """
    channels: dict[int, str] = {}
    longest = 0
    for f in dict.fromkeys(files):
        for x in read_series(f, ts).series:
            channels.setdefault(x.shape[0], f)
            longest = max(longest, x.shape[1])
    if ts.channels == 0 and len(channels) > 1:
        (a, fa), (b, fb) = list(channels.items())[:2]
        raise DataError(f"{where}: series have different channel counts ({fa}: {a}, {fb}: {b}); a data set needs "
                        f"one count (timeseries.channels)")
    stride = patch_stride(ts)
    cap = min(longest, ts.max_auto_length)
    resolved = replace(ts, channels=ts.channels or next(iter(channels)),
                       length=ts.length or ts.patch_size + max(0, -(-(cap - ts.patch_size) // stride)) * stride)
    print(f"timeseries.length={resolved.length} timeseries.channels={resolved.channels} "
          f"(from the data: longest series {longest} samples)", file=sys.stderr)
    return resolved


def series_tokenizer(ts: TimeSeriesConfig, dim: int) -> SeriesTokenizer:
    check(ts.channel_mode == "independent" or ts.channels >= 1, "the recipe", "timeseries.channels",
          "is 0 (taken from the data when pretraining starts), but a mixed-channel tokenizer needs it to be "
          "built; set timeseries.channels, or pretrain first")
    return SeriesTokenizer(ts.channels, ts.patch_size, patch_stride(ts), dim, ts.conv_widths, ts.kernel_size,
                           ts.channel_mode == "independent", ts.instance_norm, ts.keep_levels)


SPEC = ModalitySpec(
    name="timeseries", config=TimeSeriesConfig, extensions=SERIES_EXTENSIONS, validate=validate_timeseries,
    tokenizer=series_tokenizer, load=series_sample, from_tensor=_from_tensor, embed_views=series_views,
    token_grid=series_grid, check_masks=check_series_masks,
    valid_tokens=lambda x, ts: valid_tokens(x, ts.patch_size, patch_stride(ts), ts.channel_mode == "independent"),
    list_samples=lambda path, ts: series_labels(path, ts), waits_for_data=waits_for_data, from_data=shape_from_files,
    test_split=lambda ts: replace(ts, npz_split="test"), time_axis=series_time_axis)
