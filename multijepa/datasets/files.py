"""Samples from a folder, a file list or one data file: listing, decoding, the map-style data set.

A sample is a whole file, or one sample of a file that holds many (a .ts file). What a file of a
modality holds, and how it becomes a model input, is the modality table's word
(``multijepa.modalities``); this module only finds the files. Shards: ``multijepa.datasets.shards``;
training batches from one source or several: ``multijepa.datasets.mixed``.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch.utils.data import Dataset

from multijepa.errors import DataError, DecodeError
from multijepa.modalities import MODALITIES, all_extensions
from multijepa.readers import Source
from multijepa.recipe import Recipe, validate


def load_input(src: Source, recipe: Recipe, name: str = "", g: Optional[torch.Generator] = None,
               part: Optional[int] = None) -> torch.Tensor:
    """Decode and preprocess one sample for ``recipe.modality``; raises DecodeError naming the file.

    ``part`` picks one sample of a file that holds many (a series of a .ts file); None means the
    file is one sample.
    """
    return MODALITIES[recipe.modality].load(src, recipe.section(recipe.modality), name or str(src), part, g)


def valid_mask(inputs: torch.Tensor, recipe: Recipe) -> Optional[torch.Tensor]:
    """Valid tokens bool [B, N] of a stacked batch, or None for modalities without padding."""
    fn = MODALITIES[recipe.modality].valid_tokens
    return fn(inputs, recipe.section(recipe.modality)) if fn is not None else None


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (splitmix-style), stable across processes and Python runs."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


# --------------------------------------------------------------------------- listing


@dataclass
class FileIndex:
    """Samples with integer labels (-1 when unlabelled) and the class names behind them.

    A sample is a whole file, or, where ``parts`` is set, sample ``parts[i]`` of ``files[i]`` (a file
    that holds many: a .ts file, a wide CSV, a 2-D .npy), listed in file order.
    """

    files: list[str]
    labels: list[int]
    classes: list[str] = field(default_factory=list)
    parts: Optional[list[int]] = None  # None: every sample is a whole file


def list_folder(root: Union[str, Path], extensions: Sequence[str]) -> FileIndex:
    """Every file under ``root`` with one of ``extensions``, sorted.

    Files inside first-level sub-folders are labelled by that sub-folder's name (ImageFolder style);
    files directly in ``root`` are unlabelled.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder; set data.path to a folder, a file list or shards")
    exts = {e.lower() for e in extensions}
    found = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in exts)
    if not found:
        raise DataError(f"{root}: the folder holds no files of type {', '.join(sorted(exts))}; "
                        f"point data.path at a folder with such files")
    top = [p.relative_to(root).parts[0] if len(p.relative_to(root).parts) > 1 else None for p in found]
    classes = sorted({t for t in top if t is not None})
    index = {c: i for i, c in enumerate(classes)}
    return FileIndex([str(p) for p in found], [index[t] if t is not None else -1 for t in top], classes)


def _resolve(listfile: Path, entry: str) -> Path:
    return Path(entry) if Path(entry).is_absolute() else listfile.parent / entry


def read_filelist(path: Union[str, Path]) -> FileIndex:
    """A text file with one ``path [label]`` per line (paths relative to the list's folder; # comments)."""
    path = Path(path)
    files, names = [], []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        file, label = line, None
        # os.path.isfile, not Path.is_file: a line that cannot be a path (too long, a NUL) is no file, not an OSError.
        if not os.path.isfile(_resolve(path, line)) and len(line.split()) > 1:
            file, label = line.rsplit(maxsplit=1)
        if not os.path.isfile(_resolve(path, file)):
            raise DataError(f"{path}, line {lineno}: {file[:80]} does not exist")
        files.append(str(_resolve(path, file)))
        names.append(label)
    if not files:
        raise DataError(f"{path}: the file list is empty")
    classes = sorted({n for n in names if n is not None})
    index = {c: i for i, c in enumerate(classes)}
    return FileIndex(files, [index[n] if n is not None else -1 for n in names], classes)


LIST_SUFFIXES = (".txt", ".lst", ".csv")


