"""Recipes: YAML files mapped one to one onto frozen dataclasses.

Defaults live only in the dataclasses: the shared sections here, the core's in
:mod:`multijepa.core` (``model``, ``loss``, ``mask``), each modality's in its module
(``multijepa.modalities.<name>``). Loading is strict: an unknown key, a wrong type or an impossible
value raises :class:`RecipeError` naming the file and the dotted key. Command-line overrides
(``train.steps=200``) go through the same schema.

A recipe trains one modality (``modality: audio``, samples at ``data.path``) or several
(``modality: mixed`` and one ``sources`` entry per modality). Training reads both the same way: a
single-modality recipe is a mixed one of one source (:attr:`Recipe.all_sources`).

>>> r = load_recipe("image", overrides=["train.steps=10"])
>>> r.train.steps, r.image.patch_size, r.modalities
(10, 4, ('image',))
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Optional

import yaml

from multijepa.config import apply_overrides, build, plain
from multijepa.core.jepa import LossConfig, ModelConfig, TargetNorm, validate_loss, validate_model
from multijepa.core.masking import MaskConfig
from multijepa.errors import RecipeError, check
from multijepa.modalities import MODALITIES
from multijepa.modalities.audio import AudioConfig
from multijepa.modalities.image import ImageConfig
from multijepa.modalities.pointcloud import PointCloudConfig
from multijepa.modalities.timeseries import TimeSeriesConfig
from multijepa.modalities.video import VideoConfig

__all__ = ["AudioConfig", "DataConfig", "EmaConfig", "ImageConfig", "LossConfig", "MaskConfig", "ModelConfig",
           "OptimConfig", "PointCloudConfig", "Recipe", "RunConfig", "SourceConfig", "TimeSeriesConfig",
           "TrainConfig", "VideoConfig", "load_recipe", "recipe_from_dict", "recipe_to_dict", "save_recipe",
           "shipped_recipes", "source_counts", "token_grid"]

FORMATS = Literal["auto", "folder", "filelist", "shards", "file"]


@dataclass(frozen=True)
class DataConfig:
    """Where samples come from and how they are batched (shared by every modality)."""

    path: str = ""  # a folder, a file list (.txt, one path [label] per line), webdataset shards or one data file
    # auto: from the path; file: one data file that is a data set by itself (a .ts file, a wide CSV, a 2-D .npy)
    format: FORMATS = "auto"
    batch_size: int = 64  # per process; the global batch is batch_size * world size
    num_workers: int = 2
    max_bad_fraction: float = 0.01  # stop training when more than this share of files fails to decode
    bad_check_after: int = 100  # files read before max_bad_fraction is applied (a few bad files at the start are noise)
    shuffle_buffer: int = 1000  # webdataset shards: samples held for shuffling, per DataLoader worker
    # modality: mixed: how each batch is split between the sources. proportion: the same share of
    # every batch (batch_size * weight / total weight, rounded); weights: each sample's source drawn
    # at random with probability weight / total weight.
    mix: Literal["proportion", "weights"] = "proportion"


@dataclass(frozen=True)
class SourceConfig:
    """One modality of a mixed recipe: where its samples come from and how much they count.

    The modality's own section (``image:``, ``audio:`` ...) configures reading and tokenizing it.
    """

    modality: str = "image"
    path: str = ""  # a folder, a file list, webdataset shards or one data file, as data.path
    format: FORMATS = "auto"
    weight: float = 1.0  # share of the samples drawn from this source, relative to the other sources
    loss_weight: float = 1.0  # this modality's loss counts this much in the weighted sum over modalities
    mask: Optional[MaskConfig] = None  # this modality's masks; none: the recipe's mask section
    target_norm: Optional[TargetNorm] = None  # this modality's target normalisation; none: loss.target_norm


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warm-up then cosine decay; weight decay on a cosine ramp."""

    lr: float = 1.0e-3  # peak learning rate for the global batch
    min_lr: float = 1.0e-6
    warmup_steps: int = 100
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0  # 0 disables clipping
    accum_steps: int = 1


