"""Data sets from a folder, a file list or webdataset shards, and the training loader around them.

Training order is a function of (seed, step) alone: a step-indexed batch sampler walks an endless
chain of per-epoch permutations, every sample's augmentation is seeded by (seed, step, index) and
every batch's masks by (seed, step, rank). A resumed run therefore sees exactly the batches an
uninterrupted run would have, for any worker count. Shards stream instead (see ShardDataset).
"""

from __future__ import annotations

import functools
import glob
import io
import json
import os
import tarfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from multijepa.core.masking import sample_block_masks, sample_neighbourhood_masks
from multijepa.datasets.readers import EXTENSIONS, Source, read_audio, read_image, read_points
from multijepa.datasets.series import series_labels
from multijepa.datasets.shards import ShardLost, shard_samples
from multijepa.datasets.timeseries import resolve_shape, series_sample, series_views
from multijepa.datasets.transforms import audio_transform, audio_windows, image_transform, pointcloud_transform
from multijepa.datasets.video import read_clips
from multijepa.errors import DataError, DecodeError
from multijepa.recipe import MaskConfig, PointCloudConfig, Recipe, patch_stride, shape_from_data, token_grid
from multijepa.tokenizers.audio import audio_valid_tokens
from multijepa.tokenizers.pointcloud import group_points
from multijepa.tokenizers.timeseries import valid_tokens


def _points(src: Source, r: Recipe, name: str, g: Optional[torch.Generator]) -> torch.Tensor:
    p = r.pointcloud
    return pointcloud_transform(read_points(src, name, p.num_points, p.mesh_sampling), p, g, name)


# How a recipe turns one sample into a model input: (file path or bytes, recipe, name for errors,
# part = which sample of a many-sample file or None for a one-sample file, generator or None for
# deterministic) -> tensor.
LOADERS: dict[str, Callable[[Source, Recipe, str, Optional[int], Optional[torch.Generator]], torch.Tensor]] = {
    "image": lambda src, r, name, part, g: image_transform(read_image(src, r.image.channels, name), r.image, g),
    "timeseries": series_sample,
    "audio": lambda src, r, name, part, g: audio_transform(
        read_audio(src, r.audio.sample_rate, r.audio.model_channels, name), r.audio, g),
    "pointcloud": lambda src, r, name, part, g: _points(src, r, name, g),
    "video": lambda src, r, name, part, g: read_clips(src, r.video, name, g)[0],
}

# How a recipe turns one file (or a tensor) into embedding inputs: per sample in file order, its
# views (crops, windows), whose features are pooled into the sample's one vector. Tensors are taken
# as model inputs (an image [C, H, W], a cloud [P, 3 + F]), except raw series and waveforms.
EMBED_VIEWS: dict[str, Callable[[Union[Source, torch.Tensor], Recipe, str], list[list[torch.Tensor]]]] = {
    "image": lambda item, r, name: [[item if isinstance(item, torch.Tensor) else
                                     image_transform(read_image(item, r.image.channels, name), r.image, None)]],
    "timeseries": series_views,
    "audio": lambda item, r, name: [list(_audio_windows(item, r) if isinstance(item, torch.Tensor) else
                                         audio_transform(read_audio(item, r.audio.sample_rate, r.audio.model_channels,
                                                                    name), r.audio, None))],
    "pointcloud": lambda item, r, name: [[item if isinstance(item, torch.Tensor) else _points(item, r, name, None)]],
    # A video: clips spread evenly over it (video.embed_clips); a tensor is one clip [C, T, H, W] or
    # several [K, C, T, H, W].
    "video": lambda item, r, name: [list(item if item.ndim == 5 else item[None]) if isinstance(item, torch.Tensor)
                                    else read_clips(item, r.video, name, None, r.video.embed_clips)],
}


def _audio_windows(x: torch.Tensor, r: Recipe) -> torch.Tensor:
    """An audio tensor as embedding windows: a waveform [C, S] is cut like a file; [W, C, L] is taken as is."""
    if x.ndim == 3:
        return x
    return audio_windows(x, r.audio.window_samples, r.audio.window_hop_samples, r.audio.hop_length * r.audio.patch_size[1])


