"""Point clouds: the ``pointcloud`` recipe section, and clouds as FPS + kNN group tokens with xyz coords.

Point clouds have no token grid: the data loader groups each cloud (farthest point sampling for the
centres, k nearest neighbours for the members) so that masks can be drawn on the centres, where a
block is the share of centres nearest a random seed centre.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal, Optional, Union

import torch

from multijepa.core.masking import MaskConfig, sample_neighbourhood_masks, validate_neighbourhood_mask
from multijepa.errors import check
from multijepa.readers import POINT_EXTENSIONS, PointSet, Source, read_points
from multijepa.spec import ModalitySpec
from multijepa.tokenizers.pointcloud import group_points, point_pos_embed, pointcloud_tokenizer
from multijepa.transforms import pointcloud_transform


@dataclass(frozen=True)
class PointCloudConfig:
    """Point-cloud reading, augmentation and the farthest-point-sampling + kNN group tokenizer."""

    num_points: int = 1024  # points per cloud given to the tokenizer (and sampled from each mesh)
    mesh_sampling: Literal["uniform", "poisson"] = "uniform"  # how points are drawn from mesh surfaces
    features: tuple[Literal["normals", "colors"], ...] = ()  # per-point channels kept besides xyz
    num_groups: int = 64  # tokens per cloud: group centres picked by farthest point sampling
    group_size: int = 32  # points per group: each centre's k nearest neighbours (the centre included)
    pointnet_width: int = 128  # hidden width of the mini-PointNet that embeds each group
    pos_encoding: Literal["mlp", "fourier"] = "mlp"  # centre xyz -> position code: learned MLP or fixed
    up_axis: Literal["x", "y", "z"] = "z"  # the axis training rotations turn about
    rotate: bool = False  # training: random rotation about up_axis
    scale: tuple[float, float] = (0.8, 1.25)  # training: per-axis scale factor range; [1, 1] disables
    jitter: float = 0.01  # training: Gaussian noise std per coordinate (clipped at 3 std); 0 disables
    dropout: float = 0.0  # training: drop up to this share of points (refilled by repeats); 0 disables


def validate_pointcloud(p: PointCloudConfig, where: str) -> None:
    check(p.num_points >= 2, where, "pointcloud.num_points", "must be at least 2")
    check(2 <= p.num_groups <= p.num_points, where, "pointcloud.num_groups",
          f"must be between 2 and pointcloud.num_points={p.num_points}, got {p.num_groups}")
    check(1 <= p.group_size <= p.num_points, where, "pointcloud.group_size",
          f"must be between 1 and pointcloud.num_points={p.num_points}, got {p.group_size}")
    check(p.pointnet_width >= 1, where, "pointcloud.pointnet_width", "must be positive")
    check(len(set(p.features)) == len(p.features), where, "pointcloud.features", "lists a feature twice")
    check(0 < p.scale[0] <= p.scale[1], where, "pointcloud.scale",
          f"must be [low, high] with 0 < low <= high, got {list(p.scale)}")
    check(p.jitter >= 0, where, "pointcloud.jitter", "must be 0 (off) or positive")
    check(0 <= p.dropout < 1, where, "pointcloud.dropout", "must be in [0, 1)")


def _load(src: Source, p: PointCloudConfig, name: str, part: Optional[int], g: Optional[torch.Generator]
          ) -> torch.Tensor:
    return pointcloud_transform(read_points(src, name, p.num_points, p.mesh_sampling), p, g, name)


def _from_tensor(x: torch.Tensor, p: PointCloudConfig, g: Optional[torch.Generator]) -> torch.Tensor:
    """A raw cloud [P, 3 + F] (xyz, then ``pointcloud.features``) as a training input."""
    extra = {f: x[:, 3 + 3 * i:6 + 3 * i] for i, f in enumerate(p.features)}
    return pointcloud_transform(PointSet(x[:, :3].float(), extra.get("normals"), extra.get("colors")), p, g)


def _embed_views(item: Union[Source, torch.Tensor], p: PointCloudConfig, name: str) -> list[list[torch.Tensor]]:
    """One view: the cloud's fixed subset of points (a tensor is taken as a model input [P, 3 + F])."""
    return [[item if isinstance(item, torch.Tensor) else _load(item, p, name, None, None)]]


def group_masker(p: PointCloudConfig, mask: MaskConfig, inputs: torch.Tensor, g: torch.Generator,
                 valid: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clouds [B, P, C] -> groups [B, G, K, C] (centres exist only after FPS), with neighbourhood masks
    on the centres. The tokenizer takes the groups as they are, so FPS runs once per sample."""
    assert valid is None, "point clouds have no padded tokens"
    groups = group_points(inputs, p.num_groups, p.group_size)
    return (groups, *sample_neighbourhood_masks(groups[:, :, 0, :3], mask, g))


SPEC = ModalitySpec(
    name="pointcloud", config=PointCloudConfig, extensions=POINT_EXTENSIONS, validate=validate_pointcloud,
    tokenizer=lambda p, dim: pointcloud_tokenizer(3 + 3 * len(p.features), dim, p.num_groups, p.group_size,
                                                  p.pointnet_width),
    load=_load, from_tensor=_from_tensor, embed_views=_embed_views,
    masks=lambda p, mask: functools.partial(group_masker, p, mask),
    check_masks=lambda p, mask, where: validate_neighbourhood_mask(mask, p.num_groups, where),
    pos_embed=lambda p, dim: point_pos_embed(p.pos_encoding, dim), requires=("open3d",))
