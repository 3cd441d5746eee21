"""Point-cloud groups: farthest point sampling + k nearest neighbours, a mini-PointNet, xyz position codes.

clouds [B, P, 3 + F] -> groups [B, G, K, 3 + F] -> tokens [B, G, D] + centre coords [B, G, 3].

Grouping is batched torch (one loop over the G centres, none over points or samples), so it runs
on whatever device the points are on: in DataLoader workers for training (the mask sampler needs
the centres) and on the model's device when the tokenizer is given raw clouds (embedding).
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from einops import reduce
from torch import nn

from multijepa.core.transformer import PosEmbed, init_weights, sincos_codes


def farthest_point_sample(xyz: torch.Tensor, num: int) -> torch.Tensor:
    """Greedy farthest point sampling, starting from point 0.

    Each pick is the point whose distance to the nearest point already picked is largest (the first
    such point on ties).

    Args:
        xyz: [B, P, 3] points.
        num: centres to pick, at most P.

    Returns:
        [B, num] long indices into P, in the order picked.

    >>> farthest_point_sample(torch.tensor([[[0.0, 0, 0], [1, 0, 0], [5, 0, 0]]]), 2).tolist()
    [[0, 2]]
    """
    b, p, _ = xyz.shape
    xyz = xyz.float()
    picked = torch.zeros(b, num, dtype=torch.long, device=xyz.device)
    nearest = torch.full((b, p), float("inf"), device=xyz.device)
    current = torch.zeros(b, dtype=torch.long, device=xyz.device)
    rows = torch.arange(b, device=xyz.device)
    for i in range(num):
        picked[:, i] = current
        centre = xyz[rows, current].unsqueeze(1)  # [B, 1, 3]
        nearest = torch.minimum(nearest, (xyz - centre).pow(2).sum(-1))
        current = nearest.argmax(dim=1)
    return picked


def knn(query: torch.Tensor, xyz: torch.Tensor, k: int, query_idx: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Indices of the k points of ``xyz`` nearest each query point, nearest first.

    Args:
        query: [B, M, 3]; xyz: [B, P, 3]; k <= P.
        query_idx: [B, M] when the queries are points of ``xyz``: each query then comes first in its
            own list, whatever the rounding and however many duplicates it has.

    Returns:
        [B, M, k] long indices into P.
    """
    # |q|^2 + |x|^2 - 2 q.x: one matmul, no [B, M, P, 3] temporary (memory-bound on large clouds).
    q, x = query.float(), xyz.float()
    with torch.autocast(q.device.type, enabled=False):  # float32 distances under bf16 autocast too
        dist = q.pow(2).sum(-1, keepdim=True) + x.pow(2).sum(-1).unsqueeze(1) - 2 * q @ x.transpose(1, 2)
    if query_idx is not None:
        dist.scatter_(2, query_idx.unsqueeze(-1), -1.0)
    return dist.topk(k, dim=-1, largest=False, sorted=True).indices


def morton_order(xyz: torch.Tensor, bits: int = 10) -> torch.Tensor:
    """A spatially coherent order of points: sort by the Z-order (Morton) code of their quantised xyz.

    Args:
        xyz: [B, G, 3].

    Returns:
        [B, G] long permutation: nearby indices are mostly nearby in space.
    """
    lo = xyz.amin(dim=1, keepdim=True)
    span = (xyz.amax(dim=1, keepdim=True) - lo).clamp_min(1e-9)
    cells = ((xyz - lo) / span * (2**bits - 1)).round().long()  # [B, G, 3] in [0, 2^bits)
    code = torch.zeros(cells.shape[:2], dtype=torch.long, device=xyz.device)
    for bit in range(bits):
        for axis in range(3):
            code |= ((cells[..., axis] >> bit) & 1) << (3 * bit + axis)
    return code.argsort(dim=1, stable=True)


def group_points(points: torch.Tensor, num_groups: int, group_size: int) -> torch.Tensor:
    """Cut clouds into overlapping local groups.

    Centres come from farthest point sampling, reordered along a Morton curve; each group is its
    centre's ``group_size`` nearest points (by xyz), the centre itself always first.

    Args:
        points: [B, P, 3 + F] clouds (xyz first, then per-point features).

    Returns:
        groups [B, G, K, 3 + F] in absolute coordinates; ``groups[:, :, 0, :3]`` are the centres.

    >>> group_points(torch.rand(2, 100, 3), num_groups=8, group_size=16).shape
    torch.Size([2, 8, 16, 3])
    """
    b, p, c = points.shape
    xyz = points[..., :3]
    centre_idx = farthest_point_sample(xyz, num_groups)
    rows = torch.arange(b, device=points.device).unsqueeze(1)
    centre_idx = centre_idx.gather(1, morton_order(xyz[rows, centre_idx]))
    members = knn(xyz[rows, centre_idx], xyz, group_size, query_idx=centre_idx)  # [B, G, K]
    return points[rows.unsqueeze(-1), members]


