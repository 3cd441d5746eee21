"""Video representation quality on moving MNIST digits: JEPA vs the same encoder at random init, probed
for the digit and for its direction of motion; and clips per second decoded + tokenized from KTH.

    .venv/bin/python bench/quality_video.py --minutes 30            # the reported run (test split)
    .venv/bin/python bench/quality_video.py --eval val --minutes 6  # choosing settings (validation split)
    .venv/bin/python bench/quality_video.py --speed-only            # KTH clips per second, each backend
    .venv/bin/python bench/quality_video.py --baselines-only        # raw pixels (each video's mean frame)
    .venv/bin/python bench/quality_video.py --eval val --checkpoint OUT/run_test/last.pt  # probe a finished run

The moving-digits set (``make_moving_digits``), deterministic given ``--seed``:

* MNIST test images (``../shared/data/images/mnist-test10k``, IDX gzip): images 0-7999 make the
  training videos, images 8000-9999 the test videos, so a test digit image is never seen in training.
* Each video is ``--frames`` (16) grayscale frames of a 64 x 64 black canvas holding one 28 x 28 digit
  that moves in a straight line at constant speed: direction one of 8 (0 = right, then every 45
  degrees counter-clockwise: 1 = up-right, 2 = up, ... 7 = down-right), speed uniform in
  [1, 2] px per frame (at most 30 px over 16 frames; the digit has 36 px of room). The start is
  drawn uniformly among positions that keep the whole digit on the canvas for every frame (no
  bouncing, so the direction never changes). Positions are rounded to whole pixels.
* Written as H.264 mp4 (crf 12, 25 fps) to ``--out``/digits/{train,test}/; labels (digit and
  direction) in ``labels.json``.

Pretraining reads the training videos through the ordinary video pipeline (labels unused), on one
torch thread with no DataLoader workers, for a step count fitted to ``--minutes`` by a 40-step
calibration run. Linear probes (``multijepa.evaluate.linear_probe_accuracy``) on frozen, pooled
features are then fitted on the training videos and scored on the test videos (``--eval test``), or,
for choosing settings, fitted on 80% of the training videos and scored on the other 20%
(``--eval val``); the test videos are then not read at all. The field's simple baseline is probed the
same way: each video's frames averaged into one 64 x 64 image of raw pixels.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from common import ROOT, calibrated_steps, embed_for_probes, load_average, plot_run, probe_scores, provenance

from multijepa.embed import Embedder, load
from multijepa.evaluate import linear_probe_accuracy, stratified_split
from multijepa.modalities import MODALITIES
from multijepa.modalities.video import read_clips
from multijepa.readers.video import open_video, write_video
from multijepa.recipe import load_recipe
from multijepa.train import pretrain

CANVAS, DIGIT = 64, 28
DIRECTIONS = 8

# Settings chosen on the validation split (docs/results.md): 8 consecutive frames of the 64 px canvas
# (a 4 x 8 x 8 grid of 2 x 8 x 8 tubelets), grayscale, a small encoder, tube masks.
BENCH = ["video.frames=8", "video.frame_stride=1", "video.size=64", "video.channels=1", "video.mean=[0.05]",
         "video.std=[0.2]", "video.patch_size=8", "video.crop_scale=[0.6,1.0]", "video.hflip=false",
         "video.embed_clips=3", "model.dim=128", "model.depth=4", "model.heads=4", "model.predictor_dim=64",
         "model.predictor_depth=2", "model.predictor_heads=4", "mask.target_scale=[0.1,0.15]", "mask.min_context=8",
         "data.batch_size=32", "optim.warmup_steps=50",
         "loss.regularizer_weight=2.5e-5"]  # 4,000 context tokens a batch here: the former 0.1 per token


def read_idx(path: Path) -> np.ndarray:
    """An IDX (gzip) file as a uint8 array: images [N, 28, 28] or labels [N]."""
    data = gzip.open(path).read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def render(digit: np.ndarray, direction: int, speed: float, frames: int, rng: np.random.Generator) -> np.ndarray:
    """One moving digit: uint8 [frames, 64, 64]."""
    angle = direction * 2 * math.pi / DIRECTIONS
    dx, dy = speed * math.cos(angle), -speed * math.sin(angle)  # image rows grow downwards
    travel_x, travel_y = dx * (frames - 1), dy * (frames - 1)
    room = CANVAS - DIGIT
    # Start so that every position x0 + t * dx stays in [0, room] (likewise y).
    x0 = rng.uniform(max(0.0, -travel_x), min(room, room - travel_x))
    y0 = rng.uniform(max(0.0, -travel_y), min(room, room - travel_y))
    video = np.zeros((frames, CANVAS, CANVAS), dtype=np.uint8)
    for t in range(frames):
        x, y = int(round(x0 + t * dx)), int(round(y0 + t * dy))
        video[t, y:y + DIGIT, x:x + DIGIT] = digit
    return video


def raw_pixel_mean(files: list[str]) -> np.ndarray:
    """The simple baseline: each video's frames averaged, as raw grayscale pixels [N, H * W] in [0, 1]."""
    import av

    rows = []
    for f in files:
        with av.open(f) as container:
            frames = [frame.to_ndarray(format="gray").astype(np.float32) for frame in container.decode(video=0)]
        rows.append(np.mean(frames, 0).ravel() / 255)
    return np.stack(rows)


