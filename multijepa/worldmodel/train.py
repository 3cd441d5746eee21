"""Training the action-conditioned predictor on a frozen encoder's tokens of recorded episodes.

``multijepa pretrain recipes/worldmodel.yaml`` runs :func:`train_world_model`: the encoder named in the
recipe encodes every observation once (it is frozen), then the predictor learns from random clips of
``window`` steps with teacher forcing (each step's next tokens from the real earlier ones) plus a rollout
loss (``rollout_steps`` steps fed their own predictions). Checkpoints, resume, the run lock, the loggers
and the divergence guard are the JEPA trainer's.
"""

from __future__ import annotations

import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Optional, Union

import torch

from multijepa.checkpoint import keep_copy, load_checkpoint, save_checkpoint
from multijepa.config import plain
from multijepa.core.jepa import cosine_schedule
from multijepa.core.losses import feature_health
from multijepa.episodes import iter_episodes
from multijepa.errors import DataError, TrainingError
from multijepa.recipe import Recipe, load_recipe, read_recipe_file, recipe_from_dict, recipe_to_dict
from multijepa.runlog import RunLog
from multijepa.train import (_all_finite, _diverged, _progress, _StopRequest, autocast, build_model, param_groups,
                             resolve_device, resolve_precision, run_lock)
from multijepa.worldmodel.model import (ActionPredictor, WorldModelRecipe, latent_loss, rollout_latents,
                                        worldmodel_recipe_from_dict)
from multijepa.worldmodel.observe import ObservationEncoder, load_encoder

# worldmodel keys that fix the predictor's shape or its inputs: a checkpoint resumes only under the same ones
ARCHITECTURE_KEYS = ("encoder", "encoder_init", "observation", "pool", "normalize", "proprio", "residual", "dim",
                     "depth", "heads", "mlp_ratio")


def load_worldmodel_recipe(path: Union[str, Path], overrides: Optional[list[str]] = None) -> WorldModelRecipe:
    """A world-model recipe file (``recipes/worldmodel.yaml``) with ``key=value`` overrides, validated."""
    return worldmodel_recipe_from_dict(*read_recipe_file(path, overrides))


def load_any_recipe(path: Union[str, Path], overrides: Optional[list[str]] = None
                    ) -> Union[Recipe, WorldModelRecipe]:
    """The recipe a file holds: a world-model recipe where it has a ``worldmodel`` section, else a JEPA one."""
    raw, where = read_recipe_file(path, overrides)
    return worldmodel_recipe_from_dict(raw, where) if "worldmodel" in raw else load_recipe(path, overrides)