class PointGroupTokenizer(nn.Module):
    """Groups -> tokens by a mini-PointNet on points relative to their centre; coords = centre xyz.

    Accepts clouds [B, P, 3 + F] (grouped here, on their device) or groups [B, G, K, 3 + F] that
    the data loader already made. The PointNet is shared per point (Linear, LayerNorm, GELU; no
    BatchNorm, whose running statistics an EMA teacher would never update), max-pooled over the
    group, its pooled feature concatenated back to every point, a second per-point MLP, max-pooled.

    >>> tok = pointcloud_tokenizer(in_channels=3, dim=32, num_groups=8, group_size=16, width=16)
    >>> tokens, coords = tok(torch.rand(2, 100, 3))
    >>> tokens.shape, coords.shape
    (torch.Size([2, 8, 32]), torch.Size([2, 8, 3]))
    """

    def __init__(self, in_channels: int, dim: int, num_groups: int, group_size: int, width: int):
        super().__init__()
        self.num_groups, self.group_size = num_groups, group_size
        self.first = nn.Sequential(nn.Linear(in_channels, width), nn.LayerNorm(width), nn.GELU(),
                                   nn.Linear(width, width))
        self.second = nn.Sequential(nn.Linear(2 * width, 2 * width), nn.LayerNorm(2 * width), nn.GELU(),
                                    nn.Linear(2 * width, dim))
        init_weights(self)

    selects_tokens = True  # each token depends on its own group only: Backbone may ask for a subset

    def forward(self, x: torch.Tensor, keep_idx: Optional[torch.Tensor] = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: clouds [B, P, C] or groups [B, G, K, C]; keep_idx [B, N'] embeds only those groups.

        Returns tokens [B, G or N', D] and centre coords [B, G or N', 3].
        """
        if x.ndim == 3:
            with torch.no_grad():
                x = group_points(x, self.num_groups, self.group_size)
        if keep_idx is not None:
            x = x[torch.arange(x.shape[0], device=x.device).unsqueeze(1), keep_idx]
        centres = x[:, :, :1, :3]  # [B, G, 1, 3]
        local = torch.cat([x[..., :3] - centres, x[..., 3:]], dim=-1)  # [B, G, K, C]
        h = self.first(local)
        h = torch.cat([reduce(h, "b g k w -> b g 1 w", "max").expand_as(h), h], dim=-1)
        return reduce(self.second(h), "b g k d -> b g d", "max"), centres.squeeze(2)


def pointcloud_tokenizer(in_channels: int, dim: int, num_groups: int, group_size: int, width: int) -> PointGroupTokenizer:
    return PointGroupTokenizer(in_channels, dim, num_groups, group_size, width)


# --------------------------------------------------------------------------- position codes from xyz


class MlpPosEmbed(nn.Module):
    """A learned position code: xyz [B, N, 3] -> [B, N, dim] by Linear, GELU, Linear (as in Point-MAE).

    Called as ``pos_embed(coords, dim)`` like the fixed codes; ``dim`` must be the width it was built for.
    """

    def __init__(self, dim: int, in_dim: int = 3, hidden: int = 128):
        super().__init__()
        self.dim = dim
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        init_weights(self)
        nn.init.normal_(self.net[0].weight, std=1.0)  # spread the first layer so xyz of unit scale is resolved

    def forward(self, coords: torch.Tensor, dim: int) -> torch.Tensor:
        assert dim == self.dim, f"this position MLP gives width {self.dim}, not {dim}"
        return self.net(coords.float())


def fourier_embed(coords: torch.Tensor, dim: int, max_log2: float = 6.0) -> torch.Tensor:
    """Fixed Fourier features of continuous coords: sin/cos of pi * 2^f * x, f in [0, max_log2] per axis.

    Suits coords of order 1 (clouds in the unit sphere): the slowest band spans the cloud, the
    fastest resolves about 1/64 of it. [B, N, C] -> [B, N, dim], laid out and zero-padded as by
    ``sincos_embed`` (the same :func:`~multijepa.core.transformer.sincos_codes`, other frequencies).

    >>> fourier_embed(torch.zeros(1, 4, 3), 32).shape
    torch.Size([1, 4, 32])
    """
    per_axis = dim // (2 * coords.shape[-1])
    freqs = math.pi * 2.0 ** torch.linspace(0.0, max_log2, per_axis, device=coords.device)
    return sincos_codes(coords, dim, freqs)


def point_pos_embed(kind: str, dim: int) -> Union[MlpPosEmbed, PosEmbed]:
    """The position code for centre xyz: a learned MLP module of width ``dim``, or the fixed Fourier features."""
    return MlpPosEmbed(dim) if kind == "mlp" else fourier_embed
