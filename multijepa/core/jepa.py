"""The modality-agnostic JEPA: context encoder, EMA target encoder, predictor, latent loss.

The core never branches on modality: it sees a tokenizer's ``tokens [B, N, D]`` and
``coords [B, N, C]`` and index tensors from the mask sampler.
"""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from multijepa.core.transformer import Transformer, init_weights, sincos_embed

if TYPE_CHECKING:  # recipe.py imports the mask validator from core at load time
    from multijepa.recipe import LossConfig, ModelConfig, Recipe


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Pick tokens per sample: x [B, N, D], idx [B, K] -> [B, K, D]."""
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def key_mask(keep: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """bool [B, K] (True = a real token) -> an attention mask [B, 1, 1, K] that hides padded keys.

    None when every token is real: SDPA then keeps its fused kernels (flash attention takes no mask).
    """
    return None if keep is None or bool(keep.all()) else keep[:, None, None, :]


def pool_tokens(feats: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean over tokens: feats [B, N, D] -> [B, D], over the valid ones only when ``valid`` [B, N] is given."""
    if valid is None:
        return feats.mean(1)
    w = valid.to(feats.dtype).unsqueeze(-1)
    return (feats * w).sum(1) / w.sum(1).clamp_min(1.0)


class Backbone(nn.Module):
    """Tokenizer + position codes from coords + transformer encoder.

    ``forward(inputs, keep_idx)`` encodes only the kept tokens (the context); without ``keep_idx``
    it encodes all of them (the target view and embedding). ``real`` marks, per encoded token, the
    real ones: padded tokens are hidden from attention, so they never change a real token's output.
    A tokenizer whose tokens each depend on their own part of the input alone may say so with
    ``selects_tokens = True`` and accept ``tokenizer(inputs, keep_idx)``: it then embeds only the
    kept tokens, which is the same result for less work (point-group tokenizers spend most of a
    step embedding groups).
    """

    def __init__(self, tokenizer: nn.Module, cfg: ModelConfig,
                 pos_embed: Callable[[torch.Tensor, int], torch.Tensor] = sincos_embed):
        super().__init__()
        self.tokenizer = tokenizer
        self.pos_embed = pos_embed
        self.dim = cfg.dim
        self.encoder = Transformer(cfg.dim, cfg.depth, cfg.heads, cfg.mlp_ratio, cfg.drop_path)

    def forward(self, inputs: torch.Tensor, keep_idx: Optional[torch.Tensor] = None,
                real: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """keep_idx [B, K] (>= 0), real bool [B, K] or [B, N] without keep_idx.

        Returns features [B, K, D] (K = N without keep_idx) and their coords [B, K, C].
        """
        if keep_idx is not None and getattr(self.tokenizer, "selects_tokens", False):
            tokens, coords = self.tokenizer(inputs, keep_idx)
            keep_idx = None
        else:
            tokens, coords = self.tokenizer(inputs)
        x = tokens + self.pos_embed(coords, self.dim).to(tokens.dtype)
        if keep_idx is not None:
            x, coords = gather_tokens(x, keep_idx), gather_tokens(coords, keep_idx)
        return self.encoder(x, key_mask(real)), coords


class Predictor(nn.Module):
    """Narrow transformer: context features + mask tokens at target coords -> predicted features."""

    def __init__(self, cfg: ModelConfig,
                 pos_embed: Callable[[torch.Tensor, int], torch.Tensor] = sincos_embed):
        super().__init__()
        self.pos_embed = pos_embed
        self.pdim = cfg.predictor_dim
        self.embed = nn.Linear(cfg.dim, cfg.predictor_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.predictor_dim))
        self.transformer = Transformer(cfg.predictor_dim, cfg.predictor_depth, cfg.predictor_heads,
                                       cfg.mlp_ratio)
        self.out = nn.Linear(cfg.predictor_dim, cfg.dim)
        init_weights(self.embed)
        init_weights(self.out)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward(self, context: torch.Tensor, context_coords: torch.Tensor, target_coords: torch.Tensor,
                context_real: Optional[torch.Tensor] = None, target_real: Optional[torch.Tensor] = None
                ) -> torch.Tensor:
        """context [B, Nc, D], context_coords [B, Nc, C], target_coords [B, M, Nt, C] -> [B, M, Nt, D].

        Each of the M target blocks is predicted in its own sequence, as in I-JEPA, so blocks
        cannot see each other's mask tokens. ``context_real`` [B, Nc] and ``target_real`` [B, M, Nt]
        (given together) hide padded context tokens and padded queries from attention.
        """
        b, m, nt, c = target_coords.shape
        x = self.embed(context) + self.pos_embed(context_coords, self.pdim).to(context.dtype)
        x = x.repeat_interleave(m, dim=0)  # [B*M, Nc, P]
        queries = self.mask_token + self.pos_embed(target_coords.reshape(b * m, nt, c), self.pdim).to(x.dtype)
        real = None
        if context_real is not None:
            real = torch.cat([context_real.repeat_interleave(m, dim=0), target_real.reshape(b * m, nt)], dim=1)
        h = self.transformer(torch.cat([x, queries], dim=1), key_mask(real))
        return self.out(h[:, x.shape[1]:]).reshape(b, m, nt, -1)


