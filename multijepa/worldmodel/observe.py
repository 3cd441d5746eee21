"""The frozen encoder side of a world model: an episode's observations -> the encoder's (pooled) tokens.

Which encoder reads which observation (``worldmodel.observation``):

- ``frames`` (uint8 [T, H, W, C]): an image encoder reads each frame; a video encoder reads, per step, the
  clip of ``video.frames`` frames (every ``video.frame_stride``-th) that ends with that step's frame.
- ``state`` ([T, D]): a time-series encoder reads the window of ``timeseries.length`` states ending at
  each step.
- ``audio`` ([T, C, W]): an audio encoder reads the embedding window ending with each step's slot of the
  episode's sound (:meth:`ObservationEncoder.observations` cuts them).
- ``points`` ([T, P, 3 + F]): a point-cloud encoder reads each step's cloud (normalised and subsampled
  as its embedding does).

Where a step's input reaches back in time (clips, state windows), the episode's first observation is
repeated before its start, and :attr:`ObservationEncoder.history` says how many earlier observations a
step reads, so that a planner can hand the encoder as much past as training gave it.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from multijepa.errors import DataError, MultijepaError, RecipeError
from multijepa.modalities import MODALITIES
from multijepa.recipe import Recipe, token_grid
from multijepa.train import build_model

# The encoder modalities that read each kind of observation, in order of preference.
OBSERVATION_MODALITY = {"frames": ("image", "video"), "state": ("timeseries",), "audio": ("audio",),
                        "points": ("pointcloud",)}


def pool_grid(feats: torch.Tensor, grid: Optional[tuple[int, ...]], pool: int) -> torch.Tensor:
    """Encoder tokens [B, N, F] averaged over ``pool``-sized cells of their grid ([B, N / pool^rank, F]), or
    over all of them with ``pool`` 0 ([B, 1, F]); ``pool`` 1 keeps them."""
    if pool == 0:
        return feats.mean(1, keepdim=True)
    if pool == 1:
        return feats
    b, n, f = feats.shape
    if grid is None or len(grid) > 3 or any(g % pool for g in grid):
        raise RecipeError(f"worldmodel.pool={pool}: the encoder's token grid {grid} is not divisible into "
                          f"{pool}-wide cells; use a divisor of its sides, 1 (every token) or 0 (one mean token)")
    x = feats.transpose(1, 2).reshape(b, f, *grid)
    x = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[len(grid) - 1](x, pool)
    return x.flatten(2).transpose(1, 2)


def _window_index(steps: int, offsets: list[int]) -> torch.Tensor:
    """[steps, len(offsets)]: per step t the observations t + o (offsets o <= 0), the first one where t + o < 0."""
    return (torch.arange(steps)[:, None] + torch.tensor(offsets)[None]).clamp_min(0)


class ObservationEncoder(nn.Module):
    """Raw observations of one episode [T, ...] -> the frozen encoder's pooled tokens [T, N, F] (module docstring)."""

    def __init__(self, encoder: nn.Module, recipe: Recipe, cfg: Any):  # cfg: the recipe's WorldModelConfig
        super().__init__()
        readers = OBSERVATION_MODALITY[cfg.observation]
        found = [m for m in readers if m in recipe.modalities]
        if not found:
            raise RecipeError(f"worldmodel.observation={cfg.observation} needs an encoder trained on "
                              f"{' or '.join(readers)}, but {cfg.encoder} was trained on {', '.join(recipe.modalities)}")
        self.modality = found[0]
        self.recipe = recipe.source(self.modality)
        self.section = self.recipe.section(self.modality)
        if self.modality == "video" and self.section.fps > 0:
            raise RecipeError(f"{cfg.encoder}: its video encoder samples clips by time (video.fps="
                              f"{self.section.fps}), but episode frames carry no timestamps; a world model reads "
                              f"clips of every video.frame_stride-th frame: pretrain the encoder with video.fps=0")
        self.encoder = encoder.eval().requires_grad_(False)
        self.cfg = cfg
        spec = MODALITIES[self.modality]
        self.grid = token_grid(self.recipe) if spec.token_grid is not None else None

    @property
    def offsets(self) -> list[int]:
        """The observations one step's input reads, relative to the step (oldest first): a clip's frames, a
        state window; [0] where a step reads its own observation alone."""
        if self.modality == "video":
            return [-k * self.section.frame_stride for k in reversed(range(self.section.frames))]
        return list(range(1 - self.section.length, 1)) if self.modality == "timeseries" else [0]

    @property
    def history(self) -> int:
        """How many earlier observations one step's input reads (the past a planner must hand it)."""
        return -self.offsets[0]

    def observations(self, episode) -> Optional[torch.Tensor]:
        """What this encoder reads of an :class:`~multijepa.episodes.Episode` (None where it has none): its
        frames [T + 1, H, W, C], states [T + 1, D], clouds [T + 1, P, 3 + F], or audio windows [T + 1, C, W]:
        the sound is cut into T + 1 equal slots and observation t is the encoder's embedding window ending
        with slot t (silence before the start), resampled to the encoder's rate."""
        if self.cfg.observation != "audio":
            return getattr(episode, self.cfg.observation)
        if episode.audio is None:
            return None
        a = self.section
        sound = episode.audio
        if a.model_channels == 1:
            sound = sound.mean(0, keepdim=True)  # mixed down, as the audio reader does
        elif len(sound) == 1:
            sound = sound.expand(a.model_channels, -1)
        elif len(sound) != a.model_channels:
            raise DataError(f"{episode.name}: its audio has {len(sound)} channels, the encoder reads {a.model_channels}")
        if episode.audio_rate != a.sample_rate:
            import soxr

            sound = torch.from_numpy(np.ascontiguousarray(
                soxr.resample(sound.T.numpy(), episode.audio_rate, a.sample_rate, quality="HQ").T))
        w, slots = a.window_samples, episode.steps + 1
        padded = torch.cat([sound.new_zeros(len(sound), w), sound], 1)
        ends = [w + round((t + 1) * sound.shape[1] / slots) for t in range(slots)]
        return torch.stack([padded[:, end - w:end] for end in ends])

    def inputs(self, observations: torch.Tensor) -> torch.Tensor:
        """Raw observations [T, ...] -> the encoder's inputs [T, ...], as its modality reads them."""
        spec, section, kind = MODALITIES[self.modality], self.section, self.cfg.observation
        expect = {"frames": (4, "uint8 [T, H, W, C]"), "state": (2, "[T, D]"), "points": (3, "[T, P, 3 + F]"),
                  "audio": (3, "float windows [T, C, W] (ObservationEncoder.observations cuts them)")}[kind]
        dtype_ok = observations.dtype == torch.uint8 if kind == "frames" else observations.is_floating_point()
        if observations.ndim != expect[0] or not dtype_ok:
            raise MultijepaError(f"{kind} observations must be {expect[1]}, got {observations.dtype} "
                                 f"{list(observations.shape)}")
        if self.modality == "image":
            return torch.stack([spec.from_tensor(f.permute(2, 0, 1), section, None) for f in observations])
        if self.modality == "video":
            from multijepa.modalities.video import clip_transform

            # Without a generator the transform is per frame (resize, centre crop, normalise): each frame once.
            frames = clip_transform(observations.numpy(), section, None)  # [C, T, size, size]
            clips = frames[:, _window_index(len(observations), self.offsets)]  # [C, T, video.frames, size, size]
            return clips.transpose(0, 1).contiguous()
        if self.modality == "timeseries":
            windows = observations.float()[_window_index(len(observations), self.offsets)]  # [T, length, D]
            return torch.stack([spec.from_tensor(w.T.contiguous(), section, None) for w in windows])
        if self.modality == "audio":  # its from_tensor gives the model input last
            return torch.stack([spec.from_tensor(x.float(), section, None)[-1] for x in observations])
        return torch.stack([spec.from_tensor(x.float(), section, None) for x in observations])

    @torch.no_grad()
    def forward(self, observations: torch.Tensor, batch: int = 256) -> torch.Tensor:
        x = self.inputs(observations)
        device = next(self.encoder.parameters()).device
        out = []
        for start in range(0, len(x), batch):
            feats, _ = self.encoder(x[start:start + batch].to(device), self.modality)
            z = pool_grid(feats.float(), self.grid, self.cfg.pool)
            out.append(F.layer_norm(z, z.shape[-1:]) if self.cfg.normalize else z)
        return torch.cat(out)


def load_encoder(cfg: Any, seed: int = 0) -> tuple[nn.Module, Recipe]:
    """The frozen target encoder named by ``worldmodel.encoder`` and its recipe; with ``encoder_init:
    random`` the same architecture at random init (seeded), for the baseline world model."""
    from multijepa.export import read_encoder  # the encoder side of a checkpoint or export

    encoder, recipe, _ = read_encoder(cfg.encoder)
    if cfg.encoder_init == "random":
        torch.manual_seed(seed)
        encoder = build_model(recipe).target
    return encoder, recipe
