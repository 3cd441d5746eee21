"""Latent forecasting on a time-series set: a world model without actions rolled forward in a time-series
JEPA's representation space, against the real representations and against copying the last step.

Each series is an episode of one step per sample (``state`` = the series, no actions); the observation
at step t is the encoder's window of the latest ``--length`` samples. The encoder is a time-series JEPA
trained with ``mask.mode: future`` on the TRAIN split; the world model learns on the TRAIN series; the
forecasts are scored on the TEST split (a look at it, reported as such).

    python bench/worldmodel_forecast.py --set GunPoint        # a few CPU-minutes
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, provenance  # noqa: E402

from multijepa import load_recipe, pretrain  # noqa: E402
from multijepa.episodes import write_episode  # noqa: E402
from multijepa.readers.series import read_series  # noqa: E402
from multijepa.worldmodel import WorldModel, load_worldmodel_recipe, train_world_model  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "timeseries"


def series_episodes(path: Path, out: Path, cfg) -> list[Path]:
    """One episode per series of a .ts file: state [L, C], actions [L - 1, 0]."""
    if out.exists():
        return sorted(out.iterdir())
    found = read_series(str(path), cfg).series
    return [write_episode(out / f"ep_{i:05d}", np.zeros((x.shape[1] - 1, 0), np.float32), state=x.T.astype(np.float32),
                          meta={"source": str(path), "series": i}) for i, x in enumerate(found)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--set", default="GunPoint")
    ap.add_argument("--out", type=Path, default=Path("bench/out/forecast"))
    ap.add_argument("--length", type=int, default=16, help="samples per observation window")
    ap.add_argument("--encoder-steps", type=int, default=600)
    ap.add_argument("--wm-steps", type=int, default=800)
    ap.add_argument("--horizons", type=int, nargs="*", default=[1, 4, 8, 16])
    args = ap.parse_args()
    train_file, test_file = DATA / args.set / f"{args.set}_TRAIN.ts", DATA / args.set / f"{args.set}_TEST.ts"
    if not train_file.exists():
        sys.exit(f"{train_file}: not found (../shared/data/timeseries/{args.set}); pass another --set")
    out = args.out / args.set
    out.mkdir(parents=True, exist_ok=True)
    encoder = ["timeseries.length=" + str(args.length), "timeseries.patch_size=4", "timeseries.channel_mode=mixed",
               "timeseries.instance_norm=false", "mask.mode=future", "mask.num_targets=1", "mask.target_scale=[0.25,0.25]",
               "mask.context_scale=[1,1]", "mask.min_context=1", "mask.full_span_axes=[]", "train.progress=false"]
    t0 = time.process_time()
    recipe = load_recipe("timeseries", encoder + [f"data.path={train_file}", f"run.dir={out / 'encoder'}",
                                                  f"train.steps={args.encoder_steps}"])
    pretrain(recipe)
    cpu_encoder = time.process_time() - t0
    cfg = load_recipe(out / "encoder/recipe.yaml").timeseries
    series_episodes(train_file, out / "train_eps", cfg)
    test_eps = series_episodes(test_file, out / "test_eps", cfg)
    window = max(args.horizons)
    t0 = time.process_time()
    wm_recipe = load_worldmodel_recipe("worldmodel", [
        f"worldmodel.encoder={out / 'encoder/last.pt'}", "worldmodel.observation=state", "worldmodel.pool=1",
        f"worldmodel.window={window}", "worldmodel.rollout_steps=4", "worldmodel.dim=128", "worldmodel.depth=3",
        f"data.path={out / 'train_eps'}", f"run.dir={out / 'wm'}", f"train.steps={args.wm_steps}",
        "train.progress=false", "train.log_every=100"])
    train_world_model(wm_recipe)
    cpu_wm = time.process_time() - t0
    wm = WorldModel.load(out / "wm/last.pt", device="cpu")
    from multijepa.episodes import read_episode

    g = np.random.default_rng(0)
    errors = {h: [] for h in args.horizons}
    copy = {h: [] for h in args.horizons}
    for path in test_eps:
        ep = read_episode(path)
        z = wm.encode(ep.state)  # [L, N, F]
        for start in g.integers(args.length, len(z) - window, size=4):
            pred = wm.rollout(z[None, start:start + 1], torch.zeros(1, window, 0))[0]  # steps start+1 .. start+window
            for h in args.horizons:
                real = z[start + h]
                errors[h].append(float((pred[h - 1] - real).abs().mean()))
                copy[h].append(float((z[start] - real).abs().mean()))
    table = {h: {"world_model": float(np.mean(errors[h])), "copy_last": float(np.mean(copy[h]))} for h in args.horizons}
    result = {"set": args.set, "provenance": provenance(), "cpu_minutes": {"encoder": round(cpu_encoder / 60, 2),
              "world_model": round(cpu_wm / 60, 2)}, "test_windows": len(errors[args.horizons[0]]), "l1": table}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    print(f"\n{args.set} TEST, {result['test_windows']} forecasts; mean L1 to the real representations (lower is better)")
    print("| steps ahead | world-model rollout | copy the last step |\n|---|---|---|")
    for h, row in table.items():
        print(f"| {h} | {row['world_model']:.4f} | {row['copy_last']:.4f} |")
    print(f"CPU minutes: {result['cpu_minutes']}")


if __name__ == "__main__":
    main()
