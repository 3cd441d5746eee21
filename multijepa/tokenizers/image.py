"""2D patch tokenizer: images [B, C, H, W] -> tokens [B, N, D] + (row, col) coords [B, N, 2]; and the
patch convolution and grid-coordinate helpers the spectrogram and tubelet tokenizers share."""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn


def patch_conv(conv: type[nn.Module], channels: int, dim: int, kernel) -> nn.Module:
    """A strided convolution embedding non-overlapping patches (2D for images and spectrograms, 3D
    for video tubelets), initialised like a ViT patch embedding."""
    proj = conv(channels, dim, kernel_size=kernel, stride=kernel)
    nn.init.trunc_normal_(proj.weight.view(dim, -1), std=0.02)
    nn.init.zeros_(proj.bias)
    return proj


def grid_tokens(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A patch convolution's output [B, D, *grid] -> tokens [B, N, D] in row-major order and their
    grid indices as coords [B, N, len(grid)].

    >>> tokens, coords = grid_tokens(torch.zeros(1, 8, 2, 3))
    >>> tokens.shape, coords[0, -1].tolist()
    (torch.Size([1, 6, 8]), [1.0, 2.0])
    """
    b, grid = x.shape[0], x.shape[2:]
    axes = [torch.arange(n, device=x.device) for n in grid]
    coords = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(1, -1, len(grid))
    return rearrange(x, "b d ... -> b (...) d"), coords.expand(b, -1, -1).float()


class PatchTokenizer2d(nn.Module):
    """Non-overlapping square patches embedded by one strided convolution, in row-major order.

    >>> tokens, coords = image_tokenizer(channels=3, patch_size=4, dim=32)(torch.zeros(2, 3, 16, 16))
    >>> tokens.shape, coords.shape
    (torch.Size([2, 16, 32]), torch.Size([2, 16, 2]))
    """

    def __init__(self, channels: int, patch_size: int, dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = patch_conv(nn.Conv2d, channels, dim, patch_size)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return grid_tokens(self.proj(images))  # coords (row, col)


def image_tokenizer(channels: int, patch_size: int, dim: int) -> PatchTokenizer2d:
    return PatchTokenizer2d(channels, patch_size, dim)
