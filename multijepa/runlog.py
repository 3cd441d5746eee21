"""What a run logs: ``metrics.jsonl`` always, TensorBoard event files and a Weights & Biases run where
``train.loggers`` asks for them, and the run's start-up summary in each and on the console.

>>> log = RunLog(Path("runs/image"), recipe, start_step=0, summary="pretrain image on cpu ...")  # doctest: +SKIP
>>> log.write({"step": 20, "loss": 0.41, "lr": 1e-4})  # doctest: +SKIP
>>> log.close()  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import netrc
import os
import secrets
import sys
from pathlib import Path
from typing import Optional

import yaml

from multijepa.config import plain
from multijepa.errors import require
from multijepa.recipe import Recipe, recipe_to_dict

METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"  # the event files' folder inside the run folder
WANDB_ID = "wandb_id"  # the W&B run id, kept so that a resumed run logs into the same W&B run


def truncate_metrics(path: Path, step: int) -> list[str]:
    """Drop metric lines logged after ``step`` (the checkpoint a run resumes from), so that the
    curve has no duplicates; a torn last line (a run killed while writing it) goes too. Returns the lines kept."""
    if not path.exists():
        return []
    keep = []
    for line in path.read_text().splitlines():
        try:
            if line.strip() and json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    path.write_text("".join(line + "\n" for line in keep))
    return keep


def _wandb_key_found() -> bool:
    """Whether W&B has credentials here (an API key in the environment or ~/.netrc), without asking it."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


class RunLog:
    """The run's loggers, opened once by the process that logs (rank 0).

    Args:
        run_dir: the run folder: ``metrics.jsonl``, ``tensorboard/`` and ``wandb/`` go into it.
        recipe: the resolved recipe (its ``train.loggers``; W&B and TensorBoard get it as the run's config).
        start_step: the step the run starts or resumes from: metric lines after it are dropped, and
            TensorBoard hides the events an earlier process wrote after it.
        summary: the start-up line (device, precision, parameters, data), printed and logged.
    """

    def __init__(self, run_dir: Path, recipe: Recipe, start_step: int, summary: str):
        self.metrics = run_dir / METRICS
        kept = truncate_metrics(self.metrics, start_step)
        # bad_files counts over the whole run: a resumed process adds to what the earlier ones logged
        self.bad_files_before = int(json.loads(kept[-1]).get("bad_files", 0)) if kept and start_step else 0
        print(summary, file=sys.stderr)
        loggers = recipe.train.loggers
        self.tensorboard = self.wandb = None
        config = recipe_to_dict(recipe) if isinstance(recipe, Recipe) else plain(recipe)  # a world model's too
        if "tensorboard" in loggers:
            tb = require("torch.utils.tensorboard", "train.loggers: tensorboard")
            self.tensorboard = tb.SummaryWriter(log_dir=str(run_dir / TENSORBOARD), purge_step=start_step or None)
            self.tensorboard.add_text("startup", summary, start_step)
            self.tensorboard.add_text("recipe", "```\n" + yaml.safe_dump(config, sort_keys=False) + "```", start_step)
            self.tensorboard.flush()
        if "wandb" in loggers:
            self.wandb = _open_wandb(run_dir, config, start_step, summary)

    def write(self, record: dict) -> None:
        """Log one interval's record (``record["step"]`` is its step) to every backend."""
        with open(self.metrics, "a") as f:
            f.write(json.dumps(record) + "\n")
        step = record["step"]
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))
                   and math.isfinite(v)}
        if self.tensorboard is not None:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(key, value, step)
            self.tensorboard.flush()  # a killed run keeps what it logged
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def __enter__(self) -> "RunLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _open_wandb(run_dir: Path, config: dict, start_step: int, summary: str):
    """A W&B run in ``run_dir/wandb``: online where credentials are found (or ``WANDB_MODE`` says so),
    offline otherwise (``wandb sync`` uploads it later); a resumed run continues the same W&B run."""
    wandb = require("wandb", "train.loggers: wandb")
    mode = os.environ.get("WANDB_MODE") or ("online" if _wandb_key_found() else "offline")
    id_file = run_dir / WANDB_ID
    run_id: Optional[str] = id_file.read_text().strip() if start_step and id_file.exists() else None
    if not run_id:
        run_id = secrets.token_hex(4)  # W&B ids are lower-case letters and digits
        id_file.write_text(run_id + "\n")
    run = wandb.init(project=os.environ.get("WANDB_PROJECT", "multijepa"), name=run_dir.name, id=run_id,
                     resume="allow", dir=str(run_dir), config=config, mode=mode)
    run.summary["startup"] = summary
    if mode == "offline":
        print("wandb: logging offline: no W&B credentials here (WANDB_API_KEY or `wandb login`) and WANDB_MODE "
              "unset; `wandb sync` uploads the run later", file=sys.stderr)
    return run
