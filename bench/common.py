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
import time
from datetime import date
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from multijepa.evaluate import knn_accuracy, linear_probe_accuracy
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
    print(f"calibration: {per_s:.1f} samples/s -> {steps} steps in {minutes} min", flush=True)
    return steps


def pretrain_for_at_most(recipe: Recipe, seconds: float) -> bool:
    """Pretrain; at the deadline ask the trainer to stop (it checkpoints the step it is on, as on
    SIGTERM). Returns True when the deadline cut the run short."""
    signal.signal(signal.SIGALRM, lambda *_: os.kill(os.getpid(), signal.SIGTERM))
    signal.alarm(max(1, int(seconds)))
    try:
        pretrain(recipe)
        return False
    except KeyboardInterrupt:
        return True
    finally:
        signal.alarm(0)


def final_step(run: Path) -> int:
    return int(torch.load(run / "last.pt", weights_only=True)["step"])


def probe_scores(features: np.ndarray, labels: np.ndarray, train_idx: np.ndarray, test_idx: np.ndarray) -> dict:
    """Linear-probe and kNN test accuracy of frozen features on one train/test split."""
    tr, te = train_idx, test_idx
    return {"linear": linear_probe_accuracy(features[tr], labels[tr], features[te], labels[te]),
            "knn": knn_accuracy(features[tr], labels[tr], features[te], labels[te])}


def provenance(threads: Optional[int] = None) -> dict:
    """Date, machine and the command line, for results.json and docs/results.md."""
    threads = threads or torch.get_num_threads()
    return {"date": str(date.today()),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {threads} torch thread(s), "
                       f"torch {torch.__version__}",
            "command": " ".join(["python", *sys.argv])}
