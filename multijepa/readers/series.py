"""Time-series readers: .ts (sktime/aeon), UCR .txt/.tsv, CSV (long or wide), .npy/.npz -> float arrays [C, L].

Formats (every file's series come in file order):

- ``.ts``: the sktime/aeon text format: ``@`` header lines, then ``@data`` with one series per
  line, dimensions separated by ``:``, values by ``,``, the class label last when
  ``@classLabel true``. Univariate or multivariate, equal or unequal length. Time-stamped data
  (``@timeStamps true``) is not read.
- ``.txt`` and ``.tsv``: the UCR archive's tables (``GunPoint_TRAIN.tsv``, older ``GunPoint_TRAIN.txt``):
  one univariate series per row, the class label in the first column (``timeseries.csv_label_column:
  auto``; ``none`` reads every column as values, ``last`` takes the last). Always one series per row,
  whatever ``csv_layout`` says.
- CSV, ``timeseries.csv_layout: long`` (the default): one series per file, rows are time steps and
  columns are channels. ``wide``: one univariate series per row, with an optional class label in the
  first or last column (``timeseries.csv_label_column``; ``auto`` is none); rows may differ in length.
  A first row that is not numbers is a header and skipped.
- Text tables (.csv, .txt, .tsv) are split on tabs, semicolons or commas, whichever the file's first
  five lines hold most often, or on runs of spaces where they hold none of them. A class label that is
  a whole number spelt as a float (``1.0000000e+00`` in old UCR files, ``1.0`` in an .npz) reads as ``1``,
  so a set's files in different formats agree on class names.
- ``.npy``: 1-D [time] is one series, 2-D [series, time] many univariate series, 3-D
  [series, channels, time] many multivariate ones. ``.npz``: the same array under ``x`` (or the only
  array in the file), with optional class labels under ``y`` or ``labels`` (one per series); or split
  as tslearn and sktime save them, ``X_train``/``y_train`` and ``X_test``/``y_test`` (also spelt
  ``x_train`` or ``train_x``; names match in any case), of which ``timeseries.npz_split`` picks one, or
  ``all`` (train, then test). A file holding one split (only ``X_test``) or none is read as it is.

Missing values are ``NaN``, ``?`` or an empty field. Time steps at the end of a series where every
channel is missing are padding, not data: they are dropped, so unequal-length series can be stored
padded (as aeon, pandas and the UCR archive write them). What remains is handled by ``timeseries.missing``:
``interpolate`` (linear in time per channel; leading and trailing gaps take the nearest value; a
channel with no value at all becomes zeros), ``zero``, or ``error`` (a DecodeError naming the line).

Every malformed file raises :class:`DecodeError` naming the file and, for text, the line.
"""

from __future__ import annotations

import csv
import functools
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from multijepa.readers import Source, read_bytes
from multijepa.errors import DecodeError

# .txt/.tsv are UCR-archive tables (.txt and .npy are also point arrays: the model decides).
SERIES_EXTENSIONS = (".ts", ".csv", ".tsv", ".txt", ".npy", ".npz")

MISSING = {"", "?"}  # besides NaN in any spelling float() accepts

# Where a missing or bad value sits, for messages: (channel, time step) -> "line 12, column 3".
Locate = Callable[[int, int], str]


@dataclass
class SeriesFile:
    """The series of one file in file order: float32 [C, L] each, with in-file labels (None if none)."""

    series: list[np.ndarray]
    labels: list[Optional[str]]


def _floats(tokens: list[str], where: Callable[[int], str]) -> np.ndarray:
    """Parse value strings to float64 (missing -> NaN); ``where(i)`` names token i in errors."""
    try:
        out = np.array(tokens, dtype=np.float64)  # fast path: every token is a number or nan
    except ValueError:
        out = np.empty(len(tokens))
        for i, tok in enumerate(tokens):
            tok = tok.strip()
            if tok in MISSING:
                out[i] = math.nan
                continue
            try:
                out[i] = float(tok)
            except ValueError:
                raise DecodeError(f"{where(i)}: {tok[:40]!r} is not a number or a missing value "
                                  f"(NaN, ?, empty)") from None
    if np.isinf(out).any():
        first = int(np.flatnonzero(np.isinf(out))[0])
        raise DecodeError(f"{where(first)}: an infinite value; use NaN for missing values")
    return out


