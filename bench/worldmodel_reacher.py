"""World models on a real simulator: Reacher-v5 goal reaching from pixels and from states.

Runs what docs/world-models.md shows, as a user runs it (the CLI), timing every stage:

1. ``multijepa record Reacher-v5`` (smooth random actions, each for ``--action-repeat`` environment steps, 64 x 64
   frames from the top-down camera and state vectors);
2. pixels: ``multijepa pretrain frames`` (the image encoder; with ``--pixel-encoder video``, ``multijepa pretrain
   clips``, a video JEPA on clips of 4 frames, each episode's frames written as one H.264 file first),
   ``multijepa pretrain worldmodel`` on it, and the same world model on the encoder at random init
   (``worldmodel.encoder_init=random``);
3. states: a time-series JEPA on windows of recent states, and its two world models the same way;
4. ``multijepa plan`` (CEM, model-predictive control) with each world model, and ``--policy random`` (at
   every environment step, and at the world models' action repeat).

    python bench/worldmodel_reacher.py --out bench/out/reacher      # about an hour on 2 cores

A finished stage is kept (its output exists), so a rerun redoes only what is missing. Results go to
OUT/results.json (results_seedS.json for a --plan-seed S other than 1000) and are printed as the table
docs/results.md holds.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import provenance  # noqa: E402

STATE_ENCODER = ["timeseries.length=4", "timeseries.patch_size=1", "timeseries.channel_mode=mixed",
                 "timeseries.instance_norm=false", "mask.full_span_axes=[]", "mask.num_targets=1",
                 "mask.target_scale=[0.25,0.25]", "mask.min_context=1", "mask.mode=future", "mask.context_scale=[1,1]",
                 "data.batch_size=256", "train.checkpoint_every=500"]


def stage(name: str, args: list[str], times: dict, done: bool = False) -> None:
    """Run ``multijepa ARGS`` (unless ``done``), recording its wall and CPU minutes under ``name`` (and in
    ``times["_file"]`` at once, so a stopped bench keeps the times of the stages it finished)."""
    if done:
        print(f"[{name}] kept from an earlier run", flush=True)
        return
    before, wall = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    print(f"[{name}] multijepa {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, "-m", "multijepa", *args], check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    times[name] = {"wall_min": round((time.perf_counter() - wall) / 60, 2),
                   "cpu_min": round((after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / 60, 2)}
    print(f"[{name}] {times[name]}", flush=True)
    Path(times["_file"]).write_text(json.dumps({k: v for k, v in times.items() if k != "_file"}, indent=1))


def write_clips(episodes: Path, clips: Path) -> Path:
    """Each episode's frames as one near-lossless H.264 file in ``clips`` (what recipes/clips.yaml reads)."""
    from multijepa.episodes import read_episode
    from multijepa.readers.video import write_video

    clips.mkdir(parents=True, exist_ok=True)
    for folder in sorted(episodes.glob("ep_*")):
        target = clips / f"{folder.name}.mp4"
        if not target.exists():
            write_video(target, read_episode(folder).frames.numpy())
    return clips


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench/out/reacher"))
    ap.add_argument("--episodes", type=int, default=300, help="recorded episodes of 50 steps")
    ap.add_argument("--encoder-steps", type=int, default=1000)
    ap.add_argument("--wm-steps", type=int, default=2000)
    ap.add_argument("--state-encoder-steps", type=int, default=1500)
    ap.add_argument("--state-wm-steps", type=int, default=1000)
    ap.add_argument("--plan-episodes", type=int, default=20)
    ap.add_argument("--plan-seed", type=int, default=1000,
                    help="episode i of planning resets with seed + i: 1000 the test episodes, 5000 validation ones")
    ap.add_argument("--action-repeat", type=int, default=1,
                    help="record (and plan) with each action applied for this many environment steps")
    ap.add_argument("--plan", default="--samples 128 --iterations 3 --horizon 5 --replan-every 2 --steps 50",
                    help="multijepa plan options shared by every planning run (one quoted string)")
    ap.add_argument("--proprio", action="store_true",
                    help="pixel world models also read (and predict) the arm's proprio, as V-JEPA 2-AC does")
    ap.add_argument("--pixel-encoder", choices=["image", "video"], default="image",
                    help="video: the pixel world models read clips through a video JEPA trained on the episodes")
    ap.add_argument("--skip", nargs="*", default=[], choices=["pixels", "state"])
    args = ap.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    times_file = out / "times.json"
    times = json.loads(times_file.read_text()) if times_file.exists() else {}
    times["_file"] = str(times_file)
    episodes = out / "episodes"

    stage("record", ["record", "Reacher-v5", str(episodes), "--episodes", str(args.episodes), "--steps", "50",
                     "--policy", "smooth", "--action-repeat", str(args.action_repeat)], times,
          done=(episodes / f"ep_{args.episodes - 1:06d}").is_dir())
    worlds = {}
    if "pixels" not in args.skip:
        # The video encoder's 2 x 4 x 4 grid pools 2-wide to the image encoder's 4 tokens a step.
        recipe, data, pool = (("frames", episodes, []) if args.pixel_encoder == "image" else
                              ("clips", write_clips(episodes, out / "clips"), ["worldmodel.pool=2"]))
        stage("pixel encoder", ["pretrain", recipe, f"data.path={data}", f"run.dir={out / 'frames'}",
                                f"train.steps={args.encoder_steps}", "train.progress=false"], times,
              done=(out / "frames/last.pt").exists())
        kind = "pixels + proprio" if args.proprio else "pixels"
        for init in ("trained", "random"):
            run = out / f"wm_pixels{'_proprio' if args.proprio else ''}_{init}"
            stage(f"{kind} world model ({init} encoder)",
                  ["pretrain", "worldmodel", f"worldmodel.encoder={out / 'frames/last.pt'}",
                   f"worldmodel.encoder_init={init}", f"worldmodel.proprio={str(args.proprio).lower()}", *pool,
                   f"data.path={episodes}", f"run.dir={run}", f"train.steps={args.wm_steps}", "train.progress=false"],
                  times, done=(run / "last.pt").exists())
            worlds[f"{kind}, {init} encoder"] = run
    if "state" not in args.skip:
        states = out / "states.npy"
        if not states.exists():
            from multijepa.episodes import state_series

            np.save(states, state_series(episodes))
        stage("state encoder", ["pretrain", "timeseries", f"data.path={states}", f"run.dir={out / 'state_enc'}",
                                f"train.steps={args.state_encoder_steps}", "train.progress=false", *STATE_ENCODER],
              times, done=(out / "state_enc/last.pt").exists())
        for init in ("trained", "random"):
            run = out / f"wm_state_{init}"
            stage(f"state world model ({init} encoder)",
                  ["pretrain", "worldmodel", f"worldmodel.encoder={out / 'state_enc/last.pt'}",
                   f"worldmodel.encoder_init={init}", "worldmodel.observation=state", "worldmodel.pool=1",
                   f"data.path={episodes}", f"run.dir={run}", f"train.steps={args.state_wm_steps}",
                   "train.progress=false"],
                  times, done=(run / "last.pt").exists())
            worlds[f"state, {init} encoder"] = run
    results = {}
    plan_args = ["--episodes", str(args.plan_episodes), "--seed", str(args.plan_seed), *args.plan.split()]
    tag = "" if args.plan_seed == 1000 else f"_seed{args.plan_seed}"  # validation plans beside the test ones
    random_json = out / f"plan_random{tag}.json"
    stage("plan: random policy", ["plan", "--policy", "random", *plan_args, "--json", str(random_json)], times,
          done=random_json.exists())
    results["random policy"] = json.loads(random_json.read_text())
    if args.action_repeat > 1:  # random actions at the world models' time step too
        repeated_json = out / f"plan_random_repeat{args.action_repeat}{tag}.json"
        stage(f"plan: random policy, action repeat {args.action_repeat}",
              ["plan", "--policy", "random", *plan_args, "--action-repeat", str(args.action_repeat),
               "--json", str(repeated_json)], times, done=repeated_json.exists())
        results[f"random policy, action repeat {args.action_repeat}"] = json.loads(repeated_json.read_text())
    for name, run in worlds.items():
        result = run / f"plan{tag}.json"
        stage(f"plan: {name}", ["plan", str(run / "last.pt"), *plan_args, "--json", str(result)], times,
              done=result.exists())
        results[name] = json.loads(result.read_text())
    times.pop("_file")
    summary = {"provenance": provenance(), "times": times,
               "planning": {k: {key: v[key] for key in ("success_rate", "final_distance", "episodes", "seconds")}
                            for k, v in results.items()}}
    (out / f"results{tag}.json").write_text(json.dumps(summary, indent=1))  # validation beside test
    print("\n| policy | success (final distance < 0.05) | mean final distance | planning time |\n|---|---|---|---|")
    for k, v in summary["planning"].items():
        print(f"| {k} | {v['success_rate']:.3f} ({round(v['success_rate'] * v['episodes'])}/{v['episodes']}) | "
              f"{v['final_distance']:.4f} | {v['seconds'] / 60:.1f} min |")
    print("\n| stage | wall min | CPU min |\n|---|---|---|")
    for k, v in times.items():
        print(f"| {k} | {v['wall_min']} | {v['cpu_min']} |")


if __name__ == "__main__":
    main()
