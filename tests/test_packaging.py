"""Packaging: the wheel and the sdist ship the recipes as package data, an installed (non-editable)
package pretrains a shipped recipe by name, and ``load_recipe`` finds shipped recipes from any folder.

The builds run offline (no build isolation, no index) on a copy of the checkout, so the repository
gets no build/ or egg-info from them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

from audio_files import make_audio_folder
from conftest import RECIPES, ROOT, TINY_AUDIO
from multijepa.errors import RecipeError
from multijepa.recipe import load_recipe, shipped_recipes

# Generated or local-only folders a build must not see (and that can be large).
NOT_SOURCES = {".git", ".venv", "build", "dist", "runs", "demo", ".pytest_cache", ".whl", "bench/out"}


def quiet_env() -> dict[str, str]:
    """The environment without the user's pip settings (an index, find-links) or PYTHONPATH (which
    would put the checkout's package ahead of the installed one)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k != "PYTHONPATH"}
    return dict(env, PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="2")


def run(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=quiet_env(), capture_output=True, text=True,
                          timeout=300)
    command = " ".join(map(str, args))
    assert proc.returncode == 0, f"{command} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """A copy of the checkout's sources, symlinks kept as symlinks (recipes/ -> multijepa/recipes)."""
    dest = tmp_path_factory.mktemp("checkout") / "multijepa-src"

    def skipped(folder: str, names: list[str]) -> set[str]:
        here = Path(folder).relative_to(ROOT)
        generated = {n for n in names if n == "__pycache__" or n.endswith(".egg-info")}
        return generated | {n for n in names if (here / n).as_posix() in NOT_SOURCES}

    shutil.copytree(ROOT, dest, symlinks=True, ignore=skipped)
    return dest


@pytest.fixture(scope="module")
def wheel(checkout, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    run(sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "--no-index", "--quiet",
        "-w", out, cwd=checkout)
    (found,) = out.glob("multijepa-*.whl")
    return found


def package_sources() -> set[str]:
    """Every module of the package, as a wheel names it (multijepa/core/jepa.py ...)."""
    return {p.relative_to(ROOT).as_posix() for p in (ROOT / "multijepa").rglob("*.py") if "__pycache__" not in p.parts}


def test_wheel__ships_every_recipe_once_and_nothing_but_the_package(wheel):
    assert RECIPES, "multijepa/recipes/ is empty"
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
        recipes = {f"multijepa/recipes/{p.name}": p for p in RECIPES}
        for name, path in recipes.items():
            assert zf.read(name) == path.read_bytes(), name
        info = [n for n in names if n.split("/")[0].endswith(".dist-info")]
        assert set(names) - set(info) == package_sources() | set(recipes)
        entry_points = zf.read(next(n for n in info if n.endswith("/entry_points.txt"))).decode()
    assert "multijepa = multijepa.cli:main" in entry_points


def test_sdist__ships_every_recipe_once_and_no_symlink(checkout, tmp_path):
    run(sys.executable, "-c", f"from setuptools import build_meta; build_meta.build_sdist({str(tmp_path)!r})",
        cwd=checkout)
    (sdist,) = tmp_path.glob("multijepa-*.tar.gz")
    with tarfile.open(sdist) as tf:
        members = tf.getmembers()
    names = [m.name.split("/", 1)[1] for m in members if "/" in m.name]
    assert not [m.name for m in members if m.issym() or m.islnk()]
    assert sorted(n for n in names if n.endswith(".yaml")) == sorted(f"multijepa/recipes/{p.name}" for p in RECIPES)


def test_wheel__installed_cli_pretrains_a_shipped_recipe_by_name(wheel, tmp_path):
    """A plain (non-editable) install into a fresh venv, outside the checkout: `multijepa pretrain audio`.

    The venv reaches the test interpreter's packages (torch ...) through a .pth file, so nothing is
    downloaded; that path holds no importable multijepa (the checkout's is an editable-install hook).
    """
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path)
                .stdout.strip())
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "zz_test_deps.pth").write_text("".join(f"{p}\n" for p in sorted(deps)))
    run(python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "--quiet", wheel,
        cwd=tmp_path)
    assert (site / "multijepa/recipes/audio.yaml").is_file()

    work = tmp_path / "elsewhere"  # no recipes/ folder here
    make_audio_folder(work / "clips", per_class=2)
    tiny = [o for o in TINY_AUDIO if not o.startswith("data.batch_size")]
    run(venv / "bin" / "multijepa", "pretrain", "audio", *tiny, "data.batch_size=4", "data.path=clips",
        "run.dir=run", "train.steps=2", cwd=work)
    assert (work / "run/last.pt").is_file() and "modality: audio" in (work / "run/recipe.yaml").read_text()
    # The demo's whole path from the installed package (what `multijepa demo` runs, at a tiny size).
    demo = run(python, "-c", "from multijepa.demo import run_demo; run_demo('demo', steps=1, per_class=6)", cwd=work)
    assert "random-init encoder: linear" in demo.stdout and (work / "demo/run/last.pt").is_file()


def test_shipped_recipes__names_every_recipe_file():
    shipped = shipped_recipes()
    assert {name: path.resolve() for name, path in shipped.items()} == {p.stem: p.resolve() for p in RECIPES}
    assert list(shipped) == sorted(shipped)


@pytest.mark.parametrize("name", ["audio", "audio.yaml", "recipes/audio.yaml", "./recipes/audio.yaml"])
def test_load_recipe__shipped_name_from_a_folder_without_recipes(monkeypatch, tmp_path, name):
    monkeypatch.chdir(tmp_path)
    assert load_recipe(name) == load_recipe(ROOT / "recipes/audio.yaml")


def test_load_recipe__a_file_of_that_name_wins_over_the_shipped_recipe(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipes").mkdir()
    for local in ["audio.yaml", "recipes/audio.yaml"]:
        (tmp_path / local).write_text("modality: image\n")
        assert load_recipe(local).modality == "image"
    assert load_recipe("audio").modality == "audio"  # no file named audio: the shipped one


def test_load_recipe__checkout_path_reads_through_the_recipes_link(monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(RecipeError, match=r"^recipes/audio\.yaml \(with overrides train\.stepz=1\): .*'train\.stepz'"):
        load_recipe("recipes/audio.yaml", ["train.stepz=1"])


def test_load_recipe__error_in_a_shipped_recipe_names_the_file_read(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RecipeError) as e:
        load_recipe("audio", ["train.stepz=1"])
    assert str(e.value).startswith(f"{shipped_recipes()['audio']} (with overrides")


@pytest.mark.parametrize("name", ["audoi", "recipes/nope.yaml"])
def test_load_recipe__unknown_name_lists_the_shipped_recipes(monkeypatch, tmp_path, name):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RecipeError) as e:
        load_recipe(name)
    message = str(e.value)
    assert message.startswith(f"{name}: recipe file not found") and "path of a YAML recipe file" in message
    assert f"Shipped recipes: {', '.join(shipped_recipes())};" in message
    assert ("did you mean 'audio'?" in message) == (name == "audoi")


def test_load_recipe__missing_path_or_folder_says_how_to_pass_a_recipe(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found; pass the path of a YAML recipe file or the name "
                                          "of a shipped recipe \\(audio, clips, frames, image"):
        load_recipe(tmp_path / "missing.yaml")
    with pytest.raises(RecipeError, match="is a folder, not a recipe file"):
        load_recipe(tmp_path)