def names_a_file(path: str) -> bool:
    """Whether the first entry of a possible file list (``path [label]``; # comments) is an existing file.

    A data file's first line (a row of numbers, however long) names no file: os.path.isfile is False for it.
    """
    with open(path, errors="replace") as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                return any(os.path.isfile(_resolve(Path(path), c)) for c in (line, line.rsplit(maxsplit=1)[0]))
    return False


def detect_format(recipe: Recipe) -> str:
    path, fmt = recipe.data.path, recipe.data.format
    if not path:
        raise DataError("data.path is not set: give it in the recipe or as data.path=FOLDER on the command line")
    if fmt != "auto":
        return fmt
    if (path.endswith(".tar") or "{" in path or "://" in path or path.startswith("pipe:")
            or (os.path.isdir(path) and glob.glob(os.path.join(path, "*.tar")))):
        return "shards"
    listish = path.lower().endswith(LIST_SUFFIXES)
    if os.path.isfile(path) and path.lower().endswith(MODALITIES[recipe.modality].extensions):
        # Also a list type (a time-series .csv, a point-cloud .txt): a list names files on its first line.
        return "filelist" if listish and names_a_file(path) else "file"
    if os.path.isfile(path) and listish:
        return "filelist"
    if os.path.isdir(path):
        return "folder"
    raise DataError(f"{path}: data.path does not exist (a folder, a .txt file list or .tar shards)")


def index_files(recipe: Recipe) -> FileIndex:
    """The samples of ``recipe.data``: every file, or every sample of files that hold many."""
    fmt = detect_format(recipe)
    if fmt == "filelist":
        index = read_filelist(recipe.data.path)
    elif fmt == "folder":
        index = list_folder(recipe.data.path, MODALITIES[recipe.modality].extensions)
    elif fmt == "file":
        if not os.path.isfile(recipe.data.path):
            raise DataError(f"{recipe.data.path}: no such file (data.format=file)")
        index = FileIndex([recipe.data.path], [-1])
    else:
        raise DataError(f"{recipe.data.path}: shards cannot be listed file by file; use a folder or file list")
    return expand_samples(index, recipe)


def expand_samples(index: FileIndex, recipe: Recipe) -> FileIndex:
    """One entry per sample for modalities whose files hold many; other indexes come back as they are.

    A sample's label is its in-file label (a .ts class label, a wide CSV's label column, an .npz's
    ``y``) where it has one, else its file's (the class sub-folder or the file list's label).
    """
    lister = MODALITIES[recipe.modality].list_samples
    if lister is None:
        return index
    files, parts, names = [], [], []
    for f, label in zip(index.files, index.labels):
        outer = index.classes[label] if label >= 0 else None
        for k, inner in enumerate(lister(f, recipe.section(recipe.modality))):
            files.append(f)
            parts.append(k)
            names.append(inner if inner is not None else outer)
    classes = sorted({n for n in names if n is not None})
    number = {c: i for i, c in enumerate(classes)}
    return FileIndex(files, [number[n] if n is not None else -1 for n in names], classes, parts)


IN_MEMORY = "<in-memory tensors>"  # the path a tensor source is recorded under in the run's recipe


def resolve_recipe(recipe: Recipe) -> Recipe:
    """The recipe with every source's from-the-data settings filled in (``timeseries.length: 0``),
    read from its training files and validated; unchanged where nothing waits for the data."""
    for src in recipe.all_sources:
        spec, source = MODALITIES[src.modality], recipe.source(src.modality)
        cfg = recipe.section(src.modality)
        waiting = " and ".join(spec.waits_for_data(cfg))
        if spec.from_data is None or not waiting:
            continue
        if source.data.path == IN_MEMORY:
            raise DataError(f"in-memory {src.modality} samples: set {waiting} in the recipe (left at 0 they are "
                            f"read from the training files, and these samples are no files)")
        if detect_format(source) == "shards":
            raise DataError(f"{source.data.path}: with shards, set {waiting} in the recipe (left at 0 they are read "
                            f"from the training files, which a stream cannot list)")
        resolved = spec.from_data(cfg, index_files(source).files, source.data.path)
        recipe = recipe.with_section(src.modality, resolved)
        validate(recipe, f"{source.data.path} (the {src.modality} settings taken from the data)")
    return recipe


