"""Multi-block masks on N-dimensional token grids, sampled in DataLoader workers.

One idea covers every modality: a block is a box in the token grid (image rows x cols, audio
freq x time, video t x rows x cols, time-series t). Axes listed in ``full_span_axes`` are covered
whole by every block (video tubes span all frames; audio time spans cover all frequencies).

Where tokens sit at continuous coordinates rather than on a grid (point-cloud groups), a block is
a neighbourhood instead: the tokens nearest a random seed token (``sample_neighbourhood_masks``).

Block sizes are drawn once per batch, positions per sample, so every sample in a batch has the
same number of target tokens; context sets are cut to the batch's smallest so tensors stay dense.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch

from multijepa.errors import RecipeError, check, check_range


@dataclass(frozen=True)
class MaskConfig:
    """Multi-block masking on the token grid (I-JEPA defaults): the recipe's ``mask`` section.

    Point clouds have no grid: there a block is the ``scale`` share of group centres nearest a random
    seed centre, and the aspect and full-span settings do not apply.

    ``mode: future`` predicts the future along the modality's time axis (video frames, audio time,
    series steps): the targets are ``num_targets`` consecutive spans of ``target_scale`` of the time
    axis right after a split point, each spanning the other axes whole; the context is the latest
    ``context_scale`` share of the past before it (at least ``min_context`` tokens). Aspects and
    ``full_span_axes`` do not apply there.

    ``future_share`` > 0 (``mode: blocks``; ``mode: future`` ignores it) trains both objectives in one
    run: that share of the batches, drawn per batch, gets future masks instead of blocks, with
    ``future_targets`` spans of ``future_scale`` of the time axis, at least one step each (and the
    same context settings).
    """

    mode: Literal["blocks", "future"] = "blocks"
    num_targets: int = 4
    target_scale: tuple[float, float] = (0.15, 0.2)  # share of the grid covered by each target block
    target_aspect: tuple[float, float] = (0.75, 1.5)
    context_scale: tuple[float, float] = (0.85, 1.0)
    context_aspect: tuple[float, float] = (1.0, 1.0)
    min_context: int = 4  # fewest context tokens a sample may keep
    full_span_axes: tuple[int, ...] = ()  # grid axes every block spans entirely (video tubes, audio time spans)
    future_share: float = 0.0  # mode blocks: share of batches that predict the future instead
    future_targets: int = 1  # future spans per sample in those batches
    future_scale: tuple[float, float] = (0.25, 0.5)  # share of the time axis covered by each such span


def future_part(cfg: MaskConfig) -> MaskConfig:
    """The ``mode: future`` masks that ``future_share`` of a blocks run's batches get."""
    return replace(cfg, mode="future", num_targets=cfg.future_targets, target_scale=cfg.future_scale, future_share=0.0)


def _uniform(rng: tuple[float, float], g: torch.Generator) -> float:
    return rng[0] + (rng[1] - rng[0]) * torch.rand((), generator=g).item()


def block_extent(grid: tuple[int, ...], scale: float, aspect: float, full_span_axes: tuple[int, ...]) -> tuple[int, ...]:
    """Per-axis extent of a box covering about ``scale`` of ``grid``.

    The first two free axes share the ``aspect`` ratio (rows/cols); further free axes are scaled
    evenly; full-span axes take the whole grid.

    >>> block_extent((8, 8), 0.25, 1.0, ())
    (4, 4)
    >>> block_extent((4, 8, 8), 0.25, 1.0, (0,))
    (4, 4, 4)
    """
    free = [i for i in range(len(grid)) if i not in full_span_axes]
    volume = scale * math.prod(grid[i] for i in free)
    base = volume ** (1.0 / len(free))
    sizes = [float(g) for g in grid]
    for j, axis in enumerate(free):
        s = base
        if len(free) >= 2 and j == 0:
            s = base * math.sqrt(aspect)
        elif len(free) >= 2 and j == 1:
            s = base / math.sqrt(aspect)
        sizes[axis] = s
    return tuple(max(1, min(grid[i], round(sizes[i]))) for i in range(len(grid)))


def _box(grid: tuple[int, ...], extent: tuple[int, ...], g: torch.Generator,
         region: tuple[tuple[int, int], ...] | None = None) -> np.ndarray:
    """A flat bool grid (C order) with one box of ``extent`` at a uniform random position (inside
    ``region``'s (start, size) per axis). NumPy: on these tiny arrays its operations cost a
    fraction of torch's dispatch, and the positions still come from ``g``."""
    mask = np.zeros(grid, dtype=bool)
    region = region or tuple((0, n) for n in grid)
    starts = [lo + int(torch.randint(0, n - e + 1, (1,), generator=g)) for (lo, n), e in zip(region, extent)]
    mask[tuple(slice(s, s + e) for s, e in zip(starts, extent))] = True
    return mask.reshape(-1)


