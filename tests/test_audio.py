"""Audio units: reading (formats, rates, channels, bit depths, bad files), log-mel against a float64
reference and against the torch.stft implementation it replaced, the Kaldi fbank front end against
torchaudio's, the patch tokenizer, crops and windows, recipe validation, masks, data sets and shards."""

import dataclasses
import json
import math
import sys
import tarfile
import warnings

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
import torchaudio

from audio_files import FORMATS, chirp, dominant_hz, encoded, make_audio_folder, tone, write
from conftest import AUDIO_RECIPE, TINY_AUDIO
from multijepa.core.masking import sample_block_masks
from multijepa.datasets.files import FileDataset, list_folder, load_input
from multijepa.datasets.mixed import build_train_loader
from multijepa.datasets.shards import ShardDataset, write_shards
from multijepa.errors import DataError, DecodeError, MissingExtraError, RecipeError
from multijepa.modalities import MODALITIES, modality_of
from multijepa.readers import read_audio
from multijepa.recipe import AudioConfig, load_recipe, token_grid
from multijepa.modalities.audio import validate_audio
from multijepa.tokenizers.audio import (KaldiFbank, LogMel, audio_tokenizer, audio_valid_tokens, mel_filterbank,
                                        normalize_db, real_frames)
from multijepa.train import build_model
from multijepa.transforms import crop_or_pad, windows as cut_windows


@pytest.fixture(scope="module")
def audio_folder(tmp_path_factory):
    return make_audio_folder(tmp_path_factory.mktemp("audio"))


# --------------------------------------------------------------------------- reading


@pytest.mark.parametrize("ext", sorted(FORMATS))
@pytest.mark.parametrize("rate", [8000, 16000, 22050, 44100, 48000])
@pytest.mark.parametrize("stereo", [False, True])
def test_read_audio__formats_rates_and_channels(tmp_path, ext, rate, stereo):
    freqs = (440.0, 440.0) if stereo else (440.0,)
    path = write(tmp_path / f"x.{ext}", tone(rate, 0.5, freqs), rate)
    wave = read_audio(path, 16000)
    assert wave.dtype == torch.float32 and wave.shape[0] == 1
    assert abs(wave.shape[1] - 8000) <= 0.05 * 8000  # lossy codecs may add or trim an encoder delay
    assert abs(dominant_hz(wave[0].numpy(), 16000) - 440.0) < 5.0
    middle = wave[0, 2000:6000].abs().max().item()
    assert 0.4 < middle < 0.6  # amplitude kept through decode, mix-down and resampling


def test_read_audio__keep_channels_and_mix(tmp_path):
    path = write(tmp_path / "lr.wav", tone(16000, 0.25, (440.0, 1000.0)), 16000)
    kept = read_audio(path, 16000, channels=2)
    assert kept.shape == (2, 4000)
    assert abs(dominant_hz(kept[0].numpy(), 16000) - 440) < 5 and abs(dominant_hz(kept[1].numpy(), 16000) - 1000) < 5
    assert torch.allclose(read_audio(path, 16000, channels=1)[0], kept.mean(0), atol=1e-6)
    mono = write(tmp_path / "m.wav", tone(16000, 0.25), 16000)
    assert read_audio(mono, 16000, channels=2).shape == (2, 4000)
    three = write(tmp_path / "three.wav", tone(16000, 0.25, (440.0, 500.0, 600.0)), 16000)
    with pytest.raises(DecodeError, match="three.wav: has 3 audio channels.*audio.channels=mix"):
        read_audio(three, 16000, channels=2)


@pytest.mark.parametrize("subtype,tolerance", [("PCM_U8", 1e-2), ("PCM_16", 1e-4), ("PCM_24", 1e-6),
                                               ("PCM_32", 1e-6), ("FLOAT", 1e-7), ("DOUBLE", 1e-7)])
def test_read_audio__wav_bit_depths_scaled_to_unit_range(tmp_path, subtype, tolerance):
    samples = tone(8000, 0.1, (300.0,), amplitude=0.9)
    wave = read_audio(write(tmp_path / "x.wav", samples, 8000, subtype), 8000)
    assert np.abs(wave[0].numpy() - samples[:, 0]).max() < tolerance


def test_read_audio__flac_24_bit_and_aiff(tmp_path):
    samples = tone(22050, 0.1, (300.0,), amplitude=0.9)
    sf.write(tmp_path / "x.flac", samples, 22050, subtype="PCM_24")
    sf.write(tmp_path / "x.aiff", samples, 22050, subtype="PCM_16")
    for name in ("x.flac", "x.aiff"):
        assert np.abs(read_audio(tmp_path / name, 22050)[0].numpy() - samples[:, 0]).max() < 1e-4