def latent_loss(pred: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean L1, L2 or smooth-L1 distance between predicted and target features (any equal shapes)."""
    if kind == "l1":
        return F.l1_loss(pred, target)
    if kind == "l2":
        return F.mse_loss(pred, target)
    return F.smooth_l1_loss(pred, target)


def sigreg(z: torch.Tensor, directions: int, generator: Optional[torch.Generator] = None,
           num_points: int = 17, t_max: float = 3.0) -> torch.Tensor:
    """Sketched isotropic-Gaussian regulariser (SIGReg, LeJEPA).

    Projects ``z [N, D]`` on random unit directions and measures, with the Epps-Pulley statistic,
    how far each 1-D projection's characteristic function is from a standard normal's. Zero for
    isotropic Gaussian embeddings, large for collapsed ones.
    """
    d = z.shape[1]
    a = torch.randn(d, directions, device=z.device, generator=generator)
    a = a / a.norm(dim=0, keepdim=True)
    proj = z.float() @ a  # [N, K]
    t = torch.linspace(0.0, t_max, num_points, device=z.device)
    angles = proj.unsqueeze(-1) * t  # [N, K, T]
    real, imag = angles.cos().mean(0), angles.sin().mean(0)  # empirical characteristic function
    gauss = torch.exp(-0.5 * t**2)
    err = (real - gauss) ** 2 + imag**2  # [K, T]
    weight = gauss  # Epps-Pulley weighting; the integrand is even, so integrate over t >= 0 twice
    stat = 2.0 * torch.trapezoid(err * weight, t, dim=-1)
    return stat.mean()


def vicreg(z: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """VICReg variance + covariance terms on ``z [N, D]``."""
    z = z.float() - z.float().mean(0)
    std = torch.sqrt(z.var(0) + eps)
    variance = F.relu(1.0 - std).mean()
    cov = (z.T @ z) / max(z.shape[0] - 1, 1)
    off = cov - torch.diag(torch.diag(cov))
    return variance + off.pow(2).sum() / z.shape[1]


class JEPA(nn.Module):
    """Context encoder, EMA target encoder and predictor; ``forward`` returns the training loss.

    >>> from multijepa.recipe import Recipe
    >>> model = build_model(Recipe())
    """

    def __init__(self, context: Backbone, predictor: Predictor, loss: LossConfig):
        super().__init__()
        self.context = context
        self.predictor = predictor
        self.target = copy.deepcopy(context)
        self.target.requires_grad_(False)
        self.loss_cfg = loss

    def forward(self, inputs: torch.Tensor, context_idx: torch.Tensor, target_idx: torch.Tensor,
                valid: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """inputs: a modality batch; context_idx [B, Nc]; target_idx [B, M, Nt].

        With ``valid`` (bool [B, N], False on padding tokens) the index sets may hold -1 entries
        (padding, see ``sample_block_masks``): padding is hidden from every attention and left out
        of the loss.

        Returns a dict with ``loss`` (to minimise), ``prediction``, ``regularizer`` and the
        detached mean-pooled target features ``target_pooled [B, D]`` for health monitors.
        """
        b, m, nt = target_idx.shape
        context_real = target_real = None
        if valid is not None:
            context_real, target_real = context_idx >= 0, target_idx >= 0
            context_idx, target_idx = context_idx.clamp_min(0), target_idx.clamp_min(0)
        with torch.no_grad():
            self.target.eval()  # no stochastic depth in the teacher
            feats, coords = self.target(inputs, real=valid)
            pooled = pool_tokens(feats, valid)
            if self.loss_cfg.normalize_targets:
                feats = F.layer_norm(feats, feats.shape[-1:])
            flat_idx = target_idx.reshape(b, m * nt)
            targets = gather_tokens(feats, flat_idx).reshape(b, m, nt, -1)
            target_coords = gather_tokens(coords, flat_idx).reshape(b, m, nt, -1)
        ctx, ctx_coords = self.context(inputs, context_idx, real=context_real)
        pred = self.predictor(ctx, ctx_coords, target_coords, context_real, target_real)
        if target_real is not None:  # only real targets count; [K, D] after boolean indexing
            pred, targets = pred[target_real], targets[target_real]
        pred_loss = latent_loss(pred.float(), targets.float(), self.loss_cfg.type)
        reg = pred_loss.new_zeros(())
        if self.loss_cfg.regularizer != "none" and self.loss_cfg.regularizer_weight > 0:
            z = ctx[context_real] if context_real is not None else ctx.reshape(-1, ctx.shape[-1])
            reg = sigreg(z, self.loss_cfg.sigreg_directions) if self.loss_cfg.regularizer == "sigreg" else vicreg(z)
        loss = pred_loss + self.loss_cfg.regularizer_weight * reg
        return {"loss": loss, "prediction": pred_loss.detach(), "regularizer": reg.detach(),
                "target_pooled": pooled.detach()}

    @torch.no_grad()
    def update_target(self, momentum: float) -> None:
        """EMA: target <- momentum * target + (1 - momentum) * context, one fused op per list."""
        tgt = list(self.target.parameters())
        src = list(self.context.parameters())
        torch._foreach_mul_(tgt, momentum)
        torch._foreach_add_(tgt, src, alpha=1.0 - momentum)


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


def cosine_schedule(step: int, total: int, start: float, end: float, warmup: int = 0) -> float:
    """Linear warm-up from 0 to ``start`` over ``warmup`` steps, then cosine from ``start`` to ``end``.

    >>> cosine_schedule(0, 100, 1.0, 0.0, warmup=10), cosine_schedule(100, 100, 1.0, 0.0)
    (0.0, 0.0)
    """
    if step < warmup:
        return start * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_model(recipe: Recipe) -> JEPA:
    """The JEPA for a recipe: its modality's tokenizer under the shared encoder and predictor.

    >>> from multijepa.recipe import Recipe
    >>> type(build_model(Recipe())).__name__
    'JEPA'
    """
    from multijepa.tokenizers import build_pos_embed, build_tokenizer

    m = recipe.model
    return JEPA(Backbone(build_tokenizer(recipe), m, build_pos_embed(recipe, m.dim)),
                Predictor(m, build_pos_embed(recipe, m.predictor_dim)), recipe.loss)
