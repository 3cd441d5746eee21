"""Recipes: YAML files mapped one to one onto frozen dataclasses.

Defaults live only in these dataclasses. Loading is strict: an unknown key, a wrong type or an
impossible value raises :class:`RecipeError` naming the file and the dotted key. Command-line
overrides (``train.steps=200``) go through the same schema.

>>> r = load_recipe("recipes/image.yaml", overrides=["train.steps=10"])  # doctest: +SKIP
>>> r.train.steps  # doctest: +SKIP
10
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from multijepa.core.masking import check, check_range, validate_mask, validate_neighbourhood_mask
from multijepa.errors import RecipeError


@dataclass(frozen=True)
class DataConfig:
    """Where samples come from and how they are batched (shared by every modality)."""

    path: str = ""  # a folder, a file list (.txt, one path [label] per line), webdataset shards or one data file
    # auto: from the path; file: one data file that is a data set by itself (a .ts file, a wide CSV, a 2-D .npy)
    format: Literal["auto", "folder", "filelist", "shards", "file"] = "auto"
    batch_size: int = 64  # per process; the global batch is batch_size * world size
    num_workers: int = 2
    max_bad_fraction: float = 0.01  # stop training when more than this share of files fails to decode
    # modality: mixed: how each batch is split between the sources. proportion: the same share of
    # every batch (batch_size * weight / total weight, rounded); weights: each sample's source drawn
    # at random with probability weight / total weight.
    mix: Literal["proportion", "weights"] = "proportion"


@dataclass(frozen=True)
class ImageConfig:
    """Image decoding, augmentation and the 2D patch tokenizer."""

    size: int = 32  # square side in pixels after cropping
    channels: Literal[1, 3] = 3
    patch_size: int = 4
    crop_scale: tuple[float, float] = (0.3, 1.0)  # RandomResizedCrop area range in training
    hflip: bool = True
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class TimeSeriesConfig:
    """Time-series reading, cropping and windowing, and the 1D-CNN patch tokenizer.

    ``length`` and ``channels`` may be 0: pretraining then sets them from the training data before
    it builds the model, and the resolved values are saved with the run and its checkpoints.
    """

    length: int = 0  # window in samples; 0: the longest training series rounded up to whole patches (at most 512)
    channels: int = 0  # channels per series; 0: from the training data (every series must have the same count)
    patch_size: int = 4  # samples per token
    stride: int = 0  # hop between patches; 0: patch_size (non-overlapping); smaller values overlap
    channel_mode: Literal["independent", "mixed"] = "independent"  # independent: one token per (channel, patch)
    conv_widths: tuple[int, ...] = (32, 32)  # the convolution stack run inside each patch
    kernel_size: int = 3  # odd; zero padding inside the patch, so a token never sees a neighbouring patch
    instance_norm: bool = True  # each series (window) and channel to zero mean, unit variance: scales do not leak
    missing: Literal["interpolate", "zero", "error"] = "interpolate"  # NaN, ? or empty values inside a series
    csv_layout: Literal["long", "wide"] = "long"  # long: one series per file, rows = time, columns = channels
    # A class label column: auto is none for a .csv, first for a .txt/.tsv (the UCR archive's layout)
    csv_label_column: Literal["auto", "none", "first", "last"] = "auto"
    npz_split: Literal["train", "test", "all"] = "train"  # an .npz with X_train/X_test: the split read
    window_hop: int = 0  # embed: hop between windows of series longer than length; 0: length // 2


@dataclass(frozen=True)
class AudioConfig:
    """Audio decoding, clip length, log-mel features and the (freq, time) patch tokenizer.

    Files are resampled to ``sample_rate``; training crops (or zero-pads) each to ``clip_seconds`` at a
    random offset; ``embed`` covers a whole file with windows of ``embed_window_seconds`` every
    ``embed_hop_seconds``. Log-mel features are computed on the model's device from the waveforms.
    """

    sample_rate: int = 16000
    clip_seconds: float = 1.0  # training clip length
    channels: Literal["mix", "keep"] = "mix"  # mix: average to mono; keep: keep_channels channels
    keep_channels: int = 2  # with channels=keep: mono files are repeated, other counts are an error
    win_ms: float = 25.0  # STFT window (Hann) length
    hop_ms: float = 10.0  # STFT hop
    n_fft: int = 0  # 0: the next power of two >= the window length in samples
    n_mels: int = 64
    f_min: float = 0.0  # Hz
    f_max: float = 0.0  # Hz; 0 means sample_rate / 2
    top_db: float = 80.0  # floor each clip's log-mel at its maximum minus top_db; 0 disables
    # clip: zero mean, unit variance per clip; bins: the same per clip and mel bin over the clip's
    # frames; bin_means: each mel bin minus its mean over the clip's frames, / 10 dB; fixed: (dB -
    # norm_mean) / norm_std
    normalize: Literal["clip", "bins", "bin_means", "fixed", "none"] = "clip"
    norm_mean: float = -30.0  # dB, with normalize=fixed
    norm_std: float = 20.0  # dB, with normalize=fixed
    patch_size: tuple[int, int] = (16, 16)  # (mel bins, frames) per token
    speed_perturb: tuple[float, float] = (1.0, 1.0)  # training: play each clip faster/slower by a random factor
    embed_window_seconds: float = 0.0  # 0: audio.clip_seconds
    embed_hop_seconds: float = 0.0  # 0: half the embedding window

    @property
    def clip_samples(self) -> int:
        return max(1, round(self.clip_seconds * self.sample_rate))

    @property
    def win_length(self) -> int:
        return max(1, round(self.win_ms * self.sample_rate / 1000))

    @property
    def hop_length(self) -> int:
        return max(1, round(self.hop_ms * self.sample_rate / 1000))

    @property
    def fft_size(self) -> int:
        return self.n_fft or 1 << (self.win_length - 1).bit_length()

    @property
    def max_freq(self) -> float:
        return self.f_max or self.sample_rate / 2

    @property
    def model_channels(self) -> int:
        """Channels of every waveform the model sees."""
        return 1 if self.channels == "mix" else self.keep_channels

    @property
    def window_samples(self) -> int:
        """Samples in one embedding window."""
        return max(1, round((self.embed_window_seconds or self.clip_seconds) * self.sample_rate))

    @property
    def window_hop_samples(self) -> int:
        hop = self.embed_hop_seconds * self.sample_rate if self.embed_hop_seconds else self.window_samples / 2
        return max(1, round(hop))

    def frames(self, samples: int) -> int:
        """STFT frames for ``samples`` samples (centred frames, as torch.stft(center=True))."""
        return 1 + samples // self.hop_length


@dataclass(frozen=True)
class PointCloudConfig:
    """Point-cloud reading, augmentation and the farthest-point-sampling + kNN group tokenizer."""

    num_points: int = 1024  # points per cloud given to the tokenizer (and sampled from each mesh)
    mesh_sampling: Literal["uniform", "poisson"] = "uniform"  # how points are drawn from mesh surfaces
    features: tuple[Literal["normals", "colors"], ...] = ()  # per-point channels kept besides xyz
    num_groups: int = 64  # tokens per cloud: group centres picked by farthest point sampling
    group_size: int = 32  # points per group: each centre's k nearest neighbours (the centre included)
    pointnet_width: int = 128  # hidden width of the mini-PointNet that embeds each group
    pos_encoding: Literal["mlp", "fourier"] = "mlp"  # centre xyz -> position code: learned MLP or fixed
    up_axis: Literal["x", "y", "z"] = "z"  # the axis training rotations turn about
    rotate: bool = False  # training: random rotation about up_axis
    scale: tuple[float, float] = (0.8, 1.25)  # training: per-axis scale factor range; [1, 1] disables
    jitter: float = 0.01  # training: Gaussian noise std per coordinate (clipped at 3 std); 0 disables
    dropout: float = 0.0  # training: drop up to this share of points (refilled by repeats); 0 disables


@dataclass(frozen=True)
class VideoConfig:
    """Video decoding, clip sampling, augmentation and the 3D tubelet tokenizer.

    A clip is ``frames`` frames, every ``frame_stride``-th frame of the file, or, with ``fps`` > 0,
    the frames shown at ``fps`` sampling times (by timestamp, so variable frame rates work). Training
    takes one clip at a random start; ``embed`` pools ``embed_clips`` clips spread evenly over the file.
    """

    frames: int = 8  # frames per clip
    frame_stride: int = 2  # take every k-th frame (when fps is 0)
    fps: float = 0.0  # > 0: sample frames at this rate by their timestamps instead of frame_stride
    size: int = 64  # square side in pixels after cropping
    channels: Literal[1, 3] = 3
    tubelet_size: int = 2  # frames per token
    patch_size: int = 16  # pixels per token side: tokens are tubelet_size x patch_size x patch_size
    crop_scale: tuple[float, float] = (0.3, 1.0)  # training: one random resized crop per clip (area range)
    hflip: bool = True  # training: flip a clip's frames left-right with probability 0.5
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    backend: Literal["auto", "decord", "pyav"] = "auto"  # auto: decord where installed, else PyAV
    embed_clips: int = 4  # embed: clips spread evenly over a video, pooled (fewer for a short video)


@dataclass(frozen=True)
class MaskConfig:
    """Multi-block masking on the token grid (I-JEPA defaults).

    Point clouds have no grid: there a block is the ``scale`` share of group centres nearest a random
    seed centre, and the aspect and full-span settings do not apply.
    """

    num_targets: int = 4
    target_scale: tuple[float, float] = (0.15, 0.2)  # share of the grid covered by each target block
    target_aspect: tuple[float, float] = (0.75, 1.5)
    context_scale: tuple[float, float] = (0.85, 1.0)
    context_aspect: tuple[float, float] = (1.0, 1.0)
    min_context: int = 4  # fewest context tokens a sample may keep
    full_span_axes: tuple[int, ...] = ()  # grid axes every block spans entirely (video tubes, audio time spans)


Modality = Literal["image", "timeseries", "audio", "pointcloud", "video"]


@dataclass(frozen=True)
class SourceConfig:
    """One modality of a mixed recipe: where its samples come from and how much they count.

    The modality's own section (``image:``, ``audio:`` ...) configures reading and tokenizing it.
    """

    modality: Modality = "image"
    path: str = ""  # a folder, a file list, webdataset shards or one data file, as data.path
    format: Literal["auto", "folder", "filelist", "shards", "file"] = "auto"
    weight: float = 1.0  # share of the samples drawn from this source, relative to the other sources
    loss_weight: float = 1.0  # this modality's loss counts this much in the weighted sum over modalities
    mask: Optional[MaskConfig] = None  # this modality's masks; none: the recipe's mask section


@dataclass(frozen=True)
class ModelConfig:
    """Shared transformer core: context/target encoder and the narrow predictor."""

    dim: int = 192
    depth: int = 6
    heads: int = 3
    mlp_ratio: float = 4.0
    drop_path: float = 0.0
    predictor_dim: int = 96
    predictor_depth: int = 3
    predictor_heads: int = 3


@dataclass(frozen=True)
class LossConfig:
    """Latent prediction loss and the optional second collapse guard."""

    type: Literal["l1", "l2", "smooth_l1"] = "smooth_l1"
    normalize_targets: bool = True  # normalise target features before the loss (how: target_norm)
    # layer: each token's features (I-JEPA); instance: each feature over a sample's real tokens, which
    # removes what is constant across the sample (a speaker, a recording), as data2vec does for speech
    target_norm: Literal["layer", "instance"] = "layer"
    regularizer: Literal["none", "sigreg", "vicreg"] = "none"
    regularizer_weight: float = 0.05
    sigreg_directions: int = 256


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
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    threads: int = 0  # CPU threads for torch; 0 leaves torch's default
    collapse_std: float = 0.01  # warn when target feature std falls below this
    progress: bool = True


@dataclass(frozen=True)
class RunConfig:
    dir: str = "runs/image"
    resume: bool = True  # continue from dir/last.pt when it exists


@dataclass(frozen=True)
class Recipe:
    modality: Literal["image", "timeseries", "audio", "pointcloud", "video", "mixed"] = "image"
    sources: tuple[SourceConfig, ...] = ()  # modality: mixed: one entry per modality trained together
    data: DataConfig = field(default_factory=DataConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    timeseries: TimeSeriesConfig = field(default_factory=TimeSeriesConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    pointcloud: PointCloudConfig = field(default_factory=PointCloudConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)

    @property
    def modalities(self) -> tuple[str, ...]:
        """The modalities the model reads: the recipe's one, or every source's of a mixed recipe."""
        return tuple(s.modality for s in self.sources) if self.modality == "mixed" else (self.modality,)

    def source(self, modality: str) -> "Recipe":
        """The single-modality recipe that reads, masks and tokenizes ``modality`` of a mixed recipe
        (the recipe itself when it is not mixed): the source's path in ``data`` and its mask section.

        >>> r = load_recipe("recipes/multimodal.yaml")  # doctest: +SKIP
        >>> r.source("audio").modality, r.source("audio").data.path  # doctest: +SKIP
        ('audio', '../shared/data/audio/fsdd-dev')
        """
        if self.modality != "mixed":
            if modality != self.modality:
                raise RecipeError(f"this is a {self.modality} recipe; it has no {modality} source")
            return self
        for src in self.sources:
            if src.modality == modality:
                data = dataclasses.replace(self.data, path=src.path, format=src.format)
                return dataclasses.replace(self, modality=modality, sources=(), data=data, mask=src.mask or self.mask)
        raise RecipeError(f"the mixed recipe has no {modality} source (it has {', '.join(self.modalities)}); "
                          f"add one under 'sources'")


# --------------------------------------------------------------------------- conversion


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_type_name(args[0])}"
        return f"a list of {len(args)} ({', '.join(_type_name(a) for a in args)})"
    return getattr(tp, "__name__", str(tp))


# A number as people write it: 1e-3, 3E-4, 1_000, .5, -2.5e+3 (YAML 1.1 reads the exponent forms
# without a dot as strings, so the schema parses them where it asks for a number).
_NUMBER = re.compile(r"[-+]?(\d(_?\d)*(\.(\d(_?\d)*)?)?|\.\d(_?\d)*)([eE][-+]?\d+)?")


def _number(value: Any) -> Optional[Union[int, float]]:
    """``value`` as an int or float if it is one or a string spelling one (finite), else None.

    >>> _number("1e-3"), _number("1_000"), _number(".5"), _number(7), _number("x"), _number(True)
    (0.001, 1000, 0.5, 7, None, None)
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        text = value.strip().replace("_", "")
        return int(text) if text.lstrip("+-").isdigit() else float(text)
    return None


