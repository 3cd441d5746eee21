"""Handing a model on: ``export`` (safetensors + config.json + a model card), the Hugging Face Hub, ``info``.

An export folder holds what embedding needs and nothing else: the target encoder with its tokenizers
as ``model.safetensors`` (no pickled code), ``config.json`` (the resolved recipe, the versions that
wrote it, the step and the last metrics) and ``README.md`` (a model card the Hub shows).

>>> import multijepa
>>> export("runs/audio/last.pt", "exported/audio")  # doctest: +SKIP
>>> multijepa.load("exported/audio").embed(["speech.wav"]).shape  # doctest: +SKIP
(1, 192)
>>> print(info_text(info("runs/audio")))  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from multijepa.checkpoint import load_checkpoint, versions, write_atomically
from multijepa.errors import MultijepaError, require
from multijepa.modalities import MODALITIES
from multijepa.recipe import Recipe, recipe_from_dict, recipe_to_dict
from multijepa.runlog import METRICS
from multijepa.train import build_model

FORMAT = "multijepa-export-v1"
WEIGHTS, CONFIG, CARD = "model.safetensors", "config.json", "README.md"
PathLike = Union[str, Path]


def is_export(path: PathLike) -> bool:
    return Path(path, CONFIG).is_file() and Path(path, WEIGHTS).is_file()


def last_metrics(run_dir: PathLike, step: Optional[int] = None) -> Optional[dict]:
    """The last whole line of ``run_dir/metrics.jsonl`` (a torn last line is skipped), the last one up
    to ``step`` if given (a milestone checkpoint's), or None."""
    path = Path(run_dir, METRICS)
    if not path.is_file():
        return None
    for line in reversed(path.read_text().splitlines()):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and (step is None or record.get("step", step + 1) <= step):
            return record
    return None


def save_export(encoder: torch.nn.Module, recipe: Recipe, out_dir: PathLike, provenance: Optional[dict] = None) -> Path:
    """Write a target encoder (a :class:`~multijepa.core.jepa.Backbone`) and its recipe as an export
    folder; returns it. ``provenance``: ``step``, ``trained_from`` and the last ``metrics``, if known.

    ``out_dir`` may be new, empty or an earlier export (its files are replaced, each atomically);
    anything else is refused, so nothing of the user's is overwritten.
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not Path(out, CONFIG).is_file())):
        raise MultijepaError(f"{out}: exists and is not an export folder; give a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous().clone()
               for k, v in encoder.state_dict().items()}
    config = {"format": FORMAT, "versions": versions(), "modalities": list(recipe.modalities),
              "dim": recipe.model.dim, "parameters": sum(v.numel() for v in weights.values()), **(provenance or {}),
              "recipe": recipe_to_dict(recipe)}
    card = model_card(recipe, config, out.name)
    write_atomically(out / WEIGHTS, lambda f: f.write(save(weights, metadata={"format": FORMAT})))
    write_atomically(out / CONFIG, lambda f: f.write((json.dumps(config, indent=1) + "\n").encode()))
    write_atomically(out / CARD, lambda f: f.write(card.encode()))
    return out


def export(checkpoint: PathLike, out_dir: PathLike) -> Path:
    """``multijepa export CHECKPOINT OUT_DIR``: a checkpoint's target encoder as an export folder."""
    encoder, recipe, provenance = read_encoder(checkpoint)
    return save_export(encoder, recipe, out_dir, provenance)


def read_encoder(path: PathLike) -> tuple[torch.nn.Module, Recipe, dict]:
    """(target encoder, resolved recipe, provenance) of a checkpoint (``last.pt``, ``step_N.pt``) or an
    export folder: what :meth:`Embedder.from_checkpoint <multijepa.embed.Embedder.from_checkpoint>` wraps.

    Raises:
        MultijepaError: naming the file, for anything that is not a readable multijepa model.
    """
    path = Path(path)
    if path.is_dir():
        if is_export(path):
            return _read_export(path)
        last = path / "last.pt"
        raise MultijepaError(f"{path}: a folder, not a checkpoint or an export ({CONFIG} + {WEIGHTS})"
                             + (f"; pass {last}" if last.is_file() else ""))
    state = load_checkpoint(path)
    if not isinstance(state.get("recipe"), dict) or not isinstance(state.get("model"), dict):
        raise MultijepaError(f"{path}: a checkpoint without its recipe or weights; pass a last.pt written "
                             f"by multijepa pretrain")
    recipe = recipe_from_dict(state["recipe"], f"{path} (its saved recipe)")
    model = build_model(recipe)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:  # missing, unexpected or mis-shaped weights
        raise MultijepaError(f"{path}: its weights do not fit the model its recipe builds ({_first_lines(e)})") from None
    provenance = {"step": state.get("step"), "trained_from": str(path),
                  "metrics": last_metrics(path.parent, state.get("step"))}
    return model.target, recipe, provenance


def _first_lines(e: Exception) -> str:
    return " ".join(line.strip() for line in str(e).strip().splitlines()[:3])[:300]


def _read_export(path: Path) -> tuple[torch.nn.Module, Recipe, dict]:
    try:
        config = json.loads(Path(path, CONFIG).read_text())
    except ValueError as e:
        raise MultijepaError(f"{path / CONFIG}: not valid JSON ({e}); export the model again") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT or not isinstance(config.get("recipe"), dict):
        raise MultijepaError(f"{path / CONFIG}: not a multijepa export (format "
                             f"{config.get('format') if isinstance(config, dict) else '?'}, expected {FORMAT})")
    recipe = recipe_from_dict(config["recipe"], f"{path / CONFIG} (its recipe)")
    encoder = build_model(recipe).target
    try:
        encoder.load_state_dict(load_file(str(path / WEIGHTS)))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise MultijepaError(f"{path / WEIGHTS}: unreadable or not the weights its config.json describes "
                             f"({_first_lines(e)}); export the model again") from None
    return encoder, recipe, {k: config[k] for k in ("step", "trained_from", "metrics") if k in config}


def hub_download(name: PathLike, revision: Optional[str] = None, token: Optional[str] = None) -> Path:
    """An export folder as it is, or a Hub repository id's files fetched (and cached) by ``huggingface_hub``:
    the folder :meth:`Embedder.from_pretrained <multijepa.embed.Embedder.from_pretrained>` loads."""
    if os.path.isdir(name):
        return Path(name)
    if os.path.exists(name) or str(name).count("/") != 1:
        raise MultijepaError(f"{name}: neither an export folder nor a Hub repository id (user/name)")
    hub = require("huggingface_hub", "loading a model from the Hugging Face Hub")
    local = hub.snapshot_download(repo_id=str(name), revision=revision, token=token,
                                  allow_patterns=[CONFIG, WEIGHTS, CARD])
    if not is_export(local):
        raise MultijepaError(f"{name}: the Hub repository holds no multijepa export ({CONFIG} + {WEIGHTS})")
    return Path(local)


def push_to_hub(encoder: torch.nn.Module, recipe: Recipe, provenance: Optional[dict], repo_id: str,
                token: Optional[str] = None, private: Optional[bool] = None,
                commit_message: str = "Upload multijepa encoder") -> str:
    """:meth:`Embedder.push_to_hub <multijepa.embed.Embedder.push_to_hub>`: export into a temporary
    folder, create the repository if needed, upload the folder; returns the commit's URL."""
    hub = require("huggingface_hub", "uploading to the Hugging Face Hub")
    api = hub.HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_export(encoder, recipe, Path(tmp) / repo_id.split("/")[-1], provenance)
        return str(api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message,
                                     repo_type="model"))


