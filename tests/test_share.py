"""Handing a model on: export (safetensors + config.json + card) and loading it back, the Hub methods
(a local folder, and the Hub calls with huggingface_hub's API stood in for), info."""

from __future__ import annotations

import json
import os
import stat
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import multijepa
from multijepa.cli import main
from multijepa.embed import Embedder
from multijepa.errors import MultijepaError
from multijepa.export import info, info_text

from conftest import IMAGE_RECIPE, TINY_IMAGE


@pytest.fixture(scope="module")
def run(tmp_path_factory, shapes) -> Path:
    """A tiny image run of 6 steps keeping step 4, with its metrics."""
    run_dir = tmp_path_factory.mktemp("run") / "tiny-image"
    multijepa.pretrain(multijepa.load_recipe(IMAGE_RECIPE, TINY_IMAGE + [
        f"data.path={shapes}", f"run.dir={run_dir}", "train.steps=6", "train.keep_every=4"]))
    return run_dir


def _images(shapes: Path) -> list[str]:
    return sorted(str(p) for p in shapes.rglob("*.png"))[:12]


def test_export__embeds_exactly_as_the_checkpoint(run, shapes, tmp_path):
    out = multijepa.export(run / "last.pt", tmp_path / "exported")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    files = _images(shapes)
    want = multijepa.load(run / "last.pt", precision="fp32").embed(files)
    got = multijepa.load(out, precision="fp32").embed(files)
    np.testing.assert_array_equal(got, want)
    config = json.loads((out / "config.json").read_text())
    assert config["format"] == "multijepa-export-v1" and config["step"] == 6 and config["modalities"] == ["image"]
    assert config["metrics"]["step"] == 6 and config["recipe"]["model"]["dim"] == 32
    assert config["versions"]["torch"] and config["trained_from"].endswith("last.pt")
    umask = os.umask(0)
    os.umask(umask)
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o666 & ~umask}  # shareable, as umask says
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: multijepa") and "6 steps of 6" in card and "32-dimensional" in card


def test_export__weights_only_and_no_optimizer(run, tmp_path):
    from safetensors.torch import load_file

    out = multijepa.export(run / "last.pt", tmp_path / "e")
    weights = load_file(str(out / "model.safetensors"))
    assert weights and all(not k.startswith(("context.", "predictor.", "target.")) for k in weights)
    assert any(k.startswith("tokenizers.image.") for k in weights) and any(k.startswith("encoder.") for k in weights)


def test_export__a_milestone_checkpoint_carries_its_own_step_and_metrics(run, tmp_path):
    out = multijepa.export(run / "step_0000004.pt", tmp_path / "e4")
    config = json.loads((out / "config.json").read_text())
    assert config["step"] == 4 and config["metrics"]["step"] == 4


def test_export__the_cli_writes_it_and_embed_reads_it(run, shapes, tmp_path, capsys):
    out = tmp_path / "cli-export"
    assert main(["export", str(run / "last.pt"), str(out)]) == 0
    assert "model.safetensors" in capsys.readouterr().out
    vectors = tmp_path / "v.npy"
    assert main(["embed", "--checkpoint", str(out), *_images(shapes), "--out", str(vectors), "--quiet",
                 "--precision", "fp32"]) == 0
    want = multijepa.load(run / "last.pt", precision="fp32").embed(_images(shapes))
    np.testing.assert_array_equal(np.load(vectors), want)