def make_moving_digits(mnist: Path, out: Path, n_train: int, n_test: int, frames: int, seed: int) -> dict:
    """Write the moving-digits set (see the module docstring); returns {split: {"files", "digit", "direction"}}."""
    labels_file = out / "labels.json"
    settings = {"n_train": n_train, "n_test": n_test, "frames": frames, "seed": seed}
    if labels_file.exists():
        saved = json.loads(labels_file.read_text())
        if saved["settings"] == settings:
            return saved
    images = read_idx(mnist / "t10k-images-idx3-ubyte.gz")
    digits = read_idx(mnist / "t10k-labels-idx1-ubyte.gz")
    rng = np.random.default_rng(seed)
    result: dict = {"settings": settings}
    for split, pool, count in (("train", np.arange(0, 8000), n_train), ("test", np.arange(8000, 10000), n_test)):
        folder = out / split
        folder.mkdir(parents=True, exist_ok=True)
        picks = rng.choice(pool, size=count, replace=count > len(pool))
        entry = {"files": [], "digit": [], "direction": []}
        for k, i in enumerate(picks):
            direction = int(rng.integers(DIRECTIONS))
            video = render(images[i], direction, rng.uniform(1.0, 2.0), frames, rng)
            path = folder / f"{k:05d}_d{digits[i]}_m{direction}.mp4"
            write_video(path, video[..., None], fps=25, crf=12, preset="veryfast")
            entry["files"].append(str(path.resolve()))
            entry["digit"].append(int(digits[i]))
            entry["direction"].append(direction)
        result[split] = entry
    labels_file.write_text(json.dumps(result))
    return result


def clip_speed(files: list[str], recipe, backend: str, repeats: int = 3) -> dict:
    """Clips per second on one thread: decoding (all of a file's embedding clips) alone, and decoding
    plus the tubelet tokenizer, with one backend."""
    from multijepa.recipe import recipe_from_dict, recipe_to_dict

    raw = recipe_to_dict(recipe)
    raw["video"]["backend"] = backend
    recipe = recipe_from_dict(raw)
    tokenizer = MODALITIES["video"].tokenizer(recipe.video, recipe.model.dim).eval()
    count = recipe.video.embed_clips
    with torch.no_grad():
        read_clips(files[0], recipe.video, count=count)  # warm-up
        clips, t0 = 0, time.perf_counter()
        for _ in range(repeats):
            for f in files:
                clips += len(read_clips(f, recipe.video, count=count))
        decode = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(repeats):
            for f in files:
                tokenizer(torch.stack(read_clips(f, recipe.video, count=count)))
        both = time.perf_counter() - t0
    return {"backend": backend, "clips": clips, "decode_clips_per_s": round(clips / decode, 1),
            "decode_tokenize_clips_per_s": round(clips / both, 1)}


