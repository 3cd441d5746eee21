"""Video: containers -> frames through decord or PyAV, clip sampling, and the clip transform.

Two readers decode the same files: decord (random frame access, the default where it is installed)
and PyAV (a streaming decoder; decord has no wheels for macOS or ARM, so ``video.backend: auto``
falls back to it there). Both index frames in presentation order and agree on count and content
(tested). Only the frames a clip needs are kept, resized as they are decoded: decord's
``get_batch`` on the sampled indices with a decoder-side resize, PyAV by seeking to the key frame
before the clip and keeping only the sampled frames. A 1080p file is never held whole in memory.

Frame times come from the container where it has usable ones (so variable frame rates work), else
from the frame index and the average frame rate: AVI stores no presentation times, and for an H.264
AVI decord reports none (AV_NOPTS_VALUE) and PyAV only FFmpeg's guess, pts = dts + 1.

Every failure (a missing, empty, corrupt or truncated file, no video stream) is a
:class:`DecodeError` that names the file.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional, Sequence, Union

import numpy as np

from multijepa.errors import DecodeError, MultijepaError, require
from multijepa.readers import Source

if TYPE_CHECKING:
    import av  # imported where used: the module loads without it

VIDEO_EXTENSIONS = (".mp4", ".avi", ".webm", ".mkv", ".mov", ".m4v", ".mpg", ".mpeg", ".ogv", ".wmv", ".flv", ".3gp")
_FIX = ("the file is corrupt, truncated or not a video: remove it or re-encode it "
        "(e.g. ffmpeg -i IN -c:v libx264 OUT.mp4)")


def decord_available() -> bool:
    try:
        import decord  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(name: str) -> str:
    """The reader to use: ``auto`` is decord where it is installed, else PyAV.

    >>> resolve_backend("pyav")
    'pyav'
    """
    if name == "auto":
        return "decord" if decord_available() else "pyav"
    if name == "decord" and not decord_available():
        raise MultijepaError("video.backend=decord, but decord is not installed (it has no wheels for macOS or "
                             "ARM); set video.backend=auto or pyav to read video with PyAV")
    return name


@dataclass
class Header:
    """What the container declares, read without decoding (used to spot truncated files)."""

    width: int
    height: int
    declared_frames: int  # 0 when the container does not say (webm, mkv)
    declared_seconds: float  # the video's declared duration; 0 when unknown


def _header(path: str, name: str) -> Header:
    av = require("av", "reading video files")

    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise DecodeError(f"{name}: the file holds no video stream; {_FIX}")
            s = container.streams.video[0]
            seconds = float(s.duration * s.time_base) if s.duration and s.time_base else 0.0
            if not seconds and container.duration and len(container.streams) == 1:
                seconds = container.duration / 1e6  # microseconds; only when no other stream could be longer
            w, h = s.codec_context.width, s.codec_context.height
            frames = s.frames
    except av.error.FFmpegError as e:
        raise DecodeError(f"{name}: cannot open as a video ({type(e).__name__}: {e.strerror or e}); {_FIX}") from None
    if w <= 0 or h <= 0:
        raise DecodeError(f"{name}: the video stream has no frame size ({w} x {h}); {_FIX}")
    return Header(w, h, frames, seconds)


def _check_complete(name: str, header: Header, timestamps: np.ndarray) -> None:
    """Raise when fewer frames were found than the container declares (a cut copy or download).

    A container that declares its frame count (mp4, avi) is judged by the count alone, so a file
    with all its frames passes whatever its timestamps say; others (webm, mkv) by the time covered.
    """
    n = len(timestamps)
    if n == 0:
        raise DecodeError(f"{name}: the video holds no frames; {_FIX}")
    if header.declared_frames > 0:
        if n < header.declared_frames:
            raise DecodeError(f"{name}: truncated video: found {n} of the {header.declared_frames} frames its "
                              f"header declares; re-copy or re-encode it")
    elif header.declared_seconds > 0 and n >= 2:
        period = float(np.median(np.diff(timestamps)))
        covered = timestamps[-1] + period
        if covered < 0.9 * header.declared_seconds - 2 * period:
            raise DecodeError(f"{name}: truncated video: its frames cover {covered:.2f} s of the "
                              f"{header.declared_seconds:.2f} s its header declares; re-copy or re-encode it")


def _frame_times(name: str, stamps: np.ndarray, rate: float, seconds: float) -> tuple[np.ndarray, bool]:
    """Seconds from the first frame [n] and whether they are the container's own: ``stamps`` [n] (its
    times in presentation order, NaN where missing) where they are usable, else frame index / ``rate``
    (or the n frames spread over the declared ``seconds``).

    Unusable: missing, not strictly increasing (all equal, as decord's AV_NOPTS_VALUE are), or a span
    that disagrees with the frame count at the average rate by more than ten times (garbage).

    >>> _frame_times("x.avi", np.full(4, -3.7e17), 25.0, 0.0)
    (array([0.  , 0.04, 0.08, 0.12]), False)
    """
    n = len(stamps)
    rate = float(rate or 0) or (n / seconds if seconds > 0 else 0.0)
    t = np.asarray(stamps, dtype=np.float64) - (stamps[0] if n else 0.0)
    span = (n - 1) / rate if rate > 0 else 0.0
    if np.isfinite(t).all() and (np.diff(t) > 0).all() and (not span or span / 10 < t[-1] < 10 * span):
        return t, True
    if rate <= 0:
        raise DecodeError(f"{name}: its frames carry no usable timestamps and it declares no frame rate; {_FIX}")
    return np.arange(n) / rate, False


def output_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) with the short side scaled down to ``short_side`` (never up; 0 keeps the size).

    >>> output_size(1920, 1080, 64)
    (114, 64)
    """
    if short_side <= 0 or short_side >= min(width, height):
        return width, height
    scale = short_side / min(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


class VideoFile:
    """An opened video: frame ``timestamps`` (seconds from the first frame, presentation order) and
    ``read(indices)`` -> uint8 [T, H, W, 3] with the short side at ``short_side`` (0: native).

    The header is read here, frames by ``reader``: the :data:`BACKENDS` entry named ``backend``. A
    reader may decline a read (decord, where it would return wrong frames or cannot copy them out):
    those frames then come from ``fallback``, a :class:`PyAVReader` of the same file opened on first
    need. ``frames_decoded`` and ``peak_frames_held`` count work and memory over both (the
    memory-bound test reads them).
    """

    def __init__(self, path: str, name: str, backend: str, short_side: int):
        self.path, self.name = path, name
        self.header = _header(path, name)
        self.size = output_size(self.header.width, self.header.height, short_side)
        self.reader: Reader = BACKENDS[backend](path, name, self.size, self.header.declared_seconds)
        self.fallback: Optional[PyAVReader] = None
        self.timestamps = self.reader.timestamps
        _check_complete(name, self.header, self.timestamps)

    @property
    def num_frames(self) -> int:
        return len(self.timestamps)

    @property
    def frames_decoded(self) -> int:
        return sum(r.frames_decoded for r in self._readers())

    @property
    def peak_frames_held(self) -> int:
        return max(r.peak_frames_held for r in self._readers())

    def read(self, indices: Sequence[int]) -> np.ndarray:
        frames = self.reader.read(indices)
        if frames is None:
            if self.fallback is None:
                self.fallback = PyAVReader(self.path, self.name, self.size, self.header.declared_seconds)
                # PyAV counts the frames itself; a file it finds short is refused, as on opening.
                _check_complete(self.name, self.header, self.fallback.timestamps)
            frames = self.fallback.read(indices)
        return frames

    def close(self) -> None:
        for reader in self._readers():
            reader.close()

    def _readers(self) -> list[Reader]:
        return [self.reader] if self.fallback is None else [self.reader, self.fallback]


class DecordReader:
    """decord: frame counts and timestamps from its index, ``get_batch`` with a decoder-side resize.

    decord seeks by its frame timestamps: where they are missing (AV_NOPTS_VALUE: H.264 AVI, MPEG
    with B-frames) it returns wrong frames after a seek (tested), so it declines to read such files
    and their frames come from PyAV.
    """

    def __init__(self, path: str, name: str, size: tuple[int, int], declared_seconds: float):
        import decord

        self.name = name
        self.frames_decoded = 0
        self.peak_frames_held = 0
        w, h = size
        try:
            self.decoder = decord.VideoReader(path, ctx=decord.cpu(0), width=w, height=h, num_threads=1)
            n = len(self.decoder)
            stamps = self.decoder.get_frame_timestamp(np.arange(n))[:, 0] if n else np.zeros(0)
            rate = self.decoder.get_avg_fps()
        except Exception as e:  # decord raises its own DECORDError / RuntimeError
            raise DecodeError(f"{name}: decord cannot read the video ({str(e).splitlines()[0][:200]}); "
                              f"{_FIX}") from None
        self.timestamps, self.own_times = _frame_times(name, stamps, rate, declared_seconds)

    def read(self, indices: Sequence[int]) -> Optional[np.ndarray]:
        """uint8 [T, H, W, 3], or None where these frames must come from PyAV."""
        if not self.own_times:
            return None
        try:
            frames = self.decoder.get_batch(list(indices)).asnumpy()
        except Exception as e:
            if "DECORDArrayCopyFromTo" in str(e):
                # decord 0.6 fails to copy out frames of some widths (8, 12, 16, 24, 48, 72 px, ...):
                # a decord bug, not a bad file, so PyAV reads these frames instead.
                return None
            raise DecodeError(f"{self.name}: cannot decode frames {min(indices)}-{max(indices)} "
                              f"({str(e).splitlines()[0][:200]}); {_FIX}") from None
        self.frames_decoded += len(indices)
        self.peak_frames_held = max(self.peak_frames_held, len(indices))
        return frames

    def close(self) -> None:
        self.decoder = None


class PyAVReader:
    """PyAV: timestamps from the packets (no decoding); frames by seeking to the key frame at or before
    the first wanted one and decoding forward, keeping only wanted frames, each resized as it arrives.

    The decoder returns frames in presentation order. Where the packets' pts give that order (unique,
    out of decode order: B-frames in mp4 or mkv) a frame is known by its pts; where they do not (AVI
    with H.264: FFmpeg's guess dts + 1, which the decoder hands back shuffled; a raw stream: none),
    frames are counted from the key frame decoding starts at, found by its byte position.
    """

    def __init__(self, path: str, name: str, size: tuple[int, int], declared_seconds: float):
        av = require("av", "reading video files")

        self.path, self.name, self.size = path, name, size
        self.frames_decoded = 0
        self.peak_frames_held = 0
        try:
            self._open()
            packets = [(p.pts, p.dts, p.pos, p.is_keyframe) for p in self.container.demux(self.stream) if p.size > 0]
        except av.error.FFmpegError as e:
            raise DecodeError(f"{name}: cannot read the video's packets ({e.strerror or e}); {_FIX}") from None
        n = len(packets)
        pts = np.array([np.nan if p[0] is None else p[0] for p in packets], dtype=np.float64)
        self.by_pts = bool(np.isfinite(pts).all() and len(np.unique(pts)) == n and (np.diff(pts) < 0).any())
        index = np.argsort(np.argsort(pts, kind="stable")) if self.by_pts else np.arange(n)  # presentation order
        self.index_of = {int(pts[d]): int(index[d]) for d in range(n)} if self.by_pts else {}
        self.decode_index = {} if self.by_pts else {p[2]: d for d, p in enumerate(packets) if p[2] is not None}
        # Where decoding can start: the key frames in presentation order, each with the times to seek
        # to, pts first (what most demuxers seek by), then dts (AVI seeks by frame number; dts is
        # never after pts, so never past the key frame).
        self.starts = sorted((int(index[d]), tuple(dict.fromkeys(t for t in p[:2] if t is not None)))
                             for d, p in enumerate(packets) if p[3])
        self.start_index = [k for k, _ in self.starts]
        tb = float(self.stream.time_base) if self.stream.time_base else 1.0
        rate = self.stream.average_rate or self.stream.guessed_rate
        self.timestamps = _frame_times(name, np.sort(pts) * tb, rate, declared_seconds)[0]

    def _open(self) -> None:
        av = require("av", "reading video files")

        self.container = av.open(self.path)
        self.stream = self.container.streams.video[0]
        self.stream.thread_count = 1

    def _decoded(self, start: int) -> Iterator[tuple[int, av.VideoFrame]]:
        """(presentation index, frame) for each frame decoded from the current position, where the
        first packet read is the key frame at ``start`` unless its byte position says otherwise."""
        position = None
        for packet in self.container.demux(self.stream):
            if position is None:
                position = self.decode_index.get(packet.pos, start) - 1
            for frame in packet.decode():
                self.frames_decoded += 1
                i = self.index_of.get(frame.pts)
                position = i if i is not None else position + 1
                yield position, frame

    def read(self, indices: Sequence[int]) -> np.ndarray:
        av = require("av", "reading video files")

        wanted = sorted(set(int(i) for i in indices))
        kept: dict[int, np.ndarray] = {}
        w, h = self.size
        k = bisect.bisect_right(self.start_index, wanted[0]) - 1
        start, times = self.starts[k] if k >= 0 else (0, ())
        try:
            # Seek by each of the key frame's times until decoding starts at or before the first wanted
            # frame (a demuxer that seeks by the other kind of time can land on a later key frame);
            # failing that, or with no time to seek by, decode from the start of the file.
            for seek_to in (*times, None):
                if seek_to is None:
                    self.container.close()
                    self._open()
                    start = 0
                else:
                    self.container.seek(int(seek_to), stream=self.stream, backward=True, any_frame=False)
                frames = self._decoded(start)
                first = next(frames, None)
                if seek_to is None or (first is not None and first[0] <= wanted[0]):
                    break
            for position, frame in itertools.chain([first] if first is not None else [], frames):
                if position in wanted and position not in kept:
                    kept[position] = frame.to_ndarray(width=w, height=h, format="rgb24")
                    self.peak_frames_held = max(self.peak_frames_held, len(kept))
                if position >= wanted[-1]:
                    break
        except av.error.FFmpegError as e:
            raise DecodeError(f"{self.name}: cannot decode frames {wanted[0]}-{wanted[-1]} ({e.strerror or e}); "
                              f"{_FIX}") from None
        missing = [i for i in wanted if i not in kept]
        if missing:
            raise DecodeError(f"{self.name}: frames {missing[0]}-{missing[-1]} could not be decoded (the stream "
                              f"ends early or is damaged); {_FIX}")
        return np.stack([kept[int(i)] for i in indices])

    def close(self) -> None:
        self.container.close()


# The readers a VideoFile is built on, by ``video.backend``. Each opens from (path, name, output size
# (width, height), declared seconds) and has ``timestamps``, ``read(indices)``, ``close()`` and the
# counters ``frames_decoded`` and ``peak_frames_held``.
BACKENDS = {"decord": DecordReader, "pyav": PyAVReader}
Reader = Union[DecordReader, PyAVReader]


@contextlib.contextmanager
def open_video(src: Source, name: str = "", backend: str = "auto", short_side: int = 0) -> Iterator[VideoFile]:
    """Open a video file (or its bytes, through a temporary file) with a reader.

    Args:
        src: a path, or the encoded bytes (then ``name``, with the file's extension, names errors).
        backend: "auto" (decord where installed, else PyAV), "decord" or "pyav".
        short_side: frames come out with the short side scaled down to this (0: native size).

    Raises:
        DecodeError: the file is missing, empty, corrupt, truncated or holds no video, naming it.

    >>> with open_video("clip.mp4", backend="pyav", short_side=64) as v:  # doctest: +SKIP
    ...     v.read([0, 2, 4]).shape
    (3, 64, 85, 3)
    """
    name = name or str(src)
    backend = resolve_backend(backend)
    with contextlib.ExitStack() as stack:
        if isinstance(src, bytes):
            if not src:
                raise DecodeError(f"{name}: the file is empty (0 bytes); remove it or replace it with a valid file")
            tmp = stack.enter_context(tempfile.NamedTemporaryFile(suffix=Path(name).suffix))
            tmp.write(src)
            tmp.flush()
            path = tmp.name
        else:
            path = str(src)
            if not os.path.exists(path):
                raise DecodeError(f"{name}: no such file")
            if os.path.isdir(path):
                raise DecodeError(f"{name}: is a folder, not a video file")
            if os.path.getsize(path) == 0:
                raise DecodeError(f"{name}: the file is empty (0 bytes); remove it or replace it with a valid file")
        video = VideoFile(path, name, backend, short_side)
        try:
            yield video
        finally:
            video.close()


def write_video(path: Union[str, Path], frames: np.ndarray, fps: int = 20, crf: int = 10, preset: str = "medium") -> None:
    """Write uint8 frames [T, H, W, C] (C = 1 or 3; H and W even) as H.264 (PyAV); ``crf`` 10 is near-lossless.

    Raises:
        MultijepaError: odd frame sides, which H.264's 4:2:0 sampling cannot hold.
    """
    av = require("av", "writing video")
    t, h, w, c = frames.shape
    if h % 2 or w % 2:
        raise MultijepaError(f"{path}: H.264 needs even frame sides, got {w} x {h}; write frames as png or npy")
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": str(crf), "preset": preset}
        for frame in frames:
            rgb = np.ascontiguousarray(np.repeat(frame, 3, -1) if c == 1 else frame[..., :3])
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode())
