"""Decoders: file or bytes -> tensor, raising :class:`DecodeError` that names the file.

Each reader names the file types it takes (``IMAGE_EXTENSIONS`` ...); the modality table
(``multijepa.modalities``) says which modality reads which. Time series: ``multijepa.readers.series``;
video: ``multijepa.readers.video``.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Union

import torch

from multijepa.errors import DecodeError, require

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif")
# Point files, meshes sampled to points (.ply holds either), and plain xyz arrays.
POINT_EXTENSIONS = (".ply", ".pcd", ".xyz", ".xyzn", ".xyzrgb", ".pts", ".off", ".obj", ".stl", ".npy", ".txt")

Source = Union[str, Path, bytes]


def read_bytes(src: Source, name: str) -> bytes:
    if isinstance(src, bytes):
        data = src
    else:
        try:
            data = Path(src).read_bytes()
        except FileNotFoundError:
            raise DecodeError(f"{name}: no such file") from None
        except IsADirectoryError:
            raise DecodeError(f"{name}: is a folder, not a file") from None
        except OSError as e:
            raise DecodeError(f"{name}: cannot read ({e.strerror})") from None
    if not data:
        raise DecodeError(f"{name}: the file is empty (0 bytes); remove it or replace it with a valid file")
    return data


def read_image(src: Source, channels: int = 3, name: str = "") -> torch.Tensor:
    """Decode an image to uint8 [C, H, W] with C = ``channels``; grayscale, palette and RGBA are converted.

    Decoding goes through Pillow (JPEG, PNG, WebP, GIF: the first frame, BMP, TIFF), which refuses
    truncated files. (torchvision's decoders are deprecated since 0.29.)

    Args:
        src: a path, or the encoded bytes (then ``name`` is used in errors).
        channels: 3 for RGB, 1 for grayscale.

    Raises:
        DecodeError: the file is missing, empty, truncated or not an image.

    >>> read_image("photo.png").shape  # doctest: +SKIP
    torch.Size([3, 480, 640])
    """
    import numpy as np
    from PIL import Image

    name = name or str(src)
    data = read_bytes(src, name)
    try:
        with Image.open(io.BytesIO(data)) as im:
            arr = np.asarray(im.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    except Exception as e:  # Pillow raises OSError, ValueError, SyntaxError ... depending on the format
        raise DecodeError(f"{name}: cannot decode as an image ({type(e).__name__}: {e}); the file is corrupt, "
                          f"truncated or not an image: remove it or re-export it") from None
    if arr.ndim != 2 + (channels != 1) or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise DecodeError(f"{name}: decoded to an unusable image of shape {arr.shape}")
    image = torch.from_numpy(arr.copy())
    return image.unsqueeze(0) if channels == 1 else image.permute(2, 0, 1).contiguous()


# A RIFF data chunk declaring one of these sizes was written by a streaming encoder that did not
# know the length: it is not a sign of truncation.
_UNKNOWN_WAV_SIZES = (0, 0xFFFFFFFF, 0x7FFFFFFF)


def _wav_missing_bytes(data: bytes) -> int:
    """Bytes a RIFF/WAVE file's data chunk declares beyond the end of the file (0 if whole or not WAV)."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return 0
    pos = 12
    while pos + 8 <= len(data):
        chunk, size = data[pos:pos + 4], int.from_bytes(data[pos + 4:pos + 8], "little")
        if chunk == b"data":
            available = len(data) - pos - 8
            return 0 if size in _UNKNOWN_WAV_SIZES else max(0, size - available)
        pos += 8 + size + (size & 1)  # chunks are padded to even sizes
    return 0


def _mp3_declares_length(data: bytes) -> bool:
    """Whether an MP3 stream starts with a Xing/Info/VBRI frame, which states its exact length.

    Without one, libsndfile estimates the length from the file size, which is not exact for VBR.
    """
    start = 0
    if data[:3] == b"ID3" and len(data) >= 10:  # skip an ID3v2 tag: 4 synchsafe size bytes, optional footer
        start = 10 + sum((data[6 + i] & 0x7F) << (7 * (3 - i)) for i in range(4)) + (10 if data[5] & 0x10 else 0)
    first = data[start:start + 64]
    return any(tag in first for tag in (b"Xing", b"Info", b"VBRI"))


def _decode_audio(data: bytes, name: str):
    """bytes -> (float32 array [frames, channels], sample rate) through libsndfile, or DecodeError."""
    import io

    import numpy as np

    sf = require("soundfile", "reading audio files")

    missing = _wav_missing_bytes(data)
    if missing:
        raise DecodeError(f"{name}: truncated WAV file: its header declares {missing} more bytes of audio than "
                          f"the file holds (an interrupted copy or download?); re-copy or re-export it")
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            declared, rate, kind = f.frames, f.samplerate, f.format
            samples = f.read(dtype="float32", always_2d=True)
    except (sf.SoundFileError, RuntimeError, ValueError, EOFError) as e:
        reason = str(e).replace(" <_io.BytesIO object at ", " <").split(": ", 1)[-1]
        raise DecodeError(f"{name}: cannot decode as audio ({reason}); the file is corrupt, truncated or not "
                          f"audio (multijepa reads {', '.join(AUDIO_EXTENSIONS)} through libsndfile): "
                          f"remove it or re-export it") from None
    # Most formats (FLAC, AIFF, MP3 with a Xing/Info frame) state their length: a cut file decodes short.
    if declared > 0 and len(samples) < declared and (kind != "MP3" or _mp3_declares_length(data)):
        raise DecodeError(f"{name}: truncated audio file: decoded {len(samples)} of the {declared} frames its "
                          f"header declares; re-copy or re-export it")
    if len(samples) == 0:
        detail = "" if len(data) < 1024 else f" from {len(data)} bytes: it is corrupt or truncated"
        raise DecodeError(f"{name}: the file holds no audio samples (0 frames){detail}; remove it")
    if not np.isfinite(samples).all():
        raise DecodeError(f"{name}: the audio holds NaN or infinite samples; re-export it")
    return samples, rate


def read_audio(src: Source, sample_rate: int, channels: int = 1, name: str = "") -> torch.Tensor:
    """Decode audio to float32 [channels, samples] at ``sample_rate``.

    WAV (8-bit unsigned to 32-bit PCM, float), FLAC, OGG (Vorbis, Opus), MP3 and AIFF are read
    through libsndfile; PCM is scaled to [-1, 1]. Other sample rates are resampled with soxr
    (high quality). ``channels=1`` mixes every file down to mono (the mean of its channels); a
    larger count keeps that many channels, repeating mono files.

    Args:
        src: a path, or the encoded bytes (then ``name`` is used in errors).
        sample_rate: the rate to return, in Hz.
        channels: 1 to mix down, or the channel count to keep.

    Raises:
        DecodeError: the file is missing, empty, truncated, corrupt, not audio, or has a channel
            count other than 1 or ``channels``.

    >>> read_audio("speech.mp3", 16000).shape  # doctest: +SKIP
    torch.Size([1, 37120])
    """
    import numpy as np

    soxr = require("soxr", "resampling audio")
    name = name or str(src)
    samples, rate = _decode_audio(read_bytes(src, name), name)
    have = samples.shape[1]
    if channels == 1 and have > 1:
        samples = samples.mean(axis=1, keepdims=True)  # mix before resampling: fewer channels to resample
    elif channels > 1 and have == 1:
        samples = np.repeat(samples, channels, axis=1)
    elif have != channels:
        raise DecodeError(f"{name}: has {have} audio channels but the recipe keeps {channels} "
                          f"(audio.keep_channels); set audio.channels=mix to mix every file down to mono")
    if rate != sample_rate:
        samples = soxr.resample(samples, rate, sample_rate, quality="HQ")
        if len(samples) == 0:
            raise DecodeError(f"{name}: too short to resample from {rate} Hz to {sample_rate} Hz")
    return torch.from_numpy(np.ascontiguousarray(samples.T, dtype=np.float32))
# --------------------------------------------------------------------------- point clouds and meshes

MESH_ONLY = (".off", ".obj", ".stl")  # always meshes; a .ply is a mesh when it holds triangles


@dataclass
class PointSet:
    """Points read from a file: xyz [P, 3] float32, and per-point normals / colours (in [0, 1]) when present."""

    xyz: torch.Tensor
    normals: Optional[torch.Tensor] = None
    colors: Optional[torch.Tensor] = None


@contextlib.contextmanager
def _native_output() -> Iterator[list[str]]:
    """Collect what open3d prints while the block runs, instead of letting it reach the terminal.

    open3d reports a failed read only by printing a warning and returning an empty geometry, so the
    printed text is the one place the reason appears. Its logger prints through Python's
    ``sys.stdout``; the PLY library it uses writes to the C-level stderr, so both are redirected.
    Yields a list that holds the text afterwards.
    """
    text: list[str] = []
    python_side = io.StringIO()
    sys.stdout.flush()
    sys.stderr.flush()
    with tempfile.TemporaryFile() as sink:
        saved = [os.dup(1), os.dup(2)]
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            with contextlib.redirect_stdout(python_side), contextlib.redirect_stderr(python_side):
                yield text
        finally:
            _flush_c_stdio()  # C stdio is buffered when stdout is not a terminal
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            sink.seek(0)
            printed = python_side.getvalue() + sink.read().decode(errors="replace")
            text.append(re.sub(r"\x1b\[[0-9;]*m", "", printed))


def _flush_c_stdio() -> None:
    import ctypes

    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):  # no C library to flush (not Linux/macOS): nothing buffered there
        pass


