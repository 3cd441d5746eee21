"""What a run logs and keeps (TensorBoard, W&B offline, milestone checkpoints, the start-up line), and
installs without the optional extras (a missing one is an error naming the pip install)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import multijepa
from multijepa.cli import main
from multijepa.errors import MissingExtraError, RecipeError
from multijepa.recipe import load_recipe
from multijepa.train import build_model

from conftest import IMAGE_RECIPE, ROOT, TINY_IMAGE, losses


def _recipe(shapes: Path, run_dir: Path, *more: str):
    return load_recipe(IMAGE_RECIPE, TINY_IMAGE + [f"data.path={shapes}", f"run.dir={run_dir}", *more])


def test_loggers__tensorboard_event_files_hold_every_metric_and_the_startup_line(shapes, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = multijepa.pretrain(_recipe(shapes, tmp_path / "tb", "train.steps=4", "train.loggers=[tensorboard]"))
    startup = capsys.readouterr().err.splitlines()[0]
    assert startup.startswith("pretrain image on cpu") and "from 32 image samples" in startup
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {"loss", "loss_prediction", "lr", "target_std", "target_erank", "samples_per_s", "bad_files"} <= set(scalars)
    assert [(e.step, round(e.value, 5)) for e in events.Scalars("loss")] == \
        [(s, round(v, 5)) for s, v in losses(run).items()]
    text = events.Tensors("startup/text_summary")[0].tensor_proto.string_val[0].decode()
    assert text == startup


def test_loggers__wandb_offline_without_network_and_a_resumed_run_keeps_its_id(shapes, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc credentials: offline
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "300")  # a busy 2-core machine can take a while to start its service
    monkeypatch.setenv("WANDB__SERVICE_WAIT", "300")
    run_dir = tmp_path / "wb"
    multijepa.pretrain(_recipe(shapes, run_dir, "train.steps=2", "train.loggers=[wandb]"))
    assert "logging offline" in capsys.readouterr().err
    run_id = (run_dir / "wandb_id").read_text().strip()
    multijepa.pretrain(_recipe(shapes, run_dir, "train.steps=4", "train.loggers=[wandb]"))
    offline = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(p.name.endswith(run_id) for p in offline)
    assert all(list(p.glob("*.wandb")) for p in offline)
    assert (run_dir / "wandb_id").read_text().strip() == run_id


def test_keep_every__milestones_beside_last_pt_survive_later_checkpoints(shapes, tmp_path):
    run = multijepa.pretrain(_recipe(shapes, tmp_path / "keep", "train.steps=5", "train.keep_every=2",
                                     "train.checkpoint_every=100"))
    assert sorted(p.name for p in run.glob("*.pt")) == ["last.pt", "step_0000002.pt", "step_0000004.pt"]
    from multijepa.checkpoint import load_checkpoint

    assert [load_checkpoint(run / f"step_{s:07d}.pt")["step"] for s in (2, 4)] == [2, 4]
    assert load_checkpoint(run / "last.pt")["step"] == 5
    assert multijepa.load(run / "step_0000002.pt").embed(sorted(shapes.rglob("*.png"))[:2]).shape == (2, 32)


def test_recipe__loggers_and_keep_every_are_validated():
    with pytest.raises(RecipeError, match="train.loggers"):
        load_recipe("image", ["train.loggers=[tensorbord]"])
    with pytest.raises(RecipeError, match="train.loggers"):
        load_recipe("image", ["train.loggers=[wandb,wandb]"])
    with pytest.raises(RecipeError, match="train.keep_every"):
        load_recipe("image", ["train.keep_every=-1"])


@pytest.mark.parametrize("modality, module, extra", [("pointcloud", "open3d", "pointcloud"), ("video", "av", "video"),
                                                     ("audio", "soundfile", "audio")])
def test_missing_extra__building_a_model_names_the_pip_install(modality, module, extra, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # its import fails, as when the extra is not installed
    with pytest.raises(MissingExtraError, match=rf"(?s)the {modality} modality needs the Python package {module}.*"
                                                rf"pip install 'multijepa\[{extra}\]'"):
        build_model(load_recipe(modality))


def test_missing_extra__the_cli_says_it_without_a_traceback(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    code = main(["pretrain", "pointcloud", f"run.dir={tmp_path}", "train.loggers=[tensorboard]", "data.path=x"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    monkeypatch.setitem(sys.modules, "open3d", None)
    assert main(["pretrain", "pointcloud", f"run.dir={tmp_path}"]) == 2
    assert "pip install 'multijepa[pointcloud]'" in capsys.readouterr().err


def test_plain_install__trains_embeds_and_exports_images_without_any_extra(shapes, tmp_path):
    """Every optional package made unimportable in a fresh interpreter: image work runs, nothing optional loads."""
    optional = ["soundfile", "soxr", "torchaudio", "av", "decord", "open3d", "tensorboard", "wandb", "huggingface_hub",
                "gymnasium", "mujoco"]
    script = textwrap.dedent(f"""
        import sys
        for name in {optional!r}:
            sys.modules[name] = None  # import raises ImportError
        from multijepa.cli import main
        tiny = {TINY_IMAGE!r}
        assert main(["pretrain", "image", "data.path={shapes}", "run.dir={tmp_path / 'run'}", "train.steps=2", *tiny]) == 0
        assert main(["embed", "--checkpoint", "{tmp_path / 'run' / 'last.pt'}", "{shapes}", "--out",
                     "{tmp_path / 'v.npy'}", "--quiet", "--workers", "0"]) == 0
        assert main(["export", "{tmp_path / 'run' / 'last.pt'}", "{tmp_path / 'exported'}"]) == 0
        assert main(["info", "{tmp_path / 'exported'}"]) == 0
        loaded = [name for name in {optional!r} if sys.modules.get(name) is not None]
        assert not loaded, loaded
    """)
    env = dict(os.environ, OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "v.npy").is_file() and json.loads((tmp_path / "exported" / "config.json").read_text())


def test_runlog__a_resumed_run_counts_bad_files_on_from_the_checkpoint(tmp_path, capsys):
    from multijepa.runlog import RunLog

    (tmp_path / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": 1.0, "bad_files": s + 1}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "lo')
    log = RunLog(tmp_path, load_recipe("image"), start_step=2, summary="start")
    assert log.bad_files_before == 3  # step 2's count; steps 3 and the torn line after the checkpoint are gone
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert RunLog(tmp_path, load_recipe("image"), start_step=0, summary="start").bad_files_before == 0
    assert capsys.readouterr().err == "start\nstart\n"