class EpisodeLatents:
    """Every episode's observations as frozen-encoder tokens z [T + 1, N, F], with its actions [T, A] (and
    proprio [T + 1, P]), and the clips of ``window`` steps drawn from them."""

    def __init__(self, path: str, observer: ObservationEncoder, precision: str, device: torch.device,
                 use_proprio: bool, progress: bool = False):
        from tqdm.auto import tqdm

        self.z, self.actions, self.proprio, self.names, views = [], [], [], [], []
        key = observer.cfg.observation
        with autocast(precision, device):
            for ep in tqdm(iter_episodes(path), disable=not progress, desc="encode episodes", unit="episode",
                           leave=False):
                obs = observer.observations(ep)
                if obs is None:
                    what = {"frames": "frames", "state": "state.npy", "points": "points.npy"}.get(key, "audio file")
                    raise DataError(f"{ep.name}: has no {what}, which worldmodel.observation={key} reads; record "
                                    f"them, or change the observation")
                if use_proprio and ep.proprio is None:
                    raise DataError(f"{ep.name}: no proprio.npy, but worldmodel.proprio is true")
                self.z.append(observer(obs).cpu())
                self.actions.append(ep.actions)
                self.proprio.append(ep.proprio if use_proprio else None)
                self.names.append(ep.name)
                views.append((ep.meta.get("env"), json.dumps(ep.meta.get("camera"), sort_keys=True),
                              int(ep.meta.get("action_repeat", 1))))
        dims = {a.shape[1] for a in self.actions}
        if len(dims) > 1:
            raise DataError(f"{path}: episodes with different action sizes {sorted(dims)}; one world model needs one")
        self.action_dim = dims.pop()
        self.proprio_dim = self.proprio[0].shape[1] if use_proprio else 0
        if len(set(views)) > 1:
            warnings.warn(f"{path}: episodes recorded from {len(set(views))} different environments, cameras or "
                          f"action repeats; multijepa plan acts and renders as the first episode was recorded",
                          stacklevel=2)
        # how the episodes were made, so that planning acts at their time step and renders their view
        self.render = {"env": views[0][0], "camera": json.loads(views[0][1]), "action_repeat": views[0][2]} \
            if views else {}
        every = torch.cat(self.actions)
        self.action_low, self.action_high = every.min(0).values, every.max(0).values

    def split(self, val_fraction: float, window: int, seed: int, where: str) -> tuple[list[int], list[int]]:
        """(training, validation) episode indices: those long enough for a clip, a seeded share held out."""
        fits = [i for i, a in enumerate(self.actions) if len(a) >= window]
        if len(fits) < len(self.actions):
            warnings.warn(f"{where}: {len(self.actions) - len(fits)} of {len(self.actions)} episodes are shorter than "
                          f"worldmodel.window={window} steps and are not used", stacklevel=2)
        if not fits:
            raise DataError(f"{where}: no episode has worldmodel.window={window} steps; lower the window or record "
                            f"longer episodes")
        order = [fits[i] for i in torch.randperm(len(fits), generator=torch.Generator().manual_seed(seed))]
        held = min(len(fits) - 1, round(len(fits) * val_fraction)) if val_fraction > 0 else 0
        return sorted(order[held:]), sorted(order[:held])

    def clips(self, episodes: list[int], window: int, count: int, g: torch.Generator) -> dict:
        """``count`` random clips: z [B, window + 1, N, F], actions [B, window, A], proprio [B, window + 1, P]."""
        starts = torch.tensor([len(self.actions[i]) - window + 1 for i in episodes], dtype=torch.float64)
        picks = torch.multinomial(starts, count, replacement=True, generator=g)
        z, a, p = [], [], []
        for k in picks.tolist():
            i = episodes[k]
            s = int(torch.randint(0, len(self.actions[i]) - window + 1, (1,), generator=g))
            z.append(self.z[i][s:s + window + 1])
            a.append(self.actions[i][s:s + window])
            if self.proprio[i] is not None:
                p.append(self.proprio[i][s:s + window + 1])
        return {"z": torch.stack(z), "actions": torch.stack(a), "proprio": torch.stack(p) if p else None}


def clip_losses(predictor: ActionPredictor, clip: dict, rollout_steps: int, kind: str, baseline: bool = False,
                context: int = 1) -> dict:
    """Teacher-forcing and rollout losses of a batch of clips (the rollout: ``rollout_steps`` predicted from the
    first ``context`` observations), and with ``baseline`` the copy-the-last-observation error of the same
    rollout (what a predictor must beat to have learned anything). With proprio, ``proprio_teacher`` and
    ``proprio_rollout`` are the L1 errors of the predicted proprio in units of its spread."""
    z, a, p = clip["z"], clip["actions"], clip["proprio"]
    pred, p_pred = predictor(z[:, :-1], a, None if p is None else p[:, :-1])
    out = {"teacher": latent_loss(pred, z[:, 1:], kind), "pred": pred.detach().float().mean(2)[:, -1]}
    if p_pred is not None:
        std = predictor.proprio_std
        out["proprio_teacher"] = ((p_pred - p[:, 1:].float()) / std).abs().mean()
    if rollout_steps:
        c, target = context, z[:, context:context + rollout_steps]
        rolled, p_rolled = rollout_latents(predictor, z[:, :c], a[:, :c - 1 + rollout_steps],
                                           None if p is None else p[:, :c])
        out["rollout"] = latent_loss(rolled, target, kind)
        if p_rolled is not None:
            out["proprio_rollout"] = ((p_rolled - p[:, c:c + rollout_steps].float()) / std).abs().mean()
        if baseline:
            out["copy_last"] = latent_loss(z[:, c - 1:c].expand_as(rolled), target, kind)
    return out


