"""The modality-agnostic JEPA: context encoder, EMA target encoder, predictor, latent loss.

The core never branches on modality: it sees a tokenizer's ``tokens [B, N, D]`` and
``coords [B, N, C]`` and index tensors from the mask sampler. The recipe sections that configure
it (``model``, ``loss``) are defined here, beside what they configure.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch
from einops import rearrange, repeat
from torch import nn

from multijepa.core.losses import latent_loss, normalize_targets, sigreg, vicreg, world_size
from multijepa.core.transformer import PosEmbed, Segments, Transformer, init_weights, padding_waste, unpack
from multijepa.errors import check


@dataclass(frozen=True)
class ModelConfig:
    """Shared transformer core: context/target encoder and the narrow predictor (``model`` section)."""

    dim: int = 192
    depth: int = 6
    heads: int = 3
    mlp_ratio: float = 4.0
    drop_path: float = 0.0
    predictor_dim: int = 96
    predictor_depth: int = 3
    predictor_heads: int = 3


TargetNorm = Literal["none", "layer", "instance"]


@dataclass(frozen=True)
class LossConfig:
    """Latent prediction loss and the optional second collapse guard (``loss`` section)."""

    type: Literal["l1", "l2", "smooth_l1"] = "smooth_l1"
    # How target features are normalised before the loss. layer: each token's features (I-JEPA);
    # instance: each feature over a sample's real tokens, which removes what is constant across the
    # sample (a speaker, a recording), as data2vec does for speech; none: as the target encoder gives them
    target_norm: TargetNorm = "layer"
    regularizer: Literal["none", "sigreg", "vicreg"] = "none"
    # SIGReg is LeJEPA's N-scaled statistic, so a weight w here is LeJEPA's lambda = w / (1 + w) (its
    # 0.05 is w = 0.0526): the loss is prediction + w x regulariser
    regularizer_weight: float = 0.05
    # What the regulariser sees: samples: one embedding per sample, the mean of its context tokens
    # (LeJEPA); tokens: every context token of the batch, pooled together
    regularizer_on: Literal["samples", "tokens"] = "samples"
    sigreg_directions: int = 256


def validate_model(mo: ModelConfig, where: str) -> None:
    check(mo.dim % mo.heads == 0 and (mo.dim // mo.heads) % 2 == 0, where, "model.heads",
          f"must divide model.dim={mo.dim} into even-sized heads, got {mo.heads}")
    check(mo.predictor_dim % mo.predictor_heads == 0, where, "model.predictor_heads",
          f"must divide model.predictor_dim={mo.predictor_dim}")
    check(mo.depth > 0 and mo.predictor_depth > 0, where, "model.depth", "depths must be positive")
    check(0 <= mo.drop_path < 1, where, "model.drop_path", "must be in [0, 1)")


def validate_loss(loss: LossConfig, where: str) -> None:
    check(loss.regularizer_weight >= 0, where, "loss.regularizer_weight", "must be 0 or more")
    check(loss.sigreg_directions >= 1, where, "loss.sigreg_directions", "must be at least 1")


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Pick tokens per sample: x [B, N, D], idx [B, K] -> [B, K, D]."""
    return torch.gather(x, 1, repeat(idx, "b k -> b k d", d=x.shape[-1]))


