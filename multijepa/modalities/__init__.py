"""The modality table: one :class:`~multijepa.spec.ModalitySpec` per modality, each from its own module.

Everything that depends on the modality (readers, transforms, tokenizers, masks, recipe sections
and their validation, embedding views) is looked up here, by the modality's name.

>>> sorted(MODALITIES)
['audio', 'image', 'pointcloud', 'timeseries', 'video']
>>> readers_of("a.npy"), modality_of("cat.JPG")
(['timeseries', 'pointcloud'], 'image')
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

from multijepa.errors import DecodeError
from multijepa.modalities import audio, image, pointcloud, timeseries, video
from multijepa.spec import ModalitySpec

# One explicit entry per modality, in the order recipe sections are written.
MODALITIES: dict[str, ModalitySpec] = {
    "image": image.SPEC,
    "timeseries": timeseries.SPEC,
    "audio": audio.SPEC,
    "pointcloud": pointcloud.SPEC,
    "video": video.SPEC,
}


def all_extensions() -> tuple[str, ...]:
    """Every file type some modality reads, each once, in table order."""
    return tuple(dict.fromkeys(e for spec in MODALITIES.values() for e in spec.extensions))


def readers_of(path: Union[str, Path]) -> list[str]:
    """Every modality that reads a file of this extension (none, one, or several for ``.npy``)."""
    suffix = Path(path).suffix.lower()
    return [name for name, spec in MODALITIES.items() if suffix in spec.extensions]


def modality_of(path: Union[str, Path]) -> str:
    """The modality a file belongs to, from its extension.

    Raises DecodeError for an unknown extension, and for one that several modalities read (a
    ``.npy`` array can be a point cloud or another modality's data): then a checkpoint decides.
    """
    suffix = Path(path).suffix.lower()
    found = readers_of(path)
    if len(found) == 1:
        return found[0]
    if found:
        raise DecodeError(f"{path}: a {suffix} file can be {' or '.join(found)} data; pass --checkpoint "
                          f"to say which model reads it")
    raise DecodeError(f"{path}: unknown file type {suffix or '(no extension)'!r}; multijepa reads "
                      f"{', '.join(all_extensions())}")
