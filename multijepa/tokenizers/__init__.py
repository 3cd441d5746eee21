"""Modality tokenizers. Each maps a batch of its modality to ``tokens [B, N, D], coords [B, N, C]``."""

from __future__ import annotations

from typing import Callable

from torch import nn

from multijepa.recipe import Recipe, patch_stride
from multijepa.tokenizers.audio import audio_tokenizer
from multijepa.tokenizers.image import image_tokenizer
from multijepa.tokenizers.timeseries import timeseries_tokenizer

# One explicit entry per modality: how a recipe becomes that modality's tokenizer.
TOKENIZERS: dict[str, Callable[[Recipe], nn.Module]] = {
    "image": lambda r: image_tokenizer(channels=r.image.channels, patch_size=r.image.patch_size, dim=r.model.dim),
    "timeseries": lambda r: timeseries_tokenizer(
        channels=r.timeseries.channels, patch_size=r.timeseries.patch_size, stride=patch_stride(r.timeseries),
        dim=r.model.dim, widths=r.timeseries.conv_widths, kernel_size=r.timeseries.kernel_size,
        channel_mode=r.timeseries.channel_mode, normalize=r.timeseries.instance_norm),
    "audio": lambda r: audio_tokenizer(r.audio, dim=r.model.dim),
}


def build_tokenizer(recipe: Recipe) -> nn.Module:
    return TOKENIZERS[recipe.modality](recipe)