# Modalities whose files can hold many samples (a .ts file, a wide CSV, a 2-D .npy): path ->
# each sample's in-file label (None where the file has none), in file order.
SAMPLE_LISTERS: dict[str, Callable[[str, Recipe], list[Optional[str]]]] = {
    "timeseries": lambda path, r: series_labels(path, r.timeseries),
}

# Modalities whose inputs can hold padding: a stacked batch of inputs -> valid tokens bool [B, N].
VALID_TOKENS: dict[str, Callable[[torch.Tensor, Recipe], torch.Tensor]] = {
    "timeseries": lambda x, r: valid_tokens(x, r.timeseries.patch_size, patch_stride(r.timeseries),
                                            r.timeseries.channel_mode == "independent"),
    "audio": lambda x, r: audio_valid_tokens(x, r.audio),
}

# Modalities with settings taken from the data (0 = from the data): (recipe, index) -> resolved recipe.
RESOLVERS: dict[str, Callable[[Recipe, "FileIndex"], Recipe]] = {
    "timeseries": lambda r, index: resolve_shape(r, index.files, r.data.path) if shape_from_data(r) else r,
}


def load_input(src: Source, recipe: Recipe, name: str = "", g: Optional[torch.Generator] = None,
               part: Optional[int] = None) -> torch.Tensor:
    """Decode and preprocess one sample for ``recipe.modality``; raises DecodeError naming the file.

    ``part`` picks one sample of a file that holds many (a series of a .ts file); None means the
    file is one sample.
    """
    return LOADERS[recipe.modality](src, recipe, name or str(src), part, g)


def valid_mask(inputs: torch.Tensor, recipe: Recipe) -> Optional[torch.Tensor]:
    """Valid tokens bool [B, N] of a stacked batch, or None for modalities without padding."""
    fn = VALID_TOKENS.get(recipe.modality)
    return fn(inputs, recipe) if fn is not None else None


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


def shard_urls(path: str) -> list[str]:
    """Shard files from a folder of .tar files, a glob, a brace pattern or one .tar."""
    if "://" in path or path.startswith("pipe:"):  # remote: webdataset opens these itself
        import braceexpand

        return list(braceexpand.braceexpand(path))
    if os.path.isdir(path):
        urls = sorted(glob.glob(os.path.join(path, "*.tar")))
    elif "{" in path:
        import braceexpand

        urls = list(braceexpand.braceexpand(path))
    else:
        urls = sorted(glob.glob(path))
    if not urls:
        raise DataError(f"{path}: no webdataset shards (.tar) found")
    return urls


LIST_SUFFIXES = (".txt", ".lst", ".csv")


def _names_a_file(path: str) -> bool:
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
    if os.path.isfile(path) and path.lower().endswith(EXTENSIONS[recipe.modality]):
        # Also a list type (a time-series .csv, a point-cloud .txt): a list names files on its first line.
        return "filelist" if listish and _names_a_file(path) else "file"
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
        index = list_folder(recipe.data.path, EXTENSIONS[recipe.modality])
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
    lister = SAMPLE_LISTERS.get(recipe.modality)
    if lister is None:
        return index
    files, parts, names = [], [], []
    for f, label in zip(index.files, index.labels):
        outer = index.classes[label] if label >= 0 else None
        for k, inner in enumerate(lister(f, recipe)):
            files.append(f)
            parts.append(k)
            names.append(inner if inner is not None else outer)
    classes = sorted({n for n in names if n is not None})
    number = {c: i for i, c in enumerate(classes)}
    return FileIndex(files, [number[n] if n is not None else -1 for n in names], classes, parts)


def resolve_recipe(recipe: Recipe) -> Recipe:
    """The recipe with its from-the-data settings filled in (``timeseries.length: 0``); unchanged otherwise."""
    resolver = RESOLVERS.get(recipe.modality)
    if resolver is None or not shape_from_data(recipe):
        return recipe
    if detect_format(recipe) == "shards":
        raise DataError(f"{recipe.data.path}: with shards, set timeseries.length and timeseries.channels in the "
                        f"recipe (they cannot be read from a stream)")
    return resolver(recipe, index_files(recipe))