def pool_tokens(feats: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean over tokens: feats [B, N, D] -> [B, D], over the valid ones only when ``valid`` [B, N] is given."""
    if valid is None:
        return feats.mean(1)
    w = valid.to(feats.dtype).unsqueeze(-1)
    return (feats * w).sum(1) / w.sum(1).clamp_min(1.0)


def encode_batches(transformer: Transformer, xs: list[torch.Tensor], reals: list[Optional[torch.Tensor]],
                   outputs_from: int = 0) -> tuple[list[torch.Tensor], Optional[Segments]]:
    """Run one transformer over several batches of sequences ``xs[i]`` [B_i, N_i, D] at once.

    ``reals[i]`` (bool [B_i, N_i], or None when every token is real) marks real tokens. One batch
    with no padding runs dense, so SDPA keeps its fused kernels. Otherwise the real tokens of every
    sequence are packed end to end and attend block-diagonally (see ``packed_attention``): batches
    of different lengths and modalities share one pass, and on CUDA no compute goes to padding.

    Returns:
        The outputs [B_i, N_i, D] (zeros at padding) and the packing's ``Segments`` (None when dense);
        a dense pass with ``outputs_from`` returns only tokens ``outputs_from:`` (see :class:`Transformer`).
    """
    if len(xs) == 1 and (reals[0] is None or bool(reals[0].all())):
        return [transformer(xs[0], outputs_from=outputs_from)], None
    reals = [torch.ones(x.shape[:2], dtype=torch.bool, device=x.device) if r is None else r for x, r in zip(xs, reals)]
    lengths = [r.sum(1) for r in reals]
    segments = Segments(torch.cat(lengths))
    packed = transformer(torch.cat([x[r] for x, r in zip(xs, reals)]), segments=segments)
    outs = packed.split(torch.stack([n.sum() for n in lengths]).tolist())  # one host sync for all batches
    return [unpack(o, r) for o, r in zip(outs, reals)], segments


class PositionCodes(nn.Module):
    """Each modality's ``pos_embed(coords, dim)``: fixed functions (sin-cos on grids) or learned
    modules (an MLP on point-cloud xyz), the modules registered so they train and save."""

    def __init__(self, codes: dict[str, PosEmbed]):
        super().__init__()
        self.learned = nn.ModuleDict({m: c for m, c in codes.items() if isinstance(c, nn.Module)})
        self.fixed = {m: c for m, c in codes.items() if not isinstance(c, nn.Module)}

    def forward(self, modality: str, coords: torch.Tensor, dim: int) -> torch.Tensor:
        code = self.learned[modality] if modality in self.learned else self.fixed[modality]
        return code(coords, dim)


def _modality_embeddings(modalities: list[str], dim: int) -> Optional[nn.ParameterDict]:
    """A learned vector per modality, added to its tokens; none for a single modality (a constant)."""
    if len(modalities) < 2:
        return None
    return nn.ParameterDict({m: nn.Parameter(nn.init.trunc_normal_(torch.zeros(1, 1, dim), std=0.02))
                             for m in modalities})


class Backbone(nn.Module):
    """Tokenizers (one per modality) + position codes from coords + one shared transformer encoder.

    ``forward(inputs, modality, keep_idx)`` encodes only the kept tokens (the context); without
    ``keep_idx`` it encodes all of them (the target view and embedding). ``real`` marks, per encoded
    token, the real ones: padded tokens never change a real token's output. ``encode`` runs
    batches of several modalities through the encoder in one packed pass.

    A tokenizer whose tokens each depend on their own part of the input alone may say so with
    ``selects_tokens = True`` and accept ``tokenizer(inputs, keep_idx)``: it then embeds only the
    kept tokens, which is the same result for less work (point-group tokenizers spend most of a
    step embedding groups).
    """

    def __init__(self, tokenizers: dict[str, nn.Module], cfg: ModelConfig, pos_embeds: dict[str, PosEmbed]):
        super().__init__()
        self.tokenizers = nn.ModuleDict(tokenizers)
        self.pos = PositionCodes(pos_embeds)
        self.modality_embed = _modality_embeddings(list(tokenizers), cfg.dim)
        self.dim = cfg.dim
        self.encoder = Transformer(cfg.dim, cfg.depth, cfg.heads, cfg.mlp_ratio, cfg.drop_path)

    def embed(self, inputs: torch.Tensor, modality: str, keep_idx: Optional[torch.Tensor] = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens with their position (and modality) codes, before the encoder: [B, K, D] and coords [B, K, C]."""
        tokenizer = self.tokenizers[modality]
        if keep_idx is not None and getattr(tokenizer, "selects_tokens", False):
            tokens, coords = tokenizer(inputs, keep_idx)
            keep_idx = None
        else:
            tokens, coords = tokenizer(inputs)
        # The residual stream keeps the weights' dtype (float32 under bf16 autocast, as mixed precision
        # means: only the matrix products run in bf16), whatever dtype the tokenizer's product came in.
        dtype = self.encoder.norm.weight.dtype
        x = tokens.to(dtype) + self.pos(modality, coords, self.dim).to(dtype)
        if self.modality_embed is not None:
            x = x + self.modality_embed[modality].to(dtype)
        if keep_idx is not None:
            x, coords = gather_tokens(x, keep_idx), gather_tokens(coords, keep_idx)
        return x, coords

    def encode(self, batches: dict[str, tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]]
               ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], Optional[Segments]]:
        """Encode several modalities' batches in one pass: {modality: (inputs, keep_idx, real)} ->
        {modality: (features [B, K, D], coords [B, K, C])} and the packing (None when dense)."""
        embedded = {m: self.embed(inputs, m, keep_idx) for m, (inputs, keep_idx, _) in batches.items()}
        feats, segments = encode_batches(self.encoder, [x for x, _ in embedded.values()],
                                         [real for _, _, real in batches.values()])
        return {m: (f, coords) for (m, (_, coords)), f in zip(embedded.items(), feats)}, segments

    def forward(self, inputs: torch.Tensor, modality: str, keep_idx: Optional[torch.Tensor] = None,
                real: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One modality's batch: keep_idx [B, K] (>= 0), real bool [B, K] or [B, N] without keep_idx.

        Returns features [B, K, D] (K = N without keep_idx) and their coords [B, K, C].
        """
        return self.encode({modality: (inputs, keep_idx, real)})[0][modality]


class Predictor(nn.Module):
    """Narrow transformer: context features + mask tokens at target coords -> predicted features.

    Shared by every modality; each keeps its own position codes, and with several modalities a
    learned modality vector tells the mask tokens which one they predict.
    """

    def __init__(self, cfg: ModelConfig, pos_embeds: dict[str, PosEmbed]):
        super().__init__()
        self.modalities = list(pos_embeds)
        self.pos = PositionCodes(pos_embeds)
        self.modality_embed = _modality_embeddings(self.modalities, cfg.predictor_dim)
        self.pdim = cfg.predictor_dim
        self.embed = nn.Linear(cfg.dim, cfg.predictor_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.predictor_dim))
        self.transformer = Transformer(cfg.predictor_dim, cfg.predictor_depth, cfg.predictor_heads,
                                       cfg.mlp_ratio)
        self.out = nn.Linear(cfg.predictor_dim, cfg.dim)
        init_weights(self.embed)
        init_weights(self.out)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def _sequences(self, modality: str, context: torch.Tensor, context_coords: torch.Tensor,
                   target_coords: torch.Tensor, context_real: Optional[torch.Tensor],
                   target_real: Optional[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """One sequence per (sample, target block): [B*M, Nc + Nt, P] and its real tokens (or None)."""
        b, m, nt, c = target_coords.shape
        dtype = self.mask_token.dtype  # the residual stream in the weights' dtype, as in the encoder
        x = self.embed(context).to(dtype) + self.pos(modality, context_coords, self.pdim).to(dtype)
        query_coords = rearrange(target_coords, "b m nt c -> (b m) nt c")
        queries = self.mask_token + self.pos(modality, query_coords, self.pdim).to(dtype)
        if self.modality_embed is not None:
            code = self.modality_embed[modality].to(dtype)
            x, queries = x + code, queries + code
        real = None
        if context_real is not None:
            query_real = rearrange(target_real, "b m nt -> (b m) nt")
            real = torch.cat([context_real.repeat_interleave(m, dim=0), query_real], dim=1)
        return torch.cat([x.repeat_interleave(m, dim=0), queries], dim=1), real

    def predict(self, batches: dict[str, tuple]) -> tuple[dict[str, torch.Tensor], Optional[Segments]]:
        """Several modalities at once: {modality: (context, context_coords, target_coords, context_real,
        target_real)} -> {modality: predictions [B, M, Nt, D]} and the packing (None when dense)."""
        seqs = {m: self._sequences(m, *args) for m, args in batches.items()}
        # Only the queries' outputs are needed: a dense pass of one modality skips the rest of the last block.
        only_queries = next(iter(batches.values()))[0].shape[1] if len(batches) == 1 else 0
        outs, segments = encode_batches(self.transformer, [x for x, _ in seqs.values()], [r for _, r in seqs.values()],
                                        outputs_from=only_queries)
        preds = {}
        for (m, (_, _, target_coords, _, _)), h in zip(batches.items(), outs):
            b, k, nt, _ = target_coords.shape
            preds[m] = rearrange(self.out(h[:, -nt:]), "(b k) nt d -> b k nt d", b=b)  # the queries end every sequence
        return preds, segments

    def forward(self, context: torch.Tensor, context_coords: torch.Tensor, target_coords: torch.Tensor,
                context_real: Optional[torch.Tensor] = None, target_real: Optional[torch.Tensor] = None,
                modality: str = "") -> torch.Tensor:
        """context [B, Nc, D], context_coords [B, Nc, C], target_coords [B, M, Nt, C] -> [B, M, Nt, D].

        Each of the M target blocks is predicted in its own sequence, as in I-JEPA, so blocks
        cannot see each other's mask tokens. ``context_real`` [B, Nc] and ``target_real`` [B, M, Nt]
        (given together) hide padded context tokens and padded queries from attention. ``modality``
        may be left out for a one-modality predictor.
        """
        if not modality:
            assert len(self.modalities) == 1, "a predictor of several modalities needs the modality"
            modality = self.modalities[0]
        preds, _ = self.predict({modality: (context, context_coords, target_coords, context_real, target_real)})
        return preds[modality]


class JEPA(nn.Module):
    """Context encoder, EMA target encoder and predictor; ``forward`` returns the training loss.

    One model serves one modality or several: a batch is a dict of homogeneous sub-batches, one per
    modality, encoded together and scored by the weighted sum of their losses.

    Args:
        context: the context encoder (its copy becomes the EMA target encoder).
        predictor: the predictor.
        loss: the loss section (distance, regulariser).
        loss_weights: {modality: weight of its loss in the sum}; 1 for each when omitted.
        target_norms: {modality: how its targets are normalised}; ``loss.target_norm`` when omitted.

    >>> from multijepa.train import build_model
    >>> from multijepa.recipe import Recipe
    >>> type(build_model(Recipe())).__name__
    'JEPA'
    """

    def __init__(self, context: Backbone, predictor: Predictor, loss: LossConfig,
                 loss_weights: Optional[dict[str, float]] = None, target_norms: Optional[dict[str, str]] = None):
        super().__init__()
        self.context = context
        self.predictor = predictor
        self.target = copy.deepcopy(context)
        self.target.requires_grad_(False)
        self.loss_cfg = loss
        self.loss_weights = {m: 1.0 for m in context.tokenizers} | dict(loss_weights or {})
        self.target_norms = {m: loss.target_norm for m in context.tokenizers} | dict(target_norms or {})
        self.sigreg_draws = 0  # SIGReg calls so far: call k projects on directions seeded k

    def forward(self, parts: dict[str, dict]) -> dict[str, torch.Tensor]:
        """parts: {modality: {"input": a batch of that modality, "context_idx" [B, Nc], "target_idx"
        [B, M, Nt], "valid" (optional)}}, one entry per modality in the batch.

        With ``valid`` (bool [B, N], False on padding tokens) the index sets may hold -1 entries
        (padding, see ``sample_block_masks``): padding is hidden from every attention and left out
        of the loss.

        Returns a dict with ``loss`` (to minimise: the sum over modalities of loss_weight x
        (prediction + regularizer_weight x regularizer)), ``prediction`` and ``regularizer`` (their
        weighted sums), ``prediction/<modality>`` per modality, ``padding_waste`` (the share of a
        padded layout of this step's sequences that would be padding, 0 when dense) and the
        detached mean-pooled target features ``target_pooled [sum B, D]`` for health monitors.
        """
        reals, ctx_idx, tgt_idx = {}, {}, {}
        for m, part in parts.items():
            c, t, valid = part["context_idx"], part["target_idx"], part.get("valid")
            reals[m] = (c >= 0, t >= 0) if valid is not None else (None, None)
            ctx_idx[m], tgt_idx[m] = (c.clamp_min(0), t.clamp_min(0)) if valid is not None else (c, t)
        with torch.no_grad():
            self.target.eval()  # no stochastic depth in the teacher
            encoded, _ = self.target.encode({m: (p["input"], None, p.get("valid")) for m, p in parts.items()})
            pooled, targets, target_coords = [], {}, {}
            for m, (feats, coords) in encoded.items():
                pooled.append(pool_tokens(feats, parts[m].get("valid")))
                feats = normalize_targets(feats.float(), self.target_norms[m], parts[m].get("valid"))
                b, k, nt = tgt_idx[m].shape
                flat_idx = rearrange(tgt_idx[m], "b k nt -> b (k nt)")
                targets[m] = rearrange(gather_tokens(feats, flat_idx), "b (k nt) d -> b k nt d", k=k)
                target_coords[m] = rearrange(gather_tokens(coords, flat_idx), "b (k nt) c -> b k nt c", k=k)
        contexts, ctx_segments = self.context.encode(
            {m: (p["input"], ctx_idx[m], reals[m][0]) for m, p in parts.items()})
        preds, pred_segments = self.predictor.predict(
            {m: (ctx, ctx_coords, target_coords[m], *reals[m]) for m, (ctx, ctx_coords) in contexts.items()})
        with torch.autocast(next(iter(parts.values()))["input"].device.type, enabled=False):
            out = self._losses(parts, preds, targets, contexts, reals)  # in float32, also under bf16 autocast
        waste = padding_waste(*(s for s in (ctx_segments, pred_segments) if s is not None))
        return {**out, "padding_waste": torch.tensor(waste), "target_pooled": torch.cat(pooled).detach()}

    def _losses(self, parts: dict, preds: dict, targets: dict, contexts: dict, reals: dict) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        loss = prediction = regularizer = None
        regularize = self.loss_cfg.regularizer != "none" and self.loss_cfg.regularizer_weight > 0
        for m in self.context.tokenizers:  # one order on every rank, which SIGReg's all-reduce needs
            if m not in parts:  # this rank's batch lacks m: meet the other ranks' SIGReg on it with no samples
                if regularize and self.loss_cfg.regularizer == "sigreg" and world_size() > 1:
                    self._sigreg(next(iter(contexts.values()))[0].new_zeros(0, self.context.dim))
                continue
            pred, target = preds[m], targets[m]
            context_real, target_real = reals[m]
            if target_real is not None:  # only real targets count; [K, D] after boolean indexing
                pred, target = pred[target_real], target[target_real]
            pred_loss = latent_loss(pred.float(), target.float(), self.loss_cfg.type)
            reg = pred_loss.new_zeros(())
            if regularize:
                reg = self._regularizer(contexts[m][0], context_real)
            w = self.loss_weights[m]
            part_loss = w * (pred_loss + self.loss_cfg.regularizer_weight * reg)
            loss = part_loss if loss is None else loss + part_loss
            prediction = w * pred_loss.detach() if prediction is None else prediction + w * pred_loss.detach()
            regularizer = w * reg.detach() if regularizer is None else regularizer + w * reg.detach()
            out[f"prediction/{m}"] = pred_loss.detach()
        return {"loss": loss, "prediction": prediction, "regularizer": regularizer, **out}

    def _regularizer(self, ctx: torch.Tensor, real: Optional[torch.Tensor]) -> torch.Tensor:
        """SIGReg or VICReg on one modality's context encoding ``ctx [B, Nc, D]``: on its per-sample
        means or on all its real tokens (``loss.regularizer_on``)."""
        if self.loss_cfg.regularizer_on == "samples":
            z = pool_tokens(ctx, real)
        else:
            z = ctx[real] if real is not None else ctx.reshape(-1, ctx.shape[-1])
        return vicreg(z) if self.loss_cfg.regularizer == "vicreg" else self._sigreg(z)

    def _sigreg(self, z: torch.Tensor) -> torch.Tensor:
        # directions from a counter, not the global generator, so that every rank draws the same ones
        self.sigreg_draws += 1
        return sigreg(z, self.loss_cfg.sigreg_directions, torch.Generator().manual_seed(self.sigreg_draws))

    @torch.no_grad()
    def update_target(self, momentum: float) -> None:
        """EMA: target <- momentum * target + (1 - momentum) * context, one fused op per list."""
        tgt = list(self.target.parameters())
        src = list(self.context.parameters())
        torch._foreach_mul_(tgt, momentum)
        torch._foreach_add_(tgt, src, alpha=1.0 - momentum)


def cosine_schedule(step: int, total: int, start: float, end: float, warmup: int = 0) -> float:
    """Linear warm-up from 0 to ``start`` over ``warmup`` steps, then cosine from ``start`` to ``end``.

    >>> cosine_schedule(0, 100, 1.0, 0.0, warmup=10), cosine_schedule(100, 100, 1.0, 0.0)
    (0.0, 0.0)
    """
    if step < warmup:
        return start * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))
