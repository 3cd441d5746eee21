"""Is a world model's representation a good metric for planning? For the Reacher world models of
``bench/worldmodel_reacher.py``: the rank correlation, within recorded episodes, between the feature
distance of each frame to a reference frame (steps 10, 25, 50) and the distance of their fingertips.

    python bench/worldmodel_metric.py --out bench/out/reacher      # under a minute
    python bench/worldmodel_metric.py --out bench/out/reacher --encoder bench/out/reacher/frames/last.pt --pools 0 4 2 1

With ``--encoder`` it scores an image encoder (trained and at random init) before any world model is
trained, at each pooling of its token grid, beside the L1 distance of the raw pixels.

With ``--actions RUN ...`` it asks whether world models know what their actions do: from 2 observations
of a recorded episode (steps 5, 20 and 35), the rollout under the 5 actions really taken against 63
real 5-action snippets from elsewhere in the episode, each scored by its final step's L1 distance to the
real observation 5 steps on. A model that knows its actions ranks the true actions first (rank 0);
one that ignores them ranks them at 31 on average.

    python bench/worldmodel_metric.py --out bench/out/reacher --actions wm_pixels_trained wm_state_trained
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from multijepa.episodes import iter_episodes
from multijepa.worldmodel import WorldModel, WorldModelConfig
from multijepa.worldmodel.model import ObservationEncoder, load_encoder


def fingertips(state: np.ndarray) -> np.ndarray:
    """Reacher-v5 observations [T, 10] (cos q0, cos q1, sin q0, sin q1, ...) -> fingertip xy [T, 2]."""
    q0, q1 = np.arctan2(state[:, 2], state[:, 0]), np.arctan2(state[:, 3], state[:, 1])
    return np.stack([0.1 * np.cos(q0) + 0.11 * np.cos(q0 + q1), 0.1 * np.sin(q0) + 0.11 * np.sin(q0 + q1)], 1)


def action_ranks(wm: WorldModel, episodes: list, horizon: int = 5, candidates: int = 64) -> str:
    """How the true actions' rollout ranks among real action snippets (see the module docstring)."""
    g = torch.Generator().manual_seed(0)
    ranks, true_error, other_error = [], [], []
    for ep in episodes:
        z = wm.encode(ep.frames if wm.observer.cfg.observation == "frames" else ep.state)
        a = ep.actions
        for s in (5, 20, 35):
            starts = torch.randint(0, len(a) - horizon + 1, (candidates - 1,), generator=g)
            snippets = torch.cat([a[s:s + horizon][None], a[starts[:, None] + torch.arange(horizon)]])
            acts = torch.cat([a[s - 1:s][None].expand(candidates, -1, -1), snippets], 1)
            pred = wm.rollout(z[s - 1:s + 1][None].expand(candidates, -1, -1, -1), acts)[:, -1]
            e = (pred - z[s + horizon]).abs().mean((-1, -2))
            ranks.append(int((e < e[0]).sum()))
            true_error.append(float(e[0]))
            other_error.append(float(e[1:].mean()))
    return (f"true actions rank {np.mean(ranks):.1f} of {candidates} on average (0 best, {candidates / 2 - 0.5:.1f} "
            f"by chance); final-step L1 {np.mean(true_error):.4f} with them, {np.mean(other_error):.4f} with others")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench/out/reacher"))
    ap.add_argument("--episodes", type=int, default=20, help="the last N recorded episodes")
    ap.add_argument("--encoder", help="score this image encoder's checkpoint (trained and at random init) instead")
    ap.add_argument("--pools", type=int, nargs="*", default=[4], help="with --encoder: worldmodel.pool values")
    ap.add_argument("--actions", nargs="*", metavar="RUN", help="world-model runs under OUT to score on actions")
    args = ap.parse_args()
    episodes = list(iter_episodes(args.out / "episodes"))[-args.episodes:]
    if args.actions:
        for run in args.actions:
            print(f"{run}: {action_ranks(WorldModel.load(args.out / run / 'last.pt', device='cpu'), episodes)}")
        return
    if args.encoder:
        encoders = {}
        for init in ("trained", "random"):
            for pool in args.pools:
                cfg = WorldModelConfig(encoder=args.encoder, encoder_init=init, pool=pool)
                encoders[f"encoder {init}, pool {pool}"] = ObservationEncoder(*load_encoder(cfg), cfg)
        encoders["raw pixels"] = lambda frames: frames.float().flatten(1)[:, None]  # [T, 1, H * W * C]
    else:
        encoders = {name: WorldModel.load(args.out / f"wm_{name}/last.pt", device="cpu").encode
                    for name in ("pixels_trained", "pixels_random")}
    for name, encode in encoders.items():
        every, near = [], []
        for ep in episodes:
            z, tips = encode(ep.frames), fingertips(ep.state.numpy())
            for ref in (10, 25, 50):
                feature = (z - z[ref]).abs().mean((1, 2)).numpy()
                tip = np.linalg.norm(tips - tips[ref], axis=1)
                every.append(spearmanr(feature, tip).correlation)
                close = tip < 0.08
                near.append(spearmanr(feature[close], tip[close]).correlation if close.sum() > 4 else np.nan)
        print(f"{name}: rank correlation of feature and fingertip distance {np.nanmean(every):.3f}, "
              f"within 0.08 of the reference {np.nanmean(near):.3f}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
