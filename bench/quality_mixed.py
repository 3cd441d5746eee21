"""One JEPA on audio, images and time series at once, against one JEPA per modality, same CPU time.

    .venv/bin/python bench/quality_mixed.py --minutes 10 --part single --out bench/out/mixed
    .venv/bin/python bench/quality_mixed.py --minutes 10 --part mixed --out bench/out/mixed
    .venv/bin/python bench/quality_mixed.py --part report --out bench/out/mixed

The single-modality models (recipes/image.yaml, audio.yaml, timeseries.yaml) get ``--minutes`` of
CPU time each; the mixed model (recipes/multimodal.yaml) gets three times that, the three together.
Budgets are CPU time of the training process (one torch thread, decoding in the process itself), so
two parts may run side by side on two cores: each step count is calibrated on CPU time, and a
watchdog stops a run that overshoots its budget by 15% (it checkpoints and the probe uses that).

Probes, all on frozen mean-pooled target-encoder features:
- images: CIFAR-10 dev, a stratified 20% held out of pretraining, linear probe on the other 80%;
- audio: FSDD dev, digits; pretraining and probe training on three speakers, test on the unseen fourth;
- time series: GunPoint, ArrowHead, ItalyPowerDemand; pretraining on their TRAIN splits together
  (labels unused), probe fitted on each set's TRAIN and scored on its TEST.
The mixed model is also probed at random init (same architecture, no training).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from common import ROOT, probe_scores, provenance, train_for_cpu_seconds
from multijepa.datasets.files import list_folder
from multijepa.modalities import MODALITIES
from multijepa.embed import Embedder, load
from multijepa.evaluate import linear_probe_accuracy, stratified_split

TS_SETS = ("GunPoint", "ArrowHead", "ItalyPowerDemand")
RECIPES = {"image": "recipes/image.yaml", "audio": "recipes/audio.yaml", "timeseries": "recipes/timeseries.yaml"}
COMMON = ["train.progress=false", "train.threads=1", "data.num_workers=0", "run.resume=false"]


def splits(shared: Path, out: Path) -> dict:
    """Pretraining file lists and probe splits of the three data sets."""
    images = list_folder(shared / "images/cifar10-dev", MODALITIES["image"].extensions)
    image_labels = np.array(images.labels)
    image_train, image_test = stratified_split(image_labels, 0.2, seed=0)
    audio = sorted(str(p.resolve()) for p in (shared / "audio/fsdd-dev").glob("*.wav"))
    speakers = np.array([Path(f).name.split("_")[1] for f in audio])
    audio_test = np.flatnonzero(speakers == "theo")
    audio_train = np.flatnonzero(speakers != "theo")
    ts_train = [shared / "timeseries" / n / f"{n}_TRAIN.ts" for n in TS_SETS]
    lists = {"image": out / "image_pretrain.txt", "audio": out / "audio_pretrain.txt",
             "timeseries": out / "timeseries_pretrain.txt"}
    lists["image"].write_text("".join(f"{Path(images.files[i]).resolve()}\n" for i in image_train))
    lists["audio"].write_text("".join(f"{audio[i]}\n" for i in audio_train))
    lists["timeseries"].write_text("".join(f"{p.resolve()}\n" for p in ts_train))
    return {"lists": lists, "image": (images.files, image_labels, image_train, image_test),
            "audio": (audio, np.array([int(Path(f).name.split("_")[0]) for f in audio]), audio_train, audio_test),
            "timeseries": shared / "timeseries"}


def probe_modality(model: Embedder, modality: str, data: dict) -> dict:
    """The modality's probe accuracy (time series: per set, and their mean)."""
    if modality == "timeseries":
        from quality_timeseries import labelled

        scores = {}
        for name in TS_SETS:
            train_file, test_file = (data["timeseries"] / name / f"{name}_{s}.ts" for s in ("TRAIN", "TEST"))
            (_, l_train), (_, l_test) = labelled(train_file), labelled(test_file)
            classes = sorted(set(l_train) | set(l_test))
            y_train, y_test = (np.array([classes.index(v) for v in ls]) for ls in (l_train, l_test))
            f_train, f_test = model.embed([train_file]), model.embed([test_file])
            scores[name] = round(linear_probe_accuracy(f_train, y_train, f_test, y_test), 4)
        scores["mean"] = round(float(np.mean([scores[n] for n in TS_SETS])), 4)
        return scores
    files, labels, train_idx, test_idx = data[modality]
    features = model.embed(files, batch_size=256)
    return {k: round(v, 4) for k, v in probe_scores(features, labels, train_idx, test_idx).items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default=str(ROOT.parent / "shared/data"))
    ap.add_argument("--out", default=str(ROOT / "bench/out/mixed"))
    ap.add_argument("--minutes", type=float, default=10.0, help="CPU minutes per single-modality model "
                                                                "(the mixed model gets three times this)")
    ap.add_argument("--part", choices=["single", "mixed", "report"], required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.part == "report":
        return report(out)
    data = splits(Path(args.shared), out)
    seconds = args.minutes * 60
    results: dict = {}
    if args.part == "single":
        extra = {"audio": ["audio.sample_rate=8000"], "image": [], "timeseries": []}  # FSDD is 8 kHz
        for m, recipe in RECIPES.items():
            overrides = [f"data.path={data['lists'][m]}"] + COMMON + extra[m]
            run = out / f"single_{m}"
            results[m] = {"train": train_for_cpu_seconds(str(ROOT / recipe), overrides, run, seconds)}
            results[m]["jepa"] = probe_modality(load(run / "last.pt", device="cpu"), m, data)
            print(m, json.dumps(results[m]), flush=True)
    else:
        overrides = [f"sources.{m}.path={path}" for m, path in data["lists"].items()] + COMMON
        run = out / "mixed"
        results["train"] = train_for_cpu_seconds(str(ROOT / "recipes/multimodal.yaml"), overrides, run, 3 * seconds)
        jepa = load(run / "last.pt", device="cpu")
        rand = Embedder.random_init(jepa.recipe, device="cpu")
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        results["padding_waste"] = round(float(np.mean([r["padding_waste"] for r in metrics])), 3)
        for m in RECIPES:
            results[m] = {"jepa": probe_modality(jepa.for_modality(m), m, data),
                          "random_init": probe_modality(rand.for_modality(m), m, data)}
            print(m, json.dumps(results[m]), flush=True)
    results.update(minutes_per_modality=args.minutes, **provenance(1))
    (out / f"{args.part}.json").write_text(json.dumps(results, indent=2))


def report(out: Path) -> None:
    single, mixed = (json.loads((out / f"{p}.json").read_text()) for p in ("single", "mixed"))
    print(f"| modality, probe | mixed JEPA ({mixed['train']['cpu_minutes']} CPU min, {mixed['train']['steps']} steps) "
          f"| single-modality JEPA ({single['minutes_per_modality']} CPU min each) | mixed model at random init |")
    print("|---|---|---|---|")
    rows = [("image", "linear", "images, CIFAR-10 dev (linear)"),
            ("audio", "linear", "audio, FSDD unseen speaker (linear)")]
    rows += [("timeseries", n, f"time series, {n} (linear)") for n in TS_SETS + ("mean",)]
    for m, key, label in rows:
        print(f"| {label} | {mixed[m]['jepa'][key]:.3f} | {single[m]['jepa'][key]:.3f} "
              f"({single[m]['train']['steps']} steps) | {mixed[m]['random_init'][key]:.3f} |")
    print(f"\npadding waste a dense layout would have had (mixed run, mean over logged steps): "
          f"{mixed['padding_waste']}")


if __name__ == "__main__":
    sys.exit(main())
