"""Representation quality on five UCR/UEA sets: JEPA vs the same encoder at random init vs 1-NN Euclidean.

    OMP_NUM_THREADS=1 .venv/bin/python bench/quality_timeseries.py --data ../shared/data/timeseries

For each set, one model is pretrained on the TRAIN split (labels unused) with recipes/timeseries.yaml
(length and channels taken from the data), then a linear probe is fitted on frozen TRAIN embeddings
and scored on TEST embeddings; the same for the encoder at random init. Also reported: a 5-fold
cross-validated probe on TRAIN alone (what the recipe was tuned on: TEST is not looked at for
tuning), a cosine kNN probe, and 1-nearest-neighbour Euclidean distance on the raw series (computed
here; for unequal-length JapaneseVowels on the archive's equal-length `_eq` version and on
zero-padded raw series). Prints a Markdown table and writes results.json (results_seedsK-M.json with
``--first-seed``; ``--cv-only`` writes cv_results.json, TRAIN figures alone).

``--for SET:KEY=VALUE`` adds an override for one set only (after the shared ones), e.g. a longer
pretraining for the largest set. docs/results.md gives the overrides behind its table.

With ``--seeds N`` every set is pretrained N times (``train.seed`` = 0 .. N-1: data order, masks and
initialisation) and the random-init baseline is drawn N times (init seeds 0 .. N-1; ``--first-seed K``
starts both at K, to add seeds to an earlier run); the table gives
means (and the spread), and the verdicts compare means. On 40-series test sets a single run moves in
steps of 2.5 points, so one seed decides little.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

from common import embed_for_probes, provenance
from multijepa.readers.series import read_series
from multijepa.embed import Embedder, load
from multijepa.evaluate import (attentive_probe_accuracy, knn_accuracy, linear_probe_accuracy, probe_features,
                                stratified_folds)
from multijepa.plot import plot_runs
from multijepa.recipe import TimeSeriesConfig, load_recipe
from multijepa.train import pretrain

ROOT = Path(__file__).resolve().parent.parent
SETS = ("GunPoint", "ArrowHead", "ItalyPowerDemand", "BasicMotions", "JapaneseVowels")
PUBLISHED_1NN_ED = {"GunPoint": 0.913, "ArrowHead": 0.800, "ItalyPowerDemand": 0.955}


def labelled(path: Path) -> tuple[list[np.ndarray], list[str]]:
    found = read_series(path, TimeSeriesConfig())
    return found.series, [str(v) for v in found.labels]


def flat_series(train: list[np.ndarray], test: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """[C, L] series, zero-padded to the longest (no padding when equal) and flattened: (train, test) rows."""
    n = max(x.shape[1] for x in train + test)
    flat = lambda xs: np.stack([np.pad(x, ((0, 0), (0, n - x.shape[1]))).ravel() for x in xs]).astype(np.float64)
    return flat(train), flat(test)


def one_nn_euclidean(train: list[np.ndarray], y_train: np.ndarray, test: list[np.ndarray], y_test: np.ndarray) -> float:
    """1-NN accuracy with Euclidean distance on series zero-padded to the longest (no padding when equal)."""
    a, b = flat_series(train, test)
    d = (b**2).sum(1, keepdims=True) - 2 * b @ a.T + (a**2).sum(1)
    return float((y_train[d.argmin(1)] == y_test).mean())


def one_nn_euclidean_cv(series: list[np.ndarray], labels: np.ndarray, folds: int = 5) -> float:
    """1-NN Euclidean accuracy by stratified k-fold on one split (TRAIN), the folds of the probes' CV."""
    parts = stratified_folds(labels, folds)
    hits = 0
    for i, te in enumerate(parts):
        tr = np.concatenate(parts[:i] + parts[i + 1:])
        hits += one_nn_euclidean([series[j] for j in tr], labels[tr], [series[j] for j in te], labels[te]) * len(te)
    return hits / len(labels)


def baselines(name: str, data: Path) -> dict:
    """The raw-series baselines of a set: 1-NN Euclidean (on the archive's equal-length ``_eq`` files where a
    set has them, and on zero-padded series) and the linear probe of the encoders, fitted on the raw values."""
    x_train, l_train = labelled(data / name / f"{name}_TRAIN.ts")
    x_test, l_test = labelled(data / name / f"{name}_TEST.ts")
    classes = sorted(set(l_train) | set(l_test))
    y_train = np.array([classes.index(v) for v in l_train])
    y_test = np.array([classes.index(v) for v in l_test])
    raw_train, raw_test = flat_series(x_train, x_test)
    result = {"one_nn_ed": one_nn_euclidean(x_train, y_train, x_test, y_test),
              "raw_linear": linear_probe_accuracy(raw_train, y_train, raw_test, y_test)}
    eq_train, eq_test = data / name / f"{name}_eq_TRAIN.ts", data / name / f"{name}_eq_TEST.ts"
    if eq_train.exists():  # unequal length: also the archive's equal-length version
        result["one_nn_ed_padded"] = result["one_nn_ed"]
        (xe_train, le_train), (xe_test, le_test) = labelled(eq_train), labelled(eq_test)
        result["one_nn_ed"] = one_nn_euclidean(xe_train, np.array([classes.index(v) for v in le_train]),
                                               xe_test, np.array([classes.index(v) for v in le_test]))
    result["one_nn_ed_published"] = PUBLISHED_1NN_ED.get(name)
    return result


