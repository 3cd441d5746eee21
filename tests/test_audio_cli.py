"""Audio end to end through the CLI: pretrain, resume after a kill, embed any format / rate / channel
count / length, windows and tokens, shards, probe."""

import json
import math

import numpy as np
import pytest

from audio_files import FORMATS, chirp, make_audio_folder, write
from conftest import AUDIO_RECIPE, TINY_AUDIO, check_killed_run_resumes_on_the_same_curve, losses, run_cli

RECIPE = str(AUDIO_RECIPE)
RATES = (8000, 16000, 22050, 44100, 48000)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_audio_folder(tmp_path_factory.mktemp("clips"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, folder):
    """A few CLI training steps; the run folder is tmp/runs/audio."""
    root = tmp_path_factory.mktemp("cli")
    run_cli("pretrain", RECIPE, *TINY_AUDIO, f"data.path={folder}", "run.dir=runs/audio", "train.steps=4",
            "train.checkpoint_every=2", cwd=root)
    return root


@pytest.fixture(scope="module")
def many_files(tmp_path_factory):
    """Every format x sample rate x mono/stereo x short (0.2 s, under one 0.5 s window)/long (1.7 s, 6 windows)."""
    root = tmp_path_factory.mktemp("many")
    files = []
    for ext in sorted(FORMATS):
        for rate in RATES:
            for channels in (1, 2):
                for seconds in (0.2, 1.7):
                    samples = np.repeat(chirp(rate, seconds, seed=rate + channels), channels, axis=1)
                    if channels == 2:
                        samples[:, 1] *= 0.5
                    files.append(str(write(root / f"{ext}_{rate}_{channels}ch_{seconds}s.{ext}", samples, rate)))
    return files


def test_audio_pretrain__writes_checkpoint_recipe_and_metrics(trained):
    run = trained / "runs/audio"
    assert {p.name for p in run.iterdir()} >= {"last.pt", "recipe.yaml", "metrics.jsonl"}
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in rows)
    assert "modality: audio" in (run / "recipe.yaml").read_text()


def test_audio_pretrain__killed_run_resumes_on_the_same_loss_curve(tmp_path, folder):
    args = [RECIPE, *TINY_AUDIO, f"data.path={folder}", "train.steps=40", "train.checkpoint_every=8",
            "data.num_workers=1"]
    check_killed_run_resumes_on_the_same_curve(args, 40, tmp_path)


def test_audio_embed__every_format_rate_channel_count_and_length(trained, many_files):
    ckpt = str(trained / "runs/audio/last.pt")
    # fp32: in bf16 two near-identical files (the same tone at two rates) may round to one vector, and
    # windows batched otherwise than whole files round otherwise (bf16 against fp32: tests/test_speed.py).
    run_cli("embed", *many_files, "--checkpoint", ckpt, "--out", "all.npy", "--precision", "fp32", cwd=trained)
    vectors = np.load(trained / "all.npy")
    assert vectors.shape == (len(many_files), 32) and np.isfinite(vectors).all()
    assert len({v.tobytes() for v in vectors.round(5)}) == len(many_files)  # different inputs, different vectors

    run_cli("embed", *many_files, "--checkpoint", ckpt, "--windows", "--out", "w.jsonl", "--precision", "fp32",
            cwd=trained)
    rows = [json.loads(line) for line in (trained / "w.jsonl").read_text().splitlines()]
    per_file = {f: [r for r in rows if r["file"] == f] for f in many_files}
    for f, windows in per_file.items():
        expected = 1 if "0.2s" in f else 1 + math.ceil((1.7 - 0.5) / 0.25)  # 0.5 s windows every 0.25 s
        assert [w["window"] for w in windows] == list(range(expected)), f
        assert [w["start_s"] for w in windows] == [0.25 * k for k in range(expected)]
        mean = np.mean([w["embedding"] for w in windows], axis=0)
        assert np.allclose(mean, vectors[many_files.index(f)], atol=1e-4)  # the default is the windows' mean


