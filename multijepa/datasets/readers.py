"""Decoders: file or bytes -> tensor, raising :class:`DecodeError` that names the file.

Each modality lists its file extensions here; ``modality_of`` picks the modality of a path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

import torch
from torchvision.io import ImageReadMode, decode_image

from multijepa.errors import DecodeError

EXTENSIONS: dict[str, tuple[str, ...]] = {
    "image": (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"),
    "timeseries": (".ts", ".csv", ".npy", ".npz"),  # read by multijepa.datasets.series
    "audio": (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif"),
}

Source = Union[str, Path, bytes]


def modality_of(path: Union[str, Path]) -> str:
    """The modality a file belongs to, from its extension.

    >>> modality_of("cat.JPG")
    'image'
    """
    suffix = Path(path).suffix.lower()
    for modality, exts in EXTENSIONS.items():
        if suffix in exts:
            return modality
    known = ", ".join(e for exts in EXTENSIONS.values() for e in exts)
    raise DecodeError(f"{path}: unknown file type {suffix or '(no extension)'!r}; multijepa reads {known}")


def _read_bytes(src: Source, name: str) -> bytes:
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


def _decode_with_pil(data: bytes, channels: int) -> torch.Tensor:
    import io

    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("L" if channels == 1 else "RGB")
        arr = np.asarray(im, dtype=np.uint8)
    t = torch.from_numpy(arr.copy())
    return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)


def read_image(src: Source, channels: int = 3, name: str = "") -> torch.Tensor:
    """Decode an image to uint8 [C, H, W] with C = ``channels``; grayscale, palette and RGBA are converted.

    Args:
        src: a path, or the encoded bytes (then ``name`` is used in errors).
        channels: 3 for RGB, 1 for grayscale.

    Raises:
        DecodeError: the file is missing, empty, truncated or not an image.

    >>> read_image("photo.png").shape  # doctest: +SKIP
    torch.Size([3, 480, 640])
    """
    name = name or str(src)
    data = _read_bytes(src, name)
    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    try:
        image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=mode)
    except (RuntimeError, ValueError) as first:
        # torchvision covers JPEG/PNG/WebP/GIF; PIL covers the rest (BMP, TIFF) and is stricter on truncation.
        try:
            image = _decode_with_pil(data, channels)
        except Exception:
            raise DecodeError(f"{name}: cannot decode as an image ({first}); the file is corrupt, "
                              f"truncated or not an image: remove it or re-export it") from None
    if image.ndim == 4:  # animated GIF: keep the first frame
        image = image[0]
    if image.shape[0] != channels:  # torchvision cannot convert some (WebP to grayscale): PIL can
        image = _decode_with_pil(data, channels)
    if image.shape[0] != channels or image.shape[1] == 0 or image.shape[2] == 0:
        raise DecodeError(f"{name}: decoded to an unusable image of shape {tuple(image.shape)}")
    return image


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
    import soundfile as sf

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
                          f"audio (multijepa reads {', '.join(EXTENSIONS['audio'])} through libsndfile): "
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
    import soxr

    name = name or str(src)
    samples, rate = _decode_audio(_read_bytes(src, name), name)
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