def _pad_stack(rows: list[np.ndarray]) -> torch.Tensor:
    """Stack 1-D index arrays of unequal length, padding with -1: [len(rows), longest]."""
    out = np.full((len(rows), max(len(r) for r in rows)), -1, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return torch.from_numpy(out)


def sample_block_masks(grid: tuple[int, ...], cfg: MaskConfig, batch_size: int, g: torch.Generator,
                       max_tries: int = 20, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample context and target indices for a batch (indices into the flattened grid, C order).

    Args:
        grid: token grid shape, e.g. (8, 8).
        cfg: the recipe's mask section (validated against ``grid`` at load).
        batch_size: B.
        g: the random generator (seeded per batch, so a resumed run draws the same masks).
        max_tries: context draws per sample before falling back to "everything but the targets".
        valid: optional bool [B, N], False on padding tokens (a short series in a longer window).
            Blocks are then placed inside each sample's box of valid tokens, sized by the mask
            scales on that box, and keep only valid tokens; padding is never context or target.
            Sets then differ in size, so they are padded with -1 (not cut to the smallest).

    Returns:
        context_idx: [B, Nc] long, sorted, disjoint from that sample's targets (-1 = padding, only with ``valid``).
        target_idx: [B, M, Nt] long, M = cfg.num_targets blocks of Nt tokens each (likewise).

    >>> c, t = sample_block_masks((8, 8), MaskConfig(), 2, torch.Generator().manual_seed(0))
    >>> t.shape[:2]
    torch.Size([2, 4])
    """
    n = math.prod(grid)
    log_aspect = (math.log(cfg.target_aspect[0]), math.log(cfg.target_aspect[1]))
    t_scale, t_aspect = _uniform(cfg.target_scale, g), math.exp(_uniform(log_aspect, g))
    log_aspect = (math.log(cfg.context_aspect[0]), math.log(cfg.context_aspect[1]))
    c_scale, c_aspect = _uniform(cfg.context_scale, g), math.exp(_uniform(log_aspect, g))
    t_extent = block_extent(grid, t_scale, t_aspect, cfg.full_span_axes)
    c_extent = block_extent(grid, c_scale, c_aspect, cfg.full_span_axes)
    region, allowed = None, np.ones(n, dtype=bool)
    contexts, targets = [], []
    for b in range(batch_size):
        if valid is not None:
            allowed = valid[b].reshape(-1).bool().numpy()
            if int(allowed.sum()) < 2:
                raise ValueError(f"sample {b} of the batch has {int(allowed.sum())} valid tokens; masking needs 2")
            where = np.argwhere(allowed.reshape(grid))
            lo, hi = where.min(0).tolist(), (where.max(0) + 1).tolist()
            region = tuple((a, z - a) for a, z in zip(lo, hi))
            box_grid = tuple(size for _, size in region)
            t_extent = block_extent(box_grid, t_scale, t_aspect, cfg.full_span_axes)
            c_extent = block_extent(box_grid, c_scale, c_aspect, cfg.full_span_axes)
        for _ in range(max_tries):
            blocks = [_box(grid, t_extent, g, region) & allowed for _ in range(cfg.num_targets)]
            covered = np.logical_or.reduce(blocks)
            context = _box(grid, c_extent, g, region) & ~covered & allowed
            if int(context.sum()) >= cfg.min_context:
                break
        else:
            context = ~covered & allowed
            if int(context.sum()) < cfg.min_context:
                # The targets cover (nearly) everything: stack them on one spot. Validation
                # guarantees one block leaves min_context tokens, so this always ends.
                blocks = [blocks[0]] * cfg.num_targets
                context = ~blocks[0] & allowed
                if not context.any():  # a short padded sample whose one block is all it has
                    first = int(blocks[0].nonzero()[0][0])
                    blocks = [blocks[0].copy()] * cfg.num_targets
                    blocks[0][first] = False
                    context[first] = True
        contexts.append(context.nonzero()[0])
        targets.append([blk.nonzero()[0] for blk in blocks])
    if valid is not None:
        return _pad_stack(contexts), _pad_stack([t for ts in targets for t in ts]).reshape(batch_size, cfg.num_targets, -1)
    context_idx = _cut_to_smallest([torch.from_numpy(c) for c in contexts], g)
    assert context_idx.shape[1] >= min(cfg.min_context, n)
    return context_idx, torch.from_numpy(np.stack([np.stack(ts) for ts in targets]))


def _cut_to_smallest(contexts: list[torch.Tensor], g: torch.Generator) -> torch.Tensor:
    """Stack per-sample context indices into [B, Nc], Nc the smallest count, sorted per row."""
    keep = min(len(c) for c in contexts)
    # Drop random tokens (not the tail) to avoid a spatial bias.
    return torch.stack([c[torch.randperm(len(c), generator=g)[:keep]].sort().values for c in contexts])


def sample_grid_masks(grid: tuple[int, ...], cfg: MaskConfig, batch_size: int, g: torch.Generator,
                      valid: torch.Tensor | None = None, time_axis: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The masks ``cfg.mode`` asks for on a token grid: :func:`sample_block_masks` or :func:`sample_future_masks`
    (for ``future_share`` of the batches of a blocks run; the generator draws the choice only then)."""
    if cfg.mode == "blocks" and cfg.future_share > 0 and time_axis is not None \
            and torch.rand((), generator=g).item() < cfg.future_share:
        cfg = future_part(cfg)
    if cfg.mode == "future":
        if time_axis is None:
            raise RecipeError("mask.mode=future needs a time axis, and these tokens have none")
        return sample_future_masks(grid, cfg, batch_size, g, time_axis, valid=valid)
    return sample_block_masks(grid, cfg, batch_size, g, valid=valid)


def sample_future_masks(grid: tuple[int, ...], cfg: MaskConfig, batch_size: int, g: torch.Generator, time_axis: int,
                        valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Context = the past, targets = what comes next, along ``time_axis`` of the token grid.

    One span length (``target_scale`` of the time axis) and one context share are drawn per batch.
    Without padding, one split step is drawn per batch, so every sample has the same sets; with
    ``valid`` (bool [B, N]) each sample's split falls inside its own valid time range, padding is
    never context or target, and sets of unequal size are padded with -1 (as :func:`sample_block_masks`).
    A valid range too short for the spans gets shorter ones (at least one step each, the last
    repeated if even that does not fit).

    Returns:
        context_idx: [B, Nc] long, sorted: the tokens of the latest past steps before the split.
        target_idx: [B, M, Nt] long: M = cfg.num_targets consecutive spans after it, in time order.

    >>> c, t = sample_future_masks((4, 12), MaskConfig(mode="future", num_targets=2, target_scale=(0.25, 0.25),
    ...                            context_scale=(1.0, 1.0)), 2, torch.Generator().manual_seed(0), time_axis=1)
    >>> t.shape, bool(c.max() % 12 < t.min() % 12)
    (torch.Size([2, 2, 12]), True)
    """
    n, steps = math.prod(grid), grid[time_axis]
    per_step = n // steps
    time = np.indices(grid)[time_axis].reshape(-1)  # the time step of every flat token
    span = max(1, round(_uniform(cfg.target_scale, g) * steps))
    share = _uniform(cfg.context_scale, g)
    need = math.ceil(cfg.min_context / per_step)  # past steps that hold min_context tokens
    m = cfg.num_targets
    shared = None
    if valid is None:
        shared = need + int(torch.randint(0, steps - need - m * span + 1, (1,), generator=g))
    contexts, targets = [], []
    for b in range(batch_size):
        allowed = np.ones(n, dtype=bool) if valid is None else valid[b].reshape(-1).bool().numpy()
        if int(allowed.sum()) < 2:
            raise ValueError(f"sample {b} of the batch has {int(allowed.sum())} valid tokens; masking needs 2")
        lo, hi = int(time[allowed].min()), int(time[allowed].max()) + 1
        length = hi - lo
        size = span if need + m * span <= length else max(1, (length - 1) // m)
        past_min = min(need, max(1, length - m * size))
        if shared is not None:
            split = shared
        else:
            split = lo + past_min + int(torch.randint(0, max(1, length - past_min - m * size + 1), (1,), generator=g))
        past = max(past_min, round(share * (split - lo)))
        context = allowed & (time >= split - past) & (time < split)
        blocks = []
        for k in range(m):
            start = min(split + k * size, hi - 1)  # a range too short for m spans repeats its last step
            blocks.append((allowed & (time >= start) & (time < min(start + size, hi))).nonzero()[0])
        contexts.append(context.nonzero()[0])
        targets.append(blocks)
    if valid is not None:
        return _pad_stack(contexts), _pad_stack([t for ts in targets for t in ts]).reshape(batch_size, m, -1)
    return torch.from_numpy(np.stack(contexts)), torch.from_numpy(np.stack([np.stack(ts) for ts in targets]))


def validate_future_mask(m: MaskConfig, grid: tuple[int, ...], time_axis: int | None, where: str,
                         modality: str = "these", targets_key: str = "mask.num_targets",
                         scale_key: str = "mask.target_scale", short_spans_ok: bool = False) -> None:
    """Check that ``mode: future`` masks fit the grid's time axis: the spans and ``min_context`` tokens of past
    (``targets_key`` and ``scale_key``: the recipe keys their count and sizes come from; ``short_spans_ok``:
    a span under one step is drawn as one step, as ``future_share`` does for clips of few steps)."""
    check(time_axis is not None, where, "mask.mode",
          f"is future, but {modality} tokens have no time axis to predict along; use mask.mode=blocks")
    check(m.num_targets >= 1, where, targets_key, "must be at least 1")
    check_range(m.target_scale, where, scale_key, 1e-6, 1.0)
    check_range(m.context_scale, where, "mask.context_scale", 1e-6, 1.0)
    check(m.min_context >= 1, where, "mask.min_context", "must be at least 1")
    steps = grid[time_axis]
    per_step = math.prod(grid) // steps
    check(short_spans_ok or round(m.target_scale[0] * steps) >= 1, where, scale_key,
          f"gives future spans of under one of the {steps} time steps of the {list(grid)} token grid; raise it")
    longest, need = max(1, round(m.target_scale[1] * steps)), math.ceil(m.min_context / per_step)
    check(need + m.num_targets * longest <= steps, where, scale_key,
          f"allows {m.num_targets} future spans of {longest} steps after the {need} past steps that "
          f"mask.min_context={m.min_context} needs, more than the token grid's {steps} time steps; lower "
          f"{scale_key}, {targets_key} or mask.min_context, or use longer clips")


def sample_neighbourhood_masks(coords: torch.Tensor, cfg: MaskConfig, g: torch.Generator,
                               max_tries: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """Context and target indices where a block is a neighbourhood in coordinate space.

    Each target block is the ``round(s * N)`` tokens nearest a random seed token (s drawn from
    ``cfg.target_scale`` once per batch); the context is the block of ``cfg.context_scale`` around
    another seed, less every target token. Used for point clouds (coords = group centres).

    Args:
        coords: [B, N, C] token positions (any C).
        cfg: the recipe's mask section (checked by :func:`validate_neighbourhood_mask`).
        g: the random generator.
        max_tries: context draws per sample before falling back to "everything but the targets".

    Returns:
        context_idx: [B, Nc] long, sorted, disjoint from that sample's targets.
        target_idx: [B, M, Nt] long, each block sorted, M = cfg.num_targets.

    >>> c, t = sample_neighbourhood_masks(torch.rand(2, 64, 3), MaskConfig(), torch.Generator().manual_seed(0))
    >>> t.shape[:2], bool(c.shape[1] >= 4)
    (torch.Size([2, 4]), True)
    """
    b, n, _ = coords.shape
    nt = max(1, round(_uniform(cfg.target_scale, g) * n))
    nc = max(1, round(_uniform(cfg.context_scale, g) * n))
    x = coords.detach().float().cpu()
    dist = (x.unsqueeze(2) - x.unsqueeze(1)).pow(2).sum(-1)  # [B, N, N], exact (no matmul rounding)
    nearest = dist.argsort(dim=-1, stable=True)  # row j: tokens by distance from token j, j itself first
    contexts, targets = [], []
    for i in range(b):
        for _ in range(max_tries):
            blocks = nearest[i, torch.randint(0, n, (cfg.num_targets,), generator=g), :nt]  # [M, Nt]
            covered = torch.zeros(n, dtype=torch.bool)
            covered[blocks.flatten()] = True
            context = torch.zeros(n, dtype=torch.bool)
            context[nearest[i, int(torch.randint(0, n, (1,), generator=g)), :nc]] = True
            context &= ~covered
            if int(context.sum()) >= cfg.min_context:
                break
        else:
            context = ~covered
            if int(context.sum()) < cfg.min_context:
                # Validation guarantees one block leaves min_context tokens, so stacking ends it.
                blocks = blocks[:1].expand(cfg.num_targets, -1)
                context = torch.ones(n, dtype=torch.bool)
                context[blocks[0]] = False
        contexts.append(context.nonzero().squeeze(1))
        targets.append(blocks.sort(dim=-1).values)
    return _cut_to_smallest(contexts, g), torch.stack(targets)


def validate_grid_mask(m: MaskConfig, grid: tuple[int, ...], where: str, time_axis: int | None = None,
                       modality: str = "these") -> None:
    """Check the masks ``m.mode`` asks for on ``grid`` (``time_axis``: the grid's time axis, or None)."""
    check(0 <= m.future_share <= 1, where, "mask.future_share", f"must be between 0 and 1, got {m.future_share}")
    if m.mode == "future":  # every batch predicts the future; future_share and its sizes have no say
        validate_future_mask(m, grid, time_axis, where, modality)
        return
    validate_mask(m, grid, where)
    if m.future_share > 0:
        check(time_axis is not None, where, "mask.future_share",
              f"asks for future masks, but {modality} tokens have no time axis to predict along; set it to 0")
        validate_future_mask(future_part(m), grid, time_axis, where, modality,
                             targets_key="mask.future_targets", scale_key="mask.future_scale", short_spans_ok=True)


def validate_mask(m: MaskConfig, grid: tuple[int, ...], where: str) -> None:
    """Check that a multi-block mask can be sampled on ``grid`` without looping for ever."""
    check(m.num_targets >= 1, where, "mask.num_targets", "must be at least 1")
    check_range(m.target_scale, where, "mask.target_scale", 1e-6, 1.0)
    check_range(m.context_scale, where, "mask.context_scale", 1e-6, 1.0)
    check_range(m.target_aspect, where, "mask.target_aspect", 1e-3, 1e3)
    check_range(m.context_aspect, where, "mask.context_aspect", 1e-3, 1e3)
    for a in m.full_span_axes:
        check(0 <= a < len(grid), where, "mask.full_span_axes",
               f"names axis {a} but the token grid {list(grid)} has {len(grid)} axes")
    n = math.prod(grid)
    free = [g for i, g in enumerate(grid) if i not in m.full_span_axes]
    check(len(free) > 0, where, "mask.full_span_axes", "cannot cover every axis of the grid")
    check(m.min_context >= 1, where, "mask.min_context", "must be at least 1")
    check(round(m.target_scale[0] * n) >= 1, where, "mask.target_scale",
           f"gives target blocks of under one token on a {list(grid)} grid ({n} tokens); raise it")
    # The sampler retries a bounded number of times, then falls back to stacking the targets on
    # one spot, so it always ends when one block leaves room for min_context tokens.
    aspects = [m.target_aspect[0] * (m.target_aspect[1] / m.target_aspect[0]) ** (i / 10) for i in range(11)]
    largest_target = max(math.prod(block_extent(grid, m.target_scale[1], a, m.full_span_axes)) for a in aspects)
    check(largest_target + m.min_context <= n, where, "mask.target_scale",
          f"allows target blocks of {largest_target} tokens, leaving fewer than mask.min_context="
          f"{m.min_context} of the {list(grid)} grid's {n} tokens for context; lower target_scale "
          f"or min_context, or use a finer grid")


def validate_neighbourhood_mask(m: MaskConfig, num_tokens: int, where: str) -> None:
    """Check that neighbourhood masks can be sampled from ``num_tokens`` tokens without looping for ever."""
    check(m.mode == "blocks", where, "mask.mode",
          "is future, but point-cloud tokens have no time axis to predict along; use mask.mode=blocks")
    check(m.future_share == 0, where, "mask.future_share",
          "asks for future masks, but point-cloud tokens have no time axis to predict along; set it to 0")
    check(m.num_targets >= 1, where, "mask.num_targets", "must be at least 1")
    check_range(m.target_scale, where, "mask.target_scale", 1e-6, 1.0)
    check_range(m.context_scale, where, "mask.context_scale", 1e-6, 1.0)
    check(not m.full_span_axes, where, "mask.full_span_axes",
          "applies to token grids only; point-cloud tokens have no axes to span: set it to []")
    check(m.min_context >= 1, where, "mask.min_context", "must be at least 1")
    check(round(m.target_scale[0] * num_tokens) >= 1, where, "mask.target_scale",
          f"gives target blocks of under one of the {num_tokens} tokens; raise it")
    largest = max(1, round(m.target_scale[1] * num_tokens))
    check(largest + m.min_context <= num_tokens, where, "mask.target_scale",
          f"allows target blocks of {largest} of the {num_tokens} tokens, leaving fewer than "
          f"mask.min_context={m.min_context} for context; lower target_scale or min_context, or use more groups")
