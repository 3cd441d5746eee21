"""Representation quality on spoken digits (FSDD dev copy): JEPA vs the same encoder at random init vs
mean log-mel features, with a speaker held out; and feature-extraction speed on one core.

    .venv/bin/python bench/quality_audio.py --data ../shared/data/audio/fsdd-dev --minutes 30

Files are ``{digit}_{speaker}_{idx}.wav``. One speaker (``--test-speaker``, default theo) is the
probe's test split and is never seen in pretraining; pretraining uses the other speakers' files
(labels unused) for a step count chosen to fit --minutes of CPU time (measured on a short
calibration run), with one torch thread and no DataLoader workers. Linear probes (and kNN) are
then fitted on the training speakers' frozen features and scored on the held-out speaker.

The budget is CPU time of the training process, so other jobs stretch the wall clock, not the
training. Before pretraining the script still waits (up to --max-wait minutes; --no-wait skips it)
until the machine is quiet, the 1-minute load average below --quiet-load, to keep the wall clock short.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from typing import Optional
from pathlib import Path

import numpy as np
import torch
from common import (ROOT, embed_for_probes, load_average, plot_run, probe_scores, provenance, train_for_cpu_seconds,
                    wait_until_quiet)

from multijepa.readers import read_audio
from multijepa.transforms import crop_or_pad
from multijepa.embed import Embedder, load
from multijepa.recipe import load_recipe
from multijepa.tokenizers.audio import LogMel
from multijepa.train import pretrain


def extraction_speed(files: list[str], recipe, repeats: int = 1) -> dict:
    """Files per second on one thread: decode (+ resample, crop/pad) alone, and decode + log-mel per file."""
    a = recipe.audio
    logmel = LogMel.from_config(a)
    with torch.no_grad():
        logmel(torch.zeros(1, a.model_channels, a.clip_samples))  # warm-up
        t0 = time.perf_counter()
        for _ in range(repeats):
            for f in files:
                crop_or_pad(read_audio(f, a.sample_rate, a.model_channels), a.clip_samples, None)
        decode = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(repeats):
            for f in files:
                logmel(crop_or_pad(read_audio(f, a.sample_rate, a.model_channels), a.clip_samples, None)[None])
        both = time.perf_counter() - t0
        waves = torch.stack([crop_or_pad(read_audio(f, a.sample_rate, a.model_channels), a.clip_samples, None)
                             for f in files])
        t0 = time.perf_counter()
        for _ in range(repeats):
            for batch in waves.split(64):
                logmel(batch)
        batched = time.perf_counter() - t0
    n = len(files) * repeats
    return {"files": len(files), "decode_files_per_s": round(n / decode, 1),
            "decode_logmel_files_per_s": round(n / both, 1),
            "logmel_batched_64_clips_per_s": round(n / batched, 1)}


def mean_log_mel(files: list[str], recipe, with_std: bool = False) -> np.ndarray:
    """Per file: the recipe's log-mel over the whole file (no padding), averaged over time -> [N, n_mels].

    The spectrogram is normalised per clip (``audio.normalize=clip``) whatever the recipe says: under
    the per-bin normalisations (``bins``, ``bin_means``) every bin's mean over time is zero by construction, and on
    the training speakers' validation the clip-normalised mean is the stronger baseline (0.241
    against 0.222 without normalisation; docs/results.md)."""
    a = dataclasses.replace(recipe.audio, normalize="clip")
    logmel = LogMel.from_config(a)
    out = []
    with torch.no_grad():
        for f in files:
            wave = read_audio(f, a.sample_rate, a.model_channels)
            spec = logmel(crop_or_pad(wave, max(wave.shape[1], a.win_length), None)[None])[0]  # [C, F, T]
            parts = [spec.mean(-1).flatten()] + ([spec.std(-1).flatten()] if with_std else [])
            out.append(torch.cat(parts).numpy())
    return np.stack(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/audio/fsdd-dev"))
    ap.add_argument("--out", default=str(ROOT / "bench/out/audio"))
    ap.add_argument("--test-speaker", default="theo")
    ap.add_argument("--minutes", type=float, default=30.0,
                    help="pretraining budget (CPU minutes of the training process)")
    ap.add_argument("--steps", type=int, default=0, help="fixed step count instead of --minutes")
    ap.add_argument("--recipe", default=str(ROOT / "recipes/audio.yaml"))
    ap.add_argument("--quiet-load", type=float, default=1.3)
    ap.add_argument("--max-wait", type=float, default=40.0, help="minutes to wait for a quiet machine")
    ap.add_argument("--no-wait", action="store_true")
    ap.add_argument("--jepa-only", action="store_true",
                    help="only the JEPA and random-init encoders: no log-mel baselines, no speed (quick experiments)")
    ap.add_argument("--no-attentive", action="store_true", help="skip the attentive probe (linear and kNN only)")
    ap.add_argument("overrides", nargs="*", help="extra recipe overrides")
    args = ap.parse_args()
    torch.set_num_threads(1)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files = sorted(str(p.resolve()) for p in Path(args.data).glob("*.wav"))
    digits = np.array([int(Path(f).name.split("_")[0]) for f in files])
    speakers = np.array([Path(f).name.split("_")[1] for f in files])
    if args.test_speaker not in set(speakers):
        sys.exit(f"--test-speaker {args.test_speaker}: not among the speakers {sorted(set(speakers))}")
    test_idx = np.flatnonzero(speakers == args.test_speaker)
    train_idx = np.flatnonzero(speakers != args.test_speaker)
    filelist = out / "pretrain.txt"
    filelist.write_text("".join(f"{files[i]}\n" for i in train_idx))

    # One core: one torch thread, decoding in the training process itself.
    base = [f"data.path={filelist}", "train.progress=false", "train.threads=1", "data.num_workers=0"]
    base += args.overrides
    t0 = time.time()
    load_at_start = load_average() if args.no_wait else wait_until_quiet(args.quiet_load, args.max_wait)
    waited = (time.time() - t0) / 60
    run = out / "run"
    if args.steps:
        recipe = load_recipe(args.recipe, base + [f"run.dir={run}", f"train.steps={args.steps}",
                                                  f"train.checkpoint_every={max(args.steps // 10, 1)}"])
        t0 = time.perf_counter()
        pretrain(recipe)
        plot_run(run)
        training = {"steps": args.steps, "wall_minutes": round((time.perf_counter() - t0) / 60, 1)}
    else:  # a CPU-time budget: other jobs on the machine stretch the wall clock, not the training
        training = train_for_cpu_seconds(args.recipe, base, run, args.minutes * 60)
        recipe = load_recipe(args.recipe, base + [f"run.dir={run}"])
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]

    def probe(features: np.ndarray, tokens: Optional[tuple] = None) -> dict:
        return probe_scores(features, digits, train_idx, test_idx, tokens)

    results: dict = {}
    jepa = load(run / "last.pt", device="cpu")
    for name, model in [("jepa", jepa), ("random_init", Embedder.random_init(jepa.recipe, device="cpu"))]:
        results[name] = probe(*embed_for_probes(model, files, not args.no_attentive, batch_size=128))
    results["final_target_erank"] = round(metrics[-1]["target_erank"], 2)
    if not args.jepa_only:
        results["mean_log_mel"] = probe(mean_log_mel(files, recipe))
        results["mean_std_log_mel"] = probe(mean_log_mel(files, recipe, with_std=True))
        results["speed"] = extraction_speed(files[:500], recipe)
    results.update(training=training, waited_minutes=round(waited, 1),
                   load_at_start=load_at_start, n_pretrain=len(train_idx), n_test=len(test_idx),
                   test_speaker=args.test_speaker, **provenance(1))
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    if not args.jepa_only:
        print(f"| FSDD, test speaker {args.test_speaker} ({len(train_idx)}/{len(test_idx)}) "
              f"| {training['steps']} steps "
              f"| {results['jepa']['linear']:.3f} | {results['random_init']['linear']:.3f} | "
              f"{results['mean_log_mel']['linear']:.3f} |")


if __name__ == "__main__":
    main()