def model_card(recipe: Recipe, config: dict, name: str) -> str:
    """The README.md of an export: Hub metadata, how to use it, what it is and how it was trained."""
    mods = config["modalities"]
    extras = ",".join(m for m in mods if MODALITIES[m].requires) or None
    install = f"pip install 'multijepa[{extras}]'" if extras else "pip install multijepa"
    m, metrics = recipe.model, config.get("metrics") or {}
    trained = f"{config['step']} steps of {recipe.train.steps}" if config.get("step") is not None else "unknown steps"
    health = ", ".join(f"{k} {metrics[k]:.4g}" for k in ("loss", "target_std", "target_erank") if k in metrics)
    lines = [
        "---", "library_name: multijepa", "pipeline_tag: feature-extraction",
        "tags: [" + ", ".join(["multijepa", "jepa", "self-supervised", *mods]) + "]", "---", "",
        f"# {name}: a multijepa {' + '.join(mods)} encoder", "",
        f"The target (EMA) encoder of a JEPA pretrained with multijepa on {', '.join(mods)} "
        f"data: a file in, a {config['dim']}-dimensional embedding out. {config['parameters']:,} parameters "
        f"(width {m.dim}, depth {m.depth}, {m.heads} heads).", "",
        "## Use", "", "```", install, "```", "", "```python", "import multijepa",
        f'model = multijepa.load("{name}")  # this folder; or Embedder.from_pretrained("USER/{name}") from the Hub',
        "vectors = model.embed([...])  # paths of " + " / ".join(
            ", ".join(MODALITIES[x].extensions[:3]) for x in mods) + " files: one row each", "```", "",
        f"or `multijepa embed --checkpoint {name} FILES --out vectors.npy`.", "",
        "## Training", "",
        f"- {trained}, batch {recipe.data.batch_size}, learning rate {recipe.optim.lr:g}, "
        f"loss {recipe.loss.type} with regulariser {recipe.loss.regularizer}",
        f"- last logged: {health or 'no metrics were found beside the checkpoint'}",
        f"- written by multijepa {config['versions'].get('multijepa')} on torch {config['versions'].get('torch')}",
        f"- the whole resolved recipe is in `{CONFIG}` under `recipe`", "",
    ]
    return "\n".join(lines)


def _parameters(state: dict, prefix: str) -> int:
    return sum(v.numel() for k, v in state.items() if k.startswith(prefix) and isinstance(v, torch.Tensor))