# --------------------------------------------------------------------------- map-style training data


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


class StepBatchSampler:
    """Endless batches of ``(step, index)``: step s, rank r takes positions
    ``[(s*W + r)*B, (s*W + r + 1)*B)`` of a chain of per-epoch permutations seeded by (seed, epoch).
    """

    def __init__(self, n: int, batch_size: int, seed: int, start_step: int = 0, rank: int = 0, world: int = 1):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start_step, self.rank, self.world = start_step, rank, world
        self._perms: dict[int, torch.Tensor] = {}

    def _at(self, position: int) -> int:
        epoch, offset = divmod(position, self.n)
        if epoch not in self._perms:
            self._perms = {epoch: torch.randperm(self.n, generator=torch.Generator().manual_seed(_mix(self.seed, epoch)))}
        return int(self._perms[epoch][offset])

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start_step
        while True:
            first = (step * self.world + self.rank) * self.batch_size
            yield [(step, self._at(p)) for p in range(first, first + self.batch_size)]
            step += 1


# --------------------------------------------------------------------------- shards


class ShardDataset(IterableDataset):
    """Endless stream of samples from webdataset shards, split across ranks and workers.

    Each epoch shuffles the shard order with (seed, epoch); each (rank, worker) reads its share of
    shards and shuffles samples in a buffer. Resuming re-seeds the stream with the resume step, so
    a resumed run sees a fresh, equally distributed stream rather than the identical one.

    Shards stream from local paths, http(s):// URLs or ``pipe:COMMAND``. A shard that fails (a dropped
    connection, a 404, a failed command, a corrupt tar) is skipped for the epoch and reported as one
    ``bad`` entry naming its URL and the samples read before the failure, so the run's warnings and
    ``bad_files`` count it; a DataError stops the stream once every shard has failed, instead of looping.
    """

    def __init__(self, urls: list[str], recipe: Recipe, start_step: int = 0, rank: int = 0, world: int = 1,
                 buffer: int = 1000):
        self.urls, self.recipe, self.start_step, self.rank, self.world = urls, recipe, start_step, rank, world
        self.buffer = buffer

    def _samples(self, urls: list[str]) -> Iterator[tuple[str, Union[bytes, str], int]]:
        """(name, encoded bytes, label) for each sample holding a file of this modality, and
        (url, message, -1) for each shard lost."""
        exts = {e.lstrip(".") for e in EXTENSIONS[self.recipe.modality]}
        for url in urls:
            n = 0
            try:
                for sample in shard_samples(url):
                    data_ext = next((k for k in sample if not k.startswith("__") and k in exts), None)
                    if data_ext is not None:
                        label = int(sample["cls"]) if "cls" in sample else -1
                        n += 1
                        yield f"{url}:{sample['__key__']}.{data_ext}", sample[data_ext], label
            except ShardLost as e:
                what = f"lost the shard after {n} {self.recipe.modality} samples" if n else "cannot read the shard"
                yield url, f"{url}: {what} ({e})", -1

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        reader = self.rank * workers + worker
        readers = self.world * workers
        seed = _mix(self.recipe.train.seed, self.start_step, reader)
        epoch, counter = 0, 0
        buffer: list[tuple[str, bytes, int]] = []
        # Shards lost before this reader has read anything: reported once a sample proves the data
        # readable, or raised together when every shard has failed (one DataError, not a warning per shard).
        pending: list[tuple[str, str]] = []  # (url, message)
        tried: set[str] = set()  # shards tried since this reader last read a sample
        g = torch.Generator().manual_seed(seed)
        limit = self.buffer
        while True:
            order = torch.randperm(len(self.urls), generator=torch.Generator().manual_seed(_mix(seed, epoch)))
            urls = [self.urls[int(i)] for i in order]
            # Enough shards: each reader takes whole shards. Fewer shards than readers: every reader
            # reads them all and keeps every readers-th sample, so shares stay disjoint.
            by_shard = len(urls) >= readers
            mine = urls[reader::readers] if by_shard else urls
            read = 0
            for name, data, label in self._samples(mine):
                lost = isinstance(data, str)
                if lost:
                    pending.append((name, data))
                else:
                    read += 1
                if read and pending:
                    for url, message in pending:  # reported at once, so the warning comes when it happens
                        yield self._load(url, message, -1, counter * readers + reader)
                    pending = []
                if lost or (not by_shard and (read - 1) % readers != reader):
                    continue
                buffer.append((name, data, label))
                while len(buffer) >= limit:
                    name, data, label = buffer.pop(int(torch.randint(len(buffer), (1,), generator=g)))
                    counter += 1
                    yield self._load(name, data, label, counter * readers + reader)
            if read:
                tried.clear()
                if counter == 0:
                    # A buffer larger than a pass would hold repeats and make a small data set read many
                    # passes (many shard downloads) before the first sample; one pass is all it can shuffle.
                    limit = max(1, min(limit, len(buffer)))
            else:
                # With whole shards per reader, this reader's share may have been only the dead ones:
                # give up only once it has tried every shard without reading a sample.
                tried.update(mine)
                if len(tried) == len(set(self.urls)):
                    if pending:
                        failed = {url for url, _ in pending}
                        raise DataError(f"none of the shards could be read ({len(failed)} failed): "
                                        f"{'; '.join(m for _, m in pending[:3])}{' ...' if len(pending) > 3 else ''}; "
                                        f"check data.path, the server or the pipe: command")
                    raise DataError(f"{', '.join(mine[:3])}: the shards hold no {self.recipe.modality} samples")
            epoch += 1

    def _load(self, name: str, data: Union[bytes, str], label: int, step: int) -> dict:
        if isinstance(data, str):  # a lost shard: name is its URL, data what went wrong
            return {"input": None, "label": label, "step": step, "bad": [f"{data}; skipped the rest of it this epoch"],
                    "name": name}
        g = torch.Generator().manual_seed(_mix(self.recipe.train.seed, self.start_step, step))
        try:
            return {"input": load_input(data, self.recipe, name, g), "label": label, "step": step, "bad": [],
                    "name": name}
        except DecodeError as e:
            return {"input": None, "label": label, "step": step, "bad": [str(e)], "name": name}