def _is_filelist(path: str) -> bool:
    """Whether an existing file given to embed is a file list rather than data: a .lst (no data type)
    always is; a .txt or .csv (also data types: series tables, point arrays) when its first entry
    names an existing file, as ``data.path`` reads them."""
    suffix = Path(path).suffix.lower()
    if suffix not in LIST_SUFFIXES:
        return False
    if suffix not in all_extensions():
        return True
    try:
        return names_a_file(path)
    except OSError:  # unreadable: left to the reader, whose error names the file
        return False


def _folder_files(folder: Path, modalities: Sequence[str]) -> list[str]:
    """The files of ``modalities``' types under ``folder``, sorted as training lists a folder."""
    exts = sorted({e for m in modalities for e in MODALITIES[m].extensions})
    try:
        return list_folder(folder, exts).files
    except DataError:
        pass
    others = sorted({p.suffix.lower() or "(no extension)" for p in folder.rglob("*") if p.is_file()})
    holds = "it is empty" if not others else \
        f"it holds only {', '.join(others[:8])}{' ...' if len(others) > 8 else ''} files"
    what = "files multijepa reads" if set(modalities) == set(MODALITIES) else f"{' or '.join(modalities)} files"
    raise DataError(f"{folder}: no {what} in this folder or below (looked for {', '.join(exts)}); {holds}")


def expand_inputs(paths: Sequence[Union[str, Path]], modalities: Sequence[str]) -> list[str]:
    """The files to embed from files, folders and file lists, mixed freely, in the order given.

    A folder gives its files of ``modalities``' types (their specs' extensions), recursively, in sorted order;
    other files in it are left out. A file list (a .lst, or a .txt/.csv whose first entry names an
    existing file: one path per line, relative to the list's folder, # comments, as ``data.path``
    takes) gives its files in list order; labels after a path are ignored. Any other path is a
    file and comes back as given (a .txt or .csv of numbers is data).

    Args:
        paths: files, folders and file lists.
        modalities: the modalities whose file types a folder contributes (a model's ``modalities``).

    Returns:
        File paths, as strings.

    Raises:
        DataError: naming a folder without such files, a file list that cannot be read or names a
            missing file, or a path that does not exist and is no file type multijepa reads.
    """
    known = set(all_extensions())
    files: list[str] = []
    for path in map(str, paths):
        if os.path.isdir(path):
            files.extend(_folder_files(Path(path), modalities))
        elif os.path.isfile(path) and _is_filelist(path):
            try:
                files.extend(read_filelist(path).files)
            except (OSError, UnicodeDecodeError) as e:
                raise DataError(f"{path}: cannot read the file list ({getattr(e, 'strerror', None) or e})") \
                    from None
        elif not os.path.exists(path) and Path(path).suffix.lower() not in known:
            raise DataError(f"{path}: no such file or folder")
        else:
            files.append(path)  # a missing file of a known type is named by its reader
    return files


# --------------------------------------------------------------------------- map-style data


class FileDataset(Dataset):
    """Files decoded and preprocessed on demand.

    Indexed by ``(step, i)`` in training (random augmentation seeded by both) or by ``i`` for
    embedding. In training an undecodable file is replaced by the next one and reported in the
    sample's ``bad`` list; elsewhere the DecodeError propagates.
    """

    def __init__(self, index: FileIndex, recipe: Recipe, train: bool):
        self.index, self.recipe, self.train = index, recipe, train

    def __len__(self) -> int:
        return len(self.index.files)

    def __getitem__(self, key: Union[int, tuple[int, int]]) -> dict:
        step, i = key if isinstance(key, tuple) else (-1, key)
        bad: list[str] = []
        for attempt in range(len(self) if self.train else 1):
            j = (i + attempt) % len(self)
            g = torch.Generator().manual_seed(_mix(self.recipe.train.seed, step, j)) if self.train else None
            part = self.index.parts[j] if self.index.parts is not None else None
            try:
                x = load_input(self.index.files[j], self.recipe, g=g, part=part)
                return {"input": x, "label": self.index.labels[j], "step": step, "bad": bad}
            except DecodeError as e:
                if not self.train:
                    raise
                bad.append(str(e))
        raise DataError(f"{self.recipe.data.path}: no file in the data set could be decoded; first error: {bad[0]}")


