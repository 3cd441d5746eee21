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
