"""1D-CNN patch tokenizer: series [B, C, L] -> tokens [B, N, D] + coords (t,) or (channel, t).

Inputs follow one convention everywhere (readers, training crops, embedding windows): a float
tensor [C, L] per series where NaN marks padding past the series' end. Missing values inside a
series are filled by the reader (``timeseries.missing``), so NaN reaching the model is padding only.
A token is valid when its patch holds at least one real sample; ``valid_tokens`` gives that mask,
which the mask sampler and the encoder use so padding is never context, target or attended to.
"""

from __future__ import annotations

from typing import Sequence

import torch
from einops import rearrange, repeat
from torch import nn

from multijepa.core.transformer import masked_moments



def patch_count(length: int, patch_size: int, stride: int) -> int:
    """Patches of ``patch_size`` every ``stride`` samples that fit in ``length`` samples (at least 1).

    >>> patch_count(24, 4, 4), patch_count(24, 8, 4), patch_count(3, 4, 4)
    (6, 5, 1)
    """
    return max(1, (length - patch_size) // stride + 1)


def valid_tokens(series: torch.Tensor, patch_size: int, stride: int, independent: bool) -> torch.Tensor:
    """Which tokens hold real samples: series [B, C, L] (NaN = padding) -> bool [B, N].

    N = patches, or channels * patches (channel-major, like the tokens) when ``independent``.

    >>> x = torch.zeros(1, 2, 16); x[..., 9:] = float("nan")
    >>> valid_tokens(x, 4, 4, independent=False).tolist()
    [[True, True, True, False]]
    """
    real = ~torch.isnan(series).all(1)  # [B, L]: a time step is real if any channel is
    per_patch = real.unfold(-1, patch_size, stride).any(-1)  # [B, P]
    if independent:
        return repeat(per_patch, "b p -> b (c p)", c=series.shape[1])
    return per_patch


def instance_norm(series: torch.Tensor, eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """Per series and channel, zero mean and unit variance over real samples; padding becomes 0. Also
    returns what it took out (for ``keep_levels``): per channel asinh(mean) and log(std).

    series [B, C, L] with NaN padding -> float [B, C, L] without NaN, and levels float [B, C, 2].
    asinh and log keep levels of any unit within a few units of 0 (a sign-keeping log for the mean;
    a constant channel's log std is log(1e-4), about -9), so one linear map can read them.

    >>> x = torch.tensor([[[1.0, 3.0, float("nan")]]])
    >>> normed, levels = instance_norm(x)
    >>> normed[0, 0, :2].tolist(), [round(v, 3) for v in levels[0, 0].tolist()]  # asinh(2), log(1)
    ([-1.0, 1.0], [1.444, 0.0])
    """
    real = ~torch.isnan(series)
    x = torch.nan_to_num(series, nan=0.0)
    mean, var = masked_moments(x, real, (-1,))
    std = torch.sqrt(var + eps)
    levels = torch.cat([torch.asinh(mean), torch.log(std.clamp_min(1e-4))], -1)
    return ((x - mean) / std) * real, levels


class SeriesTokenizer(nn.Module):
    """Patches along time, each embedded by a small convolution stack, a linear map and a LayerNorm.

    Args:
        channels: input channels (mixed mode; independent mode takes any number).
        patch_size: samples per patch; stride: hop between patches (< patch_size overlaps).
        dim: token width.
        widths: channel widths of the convolution stack run inside each patch.
        kernel_size: odd; convolutions pad with zeros inside the patch, so a token sees only its patch.
        independent: one token per (channel, patch), all channels through the same weights, coords
            (channel, t); otherwise one token per patch mixing all channels, coords (t,).
        normalize: per-series instance norm first, so absolute scale does not leak into tokens.
        keep_levels: with ``normalize``, every token also gets a linear embedding of what the norm took
            out of its channel (asinh mean, log std; all channels' in mixed mode), added before the
            LayerNorm: shapes are compared free of scale, and a class carried by levels is not lost.

    >>> tok = SeriesTokenizer(3, patch_size=4, stride=4, dim=16, widths=(8,), independent=True)
    >>> tokens, coords = tok(torch.randn(2, 3, 32))
    >>> tokens.shape, coords.shape
    (torch.Size([2, 24, 16]), torch.Size([2, 24, 2]))
    """

    def __init__(self, channels: int, patch_size: int, stride: int, dim: int, widths: Sequence[int] = (32, 32),
                 kernel_size: int = 3, independent: bool = True, normalize: bool = True, keep_levels: bool = False):
        super().__init__()
        self.patch_size, self.stride, self.independent, self.normalize = patch_size, stride, independent, normalize
        self.levels = None
        if normalize and keep_levels:
            # nn.Linear's default weights: a level's part of a token starts about as large as a patch's. No
            # bias: where levels are alike in every series (z-normalised sets) they add nothing at all.
            self.levels = nn.Linear(2 if independent else 2 * channels, dim, bias=False)
        layers: list[nn.Module] = []
        width = 1 if independent else channels
        for w in widths:
            layers += [nn.Conv1d(width, w, kernel_size, padding=kernel_size // 2), nn.GELU()]
            width = w
        self.convs = nn.Sequential(*layers)
        self.proj = nn.Linear(width * patch_size, dim)
        nn.init.trunc_normal_(self.proj.weight, std=0.02)
        nn.init.zeros_(self.proj.bias)
        # Unit-scale tokens: without it a patch's content starts ~30x smaller than its sin-cos position
        # code, every series looks alike, and the predictor can score well from positions alone.
        self.norm = nn.LayerNorm(dim)

    def forward(self, series: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """series [B, C, L] (NaN = padding) -> tokens [B, N, D], coords [B, N, 2 or 1]."""
        if self.normalize:
            x, levels = instance_norm(series)
        else:
            x, levels = torch.nan_to_num(series, nan=0.0), None
        b, c, _ = x.shape
        patches = x.unfold(-1, self.patch_size, self.stride)  # [B, C, P, S]
        p = patches.shape[2]
        t = torch.arange(p, device=x.device, dtype=torch.float32)
        if self.independent:
            flat = rearrange(patches, "b c p s -> (b c p) 1 s")
            coords = torch.stack(torch.meshgrid(torch.arange(c, device=x.device, dtype=torch.float32), t,
                                                indexing="ij"), dim=-1).reshape(1, c * p, 2)
        else:
            flat = rearrange(patches, "b c p s -> (b p) c s")
            coords = t.reshape(1, p, 1)
        tokens = rearrange(self.proj(self.convs(flat).flatten(1)), "(b n) d -> b n d", b=b)
        if self.levels is not None:
            if self.independent:  # [B, C, D] -> one row per (channel, patch), channel-major like the tokens
                tokens = tokens + repeat(self.levels(levels), "b c d -> b (c p) d", p=p)
            else:
                tokens = tokens + self.levels(levels.flatten(1))[:, None]
        return self.norm(tokens), coords.expand(b, -1, -1)