@dataclass(frozen=True)
class EmaConfig:
    """Target-encoder momentum, raised from start to end on a cosine schedule."""

    momentum_start: float = 0.996
    momentum_end: float = 1.0


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    checkpoint_every: int = 200
    log_every: int = 20
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 where the GPU or CPU has bf16 matrix units
    threads: int = 0  # CPU threads for torch; 0 leaves torch's default
    compile: bool = False  # torch.compile the encoders and the predictor (docs/results.md: when it pays)
    collapse_std: float = 0.01  # warn when target feature std falls below this
    collapse_erank: float = 1.5  # ... or their effective rank (1 = every sample alike) falls below this
    progress: bool = True
    loggers: tuple[Literal["tensorboard", "wandb"], ...] = ()  # besides metrics.jsonl, which is always written
    keep_every: int = 0  # also keep the checkpoint of every N-th step as step_NNNNNNN.pt (0: only last.pt)


@dataclass(frozen=True)
class RunConfig:
    dir: str = "runs/image"
    resume: bool = True  # continue from dir/last.pt when it exists


def _default_sections() -> dict[str, Any]:
    return {name: spec.config() for name, spec in MODALITIES.items()}


# The recipe's own sections, in the order a recipe file lists them (modality sections after data).
_HEAD = ("modality", "sources", "data")
_TAIL = ("mask", "model", "loss", "optim", "ema", "train", "run")


