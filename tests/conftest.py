"""Shared fixtures: tiny generated data and tiny recipe overrides so every test runs in seconds on CPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

torch.set_num_threads(2)
ROOT = Path(__file__).resolve().parent.parent
# The shipped recipes are package data in multijepa/recipes/; the top-level recipes/ (the README's paths) links there.
RECIPES = sorted((ROOT / "multijepa" / "recipes").glob("*.yaml"))
WORLDMODEL_RECIPES = [p for p in RECIPES if "worldmodel" in yaml.safe_load(p.read_text())]
JEPA_RECIPES = [p for p in RECIPES if p not in WORLDMODEL_RECIPES]  # the rest train a JEPA
IMAGE_RECIPE = ROOT / "recipes/image.yaml"
AUDIO_RECIPE = ROOT / "recipes/audio.yaml"

# A model small enough to train a few steps in well under a second.
TINY = ["model.dim=32", "model.depth=1", "model.heads=2", "model.predictor_dim=16", "model.predictor_depth=1",
        "model.predictor_heads=2", "data.batch_size=8", "data.num_workers=0", "train.progress=false",
        "optim.warmup_steps=2", "train.log_every=1",
        "train.precision=fp32"]  # bf16 gains nothing at this size, and exact-curve checks hold in fp32 (bf16: test_speed)
TINY_IMAGE = TINY + ["image.size=16", "image.patch_size=4", "mask.min_context=2"]
# 0.5 s clips at 8 kHz, 16 mel bins, 4 x 4 patches: a (4, 12) token grid.
TINY_AUDIO = TINY + ["audio.sample_rate=8000", "audio.clip_seconds=0.5", "audio.n_mels=16", "audio.patch_size=[4,4]",
                     "mask.min_context=2"]


@pytest.fixture(scope="session")
def shapes(tmp_path_factory) -> Path:
    """A labelled folder: 4 classes x 8 PNG images of 16 px."""
    from multijepa.datasets.synthetic import make_shapes

    return make_shapes(tmp_path_factory.mktemp("shapes"), per_class=8, size=16)


def run_cli(*args: str, cwd: Path | None = None, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``python -m multijepa ARGS`` as a user would, returning the finished process."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, "-m", "multijepa", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"multijepa {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def losses(run_dir: Path) -> dict[int, float]:
    """A run's logged loss per step, from its metrics.jsonl."""
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def check_killed_run_resumes_on_the_same_curve(args: list[str], steps: int, cwd: Path) -> None:
    """``multijepa pretrain ARGS`` (``train.steps=steps``, logging every step) run straight through, and
    again SIGKILLed right after its first checkpoint and resumed: the two loss curves must agree
    step for step, with no step missing or repeated."""
    run_cli("pretrain", *args, "run.dir=straight", cwd=cwd)
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="2")
    proc = subprocess.Popen([sys.executable, "-m", "multijepa", "pretrain", *args, "run.dir=killed"], cwd=cwd,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (cwd / "killed/last.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # no chance to clean up: only the atomic checkpoint survives
    proc.wait()
    assert max(losses(cwd / "killed")) < steps, "the run finished before it could be killed; make it longer"
    resumed = run_cli("pretrain", *args, "run.dir=killed", cwd=cwd)
    assert "resuming" in resumed.stderr
    straight, again = losses(cwd / "straight"), losses(cwd / "killed")
    assert sorted(again) == list(range(1, steps + 1))
    for step in straight:
        assert again[step] == pytest.approx(straight[step], rel=1e-4, abs=1e-6), step
TINY_TS = TINY + ["timeseries.patch_size=4", "timeseries.conv_widths=[8]", "mask.min_context=2"]


def write_ts(path: Path, series: list, labels: list | None = None, name: str = "tiny") -> Path:
    """Write series ([C, L] arrays, lengths may differ) as a sktime/aeon .ts file."""
    dims = len(series[0])
    equal = len({len(s[0]) for s in series}) == 1
    head = [f"@problemName {name}", "@timeStamps false", f"@univariate {'true' if dims == 1 else 'false'}",
            f"@dimensions {dims}", f"@equalLength {'true' if equal else 'false'}"]
    if labels is not None:
        head.append("@classLabel true " + " ".join(sorted({str(v) for v in labels})))
    else:
        head.append("@classLabel false")
    lines = [":".join(",".join(f"{v:.6g}" for v in ch) for ch in s) + (f":{labels[i]}" if labels is not None else "")
             for i, s in enumerate(series)]
    path.write_text("\n".join(["# generated for a test", *head, "@data", *lines]) + "\n")
    return path
