"""The action-conditioned predictor over a frozen encoder's tokens, its recipe, and the WorldModel API.

Each step ``t`` of an episode is one block of the predictor's sequence: an action token (the action
taken after observation ``t``), an optional proprio token, and the frozen encoder's (pooled) tokens of
observation ``t``. Attention is block-causal (a step sees itself and earlier steps, never a later one)
and the outputs at step ``t``'s observation slots predict the encoder's tokens of observation ``t + 1``.

>>> wm = WorldModel.load("runs/worldmodel/last.pt")  # doctest: +SKIP
>>> z = wm.encode(frames)  # doctest: +SKIP
>>> wm.rollout(frames[:1], actions).shape  # doctest: +SKIP
torch.Size([50, 4, 192])
>>> wm.plan(frames[:1], goal_frame[None], horizon=5, method="cem").shape  # doctest: +SKIP
torch.Size([5, 2])
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from multijepa.checkpoint import load_checkpoint
from multijepa.config import build, plain
from multijepa.core.transformer import Transformer, init_weights, sincos_embed
from multijepa.errors import MultijepaError, RecipeError, check
from multijepa.recipe import OptimConfig, RunConfig, TrainConfig, recipe_from_dict
from multijepa.train import autocast, build_model, resolve_device, resolve_precision
from multijepa.worldmodel.observe import ObservationEncoder


@dataclass(frozen=True)
class WorldModelConfig:
    """The ``worldmodel`` section: the frozen encoder, how observations become tokens, the predictor and its losses."""

    encoder: str = ""  # a multijepa checkpoint (last.pt) or export folder whose target encoder is frozen
    encoder_init: Literal["trained", "random"] = "trained"  # random: the same encoder at random init (a baseline)
    observation: Literal["frames", "state", "audio", "points"] = "frames"  # see multijepa/worldmodel/observe.py
    pool: int = 1  # average the encoder's tokens over cells of pool x pool grid positions; 0: one mean token
    normalize: bool = True  # layer-normalise each token's features, so every target is on one scale
    proprio: bool = False  # one more token per step from the episodes' proprio.npy, whose next value it predicts
    proprio_weight: float = 1.0  # the proprio prediction's share of the loss (its L1 in units of its spread)
    residual: bool = True  # predict the change from the current tokens (starts as copying them forward)
    dim: int = 192
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    window: int = 8  # steps per training clip: window + 1 observations and window actions
    rollout_steps: int = 2  # autoregressive steps in the rollout loss; 0: teacher forcing only
    rollout_context: int = 1  # real observations the rollouts (loss and validation) start from
    rollout_weight: float = 1.0
    loss: Literal["l1", "smooth_l1", "mse"] = "l1"
    val_fraction: float = 0.1  # share of the episodes held out for the validation losses


@dataclass(frozen=True)
class EpisodeDataConfig:
    path: str = ""  # a folder of episode folders, a .tar shard of episodes or a folder of shards
    batch_size: int = 64  # clips per step


@dataclass(frozen=True)
class WorldModelRecipe:
    """A world-model recipe (``recipes/worldmodel.yaml``): ``multijepa pretrain`` trains it."""

    worldmodel: WorldModelConfig = field(default_factory=WorldModelConfig)
    data: EpisodeDataConfig = field(default_factory=EpisodeDataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-4, warmup_steps=100, weight_decay=0.04,
                                                                   weight_decay_end=0.04))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=2000))
    run: RunConfig = field(default_factory=lambda: RunConfig(dir="runs/worldmodel"))


def validate_worldmodel(recipe: WorldModelRecipe, where: str) -> None:
    w, t = recipe.worldmodel, recipe.train
    check(bool(w.encoder), where, "worldmodel.encoder", "names no encoder: give the last.pt (or export folder) of a "
          "multijepa pretrain run on the episodes' observations")
    check(w.pool >= 0, where, "worldmodel.pool", "must be 0 (one mean token) or a pooling factor >= 1")
    check(w.dim > 0 and w.heads > 0 and w.dim % w.heads == 0, where, "worldmodel.dim",
          f"must be a positive multiple of worldmodel.heads={w.heads}, got {w.dim}")
    check(w.depth >= 1, where, "worldmodel.depth", "must be at least 1")
    check(w.window >= 1, where, "worldmodel.window", "must be at least 1 step")
    check(1 <= w.rollout_context <= w.window, where, "worldmodel.rollout_context",
          f"must be between 1 and worldmodel.window={w.window} observations, got {w.rollout_context}")
    check(0 <= w.rollout_steps <= w.window + 1 - w.rollout_context, where, "worldmodel.rollout_steps",
          f"must be between 0 and worldmodel.window + 1 - worldmodel.rollout_context = "
          f"{w.window + 1 - w.rollout_context}, got {w.rollout_steps}")
    check(w.rollout_weight >= 0, where, "worldmodel.rollout_weight", "must be 0 or more")
    check(w.proprio_weight >= 0, where, "worldmodel.proprio_weight", "must be 0 or more")
    check(0 <= w.val_fraction < 1, where, "worldmodel.val_fraction", "must be in [0, 1)")
    check(bool(recipe.data.path), where, "data.path", "names no episodes: record some with multijepa record ENV_ID OUT")
    check(recipe.data.batch_size > 0, where, "data.batch_size", "must be positive")
    check(recipe.optim.lr > 0, where, "optim.lr", "must be positive")
    for key in ("steps", "checkpoint_every", "log_every"):
        check(getattr(t, key) > 0, where, f"train.{key}", "must be positive")


def worldmodel_recipe_from_dict(raw: dict, where: str = "recipe") -> WorldModelRecipe:
    """Build and validate a :class:`WorldModelRecipe` from plain data (a YAML file's, or a checkpoint's)."""
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: a recipe must be a mapping of sections, got {type(raw).__name__}")
    known = [f.name for f in dataclasses.fields(WorldModelRecipe)]
    sections = {}
    for key, value in raw.items():
        if key not in known:
            hint = difflib.get_close_matches(str(key), known, n=1)
            raise RecipeError(f"{where}: unknown key '{key}'" + (f" (did you mean '{hint[0]}'?)" if hint else
                              f" (a world-model recipe has the sections {', '.join(known)})"))
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: '{key}' must be a mapping of keys, got {value!r}")
        cls = typing.get_type_hints(WorldModelRecipe)[key]
        defaults = plain(getattr(WorldModelRecipe(), key))
        sections[key] = build(cls, {**defaults, **value}, key, where)
    recipe = WorldModelRecipe(**sections)
    validate_worldmodel(recipe, where)
    return recipe


def block_causal_mask(steps: int, per_step: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """bool [steps * per_step, steps * per_step], True where a query may attend to a key: the key's step
    is the query's or earlier.

    >>> block_causal_mask(2, 2).int().tolist()
    [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]]
    """
    step = torch.arange(steps, device=device).repeat_interleave(per_step)
    return step[None, :] <= step[:, None]


class ActionPredictor(nn.Module):
    """z [B, T, N, F] (observation tokens), actions [B, T, A], proprio [B, T, P] -> (each step's next tokens
    [B, T, N, F], and next proprio [B, T, P] or None), block-causal over steps (with ``residual``, as the change
    from step t's own). Proprio is read and predicted in units of the training episodes' spread (buffers
    ``proprio_mean`` / ``proprio_std``), so that rollouts can feed the predictor its own proprio."""

    def __init__(self, feat_dim: int, tokens: int, action_dim: int, proprio_dim: int, cfg: WorldModelConfig):
        super().__init__()
        self.tokens, self.action_dim, self.proprio_dim = tokens, action_dim, proprio_dim
        self.extra = int(action_dim > 0) + int(proprio_dim > 0)
        self.obs_in = nn.Linear(feat_dim, cfg.dim)
        self.action_in = nn.Linear(action_dim, cfg.dim) if action_dim else None
        self.proprio_in = nn.Linear(proprio_dim, cfg.dim) if proprio_dim else None
        self.proprio_out = nn.Linear(cfg.dim, proprio_dim) if proprio_dim else None
        if proprio_dim:  # (only then: checkpoints of world models without proprio load as before)
            self.register_buffer("proprio_mean", torch.zeros(proprio_dim))
            self.register_buffer("proprio_std", torch.ones(proprio_dim))
        self.slots = nn.Parameter(torch.zeros(self.extra + tokens, cfg.dim))  # which token of a step this is
        self.transformer = Transformer(cfg.dim, cfg.depth, cfg.heads, cfg.mlp_ratio)
        self.out = nn.Linear(cfg.dim, feat_dim)
        self.residual = cfg.residual
        for layer in filter(None, (self.obs_in, self.out, self.action_in, self.proprio_in, self.proprio_out)):
            init_weights(layer)
        for layer in filter(None, (self.out, self.proprio_out) if self.residual else ()):
            nn.init.zeros_(layer.weight)  # residual: start as the copy-the-last-step forecast, then improve on it
        nn.init.trunc_normal_(self.slots, std=0.02)

    def set_proprio_scale(self, proprio: torch.Tensor) -> None:
        """Read proprio in units of the spread of ``proprio`` [M, P] (the training episodes')."""
        self.proprio_mean.copy_(proprio.mean(0))
        self.proprio_std.copy_(proprio.std(0).clamp_min(1e-3 * float(proprio.std(0).max().clamp_min(1e-6))))

    def forward(self, z: torch.Tensor, actions: Optional[torch.Tensor] = None,
                proprio: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        b, t, n, _ = z.shape
        parts = []
        if self.action_in is not None:
            parts.append(self.action_in(actions)[:, :, None])
        if self.proprio_in is not None:
            if proprio is None or proprio.shape[:2] != z.shape[:2]:
                raise MultijepaError(f"this world model reads proprio tokens: give proprio [B, T, P] for the context "
                                     f"tokens {list(z.shape[:2])}, got {None if proprio is None else list(proprio.shape)}")
            p_unit = (proprio.float() - self.proprio_mean) / self.proprio_std
            parts.append(self.proprio_in(p_unit.to(z.dtype))[:, :, None])
        x = torch.cat(parts + [self.obs_in(z)], dim=2)  # [B, T, S, dim]
        steps = torch.arange(t, device=z.device, dtype=torch.float32)[None, :, None]
        x = x + self.slots.to(x.dtype) + sincos_embed(steps, x.shape[-1])[0][:, None].to(x.dtype)
        per_step = x.shape[2]
        y = self.transformer(x.reshape(b, t * per_step, -1), mask=block_causal_mask(t, per_step, z.device))
        y = y.reshape(b, t, per_step, -1)
        pred = self.out(y[:, :, self.extra:])
        p_next = None if self.proprio_out is None else self.proprio_out(y[:, :, self.extra - 1]).float() * \
            self.proprio_std + (proprio.float() if self.residual else self.proprio_mean)
        return (pred + z if self.residual else pred), p_next


def latent_loss(pred: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """The mean distance between predicted and real tokens (``worldmodel.loss``), in float32."""
    pred, target = pred.float(), target.float()
    if kind == "l1":
        return (pred - target).abs().mean()
    if kind == "smooth_l1":
        return F.smooth_l1_loss(pred, target)
    return F.mse_loss(pred, target)


def rollout_latents(predictor: ActionPredictor, z: torch.Tensor, actions: Optional[torch.Tensor],
                    proprio: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Autoregressive prediction from context tokens z [B, T0, N, F] under actions [B, T0 - 1 + H, A]
    (the actions between the context steps, then one per predicted step): ([B, H, N, F], and the predicted
    proprio [B, H, P] or None), each step fed its own predictions of the earlier ones, proprio included.
    Without actions (``action_dim`` 0) ``actions`` is [B, T0 - 1 + H, 0]. ``proprio`` [B, T0, P]: the context's."""
    steps = actions.shape[1] - z.shape[1] + 1
    if steps < 1:
        raise MultijepaError(f"rollout: {actions.shape[1]} actions for {z.shape[1]} context steps; give at least "
                             f"one action after the last context observation")
    seq, p, out, p_out = z, proprio, [], []
    for _ in range(steps):
        t = seq.shape[1]
        nxt, p_nxt = predictor(seq, actions[:, :t], p)
        out.append(nxt[:, -1:])
        seq = torch.cat([seq, nxt[:, -1:].to(seq.dtype)], 1)
        if p_nxt is not None:
            p_out.append(p_nxt[:, -1:])
            p = torch.cat([p.float(), p_nxt[:, -1:]], 1)
    return torch.cat(out, 1), (torch.cat(p_out, 1) if p_out else None)


def _last(z: torch.Tensor, context: Optional[int], dim: int = 0) -> torch.Tensor:
    """The last ``context`` steps of ``z`` along ``dim`` (all with None)."""
    if context is None:
        return z
    if not 1 <= context <= z.shape[dim]:
        raise MultijepaError(f"context={context} for {z.shape[dim]} observations; give 1 to {z.shape[dim]}")
    return z.narrow(dim, z.shape[dim] - context, context)


class WorldModel:
    """A trained world model: the frozen encoder and the action-conditioned predictor, for rollouts and planning.

    Args:
        predictor: the trained :class:`ActionPredictor`.
        observer: the :class:`ObservationEncoder` (frozen encoder + pooling).
        action_low / action_high: [A], the range of the training actions (the planners' default bounds).
        device / precision: as ``embed``'s.
    """

    def __init__(self, predictor: ActionPredictor, observer: ObservationEncoder, action_low: torch.Tensor,
                 action_high: torch.Tensor, device: str = "auto", precision: str = "auto"):
        self.device = resolve_device(device)
        self.precision, _ = resolve_precision(precision, self.device)
        self.predictor = predictor.to(self.device).eval()
        self.observer = observer.to(self.device)
        self.action_low, self.action_high = action_low.float(), action_high.float()
        self.render: dict = {}  # how its episodes were recorded: {"env", "camera", "action_repeat"}

    @classmethod
    def load(cls, path: Union[str, Path], device: str = "auto", precision: str = "auto") -> "WorldModel":
        """A world model from the ``last.pt`` of a world-model run (it holds the encoder too)."""
        state = load_checkpoint(path)
        if state.get("kind") != "worldmodel":
            raise MultijepaError(f"{path}: not a world-model checkpoint (train one with multijepa pretrain "
                                 f"recipes/worldmodel.yaml)")
        recipe = worldmodel_recipe_from_dict(state["recipe"], f"{path} (its saved recipe)")
        enc_recipe = recipe_from_dict(state["encoder_recipe"], f"{path} (its encoder's recipe)")
        encoder = build_model(enc_recipe).target
        encoder.load_state_dict(state["encoder"])
        s = state["shapes"]
        predictor = ActionPredictor(s["feat_dim"], s["tokens"], s["action_dim"], s["proprio_dim"], recipe.worldmodel)
        predictor.load_state_dict(state["predictor"])
        wm = cls(predictor, ObservationEncoder(encoder, enc_recipe, recipe.worldmodel),
                 torch.tensor(s["action_low"]), torch.tensor(s["action_high"]), device, precision)
        wm.render = state.get("render") or {}
        return wm

    def encode(self, observations: torch.Tensor) -> torch.Tensor:
        """Raw observations of one episode [T, ...] (uint8 frames [T, H, W, C], states [T, D], clouds [T, P, 3 + F]
        or audio windows [T, C, W] from ``observer.observations(episode)``) -> [T, N, F]."""
        with autocast(self.precision, self.device):
            return self.observer(torch.as_tensor(observations))

    @torch.no_grad()
    def rollout(self, observations: torch.Tensor, actions: torch.Tensor,
                proprio: Optional[torch.Tensor] = None, context: Optional[int] = None) -> torch.Tensor:
        """Predicted representations of the steps after the context, under ``actions``.

        Args:
            observations: raw observations of one episode [T0, ...] (uint8 frames [T0, H, W, C] or states
                [T0, D]; then ``actions`` is [T0 - 1 + H, A] and the result [H, N, F]), or a batch of context
                tokens from :meth:`encode` [B, T0, N, F] (then ``actions`` is [B, T0 - 1 + H, A] and the
                result [B, H, N, F]); see :func:`rollout_latents`.
            proprio: the context's proprio, [T0, P] with raw observations or [B, T0, P] with tokens, where
                the predictor was trained with proprio tokens (``uses_proprio``); its rollout predicts the rest.
            context: as in :meth:`plan`: start from the last ``context`` observations, the earlier ones only the
                encoder's past (``T0`` above is then ``context``).
        """
        observations = torch.as_tensor(observations)
        raw = observations.dtype == torch.uint8 or observations.ndim in (2, 3)  # tokens are [B, T0, N, F]
        z = _last(self.encode(observations), context)[None] if raw else _last(observations, context, dim=1)
        actions = torch.as_tensor(actions)[None] if raw else torch.as_tensor(actions)
        if proprio is not None:
            proprio = torch.as_tensor(proprio).float()
            proprio = proprio[None] if raw else proprio
        with autocast(self.precision, self.device):
            out, _ = rollout_latents(self.predictor, z.to(self.device), actions.to(self.device).float(),
                                     None if proprio is None else proprio.to(self.device))
        return out.float()[0] if raw else out.float()

    @property
    def uses_proprio(self) -> bool:
        """Whether the predictor reads proprio tokens (then rollouts and plans need the context's proprio)."""
        return self.predictor.proprio_dim > 0

    def energy(self, z: torch.Tensor, goal: torch.Tensor, actions: torch.Tensor, reduce: str = "final",
               proprio: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Per action sequence [S, T0 - 1 + H, A], the mean L1 distance of its rollout from context z [T0, N, F]
        (and proprio [T0, P]) to goal tokens [N, F]: at the final step (``final``) or averaged over the predicted
        steps (``sum``) -> [S]."""
        p = None if proprio is None else torch.as_tensor(proprio).float()[None].expand(len(actions), -1, -1)
        pred = self.rollout(z[None].expand(len(actions), *z.shape), actions, p)
        dist = (pred - goal.to(pred.device)).abs().mean((-1, -2))  # [S, H]
        return (dist[:, -1] if reduce == "final" else dist.mean(1)).cpu()

    def plan(self, observations: torch.Tensor, goal: torch.Tensor, horizon: int = 5, method: str = "cem",
             past_actions: Optional[torch.Tensor] = None, reduce: str = "final",
             proprio: Optional[torch.Tensor] = None, context: Optional[int] = None, **planner) -> torch.Tensor:
        """Actions [horizon, A] that bring the predicted representation closest to the goal's.

        Args:
            observations: the latest raw observations [T0, ...] (T0 >= 1; a few give the predictor motion).
            context: the predictor starts from the last ``context`` of them (default: all, T0); the earlier
                ones only give the encoder the past its inputs reach back to (``observer.history``: a video
                clip's frames, a state window), as training did. ``past_actions`` and ``proprio`` then
                cover the ``context`` observations.
            goal: the goal observation(s) [1, ...] as raw observations (the last is the goal).
            past_actions: [T0 - 1, A], the actions taken between those observations.
            proprio: [T0, P], the proprio at those observations, for a world model that ``uses_proprio`` (the
                goal is an observation alone: its proprio is not needed).
            method: ``cem`` or ``mppi`` (:mod:`multijepa.worldmodel.plan`); ``planner``: its settings.
        """
        from multijepa.worldmodel.plan import PLANNERS

        if method not in PLANNERS:
            raise MultijepaError(f"plan: method {method!r}: use one of {', '.join(PLANNERS)}")
        z, z_goal = _last(self.encode(observations), context), self.encode(goal)[-1]
        past = torch.zeros(0, len(self.action_low)) if past_actions is None else torch.as_tensor(past_actions).float()
        if len(past) != len(z) - 1:
            raise MultijepaError(f"plan: {len(past)} past actions for {len(z)} observations; give one fewer")

        def energy(actions: torch.Tensor) -> torch.Tensor:
            return self.energy(z, z_goal, torch.cat([past[None].expand(len(actions), -1, -1), actions], 1), reduce,
                               proprio if self.uses_proprio else None)

        best, _ = PLANNERS[method](energy, horizon, self.action_low, self.action_high, **planner)
        return best
