"""The losses of the JEPA core: latent distances, target normalisation, the collapse regularisers
(SIGReg, VICReg) and the collapse monitors the trainer logs."""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from multijepa.core.transformer import masked_moments


def normalize_targets(feats: torch.Tensor, how: str, valid: Optional[torch.Tensor] = None,
                      eps: float = 1e-5) -> torch.Tensor:
    """Target features [B, N, D] as they are (``none``), normalised per token (``layer``) or per sample
    and feature over the sample's real tokens (``instance``; ``valid`` [B, N] marks them, padding
    comes out as zeros)."""
    if how == "none":
        return feats
    if how == "layer":
        return F.layer_norm(feats, feats.shape[-1:])
    if how != "instance":
        raise ValueError(f"target normalisation {how!r}: expected none, layer or instance (loss.target_norm)")
    w = torch.ones_like(feats[..., :1]) if valid is None else valid.to(feats.dtype).unsqueeze(-1)
    mean, var = masked_moments(feats, w, (1,))
    return (feats - mean) * torch.rsqrt(var + eps) * w


def latent_loss(pred: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean L1, L2 or smooth-L1 distance between predicted and target features (any equal shapes)."""
    if kind == "l1":
        return F.l1_loss(pred, target)
    if kind == "l2":
        return F.mse_loss(pred, target)
    return F.smooth_l1_loss(pred, target)


def world_size() -> int:
    """The number of ranks of the initialised ``torch.distributed`` process group, else 1."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def sigreg(z: torch.Tensor, directions: int, generator: Optional[torch.Generator] = None,
           num_points: int = 17, t_max: float = 3.0) -> torch.Tensor:
    """Sketched isotropic-Gaussian regulariser (SIGReg), LeJEPA's statistic.

    Projects ``z [N, D]`` on random unit directions (drawn on the CPU from ``generator``, or the
    global generator) and measures, per direction, how far the projections' empirical
    characteristic function is from a standard normal's: the Epps-Pulley statistic
    ``N * integral over [-t_max, t_max] of |phi_N(t) - exp(-t^2/2)|^2 exp(-t^2/2) dt`` (trapezoid,
    ``num_points`` nodes on t >= 0, the integrand being even), averaged over directions. Near 1 for
    isotropic Gaussian samples whatever N, growing with N for collapsed ones.

    Under ``torch.distributed`` the characteristic function is averaged over every rank's samples
    (N is the global count; one all-reduce, in the forward pass only) and each rank's gradient is
    scaled by the number of ranks, so that DDP's average of the ranks' gradients is the gradient of
    the whole batch's statistic. Every rank must then call it, in the same order and with the same
    directions; a rank without samples passes an empty ``z``.
    """
    d = z.shape[1]
    a = torch.randn(d, directions, generator=generator).to(z.device)
    a = a / a.norm(dim=0, keepdim=True)
    t = torch.linspace(0.0, t_max, num_points, device=z.device)
    angles = (z.float() @ a).unsqueeze(-1) * t  # [N, K, T]
    sums = torch.stack([angles.cos().sum(0), angles.sin().sum(0)])  # [2, K, T]
    n = torch.tensor(float(z.shape[0]), device=z.device)
    if (world := world_size()) > 1:
        total = torch.cat([sums.detach().flatten(), n.view(1)])
        dist.all_reduce(total)
        n = total[-1]
        sums = total[:-1].view_as(sums) + world * (sums - sums.detach())  # the value of the whole batch's sums
    real, imag = sums / n.clamp_min(1.0)
    gauss = torch.exp(-0.5 * t**2)
    err = (real - gauss) ** 2 + imag**2  # [K, T]
    return n * 2.0 * torch.trapezoid(err * gauss, t, dim=-1).mean()


def vicreg(z: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """VICReg variance + covariance terms on ``z [N, D]``."""
    z = z.float() - z.float().mean(0)
    std = torch.sqrt(z.var(0) + eps)
    variance = F.relu(1.0 - std).mean()
    cov = (z.T @ z) / max(z.shape[0] - 1, 1)
    off = cov - torch.diag(torch.diag(cov))
    return variance + off.pow(2).sum() / z.shape[1]


def feature_health(pooled: torch.Tensor) -> dict[str, torch.Tensor]:
    """Collapse monitors on pooled features [B, D]: mean per-dim std and effective rank.

    Effective rank is exp(entropy of the normalised singular values) of the centred features: 1 for
    a fully collapsed set, up to min(B, D) for well-spread ones.
    """
    z = pooled.float()
    z = z - z.mean(0)
    std = z.std(0).mean() if z.shape[0] > 1 else z.new_zeros(())
    s = torch.linalg.svdvals(z)
    p = s / s.sum().clamp_min(1e-12)
    erank = torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())
    return {"target_std": std, "target_erank": erank}