@dataclass(frozen=True)
class Recipe:
    """A whole recipe. Each modality's section is an attribute (``recipe.audio``) held in ``sections``."""

    modality: str = "image"  # a modality of multijepa.modalities, or mixed (then sources lists them)
    sources: tuple[SourceConfig, ...] = ()  # modality: mixed: one entry per modality trained together
    data: DataConfig = field(default_factory=DataConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    sections: Mapping[str, Any] = field(default_factory=_default_sections)  # modality name -> its section

    def __hash__(self) -> int:  # the sections dict is not hashable by itself; its values are
        return hash((*(getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "sections"),
                     tuple(self.sections.items())))

    def __getattr__(self, name: str) -> Any:
        sections = self.__dict__.get("sections", {})
        if name in sections:
            return sections[name]
        raise AttributeError(f"a recipe has no section or attribute {name!r}")

    def section(self, modality: str) -> Any:
        """The recipe section of ``modality`` (its defaults where the file has none)."""
        return self.sections[modality]

    def with_section(self, modality: str, cfg: Any) -> "Recipe":
        """The recipe with ``modality``'s section replaced by ``cfg``."""
        return dataclasses.replace(self, sections={**self.sections, modality: cfg})

    @property
    def all_sources(self) -> tuple[SourceConfig, ...]:
        """Every source the model trains on: the sources of a mixed recipe, or the one source a
        single-modality recipe's ``data`` section describes."""
        if self.modality == "mixed":
            return self.sources
        return (SourceConfig(self.modality, self.data.path, self.data.format),)

    @property
    def modalities(self) -> tuple[str, ...]:
        """The modalities the model reads: the recipe's one, or every source's of a mixed recipe."""
        return tuple(s.modality for s in self.all_sources)

    def source(self, modality: str) -> "Recipe":
        """The single-modality recipe that reads, masks, tokenizes and scores ``modality``: the
        source's path in ``data``, its mask section and target normalisation (the recipe itself
        for a single-modality recipe).

        >>> r = load_recipe("multimodal")
        >>> r.source("audio").modality, r.source("audio").loss.target_norm
        ('audio', 'instance')
        """
        for src in self.all_sources:
            if src.modality == modality:
                if self.modality != "mixed":
                    return self
                data = dataclasses.replace(self.data, path=src.path, format=src.format)
                loss = dataclasses.replace(self.loss, target_norm=src.target_norm or self.loss.target_norm)
                return dataclasses.replace(self, modality=modality, sources=(), data=data, mask=src.mask or self.mask,
                                           loss=loss)
        if self.modality != "mixed":
            raise RecipeError(f"this recipe trains on {self.modality}; it has no {modality} source")
        raise RecipeError(f"the mixed recipe has no {modality} source (it has {', '.join(self.modalities)}); "
                          f"add one under 'sources'")


def recipe_to_dict(recipe: Recipe) -> dict:
    """The recipe as plain YAML-ready data, sections in file order (tuples become lists)."""
    out = {name: plain(getattr(recipe, name)) for name in _HEAD}
    out.update({name: plain(cfg) for name, cfg in recipe.sections.items()})
    out.update({name: plain(getattr(recipe, name)) for name in _TAIL})
    return out


def saved_modalities(raw: dict) -> list:
    """The modalities a recipe in plain data (a run's recipe.yaml, a checkpoint's) trains on, in source order.

    >>> saved_modalities({"modality": "mixed", "sources": [{"modality": "audio"}, {"modality": "image"}]})
    ['audio', 'image']
    """
    return [s.get("modality") for s in raw.get("sources") or []] or [raw.get("modality")]


def _upgrade(raw: dict) -> dict:
    """Recipes written before one key was made of two: ``loss.normalize_targets: false`` is
    ``loss.target_norm: none``; ``true`` kept ``loss.target_norm`` (checkpoints hold such recipes)."""
    loss = raw.get("loss")
    if isinstance(loss, dict) and "normalize_targets" in loss:
        loss = dict(loss)
        if loss.pop("normalize_targets") is False:
            loss["target_norm"] = "none"
        raw = {**raw, "loss": loss}
    return raw


def recipe_from_dict(raw: dict, where: str = "recipe") -> Recipe:
    """Build and validate a :class:`Recipe` from nested plain data."""
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: a recipe must be a mapping of sections, got {type(raw).__name__}")
    raw = _upgrade(raw)
    own = {k: v for k, v in raw.items() if k not in MODALITIES}
    sections = {name: build(spec.config, {} if raw.get(name) is None else _mapping(raw[name], name, where), name,
                            where) for name, spec in MODALITIES.items()}
    known = list(_HEAD) + list(MODALITIES) + list(_TAIL)
    if "worldmodel" in own:
        raise RecipeError(f"{where}: a world-model recipe (it has a worldmodel section), not a JEPA one: train it "
                          f"with multijepa pretrain, load it with multijepa.worldmodel.load_worldmodel_recipe")
    for key in own:
        if key not in known:
            hint = difflib.get_close_matches(str(key), known, n=1)
            extra = f" (did you mean '{hint[0]}'?)" if hint else f" (known keys: {', '.join(known)})"
            if isinstance(own[key], dict) and not hint:  # a section of a modality this process does not know
                extra = (f": no recipe section or modality of that name (modalities: {', '.join(MODALITIES)}); "
                         f"a modality of your own must be in multijepa.modalities.MODALITIES before its recipe loads")
            raise RecipeError(f"{where}: unknown key '{key}'{extra}")
    recipe = dataclasses.replace(build(Recipe, own, "", where), sections=sections)
    validate(recipe, where)
    return recipe


def _mapping(value: Any, key: str, where: str) -> dict:
    if not isinstance(value, dict):
        raise RecipeError(f"{where}: '{key}' must be a mapping of keys, got {value!r}")
    return value


def shipped_recipes() -> dict[str, Path]:
    """The recipes that ship inside the package (``multijepa/recipes/*.yaml``), by name, sorted.

    >>> sorted(shipped_recipes())[:3]
    ['audio', 'clips', 'frames']
    >>> shipped_recipes()["audio"].name
    'audio.yaml'
    """
    from importlib import resources  # lazily: only naming a shipped recipe needs it

    folder = resources.files("multijepa").joinpath("recipes")
    found = sorted(entry.name for entry in folder.iterdir() if entry.name.endswith(".yaml") and entry.is_file())
    return {name[:-len(".yaml")]: Path(str(folder.joinpath(name))) for name in found}


def _recipe_file(path: str | Path) -> Path:
    """The file ``load_recipe(path)`` reads: ``path`` itself where it is a file, else the shipped
    recipe it names (``audio``, ``audio.yaml`` or ``recipes/audio.yaml``)."""
    given = Path(path)
    if given.is_file():
        return given
    shipped = shipped_recipes()
    listed = ", ".join(shipped) or "none"
    what = "is a folder, not a recipe file" if given.is_dir() else "recipe file not found"
    parts = given.parts
    if len(parts) == 1 or (len(parts) == 2 and parts[0] == "recipes"):  # a name, not a path elsewhere
        name = given.name[:-len(".yaml")] if given.suffix == ".yaml" else given.name
        if name in shipped:
            return shipped[name]
        close = difflib.get_close_matches(name, shipped, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        example = close[0] if close else next(iter(shipped), "image")
        raise RecipeError(f"{path}: {what}, and no shipped recipe is named '{name}'{hint}. Shipped "
                          f"recipes: {listed}; pass one by name (e.g. `multijepa pretrain {example}`) or the path "
                          f"of a YAML recipe file")
    raise RecipeError(f"{path}: {what}; pass the path of a YAML recipe file or the name of a shipped recipe "
                      f"({listed})")


def load_recipe(path: str | Path, overrides: Optional[list[str]] = None) -> Recipe:
    """Load a YAML recipe, apply ``key.sub=value`` overrides, validate.

    Args:
        path: a YAML file, or the name of a recipe that ships with the package (``"audio"``,
            ``"audio.yaml"``, or ``"recipes/audio.yaml"`` where no such file is under the working
            directory); :func:`shipped_recipes` lists them.
        overrides: strings such as ``"train.steps=200"``.

    Raises:
        RecipeError: naming the file and the dotted key that is wrong, or, for a file that does
            not exist, the shipped recipes.

    >>> load_recipe("image", ["train.steps=5"]).train.steps
    5
    """
    return recipe_from_dict(*read_recipe_file(path, overrides))


def read_recipe_file(path: str | Path, overrides: Optional[list[str]] = None) -> tuple[dict, str]:
    """A recipe file's plain data with ``overrides`` applied, and the ``where`` its errors name (any kind of
    recipe: :func:`load_recipe` builds a JEPA one, :mod:`multijepa.worldmodel` a world-model one)."""
    path = _recipe_file(path)
    try:
        text = path.read_text()
    except FileNotFoundError:  # gone since _recipe_file looked
        raise RecipeError(f"{path}: recipe file not found") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of sections")
    where = str(path)
    if overrides:
        raw = apply_overrides(raw, overrides)
        where = f"{path} (with overrides {' '.join(overrides)})"
    return raw, where


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))


