"""Audio: waveforms [B, C, S] -> log-mel or Kaldi fbank [B, C, F, T] -> (freq, time) patch tokens + coords.

The features run inside the model, batched, on the model's device (a GPU when there is one): the
data loader only decodes, resamples and crops waveforms. Two front ends (``audio.features``), both
through torchaudio, imported when one is built (a plain install trains images without it):

- ``logmel``: ``LogMel``, a power STFT (``torchaudio.functional.spectrogram``) under HTK mel filters;
- ``fbank``: ``KaldiFbank``, Kaldi's filterbank (``torchaudio.compliance.kaldi.fbank``).

Both give dB on the same frame grid, ``1 + S // hop`` frames centred on samples ``k * hop``, and
share the floor and normalisation. ``LogMel`` is usable on its own (the audio bench's mean-log-mel
baseline and its speed measurement use it).

>>> from multijepa.modalities.audio import AudioConfig
>>> tokens, coords = audio_tokenizer(AudioConfig(), dim=32)(torch.zeros(2, 1, 16000))
>>> tokens.shape, coords.shape
(torch.Size([2, 24, 32]), torch.Size([2, 24, 2]))
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from multijepa.core.transformer import masked_moments
from multijepa.errors import require
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

    The filters of ``LogMel``, and of the recipe check that none is empty (which needs no torchaudio).
    torchaudio's ``melscale_fbanks(mel_scale="htk", norm=None)`` is the same construction, but in
    float32 and with its bins at ``k * (sample_rate // 2) / (n_freqs - 1)`` Hz, off at odd rates
    (0.04 dB at 11025 Hz): we keep ours, computed in float64, so checkpoints embed as before.

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


def kaldi_fft_sizes(win_length: int) -> tuple[int, ...]:
    """The FFT sizes Kaldi's fbank can use for a window of ``win_length`` samples: the next power of
    two (``round_to_power_of_two``) and, when even, the window itself.

    >>> kaldi_fft_sizes(400), kaldi_fft_sizes(512), kaldi_fft_sizes(201)
    ((512, 400), (512,), (256,))
    """
    power = 1 << (win_length - 1).bit_length()
    return (power,) if power == win_length or win_length % 2 else (power, win_length)


def normalize_db(db: torch.Tensor, real: torch.Tensor, top_db: float, normalize: str, norm_mean: float,
                 norm_std: float) -> torch.Tensor:
    """Floor and normalise features in dB [B, C, F, T] (``real``: bool [B, 1, 1, T], see ``real_frames``).

    Each clip is floored at its maximum minus ``top_db`` (0: no floor), then ``fixed``: (dB -
    norm_mean) / norm_std; ``clip``: zero mean and unit variance per clip, over the bins above that
    floor; ``bins``: zero mean and unit variance per clip and mel bin, over the clip's real frames,
    which removes a fixed spectral colour such as a speaker's or a microphone's; ``bin_means``: each
    bin minus its mean over the clip's real frames, in units of 10 dB; ``none``: as it is.
    """
    floor = None
    if top_db > 0:
        floor = db.amax(dim=(1, 2, 3), keepdim=True) - top_db
        db = torch.maximum(db, floor)
    if normalize == "fixed":
        db = (db - norm_mean) / norm_std
    elif normalize == "clip":
        db = _clip_normalize(db, floor, real)
    elif normalize == "bins":
        db = _clip_normalize(db, None, real, dims=(3,))
    elif normalize == "bin_means":
        db = _clip_normalize(db, None, real, dims=(3,), scale=False) / 10.0
    return db


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


def _front_end_settings(cfg) -> tuple:
    """The arguments either front end takes, from an ``audio`` recipe section, in their order."""
    return (cfg.sample_rate, cfg.win_length, cfg.hop_length, cfg.fft_size, cfg.n_mels, cfg.f_min, cfg.max_freq,
            cfg.top_db, cfg.normalize, cfg.norm_mean, cfg.norm_std)


class LogMel(nn.Module):
    """Waveforms [B, C, S] -> normalised log-mel [B, C, n_mels, 1 + S // hop], in float32.

    Power STFT through ``torchaudio.functional.spectrogram`` (periodic Hann window of ``win_length``
    centred in ``n_fft``, centred frames with zero padding), HTK mel filters (``mel_filterbank``),
    10*log10 with a floor of 1e-10, then ``normalize_db``. Runs in float32 even under bf16 autocast:
    the log of small energies needs the precision. Equal to the torch.stft implementation it replaced
    within 1e-5 dB, float32 round-off (tests/test_audio.py keeps that one as a reference).

    >>> from multijepa.modalities.audio import AudioConfig
    >>> LogMel.from_config(AudioConfig(sample_rate=8000))(torch.zeros(3, 1, 8000)).shape
    torch.Size([3, 1, 64, 101])
    """

    def __init__(self, sample_rate: int, win_length: int, hop_length: int, n_fft: int, n_mels: int,
                 f_min: float, f_max: float, top_db: float, normalize: str, norm_mean: float, norm_std: float):
        super().__init__()
        require("torchaudio", "the audio log-mel front end (audio.features=logmel)")
        self.win_length, self.hop_length, self.n_fft = win_length, hop_length, n_fft
        self.norm = dict(top_db=top_db, normalize=normalize, norm_mean=norm_mean, norm_std=norm_std)
        # Our buffers, not torchaudio's transforms (whose buffers are saved in the state dict): they
        # move with the model to its device and stay out of checkpoints, as before.
        self.register_buffer("window", torch.hann_window(win_length, periodic=True), persistent=False)
        self.register_buffer("mel_fb", mel_filterbank(n_fft // 2 + 1, sample_rate, n_mels, f_min, f_max),
                             persistent=False)

    @classmethod
    def from_config(cls, cfg) -> "LogMel":
        """The log-mel of an ``audio`` recipe section (``multijepa.modalities.audio.AudioConfig``)."""
        return cls(*_front_end_settings(cfg))

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        torchaudio = require("torchaudio", "the audio log-mel front end (audio.features=logmel)")
        b, c, s = wave.shape
        real = real_frames(wave, self.hop_length)[:, None, None, :]  # [B, 1, 1, T]
        wave = torch.nan_to_num(wave, nan=0.0)  # padding (NaN) is silence here; its tokens are masked out
        with torch.autocast(wave.device.type, enabled=False):
            spec = torchaudio.functional.spectrogram(
                wave.reshape(b * c, s).float(), pad=0, window=self.window, n_fft=self.n_fft,
                hop_length=self.hop_length, win_length=self.win_length, power=None, normalized=False,
                center=True, pad_mode="constant")  # complex [B*C, n_freqs, T]
            # re^2 + im^2: power=2.0 would take |X| (a square root) and square it again, 35% slower here
            power = spec.real.square() + spec.imag.square()
            mel = torch.matmul(power.transpose(1, 2), self.mel_fb).transpose(1, 2)  # [B*C, n_mels, T]
            db = 10.0 * torch.log10(mel.clamp_min(1e-10)).reshape(b, c, mel.shape[1], mel.shape[2])
            return normalize_db(db, real, **self.norm)


class KaldiFbank(nn.Module):
    """Waveforms [B, C, S] -> normalised Kaldi filterbank [B, C, n_mels, 1 + S // hop], in float32.

    ``torchaudio.compliance.kaldi.fbank`` with Kaldi's defaults (Povey window, DC offset removed
    per frame, pre-emphasis 0.97, mel filters triangular on the mel scale, power spectrum, log
    energies floored at float32's epsilon; no energy term) except: the recipe's window, hop, mel
    bins and band (Kaldi's default band starts at 20 Hz, ours at ``audio.f_min``), no dither, so that
    features are deterministic, and the FFT size ``n_fft`` (one of ``kaldi_fft_sizes``). The log
    energies are then in dB (times 10 / ln 10), so that ``top_db``, ``norm_mean`` and ``norm_std``
    mean what they mean for ``LogMel``, and go through the same ``normalize_db``.

    Frames: each waveform is zero-padded by ``win // 2`` samples in front and ``win - win // 2``
    behind before Kaldi frames it (whole windows, ``snip_edges``), so frame k is centred on sample
    ``k * hop`` and there are ``1 + S // hop`` frames, the centred STFT's grid: the token grid,
    ``real_frames`` and padding work as for ``LogMel``. (Kaldi on the bare waveform gives ``1 + (S
    - win) // hop`` frames starting at sample 0.) All B*C waveforms go through one Kaldi call, laid
    end to end at whole hops; the frames that straddle two of them are dropped. Kaldi works frame by
    frame (no dither, no mean subtraction over frames), so this equals one call per waveform.

    >>> from multijepa.modalities.audio import AudioConfig
    >>> KaldiFbank.from_config(AudioConfig(sample_rate=8000))(torch.zeros(3, 1, 8000)).shape
    torch.Size([3, 1, 64, 101])
    """

    def __init__(self, sample_rate: int, win_length: int, hop_length: int, n_fft: int, n_mels: int,
                 f_min: float, f_max: float, top_db: float, normalize: str, norm_mean: float, norm_std: float):
        super().__init__()
        require("torchaudio", "the Kaldi fbank front end (audio.features=fbank)")
        if n_fft not in kaldi_fft_sizes(win_length):
            raise ValueError(f"Kaldi's fbank takes an FFT size of {' or '.join(map(str, kaldi_fft_sizes(win_length)))} "
                             f"for a window of {win_length} samples, not {n_fft}")
        self.win_length, self.hop_length, self.n_mels = win_length, hop_length, n_mels
        # Kaldi takes lengths in ms and truncates ms * rate / 1000 to samples: half a sample more
        # gives exactly the recipe's sample counts, whatever the float round-off.
        self.kaldi = dict(sample_frequency=float(sample_rate), frame_length=(win_length + 0.5) * 1000 / sample_rate,
                          frame_shift=(hop_length + 0.5) * 1000 / sample_rate, num_mel_bins=n_mels,
                          low_freq=float(f_min), high_freq=float(f_max), dither=0.0, window_type="povey",
                          snip_edges=True, round_to_power_of_two=n_fft == kaldi_fft_sizes(win_length)[0])
        self.norm = dict(top_db=top_db, normalize=normalize, norm_mean=norm_mean, norm_std=norm_std)

    @classmethod
    def from_config(cls, cfg) -> "KaldiFbank":
        """The fbank of an ``audio`` recipe section (``multijepa.modalities.audio.AudioConfig``)."""
        return cls(*_front_end_settings(cfg))

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        torchaudio = require("torchaudio", "the Kaldi fbank front end (audio.features=fbank)")
        b, c, s = wave.shape
        win, hop = self.win_length, self.hop_length
        frames = 1 + s // hop
        real = real_frames(wave, hop)[:, None, None, :]  # [B, 1, 1, T]
        wave = torch.nan_to_num(wave, nan=0.0)
        with torch.autocast(wave.device.type, enabled=False):
            x = F.pad(wave.reshape(b * c, s).float(), (win // 2, win - win // 2))  # frame k centred on k * hop
            per = -(-(s + win) // hop)  # frames per waveform laid end to end; the first `frames` are its own
            x = F.pad(x, (0, per * hop - (s + win))).reshape(-1)
            x = F.pad(x, (0, win))  # so that the last waveform has all `per` frames too: 1 + b*c*per in all
            fbank = torchaudio.compliance.kaldi.fbank(x[None], **self.kaldi)  # [1 + B*C*per, n_mels], ln
            fbank = fbank[:b * c * per].reshape(b, c, per, self.n_mels)[:, :, :frames]
            db = fbank.transpose(2, 3) * (10.0 / math.log(10.0))  # [B, C, n_mels, T]
            return normalize_db(db, real, **self.norm)


# audio.features -> its front end
AUDIO_FEATURES = {"logmel": LogMel, "fbank": KaldiFbank}


def audio_features(cfg) -> nn.Module:
    """The recipe's front end (``audio.features``): waveforms [B, C, S] -> features [B, C, n_mels, 1 + S // hop]."""
    return AUDIO_FEATURES[cfg.features].from_config(cfg)


class SpectrogramPatchTokenizer(nn.Module):
    """Log-mel or fbank (``audio_features``), then non-overlapping (freq, time) patches embedded by
    one strided convolution.

    Tokens are in freq-major order (all time patches of the lowest band first), so the token grid
    is ``(n_mels // patch_f, frames // patch_t)`` and coords are (freq, time) patch indices.
    Frames beyond the last whole time patch are dropped.
    """

    def __init__(self, features: nn.Module, channels: int, patch_size: tuple[int, int], dim: int):
        super().__init__()
        self.features = features
        self.proj = patch_conv(nn.Conv2d, channels, dim, patch_size)

    def forward(self, wave: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """wave [B, C, S] -> tokens [B, N, D], coords [B, N, 2] (freq, time)."""
        spec = self.features(wave)  # [B, C, F, T], float32
        return grid_tokens(self.proj(spec.to(self.proj.weight.dtype)))  # coords (freq, time)


def real_frames(wave: torch.Tensor, hop: int) -> torch.Tensor:
    """Waveforms [B, C, S] (NaN = padding) -> bool [B, 1 + S // hop]: the frames (centred at k * hop,
    for both front ends) whose centre is a real sample; a frame centred past the last sample is not real."""
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
    """The recipe's audio tokenizer: ``audio_features(cfg)`` under ``cfg.patch_size`` patches of width ``dim``."""
    return SpectrogramPatchTokenizer(audio_features(cfg), cfg.model_channels, cfg.patch_size, dim)
