"""Attention time on this machine: PyTorch SDPA against the plain matmul-softmax-matmul form, in fp32
and bf16, dense and with a key mask, forward + backward and forward only, over the sequence lengths
and head dims that JEPA runs. The measurement behind ``multijepa.core.transformer.ATTENTION_TABLE``.

    .venv/bin/python bench/speed_attention.py --threads 2

Prints one row per (dtype, head dim, tokens, mask) with milliseconds per call of each form and the
faster one; every call holds about the same number of tokens (batch x heads x tokens = 2^15).

    .venv/bin/python bench/speed_attention.py --threads 1 --probe

times instead one training step (forward + backward) of the attentive probe's pooler on a batch of 64
token sets, in the form ``multijepa.evaluate.AttentiveProbe`` computes (key and value maps folded into
the queries) against projecting every token through ``nn.MultiheadAttention``.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from multijepa.core.transformer import attention_kernel

TOKENS = (16, 32, 64, 128, 256, 512, 1024)
HEAD_DIMS = (16, 32, 64, 128)
TOTAL = 2 ** 15  # batch x heads x tokens per call


def matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1) @ v


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def milliseconds(fn: Callable, dtype: torch.dtype, shape: tuple[int, int, int, int], masked: bool,
                 backward: bool, min_seconds: float) -> float:
    """Mean time of one call of ``fn`` (and its backward) on random q, k, v of ``shape``: two warm-ups,
    then as many calls as fill ``min_seconds``."""
    q, k, v = (torch.randn(shape, dtype=dtype, requires_grad=backward) for _ in range(3))
    mask = (torch.rand(shape[0], 1, 1, shape[2]) > 0.1) if masked else None

    def once() -> None:
        if backward:
            fn(q, k, v, mask).sum().backward()
        else:
            with torch.no_grad():
                fn(q, k, v, mask)

    return mean_milliseconds(once, min_seconds)


def mean_milliseconds(once: Callable[[], None], min_seconds: float) -> float:
    """Two warm-up calls of ``once``, then the mean time of as many as fill ``min_seconds`` (3 at least)."""
    for _ in range(2):
        once()
    calls, start = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - start < min_seconds:
        once()
        calls += 1
    return (time.perf_counter() - start) / calls * 1000


def probe_rows(min_seconds: float) -> None:
    """The attentive probe's step, folded against projected, at the token sets the quality benches probe."""
    from multijepa.evaluate import AttentiveProbe
    print("| tokens | width | heads | projected (nn.MultiheadAttention) | folded (AttentiveProbe) | speed-up |")
    print("|---|---|---|---|---|---|")
    for tokens, dim in ((64, 192), (192, 128), (768, 128), (256, 384)):  # CIFAR, series, video clips, wider
        torch.manual_seed(0)
        model = AttentiveProbe(dim, 10)
        x, pad, y = torch.randn(64, tokens, dim), torch.zeros(64, tokens, dtype=torch.bool), torch.randint(0, 10, (64,))

        def projected() -> None:
            kv = model.norm_kv(x)
            out, _ = model.attn(model.query.expand(len(x), -1, -1), kv, kv, key_padding_mask=pad, need_weights=False)
            F.cross_entropy(model.head((out + model.mlp(model.norm(out))).flatten(1)), y).backward()

        def folded() -> None:
            F.cross_entropy(model(x, pad), y).backward()

        slow, fast = mean_milliseconds(projected, min_seconds), mean_milliseconds(folded, min_seconds)
        print(f"| {tokens} | {dim} | {model.attn.num_heads} | {slow:.1f} ms | {fast:.1f} ms | {slow / fast:.1f}x |",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=0.3, help="least time spent on each measurement")
    parser.add_argument("--head-dims", type=int, nargs="+", default=list(HEAD_DIMS))
    parser.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS))
    parser.add_argument("--probe", action="store_true", help="time the attentive probe's pooler instead")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.probe:
        print(f"torch {torch.__version__}, {args.threads} threads, fp32; one step of 64 token sets")
        return probe_rows(args.seconds)
    print(f"torch {torch.__version__}, {args.threads} threads; ms per call, batch x heads x tokens = {TOTAL}")
    print("| dtype | head dim | tokens | mask | pass | SDPA | matmul | faster | the code picks |")
    print("|---|---|---|---|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        for hd in args.head_dims:
            for n in args.tokens:
                shape = (TOTAL // n // 4, 4, n, hd)
                for masked in (False, True):
                    for backward in (True, False):
                        t_sdpa = milliseconds(sdpa, dtype, shape, masked, backward, args.seconds)
                        t_mm = milliseconds(matmul_attention, dtype, shape, masked, backward, args.seconds)
                        picked = attention_kernel(torch.device("cpu"), dtype, n, hd, backward)
                        print(f"| {str(dtype).removeprefix('torch.')} | {hd} | {n} | {'yes' if masked else 'no'} | "
                              f"{'fwd+bwd' if backward else 'fwd'} | {t_sdpa:.2f} | {t_mm:.2f} | "
                              f"{'sdpa' if t_sdpa < t_mm else 'matmul'} ({max(t_sdpa, t_mm) / min(t_sdpa, t_mm):.2f}x) | "
                              f"{picked} |", flush=True)


if __name__ == "__main__":
    main()
