"""Audio: waveforms [B, C, S] -> log-mel [B, C, F, T] -> (freq, time) patch tokens + coords.

The log-mel runs inside the model, batched, on the model's device (a GPU when there is one): the
data loader only decodes, resamples and crops waveforms. ``LogMel`` is usable on its own (the
audio bench's mean-log-mel baseline and its speed measurement use it).

>>> from multijepa.modalities.audio import AudioConfig
>>> tokens, coords = audio_tokenizer(AudioConfig(), dim=32)(torch.zeros(2, 1, 16000))
>>> tokens.shape, coords.shape
(torch.Size([2, 24, 32]), torch.Size([2, 24, 2]))
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from multijepa.core.transformer import masked_moments
from multijepa.tokenizers.image import grid_tokens, patch_conv


def hz_to_mel(f):
    """HTK mel scale: 2595 * log10(1 + f / 700). Works on floats and tensors."""
    if isinstance(f, torch.Tensor):
        return 2595.0 * torch.log10(1.0 + f / 700.0)
    return 2595.0 * math.log10(1.0 + f / 700.0)


def mel_to_hz(m: torch.Tensor) -> torch.Tensor:
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


def mel_filterbank(n_freqs: int, sample_rate: int, n_mels: int, f_min: float, f_max: float,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Triangular filters, peak 1, equally spaced on the HTK mel scale (no area normalisation).

    Args:
        n_freqs: rfft bins, ``n_fft // 2 + 1``; bin k sits at ``k * sample_rate / n_fft`` Hz.

    Returns:
        [n_freqs, n_mels]: ``power [.., n_freqs] @ fb`` gives mel energies.
    """
    freqs = torch.linspace(0.0, sample_rate / 2, n_freqs, dtype=torch.float64)
    edges = mel_to_hz(torch.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2, dtype=torch.float64))
    lower, centre, upper = edges[:-2], edges[1:-1], edges[2:]  # [n_mels] each
    f = freqs.unsqueeze(1)  # [n_freqs, 1]
    rising = (f - lower) / (centre - lower)
    falling = (upper - f) / (upper - centre)
    return torch.clamp(torch.minimum(rising, falling), min=0.0).to(dtype)


