"""Modality tokenizers. Each maps a batch of its modality to ``tokens [B, N, D], coords [B, N, C]``."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from multijepa.core.transformer import sincos_embed
from multijepa.recipe import Recipe, patch_stride
from multijepa.tokenizers.audio import audio_tokenizer
from multijepa.tokenizers.image import image_tokenizer
from multijepa.tokenizers.pointcloud import point_pos_embed, pointcloud_tokenizer
from multijepa.tokenizers.timeseries import timeseries_tokenizer
from multijepa.tokenizers.video import video_tokenizer

PosEmbed = Callable[[torch.Tensor, int], torch.Tensor]

# One explicit entry per modality: how a recipe becomes that modality's tokenizer.
TOKENIZERS: dict[str, Callable[[Recipe], nn.Module]] = {
    "image": lambda r: image_tokenizer(channels=r.image.channels, patch_size=r.image.patch_size, dim=r.model.dim),
    "timeseries": lambda r: timeseries_tokenizer(
        channels=r.timeseries.channels, patch_size=r.timeseries.patch_size, stride=patch_stride(r.timeseries),
        dim=r.model.dim, widths=r.timeseries.conv_widths, kernel_size=r.timeseries.kernel_size,
        channel_mode=r.timeseries.channel_mode, normalize=r.timeseries.instance_norm),
    "audio": lambda r: audio_tokenizer(r.audio, dim=r.model.dim),
    "pointcloud": lambda r: pointcloud_tokenizer(in_channels=3 + 3 * len(r.pointcloud.features), dim=r.model.dim,
                                                 num_groups=r.pointcloud.num_groups,
                                                 group_size=r.pointcloud.group_size, width=r.pointcloud.pointnet_width),
    "video": lambda r: video_tokenizer(channels=r.video.channels, tubelet_size=r.video.tubelet_size,
                                       patch_size=r.video.patch_size, dim=r.model.dim),
}

# Position codes from coords, for a given width. Grid modalities (not listed) use fixed sin-cos per
# axis; continuous xyz needs a learned MLP (a module the encoder or predictor owns) or Fourier features.
POS_EMBEDS: dict[str, Callable[[Recipe, int], PosEmbed]] = {
    "pointcloud": lambda r, dim: point_pos_embed(r.pointcloud.pos_encoding, dim),
}


def build_tokenizer(recipe: Recipe) -> nn.Module:
    return TOKENIZERS[recipe.modality](recipe)


def build_pos_embed(recipe: Recipe, dim: int) -> PosEmbed:
    """The ``pos_embed(coords, dim)`` for one consumer (encoder or predictor) of width ``dim``."""
    return POS_EMBEDS[recipe.modality](recipe, dim) if recipe.modality in POS_EMBEDS else sincos_embed