def _failure(printed: str) -> Optional[str]:
    """open3d's own reason for a failed read, if it printed one (benign warnings are ignored)."""
    lines = [line.strip() for line in printed.splitlines()
             if "failed" in line.lower() or "error" in line.lower()]
    return "; ".join(line.replace("[Open3D WARNING] ", "") for line in lines) or None


def _tensor(values) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.asarray(values, dtype=np.float32).copy())


def _read_with_open3d(path: str, suffix: str, name: str, mesh_points: int, mesh_sampling: str) -> PointSet:
    o3d = require("open3d", "reading point-cloud and mesh files")

    mesh = None
    with _native_output() as printed:
        if suffix in MESH_ONLY or suffix == ".ply":
            mesh = o3d.io.read_triangle_mesh(path, enable_post_processing=False, print_progress=False)
        if mesh is None or len(mesh.triangles) == 0:
            if suffix in MESH_ONLY:  # vertices without faces: use them as the points
                cloud = o3d.geometry.PointCloud(mesh.vertices)
                if mesh.has_vertex_normals():
                    cloud.normals = mesh.vertex_normals
                if mesh.has_vertex_colors():
                    cloud.colors = mesh.vertex_colors
            else:
                cloud = o3d.io.read_point_cloud(path, remove_nan_points=True, remove_infinite_points=True)
        else:
            o3d.utility.random.seed(0)  # the same file always gives the same points (resumable runs)
            mesh.compute_triangle_normals()
            try:
                cloud = (mesh.sample_points_poisson_disk(mesh_points, use_triangle_normal=True)
                         if mesh_sampling == "poisson" else
                         mesh.sample_points_uniformly(mesh_points, use_triangle_normal=True))
            except RuntimeError as e:  # e.g. a mesh whose triangles have no area
                raise DecodeError(f"{name}: cannot sample points from the mesh ({e})") from None
    reason = _failure(printed[0])
    if reason:
        raise DecodeError(f"{name}: cannot read as a point cloud or mesh ({reason}); the file is corrupt, "
                          f"truncated or not a {suffix} file: remove it or re-export it")
    if len(cloud.points) == 0:
        raise DecodeError(f"{name}: no points could be read (open3d returned an empty cloud); the file is "
                          f"empty, corrupt or not a {suffix} file: remove it or re-export it")
    return PointSet(_tensor(cloud.points), _tensor(cloud.normals) if cloud.has_normals() else None,
                    _tensor(cloud.colors) if cloud.has_colors() else None)


