"""docs/adding-a-modality.md, carried out: every code block of the page runs, in order, and the
modality it defines (spectra) trains two steps, embeds from its checkpoint and is probed."""

from __future__ import annotations

import os
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from multijepa.errors import DecodeError, RecipeError
from multijepa.modalities import MODALITIES

PAGE = Path(__file__).resolve().parents[1] / "docs" / "adding-a-modality.md"


def _blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", PAGE.read_text(), flags=re.S)


def _write_spectra(root: Path, per_class: int = 12) -> None:
    """Two classes of noisy spectra: one peak on the left half, or on the right half."""
    rng = np.random.default_rng(0)
    axis = np.arange(64)
    for label, centres in (("peak_left", (10, 25)), ("peak_right", (40, 55))):
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            centre = rng.uniform(*centres)
            values = np.exp(-0.5 * ((axis - centre) / 3.0) ** 2) + 0.05 * rng.standard_normal(64)
            (root / label / f"{i}.spec").write_text(" ".join(f"{v:.5f}" for v in values))


@pytest.fixture
def walkthrough(tmp_path, monkeypatch):
    """The page's module, with its modality in the table for the test (taken out again after)."""
    module = types.ModuleType("spectrum_walkthrough")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(MODALITIES, "spectrum", None)  # restored (removed) at teardown
    module_blocks = [b for b in _blocks("python") if "mj.pretrain" not in b]
    for block in module_blocks:  # the module, then its registration in the table
        exec(compile(block, str(PAGE), "exec"), module.__dict__)
    assert MODALITIES["spectrum"] is module.SPEC
    _write_spectra(tmp_path / "spectra")
    monkeypatch.chdir(tmp_path)
    return module


def test_adding_a_modality__page_trains_embeds_and_probes(walkthrough, tmp_path):
    (recipe_text,) = _blocks("yaml")
    raw = yaml.safe_load(recipe_text)
    raw["train"].update(steps=2, progress=False)
    raw["data"].update(batch_size=8, num_workers=0)
    Path("spectrum.yaml").write_text(yaml.safe_dump(raw))
    (usage,) = [b for b in _blocks("python") if "mj.pretrain" in b]
    namespace: dict = {}
    exec(compile(usage, str(PAGE), "exec"), namespace)  # the page's own calls, as a user runs them
    run, vectors, scores = namespace["run"], namespace["vectors"], namespace["scores"]
    assert (run / "last.pt").is_file() and vectors.shape == (1, 64) and np.isfinite(vectors).all()
    assert scores["n_train"] + scores["n_test"] == 24
    # Peak left or right is plain in the tokens' positions: even two steps' encoder separates the
    # classes under the linear probe (0.83 here, every seed fixed; chance is 0.5).
    assert scores["linear"] > 0.7
    # The checkpoint alone rebuilds the model: the same vectors again, and a tensor embeds like its file.
    import multijepa as mj

    model = mj.load(run / "last.pt")
    again = model.embed(["spectra/peak_left/0.spec"])
    assert np.array_equal(again, vectors)
    x = walkthrough.spectrum_input(walkthrough.read_spectrum("spectra/peak_left/0.spec", "f"),
                                   model.recipe.spectrum, None, "f")
    assert np.allclose(model.embed([x]), vectors, atol=1e-6)
    saved = yaml.safe_load((run / "recipe.yaml").read_text())
    assert saved["modality"] == "spectrum" and saved["spectrum"]["patch_size"] == 8


def test_adding_a_modality__tokenizer_gives_tokens_and_patch_coords(walkthrough):
    tokens, coords = walkthrough.SpectrumTokenizer(8, 16)(torch.randn(3, 1, 64))
    assert tokens.shape == (3, 8, 16) and coords.shape == (3, 8, 1)
    assert coords[0, :, 0].tolist() == list(range(8))


def test_adding_a_modality__recipe_errors_name_the_key(walkthrough):
    from multijepa.recipe import recipe_from_dict

    raw = yaml.safe_load(_blocks("yaml")[0])
    with pytest.raises(RecipeError, match=r"unknown key 'spectrum.patch_sise' \(did you mean 'patch_size'\?\)"):
        recipe_from_dict({**raw, "spectrum": {"patch_sise": 8}}, "spectrum.yaml")
    with pytest.raises(RecipeError, match=r"spectrum.yaml: 'spectrum.patch_size' must divide spectrum.length=64"):
        recipe_from_dict({**raw, "spectrum": {"patch_size": 7}}, "spectrum.yaml")
    with pytest.raises(RecipeError, match="mask.target_scale"):  # masks are checked on the spec's token grid
        recipe_from_dict({**raw, "mask": {"target_scale": [0.9, 0.95]}}, "spectrum.yaml")


def test_adding_a_modality__corrupt_file_is_named(walkthrough, tmp_path):
    bad = tmp_path / "bad.spec"
    bad.write_text("1.0 2.0 not-a-number")
    with pytest.raises(DecodeError, match=r"bad.spec: not a spectrum"):
        walkthrough.read_spectrum(str(bad), str(bad))
    os.truncate(bad, 0)
    with pytest.raises(DecodeError, match="bad.spec"):
        walkthrough.read_spectrum(str(bad), str(bad))
