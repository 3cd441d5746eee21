"""Two processes under torchrun on CPU (gloo): the trainer runs unchanged and ranks stay in sync."""

import json
import os
import subprocess
import sys

import torch

from conftest import ROOT, TINY_IMAGE


def test_torchrun__two_process_gloo_run_trains_and_checkpoints(tmp_path, shapes):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "multijepa",
           "pretrain", str(ROOT / "recipes/image.yaml"), *TINY_IMAGE, f"data.path={shapes}", "run.dir=run",
           "train.steps=4", "train.checkpoint_every=2", "data.batch_size=4"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # only rank 0 logs
    state = torch.load(tmp_path / "run/last.pt", weights_only=True)
    assert state["step"] == 4
    # samples/s counts both ranks' share of the global batch
    assert all(r["samples_per_s"] > 0 for r in rows)
