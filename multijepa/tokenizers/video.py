"""3D tubelet tokenizer: clips [B, C, T, H, W] -> tokens [B, N, D] + (t, row, col) coords [B, N, 3].

An image is not fed through this tokenizer: a one-frame clip has no whole tubelet (the temporal
patch is ``tubelet_size`` frames deep), and repeating a still frame to fill one would let a video
model read images that look like frozen video. That is a deliberate choice; image models use
``recipes/image.yaml``.
"""

from __future__ import annotations

import torch
from torch import nn

from multijepa.tokenizers.image import grid_tokens, patch_conv


class TubeletTokenizer(nn.Module):
    """Non-overlapping ``tubelet x patch x patch`` tubes embedded by one strided 3D convolution, in
    (t, row, col) order, so the token grid is ``(T // tubelet, H // patch, W // patch)``.

    >>> tokenizer = video_tokenizer(channels=3, tubelet_size=2, patch_size=16, dim=32)
    >>> tokens, coords = tokenizer(torch.zeros(2, 3, 8, 64, 64))
    >>> tokens.shape, coords.shape
    (torch.Size([2, 64, 32]), torch.Size([2, 64, 3]))
    """

    def __init__(self, channels: int, tubelet_size: int, patch_size: int, dim: int):
        super().__init__()
        kernel = (tubelet_size, patch_size, patch_size)
        self.proj = patch_conv(nn.Conv3d, channels, dim, kernel)

    def forward(self, clips: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """clips [B, C, T, H, W] -> tokens [B, N, D], coords [B, N, 3] (t, row, col)."""
        return grid_tokens(self.proj(clips))  # coords (t, row, col)


def video_tokenizer(channels: int, tubelet_size: int, patch_size: int, dim: int) -> TubeletTokenizer:
    return TubeletTokenizer(channels, tubelet_size, patch_size, dim)