def evaluate_set(name: str, data: Path, out: Path, recipe_path: str, overrides: list[str], cv_only: bool = False,
                 seeds: int = 1, first_seed: int = 0, attentive: bool = True, reuse: bool = False) -> dict:
    train_file, test_file = data / name / f"{name}_TRAIN.ts", data / name / f"{name}_TEST.ts"
    x_train, l_train = labelled(train_file)
    x_test, l_test = labelled(test_file)
    classes = sorted(set(l_train) | set(l_test))
    y_train = np.array([classes.index(v) for v in l_train])
    y_test = np.array([classes.index(v) for v in l_test])

    result: dict = {"n_train": len(y_train), "n_test": len(y_test), "classes": len(classes), "pretrain_minutes": []}
    for seed in range(first_seed, first_seed + seeds):
        recipe = load_recipe(recipe_path, [f"data.path={train_file}", f"run.dir={out / name / f'seed{seed}'}",
                                           f"run.resume={str(reuse).lower()}", "train.progress=false",
                                           "train.threads=1", f"train.seed={seed}"] + overrides)
        t0 = time.perf_counter()
        run = pretrain(recipe)
        result["pretrain_minutes"].append(round((time.perf_counter() - t0) / 60, 2))
        plot_runs([run])  # RUN/metrics.png
        jepa = load(run / "last.pt", device="cpu")
        result.update(length=jepa.recipe.timeseries.length, channels=jepa.recipe.timeseries.channels)
        for which, model in [("jepa", jepa), ("random_init", Embedder.random_init(jepa.recipe, seed=seed, device="cpu"))]:
            f_train, t_train = embed_for_probes(model, [train_file], attentive and not cv_only)
            scores = {"train_cv_linear": probe_features(f_train, y_train, folds=5)["linear"]}
            if not cv_only:  # tuning: TEST is never embedded
                f_test, t_test = embed_for_probes(model, [test_file], attentive)
                assert len(f_train) == len(y_train) and len(f_test) == len(y_test)
                scores.update(linear=linear_probe_accuracy(f_train, y_train, f_test, y_test),
                              knn=knn_accuracy(f_train, y_train, f_test, y_test))
                if attentive:
                    scores["attentive"] = attentive_probe_accuracy(*t_train, y_train, *t_test, y_test)
            per_seed = result.setdefault(which, {}).setdefault("per_seed", [])
            per_seed.append(scores)
    for which in ("jepa", "random_init"):
        runs = result[which]["per_seed"]
        for key in runs[0]:
            values = np.array([r[key] for r in runs])
            result[which][key] = round(float(values.mean()), 4)
            result[which][f"{key}_std"] = round(float(values.std()), 4)
    if cv_only:  # the 1-NN baseline on the same TRAIN folds (on the equal-length files where a set has them)
        eq_train = data / name / f"{name}_eq_TRAIN.ts"
        x_cv, l_cv = labelled(eq_train) if eq_train.exists() else (x_train, l_train)
        result["one_nn_ed_cv"] = round(one_nn_euclidean_cv(x_cv, np.array([classes.index(v) for v in l_cv])), 4)
        return result
    result.update(baselines(name, data))
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/timeseries"))
    ap.add_argument("--out", default=str(ROOT / "bench/out/timeseries"))
    ap.add_argument("--recipe", default=str(ROOT / "recipes/timeseries.yaml"))
    ap.add_argument("--sets", nargs="*", default=list(SETS))
    ap.add_argument("--cv-only", action="store_true", help="tuning: 5-fold CV on TRAIN only, TEST never embedded")
    ap.add_argument("--baselines-only", action="store_true",
                    help="only the raw-series baselines (1-NN Euclidean, linear probe on raw values); no pretraining")
    ap.add_argument("--seeds", type=int, default=1, help="pretraining runs (and random inits) per set, averaged")
    ap.add_argument("--first-seed", type=int, default=0, help="seeds run are first-seed .. first-seed + seeds - 1")
    ap.add_argument("--for", dest="per_set", action="append", default=[], metavar="SET:KEY=VALUE",
                    help="a recipe override for one set only (repeatable), e.g. JapaneseVowels:train.steps=4000")
    ap.add_argument("--no-attentive", action="store_true", help="skip the attentive probe (linear and kNN only)")
    ap.add_argument("--reuse", action="store_true",
                    help="probe the runs already under --out that reached train.steps (same recipe) instead of "
                         "pretraining them again; their pretrain minutes then read 0")
    ap.add_argument("overrides", nargs="*", help="extra recipe overrides for every set, e.g. train.steps=300")
    args = ap.parse_args()
    per_set: dict[str, list[str]] = {}
    for item in args.per_set:
        name, _, override = item.partition(":")
        if name not in args.sets or "=" not in override:
            ap.error(f"--for {item}: expected SET:KEY=VALUE with SET one of {', '.join(args.sets)}")
        per_set.setdefault(name, []).append(override)
    unknown = [name for name in args.sets if not (Path(args.data) / name).is_dir()]
    if unknown:  # e.g. overrides written after --sets, which takes every word that follows it
        ap.error(f"--sets: no data set folder {', '.join(unknown)} under {args.data}; put recipe overrides "
                 f"before --sets")
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    if args.baselines_only:  # scored on TEST: every run of this is a look at the test splits
        results = {name: baselines(name, Path(args.data)) for name in args.sets}
        (out / "results_baselines.json").write_text(json.dumps({"meta": provenance(1), "sets": results}, indent=2))
        print("| set | 1-NN ED | linear probe on the raw series |\n|---|---|---|")
        for name, r in results.items():
            print(f"| {name} | {r['one_nn_ed']:.3f} | {r['raw_linear']:.3f} |")
        return
    for name in args.sets:
        results[name] = evaluate_set(name, Path(args.data), out, args.recipe, args.overrides + per_set.get(name, []),
                                     args.cv_only, args.seeds, args.first_seed, not args.no_attentive,
                                     args.reuse)
        print(name, json.dumps(results[name]), flush=True)
    meta = {"date": str(date.today()), "machine": f"{platform.machine()}, torch {torch.__version__}, 1 thread",
            "command": " ".join(["python", *sys.argv])}
    last_seed = args.first_seed + args.seeds - 1
    file_name = "results.json" if args.first_seed == 0 else f"results_seeds{args.first_seed}-{last_seed}.json"
    if args.cv_only:  # TRAIN figures only, in a file of their own: a tuning run never replaces a TEST table
        file_name = "cv_" + file_name
    # a run that adds seeds (--first-seed) does not overwrite the earlier run's file
    (out / file_name).write_text(json.dumps({"meta": meta, "sets": results}, indent=2))
    if args.cv_only:
        for name, r in results.items():
            print(f"{name:18s} train 5-fold CV linear: JEPA {r['jepa']['train_cv_linear']:.3f}  "
                  f"random init {r['random_init']['train_cv_linear']:.3f}  1-NN ED {r['one_nn_ed_cv']:.3f}")
        return
    print(f"\nMeans over {args.seeds} seed(s) ({args.first_seed} .. {last_seed}), spread (std) in brackets:\n")
    print("| set | train / test | JEPA linear | random-init linear | 1-NN ED | raw linear | JEPA > random? "
          "| JEPA > 1-NN ED? | JEPA kNN / random kNN | JEPA attentive / random attentive | train 5-fold CV, JEPA / random | pretrain per seed (wall) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        ed = f"{r['one_nn_ed']:.3f}" + (f" (published {r['one_nn_ed_published']:.3f})" if r["one_nn_ed_published"] else "")
        if "one_nn_ed_padded" in r:
            ed += f" (`_eq` files; zero-padded raw {r['one_nn_ed_padded']:.3f})"
        j, rnd = r["jepa"]["linear"], r["random_init"]["linear"]
        verdict = lambda a, b: "yes" if a > b else "tie" if a == b else "no"
        spread = lambda which: f" ({r[which]['linear_std']:.3f})" if args.seeds > 1 else ""
        print(f"| {name} | {r['n_train']} / {r['n_test']} | {j:.3f}{spread('jepa')} | {rnd:.3f}{spread('random_init')} "
              f"| {ed} | {r['raw_linear']:.3f} | {verdict(j, rnd)} | {verdict(j, r['one_nn_ed'])} "
              f"| {r['jepa']['knn']:.3f} / {r['random_init']['knn']:.3f} "
              f"| {r['jepa'].get('attentive', float('nan')):.3f} / {r['random_init'].get('attentive', float('nan')):.3f} "
              f"| {r['jepa']['train_cv_linear']:.3f} / {r['random_init']['train_cv_linear']:.3f} "
              f"| {np.mean(r['pretrain_minutes']):.1f} min |")


if __name__ == "__main__":
    main()
