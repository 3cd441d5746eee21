"""The ``multijepa`` command: a thin shell over the Python API.

    multijepa pretrain recipes/image.yaml data.path=photos/ train.steps=500
    multijepa embed cat.jpg dog.png --out vectors.npy
    multijepa embed series.csv GunPoint_TEST.ts --out vectors.npy     # one row per series
    multijepa embed speech.wav --windows
    multijepa embed clip.mp4 --clips 8                                # mean over 8 clips; --windows for each
    multijepa probe --checkpoint runs/image/last.pt labelled_folder/
    multijepa probe --checkpoint runs/timeseries/last.pt GunPoint_TRAIN.ts --test GunPoint_TEST.ts
    multijepa shard photos/ shards/
    multijepa demo
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from multijepa.errors import MultijepaError


def _pretrain(args: argparse.Namespace) -> None:
    from multijepa.recipe import load_recipe
    from multijepa.train import pretrain

    run = pretrain(load_recipe(args.recipe, args.overrides))
    print(f"checkpoint: {run / 'last.pt'}")


def _embed(args: argparse.Namespace) -> None:
    from multijepa.embed import load, write_embeddings

    checkpoint = args.checkpoint
    if checkpoint is None:
        checkpoint = str(_checkpoint_for(args.files, args.runs))
        print(f"using {checkpoint}", file=sys.stderr)
    from multijepa.datasets.files import SAMPLE_LISTERS

    model = load(checkpoint, device=args.device)
    if args.window is not None or args.hop is not None:
        if "audio" not in model.modalities:
            raise MultijepaError(f"--window and --hop apply to audio models; {checkpoint} is a "
                                 f"{'/'.join(model.modalities)} model")
        model = model.with_overrides([f"audio.embed_{key}_seconds={value}" for key, value in
                                      (("window", args.window), ("hop", args.hop)) if value is not None])
    if args.clips is not None:
        if "video" not in model.modalities:
            raise MultijepaError(f"--clips applies to video models; {checkpoint} is a "
                                 f"{'/'.join(model.modalities)} model")
        model = model.with_overrides([f"video.embed_clips={args.clips}"])
    # Audio and video tokens are always per window (clip): a long file has a token grid per window.
    windows = args.windows or (args.tokens and model.windowed)
    vectors, rows = model.embed_with_index(args.files, tokens=args.tokens, batch_size=args.batch_size,
                                           windows=windows)
    # Files of a modality that can hold many samples (a .ts file, a wide CSV) give one row per
    # sample, in file order; each row then also says which sample of its file it is.
    many = any(m in SAMPLE_LISTERS for m in model.modalities)
    write_embeddings([str(args.files[i]) for i, _ in rows], vectors, args.out,
                     index=[k for _, k in rows] if many else None, window_hop_seconds=model.window_hop_seconds)
    if args.out:
        what = f"{sum(len(v) for v in vectors)} window embeddings of {len(vectors)} files" if windows \
            else f"{vectors.shape} embeddings"
        print(f"wrote {what} to {args.out}", file=sys.stderr)


def _checkpoint_for(files: list[str], runs: str) -> Path:
    """The newest run under ``runs`` whose model reads every file: a one-modality run when one
    modality reads them all, else a mixed run trained on each file's modality."""
    from multijepa.datasets.readers import modality_of, readers_of
    from multijepa.embed import find_latest_checkpoint

    readers = [readers_of(f) or [modality_of(f)] for f in files]  # modality_of raises for unknown types
    shared = [m for m in readers[0] if all(m in r for r in readers)]  # modalities that read every file
    if len(shared) > 1:  # every file is of a type several read (.npy): a trained model decides
        trained = [m for m in shared if find_latest_checkpoint(m, runs) is not None]
        if len(trained) != 1:
            modality_of(files[0])  # raises: the type is ambiguous, pass --checkpoint
        shared = trained
    needed = shared[:1] or sorted({r[0] for r in readers if len(r) == 1})
    found = find_latest_checkpoint(needed, runs)
    if found is None:
        if len(needed) == 1:
            raise MultijepaError(
                f"no {needed[0]} checkpoint under {runs}/ (looked for {runs}/*/last.pt). Train one with\n"
                f"  multijepa pretrain recipes/{needed[0]}.yaml data.path=YOUR_FOLDER\n"
                f"or pass --checkpoint PATH")
        raise MultijepaError(f"the files are {', '.join(needed)}, and no run under {runs}/ was trained on all of "
                             f"them (a mixed run: recipes/multimodal.yaml); embed one modality at a time or pass "
                             f"--checkpoint")
    return found


def _probe(args: argparse.Namespace) -> None:
    from multijepa.evaluate import probe

    result = probe(args.data, args.checkpoint, args.random_init, args.test_fraction, args.folds, args.seed,
                   args.device, args.batch_size, args.workers, test_data=args.test, modality=args.modality)
    what = "random-init encoder" if args.random_init else "JEPA encoder"
    split = f"{args.folds}-fold" if args.folds > 1 and not args.test else \
        f"{result['n_train']} train / {result['n_test']} test"
    print(f"{what} ({split}): linear probe accuracy {result['linear']:.4f}, kNN accuracy {result['knn']:.4f}")
    if args.json:
        print(json.dumps(result))


