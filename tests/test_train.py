"""Trainer behaviour beyond the CLI end-to-end tests: divergence, resume guards, precision, accumulation."""

import json

import pytest
import torch

from conftest import IMAGE_RECIPE, TINY_IMAGE
from multijepa.core import jepa
from multijepa.errors import TrainingError
from multijepa.recipe import load_recipe
from multijepa.train import pretrain


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_pretrain__nan_loss_stops_with_advice(tmp_path, shapes, monkeypatch):

    monkeypatch.setattr(jepa, "latent_loss", lambda p, t, k: (p * float("nan")).mean())
    recipe = load_recipe(IMAGE_RECIPE, TINY_IMAGE + [f"data.path={shapes}", f"run.dir={tmp_path}", "train.steps=3"])
    with pytest.raises(TrainingError, match="diverged.*lower optim.lr"):
        pretrain(recipe)
    assert not (tmp_path / "last.pt").exists()  # a NaN model is never checkpointed


def test_pretrain__divergence_between_logging_steps_keeps_the_last_finite_checkpoint(tmp_path, shapes, monkeypatch):
    calls = {"n": 0}
    real = jepa.latent_loss

    def nan_from_the_fifth_step(p, t, k):
        calls["n"] += 1
        return real(p, t, k) * (float("nan") if calls["n"] >= 5 else 1.0)

    monkeypatch.setattr(jepa, "latent_loss", nan_from_the_fifth_step)
    recipe = load_recipe(IMAGE_RECIPE, TINY_IMAGE + [f"data.path={shapes}", f"run.dir={tmp_path}", "train.steps=30",
                                                   "train.checkpoint_every=1", "train.log_every=20"])
    with pytest.raises(TrainingError, match=f"between steps 4 and 5.*{tmp_path / 'last.pt'}, holds step 4"):
        pretrain(recipe)
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert state["step"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    monkeypatch.setattr(jepa, "latent_loss", real)
    pretrain(load_recipe(IMAGE_RECIPE, TINY_IMAGE + [f"data.path={shapes}", f"run.dir={tmp_path}", "train.steps=6"]))
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 6  # resumes from the kept step 4


def test_run_lock__a_busy_run_dir_is_refused_naming_the_process(tmp_path, shapes):
    import os
    import subprocess
    import sys

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from multijepa.train import run_lock\n"
                               "with run_lock(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(60)",
                               str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        recipe = load_recipe(IMAGE_RECIPE, TINY_IMAGE + [f"data.path={shapes}", f"run.dir={tmp_path}", "train.steps=1"])
        with pytest.raises(TrainingError, match=f"{tmp_path} is in use by process {holder.pid} .*another run.dir"):
            pretrain(recipe)
        assert not (tmp_path / "last.pt").exists()
    finally:
        holder.kill()  # a killed holder leaves no stuck lock:
        holder.wait()
    pretrain(recipe)
    assert (tmp_path / "last.pt").exists() and str(os.getpid()) in (tmp_path / ".lock").read_text()


def test_pretrain__refuses_to_resume_a_different_architecture(tmp_path, shapes):

    base = TINY_IMAGE + [f"data.path={shapes}", f"run.dir={tmp_path}", "train.steps=1"]
    pretrain(load_recipe(IMAGE_RECIPE, base))
    with pytest.raises(TrainingError, match="different 'model' section"):
        pretrain(load_recipe(IMAGE_RECIPE, base + ["model.dim=64", "train.steps=2"]))


def test_pretrain__bf16_autocast_path_runs_on_cpu(tmp_path, shapes):
    recipe = load_recipe(IMAGE_RECIPE, TINY_IMAGE + [f"data.path={shapes}", f"run.dir={tmp_path}", "train.steps=2",
                                                   "train.precision=bf16", "loss.regularizer=sigreg"])
    pretrain(recipe)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows(tmp_path))


def test_pretrain__gradient_accumulation_counts_every_micro_batch(tmp_path, shapes):
    recipe = load_recipe(IMAGE_RECIPE, TINY_IMAGE + [f"data.path={shapes}", f"run.dir={tmp_path}", "train.steps=2",
                                                   "optim.accum_steps=3", "data.batch_size=4"])
    pretrain(recipe)
    assert [r["step"] for r in rows(tmp_path)] == [1, 2]
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pretrain__cuda_bf16_step(tmp_path, shapes):
    recipe = load_recipe(IMAGE_RECIPE, TINY_IMAGE + [f"data.path={shapes}", f"run.dir={tmp_path}", "train.steps=3"])
    pretrain(recipe)  # precision auto -> bf16 autocast, SDPA picks a fused kernel
    assert rows(tmp_path)[-1]["step"] == 3