def test_export__refuses_a_folder_that_is_not_an_export(run, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(MultijepaError, match="not an export folder"):
        multijepa.export(run / "last.pt", mine)
    assert (mine / "notes.txt").read_text() == "keep me"
    again = multijepa.export(run / "last.pt", tmp_path / "again")
    multijepa.export(run / "step_0000004.pt", again)  # an earlier export is replaced
    assert json.loads((again / "config.json").read_text())["step"] == 4


def test_load_export__a_broken_export_is_named(run, tmp_path):
    out = multijepa.export(run / "last.pt", tmp_path / "broken")
    (out / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(MultijepaError, match="model.safetensors: unreadable"):
        multijepa.load(out)
    (out / "config.json").write_text("{")
    with pytest.raises(MultijepaError, match="config.json: not valid JSON"):
        multijepa.load(out)


def test_save_pretrained__from_pretrained_round_trip_on_a_local_folder(run, shapes, tmp_path):
    model = Embedder.from_checkpoint(run / "last.pt", precision="fp32")
    folder = model.save_pretrained(tmp_path / "hub-layout")
    again = Embedder.from_pretrained(folder, precision="fp32")
    np.testing.assert_array_equal(again.embed(_images(shapes)), model.embed(_images(shapes)))
    assert again.provenance["step"] == 6
    with pytest.raises(MultijepaError, match="neither an export folder nor a Hub repository id"):
        Embedder.from_pretrained(tmp_path / "missing" / "deeper" / "x")


def _fake_hub(monkeypatch, served: Path, calls: list) -> None:
    """huggingface_hub's snapshot_download and HfApi as far as multijepa uses them, with no network."""
    class FakeApi:
        def __init__(self, token=None):
            calls.append(("token", token))

        def create_repo(self, repo_id, private=None, exist_ok=False, repo_type=None):
            calls.append(("create_repo", repo_id, private, exist_ok, repo_type))

        def upload_folder(self, repo_id, folder_path, commit_message, repo_type):
            calls.append(("upload_folder", repo_id, sorted(p.name for p in Path(folder_path).iterdir()), repo_type))
            return f"https://huggingface.co/{repo_id}/commit/abc"

    def snapshot_download(repo_id, revision=None, token=None, allow_patterns=None):
        calls.append(("snapshot_download", repo_id, revision, sorted(allow_patterns)))
        return str(served)

    monkeypatch.setitem(sys.modules, "huggingface_hub",
                        types.SimpleNamespace(HfApi=FakeApi, snapshot_download=snapshot_download))


def test_push_to_hub__creates_the_repo_and_uploads_the_export(run, tmp_path, monkeypatch):
    calls: list = []
    _fake_hub(monkeypatch, tmp_path, calls)
    url = multijepa.load(run / "last.pt").push_to_hub("someone/tiny-image", token="hf_x", private=True)
    assert url == "https://huggingface.co/someone/tiny-image/commit/abc"
    assert ("create_repo", "someone/tiny-image", True, True, "model") in calls and ("token", "hf_x") in calls
    assert ("upload_folder", "someone/tiny-image", ["README.md", "config.json", "model.safetensors"], "model") in calls


def test_from_pretrained__a_repo_id_downloads_through_huggingface_hub(run, shapes, tmp_path, monkeypatch):
    served = multijepa.export(run / "last.pt", tmp_path / "served")
    calls: list = []
    _fake_hub(monkeypatch, served, calls)
    model = Embedder.from_pretrained("someone/tiny-image", revision="v1", precision="fp32")
    assert calls == [("snapshot_download", "someone/tiny-image", "v1", ["README.md", "config.json", "model.safetensors"])]
    want = multijepa.load(run / "last.pt", precision="fp32").embed(_images(shapes))
    np.testing.assert_array_equal(model.embed(_images(shapes)), want)


def test_from_pretrained__without_huggingface_hub_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails, as when it is not installed
    with pytest.raises(multijepa.MissingExtraError, match=r"pip install 'multijepa\[hub\]'"):
        Embedder.from_pretrained("someone/tiny-image")


def test_info__run_checkpoint_and_export(run, tmp_path, capsys):
    found = info(run)
    assert found["kind"] == "run" and found["step"] == 6 and found["modalities"] == ["image"]
    assert found["parameters"]["encoder"] > found["parameters"]["predictor"] > 0
    assert found["milestones"] == ["step_0000004.pt"] and found["metrics"]["step"] == 6
    assert found["health"].startswith(("healthy", "looks collapsed")) and found["token_grids"] == {"image": [4, 4]}
    assert info(run / "step_0000004.pt")["metrics"]["step"] == 4
    out = multijepa.export(run / "last.pt", tmp_path / "e")
    exported = info(out)
    assert exported["kind"] == "export" and exported["step"] == 6
    assert exported["parameters"]["encoder"] == found["parameters"]["encoder"]
    text = info_text(found)
    assert "modalities: image" in text and "step 6 of 6" in text and "health: " in text
    assert main(["info", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "export"


def test_info__a_folder_that_is_neither_is_named(tmp_path, capsys):
    assert main(["info", str(tmp_path)]) == 2
    assert "neither a run folder" in capsys.readouterr().err
