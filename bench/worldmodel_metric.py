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

With ``--oracle ENERGY ...`` it plans in Reacher-v5 with the simulator itself as the model (each candidate
action sequence is played from the current state and scored, then the state is restored): the success a
perfect world model would reach with that energy and planner. Energies: ``tip`` (the fingertip's distance
to the goal's), ``state`` (L1 between the joints' cos/sin and the goal's: a pose-matching energy),
``trained`` / ``random`` (L1 between the pooled tokens of the rendered final frame and the goal frame's,
through ``--encoder`` trained or at random init), ``pixels`` (L1 between the frames).

    python bench/worldmodel_metric.py --oracle tip state --plan "--horizon 5 --samples 128 --iterations 3 --replan-every 2"
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from multijepa.episodes import CAMERAS, iter_episodes
from multijepa.worldmodel import WorldModel, WorldModelConfig
from multijepa.worldmodel.observe import ObservationEncoder, load_encoder
from multijepa.worldmodel.plan import ReacherGoals, cem


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
            felt = ep.proprio[s - 1:s + 1][None].expand(candidates, -1, -1) if wm.uses_proprio else None
            pred = wm.rollout(z[s - 1:s + 1][None].expand(candidates, -1, -1, -1), acts, felt)[:, -1]
            e = (pred - z[s + horizon]).abs().mean((-1, -2))
            ranks.append(int((e < e[0]).sum()))
            true_error.append(float(e[0]))
            other_error.append(float(e[1:].mean()))
    return (f"true actions rank {np.mean(ranks):.1f} of {candidates} on average (0 best, {candidates / 2 - 0.5:.1f} "
            f"by chance); final-step L1 {np.mean(true_error):.4f} with them, {np.mean(other_error):.4f} with others")


def oracle_planning(energy_kind: str, encode, episodes: int, seed: int, horizon: int, samples: int,
                    iterations: int, replan_every: int, steps: int = 50) -> dict:
    """Closed-loop CEM in Reacher-v5 with the simulator as the model (see the module docstring)."""
    pixels = energy_kind not in ("tip", "state")
    task = ReacherGoals(pixels=pixels, camera=CAMERAS["Reacher-v5"])
    u, g = task.env.unwrapped, torch.Generator().manual_seed(seed)
    distances, started = [], time.perf_counter()
    try:
        for i in range(episodes):
            _, goal = task.reset(seed + i)
            goal_code = encode(goal["frames"][None]) if pixels else None
            plan = None
            for t in range(steps):
                if t % replan_every == 0:
                    qpos, qvel = u.data.qpos.copy(), u.data.qvel.copy()

                    def energy(x: torch.Tensor) -> torch.Tensor:
                        scores, frames = [], []
                        for seq in x.numpy():
                            u.set_state(qpos, qvel)
                            for a in seq:
                                u.do_simulation(a, u.frame_skip)
                            if energy_kind == "tip":
                                scores.append(np.linalg.norm(u.get_body_com("fingertip")[:2] - task.target))
                            elif energy_kind == "state":
                                scores.append(np.abs(u._get_obs()[:4] - goal["state"].numpy()[:4]).mean())
                            else:
                                frames.append(torch.as_tensor(np.asarray(task.env.render(), dtype=np.uint8).copy()))
                        u.set_state(qpos, qvel)
                        if pixels:
                            return (encode(torch.stack(frames)) - goal_code).abs().mean((1, 2))
                        return torch.tensor(scores)

                    warm = None if plan is None else torch.cat([plan[replan_every:], plan[-1:].expand(
                        replan_every, -1)])[:horizon]
                    plan, _ = cem(energy, horizon, task.action_low, task.action_high, samples=samples,
                                  iterations=iterations, mean=warm, generator=g)
                task.step(plan[t % replan_every])
            distances.append(task.distance())
    finally:
        task.close()
    return {"success_rate": float(np.mean([d < task.threshold for d in distances])),
            "final_distance": float(np.mean(distances)), "episodes": episodes,
            "seconds": time.perf_counter() - started}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench/out/reacher"))
    ap.add_argument("--episodes", type=int, default=20, help="the last N recorded episodes")
    ap.add_argument("--encoder", help="score this image encoder's checkpoint (trained and at random init) instead")
    ap.add_argument("--pools", type=int, nargs="*", default=[4], help="with --encoder: worldmodel.pool values")
    ap.add_argument("--actions", nargs="*", metavar="RUN", help="world-model runs under OUT to score on actions")
    ap.add_argument("--oracle", nargs="*", choices=["tip", "state", "trained", "random", "pixels"],
                    help="plan with the simulator as the model under these energies")
    ap.add_argument("--plan", default="--horizon 5 --samples 128 --iterations 3 --replan-every 2",
                    help="with --oracle: the planner's settings, as multijepa plan takes them (one quoted string)")
    ap.add_argument("--plan-episodes", type=int, default=20)
    ap.add_argument("--plan-seed", type=int, default=5000, help="episode i resets with seed + i (5000: validation)")
    args = ap.parse_args()
    if args.oracle:
        flags = dict(zip(args.plan.split()[::2], map(int, args.plan.split()[1::2])))
        settings = {k: flags[f"--{k.replace('_', '-')}"] for k in ("horizon", "samples", "iterations", "replan_every")}
        for kind in args.oracle:
            encode = None
            if kind in ("trained", "random"):
                cfg = WorldModelConfig(encoder=args.encoder, encoder_init=kind, pool=args.pools[0])
                encode = ObservationEncoder(*load_encoder(cfg), cfg)
            elif kind == "pixels":
                encode = lambda frames: frames.float().flatten(1)[:, None] / 255  # noqa: E731
            r = oracle_planning(kind, encode, args.plan_episodes, args.plan_seed, **settings)
            print(f"oracle, {kind} energy ({args.plan}): success {r['success_rate']:.2f} of {r['episodes']}, "
                  f"mean final distance {r['final_distance']:.3f}, {r['seconds'] / 60:.1f} min", flush=True)
        return
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
