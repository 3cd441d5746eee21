"""Representation quality on ModelNet10 (dev copy): JEPA vs the same encoder at random init and vs the
random-init mini-PointNet alone (the tokenizer's group features, averaged); FPS + kNN timing.

    .venv/bin/python bench/quality_pointcloud.py --data ../shared/data/pointclouds/modelnet10-dev \
        --minutes 30 --wait-quiet train.threads=1

Holds out a stratified 20% of the shapes as the probe's test split; pretrains on the other 80%
(labels unused) for a fixed number of steps chosen to fit --minutes of CPU time (measured on a
short calibration run), then fits a linear probe and a kNN classifier on frozen features (the mean
of the target encoder's group tokens). Also times farthest point sampling + kNN grouping for a
batch of 32 clouds of 1024 and of 8192 points (on the CPU, and on CUDA when there is one).
Prints the results as JSON and a Markdown table row. ``--validate`` fits the probes on four fifths
of the pretraining shapes and scores them on the fifth left (for choosing settings; the held-out
20% are not read).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from common import (ROOT, calibrated_steps, dev_splits, embed_for_probes, final_step, load_average,
                    pretrain_for_at_most, probe_scores, provenance, wait_until_quiet)

from multijepa.datasets.files import list_folder
from multijepa.modalities import MODALITIES
from multijepa.embed import Embedder, load
from multijepa.recipe import load_recipe
from multijepa.tokenizers.pointcloud import group_points


def time_grouping(device: str, points: int, batch: int = 32, groups: int = 64, size: int = 32,
                  repeats: int = 5) -> float:
    """Median milliseconds of FPS + kNN grouping for ``batch`` clouds of ``points`` points."""
    x = torch.rand(batch, points, 3, device=device)
    times = []
    for i in range(repeats + 1):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        group_points(x, groups, size)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i:  # the first call warms up kernels and allocators
            times.append((time.perf_counter() - t0) * 1000)
    return float(np.median(times))


@torch.no_grad()
def mini_pointnet_features(files: list[str], recipe, seed: int = 0) -> np.ndarray:
    """The simple baseline: the recipe's tokenizer alone (FPS + kNN groups through the mini-PointNet) at
    random init, its group tokens averaged per cloud [N, D]; no transformer."""
    from multijepa.modalities.pointcloud import _embed_views

    torch.manual_seed(seed)
    tokenizer = MODALITIES["pointcloud"].tokenizer(recipe.pointcloud, recipe.model.dim).eval()
    rows = []
    for start in range(0, len(files), 128):
        batch = torch.stack([_embed_views(f, recipe.pointcloud, f)[0][0] for f in files[start:start + 128]])
        rows.append(tokenizer(batch)[0].mean(1))
    return torch.cat(rows).numpy()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/pointclouds/modelnet10-dev"))
    ap.add_argument("--out", default=str(ROOT / "bench/out/pointcloud"))
    ap.add_argument("--minutes", type=float, default=30.0, help="pretraining budget (wall clock, this machine)")
    ap.add_argument("--steps", type=int, default=0, help="fixed step count instead of --minutes")
    ap.add_argument("--recipe", default=str(ROOT / "recipes/pointcloud.yaml"))
    ap.add_argument("--wait-quiet", action="store_true", help="wait for a 1-min load average below 1.3 first")
    ap.add_argument("--jepa-only", action="store_true", help="skip the baselines and timings (quick experiments)")
    ap.add_argument("--baselines-only", action="store_true",
                    help="only the baselines (random-init encoder, random-init mini-PointNet alone); no pretraining")
    ap.add_argument("--validate", action="store_true",
                    help="probe on a validation fifth of the pretraining shapes (fitted on the other four fifths); "
                         "the held-out 20%% are not read, for choosing settings")
    ap.add_argument("--no-attentive", action="store_true", help="skip the attentive probe (linear and kNN only)")
    ap.add_argument("overrides", nargs="*", help="extra recipe overrides")
    args = ap.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    index = list_folder(args.data, MODALITIES["pointcloud"].extensions)
    # With --validate pretraining still sees all its shapes; the probe splits them.
    files, labels, train_idx, test_idx, filelist = dev_splits(index.files, np.array(index.labels), out, args.validate)
    start_load = wait_until_quiet() if args.wait_quiet else load_average()
    base = [f"data.path={filelist}", "train.progress=false"] + args.overrides
    if args.baselines_only:
        recipe = load_recipe(args.recipe, base)
        feats, tokens = embed_for_probes(Embedder.random_init(recipe), files, not args.no_attentive,
                                         batch_size=128, num_workers=2)
        results = {"random_init": probe_scores(feats, labels, train_idx, test_idx, tokens),
                   "mini_pointnet": probe_scores(mini_pointnet_features(files, recipe), labels, train_idx, test_idx),
                   **provenance(torch.get_num_threads())}
        (out / f"results_baselines{'_validation' if args.validate else ''}.json").write_text(json.dumps(results, indent=2))
        print(json.dumps(results, indent=2))
        return
    # Aim a minute short of the budget: the deadline below stops a run that the machine slows.
    steps = args.steps or calibrated_steps(args.recipe, base, out, args.minutes - 1)
    recipe = load_recipe(args.recipe, base + [f"run.dir={out / 'run'}", f"train.steps={steps}",
                                              f"train.checkpoint_every={max(steps // 10, 1)}"])
    t0 = time.perf_counter()
    cut_short = pretrain_for_at_most(recipe, args.minutes * 60)
    train_minutes = (time.perf_counter() - t0) / 60
    run = Path(recipe.run.dir)
    steps_done = final_step(run)

    results: dict = {}
    jepa = load(run / "last.pt")
    models = [("jepa", jepa)] + ([] if args.jepa_only else [("random_init", Embedder.random_init(jepa.recipe))])
    for name, model in models:
        feats, tokens = embed_for_probes(model, files, not args.no_attentive, batch_size=128, num_workers=2)
        results[name] = probe_scores(feats, labels, train_idx, test_idx, tokens)
    if not args.jepa_only:
        results["mini_pointnet"] = probe_scores(mini_pointnet_features(files, jepa.recipe), labels, train_idx,
                                                test_idx)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    results["final_target_erank"] = round(metrics[-1]["target_erank"], 2)
    if args.jepa_only:
        print(json.dumps({"split": "validation" if args.validate else "test", **results}))
        return
    threads = torch.get_num_threads()
    timings = {"cpu_threads": threads}
    for points in (1024, 8192):
        timings[f"cpu_32x{points}_ms"] = round(time_grouping("cpu", points), 1)
        if torch.cuda.is_available():
            timings[f"cuda_32x{points}_ms"] = round(time_grouping("cuda", points), 2)
    results["fps_knn_64x32"] = timings
    results.update(split="validation (4 fifths of train / 1 fifth)" if args.validate else "test",
                   steps=steps_done, steps_planned=steps, cut_at_deadline=cut_short,
                   train_minutes=round(train_minutes, 1), load_average_at_start=start_load,
                   n_train=len(train_idx), n_test=len(test_idx), **provenance(threads))
    (out / ("results_validation.json" if args.validate else "results.json")).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    split = "validation " if args.validate else ""
    print(f"| ModelNet10 dev ({split}{len(train_idx)}/{len(test_idx)}) | {steps_done} steps, {train_minutes:.1f} min | "
          f"{results['jepa']['linear']:.3f} | {results['random_init']['linear']:.3f} | "
          f"{results['jepa']['knn']:.3f} | {results['random_init']['knn']:.3f} | "
          f"{results['mini_pointnet']['linear']:.3f} / {results['mini_pointnet']['knn']:.3f} |")


if __name__ == "__main__":
    main()
