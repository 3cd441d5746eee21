"""Self-describing checkpoints, written atomically and read with ``weights_only=True``.

A checkpoint holds the model (context, target and predictor weights), the optimiser state, the
step (the schedules are functions of the step, so it is their whole state), RNG states, the
resolved recipe and the versions that wrote it. It alone is enough to rebuild the model and embed.
"""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Union

import torch

from multijepa._version import __version__
from multijepa.errors import MultijepaError

FORMAT = "multijepa-checkpoint-v1"


def versions() -> dict[str, str]:
    return {"multijepa": __version__, "torch": str(torch.__version__), "python": platform.python_version()}


def save_checkpoint(state: dict, path: Union[str, Path]) -> None:
    """Write ``state`` to ``path`` atomically: temp file in the same folder, fsync, rename, fsync folder.

    A crash at any moment leaves either the old checkpoint or the new one, never a torn file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, "versions": versions(), **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


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