def info(path: PathLike) -> dict:
    """What a checkpoint, a run folder or an export folder holds: modalities, recipe summary, step,
    parameter counts, last metrics and health (``multijepa info``)."""
    path = Path(path)
    if path.is_dir() and is_export(path):
        config = json.loads(Path(path, CONFIG).read_text())
        recipe = recipe_from_dict(config["recipe"], f"{path / CONFIG} (its recipe)")
        out = {"kind": "export", "path": str(path), "step": config.get("step"),
               "parameters": {"encoder": config.get("parameters")}, "metrics": config.get("metrics"),
               "versions": config.get("versions")}
        return {**out, **_summary(recipe, out["metrics"])}
    run_dir = path if path.is_dir() else path.parent
    ckpt = path / "last.pt" if path.is_dir() else path
    if path.is_dir() and not ckpt.is_file():
        raise MultijepaError(f"{path}: neither a run folder (no last.pt) nor an export folder (no {CONFIG} and "
                             f"{WEIGHTS}); pass a run folder, a checkpoint or an export")
    state = load_checkpoint(ckpt)
    recipe = recipe_from_dict(state["recipe"], f"{ckpt} (its saved recipe)")
    weights = state.get("model", {})
    metrics = last_metrics(run_dir, state.get("step"))
    out = {"kind": "run" if path.is_dir() else "checkpoint", "path": str(path), "checkpoint": str(ckpt),
           "step": state.get("step"), "versions": state.get("versions"),
           "parameters": {"encoder": _parameters(weights, "context."), "predictor": _parameters(weights, "predictor.")},
           "metrics": metrics,
           "milestones": sorted(p.name for p in run_dir.glob("step_*.pt")),
           "loggers": [name for name in ("tensorboard", "wandb") if (run_dir / name).is_dir()]}
    return {**out, **_summary(recipe, metrics)}


def _summary(recipe: Recipe, metrics: Optional[dict]) -> dict:
    m = recipe.model
    grids = {}
    for s in recipe.all_sources:
        spec, cfg = MODALITIES[s.modality], recipe.section(s.modality)
        grids[s.modality] = list(spec.token_grid(cfg)) if spec.token_grid else None
    health = "unknown (no metrics)"
    if metrics and "target_std" in metrics and "target_erank" in metrics:
        t = recipe.train
        collapsed = metrics["target_std"] < t.collapse_std or metrics["target_erank"] < t.collapse_erank
        health = (f"looks collapsed (std {metrics['target_std']:.4g} < {t.collapse_std} or effective rank "
                  f"{metrics['target_erank']:.3g} < {t.collapse_erank})" if collapsed else
                  f"healthy (std {metrics['target_std']:.4g}, effective rank {metrics['target_erank']:.3g})")
    return {"modalities": list(recipe.modalities), "token_grids": grids,
            "model": {"dim": m.dim, "depth": m.depth, "heads": m.heads, "predictor_dim": m.predictor_dim,
                      "predictor_depth": m.predictor_depth},
            "training": {"steps": recipe.train.steps, "batch_size": recipe.data.batch_size, "lr": recipe.optim.lr,
                         "loss": recipe.loss.type, "regularizer": recipe.loss.regularizer},
            "health": health}


def info_text(found: dict) -> str:
    """``info``'s dict as the lines ``multijepa info`` prints."""
    p, m, t = found["parameters"], found["model"], found["training"]
    params = ", ".join(f"{k} {v / 1e6:.2f} M" if v >= 100_000 else f"{k} {v:,}" for k, v in p.items() if v is not None)
    grids = ", ".join(f"{k} {'x'.join(map(str, g)) if g else '(no grid)'}" for k, g in found["token_grids"].items())
    lines = [f"{found['kind']}: {found['path']}",
             f"modalities: {', '.join(found['modalities'])} (token grids: {grids})",
             f"model: width {m['dim']}, depth {m['depth']}, {m['heads']} heads; predictor width "
             f"{m['predictor_dim']}, depth {m['predictor_depth']}; parameters: {params}",
             f"trained: step {found['step']} of {t['steps']} (batch {t['batch_size']}, lr {t['lr']:g}, loss "
             f"{t['loss']}, regulariser {t['regularizer']})"]
    metrics = found.get("metrics")
    if metrics:
        shown = {k: v for k, v in metrics.items() if k in ("step", "loss", "loss_prediction", "loss_regularizer",
                                                          "samples_per_s", "bad_files")}
        lines.append("last metrics: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                  for k, v in shown.items()))
    lines.append(f"health: {found['health']}")
    if found.get("milestones"):
        lines.append(f"milestone checkpoints: {', '.join(found['milestones'])}")
    if found.get("loggers"):
        lines.append(f"logs: metrics.jsonl, {', '.join(found['loggers'])}")
    if found.get("versions"):
        lines.append("written by " + ", ".join(f"{k} {v}" for k, v in found["versions"].items()))
    return "\n".join(lines)
