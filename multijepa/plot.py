"""Plots of training runs: a run folder's ``metrics.jsonl`` drawn as one PNG (``multijepa plot RUN_DIR...``).

A run that is still training can be plotted: its last line, if half-written, is left out.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import yaml

from multijepa.checkpoint import write_atomically
from multijepa.errors import MultijepaError
from multijepa.recipe import TrainConfig
from multijepa.runlog import METRICS

ONE_RUN_OUT = "metrics.png"  # written into the run folder
MANY_RUNS_OUT = "runs.png"  # written into the current directory
LOSS_PARTS = {"loss": ("total loss", "-"), "loss_prediction": ("prediction", "--"),
              "loss_regularizer": ("regularizer", ":")}
MODALITY_LOSS = "loss_prediction_"  # + modality: mixed runs only
MODALITY_STYLES = ("-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)))
THRESHOLD_STYLE = (0, (4, 3))


@dataclass
class _Run:
    label: str
    records: list  # one dict per logged step, sorted by step
    collapse_std: float
    collapse_erank: float

    def series(self, key: str) -> Optional[tuple[list, list]]:
        """(steps, values) of ``key``, or None where this run never logged it (older versions)."""
        points = [(r["step"], _number(r[key])) for r in self.records if key in r]
        return ([step for step, _ in points], [value for _, value in points]) if points else None


def plot_runs(runs: Sequence[Union[str, Path]], out: Union[str, Path, None] = None,
              title: Optional[str] = None) -> Path:
    """Draw the metrics of one or more run folders as one image, runs overlaid in one colour each.

    Panels, x = step: the loss and its parts (log y where all positive), per-modality prediction losses
    (mixed runs), learning rate, target std and effective rank with their collapse warning thresholds (the
    run's ``train.collapse_std`` / ``train.collapse_erank``), samples/s with the share of time spent waiting
    for data, and files that failed to decode. Curves a run never logged (older versions lack ``data_wait``)
    are left out. Runs are labelled by folder name, with parents where names repeat. A step logged twice
    keeps its last record.

    Args:
        runs: run folders written by ``multijepa pretrain`` (or their ``metrics.jsonl`` files).
        out: the image to write (its suffix picks the format: ``.png``, ``.svg``, ``.pdf``...), or a folder
            to write the default name into. Default: ``RUN_DIR/metrics.png`` for one run, ``runs.png`` in
            the current directory for several. Written atomically; its folder is created if needed.
        title: the figure's title. Default: the run's label, or the labels of up to 3 runs.

    Returns:
        The path written.

    Raises:
        MultijepaError: a folder is missing or holds no (or no readable) ``metrics.jsonl``, naming the path.

    >>> plot_runs(["runs/image"])  # doctest: +SKIP
    PosixPath('runs/image/metrics.png')
    >>> plot_runs(["runs/lr1e-3", "runs/lr3e-4"], out="lr.png", title="lr sweep")  # doctest: +SKIP
    PosixPath('lr.png')
    """
    unique: dict = {}  # each run once (by its real path), in the order given
    for run in runs:
        path = _run_folder(Path(run))
        unique.setdefault(path.resolve(), path)
    if not unique:
        raise MultijepaError("no run folder given: pass one or more folders that `multijepa pretrain` wrote")
    paths, labels = list(unique.values()), _labels(list(unique))
    loaded = [_Run(label, _read_metrics(p / METRICS), *_thresholds(p)) for p, label in zip(paths, labels)]
    default = paths[0] / ONE_RUN_OUT if len(paths) == 1 else Path(MANY_RUNS_OUT)
    if out is None:
        out = default
    elif Path(out).is_dir() or str(out).endswith(("/", os.sep)):
        out = Path(out) / default.name
    if title is None:
        title = ", ".join(labels) if len(labels) <= 3 else f"{len(labels)} runs"
    _save(_figure(loaded, title), Path(out))
    return Path(out)


def _run_folder(path: Path) -> Path:
    if path.is_file() and path.name == METRICS:
        return path.parent
    if not path.exists():
        raise MultijepaError(f"{path}: no such run folder; pass a folder that `multijepa pretrain` wrote (the "
                             f"recipe's run.dir)")
    if not path.is_dir():
        raise MultijepaError(f"{path}: a file, not a run folder; pass the folder that holds {METRICS}")
    if not (path / METRICS).is_file():
        inner = sorted(p.parent.name for p in path.glob(f"*/{METRICS}"))
        if inner:
            raise MultijepaError(f"{path}: no {METRICS} here, but its folders {', '.join(inner[:5])}"
                                 f"{' ...' if len(inner) > 5 else ''} are runs: pass those (e.g. {path}/*)")
        raise MultijepaError(f"{path}: no {METRICS} here; is this a run folder? Train into it first with "
                             f"`multijepa pretrain RECIPE run.dir={path}`")
    return path


def _read_metrics(path: Path) -> list:
    """The records of a metrics.jsonl, one per step, sorted; an unterminated last line (a run killed, or
    still running, mid-write) is skipped."""
    try:
        lines = path.read_bytes().decode("utf-8", errors="replace").split("\n")  # ends with "" after a full line
    except OSError as e:
        raise MultijepaError(f"{path}: cannot read it ({e.strerror})") from None
    by_step = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines):  # torn: the run stopped before the line's newline was written
                continue
            raise MultijepaError(f"{path}, line {number}: not valid JSON ({e.msg}); repair or delete that line "
                                 f"(each line is one record that multijepa pretrain appended)") from None
        step = record.get("step") if isinstance(record, dict) else None
        if not isinstance(step, int) or isinstance(step, bool):
            raise MultijepaError(f"{path}, line {number}: not a metrics record (no integer 'step'); repair or "
                                 f"delete that line")
        by_step[step] = record
    if not by_step:
        raise MultijepaError(f"{path}: no logged step yet; lower train.log_every or train longer, then plot again")
    return [by_step[step] for step in sorted(by_step)]


def _thresholds(run: Path) -> tuple[float, float]:
    """The run's (collapse_std, collapse_erank) from its recipe.yaml; TrainConfig's defaults for keys
    it lacks, or, with a warning, for a recipe that cannot be read."""
    path, default = run / "recipe.yaml", TrainConfig()
    try:
        raw = yaml.safe_load(path.read_text()) if path.is_file() else {}
    except (yaml.YAMLError, OSError, UnicodeDecodeError) as e:
        warnings.warn(f"{path}: unreadable ({e}); drawing the default collapse thresholds", stacklevel=3)
        raw = {}
    train = raw.get("train") if isinstance(raw, dict) and isinstance(raw.get("train"), dict) else {}
    found = []
    for key in ("collapse_std", "collapse_erank"):
        value = _number(train.get(key, getattr(default, key)))  # a key older runs lack: the dataclass default
        if math.isnan(value):
            warnings.warn(f"{path}: 'train.{key}' is {train[key]!r}, not a number; drawing the default", stacklevel=3)
            value = getattr(default, key)
        found.append(value)
    return found[0], found[1]


def _labels(paths: list[Path]) -> list[str]:
    """Each run's folder name, with as many parent folders as it takes to tell equal names apart."""
    depth = [1] * len(paths)
    while True:
        labels = [str(Path(*p.parts[-d:])) for p, d in zip(paths, depth)]
        grow = [i for i, label in enumerate(labels) if labels.count(label) > 1 and depth[i] < len(paths[i].parts)]
        if not grow:
            return labels
        for i in grow:
            depth[i] += 1


def _number(value) -> float:
    """``value`` as a finite float, else NaN (a gap in the curve)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else math.nan


def _log_scale_if_positive(ax) -> None:
    """Log y where every value drawn (thresholds included) is positive: losses span decades."""
    values = [v for line in ax.lines for v in line.get_ydata() if math.isfinite(v)]
    if values and min(values) > 0:
        ax.set_yscale("log")


def _figure(runs: list, title: str):
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    cmap = colormaps["tab10" if len(runs) <= 10 else "turbo"]
    colors = [cmap(i if len(runs) <= 10 else i / (len(runs) - 1)) for i in range(len(runs))]
    styles: dict = {}  # legend key -> line style, for panels that draw more than one kind of curve

    def curves(ax, key: str, legend: Optional[str] = None, style="-", scale: float = 1.0, **kw) -> bool:
        drawn = False
        for run, color in zip(runs, colors):
            series = run.series(key)
            if series is not None:
                ax.plot(series[0], [v * scale for v in series[1]], color=color, linestyle=style, linewidth=1.4, **kw)
                drawn = True
        if drawn and legend:
            styles.setdefault(legend, style)
        return drawn

    def threshold(ax, attr: str) -> None:
        values: dict = {}
        for run, color in zip(runs, colors):
            values.setdefault(getattr(run, attr), color)  # one line per distinct value, in its first run's colour
        for value, color in values.items():
            color = "0.35" if len(values) == 1 else color
            ax.axhline(value, color=color, linestyle=THRESHOLD_STYLE, linewidth=1)
            ax.annotate(f"collapse warning below {value:g} (train.{attr})", xy=(0.01, value), fontsize=8,
                        xycoords=("axes fraction", "data"), va="bottom", color=color)

    modalities = list(dict.fromkeys(k[len(MODALITY_LOSS):] for run in runs for r in run.records
                                    for k in r if k.startswith(MODALITY_LOSS)))
    count, rows = 6 + bool(modalities), 3 + bool(modalities)
    fig = Figure(figsize=(13, 2.9 * rows + 0.9), layout="constrained")
    FigureCanvasAgg(fig)
    axes = list(fig.subplots(rows, 2, sharex=True, squeeze=False).ravel())
    if count % 2:
        fig.delaxes(axes.pop())
        axes[-2].xaxis.set_tick_params(labelbottom=True)
    panels = iter(axes)

    def panel(title: str):
        ax = next(panels)
        ax.set_title(title)
        return ax

    ax = panel("loss")
    for key, (name, style) in LOSS_PARTS.items():
        curves(ax, key, name, style)
    _log_scale_if_positive(ax)
    if modalities:
        ax = panel("prediction loss per modality")
        for i, modality in enumerate(modalities):
            curves(ax, MODALITY_LOSS + modality, f"{modality} prediction", MODALITY_STYLES[i % len(MODALITY_STYLES)])
        _log_scale_if_positive(ax)
    ax = panel("learning rate")
    curves(ax, "lr")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax = panel("target std (collapse monitor)")
    if curves(ax, "target_std"):
        threshold(ax, "collapse_std")
        _log_scale_if_positive(ax)
    ax = panel("target effective rank (collapse monitor)")
    if curves(ax, "target_erank"):
        threshold(ax, "collapse_erank")
    ax = panel("throughput")
    if curves(ax, "samples_per_s"):
        ax.set_ylabel("samples/s")
    if any(run.series("data_wait") for run in runs):
        twin = ax.twinx()
        curves(twin, "data_wait", "waiting for data (right axis)", ":", scale=100.0)
        twin.set_ylim(0, 100)
        twin.set_ylabel("waiting for data (%)")
    ax = panel("files that failed to decode (so far)")
    if curves(ax, "bad_files", drawstyle="steps"):
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(bottom=0, top=max(1.0, ax.get_ylim()[1]))  # all zero: a 0-1 axis, not fractions of a file

    for ax in axes:
        ax.grid(True, alpha=0.3)
        if not ax.lines:
            ax.text(0.5, 0.5, "not logged by these runs", ha="center", va="center", transform=ax.transAxes, color="0.5")
    for ax in axes[-2:]:
        ax.set_xlabel("step")
    handles = [Line2D([], [], color=color, linewidth=2.5, label=run.label) for run, color in zip(runs, colors)]
    handles += [Line2D([], [], color="0.3", linestyle=style, label=name) for name, style in styles.items()]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 6), fontsize=9, frameon=False)
    fig.suptitle(title)
    return fig


def _save(fig, out: Path) -> None:
    """Write ``fig`` to ``out`` atomically (temp file in the same folder, fsync, rename)."""
    fmt = out.suffix[1:].lower() or "png"
    supported = fig.canvas.get_supported_filetypes()
    if fmt not in supported:
        raise MultijepaError(f"{out}: cannot write .{fmt} images; name a .png file (or one of "
                             f"{', '.join('.' + s for s in sorted(supported))})")
    try:
        write_atomically(out, lambda f: fig.savefig(f, format=fmt, dpi=100))
    except OSError as e:
        raise MultijepaError(f"{out}: cannot write there ({e.strerror}); pass another --out") from None
