"""Modality tokenizers. Each maps a batch of its modality to ``tokens [B, N, D], coords [B, N, C]``."""

from __future__ import annotations

from typing import Callable

from torch import nn

from multijepa.recipe import Recipe
from multijepa.tokenizers.audio import audio_tokenizer
from multijepa.tokenizers.image import image_tokenizer

# One explicit entry per modality: how a recipe becomes that modality's tokenizer.
TOKENIZERS: dict[str, Callable[[Recipe], nn.Module]] = {
    "image": lambda r: image_tokenizer(channels=r.image.channels, patch_size=r.image.patch_size, dim=r.model.dim),
    "audio": lambda r: audio_tokenizer(r.audio, dim=r.model.dim),
}


def build_tokenizer(recipe: Recipe) -> nn.Module:
    return TOKENIZERS[recipe.modality](recipe)