def write_shards(src: Union[str, Path], out_dir: Union[str, Path], per_shard: int = 1000) -> list[str]:
    """Pack every readable-type file under ``src`` into webdataset tar shards.

    Each sample is ``{key}.{ext}`` (the file's bytes), ``{key}.cls`` (class index, from the first
    sub-folder) and ``{key}.path`` (the original relative path). ``classes.json`` lists class names.
    Shards are written under a temporary name and renamed, so a killed run leaves no half shard.

    Returns:
        The shard paths written.
    """
    all_exts = [e for exts in EXTENSIONS.values() for e in exts]
    index = list_folder(src, all_exts)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for start in range(0, len(index.files), per_shard):
        name = out_dir / f"shard-{start // per_shard:06d}.tar"
        tmp = name.with_suffix(".tar.tmp")
        with tarfile.open(tmp, "w") as tar:
            for k in range(start, min(start + per_shard, len(index.files))):
                path = Path(index.files[k])
                key = f"{k:09d}"
                # The relative path goes under "path", not "txt": .txt is a data type (xyz point arrays).
                members = {path.suffix.lower().lstrip("."): path.read_bytes(),
                           "path": str(path.relative_to(src)).encode()}
                if index.labels[k] >= 0:
                    members["cls"] = str(index.labels[k]).encode()
                for ext, data in members.items():
                    ti = tarfile.TarInfo(f"{key}.{ext}")
                    ti.size = len(data)
                    tar.addfile(ti, io.BytesIO(data))
        os.replace(tmp, name)
        written.append(str(name))
    (out_dir / "classes.json").write_text(json.dumps(index.classes))
    return written


# --------------------------------------------------------------------------- loader