def _read_array(data: bytes, suffix: str, name: str) -> PointSet:
    """``.npy`` / ``.txt`` arrays [P, 3+]: xyz, then normals (columns 3-5), then colours (6-8) when present."""
    import numpy as np

    try:
        if suffix == ".npy":
            arr = np.load(io.BytesIO(data), allow_pickle=False)
        else:  # whitespace- or comma-separated text, one point per line
            arr = np.loadtxt(io.StringIO(data.decode().replace(",", " ")), ndmin=2, dtype=np.float64)
    except (ValueError, UnicodeDecodeError, OSError, EOFError) as e:
        raise DecodeError(f"{name}: cannot read as a {suffix} array of points ({e})") from None
    if arr.ndim != 2 or arr.shape[1] < 3 or arr.shape[0] == 0 or not np.issubdtype(arr.dtype, np.number):
        raise DecodeError(f"{name}: expected a numeric array of shape [points, 3 or more] (x y z ...), "
                          f"got {arr.dtype} {list(arr.shape)}")
    arr = arr[np.isfinite(arr).all(1)]
    if len(arr) == 0:
        raise DecodeError(f"{name}: every point has a NaN or infinite value")
    return PointSet(_tensor(arr[:, :3]), _tensor(arr[:, 3:6]) if arr.shape[1] >= 6 else None,
                    _tensor(arr[:, 6:9]) if arr.shape[1] >= 9 else None)


def read_points(src: Source, name: str = "", mesh_points: int = 1024,
                mesh_sampling: str = "uniform") -> PointSet:
    """Read a point file, or sample points from a mesh, through open3d.

    Args:
        src: a path, or the file's bytes (then ``name`` gives the type by its extension and names errors).
        name: the file name used in errors (and for its extension when ``src`` is bytes).
        mesh_points: how many points to sample from a mesh's surface.
        mesh_sampling: "uniform" (area-weighted) or "poisson" (Poisson-disk: evenly spaced, slower).

    Returns:
        A :class:`PointSet`: xyz [P, 3], normals [P, 3] and colours [P, 3] when the file has them
        (meshes give face normals).

    Raises:
        DecodeError: the file is missing, empty, corrupt or truncated, naming the file.

    >>> read_points("chair.off", mesh_points=2048).xyz.shape  # doctest: +SKIP
    torch.Size([2048, 3])
    """
    name = name or str(src)
    suffix = Path(name).suffix.lower()
    if suffix not in POINT_EXTENSIONS:
        raise DecodeError(f"{name}: not a point-cloud or mesh file type ({', '.join(POINT_EXTENSIONS)})")
    data = read_bytes(src, name)
    if suffix in (".npy", ".txt"):
        return _read_array(data, suffix, name)
    # open3d reads only from a path: shards (bytes) go through a temporary file of the same type.
    if isinstance(src, bytes):
        with tempfile.NamedTemporaryFile(suffix=suffix) as f:
            f.write(data)
            f.flush()
            return _read_with_open3d(f.name, suffix, name, mesh_points, mesh_sampling)
    return _read_with_open3d(str(src), suffix, name, mesh_points, mesh_sampling)
