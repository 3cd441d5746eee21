"""Two processes under torchrun on CPU (gloo): the trainer runs unchanged and ranks stay in sync."""

import json
import os
import subprocess
import sys

import pytest
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


def _sigreg_rank(rank: int, world: int, init: str, out: str, second: int) -> None:
    import torch.distributed as dist

    from multijepa.core.losses import sigreg

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        net = torch.nn.Linear(8, 6)
        x = torch.randn(40, 8, generator=torch.Generator().manual_seed(1))
        share = x[:20] if rank == 0 else x[20:20 + second]  # shares of different sizes
        stat = sigreg(net(share), 16, torch.Generator().manual_seed(3))
        stat.backward()
        # DDP's reduction, done by hand: DistributedDataParallel itself sometimes aborts at gloo's
        # teardown in spawned processes (1 run in 15 with a plain loss, torch 2.14)
        dist.all_reduce(net.weight.grad)
        torch.save({"stat": stat.detach(), "grad": net.weight.grad / world}, f"{out}.{rank}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("second", [12, 0])
def test_sigreg__under_ddp_is_the_statistic_and_gradient_of_the_whole_batch(tmp_path, second):
    """Two gloo ranks holding 20 and 12 (or no) samples: each gets the statistic of all of them, and
    the ranks' averaged weight gradient (what DDP applies) equals the single-process gradient of that
    statistic (so the regulariser's strength does not depend on the number of ranks)."""
    import torch.multiprocessing as mp

    from multijepa.core.losses import sigreg

    out = str(tmp_path / "result")
    mp.spawn(_sigreg_rank, args=(2, f"file://{tmp_path / 'rendezvous'}", out, second), nprocs=2, join=True)
    torch.manual_seed(0)
    net = torch.nn.Linear(8, 6)
    x = torch.randn(40, 8, generator=torch.Generator().manual_seed(1))
    whole = x[:20 + second]
    stat = sigreg(net(whole), 16, torch.Generator().manual_seed(3))
    stat.backward()
    for rank in (0, 1):
        got = torch.load(f"{out}.{rank}", weights_only=True)
        # rel 1e-4, as for the gradient: once in a full suite run (2026-12-03) a rank's statistic was 7e-5 off
        # this process's (2.78211 vs 2.78231; the cause not found). A wrong count or a missing all-reduce is
        # off by tens of percent.
        assert got["stat"].item() == pytest.approx(stat.item(), rel=1e-4)
        torch.testing.assert_close(got["grad"], net.weight.grad, rtol=1e-4, atol=1e-6)