def grid_batch(grid: tuple[int, ...], mask: MaskConfig, inputs: torch.Tensor, g: torch.Generator,
               valid: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs on a token grid: unchanged, with multi-block masks on the grid (padding-aware with ``valid``)."""
    return (inputs, *sample_block_masks(grid, mask, len(inputs), g, valid=valid))


def point_group_batch(cfg: PointCloudConfig, mask: MaskConfig, inputs: torch.Tensor, g: torch.Generator,
                      valid: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clouds [B, P, C] -> groups [B, G, K, C] (centres exist only after FPS), with neighbourhood masks
    on the centres. The tokenizer takes the groups as they are, so FPS runs once per sample."""
    assert valid is None, "point clouds have no padded tokens"
    groups = group_points(inputs, cfg.num_groups, cfg.group_size)
    return (groups, *sample_neighbourhood_masks(groups[:, :, 0, :3], mask, g))


# How a stacked batch (and its valid tokens) becomes model inputs plus context/target indices, in
# DataLoader workers.
# Modalities not listed tokenize onto the grid that ``token_grid`` gives them.
BATCH_MASKERS: dict[str, Callable[[Recipe], Callable[[torch.Tensor, torch.Generator], tuple]]] = {
    "pointcloud": lambda r: functools.partial(point_group_batch, r.pointcloud, r.mask),
}


class MaskCollate:
    """Stacks samples and samples the batch's masks (runs in DataLoader workers)."""

    def __init__(self, recipe: Recipe, rank: int = 0):
        self.recipe, self.rank, self.seed = recipe, rank, recipe.train.seed
        self.masker = (BATCH_MASKERS[recipe.modality](recipe) if recipe.modality in BATCH_MASKERS
                       else functools.partial(grid_batch, token_grid(recipe), recipe.mask))

    def __call__(self, samples: list[dict]) -> dict:
        """Returns input, label, context_idx, target_idx, valid (bool [B, N], or None where the
        modality has no padding; with it, index sets are padded with -1), bad and count."""
        bad = [b for s in samples for b in s["bad"]]
        good = [s for s in samples if s["input"] is not None]
        if not good:
            return {"input": None, "bad": bad, "count": len(bad)}
        g = torch.Generator().manual_seed(_mix(self.seed, samples[0]["step"], self.rank, 7))
        inputs = torch.stack([s["input"] for s in good])
        valid = valid_mask(inputs, self.recipe)
        inputs, context_idx, target_idx = self.masker(inputs, g, valid)
        return {"input": inputs, "label": torch.tensor([s["label"] for s in good]),
                "context_idx": context_idx, "target_idx": target_idx, "valid": valid,
                "bad": bad, "count": len(good) + len(bad)}  # files tried, decoded or not


def build_train_loader(recipe: Recipe, start_step: int = 0, rank: int = 0, world: int = 1) -> DataLoader:
    """The endless training loader for ``recipe.data``; each batch carries its masks."""
    fmt = detect_format(recipe)
    collate = MaskCollate(recipe, rank)
    d = recipe.data
    # An own generator: worker seeding must not draw from the global RNG, whose state a checkpoint restores.
    kwargs = dict(num_workers=d.num_workers, collate_fn=collate, pin_memory=torch.cuda.is_available(),
                  generator=torch.Generator().manual_seed(_mix(recipe.train.seed, start_step, rank)))
    if d.num_workers > 0:
        kwargs["prefetch_factor"] = 4
    if fmt == "shards":
        dataset = ShardDataset(shard_urls(d.path), recipe, start_step, rank, world)
        return DataLoader(dataset, batch_size=d.batch_size, **kwargs)
    index = index_files(recipe)
    if len(index.files) < d.batch_size * world:
        warnings.warn(f"{d.path}: {len(index.files)} files is fewer than one global batch "
                      f"({d.batch_size} x {world}); samples repeat within a step", stacklevel=2)
    sampler = StepBatchSampler(len(index.files), d.batch_size, recipe.train.seed, start_step, rank, world)
    return DataLoader(FileDataset(index, recipe, train=True), batch_sampler=sampler, **kwargs)