def _shard(args: argparse.Namespace) -> None:
    from multijepa.datasets.files import write_shards

    written = write_shards(args.src, args.out, args.per_shard)
    print(f"wrote {len(written)} shards to {args.out}")


def _demo(args: argparse.Namespace) -> None:
    from multijepa.datasets.synthetic import make_shapes
    from multijepa.evaluate import probe
    from multijepa.recipe import load_recipe
    from multijepa.train import pretrain

    root = Path(args.dir)
    data = root / "shapes"
    if not data.exists():
        print(f"[demo] writing a small labelled image set (4 shape classes x 100) to {data}")
        make_shapes(data, per_class=100)
    recipe_path = Path(__file__).resolve().parent.parent / "recipes" / "image.yaml"
    overrides = [f"data.path={data}", f"run.dir={root / 'run'}", f"train.steps={args.steps}",
                 "train.checkpoint_every=100", "train.log_every=25", "data.batch_size=64",
                 "optim.warmup_steps=30", "model.depth=4", "model.predictor_depth=2"]
    print(f"[demo] pretraining an image JEPA: multijepa pretrain {recipe_path} {' '.join(overrides)}")
    run = pretrain(load_recipe(recipe_path, overrides))
    ckpt = run / "last.pt"
    example = sorted((data / "circle").glob("*.png"))[0]
    from multijepa.embed import load

    vector = load(ckpt).embed([example])[0]
    print(f"[demo] multijepa embed {example} --checkpoint {ckpt}\n       -> vector of {vector.shape[0]} "
          f"numbers, first five {[round(float(v), 3) for v in vector[:5]]}")
    jepa = probe(str(data), str(ckpt), folds=5)
    rand = probe(str(data), str(ckpt), random_init=True, folds=5)
    print(f"[demo] multijepa probe --checkpoint {ckpt} {data} --folds 5")
    print(f"       JEPA encoder:        linear {jepa['linear']:.3f}  kNN {jepa['knn']:.3f}")
    print(f"       random-init encoder: linear {rand['linear']:.3f}  kNN {rand['knn']:.3f}")
    print(f"[demo] done: metrics in {run / 'metrics.jsonl'}, checkpoint {ckpt}")
    print("[demo] a few hundred steps on 400 images is a smoke test of the whole pipeline, not a measure of "
          "quality: docs/results.md has probe figures after 30 minutes of pretraining on CIFAR-10.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="multijepa", description="JEPA pretraining for every modality.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="train a JEPA from a recipe (resumes from run.dir/last.pt)")
    p.add_argument("recipe", help="YAML recipe, e.g. recipes/image.yaml")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.steps=200")
    p.set_defaults(func=_pretrain)

    p = sub.add_parser("embed", help="files in, embeddings out (one row per sample; a .ts file gives one per series)")
    p.add_argument("files", nargs="+")
    p.add_argument("--checkpoint", help="a last.pt; default: the newest run of the files' modality under --runs")
    p.add_argument("--runs", default="runs", help="where to look for runs without --checkpoint")
    p.add_argument("--out", help="out.npy or out.jsonl; default: JSON lines on stdout")
    p.add_argument("--tokens", action="store_true",
                   help="per-token features instead of the pooled mean (audio: per window, as --windows)")
    p.add_argument("--windows", action="store_true",
                   help="audio: one vector per window (audio.embed_window_seconds every audio.embed_hop_seconds) "
                        "instead of their mean; video: one vector per clip")
    p.add_argument("--window", type=float, metavar="SECONDS", help="audio: window length (default: the recipe's)")
    p.add_argument("--hop", type=float, metavar="SECONDS", help="audio: seconds between windows (default: the recipe's)")
    p.add_argument("--clips", type=int, metavar="N",
                   help="video: clips spread evenly over each video and pooled (default: video.embed_clips)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_embed)

    p = sub.add_parser("probe", help="linear + kNN probe of frozen embeddings on labelled data")
    p.add_argument("data", help="folder with one sub-folder per class, or a file with labels inside (a .ts file)")
    p.add_argument("--test", help="a separate labelled test set (e.g. X_TEST.ts): fit on DATA, score on it")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--random-init", action="store_true", help="probe the same encoder at random init (baseline)")
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--folds", type=int, default=0, help="k-fold cross-validation instead of one split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--modality", help="with a model of several modalities: the one to probe (default: the "
                                      "one whose files DATA holds)")
    p.add_argument("--json", action="store_true", help="also print the result as JSON")
    p.set_defaults(func=_probe)

    p = sub.add_parser("shard", help="pack a folder into webdataset .tar shards")
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--per-shard", type=int, default=1000)
    p.set_defaults(func=_shard)

    p = sub.add_parser("demo", help="make a small image set, pretrain, embed and probe (a few minutes on CPU)")
    p.add_argument("--dir", default="demo")
    p.add_argument("--steps", type=int, default=300)
    p.set_defaults(func=_demo)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except MultijepaError as e:
        print(f"multijepa: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
