"""End to end through the CLI, as a user runs it: pretrain, resume after a kill, embed, probe, shard."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, TINY_IMAGE, check_killed_run_resumes_on_the_same_curve, losses, run_cli

RECIPE = str(ROOT / "recipes/image.yaml")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shapes):
    """A run trained for a few steps through the CLI; its folder is tmp/runs/image."""
    root = tmp_path_factory.mktemp("cli")
    run_cli("pretrain", RECIPE, *TINY_IMAGE, f"data.path={shapes}", "run.dir=runs/image", "train.steps=6",
            "train.checkpoint_every=3", cwd=root)
    return root


def test_pretrain__writes_checkpoint_recipe_and_metrics(trained):
    run = trained / "runs/image"
    assert {p.name for p in run.iterdir()} >= {"last.pt", "recipe.yaml", "metrics.jsonl"}
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(r["loss"]) and r["samples_per_s"] > 0 and r["target_erank"] >= 1 for r in rows)
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


def test_pretrain__killed_run_resumes_on_the_same_loss_curve(tmp_path, shapes):
    args = [RECIPE, *TINY_IMAGE, f"data.path={shapes}", "train.steps=60", "train.checkpoint_every=10",
            "data.num_workers=1"]
    check_killed_run_resumes_on_the_same_curve(args, 60, tmp_path)


def test_pretrain__sigterm_checkpoints_then_resumes(tmp_path, shapes):
    args = [RECIPE, *TINY_IMAGE, f"data.path={shapes}", "train.steps=100000", "train.checkpoint_every=100000",
            "run.dir=run"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="2")
    proc = subprocess.Popen([sys.executable, "-m", "multijepa", "pretrain", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run/metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 3) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Run the same command to resume" in err
    import torch

    step = torch.load(tmp_path / "run/last.pt", weights_only=True)["step"]
    assert step == max(losses(tmp_path / "run"))


def test_pretrain__recipe_error_exits_2_naming_key(tmp_path):
    proc = run_cli("pretrain", RECIPE, "train.stepz=3", cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert "recipes/image.yaml" in proc.stderr and "'train.stepz'" in proc.stderr and "Traceback" not in proc.stderr


def test_pretrain__missing_or_empty_data_says_what_to_do(tmp_path):
    proc = run_cli("pretrain", RECIPE, *TINY_IMAGE, f"run.dir={tmp_path / 'r'}", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "data.path is not set" in proc.stderr
    (tmp_path / "empty").mkdir()
    proc = run_cli("pretrain", RECIPE, *TINY_IMAGE, "data.path=empty", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "holds no files" in proc.stderr


def test_embed__npy_jsonl_tokens_and_stdout(trained, shapes):
    files = [str(p) for p in sorted(shapes.rglob("*.png"))[:3]]
    ckpt = str(trained / "runs/image/last.pt")
    run_cli("embed", *files, "--checkpoint", ckpt, "--out", "v.npy", cwd=trained)
    vectors = np.load(trained / "v.npy")
    assert vectors.shape == (3, 32) and np.isfinite(vectors).all()
    run_cli("embed", *files, "--checkpoint", ckpt, "--out", "t.npy", "--tokens", cwd=trained)
    assert np.load(trained / "t.npy").shape == (3, 16, 32)
    assert np.allclose(np.load(trained / "t.npy").mean(1), vectors, atol=1e-5)
    run_cli("embed", *files, "--checkpoint", ckpt, "--out", "v.jsonl", cwd=trained)
    rows = [json.loads(line) for line in (trained / "v.jsonl").read_text().splitlines()]
    assert [r["file"] for r in rows] == files and np.allclose([r["embedding"] for r in rows], vectors, atol=1e-5)
    out = run_cli("embed", files[0], cwd=trained)  # no --checkpoint: the newest image run under runs/
    assert "using runs/image/last.pt" in out.stderr and len(json.loads(out.stdout)["embedding"]) == 32


def test_embed__python_api_matches_cli_and_takes_tensors(trained, shapes):
    import torch

    import multijepa

    files = [str(p) for p in sorted(shapes.rglob("*.png"))[:2]]
    model = multijepa.load(trained / "runs/image/last.pt")
    from_files = model.embed(files)
    from multijepa.datasets import load_input

    from_tensors = model.embed([load_input(f, model.recipe) for f in files])
    assert np.allclose(from_files, from_tensors, atol=1e-6)
    assert model.embed([torch.zeros(3, 16, 16)]).shape == (1, 32)


def test_embed__no_checkpoint_anywhere_says_what_to_run(tmp_path, shapes):
    proc = run_cli("embed", str(next(shapes.rglob("*.png"))), cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "multijepa pretrain recipes/image.yaml" in proc.stderr


def test_embed__corrupt_or_unknown_file_named(trained, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 not really")
    proc = run_cli("embed", str(bad), "--checkpoint", str(trained / "runs/image/last.pt"), check=False)
    assert proc.returncode == 2 and str(bad) in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("embed", str(tmp_path / "x.qqq"), "--checkpoint", str(trained / "runs/image/last.pt"), check=False)
    assert proc.returncode == 2 and "unknown file type" in proc.stderr


def test_probe__reports_accuracy_for_trained_and_random_init(trained, shapes):
    ckpt = str(trained / "runs/image/last.pt")
    out = run_cli("probe", str(shapes), "--checkpoint", ckpt, "--json", "--workers", "0")
    result = json.loads(out.stdout.splitlines()[-1])
    assert 0 <= result["linear"] <= 1 and result["n_train"] + result["n_test"] == 32
    out = run_cli("probe", str(shapes), "--checkpoint", ckpt, "--random-init", "--folds", "4", "--workers", "0")
    assert "random-init encoder (4-fold)" in out.stdout


def test_shard__then_pretrain_on_shards(tmp_path, shapes):
    run_cli("shard", str(shapes), "shards", "--per-shard", "16", cwd=tmp_path)
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["classes.json", "shard-000000.tar",
                                                                       "shard-000001.tar"]
    run_cli("pretrain", RECIPE, *TINY_IMAGE, "data.path=shards", "run.dir=run", "train.steps=3", cwd=tmp_path)
    assert max(losses(tmp_path / "run")) == 3
