"""Errors a user can act on. The CLI prints their message without a traceback."""


class MultijepaError(Exception):
    """Base class: the message names what is wrong and what to do."""


class RecipeError(MultijepaError, ValueError):
    """A recipe key is unknown, of the wrong type or impossible; the message names file and key."""


class DecodeError(MultijepaError):
    """A file cannot be read as the modality it claims; the message names the file."""


class DataError(MultijepaError):
    """A data set is empty, unreadable or has too many bad files."""


class TrainingError(MultijepaError):
    """Training cannot go on (a NaN loss, a checkpoint that does not match the recipe)."""


def check(cond: bool, where: str, key: str, msg: str) -> None:
    """Raise a :class:`RecipeError` naming ``where`` and the dotted ``key`` unless ``cond``.

    >>> check(True, "recipe.yaml", "train.steps", "must be positive")
    """
    if not cond:
        raise RecipeError(f"{where}: '{key}' {msg}")


def check_range(rng: tuple[float, float], where: str, key: str, lo: float, hi: float) -> None:
    """Check that ``rng`` is ``[low, high]`` with ``lo <= low <= high <= hi``."""
    check(lo <= rng[0] <= rng[1] <= hi, where, key,
          f"must be [low, high] with {lo} <= low <= high <= {hi}, got {list(rng)}")


class MissingExtraError(MultijepaError, ImportError):
    """An optional dependency is not installed; the message names the ``pip install`` that adds it."""


# The import name of each optional dependency -> (its name on the package index, the extra that installs it).
EXTRAS = {
    "soundfile": ("soundfile", "audio"),
    "soxr": ("soxr", "audio"),
    "torchaudio": ("torchaudio", "audio"),
    "av": ("av", "video"),
    "open3d": ("open3d", "pointcloud"),
    "torch.utils.tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "huggingface_hub": ("huggingface_hub", "hub"),
    "gymnasium": ("gymnasium[mujoco]", "worldmodel"),
}


def require(module: str, needed_for: str):
    """Import an optional dependency, or raise :class:`MissingExtraError` naming what needs it and the
    ``pip install`` to run.

    >>> require("json", "this example").__name__
    'json'
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:  # also open3d installed without its system library (libusb-1.0)
        package, extra = EXTRAS.get(module, (module, "all"))
        raise MissingExtraError(f"{needed_for} needs the Python package {package}, which could not be imported "
                                f"({e}); install it with\n  pip install 'multijepa[{extra}]'\n(or "
                                f"pip install {package}; from a clone: pip install -e '.[{extra}]')") from None