def _convert(value: Any, tp: Any, key: str, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it in the dataclass's form."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: '{key}' must be a mapping of keys, got {value!r}")
        return _build(tp, value, key, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], key, where)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            hint = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise RecipeError(f"{where}: '{key}' must be one of {', '.join(map(repr, choices))}, "
                              f"got {value!r}{extra}")
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{where}: '{key}' must be {_type_name(tp)}, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{key}[{i}]", where) for i, v in enumerate(value))
        if len(value) != len(args):
            raise RecipeError(f"{where}: '{key}' must be {_type_name(tp)}, got {len(value)} values")
        return tuple(_convert(v, a, f"{key}[{i}]", where) for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{where}: '{key}' must be true or false, got {value!r}")
        return value
    if tp is int:
        number = _number(value)
        if number is None or not math.isfinite(number) or number != int(number):
            raise RecipeError(f"{where}: '{key}' must be an integer, got {value!r}")
        return int(number)
    if tp is float:
        number = _number(value)
        if number is None:
            raise RecipeError(f"{where}: '{key}' must be a number, got {value!r}")
        return float(number)
    if tp is str:
        if not isinstance(value, str):
            raise RecipeError(f"{where}: '{key}' must be a string, got {value!r}")
        return value
    raise TypeError(f"recipe schema uses an unsupported type {tp!r} at {key}")  # a bug in this file


def _build(cls: type, raw: dict, prefix: str, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            dotted = f"{prefix}.{key}" if prefix else str(key)
            hint = difflib.get_close_matches(str(key), names, n=1)
            extra = f" (did you mean '{hint[0]}'?)" if hint else f" (known keys: {', '.join(names)})"
            raise RecipeError(f"{where}: unknown key '{dotted}'{extra}")
    kwargs = {}
    for name in names:
        if name in raw:
            dotted = f"{prefix}.{name}" if prefix else name
            kwargs[name] = _convert(raw[name], hints[name], dotted, where)
    return cls(**kwargs)


def recipe_to_dict(recipe: Recipe) -> dict:
    """The recipe as plain YAML-ready data (tuples become lists)."""

    def plain(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(dataclasses.asdict(recipe))


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Set ``a.b.c=value`` strings into a nested dict; the value is parsed as YAML."""
    raw = _deep_copy(raw)
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"command line: override {item!r} must look like key.sub=value")
        dotted, text = item.split("=", 1)
        parts = dotted.strip().split(".")
        node = raw
        for part in parts[:-1]:
            child = _list_entry(node, part, dotted) if isinstance(node, list) else node.setdefault(part, {})
            if not isinstance(child, (dict, list)):
                raise RecipeError(f"command line: '{dotted}' goes inside '{part}', which is not a section")
            node = child
        if isinstance(node, list):
            raise RecipeError(f"command line: '{dotted}' names an entry of a list; set one of its keys, "
                              f"e.g. {dotted}.path=...")
        try:
            node[parts[-1]] = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as e:
            raise RecipeError(f"command line: cannot parse the value of '{dotted}': {e}") from None
    return raw


def _list_entry(entries: list, part: str, dotted: str) -> dict:
    """The entry of a list section (``sources``) that an override names by index or by modality:
    ``sources.0.path=...`` or ``sources.audio.path=...``."""
    if part.isdigit() and int(part) < len(entries):
        return entries[int(part)]
    named = [e for e in entries if isinstance(e, dict) and e.get("modality") == part]
    if len(named) == 1:
        return named[0]
    names = [str(e.get("modality")) for e in entries if isinstance(e, dict)]
    raise RecipeError(f"command line: '{dotted}': no entry '{part}' in the list (entries 0-{len(entries) - 1}: "
                      f"{', '.join(names)}); name one by index or modality")


def _deep_copy(d):
    if isinstance(d, list):
        return [_deep_copy(v) for v in d]
    return {k: _deep_copy(v) for k, v in d.items()} if isinstance(d, dict) else d


def recipe_from_dict(raw: dict, where: str = "recipe") -> Recipe:
    """Build and validate a :class:`Recipe` from nested plain data."""
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: a recipe must be a mapping of sections, got {type(raw).__name__}")
    recipe = _build(Recipe, raw, "", where)
    validate(recipe, where)
    return recipe


def shipped_recipes() -> dict[str, Path]:
    """The recipes that ship inside the package (``multijepa/recipes/*.yaml``), by name, sorted.

    >>> sorted(shipped_recipes())[:2]
    ['audio', 'image']
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
    return recipe_from_dict(raw, where)


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))


# --------------------------------------------------------------------------- validation


def patch_stride(ts: TimeSeriesConfig) -> int:
    """The hop between time-series patches (``stride``, or ``patch_size`` when stride is 0)."""
    return ts.stride or ts.patch_size


def shape_from_data(recipe: Recipe) -> bool:
    """True while a time-series recipe still waits for its length or channel count from the data."""
    return recipe.modality == "timeseries" and not (recipe.timeseries.length and recipe.timeseries.channels)


def token_grid(recipe: Recipe) -> tuple[int, ...]:
    """The token grid shape the recipe's tokenizer produces.

    Image: ``(rows, cols)``, e.g. ``(8, 8)`` for 32 px / patch 4. Video: ``(t, rows, cols)``, e.g.
    ``(4, 4, 4)`` for 8 frames of 64 px in 2 x 16 x 16 tubelets. Time series: ``(patches,)`` with
    mixed channels, ``(channels, patches)`` with channel-independent tokens. Audio: ``(freq, time)``.
    Point clouds have no grid (their tokens are groups around sampled centres): asking is a bug.
    """
    if recipe.modality == "image":
        side = recipe.image.size // recipe.image.patch_size
        return (side, side)
    if recipe.modality == "timeseries":
        ts = recipe.timeseries
        if shape_from_data(recipe):
            raise RecipeError("timeseries.length or timeseries.channels is 0 (set from the data when pretraining "
                              "starts); the token grid is not known yet")
        patches = (ts.length - ts.patch_size) // patch_stride(ts) + 1
        return (ts.channels, patches) if ts.channel_mode == "independent" else (patches,)
    if recipe.modality == "audio":
        a = recipe.audio
        return (a.n_mels // a.patch_size[0], a.frames(a.clip_samples) // a.patch_size[1])
    if recipe.modality == "video":
        v = recipe.video
        side = v.size // v.patch_size
        return (v.frames // v.tubelet_size, side, side)
    raise AssertionError(f"modality {recipe.modality!r} has no token grid")


def validate_pointcloud(p: PointCloudConfig, where: str) -> None:
    check(p.num_points >= 2, where, "pointcloud.num_points", "must be at least 2")
    check(2 <= p.num_groups <= p.num_points, where, "pointcloud.num_groups",
          f"must be between 2 and pointcloud.num_points={p.num_points}, got {p.num_groups}")
    check(1 <= p.group_size <= p.num_points, where, "pointcloud.group_size",
          f"must be between 1 and pointcloud.num_points={p.num_points}, got {p.group_size}")
    check(p.pointnet_width >= 1, where, "pointcloud.pointnet_width", "must be positive")
    check(len(set(p.features)) == len(p.features), where, "pointcloud.features", "lists a feature twice")
    check(0 < p.scale[0] <= p.scale[1], where, "pointcloud.scale",
          f"must be [low, high] with 0 < low <= high, got {list(p.scale)}")
    check(p.jitter >= 0, where, "pointcloud.jitter", "must be 0 (off) or positive")
    check(0 <= p.dropout < 1, where, "pointcloud.dropout", "must be in [0, 1)")


def validate_video(v: VideoConfig, where: str) -> None:
    check(v.frames >= 1, where, "video.frames", "must be at least 1")
    check(v.tubelet_size >= 1 and v.frames % v.tubelet_size == 0, where, "video.tubelet_size",
          f"must divide video.frames={v.frames} (tokens are tubelet_size frames deep), got {v.tubelet_size}")
    check(v.patch_size >= 1 and v.size % v.patch_size == 0, where, "video.patch_size",
          f"must divide video.size={v.size}, got {v.patch_size}")
    check(v.frame_stride >= 1, where, "video.frame_stride", "must be at least 1 (1 = every frame)")
    check(v.fps >= 0, where, "video.fps", "must be 0 (use video.frame_stride) or a positive rate")
    check(v.embed_clips >= 1, where, "video.embed_clips", "must be at least 1")
    check(len(v.mean) == v.channels and len(v.std) == v.channels, where, "video.mean",
          f"video.mean and video.std need {v.channels} values (one per channel)")
    check_range(v.crop_scale, where, "video.crop_scale", 0.01, 1.0)


def _validate_timeseries(ts: TimeSeriesConfig, where: str) -> None:
    check(ts.patch_size >= 1, where, "timeseries.patch_size", "must be at least 1")
    check(0 <= ts.stride <= ts.patch_size, where, "timeseries.stride",
          f"must be 0 (= patch_size) or between 1 and patch_size={ts.patch_size} (a larger hop would skip "
          f"samples), got {ts.stride}")
    check(ts.channels >= 0, where, "timeseries.channels", "must be 0 (from the data) or positive")
    check(ts.length >= 0, where, "timeseries.length", "must be 0 (from the data) or positive")
    stride = patch_stride(ts)
    if ts.length:
        fits = ts.length >= ts.patch_size and (ts.length - ts.patch_size) % stride == 0
        nearest = ts.patch_size + max(0, math.ceil((ts.length - ts.patch_size) / stride)) * stride
        check(fits, where, "timeseries.length",
              f"must be patch_size + k * stride so patches tile the window (patch_size={ts.patch_size}, "
              f"stride={stride}); got {ts.length}, try {nearest}")
    check(len(ts.conv_widths) >= 1 and all(w >= 1 for w in ts.conv_widths), where, "timeseries.conv_widths",
          f"must list one or more positive channel widths, got {list(ts.conv_widths)}")
    check(ts.kernel_size >= 1 and ts.kernel_size % 2 == 1, where, "timeseries.kernel_size",
          f"must be odd and positive (same-size padding inside a patch), got {ts.kernel_size}")
    check(ts.window_hop >= 0 and (not ts.length or ts.window_hop <= ts.length), where, "timeseries.window_hop",
          f"must be 0 (= length // 2) or between 1 and timeseries.length={ts.length}, got {ts.window_hop}")
    check(ts.csv_label_column in ("auto", "none") or ts.csv_layout == "wide", where, "timeseries.csv_label_column",
          "needs timeseries.csv_layout: wide (a long CSV holds one series, so it has no label column; .txt and "
          ".tsv files are always wide)")


def _validate_mixed(recipe: Recipe, where: str) -> None:
    check(len(recipe.sources) >= 1, where, "sources", "must list at least one modality with modality: mixed")
    check(not recipe.data.path, where, "data.path",
          "is not read with modality: mixed: each source has its own path (sources[i].path)")
    names = recipe.modalities
    for i, src in enumerate(recipe.sources):
        check(names.count(src.modality) == 1, where, f"sources[{i}].modality",
              f"lists {src.modality} twice; one source per modality (one tokenizer each): put several folders "
              f"in one file list")
        check(src.weight > 0, where, f"sources[{i}].weight", f"must be positive, got {src.weight}")
        check(src.loss_weight >= 0, where, f"sources[{i}].loss_weight", f"must be 0 or more, got {src.loss_weight}")
        try:
            validate(recipe.source(src.modality), where)
        except RecipeError as e:  # name the source whose settings do not fit
            raise RecipeError(f"{e} (checked for sources[{i}], {src.modality}"
                              f"{', whose mask section overrides the recipe' if src.mask else ''})") from None
    if recipe.data.mix == "proportion":
        for src, count in zip(recipe.sources, source_counts(recipe)):
            check(count >= 1, where, "data.batch_size",
                  f"gives source {src.modality} no sample per batch (weight {src.weight} of "
                  f"{sum(s.weight for s in recipe.sources)}); raise data.batch_size or its weight, "
                  f"or set data.mix: weights")


def source_counts(recipe: Recipe) -> list[int]:
    """Samples of each source in every batch with ``data.mix: proportion``: batch_size split by
    weight, the rounding remainder going to the largest fractions (ties: the earlier source).

    >>> r = Recipe(modality="mixed", sources=(SourceConfig("image", weight=2), SourceConfig("audio")))
    >>> source_counts(r)  # 64 split 2:1
    [43, 21]
    """
    total = sum(s.weight for s in recipe.sources)
    exact = [recipe.data.batch_size * s.weight / total for s in recipe.sources]
    counts = [math.floor(x) for x in exact]
    by_fraction = sorted(range(len(exact)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_fraction[:recipe.data.batch_size - sum(counts)]:
        counts[i] += 1
    return counts


def validate(recipe: Recipe, where: str) -> None:
    """Reject values no run could use, naming the dotted key and what would work."""
    if recipe.modality == "mixed":
        _validate_mixed(recipe, where)
        return
    check(not recipe.sources, where, "sources", f"is for modality: mixed; a {recipe.modality} recipe reads data.path")
    im, m, mo, o, t = recipe.image, recipe.mask, recipe.model, recipe.optim, recipe.train
    check(im.patch_size > 0 and im.size % im.patch_size == 0, where, "image.patch_size",
           f"must divide image.size={im.size}, got {im.patch_size}")
    check(len(im.mean) == im.channels and len(im.std) == im.channels, where, "image.mean",
           f"image.mean and image.std need {im.channels} values (one per channel)")
    check_range(im.crop_scale, where, "image.crop_scale", 0.01, 1.0)
    check(recipe.data.batch_size > 0, where, "data.batch_size", "must be positive")
    check(recipe.data.num_workers >= 0, where, "data.num_workers", "must be 0 or more")
    check(0 <= recipe.data.max_bad_fraction <= 1, where, "data.max_bad_fraction", "must be in [0, 1]")
    check(mo.dim % mo.heads == 0 and (mo.dim // mo.heads) % 2 == 0, where, "model.heads",
           f"must divide model.dim={mo.dim} into even-sized heads, got {mo.heads}")
    check(mo.predictor_dim % mo.predictor_heads == 0, where, "model.predictor_heads",
           f"must divide model.predictor_dim={mo.predictor_dim}")
    check(mo.depth > 0 and mo.predictor_depth > 0, where, "model.depth", "depths must be positive")
    check(0 <= mo.drop_path < 1, where, "model.drop_path", "must be in [0, 1)")
    check(o.lr > 0 and 0 <= o.min_lr <= o.lr, where, "optim.lr", "needs 0 <= optim.min_lr <= optim.lr and lr > 0")
    check(o.accum_steps >= 1, where, "optim.accum_steps", "must be at least 1")
    check(o.grad_clip >= 0, where, "optim.grad_clip", "must be 0 (off) or positive")
    check(0 <= recipe.ema.momentum_start <= recipe.ema.momentum_end <= 1, where, "ema.momentum_start",
           "needs 0 <= momentum_start <= momentum_end <= 1")
    check(t.steps > 0, where, "train.steps", "must be positive")
    check(t.checkpoint_every > 0, where, "train.checkpoint_every", "must be positive")
    check(t.log_every > 0, where, "train.log_every", "must be positive")
    check(recipe.loss.regularizer_weight >= 0, where, "loss.regularizer_weight", "must be 0 or more")
    from multijepa.tokenizers.audio import validate_audio  # lazily: the tokenizers import this module

    validate_audio(recipe.audio, where)
    _validate_timeseries(recipe.timeseries, where)
    validate_pointcloud(recipe.pointcloud, where)
    validate_video(recipe.video, where)
    if shape_from_data(recipe):
        # The grid is known once pretraining reads the data, which validates the mask again then; its
        # number of axes is known now, so axis settings are checked on a stand-in grid of that rank.
        stand_in = (max(recipe.timeseries.channels, 1), 64) if recipe.timeseries.channel_mode == "independent" else (64,)
        validate_mask(m, stand_in, where)
        return
    if recipe.modality == "pointcloud":
        validate_neighbourhood_mask(m, recipe.pointcloud.num_groups, where)
    else:
        validate_mask(m, token_grid(recipe), where)
