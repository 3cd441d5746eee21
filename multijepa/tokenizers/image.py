"""2D patch tokenizer: images [B, C, H, W] -> tokens [B, N, D] + (row, col) coords [B, N, 2]."""

from __future__ import annotations

import torch
from torch import nn


class PatchTokenizer2d(nn.Module):
    """Non-overlapping square patches embedded by one strided convolution, in row-major order.

    >>> tokens, coords = image_tokenizer(channels=3, patch_size=4, dim=32)(torch.zeros(2, 3, 16, 16))
    >>> tokens.shape, coords.shape
    (torch.Size([2, 16, 32]), torch.Size([2, 16, 2]))
    """

    def __init__(self, channels: int, patch_size: int, dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(channels, dim, kernel_size=patch_size, stride=patch_size)
        nn.init.trunc_normal_(self.proj.weight.view(dim, -1), std=0.02)
        nn.init.zeros_(self.proj.bias)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.proj(images)  # [B, D, h, w]
        b, _, h, w = x.shape
        rows, cols = torch.meshgrid(torch.arange(h, device=x.device), torch.arange(w, device=x.device),
                                    indexing="ij")
        coords = torch.stack([rows, cols], dim=-1).reshape(1, h * w, 2).expand(b, -1, -1).float()
        return x.flatten(2).transpose(1, 2), coords


def image_tokenizer(channels: int = 3, patch_size: int = 16, dim: int = 384) -> PatchTokenizer2d:
    return PatchTokenizer2d(channels, patch_size, dim)