def train_world_model(recipe: WorldModelRecipe) -> Path:
    """Train (or resume) the world model of ``recipe``; returns the run folder (``last.pt``, ``metrics.jsonl``).

    >>> run = train_world_model(load_worldmodel_recipe("recipes/worldmodel.yaml"))  # doctest: +SKIP
    """
    with run_lock(Path(recipe.run.dir)):
        return _train(recipe)


def _train(recipe: WorldModelRecipe) -> Path:
    w, t, o = recipe.worldmodel, recipe.train, recipe.optim
    if t.threads > 0:
        torch.set_num_threads(t.threads)
    device = resolve_device(t.device)
    precision, why = resolve_precision(t.precision, device)
    run_dir, ckpt_path = Path(recipe.run.dir), Path(recipe.run.dir) / "last.pt"
    state = load_checkpoint(ckpt_path) if recipe.run.resume and ckpt_path.exists() else None
    if state is not None:
        saved = worldmodel_recipe_from_dict(state["recipe"], f"{ckpt_path} (its saved recipe)").worldmodel
        changed = [k for k in ARCHITECTURE_KEYS if getattr(saved, k) != getattr(w, k)]
        if state.get("kind") != "worldmodel" or changed:
            raise TrainingError(f"{ckpt_path}: trained with other worldmodel settings ({', '.join(changed) or 'kind'});"
                                f" use another run.dir, or run.resume=false to start over")
        enc_recipe = recipe_from_dict(state["encoder_recipe"], f"{ckpt_path} (its encoder's recipe)")
        encoder = build_model(enc_recipe).target
        encoder.load_state_dict(state["encoder"])
    else:
        encoder, enc_recipe = load_encoder(w, t.seed)
    observer = ObservationEncoder(encoder.to(device), enc_recipe, w)
    data = EpisodeLatents(recipe.data.path, observer, precision, device, w.proprio, t.progress)
    train_eps, val_eps = data.split(w.val_fraction, w.window, t.seed, recipe.data.path)
    torch.manual_seed(t.seed)
    feat_dim, tokens = data.z[0].shape[-1], data.z[0].shape[1]
    predictor = ActionPredictor(feat_dim, tokens, data.action_dim, data.proprio_dim, w).to(device)
    if data.proprio_dim:
        predictor.set_proprio_scale(torch.cat([data.proprio[i] for i in train_eps]).float().to(device))
    optimizer = torch.optim.AdamW(param_groups(predictor, o.weight_decay), lr=o.lr, betas=o.betas)
    step = saved_step = 0
    if state is not None:
        predictor.load_state_dict(state["predictor"])
        optimizer.load_state_dict(state["optimizer"])
        step = saved_step = int(state["step"])
    if step >= t.steps:
        print(f"{ckpt_path} is already at step {step} >= train.steps={t.steps}; raise train.steps to train on",
              file=sys.stderr)
        return run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    if t.compile:
        predictor.transformer.compile(dynamic=True)  # in place: parameter names, and checkpoints, stay the eager ones
    shapes = {"feat_dim": feat_dim, "tokens": tokens, "action_dim": data.action_dim, "proprio_dim": data.proprio_dim,
              "action_low": data.action_low.tolist(), "action_high": data.action_high.tolist()}
    val = data.clips(val_eps, w.window, min(256, 16 * len(val_eps)), torch.Generator().manual_seed(t.seed)) \
        if val_eps else None
    millions = sum(p.numel() for p in predictor.parameters()) / 1e6
    summary = (f"worldmodel on {device}, {precision} ({why}); frozen {observer.modality} encoder "
               f"({w.encoder_init}) from {w.encoder}: {tokens} tokens of {feat_dim} per step; predictor "
               f"{millions:.2f} M parameters; {len(data.z)} episodes ({len(train_eps)} train, {len(val_eps)} val), "
               f"{data.action_dim}-d actions; {t.steps} steps of {recipe.data.batch_size} clips of {w.window} steps, "
               f"{'resuming from step ' + str(step) if step else 'from step 0'}, into {run_dir}")
    log = RunLog(run_dir, recipe, step, summary)
    progress = _progress(t.progress, t.steps, step)
    sums, interval, t_last = torch.zeros(4), 0, time.perf_counter()
    finite = torch.ones((), dtype=torch.bool)
    with _StopRequest() as stop, log:
        while step < t.steps:
            lr = cosine_schedule(step, t.steps, o.lr, o.min_lr, o.warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            clip = data.clips(train_eps, w.window, recipe.data.batch_size,
                              torch.Generator().manual_seed(t.seed * 1_000_003 + step))  # resumes exactly
            clip = {k: v if v is None else v.to(device) for k, v in clip.items()}
            predictor.train()
            with autocast(precision, device):
                out = clip_losses(predictor, clip, w.rollout_steps, w.loss, context=w.rollout_context)
            zero = torch.zeros((), device=device)
            loss = out["teacher"] + w.rollout_weight * out.get("rollout", zero)
            proprio_loss = out.get("proprio_teacher", zero) + w.rollout_weight * out.get("proprio_rollout", zero)
            loss = loss + w.proprio_weight * proprio_loss
            loss.backward()
            if o.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(predictor.parameters(), o.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sums += torch.stack([loss.detach(), out["teacher"].detach(), out.get("rollout", zero).detach(),
                                 proprio_loss.detach()]).float().cpu()
            finite &= torch.isfinite(loss.detach().cpu())
            step, interval = step + 1, interval + 1
            progress.update(1)
            if step % t.log_every == 0 or step == t.steps or stop.requested:
                mean = (sums / interval).tolist()
                if not math.isfinite(mean[0]):
                    raise _diverged(f"the loss became {mean[0]} by step {step}", ckpt_path, saved_step, o.lr)
                now = time.perf_counter()
                record = {"step": step, "loss": mean[0], "loss_teacher": mean[1], "loss_rollout": mean[2], "lr": lr,
                          "samples_per_s": interval * recipe.data.batch_size / (now - t_last)}
                if data.proprio_dim:
                    record["loss_proprio"] = mean[3]
                record.update({f"pred_{k.split('_')[1]}": v.item() for k, v in feature_health(out["pred"]).items()})
                if val is not None:
                    predictor.eval()
                    with torch.no_grad(), autocast(precision, device):
                        v = clip_losses(predictor, {k: x if x is None else x.to(device) for k, x in val.items()},
                                        w.window + 1 - w.rollout_context, w.loss, baseline=True,
                                        context=w.rollout_context)
                    record.update({"val_teacher": v["teacher"].item(), "val_rollout": v["rollout"].item(),
                                   "val_copy_last": v["copy_last"].item()})
                    if "proprio_rollout" in v:
                        record["val_proprio_rollout"] = v["proprio_rollout"].item()
                log.write(record)
                progress.set_postfix(loss=f"{mean[0]:.4f}", refresh=False)
                sums.zero_()
                interval, t_last = 0, now
            keep = t.keep_every > 0 and step % t.keep_every == 0
            if step % t.checkpoint_every == 0 or keep or step == t.steps or stop.requested:
                if not (finite & _all_finite(predictor.state_dict().values()).cpu()).item():
                    raise _diverged(f"the loss or the weights became NaN or infinite between steps {saved_step} and "
                                    f"{step}", ckpt_path, saved_step, o.lr)
                save_checkpoint({"kind": "worldmodel", "step": step, "recipe": plain(recipe),
                                 "encoder_recipe": recipe_to_dict(enc_recipe), "encoder": observer.encoder.state_dict(),
                                 "predictor": predictor.state_dict(), "optimizer": optimizer.state_dict(),
                                 "shapes": shapes, "render": data.render}, ckpt_path)
                saved_step = step
                if keep:
                    keep_copy(ckpt_path, run_dir / f"step_{step:07d}.pt")
            if stop.requested:
                progress.close()
                print(f"\nstopped at step {step}; checkpoint saved to {ckpt_path}. Run the same command to resume.",
                      file=sys.stderr)
                raise KeyboardInterrupt
    progress.close()
    return run_dir


__all__ = ["EpisodeLatents", "clip_losses", "load_any_recipe", "load_worldmodel_recipe", "train_world_model"]
