"""Webdataset shards as streams of samples: local paths, ``http(s)://`` URLs and ``pipe:COMMAND``.

One shard is read as a tar stream and its members grouped into samples by webdataset's key rule.
HTTP goes through Python's urllib rather than webdataset's ``curl`` (no system tool needed, and a
refused or missing URL fails at once instead of after curl's retries); any failure, a connection that
closes early included, is a :class:`ShardLost` naming its cause, which ``ShardDataset`` turns into a
skipped, reported shard.
"""

from __future__ import annotations

import glob
import http.client
import io
import json
import os
import re
import subprocess
import tarfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator, Optional, Union

import torch
from torch.utils.data import IterableDataset

from multijepa.datasets.files import _mix, list_folder, load_input
from multijepa.errors import DataError, DecodeError
from multijepa.modalities import MODALITIES, all_extensions
from multijepa.recipe import Recipe

# How long a shard stream may stall (connect, or wait for the next bytes) before it counts as lost.
SHARD_TIMEOUT_S = 60.0


class ShardLost(Exception):
    """A shard that failed to open or broke off mid-stream; the message names the URL and the cause."""


class _PipeStream(io.RawIOBase):
    """stdout of a ``pipe:`` command; a failed command raises ShardLost naming it and its stderr."""

    def __init__(self, url: str):
        self.url = url
        # A shell command by design, as in webdataset: the recipe's author wrote it.
        self.proc = subprocess.Popen(url[len("pipe:"):], shell=True, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self.proc.stdout.readinto(b)
        if n == 0:
            self.check()
        return n

    def check(self) -> None:
        if self.proc.wait() != 0:
            err = self.proc.stderr.read().decode(errors="replace").strip()[-300:]
            raise ShardLost(f"the command exited with status {self.proc.returncode}" + (f": {err}" if err else ""))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.proc.stdout.close()
        self.proc.stderr.close()
        super().close()


class _HTTPStream(io.RawIOBase):
    """An HTTP response body that tells a connection closed early (fewer bytes than Content-Length)
    apart from a corrupt tar: urllib's read(n) just returns short, which tarfile calls 'unexpected end'."""

    def __init__(self, response):
        self.response, self.got = response, 0
        length = response.headers.get("Content-Length")
        self.length = int(length) if length and length.isdigit() else None

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self.response.readinto(b)
        self.got += n
        if n == 0 and len(b) and self.length is not None and self.got < self.length:
            raise ShardLost(f"the connection closed after {self.got} of {self.length} bytes")
        return n

    def close(self) -> None:
        self.response.close()
        super().close()


def _open_shard(url: str):
    """A readable binary stream of one shard: a local path, http(s):// (Python's urllib: no curl needed,
    and a refused or missing URL fails at once instead of curl's retries), ``pipe:COMMAND``, or another
    scheme webdataset knows (gs://, s3:// ... through its command-line tools)."""
    if url.startswith("pipe:"):
        return _PipeStream(url)
    if url.startswith(("http://", "https://")):
        try:
            return _HTTPStream(urllib.request.urlopen(url, timeout=SHARD_TIMEOUT_S))
        except urllib.error.HTTPError as e:
            raise ShardLost(f"HTTP {e.code} {e.reason}") from None
        except urllib.error.URLError as e:
            raise ShardLost(f"cannot connect ({e.reason})") from None
    if "://" in url:
        from webdataset.gopen import gopen

        return gopen(url)
    return open(url, "rb")


def shard_samples(url: str) -> Iterator[dict]:
    """The samples of one shard, streamed: {"__key__", "__url__", ext: bytes} per run of members that
    share a key (webdataset's grouping: the key is the name up to the first dot of its last part)."""
    sample: dict = {}
    f = None
    try:
        with _open_shard(url) as f:
            with tarfile.open(fileobj=f, mode="r|*") as tar:
                for member in tar:
                    m = re.match(r"^((?:.*/|)[^./]+)\.([^/]*)$", member.name)
                    if not member.isreg() or m is None or re.match(r"__[^/]*__($|/)", member.name):
                        continue
                    key, ext = m.groups()
                    if sample and sample["__key__"] != key:
                        yield sample
                        sample = {}
                    sample.setdefault("__key__", key)
                    sample["__url__"] = url
                    sample[ext.lower()] = tar.extractfile(member).read()
            if isinstance(f, _PipeStream):
                while f.read(1 << 16):  # the tar's end padding: the command must not die of a broken pipe
                    pass
    except ShardLost:
        raise
    except (OSError, ValueError, EOFError, tarfile.TarError, http.client.HTTPException) as e:
        # A failed pipe: command explains more than the truncated tar it left behind.
        if isinstance(f, _PipeStream) and f.proc.returncode not in (None, 0):
            raise ShardLost(f"the command exited with status {f.proc.returncode}") from None
        raise ShardLost(f"{type(e).__name__}: {e}") from None
    if sample:
        yield sample


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
                 buffer: Optional[int] = None):
        self.urls, self.recipe, self.start_step, self.rank, self.world = urls, recipe, start_step, rank, world
        self.buffer = buffer or recipe.data.shuffle_buffer  # samples held for shuffling, per reader

    def _samples(self, urls: list[str]) -> Iterator[tuple[str, Union[bytes, str], int]]:
        """(name, encoded bytes, label) for each sample holding a file of this modality, and
        (url, message, -1) for each shard lost."""
        exts = {e.lstrip(".") for e in MODALITIES[self.recipe.modality].extensions}
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


def write_shards(src: Union[str, Path], out_dir: Union[str, Path], per_shard: int = 1000,
                 progress: bool = False) -> list[str]:
    """Pack every readable-type file under ``src`` into webdataset tar shards.

    Each sample is ``{key}.{ext}`` (the file's bytes), ``{key}.cls`` (class index, from the first
    sub-folder) and ``{key}.path`` (the original relative path). ``classes.json`` lists class names.
    Shards are written under a temporary name and renamed, so a killed run leaves no half shard.

    Returns:
        The shard paths written (``progress``: a bar on stderr, one step per file).
    """
    from tqdm.auto import tqdm

    index = list_folder(src, all_extensions())
    bar = tqdm(total=len(index.files), disable=not progress, desc="shard", unit="file", leave=False,
               dynamic_ncols=True, mininterval=0.5)
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
                bar.update(1)
        os.replace(tmp, name)
        written.append(str(name))
    bar.close()
    (out_dir / "classes.json").write_text(json.dumps(index.classes))
    return written
