import dataclasses
from pathlib import Path

import pytest
import yaml

from conftest import IMAGE_RECIPE, JEPA_RECIPES, TINY, WORLDMODEL_RECIPES
from multijepa.errors import RecipeError
from multijepa.modalities import MODALITIES
from multijepa.recipe import SourceConfig, load_recipe, recipe_to_dict, save_recipe
from multijepa.train import build_model
from multijepa.worldmodel import load_worldmodel_recipe


def test_recipes__every_shipped_recipe_loads_and_builds():
    assert JEPA_RECIPES, "recipes/ is empty"
    for path in JEPA_RECIPES:
        recipe = load_recipe(path, TINY)
        model = build_model(recipe)
        assert sum(p.numel() for p in model.parameters()) > 0
    assert {load_recipe(p).modality for p in JEPA_RECIPES} == set(MODALITIES) | {"mixed"}
    assert [p.name for p in WORLDMODEL_RECIPES] == ["worldmodel.yaml"]
    for path in WORLDMODEL_RECIPES:  # a world-model recipe builds with its predictor (tests/test_worldmodel.py)
        assert load_worldmodel_recipe(path).worldmodel.encoder


def test_recipes__shipped_recipe_full_size_builds():
    for path in JEPA_RECIPES:
        build_model(load_recipe(path))


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_load_recipe__unknown_key_names_file_dotted_key_and_suggestion(tmp_path):
    p = write(tmp_path, "image:\n  patch_sise: 4\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    assert str(p) in str(e.value) and "'image.patch_sise'" in str(e.value) and "did you mean 'patch_size'" in str(e.value)


def test_load_recipe__unknown_section(tmp_path):
    with pytest.raises(RecipeError, match="unknown key 'trian'.*did you mean 'train'"):
        load_recipe(write(tmp_path, "trian:\n  steps: 3\n"))


@pytest.mark.parametrize("text,key", [
    ("train:\n  steps: ten\n", "train.steps"),
    ("train:\n  steps: 1.5\n", "train.steps"),
    ("image:\n  hflip: 1\n", "image.hflip"),
    ("image:\n  crop_scale: 0.5\n", "image.crop_scale"),
    ("loss:\n  type: l3\n", "loss.type"),
    ("data: 5\n", "data"),
])
def test_load_recipe__wrong_type_names_key(tmp_path, text, key):
    with pytest.raises(RecipeError, match=f"'{key}'"):
        load_recipe(write(tmp_path, text))


@pytest.mark.parametrize("text,key", [
    ("image:\n  size: 30\n  patch_size: 4\n", "image.patch_size"),
    ("mask:\n  target_scale: [0.9, 0.95]\n", "mask.target_scale"),
    ("mask:\n  target_scale: [0.3, 0.1]\n", "mask.target_scale"),
    ("mask:\n  full_span_axes: [2]\n", "mask.full_span_axes"),
    ("mask:\n  full_span_axes: [0, 1]\n", "mask.full_span_axes"),
    ("image:\n  size: 8\n  patch_size: 4\nmask:\n  target_scale: [0.01, 0.02]\n", "mask.target_scale"),
    ("model:\n  dim: 30\n  heads: 4\n", "model.heads"),
    ("optim:\n  lr: -1\n", "optim.lr"),
    ("train:\n  steps: 0\n", "train.steps"),
])
def test_load_recipe__impossible_value_names_key(tmp_path, text, key):
    with pytest.raises(RecipeError, match=f"'{key}'"):
        load_recipe(write(tmp_path, text))


def test_load_recipe__bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(write(tmp_path, "train: [\n"))
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_overrides__same_schema_as_the_file(tmp_path):
    p = write(tmp_path, "train:\n  steps: 3\n")
    r = load_recipe(p, ["train.steps=7", "image.crop_scale=[0.5,1.0]", "loss.regularizer=sigreg"])
    assert r.train.steps == 7 and r.image.crop_scale == (0.5, 1.0) and r.loss.regularizer == "sigreg"
    with pytest.raises(RecipeError, match="'train.stepz'.*did you mean 'steps'"):
        load_recipe(p, ["train.stepz=7"])
    with pytest.raises(RecipeError, match="'train.steps' must be an integer"):
        load_recipe(p, ["train.steps=many"])
    with pytest.raises(RecipeError, match="key.sub=value"):
        load_recipe(p, ["train.steps"])


def test_save_recipe__round_trips(tmp_path):
    r = load_recipe(IMAGE_RECIPE, ["train.steps=11"])
    save_recipe(r, tmp_path / "saved.yaml")
    assert load_recipe(tmp_path / "saved.yaml") == r
    assert yaml.safe_load((tmp_path / "saved.yaml").read_text()) == recipe_to_dict(r)


@pytest.mark.parametrize("text,value", [("1e-3", 1e-3), ("3E-4", 3e-4), ("1_000", 1000.0), (".5", 0.5),
                                        ("2.5e+1", 25.0), ("2", 2.0)])
def test_load_recipe__numbers_as_people_write_them(tmp_path, text, value):
    from_override = load_recipe(IMAGE_RECIPE, [f"optim.lr={text}"]).optim.lr
    from_file = load_recipe(write(tmp_path, f"optim:\n  lr: {text}\n  betas: [{text}, 0.95]\n")).optim
    assert from_override == from_file.lr == pytest.approx(value) and isinstance(from_override, float)
    assert from_file.betas == (pytest.approx(value), 0.95)  # inside a list too


def test_load_recipe__integers_as_people_write_them(tmp_path):
    assert load_recipe(IMAGE_RECIPE, ["train.steps=1_000"]).train.steps == 1000
    assert load_recipe(IMAGE_RECIPE, ["train.steps=2e3"]).train.steps == 2000
    assert load_recipe(write(tmp_path, "train:\n  steps: 1e4\n")).train.steps == 10000
    for bad in ("2.5e0", "1e-3", "ten", "true"):
        with pytest.raises(RecipeError, match="'train.steps' must be an integer"):
            load_recipe(IMAGE_RECIPE, [f"train.steps={bad}"])
    with pytest.raises(RecipeError, match="'optim.lr' must be a number, got 'fast'"):
        load_recipe(IMAGE_RECIPE, ["optim.lr=fast"])


def test_load_recipe__old_normalize_targets_key_becomes_target_norm(tmp_path):
    off = load_recipe(write(tmp_path, "loss:\n  normalize_targets: false\n  target_norm: instance\n"))
    assert off.loss.target_norm == "none" and not hasattr(off.loss, "normalize_targets")
    kept = load_recipe(write(tmp_path, "loss:\n  normalize_targets: true\n  target_norm: instance\n"))
    assert kept.loss.target_norm == "instance"
    assert load_recipe(write(tmp_path, "loss:\n  normalize_targets: true\n")).loss.target_norm == "layer"
    with pytest.raises(RecipeError, match="'loss.target_norm' must be one of 'none', 'layer', 'instance'"):
        load_recipe(write(tmp_path, "loss:\n  target_norm: batch\n"))


def test_recipe__single_modality_recipe_is_one_source():
    r = load_recipe(IMAGE_RECIPE, ["data.path=photos/", "data.format=folder"])
    assert r.all_sources == (SourceConfig("image", "photos/", "folder"),) and r.modalities == ("image",)
    assert r.source("image") is r and r.section("image") is r.image
    with pytest.raises(RecipeError, match="this recipe trains on image; it has no audio source"):
        r.source("audio")
    smaller = r.with_section("image", dataclasses.replace(r.image, size=16))
    assert smaller.image.size == 16 and r.image.size != 16 and smaller.audio == r.audio


def test_recipe__equal_recipes_hash_equal_and_sections_count():
    a, b = load_recipe("image"), load_recipe("image")
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    c = load_recipe("image", ["image.patch_size=8"])  # a difference inside a modality's section
    assert c != a and len({a, c}) == 2