def test_read_audio__bytes_use_the_given_name(tmp_path):
    data = encoded("flac", tone(8000, 0.2), 8000)
    assert read_audio(data, 8000, name="shard.tar:key.flac").shape == (1, 1600)
    with pytest.raises(DecodeError, match="shard.tar:bad.wav"):
        read_audio(b"not audio at all" * 10, 8000, name="shard.tar:bad.wav")


def test_read_audio__resampler_keeps_the_band_and_removes_aliases():
    rate = 48000
    data = encoded("wav", tone(rate, 0.5, (1000.0,), 0.4) + tone(rate, 0.5, (5000.0,), 0.4), rate)
    down = read_audio(data, 8000, name="x.wav")[0].numpy()  # 5 kHz is above the new Nyquist (4 kHz)
    spectrum = np.abs(np.fft.rfft(down * np.hanning(len(down))))
    hz = np.fft.rfftfreq(len(down), 1 / 8000)
    kept = spectrum[np.abs(hz - 1000) < 20].max()
    alias = spectrum[np.abs(hz - 3000) < 100].max()  # where 5 kHz would fold without a good low-pass
    assert 20 * np.log10(alias / kept) < -60
    assert abs(np.abs(down[1000:3000]).max() - 0.4) < 0.02


def _truncated(ext, tmp_path):
    data = encoded(ext, tone(16000, 1.0, (440.0, 660.0)), 16000)
    return data[: len(data) // 2]


@pytest.mark.parametrize("name,content,match", [
    ("empty.wav", b"", "empty"),
    ("text.wav", b"hello, I am not audio\n" * 20, "cannot decode as audio"),
    ("garbage.flac", bytes(range(256)) * 8, "cannot decode as audio"),
    ("image.mp3", bytes.fromhex("89504e470d0a1a0a") + bytes(200), "cannot decode as audio"),
    ("half.wav", "wav", "truncated"),
    ("half.flac", "flac", "truncated|cannot decode"),
    ("half.ogg", "ogg", "truncated|cannot decode"),
    ("half.mp3", "mp3", "truncated|cannot decode"),
    ("header_only.wav", "header", "truncated|cannot decode"),
    ("no_frames.wav", "zero", "no audio samples"),
    ("nan.wav", "nan", "NaN"),
])
def test_read_audio__bad_files_raise_naming_the_file(tmp_path, name, content, match):
    path = tmp_path / name
    if content in FORMATS:
        content = _truncated(content, tmp_path)
    elif content == "header":
        content = encoded("wav", tone(16000, 1.0), 16000)[:44]
    elif content == "zero":
        content = encoded("wav", np.zeros((0, 1), np.float32), 16000)
    elif content == "nan":
        sf.write(path, np.full((100, 1), np.nan, np.float32), 8000, subtype="FLOAT")
        content = path.read_bytes()
    path.write_bytes(content)
    with pytest.raises(DecodeError, match=match) as e:
        read_audio(path, 16000)
    assert str(path) in str(e.value)


def test_read_audio__missing_file_and_modality_of():
    with pytest.raises(DecodeError, match="no such file"):
        read_audio("/nonexistent/x.wav", 16000)
    assert {modality_of(f"a.{e}") for e in ("wav", "FLAC", "ogg", "mp3", "opus", "aiff")} == {"audio"}


# --------------------------------------------------------------------------- log-mel


def reference_log_mel(wave: np.ndarray, rate: int, win: int, hop: int, n_fft: int, n_mels: int,
                      f_min: float, f_max: float) -> np.ndarray:
    """10*log10 mel power [n_mels, frames] by a direct DFT in float64 and the HTK mel formula, written
    independently of the library: explicit framing and padding, a DFT matrix, a loop over filters."""
    mel = lambda f: 2595.0 * math.log10(1.0 + f / 700.0)  # noqa: E731
    hz = lambda m: 700.0 * (10.0 ** (m / 2595.0) - 1.0)  # noqa: E731
    x = np.concatenate([np.zeros(n_fft // 2), wave.astype(np.float64), np.zeros(n_fft // 2)])
    frames = 1 + (len(x) - n_fft) // hop
    window = np.zeros(n_fft)
    n = np.arange(win)
    window[(n_fft - win) // 2:(n_fft - win) // 2 + win] = 0.5 - 0.5 * np.cos(2 * np.pi * n / win)  # periodic Hann
    k = np.arange(n_fft // 2 + 1)[:, None]
    dft = np.exp(-2j * np.pi * k * np.arange(n_fft)[None, :] / n_fft)
    power = np.stack([np.abs(dft @ (x[t * hop:t * hop + n_fft] * window)) ** 2 for t in range(frames)], 1)
    points = [hz(mel(f_min) + (mel(f_max) - mel(f_min)) * i / (n_mels + 1)) for i in range(n_mels + 2)]
    bins = np.arange(n_fft // 2 + 1) * rate / n_fft
    fb = np.zeros((n_mels, len(bins)))
    for m in range(n_mels):
        lo, mid, hi = points[m], points[m + 1], points[m + 2]
        for j, f in enumerate(bins):
            if lo < f <= mid:
                fb[m, j] = (f - lo) / (mid - lo)
            elif mid < f < hi:
                fb[m, j] = (hi - f) / (hi - mid)
    return 10 * np.log10(np.maximum(fb @ power, 1e-10))


@pytest.mark.parametrize("rate,win_ms,hop_ms,n_mels,f_min,f_max", [
    (16000, 25.0, 10.0, 40, 0.0, 8000.0), (8000, 32.0, 8.0, 24, 100.0, 3800.0), (22050, 20.0, 12.5, 32, 30.0, 0.0)])
def test_log_mel__matches_float64_dft_reference(rate, win_ms, hop_ms, n_mels, f_min, f_max):
    cfg = AudioConfig(sample_rate=rate, win_ms=win_ms, hop_ms=hop_ms, n_mels=n_mels, f_min=f_min, f_max=f_max,
                      top_db=0.0, normalize="none", patch_size=(1, 1))
    rng = np.random.default_rng(0)
    wave = chirp(rate, 0.3)[:, 0] + 0.05 * rng.normal(size=int(round(0.3 * rate))).astype(np.float32)
    ours = LogMel.from_config(cfg)(torch.from_numpy(wave).view(1, 1, -1))[0, 0].double().numpy()
    ref = reference_log_mel(wave, rate, cfg.win_length, cfg.hop_length, cfg.fft_size, n_mels, f_min, cfg.max_freq)
    assert ours.shape == ref.shape == (n_mels, cfg.frames(len(wave)))
    assert np.abs(ours - ref).max() < 2e-3  # dB: float32 STFT vs float64 DFT


def test_mel_filterbank__triangles_peak_at_one_and_cover_the_band():
    fb = mel_filterbank(257, 16000, 40, 0.0, 8000.0)
    assert fb.shape == (257, 40) and (fb >= 0).all() and (fb.sum(0) > 0).all()
    assert fb.max(0).values.min() > 0.5  # a bin lies near each peak: filters are wider than the bin spacing
    assert (fb[1:-1].sum(1) > 0).all()  # every interior bin falls under some filter


def test_log_mel__floor_normalisation_batching_and_bf16():
    cfg = AudioConfig(sample_rate=8000, normalize="none", top_db=30.0)
    x = torch.from_numpy(np.stack([chirp(8000, 0.5)[:, 0], 0.1 * chirp(8000, 0.5, seed=1)[:, 0]]))[:, None]
    db = LogMel.from_config(cfg)(x)
    assert torch.allclose(db.amax((1, 2, 3)) - db.amin((1, 2, 3)), torch.tensor([30.0, 30.0]), atol=1e-4)
    fixed = LogMel.from_config(AudioConfig(sample_rate=8000, top_db=30.0, normalize="fixed", norm_mean=-20.0,
                                           norm_std=10.0))(x)
    assert torch.allclose(fixed, (db + 20.0) / 10.0, atol=1e-5)
    clip = LogMel.from_config(AudioConfig(sample_rate=8000, normalize="clip"))(x)
    real = clip[..., :-1]  # statistics over the frames centred on a sample (the last is centred past the end)
    assert torch.allclose(real.mean((1, 2, 3)), torch.zeros(2), atol=1e-4)
    assert torch.allclose(real.std((1, 2, 3), unbiased=False), torch.ones(2), atol=1e-4)
    padded = LogMel.from_config(AudioConfig(sample_rate=8000, normalize="clip"))(F.pad(x, (0, 12000)))
    # 3 s of zero padding moves the statistics only through the 1-2 frames that straddle the end of the clip
    assert (padded[..., :clip.shape[-1] - 2] - clip[..., :-2]).abs().max() < 0.2
    marked = LogMel.from_config(AudioConfig(sample_rate=8000, normalize="clip"))(
        F.pad(x, (0, 12000), value=float("nan")))  # padding marked as such: no effect at all
    assert torch.allclose(marked[..., :clip.shape[-1]], clip, atol=1e-5)
    bins = LogMel.from_config(AudioConfig(sample_rate=8000, normalize="bins"))(x)[..., :-1]
    assert torch.allclose(bins.mean(-1), torch.zeros(2, 1, 64), atol=1e-4)  # each mel bin over the clip's frames
    live = bins.std(-1, unbiased=False) > 0.5  # bins that vary at all come out with unit variance
    assert live.float().mean() > 0.9 and torch.allclose(bins.std(-1, unbiased=False)[live], torch.ones(()), atol=1e-4)
    marked_bins = LogMel.from_config(AudioConfig(sample_rate=8000, normalize="bins"))(
        F.pad(x, (0, 12000), value=float("nan")))
    assert torch.allclose(marked_bins[..., :bins.shape[-1]], bins, atol=1e-4)
    means = LogMel.from_config(AudioConfig(sample_rate=8000, top_db=30.0, normalize="bin_means"))(x)[..., :-1]
    assert torch.allclose(means.mean(-1), torch.zeros(2, 1, 64), atol=1e-4)  # variances kept, in tens of dB
    assert torch.allclose(means.std(-1), db[..., :-1].std(-1) / 10.0, atol=1e-4)
    single = LogMel.from_config(cfg)(x[1:])
    assert torch.allclose(single, db[1:], atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        in_bf16 = LogMel.from_config(cfg)(x)
    assert in_bf16.dtype == torch.float32 and torch.allclose(in_bf16, db, atol=1e-4)


def old_log_mel(wave: torch.Tensor, cfg: AudioConfig) -> torch.Tensor:
    """The log-mel as multijepa computed it before torchaudio (torch.stft, |X|^2 as re^2 + im^2, our
    filterbank), kept to pin that the torchaudio front end embeds existing checkpoints the same."""
    b, c, s = wave.shape
    real = real_frames(wave, cfg.hop_length)[:, None, None, :]
    spec = torch.stft(torch.nan_to_num(wave, nan=0.0).reshape(b * c, s).float(), cfg.fft_size, cfg.hop_length,
                      cfg.win_length, torch.hann_window(cfg.win_length, periodic=True), center=True,
                      pad_mode="constant", return_complex=True)
    power = spec.real.square() + spec.imag.square()
    fb = mel_filterbank(cfg.fft_size // 2 + 1, cfg.sample_rate, cfg.n_mels, cfg.f_min, cfg.max_freq)
    mel = torch.matmul(power.transpose(1, 2), fb).transpose(1, 2)
    db = 10.0 * torch.log10(mel.clamp_min(1e-10)).reshape(b, c, mel.shape[1], mel.shape[2])
    return normalize_db(db, real, cfg.top_db, cfg.normalize, cfg.norm_mean, cfg.norm_std)


@pytest.mark.parametrize("settings,pad", [
    (dict(normalize="none", top_db=0.0), None),  # the audio recipe's rate, window and hop, raw dB
    (dict(normalize="bin_means"), "nan"),  # the recipe's normalisation, a clip padded (marked) to 1 s
    (dict(sample_rate=8000, normalize="bins", channels="keep"), "zeros"),  # stereo, zero padding
    (dict(sample_rate=11025, n_mels=40, normalize="clip", top_db=60.0), "nan"),  # an odd rate
    (dict(sample_rate=22050, win_ms=20.0, hop_ms=12.5, f_min=30.0, normalize="fixed"), None),
    (dict(n_mels=128, n_fft=1024, normalize="none", top_db=80.0), None),  # the AudioSet variant's filters
])
def test_log_mel__torchaudio_front_end_equals_the_torch_stft_implementation(settings, pad):
    cfg = AudioConfig(**settings)
    g = torch.Generator().manual_seed(0)
    wave = 0.3 * torch.randn(3, cfg.model_channels, cfg.sample_rate, generator=g)
    if pad:
        wave[1, :, cfg.sample_rate // 3:] = float("nan") if pad == "nan" else 0.0
    new, old = LogMel.from_config(cfg)(wave), old_log_mel(wave, cfg)
    assert new.shape == old.shape == (3, cfg.model_channels, cfg.n_mels, cfg.frames(cfg.sample_rate))
    assert torch.isfinite(new).all() and (new - old).abs().max() < 1e-5  # float32 round-off (measured <= 4e-6)


def kaldi_reference(wave: torch.Tensor, rate: int, win_ms: float, hop_ms: float, **kaldi) -> torch.Tensor:
    """torchaudio's Kaldi fbank of one waveform [S], padded so that frame k is centred on sample k * hop
    -> [n_mels, 1 + S // hop] in natural-log units."""
    win, hop = round(win_ms * rate / 1000), round(hop_ms * rate / 1000)
    padded = F.pad(wave, (win // 2, win - win // 2))
    out = torchaudio.compliance.kaldi.fbank(padded[None], sample_frequency=rate, frame_length=win_ms,
                                            frame_shift=hop_ms, dither=0.0, **kaldi)
    assert out.shape[0] == 1 + len(wave) // hop
    return out.T


@pytest.mark.parametrize("settings", [
    dict(sample_rate=8000, n_mels=40),  # 25 ms / 10 ms: 200 / 80 samples, 256-point FFT
    dict(sample_rate=16000, win_ms=20.0, hop_ms=12.5, n_mels=32, f_min=60.0, f_max=7000.0, channels="keep"),
    dict(sample_rate=8000, n_mels=24, n_fft=200),  # the window as the FFT size (no rounding up)
])
def test_kaldi_fbank__equals_torchaudio_fbank_per_waveform_before_normalisation(settings):
    cfg = AudioConfig(features="fbank", normalize="none", top_db=0.0, **settings)
    g = torch.Generator().manual_seed(1)
    wave = 0.3 * torch.randn(3, cfg.model_channels, 3001, generator=g)  # not a whole number of hops
    ours = KaldiFbank.from_config(cfg)(wave)
    assert ours.shape == (3, cfg.model_channels, cfg.n_mels, cfg.frames(3001)) and torch.isfinite(ours).all()
    assert torch.equal(ours, KaldiFbank.from_config(cfg)(wave))  # deterministic: no dither
    ref = torch.stack([kaldi_reference(w, cfg.sample_rate, cfg.win_ms, cfg.hop_ms, num_mel_bins=cfg.n_mels,
                                       low_freq=cfg.f_min, high_freq=cfg.max_freq,
                                       round_to_power_of_two=cfg.n_fft == 0) for w in wave.reshape(-1, 3001)])
    assert (ours.reshape(ref.shape) * (math.log(10.0) / 10.0) - ref).abs().max() < 1e-5  # dB back to ln


def test_kaldi_fbank__token_grid_padding_and_normalisation_as_the_log_mel():
    cfg = AudioConfig(sample_rate=8000, clip_seconds=0.5, n_mels=16, patch_size=(4, 4), features="fbank")
    x = torch.from_numpy(np.stack([chirp(8000, 0.5)[:, 0], 0.1 * chirp(8000, 0.5, seed=1)[:, 0]]))[:, None]
    tokens, coords = audio_tokenizer(cfg, dim=8)(x)
    assert tokens.shape == (2, 4 * 12, 8) and torch.isfinite(tokens).all()
    for samples in (960, 4000, 4321):  # an embedding window padded to whole time patches, a clip, any length
        n = audio_tokenizer(cfg, dim=8)(torch.zeros(1, 1, samples))[0].shape[1]
        assert n == audio_valid_tokens(torch.zeros(1, 1, samples), cfg).shape[1] == 4 * (cfg.frames(samples) // 4)
    for mode in ("clip", "bins", "bin_means"):  # padding marked as such: no effect on the real frames
        c = dataclasses.replace(cfg, normalize=mode)
        alone = KaldiFbank.from_config(c)(x)
        marked = KaldiFbank.from_config(c)(F.pad(x, (0, 4000), value=float("nan")))
        assert torch.allclose(marked[..., :alone.shape[-1]], alone, atol=1e-4)
    raw = KaldiFbank.from_config(dataclasses.replace(cfg, normalize="none", top_db=30.0))(x)
    assert torch.allclose(raw.amax((1, 2, 3)) - raw.amin((1, 2, 3)), torch.tensor([30.0, 30.0]), atol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        in_bf16 = KaldiFbank.from_config(cfg)(x)
    assert in_bf16.dtype == torch.float32 and torch.allclose(in_bf16, KaldiFbank.from_config(cfg)(x), atol=1e-5)


@pytest.mark.parametrize("features", ["logmel", "fbank"])
def test_audio_tokenizer__front_end_keeps_nothing_in_the_state_dict(features):
    cfg = AudioConfig(sample_rate=8000, n_mels=16, patch_size=(4, 4), features=features)
    assert sorted(audio_tokenizer(cfg, dim=8).state_dict()) == ["proj.bias", "proj.weight"]  # as checkpoints hold


def test_audio_features__without_torchaudio_names_the_extra(monkeypatch):
    import multijepa.tokenizers.audio as module

    assert "torchaudio" not in vars(module)  # imported where a front end is built, not with the package
    monkeypatch.setitem(sys.modules, "torchaudio", None)  # as if not installed
    for features in ("logmel", "fbank"):
        with pytest.raises(MissingExtraError, match=r"(?s)audio\.features=.*pip install 'multijepa\[audio\]'"):
            audio_tokenizer(AudioConfig(features=features), dim=8)
    with pytest.raises(MissingExtraError, match="the audio modality"):
        build_model(load_recipe(AUDIO_RECIPE, TINY_AUDIO))


def test_pretrain__tiny_audio_run_on_kaldi_fbank_features(tmp_path, audio_folder):
    from multijepa.embed import load as load_model
    from multijepa.train import pretrain

    recipe = load_recipe(AUDIO_RECIPE, TINY_AUDIO + ["audio.features=fbank", f"data.path={audio_folder}",
                                                     f"run.dir={tmp_path / 'run'}", "train.steps=3"])
    pretrain(recipe)
    rows = [json.loads(r) for r in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert rows and all(math.isfinite(r["loss"]) for r in rows if "loss" in r)
    model = load_model(tmp_path / "run/last.pt")
    assert model.recipe.audio.features == "fbank"
    assert np.isfinite(model.embed([torch.zeros(1, 4321)])).all()  # an embedding window of any length


# --------------------------------------------------------------------------- tokenizer, recipe, masks


def test_audio_tokenizer__shapes_freq_major_coords_and_backward():
    cfg = AudioConfig(sample_rate=8000, clip_seconds=0.5, n_mels=16, patch_size=(4, 4), channels="keep")
    tok = audio_tokenizer(cfg, dim=24)
    wave = torch.randn(3, 2, cfg.clip_samples, requires_grad=True)
    tokens, coords = tok(wave)
    assert tokens.shape == (3, 4 * 12, 24) and coords.shape == (3, 48, 2)
    assert coords[0, :3].tolist() == [[0, 0], [0, 1], [0, 2]] and coords[0, 12].tolist() == [1, 0]
    tokens.sum().backward()
    assert tok.proj.weight.grad is not None and torch.isfinite(tok.proj.weight.grad).all()
    assert not [n for n, _ in tok.named_parameters() if "mel" in n or "window" in n]  # buffers, not weights


def test_audio_model__forward_backward_on_the_tiny_recipe():
    recipe = load_recipe(AUDIO_RECIPE, TINY_AUDIO + ["loss.regularizer=sigreg"])
    assert token_grid(recipe) == (4, 12)
    model = build_model(recipe)
    ctx, tgt = sample_block_masks(token_grid(recipe), recipe.mask, 4, torch.Generator().manual_seed(0))
    x = 0.3 * torch.randn(4, 1, recipe.audio.clip_samples)
    out = model({"audio": {"input": x, "context_idx": ctx, "target_idx": tgt}})
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and out["target_pooled"].shape == (4, 32)


def test_audio_masks__whole_time_span_blocks_cover_every_mel_band():
    recipe = load_recipe(AUDIO_RECIPE, TINY_AUDIO + ["mask.full_span_axes=[0]"])
    f, t = token_grid(recipe)
    _, target = sample_block_masks((f, t), recipe.mask, 8, torch.Generator().manual_seed(0))
    for block in target.reshape(-1, target.shape[-1]):
        rows, cols = block // t, block % t
        for c in cols.unique():
            assert sorted(rows[cols == c].tolist()) == list(range(f))


@pytest.mark.parametrize("override,key", [
    ("audio.n_mels=18", "audio.n_mels"),  # not a multiple of patch 4
    ("audio.f_max=5000", "audio.f_max"),  # above Nyquist at 8 kHz
    ("audio.clip_seconds=0.02", "audio.clip_seconds"),  # fewer frames than one time patch
    ("audio.embed_window_seconds=0.02", "audio.embed_window_seconds"),
    ("audio.n_mels=400", "audio.n_mels"),  # mel filters narrower than FFT bins
    ("audio.channels=both", "audio.channels"),
    ("audio.patch_size=[4]", "audio.patch_size"),
    ("mask.full_span_axes=[2]", "mask.full_span_axes"),
    ("mask.target_scale=[0.001,0.01]", "mask.target_scale"),
    ("audio.features=mfcc", "audio.features"),
    ("audio.features=fbank audio.n_fft=1024", "audio.n_fft"),  # Kaldi: 256 (or the window, 200) at 25 ms
    ("audio.features=fbank audio.n_mels=96", "audio.n_mels"),  # Kaldi filters narrower than FFT bins
])
def test_audio_recipe__impossible_values_name_the_key(override, key):
    with pytest.raises(RecipeError, match=f"'{key}'"):
        load_recipe(AUDIO_RECIPE, TINY_AUDIO + override.split())
    with pytest.raises(RecipeError, match="'audio.features' must be one of 'logmel', 'fbank'"):
        validate_audio(AudioConfig(features="mfcc"), "python")  # built in code, not from a recipe


@pytest.mark.parametrize("win_ms", [25.0, 25.125])  # 200 samples at 8 kHz, and an odd 201
def test_audio_recipe__fbank_validation_accepts_exactly_what_kaldi_runs(win_ms):
    """Accepted settings build and give no dead mel bin on noise; rejected ones fail in Kaldi, cannot
    be honoured (an FFT size Kaldi does not take) or leave a bin at Kaldi's floor."""
    noise = 0.3 * torch.randn(2, 1, 1200, generator=torch.Generator().manual_seed(0))
    floor = 10.0 * math.log10(torch.finfo(torch.float32).eps)
    for n_fft in (0, 200, 201, 256, 512):
        for n_mels in (3, 4, 40, 84, 88):  # 88 leaves a filter empty
            cfg = AudioConfig(sample_rate=8000, win_ms=win_ms, n_fft=n_fft, n_mels=n_mels, patch_size=(1, 1),
                              features="fbank", normalize="none", top_db=0.0)
            try:
                validate_audio(cfg, "sweep")
                accepted = True
            except RecipeError:
                accepted = False
            try:
                out = KaldiFbank.from_config(cfg)(noise)
                works = bool(torch.isfinite(out).all() and ((out - floor).abs() > 1e-3).any(-1).all())
            except (AssertionError, ValueError):  # Kaldi's asserts; ours for an FFT size it cannot use
                works = False
            assert accepted == works, (win_ms, n_fft, n_mels, accepted, works)


def test_audio_recipe__documented_audioset_variant_loads_and_builds():
    header = AUDIO_RECIPE.read_text().split("AudioSet-style variant")[1].split("(n_fft=1024")[0]
    overrides = [w for line in header.splitlines()[1:] for w in line.lstrip("#").split() if "=" in w]
    recipe = load_recipe(AUDIO_RECIPE, overrides)
    assert recipe.audio.n_mels == 128 and recipe.audio.clip_seconds == 10.0 and token_grid(recipe) == (8, 62)
    tokens, _ = audio_tokenizer(recipe.audio, 8)(torch.zeros(1, 1, recipe.audio.clip_samples))
    assert tokens.shape == (1, 496, 8)


# --------------------------------------------------------------------------- crops, windows, data


def test_crop_or_pad__random_in_training_fixed_otherwise():
    wave = torch.arange(10.0).view(1, 10)
    assert crop_or_pad(wave, 4, None, pad_anywhere=True).tolist() == [[0, 1, 2, 3]]
    assert crop_or_pad(wave, 13, None, pad_anywhere=True).nan_to_num(-1).tolist() == [list(range(10)) + [-1, -1, -1]]
    crops = {tuple(crop_or_pad(wave, 4, torch.Generator().manual_seed(s), pad_anywhere=True)[0].tolist()) for s in range(30)}
    assert len(crops) > 3 and all(c == tuple(range(int(c[0]), int(c[0]) + 4)) for c in crops)
    padded = crop_or_pad(wave, 15, torch.Generator().manual_seed(1), pad_anywhere=True)
    assert padded.shape == (1, 15) and padded.isnan().sum() == 5 and padded.nansum() == wave.sum()


@pytest.mark.parametrize("samples,expected", [(10, 1), (11, 2), (15, 2), (16, 3), (100, 19)])
def test_windows__audio_cover_the_whole_clip(samples, expected):
    wave = torch.arange(1.0, samples + 1).view(1, samples)
    windows = cut_windows(wave, 10, 5, flush=False, unit=4)
    assert windows.shape == (expected, 1, 10)
    seen = windows.flatten()
    assert set(seen[~seen.isnan()].tolist()) == set(wave.flatten().tolist())  # every sample is seen


def test_windows__audio_short_clip_is_one_window_padded_to_whole_units():
    wave = torch.arange(1.0, 8.0).view(1, 7)
    assert cut_windows(wave, 10, 5, flush=False, unit=4).nan_to_num(0).tolist() == [[[1, 2, 3, 4, 5, 6, 7, 0]]]
    assert cut_windows(wave[:, :4], 10, 5, flush=False, unit=4).shape == (1, 1, 4)


def test_load_input__training_clip_and_embedding_windows(tmp_path):
    recipe = load_recipe(AUDIO_RECIPE, TINY_AUDIO)
    long = write(tmp_path / "long.wav", tone(44100, 1.3, (440.0, 550.0)), 44100)
    clip = load_input(long, recipe, g=torch.Generator().manual_seed(0))
    assert clip.shape == (1, 4000)
    windows = load_input(long, recipe)
    assert windows.shape == (1 + math.ceil((10400 - 4000) / 2000), 1, 4000)
    short = write(tmp_path / "short.flac", tone(16000, 0.1), 16000)
    assert load_input(short, recipe).shape == (1, 1, 960)  # 800 samples padded to whole 320-sample time patches


def test_padding__padded_audio_is_never_context_or_target_and_never_changes_real_tokens(audio_folder):
    recipe = load_recipe(AUDIO_RECIPE, TINY_AUDIO + [f"data.path={audio_folder}", "mask.full_span_axes=[0]"])
    batch = next(iter(build_train_loader(recipe)))["parts"]["audio"]  # 0.3-0.9 s chirps in 0.5 s clips: some padded
    valid = batch["valid"]
    assert valid is not None and not valid.all() and (valid.sum(1) >= 2).all()
    for b in range(len(valid)):
        for idx in (batch["context_idx"][b], batch["target_idx"][b].flatten()):
            idx = idx[idx >= 0]
            assert len(idx) and valid[b, idx].all()
    # A clip's real tokens come out of the encoder the same, alone or inside padding.
    encoder = build_model(recipe).target.eval()
    wave = torch.from_numpy(chirp(8000, 0.3)).view(1, 1, -1)[..., :2240]  # 7 whole time patches of 320 samples
    padded = crop_or_pad(wave[0], 4000, None, pad_anywhere=True)[None]
    real = audio_valid_tokens(padded, recipe.audio)
    assert int(real.sum()) == 4 * 7
    alone, _ = encoder(wave, "audio")
    inside, _ = encoder(padded, "audio", real=real)
    assert torch.allclose(alone, inside[real].view(1, -1, alone.shape[-1]), atol=1e-4)


def test_file_dataset__audio_folder_labels_and_bad_files_skipped(tmp_path, audio_folder):
    recipe = load_recipe(AUDIO_RECIPE, TINY_AUDIO + [f"data.path={audio_folder}"])
    index = list_folder(audio_folder, MODALITIES["audio"].extensions)
    assert index.classes == ["high", "low"] and len(index.files) == 12
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF....WAVEjunk")
    index.files.insert(0, str(bad))
    index.labels.insert(0, 0)
    sample = FileDataset(index, recipe, train=True)[(0, 0)]
    assert sample["input"].shape == (1, 4000) and len(sample["bad"]) == 1 and "bad.wav" in sample["bad"][0]
    batch = next(iter(build_train_loader(recipe)))["parts"]["audio"]
    assert batch["input"].shape == (8, 1, 4000) and batch["target_idx"].shape[:2] == (8, 4)


def test_pretrain__too_many_bad_audio_files_stops_with_report(tmp_path):
    from multijepa.train import pretrain

    folder = tmp_path / "clips"
    folder.mkdir()
    for i in range(40):
        if i % 4 == 0:
            (folder / f"{i}.wav").write_bytes(encoded("wav", tone(16000, 1.0), 16000)[:3000])  # truncated
        else:
            write(folder / f"{i}.wav", chirp(8000, 0.4, seed=i), 8000)
    base = TINY_AUDIO + [f"data.path={folder}", f"run.dir={tmp_path / 'run'}", "train.steps=30"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataError, match=r"failed to decode \(.*> data.max_bad_fraction=0.1\)"):
            pretrain(load_recipe(AUDIO_RECIPE, base + ["data.max_bad_fraction=0.1"]))
        pretrain(load_recipe(AUDIO_RECIPE, base + ["data.max_bad_fraction=0.3", "train.steps=14"]))
    rows = (tmp_path / "run/metrics.jsonl").read_text().splitlines()
    assert '"bad_files": 0' not in rows[-1]  # skipped and counted


def test_write_shards__audio_round_trip_and_training_stream(tmp_path, audio_folder):
    urls = write_shards(audio_folder, tmp_path / "shards", per_shard=5)
    assert len(urls) == 3
    with tarfile.open(urls[0]) as tar:
        assert {n.rsplit(".", 1)[1] for n in tar.getnames()} >= {"wav", "flac", "mp3", "cls", "path"}
    recipe = load_recipe(AUDIO_RECIPE, TINY_AUDIO + [f"data.path={tmp_path / 'shards'}"])
    stream = iter(ShardDataset(urls, recipe, buffer=4))
    samples = [next(stream) for _ in range(16)]
    assert all(s["input"].shape == (1, 4000) and not s["bad"] for s in samples)
    assert {s["label"] for s in samples} == {0, 1}
    assert next(iter(build_train_loader(recipe)))["parts"]["audio"]["input"].shape == (8, 1, 4000)


def test_audio_transform__speed_perturbation_changes_length_and_pitch():
    from multijepa.transforms import audio_transform, change_speed

    wave = torch.from_numpy(tone(8000, 1.0, (500.0,)).T.copy())
    faster = change_speed(wave, 1.25, 8000)
    assert abs(faster.shape[1] - 6400) <= 2 and abs(dominant_hz(faster[0].numpy(), 8000) - 625.0) < 8
    cfg = AudioConfig(sample_rate=8000, clip_seconds=2.0, speed_perturb=(0.8, 1.2))
    lengths = {int((audio_transform(wave, cfg, torch.Generator().manual_seed(s)).abs().sum(0) > 0).sum())
               for s in range(5)}
    assert len(lengths) == 5 and all(6600 <= n <= 10000 for n in lengths)  # 8000 samples / factor, padded to 2 s