class LogMel(nn.Module):
    """Waveforms [B, C, S] -> normalised log-mel [B, C, n_mels, 1 + S // hop], in float32.

    Power STFT (periodic Hann window, centred frames with zero padding), mel filters, 10*log10
    with a floor of 1e-10, then each clip floored at its maximum minus ``top_db`` and normalised
    (``fixed``: (dB - norm_mean) / norm_std; ``clip``: zero mean and unit variance per clip, over
    the bins above that floor; ``bins``: zero mean and unit variance per clip and mel bin, over the
    clip's real frames, which removes a fixed spectral colour such as a speaker's or a microphone's;
    ``bin_means``: each bin minus its mean over the clip's real frames, in units of 10 dB).
    Runs in float32 even under bf16 autocast: the log of small energies needs the precision.

    >>> from multijepa.modalities.audio import AudioConfig
    >>> LogMel.from_config(AudioConfig(sample_rate=8000))(torch.zeros(3, 1, 8000)).shape
    torch.Size([3, 1, 64, 101])
    """

    def __init__(self, sample_rate: int, win_length: int, hop_length: int, n_fft: int, n_mels: int,
                 f_min: float, f_max: float, top_db: float, normalize: str, norm_mean: float, norm_std: float):
        super().__init__()
        self.win_length, self.hop_length, self.n_fft = win_length, hop_length, n_fft
        self.top_db, self.normalize, self.norm_mean, self.norm_std = top_db, normalize, norm_mean, norm_std
        # Buffers, not parameters: they move with the model to its device and are saved with it.
        self.register_buffer("window", torch.hann_window(win_length, periodic=True), persistent=False)
        self.register_buffer("mel_fb", mel_filterbank(n_fft // 2 + 1, sample_rate, n_mels, f_min, f_max),
                             persistent=False)

    @classmethod
    def from_config(cls, cfg) -> "LogMel":
        """The log-mel of an ``audio`` recipe section (``multijepa.modalities.audio.AudioConfig``)."""
        return cls(cfg.sample_rate, cfg.win_length, cfg.hop_length, cfg.fft_size, cfg.n_mels, cfg.f_min,
                   cfg.max_freq, cfg.top_db, cfg.normalize, cfg.norm_mean, cfg.norm_std)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        b, c, s = wave.shape
        real = real_frames(wave, self.hop_length)[:, None, None, :]  # [B, 1, 1, T]
        wave = torch.nan_to_num(wave, nan=0.0)  # padding (NaN) is silence here; its tokens are masked out
        with torch.autocast(wave.device.type, enabled=False):
            spec = torch.stft(wave.reshape(b * c, s).float(), self.n_fft, self.hop_length, self.win_length,
                              self.window, center=True, pad_mode="constant", return_complex=True)
            power = spec.real.square() + spec.imag.square()  # [B*C, n_freqs, T]
            mel = torch.matmul(power.transpose(1, 2), self.mel_fb).transpose(1, 2)  # [B*C, n_mels, T]
            db = 10.0 * torch.log10(mel.clamp_min(1e-10)).reshape(b, c, mel.shape[1], mel.shape[2])
            floor = None
            if self.top_db > 0:
                floor = db.amax(dim=(1, 2, 3), keepdim=True) - self.top_db
                db = torch.maximum(db, floor)
            if self.normalize == "fixed":
                db = (db - self.norm_mean) / self.norm_std
            elif self.normalize == "clip":
                db = self._clip_normalize(db, floor, real)
            elif self.normalize == "bins":
                db = self._clip_normalize(db, None, real, dims=(3,))
            elif self.normalize == "bin_means":
                db = self._clip_normalize(db, None, real, dims=(3,), scale=False) / 10.0
        return db

    @staticmethod
    def _clip_normalize(db: torch.Tensor, floor: Optional[torch.Tensor], real: torch.Tensor,
                        dims: tuple[int, ...] = (1, 2, 3), scale: bool = True) -> torch.Tensor:
        """Zero mean, unit variance per clip, the statistics taken over the bins above the floor of
        the real frames (``real`` bool [B, 1, 1, T], see ``real_frames``).

        Bins at the floor (digital silence) and padding frames are left out of the statistics, so a
        word inside a long padded clip is normalised as it would be on its own. ``dims=(3,)`` with no
        floor gives each mel bin its own statistics over the real frames (``normalize: bins``);
        ``scale=False`` only subtracts the mean (``bin_means``).
        """
        keep = (db > floor) & real if floor is not None else real
        mean, var = masked_moments(db, keep, dims)
        if not scale:
            return db - mean
        return (db - mean) / var.sqrt().clamp_min(1e-5)


class SpectrogramPatchTokenizer(nn.Module):
    """Log-mel, then non-overlapping (freq, time) patches embedded by one strided convolution.

    Tokens are in freq-major order (all time patches of the lowest band first), so the token grid
    is ``(n_mels // patch_f, frames // patch_t)`` and coords are (freq, time) patch indices.
    Frames beyond the last whole time patch are dropped.
    """

    def __init__(self, features: LogMel, channels: int, patch_size: tuple[int, int], dim: int):
        super().__init__()
        self.features = features
        self.proj = patch_conv(nn.Conv2d, channels, dim, patch_size)

    def forward(self, wave: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """wave [B, C, S] -> tokens [B, N, D], coords [B, N, 2] (freq, time)."""
        spec = self.features(wave)  # [B, C, F, T], float32
        return grid_tokens(self.proj(spec.to(self.proj.weight.dtype)))  # coords (freq, time)


def real_frames(wave: torch.Tensor, hop: int) -> torch.Tensor:
    """Waveforms [B, C, S] (NaN = padding) -> bool [B, 1 + S // hop]: the STFT frames (centred at
    k * hop) whose centre is a real sample; a frame centred past the last sample is not real."""
    s = wave.shape[-1]
    centres = torch.arange(1 + s // hop, device=wave.device) * hop
    inside = centres < s
    real = ~wave.isnan().any(1)  # [B, S]
    return real[:, centres.clamp_max(s - 1)] & inside


def audio_valid_tokens(wave: torch.Tensor, cfg) -> torch.Tensor:
    """Waveforms [B, C, S] (NaN = padding) -> bool [B, N]: the tokens that hold sound (``cfg``: the ``audio`` section).

    A time patch is real when at least half of its frames are (``real_frames``); every frequency
    band of a real time patch is real (tokens in freq-major order).

    >>> from multijepa.modalities.audio import AudioConfig
    >>> cfg = AudioConfig(sample_rate=8000, clip_seconds=0.5, n_mels=16, patch_size=(8, 4))
    >>> wave = torch.zeros(1, 1, 4000); wave[..., 2000:] = float("nan")
    >>> audio_valid_tokens(wave, cfg).reshape(2, -1).sum(1).tolist()  # 25 of 50 frames: 6 of 12 patches
    [6, 6]
    """
    b, pt = wave.shape[0], cfg.patch_size[1]
    frames = real_frames(wave, cfg.hop_length)
    whole = frames.shape[1] // pt * pt
    patches = frames[:, :whole].reshape(b, -1, pt).float().mean(-1) >= 0.5  # [B, T]
    bands = cfg.n_mels // cfg.patch_size[0]
    return patches.unsqueeze(1).expand(b, bands, patches.shape[1]).reshape(b, -1)


def audio_tokenizer(cfg, dim: int) -> SpectrogramPatchTokenizer:
    """The recipe's audio tokenizer: ``LogMel.from_config(cfg)`` under ``cfg.patch_size`` patches of width ``dim``."""
    return SpectrogramPatchTokenizer(LogMel.from_config(cfg), cfg.model_channels, cfg.patch_size, dim)
