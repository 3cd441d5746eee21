"""Audio: waveforms [B, C, S] -> log-mel [B, C, F, T] -> (freq, time) patch tokens + coords.

The log-mel runs inside the model, batched, on the model's device (a GPU when there is one): the
data loader only decodes, resamples and crops waveforms. ``LogMel`` is usable on its own (the
audio bench's mean-log-mel baseline and its speed measurement use it).

>>> from multijepa.recipe import AudioConfig
>>> tokens, coords = audio_tokenizer(AudioConfig(), dim=32)(torch.zeros(2, 1, 16000))
>>> tokens.shape, coords.shape
(torch.Size([2, 24, 32]), torch.Size([2, 24, 2]))
"""

from __future__ import annotations

import math

import torch
from torch import nn

from multijepa.recipe import AudioConfig


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
    (``fixed``: (dB - norm_mean) / norm_std; ``clip``: zero mean and unit variance per clip).
    Runs in float32 even under bf16 autocast: the log of small energies needs the precision.

    >>> LogMel.from_config(AudioConfig(sample_rate=8000))(torch.zeros(3, 1, 8000)).shape
    torch.Size([3, 1, 64, 101])
    """

    def __init__(self, sample_rate: int, win_length: int, hop_length: int, n_fft: int, n_mels: int,
                 f_min: float, f_max: float, top_db: float = 80.0, normalize: str = "fixed",
                 norm_mean: float = 0.0, norm_std: float = 1.0):
        super().__init__()
        self.win_length, self.hop_length, self.n_fft = win_length, hop_length, n_fft
        self.top_db, self.normalize, self.norm_mean, self.norm_std = top_db, normalize, norm_mean, norm_std
        # Buffers, not parameters: they move with the model to its device and are saved with it.
        self.register_buffer("window", torch.hann_window(win_length, periodic=True), persistent=False)
        self.register_buffer("mel_fb", mel_filterbank(n_fft // 2 + 1, sample_rate, n_mels, f_min, f_max),
                             persistent=False)

    @classmethod
    def from_config(cls, cfg: AudioConfig) -> "LogMel":
        return cls(cfg.sample_rate, cfg.win_length, cfg.hop_length, cfg.fft_size, cfg.n_mels, cfg.f_min,
                   cfg.max_freq, cfg.top_db, cfg.normalize, cfg.norm_mean, cfg.norm_std)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        b, c, s = wave.shape
        with torch.autocast(wave.device.type, enabled=False):
            spec = torch.stft(wave.reshape(b * c, s).float(), self.n_fft, self.hop_length, self.win_length,
                              self.window, center=True, pad_mode="constant", return_complex=True)
            power = spec.real.square() + spec.imag.square()  # [B*C, n_freqs, T]
            mel = torch.matmul(power.transpose(1, 2), self.mel_fb).transpose(1, 2)  # [B*C, n_mels, T]
            db = 10.0 * torch.log10(mel.clamp_min(1e-10)).reshape(b, c, mel.shape[1], mel.shape[2])
            if self.top_db > 0:
                peak = db.amax(dim=(1, 2, 3), keepdim=True)
                db = torch.maximum(db, peak - self.top_db)
            if self.normalize == "fixed":
                db = (db - self.norm_mean) / self.norm_std
            elif self.normalize == "clip":
                mean = db.mean(dim=(1, 2, 3), keepdim=True)
                std = db.std(dim=(1, 2, 3), keepdim=True)
                db = (db - mean) / std.clamp_min(1e-5)
        return db


class SpectrogramPatchTokenizer(nn.Module):
    """Log-mel, then non-overlapping (freq, time) patches embedded by one strided convolution.

    Tokens are in freq-major order (all time patches of the lowest band first), so the token grid
    is ``(n_mels // patch_f, frames // patch_t)`` and coords are (freq, time) patch indices.
    Frames beyond the last whole time patch are dropped.
    """

    def __init__(self, features: LogMel, channels: int, patch_size: tuple[int, int], dim: int):
        super().__init__()
        self.features = features
        self.proj = nn.Conv2d(channels, dim, kernel_size=patch_size, stride=patch_size)
        nn.init.trunc_normal_(self.proj.weight.view(dim, -1), std=0.02)
        nn.init.zeros_(self.proj.bias)

    def forward(self, wave: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """wave [B, C, S] -> tokens [B, N, D], coords [B, N, 2] (freq, time)."""
        spec = self.features(wave)  # [B, C, F, T], float32
        x = self.proj(spec.to(self.proj.weight.dtype))  # [B, D, f, t]
        b, _, f, t = x.shape
        freq, time = torch.meshgrid(torch.arange(f, device=x.device), torch.arange(t, device=x.device),
                                    indexing="ij")
        coords = torch.stack([freq, time], dim=-1).reshape(1, f * t, 2).expand(b, -1, -1).float()
        return x.flatten(2).transpose(1, 2), coords


def audio_tokenizer(cfg: AudioConfig, dim: int) -> SpectrogramPatchTokenizer:
    """The recipe's audio tokenizer: ``LogMel.from_config(cfg)`` under ``cfg.patch_size`` patches of width ``dim``."""
    return SpectrogramPatchTokenizer(LogMel.from_config(cfg), cfg.model_channels, cfg.patch_size, dim)
