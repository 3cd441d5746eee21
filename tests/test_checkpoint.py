import os

import pytest
import torch

from multijepa.checkpoint import load_checkpoint, save_checkpoint
from multijepa.errors import MultijepaError


def test_save_checkpoint__round_trip_with_weights_only(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint({"step": 3, "model": {"w": torch.ones(2)}, "recipe": {"a": [1, 2]}}, path)
    state = load_checkpoint(path)
    assert state["step"] == 3 and torch.equal(state["model"]["w"], torch.ones(2))
    assert state["versions"]["torch"] == str(torch.__version__) and os.listdir(tmp_path) == ["c.pt"]


def test_save_checkpoint__failure_mid_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    save_checkpoint({"step": 1}, path)

    def explode(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", explode)
    with pytest.raises(OSError):
        save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1 and os.listdir(tmp_path) == ["c.pt"]


def test_load_checkpoint__garbage_or_foreign_file_is_named(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(MultijepaError, match="junk.pt: not a readable checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"w": torch.ones(1)}, tmp_path / "other.pt")
    with pytest.raises(MultijepaError, match="not a multijepa checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(MultijepaError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "none.pt")
