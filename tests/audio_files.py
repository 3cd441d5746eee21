"""Tiny generated audio for the tests: tones, noise and chirps written with soundfile."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import soundfile as sf

FORMATS = {"wav": ("WAV", "PCM_16"), "flac": ("FLAC", "PCM_16"), "ogg": ("OGG", "VORBIS"),
           "mp3": ("MP3", "MPEG_LAYER_III")}


def tone(rate: int, seconds: float, freqs=(440.0,), amplitude: float = 0.5) -> np.ndarray:
    """[frames, channels]: channel c is a sine at ``freqs[c]`` Hz."""
    t = np.arange(int(round(rate * seconds))) / rate
    return np.stack([amplitude * np.sin(2 * np.pi * f * t) for f in freqs], 1).astype(np.float32)


def chirp(rate: int, seconds: float, f0: float = 200.0, f1: float = 3000.0, seed: int = 0) -> np.ndarray:
    """[frames, 1]: a rising sweep with a little noise, a stand-in for a voice."""
    t = np.arange(int(round(rate * seconds))) / rate
    phase = 2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * max(seconds, 1e-3)))
    noise = np.random.default_rng(seed).normal(0, 0.02, len(t))
    return (0.4 * np.sin(phase) + noise).astype(np.float32)[:, None]


def write(path: Path, samples: np.ndarray, rate: int, subtype: str | None = None) -> Path:
    """Write ``samples`` [frames, channels] in the format the suffix names."""
    fmt, default = FORMATS[path.suffix.lstrip(".")]
    sf.write(path, samples, rate, format=fmt, subtype=subtype or default)
    return path


def encoded(ext: str, samples: np.ndarray, rate: int) -> bytes:
    buf = io.BytesIO()
    fmt, subtype = FORMATS[ext]
    sf.write(buf, samples, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def dominant_hz(wave: np.ndarray, rate: int) -> float:
    """The frequency of the largest FFT peak of a 1-D signal."""
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    return float(np.argmax(spectrum) * rate / len(wave))


def make_audio_folder(root: Path, per_class: int = 6, rate: int = 8000) -> Path:
    """A labelled folder: 'low' and 'high' chirps of 0.3-0.9 s, as WAV, FLAC and MP3."""
    exts = ["wav", "flac", "mp3"]
    for label, (f0, f1) in {"low": (150.0, 900.0), "high": (1200.0, 3500.0)}.items():
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            seconds = 0.3 + 0.6 * i / max(per_class - 1, 1)
            write(root / label / f"{label}_{i}.{exts[i % len(exts)]}", chirp(rate, seconds, f0, f1, seed=i), rate)
    return root
