"""What the quality benchmarks share: a quiet machine, a step count that fits a time budget, a
pretraining run cut at its deadline, probe scores, and the line that says where a figure came from.

The scripts run from the repository root (``python bench/quality_<modality>.py``), so this module is
imported as ``common``; it needs the package installed (``make install`` or ``pip install -e .``).
"""

from __future__ import annotations

import json
import os
import platform
import signal
import sys
import threading
import time
from datetime import date
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from multijepa.evaluate import (attentive_probe_accuracy, knn_accuracy, linear_probe_accuracy, stratified_split,
                                token_sets)
from multijepa.plot import plot_runs
from multijepa.recipe import Recipe, load_recipe
from multijepa.train import pretrain

ROOT = Path(__file__).resolve().parent.parent


def load_average() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def wait_until_quiet(max_load: float = 1.3, give_up_minutes: float = 40.0) -> float:
    """Sleep a minute at a time until the 1-minute load average is below ``max_load`` (other jobs
    on a shared machine distort a time budget), or until ``give_up_minutes``; returns the load."""
    deadline = time.time() + give_up_minutes * 60
    while True:
        load = load_average()
        if load < max_load or time.time() > deadline:
            print(f"load average {load:.2f}: {'starting' if load < max_load else 'gave up waiting, starting'}",
                  flush=True)
            return load
        print(f"load average {load:.2f} >= {max_load}: waiting", flush=True)
        time.sleep(60)


def calibrated_steps(recipe_path: str, overrides: list[str], out: Path, minutes: float) -> int:
    """Steps of this exact recipe that fit ``minutes``: 30 steps are timed after 10 warm-up steps."""
    calib = load_recipe(recipe_path, overrides + [f"run.dir={out / 'calib'}", "train.steps=40",
                                                  "train.log_every=10", "run.resume=false"])
    pretrain(calib)
    rows = [json.loads(line) for line in (out / "calib/metrics.jsonl").read_text().splitlines()]
    per_s = float(np.mean([r["samples_per_s"] for r in rows[1:]]))
    steps = int(minutes * 60 * per_s / calib.data.batch_size)
    print(f"calibration: {per_s:.1f} samples/s -> {steps} steps in {minutes:.1f} min", flush=True)
    return steps


def plot_run(run_dir: Path) -> Path:
    """The run's curves as ``RUN_DIR/metrics.png`` (what ``multijepa plot RUN_DIR`` draws)."""
    out = plot_runs([run_dir])
    print(f"curves: {out}", flush=True)
    return out


def pretrain_for_at_most(recipe: Recipe, seconds: float) -> bool:
    """Pretrain (and plot the run); at the deadline ask the trainer to stop (it checkpoints the step it
    is on, as on SIGTERM). Returns True when the deadline cut the run short."""
    signal.signal(signal.SIGALRM, lambda *_: os.kill(os.getpid(), signal.SIGTERM))
    signal.alarm(max(1, int(seconds)))
    try:
        pretrain(recipe)
        return False
    except KeyboardInterrupt:
        return True
    finally:
        signal.alarm(0)
        plot_run(Path(recipe.run.dir))


def _cpu_watchdog(seconds: float) -> threading.Event:
    """SIGTERM this process once it has used ``seconds`` of CPU time (the trainer then checkpoints)."""
    done = threading.Event()

    def watch() -> None:
        while not done.wait(1.0):
            if time.process_time() > seconds:
                os.kill(os.getpid(), signal.SIGTERM)
                return

    threading.Thread(target=watch, daemon=True).start()
    return done