# --------------------------------------------------------------------------- validation


def token_grid(recipe: Recipe) -> tuple[int, ...]:
    """The token grid of the recipe's modality (e.g. ``(8, 8)`` for 32 px images in 4 px patches);
    point clouds have none (asking is a bug)."""
    spec = MODALITIES[recipe.modality]
    if spec.token_grid is None:
        raise AssertionError(f"modality {recipe.modality!r} has no token grid")
    return spec.token_grid(recipe.section(recipe.modality))


def source_counts(recipe: Recipe) -> list[int]:
    """Samples of each source in every batch with ``data.mix: proportion``: batch_size split by
    weight, the rounding remainder going to the largest fractions (ties: the earlier source).

    >>> r = Recipe(modality="mixed", sources=(SourceConfig("image", weight=2), SourceConfig("audio")))
    >>> source_counts(r)  # 64 split 2:1
    [43, 21]
    """
    sources = recipe.all_sources
    total = sum(s.weight for s in sources)
    exact = [recipe.data.batch_size * s.weight / total for s in sources]
    counts = [math.floor(x) for x in exact]
    by_fraction = sorted(range(len(exact)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_fraction[:recipe.data.batch_size - sum(counts)]:
        counts[i] += 1
    return counts


def _validate_sources(recipe: Recipe, where: str) -> None:
    check(len(recipe.sources) >= 1, where, "sources", "must list at least one modality with modality: mixed")
    check(not recipe.data.path, where, "data.path",
          "is not read with modality: mixed: each source has its own path (sources[i].path)")
    names = recipe.modalities
    for i, src in enumerate(recipe.sources):
        _check_modality(src.modality, where, f"sources[{i}].modality", mixed=False)
        check(names.count(src.modality) == 1, where, f"sources[{i}].modality",
              f"lists {src.modality} twice; one source per modality (one tokenizer each): put several folders "
              f"in one file list")
        check(src.weight > 0, where, f"sources[{i}].weight", f"must be positive, got {src.weight}")
        check(src.loss_weight >= 0, where, f"sources[{i}].loss_weight", f"must be 0 or more, got {src.loss_weight}")
    if recipe.data.mix == "proportion":
        for src, count in zip(recipe.sources, source_counts(recipe)):
            check(count >= 1, where, "data.batch_size",
                  f"gives source {src.modality} no sample per batch (weight {src.weight} of "
                  f"{sum(s.weight for s in recipe.sources)}); raise data.batch_size or its weight, "
                  f"or set data.mix: weights")


def _check_modality(name: str, where: str, key: str, mixed: bool) -> None:
    choices = list(MODALITIES) + (["mixed"] if mixed else [])
    if name not in choices:
        hint = difflib.get_close_matches(str(name), choices, n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise RecipeError(f"{where}: '{key}' must be one of {', '.join(map(repr, choices))}, got {name!r}{extra}")


def validate(recipe: Recipe, where: str) -> None:
    """Reject values no run could use, naming the dotted key and what would work."""
    _check_modality(recipe.modality, where, "modality", mixed=True)
    if recipe.modality == "mixed":
        _validate_sources(recipe, where)
    else:
        check(not recipe.sources, where, "sources",
              f"is for modality: mixed; a {recipe.modality} recipe reads data.path")
    d, o, t = recipe.data, recipe.optim, recipe.train
    check(d.batch_size > 0, where, "data.batch_size", "must be positive")
    check(d.num_workers >= 0, where, "data.num_workers", "must be 0 or more")
    check(0 <= d.max_bad_fraction <= 1, where, "data.max_bad_fraction", "must be in [0, 1]")
    check(d.bad_check_after >= 1, where, "data.bad_check_after", "must be at least 1")
    check(d.shuffle_buffer >= 1, where, "data.shuffle_buffer", "must be at least 1 (1: no shuffling within shards)")
    validate_model(recipe.model, where)
    validate_loss(recipe.loss, where)
    check(o.lr > 0 and 0 <= o.min_lr <= o.lr, where, "optim.lr", "needs 0 <= optim.min_lr <= optim.lr and lr > 0")
    check(o.accum_steps >= 1, where, "optim.accum_steps", "must be at least 1")
    check(o.grad_clip >= 0, where, "optim.grad_clip", "must be 0 (off) or positive")
    check(0 <= recipe.ema.momentum_start <= recipe.ema.momentum_end <= 1, where, "ema.momentum_start",
          "needs 0 <= momentum_start <= momentum_end <= 1")
    check(t.steps > 0, where, "train.steps", "must be positive")
    check(t.checkpoint_every > 0, where, "train.checkpoint_every", "must be positive")
    check(t.log_every > 0, where, "train.log_every", "must be positive")
    check(t.keep_every >= 0, where, "train.keep_every", "must be 0 (keep only last.pt) or a step count")
    check(len(set(t.loggers)) == len(t.loggers), where, "train.loggers", f"names a logger twice: {list(t.loggers)}")
    for name, spec in MODALITIES.items():  # every section, so a file never holds a value no run could use
        spec.validate(recipe.section(name), where)
    for i, src in enumerate(recipe.all_sources):
        try:
            MODALITIES[src.modality].validate_masks(recipe.section(src.modality), src.mask or recipe.mask, where)
        except RecipeError as e:  # name the source whose settings do not fit
            if recipe.modality != "mixed":
                raise
            raise RecipeError(f"{e} (checked for sources[{i}], {src.modality}"
                              f"{', whose mask section overrides the recipe' if src.mask else ''})") from None