def kth_speed(root: Path, recipe_path: str, repeats: int = 3) -> dict:
    """Clips per second from the KTH files with each backend, twice in turn (the machine is shared)."""
    kth = sorted(str(p) for p in root.rglob("*") if p.suffix in (".avi", ".mp4"))
    default = load_recipe(recipe_path)
    with open_video(kth[0], backend="pyav") as v:
        example = f"{v.header.width}x{v.header.height}, {v.num_frames} frames"
    return {"recipe": f"{Path(recipe_path).name} defaults: {default.video.frames} frames every "
                      f"{default.video.frame_stride}, {default.video.size} px, "
                      f"{default.video.embed_clips} clips per file",
            "files": len(kth), "example": example,
            "runs": [clip_speed(kth, default, b, repeats) for _ in range(2) for b in ("decord", "pyav")]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mnist", default=str(ROOT.parent / "shared/data/images/mnist-test10k"))
    ap.add_argument("--kth", default=str(ROOT.parent / "shared/data/video/kth-dev"))
    ap.add_argument("--out", default=str(ROOT / "bench/out/video"))
    ap.add_argument("--n-train", type=int, default=4000)
    ap.add_argument("--n-test", type=int, default=1000)
    ap.add_argument("--frames", type=int, default=16, help="frames per generated video")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval", choices=["val", "test"], default="test",
                    help="val: probe on a split of the training videos (for choosing settings)")
    ap.add_argument("--minutes", type=float, default=30.0, help="pretraining budget (wall clock, this machine)")
    ap.add_argument("--steps", type=int, default=0, help="fixed step count instead of --minutes")
    ap.add_argument("--recipe", default=str(ROOT / "recipes/video.yaml"))
    ap.add_argument("--no-speed", action="store_true", help="skip the KTH decoding speed")
    ap.add_argument("--speed-only", action="store_true", help="only the KTH decoding speed (no data, no training)")
    ap.add_argument("--baselines-only", action="store_true",
                    help="only the raw-pixel baseline (each video's mean frame) on the chosen split; no training")
    ap.add_argument("--no-attentive", action="store_true", help="skip the attentive probe (linear and kNN only)")
    ap.add_argument("--checkpoint", default="", help="probe this checkpoint of a finished run (of these settings, "
                    "pretrained on the same training videos) instead of training one")
    ap.add_argument("overrides", nargs="*", help="extra recipe overrides (after the bench's own)")
    args = ap.parse_args()
    torch.set_num_threads(1)

    if args.speed_only:
        print(json.dumps(kth_speed(Path(args.kth), args.recipe), indent=2))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = make_moving_digits(Path(args.mnist), out / "digits", args.n_train, args.n_test, args.frames, args.seed)
    print(f"moving digits ready ({time.perf_counter() - t0:.0f} s)", flush=True)
    train = data["train"]
    labels = {k: np.array(train[k]) for k in ("digit", "direction")}
    files = list(train["files"])
    if args.eval == "val":  # fit probes on 80% of the training videos, score on the other 20%
        fit_idx, score_idx = stratified_split(labels["digit"] * DIRECTIONS + labels["direction"], 0.2, seed=args.seed)
        targets = {k: (v[fit_idx], v[score_idx]) for k, v in labels.items()}
        fit_files, score_files = [files[i] for i in fit_idx], [files[i] for i in score_idx]
    else:
        test = data["test"]
        targets = {k: (labels[k], np.array(test[k])) for k in labels}
        fit_files, score_files = files, list(test["files"])
    pixels = {"fit": raw_pixel_mean(fit_files), "score": raw_pixel_mean(score_files)}
    baseline = {k: round(linear_probe_accuracy(pixels["fit"], y_fit, pixels["score"], y_score), 4)
                for k, (y_fit, y_score) in targets.items()}
    print("raw pixels (mean frame)", baseline, flush=True)
    if args.baselines_only:
        (out / f"results_baselines_{args.eval}.json").write_text(json.dumps(
            {"eval": args.eval, "raw_pixel_mean": baseline, **provenance(1)}, indent=2))
        return
    filelist = out / "pretrain.txt"
    filelist.write_text("".join(f"{f}\n" for f in files))  # every training video (labels unused)

    base = [f"data.path={filelist}", "train.progress=false", "train.threads=1", "data.num_workers=0"]
    base += BENCH + args.overrides
    load_at_start = load_average()
    if args.checkpoint:
        checkpoint = Path(args.checkpoint)
        run, train_minutes = checkpoint.parent, 0.0
        steps = int(torch.load(checkpoint, map_location="cpu", weights_only=True)["step"])
    else:
        steps = args.steps or calibrated_steps(args.recipe, base, out, args.minutes * 0.97)  # 3% for checkpoints
        recipe = load_recipe(args.recipe, base + [f"run.dir={out / f'run_{args.eval}'}", f"train.steps={steps}",
                                                  f"train.checkpoint_every={max(steps // 5, 1)}", "run.resume=false"])
        t0 = time.perf_counter()
        run = pretrain(recipe)
        train_minutes = (time.perf_counter() - t0) / 60
        plot_run(run)
        checkpoint = run / "last.pt"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    metrics = [m for m in metrics if m["step"] <= steps]

    results: dict = {"eval": args.eval, "raw_pixel_mean": baseline, "checkpoint": str(checkpoint)}
    jepa = load(checkpoint, device="cpu")
    for name, model in [("jepa", jepa), ("random_init", Embedder.random_init(jepa.recipe, device="cpu"))]:
        feats, tokens = embed_for_probes(model, fit_files + score_files, not args.no_attentive, batch_size=128)
        fit_rows, score_rows = np.arange(len(fit_files)), np.arange(len(fit_files), len(feats))
        results[name] = {k: {probe: round(acc, 4) for probe, acc in probe_scores(
                             feats, np.concatenate([y_fit, y_score]), fit_rows, score_rows, tokens).items()}
                         for k, (y_fit, y_score) in targets.items()}
        print(name, results[name], flush=True)
    results["final_loss"] = round(metrics[-1]["loss"], 4)
    results["final_target_erank"] = round(metrics[-1]["target_erank"], 2)
    if not args.no_speed:
        results["kth_speed"] = kth_speed(Path(args.kth), args.recipe)
    results.update(steps=steps, train_minutes=round(train_minutes, 1), n_pretrain=len(files),
                   n_fit=len(fit_files), n_score=len(score_files), load_at_start=load_at_start, **provenance(1))
    name = f"results_{args.eval}" + (f"_{checkpoint.parent.name}_{steps}" if args.checkpoint else "")
    (out / f"{name}.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