def train_for_cpu_seconds(recipe_path: str, overrides: list[str], run_dir: Path, seconds: float) -> dict:
    """Calibrate CPU seconds per step (steps 10 to 40 of this recipe), then train for ``seconds`` (and plot it).
    A run that already finished (its ``bench_train.json`` exists) is kept: rerunning the script redoes
    only the probes."""
    done_file = run_dir / "bench_train.json"
    if done_file.exists():
        return json.loads(done_file.read_text())
    calib = run_dir.parent / f"{run_dir.name}_calib"
    pretrain(load_recipe(recipe_path, overrides + [f"run.dir={calib}", "train.steps=10", "run.resume=false"]))
    t0 = time.process_time()
    pretrain(load_recipe(recipe_path, overrides + [f"run.dir={calib}", "train.steps=40", "run.resume=true"]))
    per_step = (time.process_time() - t0) / 30
    steps = max(1, int(seconds / per_step))
    print(f"{run_dir.name}: {per_step:.3f} CPU s per step -> {steps} steps in {seconds / 60:.1f} CPU min", flush=True)
    recipe = load_recipe(recipe_path, overrides + [f"run.dir={run_dir}", f"train.steps={steps}", "run.resume=false",
                                                   f"train.checkpoint_every={max(steps // 10, 1)}"])
    start, wall = time.process_time(), time.perf_counter()
    done = _cpu_watchdog(start + 1.15 * seconds)
    try:
        pretrain(recipe)
        cut = False
    except KeyboardInterrupt:
        cut = True
    finally:
        done.set()
    result = {"steps_planned": steps, "steps": final_step(run_dir), "cut_by_watchdog": cut,
              "cpu_minutes": round((time.process_time() - start) / 60, 1),
              "wall_minutes": round((time.perf_counter() - wall) / 60, 1), "cpu_s_per_step": round(per_step, 3)}
    done_file.write_text(json.dumps(result))
    plot_run(run_dir)
    return result


def final_step(run: Path) -> int:
    return int(torch.load(run / "last.pt", weights_only=True)["step"])


def dev_splits(files: list, labels: np.ndarray, out: Path, validate: bool) -> tuple[list, np.ndarray, np.ndarray,
                                                                                  np.ndarray, Path]:
    """A labelled dev folder's splits: a stratified 20% test split (seed 0) that pretraining never sees,
    its other 80% written as ``out/train.txt`` for ``data.path``. With ``validate`` the probes' split is
    inside those 80% instead (a fifth, seed 1), so the test files are not read at all. Returns (files,
    labels, probe-fit rows, probe-score rows, the file list)."""
    train_idx, test_idx = stratified_split(labels, 0.2, seed=0)
    filelist = out / "train.txt"
    filelist.write_text("".join(f"{Path(files[i]).resolve()}\n" for i in train_idx))
    if validate:
        fit, val = stratified_split(labels[train_idx], 0.2, seed=1)
        return [files[i] for i in train_idx], labels[train_idx], fit, val, filelist
    return list(files), labels, train_idx, test_idx, filelist


def probe_scores(features: np.ndarray, labels: np.ndarray, train_idx: np.ndarray, test_idx: np.ndarray,
                 tokens: Optional[tuple[np.ndarray, np.ndarray]] = None) -> dict:
    """Linear-probe and kNN test accuracy of frozen features on one train/test split; with ``tokens``
    (tokens [S, T, D], pad [S, T], as :func:`embed_for_probes` gives) the attentive probe's too."""
    tr, te = train_idx, test_idx
    scores = {"linear": linear_probe_accuracy(features[tr], labels[tr], features[te], labels[te]),
              "knn": knn_accuracy(features[tr], labels[tr], features[te], labels[te])}
    if tokens is not None:
        x, pad = tokens
        scores["attentive"] = attentive_probe_accuracy(x[tr], pad[tr], labels[tr], x[te], pad[te], labels[te])
    return scores


def embed_for_probes(model, files: list, attentive: bool, **kwargs) -> tuple[np.ndarray, Optional[tuple]]:
    """An encoder's pooled features of ``files`` [S, D] and, with ``attentive``, every view's tokens as
    (tokens [S, T, D], pad [S, T]) for the attentive probe (the pooled features then come from the same
    pass, as ``embed`` pools them)."""
    if not attentive:
        return model.embed(files, **kwargs), None
    tokens, pad, pooled = token_sets(model.embed(files, tokens=True, windows=True, **kwargs))
    return pooled, (tokens, pad)


def provenance(threads: Optional[int] = None) -> dict:
    """Date, machine and the command line, for results.json and docs/results.md."""
    threads = threads or torch.get_num_threads()
    return {"date": str(date.today()),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {threads} torch thread(s), "
                       f"torch {torch.__version__}",
            "command": " ".join(["python", *sys.argv])}
