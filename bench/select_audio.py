"""Choose the configuration of bench/quality_audio.py without looking at its test speaker.

Each configuration (one quoted argument of recipe overrides; "" is the recipe as it is) is pretrained
on every FSDD-dev file except the test speaker's, then its checkpoints along the run are probed on
the training speakers alone: a linear and a kNN probe fitted on two of them and scored on the third,
in every rotation. ``RANDOM`` (plus overrides) scores the encoder at random init. The test speaker's
files are never read. One torch thread; each pretraining runs in a subprocess so that its
checkpoints can be copied as they are written. Lines go to stdout and to OUT/val.log.

    PYTHONPATH=. .venv/bin/python bench/select_audio.py --steps 600 --every 300 \
        RANDOM "" "loss.regularizer_weight=2.0 model.predictor_depth=1"
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from common import ROOT

from multijepa.embed import Embedder, load
from multijepa.evaluate import knn_accuracy, linear_probe_accuracy
from multijepa.recipe import load_recipe

RECIPE = str(ROOT / "recipes/audio.yaml")


def rotations(features: np.ndarray, digits: np.ndarray, speakers: np.ndarray) -> tuple[list[float], list[float]]:
    """Linear and kNN accuracy with each training speaker held out in turn."""
    linear, knn = [], []
    for held_out in sorted(set(speakers)):
        te, tr = np.flatnonzero(speakers == held_out), np.flatnonzero(speakers != held_out)
        linear.append(round(linear_probe_accuracy(features[tr], digits[tr], features[te], digits[te]), 3))
        knn.append(round(knn_accuracy(features[tr], digits[tr], features[te], digits[te]), 3))
    return linear, knn


def pretrain_with_snapshots(overrides: list[str], out: Path) -> list[tuple[int, Path]]:
    """Pretrain in a subprocess, copying last.pt each time the trainer rewrites it; returns (step, copy)."""
    code = ("import torch; torch.set_num_threads(1)\nfrom multijepa.recipe import load_recipe\n"
            f"from multijepa.train import pretrain\npretrain(load_recipe({RECIPE!r}, {overrides!r}))")
    with open(f"{out}.out", "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT)
        seen, copies = None, []
        while True:
            finished = proc.poll() is not None
            ckpt = out / "last.pt"
            if ckpt.exists() and ckpt.stat().st_mtime != seen:
                seen = ckpt.stat().st_mtime
                step = int(torch.load(ckpt, weights_only=True, map_location="cpu")["step"])
                if step not in [s for s, _ in copies]:
                    copies.append((step, Path(shutil.copy(ckpt, f"{out}__{step}.pt"))))
            if finished:
                break
            time.sleep(3)
    if proc.returncode:
        raise SystemExit(f"pretraining failed with {overrides}: see {out}.out")
    return copies


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/audio/fsdd-dev"))
    ap.add_argument("--test-speaker", default="theo", help="left out entirely (the bench's test split)")
    ap.add_argument("--out", default=str(ROOT / "bench/out/select_audio"))
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--every", type=int, default=300, help="probe the checkpoint every this many steps")
    ap.add_argument("configs", nargs="+", help='quoted recipe overrides per configuration; "" = as is; RANDOM ...')
    args = ap.parse_args()
    torch.set_num_threads(1)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files = sorted(str(p.resolve()) for p in Path(args.data).glob("*.wav")
                   if p.name.split("_")[1] != args.test_speaker)
    digits = np.array([int(Path(f).name.split("_")[0]) for f in files])
    speakers = np.array([Path(f).name.split("_")[1] for f in files])
    (out / "pretrain.txt").write_text("".join(f + "\n" for f in files))

    def log(line: str) -> None:
        print(line, flush=True)
        with open(out / "val.log", "a") as fh:
            fh.write(line + "\n")

    def report(name: str, features: np.ndarray, extra: str = "") -> None:
        linear, knn = rotations(features, digits, speakers)
        log(f"{name} | {extra}lin {linear} mean {np.mean(linear):.3f} | knn {knn} mean {np.mean(knn):.3f}")

    for config in args.configs:
        words = config.split()
        if words[:1] == ["RANDOM"]:
            recipe = load_recipe(RECIPE, ["audio.sample_rate=8000"] + words[1:])
            report(config, Embedder.random_init(recipe, device="cpu").embed(files, batch_size=128), "random init | ")
            continue
        run = out / "runs" / ((config.replace(" ", "_").replace("/", "") or "default")[:100])
        shutil.rmtree(run, ignore_errors=True)
        run.parent.mkdir(parents=True, exist_ok=True)
        overrides = ["audio.sample_rate=8000", f"data.path={out / 'pretrain.txt'}", "train.progress=false",
                     "train.threads=1", "data.num_workers=0", f"train.steps={args.steps}",
                     f"train.checkpoint_every={args.every}", "train.log_every=50", f"run.dir={run}",
                     "run.resume=false"] + words
        t0 = time.time()
        snapshots = pretrain_with_snapshots(overrides, run)
        minutes = (time.time() - t0) / 60
        rows = {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
        for step, ckpt in snapshots:
            erank = rows[step]["target_erank"] if step in rows else float("nan")
            report(config or "default", load(ckpt, device="cpu").embed(files, batch_size=128),
                   f"step {step}/{args.steps} ({minutes:.1f} min) | erank {erank:.1f} | ")


if __name__ == "__main__":
    main()
