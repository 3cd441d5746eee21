"""Planning with a world model: CEM and MPPI over action sequences, model-predictive control in a
Gymnasium environment, and the goal-reaching tasks that ``multijepa plan`` scores.

A planner minimises ``energy(actions [S, H, A]) -> [S]`` over sequences inside the box ``[low, high]``:

>>> target = torch.tensor([[0.5, -0.25]]).expand(3, 2)
>>> best, e = cem(lambda a: ((a - target) ** 2).sum((1, 2)), 3, -torch.ones(2), torch.ones(2))
>>> bool((best - target).abs().max() < 0.05)
True
"""

from __future__ import annotations

import math
import time
from typing import Callable, Optional

import numpy as np
import torch

from multijepa.errors import MultijepaError

Energy = Callable[[torch.Tensor], torch.Tensor]


def _start(horizon: int, low: torch.Tensor, high: torch.Tensor, mean: Optional[torch.Tensor],
           std: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    low, high = low.float(), high.float()
    mean = ((low + high) / 2).expand(horizon, -1).clone() if mean is None else mean.float().clone()
    std = ((high - low) / 2).expand(horizon, -1).clone() if std is None else std.float().expand(horizon, -1).clone()
    return mean, std


def _draw(mean: torch.Tensor, std: torch.Tensor, samples: int, low: torch.Tensor, high: torch.Tensor,
          generator: Optional[torch.Generator]) -> torch.Tensor:
    noise = torch.randn((samples, *mean.shape), generator=generator)
    x = torch.minimum(torch.maximum(mean + std * noise, low.float()), high.float())
    x[0] = mean  # the current estimate is always among the candidates
    return x


def cem(energy: Energy, horizon: int, low: torch.Tensor, high: torch.Tensor, samples: int = 256,
        iterations: int = 5, elites: int = 32, mean: Optional[torch.Tensor] = None, std: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, float]:
    """The cross-entropy method: sample sequences from a diagonal Gaussian [H, A], refit it to the ``elites``
    lowest-energy ones, ``iterations`` times. Returns the lowest-energy sequence seen [H, A] and its energy.

    ``mean`` warm-starts the search (model-predictive control passes the last plan, shifted by one step).
    """
    mean, std = _start(horizon, low, high, mean, std)
    floor = 1e-3 * (high - low).float()
    best, best_energy = mean, math.inf
    for _ in range(iterations):
        x = _draw(mean, std, samples, low, high, generator)
        e = energy(x)
        order = e.argsort()[:min(elites, samples)]
        if float(e[order[0]]) < best_energy:
            best, best_energy = x[order[0]], float(e[order[0]])
        mean, std = x[order].mean(0), torch.maximum(x[order].std(0, unbiased=False), floor)
    return best, best_energy


def mppi(energy: Energy, horizon: int, low: torch.Tensor, high: torch.Tensor, samples: int = 256,
         iterations: int = 5, temperature: float = 0.1, mean: Optional[torch.Tensor] = None,
         std: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, float]:
    """Model-predictive path integral: the mean moves to the average of the sampled sequences weighted by
    ``exp(-(e - min e) / (temperature * (max e - min e)))`` (a temperature relative to the energies'
    spread, so one value suits any energy scale), and the spread to their weighted spread. Returns the final
    mean [H, A] and the lowest energy sampled."""
    mean, std = _start(horizon, low, high, mean, std)
    floor = 1e-3 * (high - low).float()
    best_energy = math.inf
    for _ in range(iterations):
        x = _draw(mean, std, samples, low, high, generator)
        e = energy(x).float()
        best_energy = min(best_energy, float(e.min()))
        w = torch.softmax(-(e - e.min()) / (temperature * (e.max() - e.min()).clamp_min(1e-12)), 0)[:, None, None]
        mean = (w * x).sum(0)
        std = torch.maximum(((w * (x - mean) ** 2).sum(0)).sqrt(), floor)
    return mean, best_energy


PLANNERS = {"cem": cem, "mppi": mppi}


# --------------------------------------------------------------------------- goal-reaching tasks


class ReacherGoals:
    """Goal reaching in Gymnasium's ``Reacher-v5``: from the environment's reset, reach the arm pose that
    ``goal_steps`` smooth random actions lead to (so every goal is reachable and like the recorded data).

    The target dot is moved under the goal pose's fingertip, in the start and the goal observation alike,
    so the goal image differs from the start only in the arm. Success: the fingertip ends within
    ``threshold`` of it (the arm spans 0.21). ``camera``: the view frames are rendered from (a world model
    plans from the view its episodes were recorded with).
    """

    env_id = "Reacher-v5"

    def __init__(self, size: int = 64, goal_steps: int = 20, threshold: float = 0.05, pixels: bool = True,
                 camera: Optional[dict] = None):
        from multijepa.episodes import make_env

        self.env = make_env(self.env_id, pixels, size, camera, "plan")
        self.pixels, self.goal_steps, self.threshold = pixels, goal_steps, threshold
        self.action_low = torch.as_tensor(self.env.action_space.low, dtype=torch.float32)
        self.action_high = torch.as_tensor(self.env.action_space.high, dtype=torch.float32)

    def _observe(self) -> dict:
        from multijepa.episodes import proprio_of

        u = self.env.unwrapped
        out = {"state": torch.as_tensor(u._get_obs(), dtype=torch.float32),
               "proprio": torch.as_tensor(proprio_of(self.env, self.env_id))}
        if self.pixels:
            out["frames"] = torch.as_tensor(np.asarray(self.env.render(), dtype=np.uint8).copy())
        return out

    def reset(self, seed: int) -> tuple[dict, dict]:
        """Start the episode of ``seed``: (start observation, goal observation), each {"frames", "state", "proprio"}."""
        from multijepa.episodes import smooth_random

        self.env.reset(seed=seed)
        u = self.env.unwrapped
        start_qpos, start_qvel = u.data.qpos.copy(), u.data.qvel.copy()
        rng = np.random.default_rng(seed)
        act = smooth_random(self.env.action_space, rng)
        for _ in range(self.goal_steps):
            self.env.step(act(None, rng))
        goal_qpos = u.data.qpos.copy()
        self.target = u.get_body_com("fingertip")[:2].copy()
        goal_qpos[2:4] = self.target
        u.set_state(goal_qpos, np.zeros_like(start_qvel))
        goal = self._observe()
        start_qpos[2:4] = self.target
        u.set_state(start_qpos, start_qvel)
        return self._observe(), goal

    def step(self, action: torch.Tensor, repeat: int = 1) -> dict:
        """Apply ``action`` for ``repeat`` environment steps; the observation after them."""
        for _ in range(repeat):
            self.env.step(action.numpy().astype(np.float32))
        return self._observe()

    def distance(self) -> float:
        return float(np.linalg.norm(self.env.unwrapped.get_body_com("fingertip")[:2] - self.target))

    def close(self) -> None:
        self.env.close()


TASKS = {"Reacher-v5": ReacherGoals}


def evaluate_planning(wm, env_id: str = "Reacher-v5", episodes: int = 10, steps: int = 50, horizon: int = 5,
                      method: str = "cem", replan_every: int = 1, context: int = 2, seed: int = 1000,
                      policy: str = "plan", reduce: str = "final", progress: bool = False,
                      action_repeat: Optional[int] = None, **planner) -> dict:
    """Closed-loop goal reaching: each episode plans ``horizon`` actions, executes the first ``replan_every``,
    and plans again (model-predictive control), from the latest ``context`` observations (the encoder also
    reads the ``wm.observer.history`` before them, as in training: a clip's or state window's past). ``policy``:
    ``plan`` (the world model ``wm``) or ``random`` (uniform actions; ``wm`` may be None).

    ``steps`` is the episode's length in environment steps, the same for every policy. Each chosen action
    is applied for ``action_repeat`` of them (default: the repeat the world model's episodes were recorded
    with, 1 for the random policy), the last one for what remains.

    Returns {"success_rate", "final_distance" (mean), "episodes", "action_repeat", "seconds", "distances": [...]}.
    """
    if env_id not in TASKS:
        raise MultijepaError(f"plan: no goal task for {env_id!r}; multijepa plan knows {', '.join(TASKS)}")
    if policy not in ("plan", "random"):
        raise MultijepaError(f"plan: policy {policy!r}: use plan or random")
    if not 1 <= replan_every <= horizon or context < 1:
        raise MultijepaError(f"plan: replan every 1 to horizon={horizon} steps from at least one observation "
                             f"(got replan_every={replan_every}, context={context})")
    observation = "frames" if wm is None else wm.observer.cfg.observation
    if observation not in ("frames", "state"):
        raise MultijepaError(f"plan: no goal task for a world model of {observation} observations in {env_id} (it "
                             f"gives frames and states); plan with WorldModel.plan in your own loop")
    size = wm.observer.section.size if wm is not None and observation == "frames" else 64
    camera = wm.render.get("camera") if wm is not None else None
    repeat = action_repeat or (wm.render.get("action_repeat", 1) if wm is not None and policy == "plan" else 1)
    decisions = -(-steps // repeat)
    task = TASKS[env_id](size=size, pixels=observation == "frames", camera=camera)
    rng = torch.Generator().manual_seed(seed)
    distances, started = [], time.perf_counter()
    from tqdm.auto import tqdm

    try:
        for i in tqdm(range(episodes), disable=not progress, desc=f"plan ({policy})", unit="episode", leave=False):
            obs, goal = task.reset(seed + i)
            seen, felt, done, plan = [obs[observation]], [obs["proprio"]], [], None
            for t in range(decisions):
                if policy == "random":
                    action = task.action_low + (task.action_high - task.action_low) * torch.rand(
                        len(task.action_low), generator=rng)
                else:
                    if t % replan_every == 0:
                        k = min(context, len(seen))
                        warm = None if plan is None else torch.cat([plan[replan_every:], plan[-1:].expand(
                            min(replan_every, horizon), -1)])[:horizon]
                        plan = wm.plan(torch.stack(seen[-(k + wm.observer.history):]), goal[observation][None],
                                       horizon, method, torch.stack(done[len(done) - k + 1:]) if k > 1 else None,
                                       reduce, torch.stack(felt[-k:]) if wm.uses_proprio else None, context=k,
                                       mean=warm, generator=rng, **planner)
                    action = plan[t % replan_every]
                obs = task.step(action, min(repeat, steps - t * repeat))
                seen.append(obs[observation])
                felt.append(obs["proprio"])
                done.append(action)
            distances.append(task.distance())
    finally:
        task.close()
    hits = [d < task.threshold for d in distances]
    return {"env": env_id, "policy": policy, "episodes": episodes, "action_repeat": repeat,
            "success_rate": sum(hits) / len(hits),
            "final_distance": float(np.mean(distances)), "threshold": task.threshold,
            "seconds": time.perf_counter() - started, "distances": distances}
