"""Representation quality on CIFAR-10 (dev copy): JEPA vs the same encoder at random init vs raw pixels.

    .venv/bin/python bench/quality_image.py --data ../shared/data/images/cifar10-dev --minutes 30

Holds out a stratified 20% of the images as the probe's test split; pretrains on the other 80%
(labels unused) for a fixed number of steps chosen to fit --minutes of CPU time (measured on a
short calibration run), then fits linear probes on frozen features. Prints a Markdown table row.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from common import ROOT, calibrated_steps, dev_splits, embed_for_probes, plot_run, probe_scores, provenance

from multijepa.datasets.files import list_folder
from multijepa.modalities import MODALITIES
from multijepa.readers import read_image
from multijepa.embed import Embedder, load
from multijepa.recipe import load_recipe
from multijepa.train import pretrain


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/images/cifar10-dev"))
    ap.add_argument("--out", default=str(ROOT / "bench/out/image"))
    ap.add_argument("--minutes", type=float, default=30.0, help="pretraining budget (wall clock, this machine)")
    ap.add_argument("--steps", type=int, default=0, help="fixed step count instead of --minutes")
    ap.add_argument("--recipe", default=str(ROOT / "recipes/image.yaml"))
    ap.add_argument("--jepa-only", action="store_true", help="skip the baselines (for quick experiments)")
    ap.add_argument("--validate", action="store_true",
                    help="probe on a validation fifth of the training images (fitted on the other four fifths); "
                         "the test images are not read, for choosing settings")
    ap.add_argument("--no-attentive", action="store_true", help="skip the attentive probe (linear and kNN only)")
    ap.add_argument("overrides", nargs="*", help="extra recipe overrides")
    args = ap.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    index = list_folder(args.data, MODALITIES["image"].extensions)
    # With --validate pretraining still sees all training images; the probe splits them.
    files, labels, train_idx, test_idx, filelist = dev_splits(index.files, np.array(index.labels), out, args.validate)
    base = [f"data.path={filelist}", "train.progress=false"] + args.overrides
    steps = args.steps or calibrated_steps(args.recipe, base, out, args.minutes)
    recipe = load_recipe(args.recipe, base + [f"run.dir={out / 'run'}", f"train.steps={steps}",
                                              f"train.checkpoint_every={max(steps // 10, 1)}"])
    t0 = time.perf_counter()
    run = pretrain(recipe)
    train_minutes = (time.perf_counter() - t0) / 60
    plot_run(run)

    def scores(model: Embedder) -> dict:
        feats, tokens = embed_for_probes(model, files, not args.no_attentive, batch_size=256, num_workers=2)
        return probe_scores(feats, labels, train_idx, test_idx, tokens)

    results = {}
    jepa = load(run / "last.pt")
    models = [("jepa", jepa)] + ([] if args.jepa_only else [("random_init", Embedder.random_init(jepa.recipe))])
    for name, model in models:
        results[name] = scores(model)
    if args.jepa_only:
        print(json.dumps({"split": "validation" if args.validate else "test", **results}))
        return
    pixels = np.stack([read_image(f).float().div(255).flatten().numpy() for f in files])
    results["raw_pixels"] = probe_scores(pixels, labels, train_idx, test_idx)
    results.update(split="validation (4 fifths of train / 1 fifth)" if args.validate else "test", steps=steps,
                   train_minutes=round(train_minutes, 1), **provenance())
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    split = "6400/1600 validation" if args.validate else "8000/2000 test"

    def cell(r: dict) -> str:
        return "/".join(f"{r[k]:.3f}" for k in ("linear", "knn", "attentive") if k in r)
    print(f"| CIFAR-10 dev ({split}) | {steps} steps, {train_minutes:.1f} min | {cell(results['jepa'])} | "
          f"{cell(results['random_init'])} | {cell(results['raw_pixels'])} |")


if __name__ == "__main__":
    main()
