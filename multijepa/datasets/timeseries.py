"""Time series as model inputs: training crops, embedding windows, and shapes taken from the data.

Readers live in :mod:`multijepa.datasets.series`; the data-set machinery in
:mod:`multijepa.datasets.files` reaches these through its per-modality dicts.
"""

from __future__ import annotations

import sys
from typing import Optional

import numpy as np
import torch

from multijepa.datasets.readers import Source
from multijepa.datasets.series import finish_series, read_series
from multijepa.datasets.transforms import crop_or_pad, series_windows
from multijepa.errors import DataError, DecodeError
from multijepa.recipe import Recipe, TimeSeriesConfig, patch_stride, recipe_from_dict, recipe_to_dict

AUTO_LENGTH_LIMIT = 512  # timeseries.length=0 takes the longest series, up to this many samples


def _checked(x: np.ndarray, ts: TimeSeriesConfig, where: str) -> torch.Tensor:
    if x.shape[0] != ts.channels:
        raise DecodeError(f"{where}: {x.shape[0]} channels, but the recipe's timeseries.channels={ts.channels}")
    return torch.tensor(x)  # a copy: the parsed file is cached


def series_sample(src: Source, recipe: Recipe, name: str, part: Optional[int],
                  g: Optional[torch.Generator]) -> torch.Tensor:
    """Series ``part`` of a file (None: the file must hold exactly one) as a model input [C, length].

    With a generator (training) a longer series is cropped at random, and a series too short to
    mask (one patch) raises DecodeError so the trainer skips and reports it; without, the input is
    the series' first window. Shorter series are padded with NaN.
    """
    ts = recipe.timeseries
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


def series_views(item: Source | torch.Tensor, recipe: Recipe, name: str) -> list[list[torch.Tensor]]:
    """Embedding inputs for one file (or one series tensor [C, L] or [L], NaN = missing): per series
    in file order, its windows [C, length] (hop ``timeseries.window_hop``), to be pooled together.
    """
    ts = recipe.timeseries
    if isinstance(item, torch.Tensor):
        x = item.detach().cpu().double().numpy()
        found = finish_series([x[None] if x.ndim == 1 else x], [None], ts, name).series
    else:
        found = read_series(item, ts, name).series
    hop = ts.window_hop or max(1, ts.length // 2)
    return [series_windows(_checked(x, ts, f"{name}, series {k + 1}"), ts.length, hop) for k, x in enumerate(found)]


def resolve_shape(recipe: Recipe, files: list[str], where: str) -> Recipe:
    """Fill ``timeseries.length`` and ``timeseries.channels`` when they are 0, from the series in ``files``.

    Channels: the count every series shares (series that differ are an error naming two files).
    Length: the longest series rounded up to whole patches, at most AUTO_LENGTH_LIMIT samples
    (longer series are cropped in training and windowed in embedding). The result is validated
    like any recipe, so a mask that cannot fit the grid is reported here, before training.
    """
    ts = recipe.timeseries
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
    raw = recipe_to_dict(recipe)
    stride = patch_stride(ts)
    if ts.channels == 0:
        raw["timeseries"]["channels"] = next(iter(channels))
    if ts.length == 0:
        cap = min(longest, AUTO_LENGTH_LIMIT)
        raw["timeseries"]["length"] = ts.patch_size + max(0, -(-(cap - ts.patch_size) // stride)) * stride
    resolved = recipe_from_dict(raw, f"{where} (timeseries.length/channels taken from the data)")
    print(f"timeseries.length={resolved.timeseries.length} timeseries.channels={resolved.timeseries.channels} "
          f"(from the data: longest series {longest} samples)", file=sys.stderr)
    return resolved
