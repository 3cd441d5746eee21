"""The world-model commands of the command line: ``multijepa record`` and ``multijepa plan``
(``multijepa pretrain`` trains world models; multijepa/cli.py dispatches it)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

from multijepa.errors import MultijepaError


def _record(args: argparse.Namespace) -> None:
    from multijepa.episodes import record

    written = record(args.env, args.out, args.episodes, args.steps, pixels="pixels" in args.observations,
                     state="state" in args.observations, size=args.size, policy=args.policy, seed=args.seed,
                     camera=args.camera, frames_as=args.frames_as, action_repeat=args.action_repeat,
                     progress=sys.stderr.isatty())
    print(f"wrote {len(written)} episodes to {args.out} ({written[0].name} ... {written[-1].name})")


def _plan(args: argparse.Namespace) -> None:
    from multijepa.worldmodel import WorldModel, evaluate_planning

    if args.policy == "plan" and not args.checkpoint:
        raise MultijepaError("plan: give a world model's last.pt (multijepa pretrain worldmodel), or --policy random")
    wm = WorldModel.load(args.checkpoint, args.device) if args.policy == "plan" else None
    planner = {"samples": args.samples, "iterations": args.iterations}
    planner.update({"elites": args.elites} if args.method == "cem" else {})
    result = evaluate_planning(wm, args.env, args.episodes, args.steps, args.horizon, args.method, args.replan_every,
                               args.context, args.seed, args.policy, args.energy, sys.stderr.isatty(),
                               args.action_repeat, **planner)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(f"{args.env}, {args.policy}{' (' + args.method + ')' if args.policy == 'plan' else ''}: success "
          f"{result['success_rate']:.3f} over {result['episodes']} episodes (final distance < {result['threshold']}; "
          f"mean final distance {result['final_distance']:.4f}; each action for {result['action_repeat']} "
          f"environment steps) in {result['seconds']:.0f} s")


def _observations(text: str) -> set[str]:
    """An argparse type: a comma-separated subset of pixels, state."""
    kinds = {k.strip() for k in text.split(",") if k.strip()}
    if not kinds or kinds - {"pixels", "state"}:
        raise argparse.ArgumentTypeError(f"{text!r}: give pixels, state or pixels,state")
    return kinds


def add_worldmodel_commands(command: Callable[..., argparse.ArgumentParser], count: Callable[[int], Callable]) -> None:
    """Add ``record`` and ``plan`` through the main parser's ``command(name, help, description)``;
    ``count(least)`` is its argparse type for whole numbers of at least ``least``."""
    p = command("record", "write episodes (observations + an action per step) from a Gymnasium environment",
                "Run a policy in a Gymnasium environment (MuJoCo ones render headless through EGL) and write "
                "each episode as a folder: episode.json, actions.npy, frames/ and/or state.npy (multijepa/episodes.py).")
    p.add_argument("env", metavar="ENV_ID", help="a Gymnasium environment id, e.g. Reacher-v5")
    p.add_argument("out", help="folder to write ep_000000/, ep_000001/, ... into")
    p.add_argument("--episodes", type=count(1), default=10, metavar="N", help="episodes to record")
    p.add_argument("--steps", type=count(1), default=50, metavar="T", help="most steps (recorded actions) per episode")
    p.add_argument("--action-repeat", type=count(1), default=1, metavar="R",
                   help="apply each action for R environment steps; record the observation after them")
    p.add_argument("--observations", default="pixels,state", type=_observations, help="pixels, state or pixels,state")
    p.add_argument("--size", type=count(8), default=64, metavar="PX", help="rendered frame size")
    p.add_argument("--camera", choices=("auto", "env"), default="auto",
                   help="auto: multijepa's view where it has one (Reacher-v5: top-down on the arm); env: the "
                        "environment's own camera")
    p.add_argument("--frames-as", choices=("png", "npy", "mp4"), default="png",
                   help="a frames/ folder of PNG images, one frames.npy, or one H.264 frames.mp4")
    p.add_argument("--policy", default="random", choices=("random", "smooth"),
                   help="random: uniform actions; smooth: drifting random actions that travel further")
    p.add_argument("--seed", type=int, default=0, help="seeds resets (episode i: seed + i) and the policy")
    p.set_defaults(func=_record)

    p = command("plan", "closed-loop goal reaching with a world model (CEM or MPPI, replanning), scored by success rate",
                "Goal-reaching episodes from the environment's reset: the planner picks actions whose predicted "
                "representation comes closest to the goal observation's, replanning as it goes (docs/world-models.md).")
    p.add_argument("checkpoint", nargs="?", help="a world model's last.pt (multijepa pretrain recipes/worldmodel.yaml)")
    p.add_argument("--env", default="Reacher-v5", help="the task's Gymnasium environment")
    p.add_argument("--policy", choices=("plan", "random"), default="plan")
    p.add_argument("--method", choices=("cem", "mppi"), default="cem")
    p.add_argument("--episodes", type=count(1), default=10, metavar="N")
    p.add_argument("--steps", type=count(1), default=50, metavar="N",
                   help="environment steps per episode, the same for every policy")
    p.add_argument("--action-repeat", type=count(1), metavar="R",
                   help="environment steps per chosen action (default: the world model's episodes' repeat; 1 for "
                        "--policy random)")
    p.add_argument("--horizon", type=count(1), default=5, metavar="H", help="planned actions")
    p.add_argument("--replan-every", type=count(1), default=1, metavar="K", help="execute K planned actions, then plan again")
    p.add_argument("--context", type=count(1), default=2, metavar="K",
                   help="latest observations the predictor sees (the encoder also reads the past its inputs reach back to)")
    p.add_argument("--samples", type=count(2), default=128, metavar="S", help="action sequences per planner iteration")
    p.add_argument("--iterations", type=count(1), default=4, metavar="N")
    p.add_argument("--elites", type=count(1), default=16, metavar="N", help="CEM: sequences the Gaussian is refitted to")
    p.add_argument("--energy", choices=("final", "sum"), default="final",
                   help="distance to the goal at the last planned step, or averaged over the steps")
    p.add_argument("--seed", type=int, default=1000, help="episode i resets the environment with seed + i")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", metavar="FILE", help="also write the result (with every episode's distance) here")
    p.set_defaults(func=_plan)