def test_audio_embed__tokens_stdout_and_newest_run(trained, many_files):
    short = [f for f in many_files if "0.2s" in f and f.endswith(".wav")][:3]
    ckpt = str(trained / "runs/audio/last.pt")
    run_cli("embed", *short, "--checkpoint", ckpt, "--tokens", "--out", "t.npy", cwd=trained)
    assert np.load(trained / "t.npy").shape == (3, 1, 20, 32)  # files, windows, tokens (4 x 5 for 0.2 s), dim
    out = run_cli("embed", short[0], cwd=trained)  # no --checkpoint: the newest audio run under runs/
    assert "using runs/audio/last.pt" in out.stderr and len(json.loads(out.stdout)["embedding"]) == 32
    long = [f for f in many_files if "1.7s" in f][:2]
    proc = run_cli("embed", *long, short[0], "--checkpoint", ckpt, "--windows", "--out", "w.npy", cwd=trained,
                   check=False)
    assert proc.returncode == 2 and "different shapes" in proc.stderr
    run_cli("embed", long[0], "--checkpoint", ckpt, "--window", "1.0", "--hop", "0.5", "--windows", "--out", "w2.npy",
            cwd=trained)
    assert np.load(trained / "w2.npy").shape == (1, 3, 32)  # 1.7 s: windows at 0, 0.5 and 1.0 s
    proc = run_cli("embed", long[0], "--checkpoint", ckpt, "--window", "0.01", cwd=trained, check=False)
    assert proc.returncode == 2 and "'audio.embed_window_seconds'" in proc.stderr


def test_audio_embed__python_api_files_tensors_and_windows(trained, many_files):
    import torch

    import multijepa
    from multijepa.datasets import load_input

    model = multijepa.load(trained / "runs/audio/last.pt")
    files = [f for f in many_files if "44100_2ch" in f]
    from_files = model.embed(files, batch_size=4)  # long files span several batches
    from_tensors = model.embed([load_input(f, model.recipe) for f in files])
    assert np.allclose(from_files, from_tensors, atol=1e-5)
    windows = model.embed(files, windows=True)
    assert [len(w) for w in windows] == [1, 6] * 4 and np.allclose(windows[1].mean(0), from_files[1], atol=1e-5)
    assert model.embed([torch.zeros(1, 4000)]).shape == (1, 32)
    with pytest.raises(multijepa.MultijepaError, match="seen through 6 windows.*--windows"):
        model.embed([files[1]], tokens=True)


def test_audio_embed__corrupt_file_is_named(trained, tmp_path):
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt garbage")
    proc = run_cli("embed", str(bad), "--checkpoint", str(trained / "runs/audio/last.pt"), check=False)
    assert proc.returncode == 2 and str(bad) in proc.stderr and "Traceback" not in proc.stderr


def test_audio_shard__then_pretrain_on_shards_and_probe(tmp_path, folder, trained):
    run_cli("shard", str(folder), "shards", "--per-shard", "5", cwd=tmp_path)
    assert len(list((tmp_path / "shards").glob("*.tar"))) == 3
    run_cli("pretrain", RECIPE, *TINY_AUDIO, "data.path=shards", "run.dir=run", "train.steps=3", cwd=tmp_path)
    assert max(losses(tmp_path / "run")) == 3
    out = run_cli("probe", str(folder), "--checkpoint", str(tmp_path / "run/last.pt"), "--json", "--workers", "0")
    result = json.loads(out.stdout.splitlines()[-1])
    assert 0 <= result["linear"] <= 1 and result["n_train"] + result["n_test"] == 12


def test_audio_pretrain__default_recipe_runs_as_is_on_a_folder(tmp_path, folder):
    # Only the data path and the run length change: the shipped settings themselves must train.
    run_cli("pretrain", RECIPE, f"data.path={folder}", "run.dir=run", "train.steps=1", "data.batch_size=4",
            "data.num_workers=0", "train.progress=false", cwd=tmp_path)
    assert np.isfinite(list(losses(tmp_path / "run").values())).all()  # 0.3-0.9 s clips padded to 1 s
