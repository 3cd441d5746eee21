"""End to end through the CLI, as a user runs it: pretrain, resume after a kill, embed, probe, shard."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, TINY_IMAGE, check_killed_run_resumes_on_the_same_curve, losses, run_cli

from multijepa.checkpoint import load_checkpoint
from multijepa.cli import main

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
    # SIGReg's directions go on from where the run stopped: one draw per step here
    assert load_checkpoint(run / "last.pt")["rng"]["sigreg_draws"] == 6


def test_pretrain__killed_run_resumes_on_the_same_loss_curve(tmp_path, shapes):
    # In bf16, what auto picks on CPUs with bf16 units (the audio, point-cloud and video runs check fp32).
    args = [RECIPE, *TINY_IMAGE, f"data.path={shapes}", "train.steps=60", "train.checkpoint_every=10",
            "data.num_workers=1", "train.precision=bf16"]
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


def jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def photos(tmp_path_factory, shapes) -> Path:
    """A folder to embed: 6 of the shapes, some in a sub-folder, beside files of no image type."""
    root = tmp_path_factory.mktemp("photos")
    (root / "sub").mkdir()
    for i, src in enumerate(sorted(shapes.rglob("*.png"))[:6]):
        shutil.copy(src, root / ("sub" if i % 2 else "") / f"{i}.png")
    (root / "notes.md").write_text("not data\n")
    (root / "sub/sound.wav").write_bytes(b"RIFF....WAVE")  # another modality's file: not this model's
    return root


def test_embed__npy_jsonl_tokens_and_stdout(trained, shapes, monkeypatch, capsys):
    monkeypatch.chdir(trained)
    files = [str(p) for p in sorted(shapes.rglob("*.png"))[:3]]
    ckpt = str(trained / "runs/image/last.pt")
    assert main(["embed", *files, "--checkpoint", ckpt, "--out", "v.npy"]) == 0
    vectors = np.load(trained / "v.npy")
    assert vectors.shape == (3, 32) and np.isfinite(vectors).all()
    assert main(["embed", *files, "--checkpoint", ckpt, "--out", "t.npy", "--tokens"]) == 0
    assert np.load(trained / "t.npy").shape == (3, 16, 32)
    assert np.allclose(np.load(trained / "t.npy").mean(1), vectors, atol=1e-5)
    assert main(["embed", *files, "--checkpoint", ckpt, "--out", "v.jsonl"]) == 0
    rows = jsonl(trained / "v.jsonl")
    assert [r["file"] for r in rows] == files and np.allclose([r["embedding"] for r in rows], vectors, atol=1e-5)
    capsys.readouterr()
    assert main(["embed", files[0]]) == 0  # no --checkpoint: the newest image run under runs/
    out = capsys.readouterr()
    assert "using runs/image/last.pt" in out.err and len(json.loads(out.out)["embedding"]) == 32


def test_embed__without_checkpoint_a_folder_picks_the_run_of_its_files(trained, shapes, photos, monkeypatch, capsys):
    monkeypatch.chdir(trained)
    assert main(["embed", str(shapes), "--out", "all.npz", "--workers", "0"]) == 0
    assert "using runs/image/last.pt" in capsys.readouterr().err
    with np.load("all.npz") as saved:
        assert saved["embeddings"].shape == (32, 32)
        assert saved["files"].tolist() == [str(f) for f in sorted(shapes.rglob("*.png"))]
    assert main(["embed", str(photos)]) == 2  # its .wav asks for a run of images and audio
    assert f"the files are audio (e.g. {photos / 'sub/sound.wav'}), image (e.g. {photos / '0.png'}), and no run " \
           f"under runs/ was trained on all of them" in capsys.readouterr().err


def test_embed__folders_file_lists_and_files_mixed_give_one_named_row_each(trained, photos, tmp_path, capsys):
    ckpt = str(trained / "runs/image/last.pt")
    shutil.copy(photos / "0.png", tmp_path / "a.png")
    listed = tmp_path / "list.txt"  # paths relative to the list's folder, or absolute; # comments
    listed.write_text(f"# two photos\na.png\n{photos / 'sub/1.png'}\n")
    assert main(["embed", str(photos), str(listed), str(photos / "2.png"), "--checkpoint", ckpt,
                 "--out", str(tmp_path / "v.jsonl"), "--workers", "0"]) == 0
    rows = jsonl(tmp_path / "v.jsonl")
    in_folder = [str(photos / f) for f in ("0.png", "2.png", "4.png", "sub/1.png", "sub/3.png", "sub/5.png")]
    assert [r["file"] for r in rows] == in_folder + [str(tmp_path / "a.png"), str(photos / "sub/1.png"),
                                                     str(photos / "2.png")]
    assert all(set(r) == {"file", "embedding"} for r in rows)  # an image is one sample: no index
    vectors = np.array([r["embedding"] for r in rows])
    assert np.allclose(vectors[6], vectors[0]) and np.allclose(vectors[7], vectors[3]) and np.allclose(vectors[8],
                                                                                                       vectors[1])
    assert "wrote (9, 32) embeddings" in capsys.readouterr().err
    numbers = tmp_path / "numbers.txt"  # a .txt whose first line names no file is data (here: not an image)
    numbers.write_text("0.1 0.2 0.3\n0.4 0.5 0.6\n")
    assert main(["embed", str(numbers), "--checkpoint", ckpt]) == 2
    err = capsys.readouterr().err
    assert f"{numbers}: a timeseries or pointcloud file, but this model was trained on image" in err


def test_embed__npy_with_names_and_npz_agree_with_jsonl_for_any_workers(trained, photos, shapes, tmp_path,
                                                                         monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ckpt = str(trained / "runs/image/last.pt")
    assert main(["embed", str(photos), "--checkpoint", ckpt, "--out", "v.jsonl", "--workers", "0"]) == 0
    assert main(["embed", str(photos), "--checkpoint", ckpt, "--out", "v.npy", "--workers", "2"]) == 0
    assert "row names (file) in v.rows.jsonl" in capsys.readouterr().err
    assert main(["embed", str(photos), "--checkpoint", ckpt, "--out", "v.npz"]) == 0
    assert "(arrays: embeddings, files)" in capsys.readouterr().err
    rows = jsonl("v.jsonl")
    named = jsonl("v.rows.jsonl")
    with np.load("v.npz") as saved:
        assert sorted(saved.files) == ["embeddings", "files"]
        npz, npz_files = saved["embeddings"], saved["files"].tolist()
    npy = np.load("v.npy")
    assert [r["file"] for r in rows] == [r["file"] for r in named] == npz_files and len(rows) == 6
    assert np.allclose(npy, [r["embedding"] for r in rows], atol=1e-5) and np.allclose(npz, npy, atol=1e-6)
    # More files than PROGRESS_FROM on a terminal: a progress bar on stderr, clean JSON lines on stdout.
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert main(["embed", str(shapes), "--checkpoint", ckpt, "--workers", "2"]) == 0
    out = capsys.readouterr()
    lines = [json.loads(line) for line in out.out.splitlines()]
    assert len(lines) == 32 and "/32" in out.err
    assert main(["embed", str(shapes), "--checkpoint", ckpt, "--workers", "0", "--quiet", "--out", "q.npy"]) == 0
    assert capsys.readouterr().err == ""
    assert np.allclose(np.load("q.npy"), [r["embedding"] for r in lines], atol=1e-5)


def test_write_embeddings__npz_names_every_window_and_npy_names_every_row(tmp_path):
    from multijepa.embed import rows_file, write_embeddings

    windows = [np.zeros((2, 4), np.float32), np.ones((3, 4), np.float32)]
    write_embeddings(["a.wav", "b.wav"], windows, str(tmp_path / "w.npz"), window_hop_seconds=0.5)
    with np.load(tmp_path / "w.npz") as saved:
        assert saved["embeddings"].shape == (5, 4) and saved["files"].tolist() == ["a.wav"] * 2 + ["b.wav"] * 3
        assert saved["window"].tolist() == [0, 1, 0, 1, 2] and saved["start_s"].tolist() == [0, 0.5, 0, 0.5, 1]
    series = np.arange(12, dtype=np.float32).reshape(3, 4)
    written = write_embeddings(["x.ts", "x.ts", "y.csv"], series, str(tmp_path / "s.npy"), index=[0, 1, 0])
    assert written == [str(tmp_path / "s.npy"), str(tmp_path / "s.rows.jsonl")]
    assert rows_file(written[0]) == Path(written[1])
    assert jsonl(written[1]) == [{"file": "x.ts", "index": 0}, {"file": "x.ts", "index": 1},
                                 {"file": "y.csv", "index": 0}]
    write_embeddings(["x.ts", "x.ts", "y.csv"], series, str(tmp_path / "s.npz"), index=[0, 1, 0])
    with np.load(tmp_path / "s.npz") as saved:
        assert saved["index"].tolist() == [0, 1, 0] and np.array_equal(saved["embeddings"], series)


def test_cli__version_and_every_flag_says_its_default(capsys):
    import argparse

    from multijepa import __version__
    from multijepa.cli import build_parser

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out == f"multijepa {__version__}\n"
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(commands) >= {"pretrain", "embed", "probe", "shard", "demo"}
    for name, command in commands.items():
        for action in command._actions:
            if action.option_strings and action.dest not in ("help", "version") and not action.required:
                assert "default" in command._get_formatter()._get_help_string(action), (name, action.dest)
    text = " ".join(commands["embed"].format_help().split())
    assert "(default: 2)" in text and "rows.jsonl" in text and ".npz" in text and "folders" in text


def test_embed__bad_input_ends_in_a_clear_error_not_a_traceback(trained, tmp_path, monkeypatch, capsys):
    import torch

    from multijepa.checkpoint import FORMAT

    monkeypatch.chdir(tmp_path)
    ckpt = str(trained / "runs/image/last.pt")
    (tmp_path / "empty").mkdir()
    (tmp_path / "sounds").mkdir()
    (tmp_path / "sounds/a.wav").write_bytes(b"RIFF")
    (tmp_path / "sounds/notes.md").write_text("x")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    torch.save({"format": FORMAT}, tmp_path / "hollow.pt")
    (tmp_path / "list.lst").write_text("missing.png\n")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG not really")
    cases = [
        (["empty", "--checkpoint", ckpt], "empty: no image files in this folder or below (looked for .bmp, "),
        (["empty", "--checkpoint", ckpt], "; it is empty"),
        (["empty"], "empty: no files multijepa reads in this folder or below"),
        (["sounds", "--checkpoint", ckpt], "sounds: no image files in this folder or below"),
        (["sounds", "--checkpoint", ckpt], "it holds only .md, .wav files"),
        (["nowhere"], "nowhere: no such file or folder"),
        (["list.lst", "--checkpoint", ckpt], "list.lst, line 1: missing.png does not exist"),
        (["sounds/a.wav", "--checkpoint", ckpt], "this model was trained on image; pass a audio checkpoint"),
        (["bad.png", "--checkpoint", "junk.pt"], "junk.pt: not a readable checkpoint"),
        (["bad.png", "--checkpoint", "hollow.pt"], "hollow.pt: a checkpoint without its recipe or weights"),
        (["bad.png", "--checkpoint", str(trained / "runs/image")],
         f"a folder, not a checkpoint or an export (config.json + model.safetensors); pass {ckpt}"),
        (["bad.png", "--checkpoint", ckpt, "--out", "v.csv"], "--out v.csv: use a .jsonl, .npy or .npz file name"),
        (["bad.png", "--checkpoint", ckpt, "--device", "gpu"], "device 'gpu'"),
        (["bad.png", "--checkpoint", ckpt, "--workers", "2"], "bad.png: "),  # raised in a worker, named as such
    ]
    for argv, message in cases:
        assert main(["embed", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("multijepa: error: ") and message in err and "Traceback" not in err, (argv, err)
    with pytest.raises(SystemExit) as done:
        main(["embed", "bad.png", "--workers", "-1"])
    assert done.value.code == 2 and "--workers: must be at least 0, not -1" in capsys.readouterr().err


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
    (tmp_path / "x.qqq").write_text("?")
    proc = run_cli("embed", str(tmp_path / "x.qqq"), "--checkpoint", str(trained / "runs/image/last.pt"), check=False)
    assert proc.returncode == 2 and "unknown file type" in proc.stderr


def test_probe__reports_accuracy_for_trained_and_random_init(trained, shapes):
    ckpt = str(trained / "runs/image/last.pt")
    out = run_cli("probe", str(shapes), "--checkpoint", ckpt, "--json", "--workers", "0")
    result = json.loads(out.stdout.splitlines()[-1])
    assert 0 <= result["linear"] <= 1 and result["n_train"] + result["n_test"] == 32
    out = run_cli("probe", str(shapes), "--checkpoint", ckpt, "--random-init", "--folds", "4", "--workers", "0",
                  "--precision", "fp32")
    assert "random-init encoder (4-fold, fp32)" in out.stdout


def test_embed__says_and_honours_its_precision(trained, shapes, monkeypatch, capsys):
    monkeypatch.chdir(trained)
    file, ckpt = str(sorted(shapes.rglob("*.png"))[0]), str(trained / "runs/image/last.pt")
    assert main(["embed", file, "--checkpoint", ckpt, "--precision", "fp32", "--out", "a.npy"]) == 0
    assert "embedded on cpu in fp32 (as set)" in capsys.readouterr().err
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": True})
    assert main(["embed", file, "--checkpoint", ckpt, "--out", "b.npy"]) == 0
    assert "in bf16 (auto: the CPU has avx512_bf16)" in capsys.readouterr().err
    a, b = np.load(trained / "a.npy"), np.load(trained / "b.npy")
    assert a.dtype == b.dtype == np.float32 and not np.array_equal(a, b) and np.allclose(a, b, atol=0.05)
    with pytest.raises(SystemExit):
        main(["embed", file, "--checkpoint", ckpt, "--precision", "fp16"])


def test_shard__then_pretrain_on_shards(tmp_path, shapes):
    run_cli("shard", str(shapes), "shards", "--per-shard", "16", cwd=tmp_path)
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["classes.json", "shard-000000.tar",
                                                                       "shard-000001.tar"]
    run_cli("pretrain", RECIPE, *TINY_IMAGE, "data.path=shards", "run.dir=run", "train.steps=3", cwd=tmp_path)
    assert max(losses(tmp_path / "run")) == 3


def test_demo__writes_the_set_pretrains_embeds_and_probes_both_encoders(tmp_path, capsys):
    """The demo's whole path at a tiny size (its figures at full size are measured in docs/results.md)."""
    from multijepa.demo import run_demo

    result = run_demo(tmp_path, steps=2, per_class=6)
    printed = capsys.readouterr().out
    assert len(list((tmp_path / "shapes").rglob("*.png"))) == 24 and (tmp_path / "run/last.pt").exists()
    for name in ("jepa", "random_init"):
        assert 0.0 <= result[name]["linear"] <= 1.0 and result[name]["n_test"] > 0
    assert "multijepa pretrain image" in printed and "random-init encoder: linear" in printed
    assert ("points better" in printed) == (result["jepa"]["linear"] - result["random_init"]["linear"] >= 0.10)
    assert "docs/results.md" in printed
