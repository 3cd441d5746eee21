"""Webdataset shards as streams of samples: local paths, ``http(s)://`` URLs and ``pipe:COMMAND``.

One shard is read as a tar stream and its members grouped into samples by webdataset's key rule.
HTTP goes through Python's urllib rather than webdataset's ``curl`` (no system tool needed, and a
refused or missing URL fails at once instead of after curl's retries); any failure, a connection that
closes early included, is a :class:`ShardLost` naming its cause, which ``ShardDataset`` turns into a
skipped, reported shard.
"""

from __future__ import annotations

import http.client
import io
import re
import subprocess
import tarfile
import urllib.error
import urllib.request
from typing import Iterator

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
