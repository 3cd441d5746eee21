"""Audio: the ``audio`` recipe section, and clips as log-mel (freq, time) patch tokens.

Files are decoded and resampled in the data loader (``multijepa.readers.read_audio``); the log-mel
(or Kaldi fbank: ``audio.features``) runs inside the tokenizer on the model's device, through
torchaudio. NaN marks padding of a short clip: its tokens are left out of masks, attention and the
loss (``valid_tokens``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Union

import torch

from multijepa.errors import check, require
from multijepa.readers import AUDIO_EXTENSIONS, Source, read_audio
from multijepa.spec import ModalitySpec
from multijepa.tokenizers.audio import (AUDIO_FEATURES, audio_tokenizer, audio_valid_tokens, kaldi_fft_sizes,
                                        mel_filterbank)
from multijepa.transforms import audio_transform, windows


@dataclass(frozen=True)
class AudioConfig:
    """Audio decoding, clip length, log-mel features and the (freq, time) patch tokenizer.

    Files are resampled to ``sample_rate``; training crops (or zero-pads) each to ``clip_seconds`` at a
    random offset; ``embed`` covers a whole file with windows of ``embed_window_seconds`` every
    ``embed_hop_seconds``. Log-mel features are computed on the model's device from the waveforms.
    ``features: fbank`` swaps the log-mel for Kaldi's filterbank (``multijepa.tokenizers.audio.KaldiFbank``:
    the same window, hop, mel bins, band, frame grid and normalisation; a Povey window; FFT size the
    window rounded up to a power of two).
    """

    sample_rate: int = 16000
    clip_seconds: float = 1.0  # training clip length
    channels: Literal["mix", "keep"] = "mix"  # mix: average to mono; keep: keep_channels channels
    keep_channels: int = 2  # with channels=keep: mono files are repeated, other counts are an error
    features: Literal["logmel", "fbank"] = "logmel"  # logmel: STFT + HTK mel filters; fbank: Kaldi's filterbank
    win_ms: float = 25.0  # STFT window (Hann; Povey for fbank) length
    hop_ms: float = 10.0  # STFT hop
    n_fft: int = 0  # 0: the next power of two >= the window length in samples (fbank: that or the window)
    n_mels: int = 64
    f_min: float = 0.0  # Hz
    f_max: float = 0.0  # Hz; 0 means sample_rate / 2
    top_db: float = 80.0  # floor each clip's log-mel at its maximum minus top_db; 0 disables
    # clip: zero mean, unit variance per clip; bins: the same per clip and mel bin over the clip's
    # frames; bin_means: each mel bin minus its mean over the clip's frames, / 10 dB; fixed: (dB -
    # norm_mean) / norm_std
    normalize: Literal["clip", "bins", "bin_means", "fixed", "none"] = "clip"
    norm_mean: float = -30.0  # dB, with normalize=fixed
    norm_std: float = 20.0  # dB, with normalize=fixed
    patch_size: tuple[int, int] = (16, 16)  # (mel bins, frames) per token
    speed_perturb: tuple[float, float] = (1.0, 1.0)  # training: play each clip faster/slower by a random factor
    embed_window_seconds: float = 0.0  # 0: audio.clip_seconds
    embed_hop_seconds: float = 0.0  # 0: half the embedding window

    @property
    def clip_samples(self) -> int:
        return max(1, round(self.clip_seconds * self.sample_rate))

    @property
    def win_length(self) -> int:
        return max(1, round(self.win_ms * self.sample_rate / 1000))

    @property
    def hop_length(self) -> int:
        return max(1, round(self.hop_ms * self.sample_rate / 1000))

    @property
    def fft_size(self) -> int:
        return self.n_fft or 1 << (self.win_length - 1).bit_length()

    @property
    def max_freq(self) -> float:
        return self.f_max or self.sample_rate / 2

    @property
    def model_channels(self) -> int:
        """Channels of every waveform the model sees."""
        return 1 if self.channels == "mix" else self.keep_channels

    @property
    def window_samples(self) -> int:
        """Samples in one embedding window."""
        return max(1, round((self.embed_window_seconds or self.clip_seconds) * self.sample_rate))

    @property
    def window_hop_samples(self) -> int:
        hop = self.embed_hop_seconds * self.sample_rate if self.embed_hop_seconds else self.window_samples / 2
        return max(1, round(hop))

    def frames(self, samples: int) -> int:
        """Frames for ``samples`` samples: centred on samples ``k * hop`` (the STFT's ``center=True``;
        the fbank front end pads the waveform so that Kaldi's frames fall on the same centres)."""
        return 1 + samples // self.hop_length


def validate_audio(a: AudioConfig, where: str) -> None:
    """Reject audio settings that cannot give a log-mel patch grid."""
    check(a.sample_rate >= 1000, where, "audio.sample_rate", f"must be at least 1000 Hz, got {a.sample_rate}")
    check(a.clip_seconds > 0, where, "audio.clip_seconds", "must be positive")
    check(a.keep_channels >= 1, where, "audio.keep_channels", "must be at least 1")
    check(a.win_ms > 0 and a.win_length >= 2, where, "audio.win_ms",
          f"must give a window of at least 2 samples at {a.sample_rate} Hz, got {a.win_ms} ms")
    check(a.hop_ms > 0, where, "audio.hop_ms", "must be positive")
    check(a.n_fft == 0 or a.n_fft >= a.win_length, where, "audio.n_fft",
          f"must be 0 (auto) or at least the window length ({a.win_length} samples)")
    check(0 <= a.f_min < a.max_freq <= a.sample_rate / 2, where, "audio.f_max",
          f"needs 0 <= audio.f_min < audio.f_max <= sample_rate / 2 = {a.sample_rate / 2:g} Hz "
          f"(f_max 0 means sample_rate / 2); got f_min={a.f_min:g}, f_max={a.f_max:g}")
    check(a.top_db >= 0, where, "audio.top_db", "must be 0 (off) or positive")
    check(a.norm_std > 0, where, "audio.norm_std", "must be positive")
    check(0.5 <= a.speed_perturb[0] <= a.speed_perturb[1] <= 2.0, where, "audio.speed_perturb",
          f"must be [low, high] with 0.5 <= low <= high <= 2 (1 = unchanged), got {list(a.speed_perturb)}")
    check(a.embed_window_seconds >= 0 and a.embed_hop_seconds >= 0, where, "audio.embed_window_seconds",
          "embed_window_seconds and embed_hop_seconds must be 0 (automatic) or positive")
    pf, pt = a.patch_size
    check(pf >= 1 and pt >= 1, where, "audio.patch_size", f"must be positive, got {list(a.patch_size)}")
    check(a.n_mels >= 1 and a.n_mels % pf == 0, where, "audio.n_mels",
          f"must be a multiple of audio.patch_size[0]={pf}, got {a.n_mels}")
    for key, samples in (("audio.clip_seconds", a.clip_samples), ("audio.embed_window_seconds", a.window_samples)):
        check(a.frames(samples) >= pt, where, key,
              f"gives {a.frames(samples)} frames at hop {a.hop_ms:g} ms, fewer than audio.patch_size[1]={pt}: "
              f"lengthen the clip or use a smaller time patch")
    check(a.features in AUDIO_FEATURES, where, "audio.features",
          f"must be one of {', '.join(map(repr, AUDIO_FEATURES))}, got {a.features!r}")
    if a.features == "fbank":
        _validate_fbank(a, where)
        return
    fb = mel_filterbank(a.fft_size // 2 + 1, a.sample_rate, a.n_mels, a.f_min, a.max_freq)
    empty = int((fb.sum(0) == 0).sum())
    check(empty == 0, where, "audio.n_mels",
          f"leaves {empty} of {a.n_mels} mel filters without any FFT bin (n_fft={a.fft_size}, "
          f"{a.f_min:g}-{a.max_freq:g} Hz): lower n_mels, raise f_min or use a larger n_fft / win_ms")


def _validate_fbank(a: AudioConfig, where: str) -> None:
    """What Kaldi's fbank cannot do: an FFT size other than the window rounded up to a power of two
    (or the window itself, when even), fewer than 4 mel bins, a mel filter without an FFT bin (Kaldi
    itself stops on that: "You may have set --num-mel-bins too large"; torchaudio's port leaves the
    filter empty). Its filters are checked as torchaudio builds them, so this imports torchaudio."""
    sizes = kaldi_fft_sizes(a.win_length)
    check(a.fft_size in sizes, where, "audio.n_fft",
          f"with audio.features=fbank must be 0 or {' or '.join(map(str, sizes))} (Kaldi's FFT size for a "
          f"window of {a.win_length} samples), got {a.n_fft}: use audio.n_fft=0, or change audio.win_ms")
    check(a.n_mels >= 4, where, "audio.n_mels", f"with audio.features=fbank must be at least 4 (Kaldi), got {a.n_mels}")
    kaldi = require("torchaudio", "the Kaldi fbank front end (audio.features=fbank)").compliance.kaldi
    banks, _ = kaldi.get_mel_banks(a.n_mels, a.fft_size, float(a.sample_rate), float(a.f_min), float(a.max_freq),
                                   100.0, -500.0, 1.0)  # Kaldi's default VTLN settings, no warp
    empty = int((banks.sum(1) == 0).sum())
    check(empty == 0, where, "audio.n_mels",
          f"leaves {empty} of {a.n_mels} Kaldi mel filters without any FFT bin (FFT size {a.fft_size}, "
          f"{a.f_min:g}-{a.max_freq:g} Hz): lower n_mels, raise f_min or lengthen audio.win_ms (Kaldi's FFT "
          f"is the window rounded up to a power of two: a window over {a.fft_size} samples doubles it)")


def audio_grid(a: AudioConfig) -> tuple[int, int]:
    """(mel bands, time patches) of a training clip: (4, 12) for 1 s at 10 ms hops, 64 mels, 16 x 8 patches."""
    return (a.n_mels // a.patch_size[0], a.frames(a.clip_samples) // a.patch_size[1])


def _load(src: Source, a: AudioConfig, name: str, part: Optional[int], g: Optional[torch.Generator]) -> torch.Tensor:
    return audio_transform(read_audio(src, a.sample_rate, a.model_channels, name), a, g)


def _from_tensor(x: torch.Tensor, a: AudioConfig, g: Optional[torch.Generator]) -> torch.Tensor:
    """A raw waveform float [C, S] or [S] at ``audio.sample_rate`` as a training input."""
    return audio_transform(x[None] if x.ndim == 1 else x.float(), a, g)


def _embed_views(item: Union[Source, torch.Tensor], a: AudioConfig, name: str) -> list[list[torch.Tensor]]:
    """One sample seen through windows covering it; a tensor: a waveform [C, S] is cut like a file,
    windows [W, C, L] are taken as they are."""
    if not isinstance(item, torch.Tensor):
        return [list(audio_transform(read_audio(item, a.sample_rate, a.model_channels, name), a, None))]
    if item.ndim == 3:
        return [list(item)]
    return [list(windows(item, a.window_samples, a.window_hop_samples, flush=False,
                         unit=a.hop_length * a.patch_size[1]))]


SPEC = ModalitySpec(
    name="audio", config=AudioConfig, extensions=AUDIO_EXTENSIONS, validate=validate_audio,
    tokenizer=audio_tokenizer, load=_load, from_tensor=_from_tensor, embed_views=_embed_views,
    token_grid=audio_grid, valid_tokens=audio_valid_tokens,
    window_hop_seconds=lambda a: a.window_hop_samples / a.sample_rate, requires=("soundfile", "soxr", "torchaudio"),
    time_axis=lambda a: 1)