def _text(data: bytes, name: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DecodeError(f"{name}: not a text file (byte {e.start} is not UTF-8); is it really a "
                          f"{Path(name).suffix}?") from None


# --------------------------------------------------------------------------- .ts


def _parse_ts(text: str, name: str) -> tuple[list[np.ndarray], list[Optional[str]], list[Locate]]:
    header: dict[str, list[str]] = {}
    series, labels, locates = [], [], []
    in_data, dims, length = False, None, None
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not in_data:
            if not line.startswith("@"):
                raise DecodeError(f"{name}, line {lineno}: expected an @ header line or @data before the series "
                                  f"(is this a sktime/aeon .ts file?)")
            tag, *rest = line.split()
            tag = tag.lower()
            if tag == "@data":
                in_data = True
                has_labels = _flag(header, "@classlabel", name) or _flag(header, "@targetlabel", name)
                declared = header.get("@classlabel", [])[1:]
                if _flag(header, "@timestamps", name):
                    raise DecodeError(f"{name}, line {lineno}: time-stamped .ts data (@timeStamps true) is not "
                                      f"supported; export the values without time stamps")
                dims = _int(header, "@dimensions", name) or (1 if _flag(header, "@univariate", name) else None)
                if _flag(header, "@equallength", name):
                    length = _int(header, "@serieslength", name) or -1  # -1: set by the first series
            else:
                header[tag] = rest
            continue
        fields = line.split(":")
        label = None
        if has_labels:
            if len(fields) < 2:
                raise DecodeError(f"{name}, line {lineno}: no class label after the values (@classLabel true "
                                  f"needs 'values:label')")
            label = fields.pop().strip()
            if not label or (declared and label not in declared):
                raise DecodeError(f"{name}, line {lineno}: class label {label!r} is not one of @classLabel "
                                  f"{' '.join(declared)}")
        if "(" in line:
            raise DecodeError(f"{name}, line {lineno}: time-stamped values '(t,v)' are not supported")
        if dims is None:
            dims = len(fields)
        if len(fields) != dims:
            raise DecodeError(f"{name}, line {lineno}: {len(fields)} dimensions, expected {dims} "
                              f"(from @dimensions or the first series)")
        rows = [_floats(f.split(","), lambda i, d=d: f"{name}, line {lineno}, dimension {d + 1}, value {i + 1}")
                for d, f in enumerate(fields)]
        lengths = {len(r) for r in rows}
        if len(lengths) > 1:
            raise DecodeError(f"{name}, line {lineno}: dimensions have different lengths {sorted(lengths)}; every "
                              f"dimension of a series needs the same length")
        n = lengths.pop()
        if length == -1:
            length = n
        if length is not None and n != length:
            raise DecodeError(f"{name}, line {lineno}: {n} values per dimension, but the header says equal length "
                              f"{length}")
        series.append(np.stack(rows))
        labels.append(label)
        locates.append(lambda c, t, ln=lineno: f"line {ln}, dimension {c + 1}, value {t + 1}")
    if not in_data:
        raise DecodeError(f"{name}: no @data line; a .ts file has @ header lines, then @data, then one series "
                          f"per line")
    if not series:
        raise DecodeError(f"{name}: no series after @data")
    return series, labels, locates


def _flag(header: dict[str, list[str]], tag: str, name: str) -> bool:
    value = header.get(tag, ["false"])
    if not value or value[0].lower() not in ("true", "false"):
        raise DecodeError(f"{name}: {tag} must be true or false, got {' '.join(value)!r}")
    return value[0].lower() == "true"


def _int(header: dict[str, list[str]], tag: str, name: str) -> Optional[int]:
    if tag not in header:
        return None
    try:
        return int(header[tag][0])
    except (IndexError, ValueError):
        raise DecodeError(f"{name}: {tag} must be a whole number, got {' '.join(header[tag])!r}") from None


# --------------------------------------------------------------------------- CSV


def _numeric(tok: str) -> bool:
    tok = tok.strip()
    if tok in MISSING:
        return True
    try:
        float(tok)
        return True
    except ValueError:
        return False


def _label_name(tok: str) -> str:
    """A class label as written, except a whole number spelt as a float: ``1.0000000e+00`` -> ``1``."""
    tok = tok.strip()
    if "." in tok or "e" in tok.lower():
        try:
            value = float(tok)
        except ValueError:
            return tok
        if value.is_integer():
            return str(int(value))
    return tok


def _rows(text: str, name: str) -> list[tuple[int, list[str]]]:
    """The non-blank rows of a text table as (line number, fields), split on tabs, semicolons or commas
    (whichever the first five lines hold most often, ties in that order; quoted fields as in CSV), or on
    runs of spaces where they hold none of them."""
    lines = text.splitlines()
    head = "\n".join([line for line in lines if line.strip()][:5])
    delimiter = max("\t;,", key=head.count) if any(d in head for d in "\t;,") else None
    if delimiter is None:
        return [(lineno, line.split()) for lineno, line in enumerate(lines, 1) if line.strip()]
    reader = csv.reader(io.StringIO(text), delimiter=delimiter)
    rows = []
    try:
        for row in reader:
            if row:  # blank lines are skipped; a row of empty fields is a step with every value missing
                rows.append((reader.line_num, row))
    except csv.Error as e:
        raise DecodeError(f"{name}, line {reader.line_num}: not valid CSV ({e})") from None
    return rows


def _parse_table(text: str, name: str, wide: bool, label_col: str
                 ) -> tuple[list[np.ndarray], list[Optional[str]], list[Locate]]:
    """A CSV-like table: long (one series, rows = time, columns = channels) or wide (a series per row,
    ``label_col`` none, first or last)."""
    rows = _rows(text, name)
    if not rows:
        raise DecodeError(f"{name}: the file holds no rows")
    first = rows[0][1]
    values_of_first = first[1:] if label_col == "first" else first[:-1] if label_col == "last" else first
    if not all(_numeric(f) for f in values_of_first):
        rows = rows[1:]  # a header
    if not rows:
        raise DecodeError(f"{name}: the file has a header but no data rows")
    if not wide:
        width = len(rows[0][1])
        for lineno, row in rows:
            if len(row) != width:
                raise DecodeError(f"{name}, line {lineno}: {len(row)} fields, expected {width} like the first row "
                                  f"(a long CSV has one column per channel)")
        table = np.stack([_floats(row, lambda i, ln=lineno: f"{name}, line {ln}, column {i + 1}")
                          for lineno, row in rows])
        lines = [ln for ln, _ in rows]
        return [table.T], [None], [lambda c, t: f"line {lines[t]}, column {c + 1}"]
    series, labels, locates = [], [], []
    offset = 1 if label_col == "first" else 0
    for lineno, row in rows:
        label = None
        if label_col != "none":
            if len(row) < 2:
                raise DecodeError(f"{name}, line {lineno}: needs a label and at least one value")
            label = _label_name(row.pop(0) if label_col == "first" else row.pop())
            if not label:
                raise DecodeError(f"{name}, line {lineno}: empty class label in the {label_col} column")
        while row and not row[-1].strip():  # rows of unequal length end in empty fields
            row.pop()
        if not row:
            raise DecodeError(f"{name}, line {lineno}: a row without values")
        series.append(_floats(row, lambda i, ln=lineno: f"{name}, line {ln}, column {i + 1 + offset}")[None])
        labels.append(label)
        locates.append(lambda c, t, ln=lineno: f"line {ln}, column {t + 1 + offset}")
    return series, labels, locates


# --------------------------------------------------------------------------- .npy / .npz


def _npz_keys(keys: list[str], name: str, split: str) -> list[tuple[str, Optional[str]]]:
    """Which arrays of an .npz to read: (series key, labels key or None) per split, in order."""
    lower = {k.lower(): k for k in reversed(keys)}  # names match in any case; the first spelling wins

    def find(*names: str) -> Optional[str]:
        return next((lower[n] for n in names if n in lower), None)

    splits = {s: find(f"x_{s}", f"{s}_x") for s in ("train", "test")}
    splits = {s: k for s, k in splits.items() if k is not None}
    if splits:  # npz_split picks among the splits a file holds; a file of one split is read as it is
        chosen = [s for s in splits if split in (s, "all")] or list(splits)
        return [(splits[s], find(f"y_{s}", f"{s}_y")) for s in chosen]
    key = find("x") or (keys[0] if len(keys) == 1 else None)
    if key is None:
        raise DecodeError(f"{name}: no series array; an .npz holds them under 'x' (labels under 'y' or 'labels'), "
                          f"or per split under 'X_train'/'X_test' (labels 'y_train'/'y_test'; also spelt "
                          f"'train_x'/'train_y'); it holds {', '.join(keys) or 'nothing'}")
    labels = find("y", "labels")
    return [(key, labels if labels != key else None)]


def _parse_array(data: bytes, name: str, split: str) -> tuple[list[np.ndarray], list[Optional[str]], list[Locate]]:
    try:
        loaded = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:  # numpy raises many types for a torn or foreign file
        raise DecodeError(f"{name}: not a readable NumPy file ({type(e).__name__}: {e})") from None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            wanted = _npz_keys(list(loaded.keys()), name, split)
            try:
                parts = [(f"{name}, array {x!r}", loaded[x], None if y is None else loaded[y]) for x, y in wanted]
            except Exception as e:
                raise DecodeError(f"{name}: cannot read the arrays ({type(e).__name__}: {e})") from None
    else:
        parts = [(name, loaded, None)]
    series: list[np.ndarray] = []
    labels: list[Optional[str]] = []
    for where, arr, labels_arr in parts:
        if arr.dtype.kind not in "biuf":
            raise DecodeError(f"{where}: series must be numbers, the array holds {arr.dtype}")
        if arr.ndim not in (1, 2, 3) or arr.size == 0:
            raise DecodeError(f"{where}: expected [time], [series, time] or [series, channels, time], got shape "
                              f"{list(arr.shape)}")
        arr = arr.astype(np.float64)
        if np.isinf(arr).any():
            raise DecodeError(f"{where}: holds infinite values; use NaN for missing values")
        arr = arr[None, None] if arr.ndim == 1 else arr[:, None] if arr.ndim == 2 else arr
        if labels_arr is None:
            labels += [None] * len(arr)
        elif labels_arr.ndim != 1 or len(labels_arr) != len(arr):
            raise DecodeError(f"{where}: labels have shape {list(labels_arr.shape)}, expected [{len(arr)}] "
                              f"(one per series)")
        else:
            labels += [_label_name(str(v)) for v in labels_arr.tolist()]
        series += list(arr)
    locates = [lambda c, t, k=k: f"series {k + 1}, channel {c + 1}, step {t + 1}" for k in range(len(series))]
    return series, labels, locates


# --------------------------------------------------------------------------- reading


def fill_missing(x: np.ndarray, policy: str, where: Optional[Callable[[int, int], str]] = None) -> np.ndarray:
    """Handle NaN in one series [C, L] as ``timeseries.missing`` says; returns float32 [C, L].

    >>> fill_missing(np.array([[np.nan, 1.0, np.nan, 3.0, np.nan]]), "interpolate").tolist()
    [[1.0, 1.0, 2.0, 3.0, 3.0]]
    """
    gaps = np.isnan(x)
    if gaps.any():
        if policy == "error":
            c, t = (int(v[0]) for v in np.nonzero(gaps))
            raise DecodeError(f"{where(c, t) if where else f'channel {c + 1}, step {t + 1}'}: a missing value, and "
                              f"timeseries.missing=error; set it to interpolate or zero to fill missing values")
        x = x.copy()
        if policy == "zero":
            x[gaps] = 0.0
        else:
            steps = np.arange(x.shape[1])
            for c in np.flatnonzero(gaps.any(1)):
                ok = ~gaps[c]
                x[c] = np.interp(steps, steps[ok], x[c, ok]) if ok.any() else 0.0
    return x.astype(np.float32)


def finish_series(raw: list[np.ndarray], labels: list[Optional[str]], cfg: Reading, name: str,
                  locates: Optional[list[Locate]] = None) -> SeriesFile:
    """Parsed series [C, L] with NaN -> a SeriesFile: trailing all-missing steps dropped, the rest
    handled by ``cfg.missing``; ``locates[k](channel, step)`` names a value of series k in errors."""
    locates = locates or [lambda c, t, k=k: f"series {k + 1}, channel {c + 1}, step {t + 1}" for k in range(len(raw))]
    out = []
    for k, (x, locate) in enumerate(zip(raw, locates)):
        real = np.flatnonzero(~np.isnan(x).all(0))
        if not len(real):
            raise DecodeError(f"{name}, {locate(0, 0).split(',')[0]}: the series holds no values (all missing)")
        x = x[:, :real[-1] + 1]  # trailing steps missing in every channel are padding: drop them
        out.append(fill_missing(x, cfg.missing, lambda c, t, loc=locate: f"{name}, {loc(c, t)}"))
    return SeriesFile(out, labels)


def _parse(data: bytes, name: str, cfg: Reading) -> SeriesFile:
    suffix = Path(name).suffix.lower()
    if suffix in (".npy", ".npz"):
        parsed = _parse_array(data, name, cfg.npz_split)
    elif suffix == ".ts":
        parsed = _parse_ts(_text(data, name), name)
    elif suffix in (".csv", ".txt", ".tsv"):
        ucr = suffix != ".csv"  # a UCR archive table: a series per row, the label first
        label_col = cfg.csv_label_column if cfg.csv_label_column != "auto" else "first" if ucr else "none"
        parsed = _parse_table(_text(data, name), name, ucr or cfg.csv_layout == "wide", label_col)
    else:
        raise DecodeError(f"{name}: unknown time-series file type {suffix!r}; multijepa reads "
                          f".ts, .csv, .tsv, .txt, .npy, .npz")
    series, labels, locates = parsed
    return finish_series(series, labels, cfg, name, locates)


@dataclass(frozen=True)
class Reading:
    """The keys of the ``timeseries`` section that say how a file is read (and key its cached parse)."""

    missing: str
    csv_layout: str
    csv_label_column: str
    npz_split: str


@functools.lru_cache(maxsize=16)
def _parse_path(path: str, stamp: tuple[int, int], reading: Reading) -> SeriesFile:
    return _parse(read_bytes(path, path), path, reading)


def read_series(src: Source, cfg: Reading, name: str = "") -> SeriesFile:
    """Every series in a file, in file order, missing values handled as ``cfg.missing`` says.

    A file path's parse is cached (per process, keyed by path, size and modification time), so
    training samples that are series of one big file do not re-read it each time.

    Args:
        src: a path, or the file's bytes (then ``name``, with the extension, is used).
        cfg: the recipe's ``timeseries`` section, or a :class:`Reading` (missing-value policy, CSV
            layout and label column, .npz split).

    Raises:
        DecodeError: naming the file and, in text formats, the line.

    >>> read_series("GunPoint_TRAIN.ts", TimeSeriesConfig()).series[0].shape  # doctest: +SKIP
    (1, 150)
    """
    if isinstance(src, bytes):
        return _parse(read_bytes(src, name), name, cfg)
    path = str(src)
    try:
        st = os.stat(path)
    except OSError:
        read_bytes(path, name or path)  # raises the usual "no such file" / "is a folder" error
        raise
    # Keyed by the reading keys alone: the parse is shared before and after length/channels are resolved.
    reading = Reading(cfg.missing, cfg.csv_layout, cfg.csv_label_column, cfg.npz_split)
    return _parse_path(path, (st.st_size, st.st_mtime_ns), reading)


def series_labels(path: str, cfg: Reading) -> list[Optional[str]]:
    """Each series' in-file label (None where the file has none), in file order; one entry per series.

    A long-layout CSV holds one series, so it is not read here (a bad one is reported when trained on).
    """
    if Path(path).suffix.lower() == ".csv" and cfg.csv_layout == "long":
        return [None]
    return read_series(path, cfg).labels
