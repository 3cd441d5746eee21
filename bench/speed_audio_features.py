"""Speed of the audio front ends on a batch: the log-mel (torchaudio's STFT, our HTK filters) and Kaldi
fbank (torchaudio.compliance.kaldi), beside the torch.stft log-mel they replaced, one thread, interleaved.

    OMP_NUM_THREADS=1 .venv/bin/python bench/speed_audio_features.py [--batch 64] [--repeats 25]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_audio import old_log_mel  # the torch.stft implementation kept as the tests' reference  # noqa: E402

from multijepa.modalities.audio import AudioConfig  # noqa: E402
from multijepa.tokenizers.audio import KaldiFbank, LogMel  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=25)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = AudioConfig()  # the audio recipe's front-end settings: 16 kHz, 25 ms / 10 ms, 64 mels
    wave = torch.randn(args.batch, 1, cfg.clip_samples)
    logmel, fbank = LogMel.from_config(cfg), KaldiFbank.from_config(cfg)
    runs = {"torch.stft log-mel (before)": lambda: old_log_mel(wave, cfg),
            "log-mel (torchaudio STFT)": lambda: logmel(wave),
            "Kaldi fbank (torchaudio)": lambda: fbank(wave)}
    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.no_grad():
        for f in runs.values():
            f()  # warm-up
        for _ in range(args.repeats):
            for name, f in runs.items():
                t0 = time.perf_counter()
                f()
                times[name].append(time.perf_counter() - t0)
    result = {name: {"median_ms": round(1e3 * statistics.median(t), 1), "min_ms": round(1e3 * min(t), 1)}
              for name, t in times.items()}
    print(f"batch {args.batch} x 1 x {cfg.clip_samples} samples, 1 thread, {args.repeats} interleaved repeats")
    for name, r in result.items():
        print(f"  {name:32s} median {r['median_ms']:7.1f} ms   min {r['min_ms']:7.1f} ms")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
