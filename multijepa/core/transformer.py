"""Our pre-norm transformer on ``F.scaled_dot_product_attention`` and coordinate position codes.

SDPA picks the fused kernel (flash / memory-efficient) on CUDA and the math path on CPU.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


def sincos_embed(coords: torch.Tensor, dim: int, base: float = 10000.0) -> torch.Tensor:
    """Fixed sin-cos codes from coordinates, one band per axis.

    Args:
        coords: [B, N, C] positions (grid indices or continuous values).
        dim: output width; each of the C axes gets ``2 * (dim // (2 * C))`` channels, the rest are zero.

    Returns:
        [B, N, dim] float tensor.

    >>> sincos_embed(torch.zeros(1, 4, 2), 8).shape
    torch.Size([1, 4, 8])
    """
    b, n, c = coords.shape
    per_axis = dim // (2 * c)
    freqs = base ** (-torch.arange(per_axis, device=coords.device, dtype=torch.float32) / max(per_axis, 1))
    angles = coords.float().unsqueeze(-1) * freqs  # [B, N, C, per_axis]
    out = torch.cat([angles.sin(), angles.cos()], dim=-1).reshape(b, n, c * 2 * per_axis)
    if out.shape[-1] < dim:
        out = F.pad(out, (0, dim - out.shape[-1]))
    return out


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: [B, N, D]; attn_mask: bool [B, 1, N, N] or [B, 1, 1, N], True where attention is allowed."""
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)), with optional stochastic depth."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop_path = drop_path

    def _drop(self, y: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_path == 0.0:
            return y
        keep = 1.0 - self.drop_path
        mask = y.new_empty(y.shape[0], 1, 1).bernoulli_(keep)
        return y * mask / keep

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self._drop(self.attn(self.norm1(x), attn_mask))
        return x + self._drop(self.mlp(self.norm2(x)))


class Transformer(nn.Module):
    """A stack of :class:`Block` followed by a final LayerNorm.

    >>> Transformer(16, depth=2, heads=2)(torch.randn(3, 5, 16)).shape
    torch.Size([3, 5, 16])
    """

    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, r) for r in rates)
        self.norm = nn.LayerNorm(dim)
        init_weights(self)
        # Rescale residual output projections by depth, as in I-JEPA, so deep stacks start stable.
        for i, blk in enumerate(self.blocks):
            blk.attn.proj.weight.data.div_(math.sqrt(2.0 * (i + 1)))
            blk.mlp[2].weight.data.div_(math.sqrt(2.0 * (i + 1)))

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, attn_mask)
        return self.norm(x)


def init_weights(module: nn.Module) -> None:
    """Truncated-normal linear weights, zero biases, unit LayerNorms (the ViT/I-JEPA init)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
