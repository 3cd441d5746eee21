"""The ``multijepa`` command: a thin shell over the Python API.

    multijepa pretrain recipes/image.yaml data.path=photos/ train.steps=500
    multijepa embed photos/ --out vectors.jsonl                       # a folder (recursively): one named row per file
    multijepa embed cat.jpg more_photos/ files.txt --out vectors.npz  # files, folders and file lists, mixed
    multijepa embed cat.jpg dog.png --out vectors.npy                 # + vectors.rows.jsonl naming each row
    multijepa embed series.csv GunPoint_TEST.ts --out vectors.npy     # one row per series
    multijepa embed speech.wav --windows
    multijepa embed clip.mp4 --clips 8                                # mean over 8 clips; --windows for each
    multijepa probe --checkpoint runs/image/last.pt labelled_folder/
    multijepa probe --checkpoint runs/timeseries/last.pt GunPoint_TRAIN.ts --test GunPoint_TEST.ts
    multijepa finetune labelled_folder/ --checkpoint runs/image/last.pt --epochs 10
    multijepa shard photos/ shards/
    multijepa plot runs/image runs/image-long --out curves.png
    multijepa export runs/image/last.pt exported/image      # safetensors + config.json + model card
    multijepa info runs/image
    multijepa record Reacher-v5 episodes/ --episodes 20 --steps 50   # world-model data from Gymnasium
    multijepa plan runs/worldmodel/last.pt --env Reacher-v5   # after pretrain recipes/worldmodel.yaml
    multijepa demo
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from pathlib import Path
from typing import Optional

import numpy as np

from multijepa._version import __version__
from multijepa.datasets.shards import write_shards
from multijepa.demo import run_demo
from multijepa.embed import check_out, expand_inputs, find_latest_checkpoint, load, write_embeddings
from multijepa.errors import MultijepaError
from multijepa.evaluate import probe
from multijepa.export import export, info, info_text
from multijepa.modalities import MODALITIES, modality_of, readers_of
from multijepa.train import pretrain
from multijepa.worldmodel.cli import add_worldmodel_commands


def _pretrain(args: argparse.Namespace) -> None:
    from multijepa.worldmodel import WorldModelRecipe, load_any_recipe, train_world_model

    recipe = load_any_recipe(args.recipe, args.overrides)
    run = train_world_model(recipe) if isinstance(recipe, WorldModelRecipe) else pretrain(recipe)
    print(f"checkpoint: {run / 'last.pt'}")


def _embed(args: argparse.Namespace) -> None:
    def note(text: str) -> None:
        if not args.quiet:
            print(text, file=sys.stderr)

    check_out(args.out)  # before any work
    checkpoint = args.checkpoint
    if checkpoint is None:
        checkpoint = str(_checkpoint_for(expand_inputs(args.files, list(MODALITIES)), args.runs))
        note(f"using {checkpoint}")
    model = load(checkpoint, device=args.device, precision=args.precision)
    if args.window is not None or args.hop is not None:
        if "audio" not in model.modalities:
            raise MultijepaError(f"--window and --hop apply to audio models; {checkpoint} is a "
                                 f"{'/'.join(model.modalities)} model")
        model = model.with_overrides([f"audio.embed_{key}_seconds={value}" for key, value in
                                      (("window", args.window), ("hop", args.hop)) if value is not None])
    if args.clips is not None:
        if "video" not in model.modalities:
            raise MultijepaError(f"--clips applies to video models; {checkpoint} is a {'/'.join(model.modalities)} model")
        model = model.with_overrides([f"video.embed_clips={args.clips}"])
    model = model.with_overrides(args.set)  # validated like a recipe file: a wrong key is named
    files = expand_inputs(args.files, model.modalities)  # a folder gives the files of the model's types
    # Audio and video tokens are always per window (clip): a long file has a token grid per window.
    windows = args.windows or (args.tokens and model.windowed)
    # The bar goes to stderr and is gone before the first line reaches stdout.
    progress = not args.quiet and len(files) > PROGRESS_FROM and sys.stderr.isatty()
    vectors, rows = model.embed_with_index(files, tokens=args.tokens, batch_size=args.batch_size,
                                           num_workers=args.workers, windows=windows, progress=progress)
    # Files of a modality that can hold many samples (a .ts file, a wide CSV) give one row per
    # sample, in file order; each row then also says which sample of its file it is.
    many = any(MODALITIES[m].list_samples is not None for m in model.modalities)
    written = write_embeddings([files[i] for i, _ in rows], vectors, args.out,
                               index=[k for _, k in rows] if many else None,
                               window_hop_seconds=model.window_hop_seconds)
    how = f"on {model.device} in {model.precision} ({model.precision_reason})"
    if not written:
        note(f"embedded {how}")
    if written:
        what = f"{sum(len(v) for v in vectors)} window embeddings of {len(vectors)} files" if windows \
            else f"{vectors.shape} embeddings"
        keys, suffix = "file, index" if many else "file", Path(args.out).suffix.lower()
        if suffix == ".npy":
            named = f"; row names ({keys}) in {written[-1]}, one JSON line per row"
        elif suffix == ".npz":
            named = f" (arrays: {', '.join(_npz_keys(args.out))})"
        else:
            named = f", one JSON object per {'window' if windows else 'row'} with its {keys}"
        note(f"wrote {what} to {args.out}{named}; embedded {how}")


PROGRESS_FROM = 8  # embed shows a progress bar for more files than this (on a terminal, without --quiet)


def _npz_keys(path: str) -> list[str]:
    with np.load(path) as saved:
        return list(saved.files)


def _checkpoint_for(files: list[str], runs: str) -> Path:
    """The newest run under ``runs`` whose model reads every file: a one-modality run when one
    modality reads them all, else a mixed run trained on each file's modality.

    ``files`` are files, not folders or lists (``expand_inputs`` makes them); files of a type several
    modalities read (.npy, .txt) decide only when every file is of such a type.
    """

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
        example = {m: next((f for f, r in zip(files, readers) if r == [m]), '?') for m in needed}
        raise MultijepaError(f"the files are {', '.join(f'{m} (e.g. {example[m]})' for m in needed)}, and no run "
                             f"under {runs}/ was trained on all of them (a mixed run: recipes/multimodal.yaml); "
                             f"embed one modality at a time or pass --checkpoint")
    return found


def _probe(args: argparse.Namespace) -> None:
    result = probe(args.data, args.checkpoint, args.random_init, args.test_fraction, args.folds, args.seed,
                   args.device, args.batch_size, args.workers, test_data=args.test, modality=args.modality,
                   precision=args.precision, progress=sys.stderr.isatty(), attentive=args.attentive)
    what = "random-init encoder" if args.random_init else "JEPA encoder"
    split = f"{args.folds}-fold" if args.folds > 1 and not args.test else \
        f"{result['n_train']} train / {result['n_test']} test"
    attentive = f", attentive probe accuracy {result['attentive']:.4f}" if "attentive" in result else ""
    print(f"{what} ({split}, {result['precision']}): linear probe accuracy {result['linear']:.4f}, "
          f"kNN accuracy {result['knn']:.4f}{attentive}")
    if args.json:
        print(json.dumps(result))


def _finetune(args: argparse.Namespace) -> None:
    from multijepa.finetune import finetune

    result = finetune(args.data, args.checkpoint, args.test, args.test_fraction, args.seed, args.epochs, args.lr,
                      args.encoder_lr_scale, args.weight_decay, args.batch_size, args.device, args.precision,
                      args.workers, args.modality, args.random_init, progress=sys.stderr.isatty())
    what = "random-init encoder" if args.random_init else "JEPA encoder"
    print(f"{what} fine-tuned ({result['n_train']} train / {result['n_test']} test, {result['epochs']} epochs, "
          f"{result['precision']}): accuracy {result['accuracy']:.4f} (train {result['train_accuracy']:.4f})")
    if args.json:
        print(json.dumps(result))


def _shard(args: argparse.Namespace) -> None:
    written = write_shards(args.src, args.out, args.per_shard, progress=sys.stderr.isatty())
    print(f"wrote {len(written)} shards to {args.out}")


def _plot(args: argparse.Namespace) -> None:
    from multijepa.plot import plot_runs

    print(f"wrote {plot_runs(args.runs, args.out)}")


def _export(args: argparse.Namespace) -> None:
    out = export(args.checkpoint, args.out)
    print(f"wrote {out / 'model.safetensors'}, config.json and README.md; load it with multijepa.load({str(out)!r}) "
          f"or multijepa embed --checkpoint {out} FILES")
    if args.push_to_hub:
        from multijepa.embed import Embedder

        print(f"uploaded: {Embedder.from_pretrained(out, device='cpu').push_to_hub(args.push_to_hub)}")


def _info(args: argparse.Namespace) -> None:
    found = info(args.path)
    print(json.dumps(found, indent=1) if args.json else info_text(found))


def _demo(args: argparse.Namespace) -> None:
    run_demo(args.dir, args.steps)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, unless the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or action.default is argparse.SUPPRESS or action.required or "default" in text:
            return text
        if isinstance(action, argparse._StoreTrueAction):
            return f"{text} (default: off)"
        return f"{text} (default: %(default)s)"


def _count(least: int):
    """An argparse type: a whole number of at least ``least``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}, not {value}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="multijepa", description="JEPA pretraining for every modality.",
                                     formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"multijepa {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str, description: Optional[str] = None) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=description or help, formatter_class=_HelpFormatter)

    p = command("pretrain", "train a JEPA from a recipe (resumes from run.dir/last.pt)")
    shipped = ", ".join(sorted(f.stem for f in (Path(__file__).parent / "recipes").glob("*.yaml")))
    p.add_argument("recipe", help=f"a YAML recipe file (e.g. recipes/image.yaml) or a shipped recipe's name: {shipped}")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.steps=200")
    p.set_defaults(func=_pretrain)

    p = command("embed", "files in, embeddings out (one row per sample; a .ts file gives one per series)",
                "Embed files, folders and file lists with a trained encoder. Every output names each row's file "
                "(and, for a file of many samples or windows, which one).")
    p.add_argument("files", nargs="+", metavar="PATH",
                   help="files, folders (every file of the model's types in it, recursively, sorted) and file "
                        "lists (.lst, or a .txt/.csv whose first line names an existing file: one path per line, "
                        "relative to the list), mixed freely")
    p.add_argument("--checkpoint", help="a last.pt (default: the newest run under --runs whose model reads the files)")
    p.add_argument("--runs", default="runs", help="where to look for runs without --checkpoint")
    p.add_argument("--out", metavar="FILE",
                   help="out.jsonl: one JSON object per row with file (and index, window); out.npy: the array, plus "
                        "out.rows.jsonl naming each row's file (and index); out.npz: arrays embeddings and files "
                        "(and index, window, start_s) (default: JSON lines on stdout)")
    p.add_argument("--tokens", action="store_true",
                   help="per-token features instead of the pooled mean (audio: per window, as --windows)")
    p.add_argument("--windows", action="store_true",
                   help="audio: one vector per window (audio.embed_window_seconds every audio.embed_hop_seconds) "
                        "instead of their mean; video: one vector per clip")
    p.add_argument("--window", type=float, metavar="SECONDS", help="audio: window length (default: the recipe's)")
    p.add_argument("--hop", type=float, metavar="SECONDS", help="audio: seconds between windows (default: the recipe's)")
    p.add_argument("--clips", type=_count(1), metavar="N",
                   help="video: clips spread evenly over each video and pooled (default: video.embed_clips)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a recipe key that changes how files are read, over the checkpoint's recipe (repeatable), "
                        "e.g. timeseries.npz_split=test or audio.embed_hop_seconds=0.25")
    p.add_argument("--batch-size", type=_count(1), default=64, metavar="N", help="views per forward pass")
    p.add_argument("--workers", type=_count(0), default=2, metavar="N",
                   help="DataLoader worker processes decoding files (0: decode in the main process)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                   help="auto: bf16 where the GPU or CPU has bf16 matrix units (as pretrain), else fp32")
    p.add_argument("--quiet", action="store_true",
                   help=f"no progress bar (shown on a terminal for more than {PROGRESS_FROM} files) and no notes on "
                        f"stderr; errors still print")
    p.set_defaults(func=_embed)

    p = command("probe", "linear + kNN (+ attentive) probes of frozen embeddings on labelled data")
    p.add_argument("data", help="folder with one sub-folder per class, or a file with labels inside (a .ts file)")
    p.add_argument("--test", help="a separate labelled test set (e.g. X_TEST.ts): fit on DATA, score on it "
                                  "(default: a split of DATA)")
    p.add_argument("--checkpoint", required=True, help="a last.pt (required)")
    p.add_argument("--random-init", action="store_true", help="probe the same encoder at random init (baseline)")
    p.add_argument("--test-fraction", type=float, default=0.2, help="share of DATA held out for testing")
    p.add_argument("--folds", type=_count(0), default=0, help="k-fold cross-validation instead of one split (0: one "
                                                              "split)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and of --random-init")
    p.add_argument("--batch-size", type=_count(1), default=256, metavar="N", help="views per forward pass")
    p.add_argument("--workers", type=_count(0), default=2, metavar="N",
                   help="DataLoader worker processes decoding files")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                   help="auto: bf16 where the GPU or CPU has bf16 matrix units (as pretrain), else fp32")
    p.add_argument("--modality", help="with a model of several modalities: the one to probe (default: the "
                                      "one whose files DATA holds)")
    p.add_argument("--attentive", action="store_true",
                   help="also train an attentive probe (learned queries attending over the frozen tokens, V-JEPA's) "
                        "on the same split; slower than the linear probe")
    p.add_argument("--json", action="store_true", help="also print the result as JSON")
    p.set_defaults(func=_probe)

    p = command("finetune", "train the encoder and a linear head on labels (same data, split and seed as probe)")
    p.add_argument("data", help="folder with one sub-folder per class, or a file with labels inside (a .ts file)")
    p.add_argument("--test", help="a separate labelled test set (default: a split of DATA, as probe makes it)")
    p.add_argument("--checkpoint", required=True, help="a last.pt or an export folder (required)")
    p.add_argument("--random-init", action="store_true", help="fine-tune the same encoder from random init (baseline)")
    p.add_argument("--test-fraction", type=float, default=0.2, help="share of DATA held out for testing")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, the augmentations and the head")
    p.add_argument("--epochs", type=_count(1), default=10, help="passes over the training split")
    p.add_argument("--lr", type=float, default=1e-3, help="the head's peak learning rate (warm-up, then cosine)")
    p.add_argument("--encoder-lr-scale", type=float, default=0.1,
                   help="the encoder's learning rate as a share of --lr (0: a frozen encoder, a trained linear head)")
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay on matrices")
    p.add_argument("--batch-size", type=_count(1), default=32, metavar="N", help="training samples per step")
    p.add_argument("--workers", type=_count(0), default=2, metavar="N", help="DataLoader worker processes")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                   help="auto: bf16 where the GPU or CPU has bf16 matrix units (as pretrain), else fp32")
    p.add_argument("--modality", help="with a model of several modalities: the one to fine-tune on")
    p.add_argument("--json", action="store_true", help="also print the result as JSON")
    p.set_defaults(func=_finetune)

    p = command("shard", "pack a folder into webdataset .tar shards")
    p.add_argument("src", help="folder of data files (first-level sub-folders are classes)")
    p.add_argument("out", help="folder to write shard-NNNNNN.tar and classes.json into")
    p.add_argument("--per-shard", type=_count(1), default=1000, metavar="N", help="files per shard")
    p.set_defaults(func=_shard)

    p = command("plot", "one PNG of a run's curves: loss and its parts, lr, collapse monitors, speed, bad files")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (holding metrics.jsonl); several are overlaid")
    p.add_argument("--out", metavar="PNG", help="the image (default: RUN_DIR/metrics.png, or runs.png here for several)")
    p.set_defaults(func=_plot)

    p = command("export", "a checkpoint's encoder as model.safetensors + config.json + README.md (Hub layout)")
    p.add_argument("checkpoint", help="a last.pt or step_N.pt written by multijepa pretrain")
    p.add_argument("out", help="the folder to write (new, empty, or an earlier export to replace)")
    p.add_argument("--push-to-hub", metavar="USER/NAME", help="also upload it to this Hugging Face Hub model "
                                                              "repository (needs network and a token)")
    p.set_defaults(func=_export)

    p = command("info", "what a checkpoint, run folder or export holds: modalities, recipe, step, parameters, "
                        "last metrics and health")
    p.add_argument("path", help="a checkpoint (.pt), a run folder or an export folder")
    p.add_argument("--json", action="store_true", help="print it as JSON")
    p.set_defaults(func=_info)

    add_worldmodel_commands(command, _count)  # record, plan

    p = command("demo", "write a small image set, pretrain, embed and probe against random init (3 min on 2 CPU cores)")
    p.add_argument("--dir", default="demo", help="folder for the data set and the run")
    p.add_argument("--steps", type=_count(1), default=300, help="pretraining steps")
    p.set_defaults(func=_demo)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    """Run the command line; returns the exit status (2 for any error of the input, with its message)."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except MultijepaError as e:
        print(f"multijepa: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # stdout closed early (| head): stop quietly, with nothing left to flush into it
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError, io.UnsupportedOperation):
            pass
        return 1
    except OSError as e:  # the file system's word: a full disk, a file we may not read or write
        where = f"{e.filename}: " if e.filename else ""
        print(f"multijepa: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
