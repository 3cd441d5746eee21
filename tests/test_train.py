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
