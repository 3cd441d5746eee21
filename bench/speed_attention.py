"""Attention forward + backward time: PyTorch SDPA against the plain matmul-softmax-matmul form, in
fp32 and bf16, dense and with a key mask, at the shapes JEPA runs on this machine's CPU.

    .venv/bin/python bench/speed_attention.py --threads 2

Prints one line per shape with milliseconds per forward + backward call (a measurement for the
kernel choice of issue #16; results in docs/results.md).
"""

from __future__ import annotations

import argparse
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F

# [batch, heads, tokens, head dim]: the demo's encoder, ViT-S/16 at 224 px, a 256-token grid, a larger batch.
SHAPES = [(64, 3, 64, 64), (16, 6, 196, 64), (32, 4, 256, 32), (128, 3, 64, 64)]


def matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1) @ v


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def milliseconds(fn: Callable, dtype: torch.dtype, shape: tuple[int, int, int, int], masked: bool,
                 reps: int) -> float:
    """Mean time of one forward + backward of ``fn`` on random q, k, v of ``shape``, after two warm-ups."""
    q, k, v = (torch.randn(shape, dtype=dtype, requires_grad=True) for _ in range(3))
    mask = (torch.rand(shape[0], 1, 1, shape[2]) > 0.1) if masked else None
    for _ in range(2):
        fn(q, k, v, mask).sum().backward()
    start = time.perf_counter()
    for _ in range(reps):
        fn(q, k, v, mask).sum().backward()
    return (time.perf_counter() - start) / reps * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, ms per forward + backward")
    for shape in SHAPES:
        for masked in (False, True):
            times = {f"{name} {str(dtype).removeprefix('torch.')}": milliseconds(fn, dtype, shape, masked, args.reps)
                     for dtype in (torch.float32, torch.bfloat16)
                     for name, fn in (("sdpa", sdpa), ("matmul", matmul_attention))}
            cells = "  ".join(f"{k} {v:6.1f}" for k, v in times.items())
            print(f"{'x'.join(map(str, shape)):>14} {'masked' if masked else 'dense ':6}  {cells}", flush=True)


if __name__ == "__main__":
    main()
