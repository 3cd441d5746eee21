"""``multijepa demo``: pretrain an image JEPA on a set it writes, embed a file, and probe the frozen
encoder against the same encoder at random init, in about three minutes on 2 CPU cores.

The set is 800 PNG images of 32 px: white circles, squares, triangles and crosses on black, of
random size and position (``make_shapes(plain=True)``). Nothing but the shape tells the classes
apart, so the probe measures what the encoder learned about shape. The run is short, so the EMA
target encoder (the one that embeds) follows the context encoder faster than the recipe's 0.996:
after 300 steps from 0.996 its weights would still be 55% those of the untrained encoder (0.01% from
0.95). Every seed is fixed: the figures are the same every time on the same machine and versions
(docs/results.md has them).

>>> from multijepa.demo import run_demo
>>> result = run_demo("demo")  # doctest: +SKIP
>>> result["jepa"]["linear"] - result["random_init"]["linear"] >= 0.10  # doctest: +SKIP
True
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Union

from multijepa.datasets.synthetic import make_shapes
from multijepa.embed import load
from multijepa.evaluate import probe
from multijepa.plot import plot_runs
from multijepa.recipe import load_recipe
from multijepa.train import pretrain

# On top of recipes/image.yaml; the command line the demo prints says the same.
DEMO_OVERRIDES = ["data.batch_size=64", "model.depth=4", "model.predictor_depth=2", "optim.warmup_steps=30",
                  "ema.momentum_start=0.95", "ema.momentum_end=0.99", "train.log_every=25",
                  "train.checkpoint_every=100", "run.resume=false"]
# What the demo shows, and the smallest gain it calls a success (linear probe, 5-fold CV).
MARGIN = 0.10


def run_demo(out: Union[str, Path] = "demo", steps: int = 300, per_class: int = 200) -> dict:
    """Write the shapes set under ``out/shapes``, pretrain ``out/run``, embed one image, probe both
    encoders by 5-fold cross-validation, and print each step as the command a user would type.

    Returns:
        {"jepa": probe result, "random_init": probe result, "seconds": wall-clock seconds}.
    """
    t0 = time.perf_counter()
    root = Path(out)
    data = root / "shapes"
    if not (data / "cross").is_dir() or len(list((data / "cross").glob("*.png"))) != per_class:
        print(f"[demo] writing {4 * per_class} images to {data}/: white circles, squares, triangles and crosses "
              f"on black, 32 px, random size and position")
        make_shapes(data, per_class=per_class, plain=True)
    overrides = [f"data.path={data}", f"run.dir={root / 'run'}", f"train.steps={steps}", *DEMO_OVERRIDES]
    print(f"[demo] pretraining an image JEPA, labels unused:\n       multijepa pretrain image {' '.join(overrides)}")
    run = pretrain(load_recipe("image", overrides))
    ckpt = run / "last.pt"
    example = sorted((data / "circle").glob("*.png"))[0]
    vector = load(ckpt, device="cpu").embed([example])[0]
    print(f"[demo] multijepa embed {example} --checkpoint {ckpt}\n       -> a vector of {vector.shape[0]} numbers, "
          f"first five {[round(float(v), 3) for v in vector[:5]]}")
    print(f"[demo] multijepa probe {data} --checkpoint {ckpt} --folds 5   (and again with --random-init)")
    jepa = probe(str(data), str(ckpt), folds=5, device="cpu")
    rand = probe(str(data), str(ckpt), random_init=True, folds=5, device="cpu")
    print(f"       JEPA encoder:        linear {jepa['linear']:.3f}  kNN {jepa['knn']:.3f}")
    print(f"       random-init encoder: linear {rand['linear']:.3f}  kNN {rand['knn']:.3f}   (chance 0.250)")
    gain = jepa["linear"] - rand["linear"]
    seconds = time.perf_counter() - t0
    if gain >= MARGIN:
        verdict = (f"pretraining taught the encoder the shapes: its frozen features classify them {100 * gain:.1f} "
                   f"points better than the same encoder untrained (linear probe, 5-fold cross-validation)")
    else:
        verdict = (f"this run did NOT show the expected gain ({100 * gain:+.1f} points, {100 * MARGIN:.0f} expected): "
                   f"docs/results.md says what the demo gives on the machine it was measured on")
    curves = plot_runs([run])
    print(f"[demo] {verdict}. {seconds:.0f} s in all; checkpoint {ckpt}, metrics in {run / 'metrics.jsonl'}, "
          f"drawn in {curves} (multijepa plot {run})")
    print("[demo] a toy set, to show the whole pipeline working; docs/results.md has the figures on real data "
          "(CIFAR-10, spoken digits, ModelNet10, UCR series, moving digits) with their commands")
    return {"jepa": jepa, "random_init": rand, "seconds": seconds}
