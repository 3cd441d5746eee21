"""Self-describing checkpoints, written atomically and read with ``weights_only=True``.

A checkpoint holds the model (context, target and predictor weights), the optimiser state, the
step (the schedules are functions of the step, so it is their whole state), RNG states, the
resolved recipe and the versions that wrote it. It alone is enough to rebuild the model and embed.
"""

from __future__ import annotations

import os
import platform
import secrets
import shutil
from pathlib import Path
from typing import BinaryIO, Callable, Union

import torch

from multijepa._version import __version__
from multijepa.errors import MultijepaError

FORMAT = "multijepa-checkpoint-v1"


def versions() -> dict[str, str]:
    return {"multijepa": __version__, "torch": str(torch.__version__), "python": platform.python_version()}


def write_atomically(path: Union[str, Path], write: Callable[[BinaryIO], None]) -> None:
    """Write a file atomically: ``write(f)`` into a temp file in the same folder (made as a plain
    ``open`` would, 0o666 less the umask), fsync, rename over ``path``, fsync the folder.

    A crash at any moment leaves either the old file or the new one, never a torn one. Checkpoints,
    exports and plots are written through it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_checkpoint(state: dict, path: Union[str, Path]) -> None:
    """Write ``state`` (with the format and versions) to ``path`` atomically (:func:`write_atomically`)."""
    write_atomically(path, lambda f: torch.save({"format": FORMAT, "versions": versions(), **state}, f))


def load_checkpoint(path: Union[str, Path]) -> dict:
    """Read a checkpoint safely (no pickled code); raises MultijepaError naming the file if unusable."""
    path = Path(path)
    if not path.is_file():
        raise MultijepaError(f"{path}: no such checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a torn or foreign file
        raise MultijepaError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise MultijepaError(f"{path}: not a multijepa checkpoint (format {state.get('format') if isinstance(state, dict) else '?'})")
    return state


def keep_copy(path: Union[str, Path], copy: Union[str, Path]) -> None:
    """Keep ``path`` as it is now under the name ``copy`` (a milestone checkpoint, ``train.keep_every``):
    a hard link where the file system has them (no extra space; ``save_checkpoint`` replaces ``path``
    with a new file, so the link keeps the old one), else a copy; either way atomically."""
    path, copy = Path(path), Path(copy)
    tmp = copy.with_name(f".{copy.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(path, tmp)
    except OSError:  # no hard links here (some network and FAT file systems)
        shutil.copyfile(path, tmp)
    os.replace(tmp, copy)
