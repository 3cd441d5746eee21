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
