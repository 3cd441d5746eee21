import math

import pytest
import torch

from multijepa.core.masking import block_extent, sample_block_masks, validate_mask
from multijepa.errors import RecipeError
from multijepa.recipe import MaskConfig


def draws(grid, cfg, n=200, batch=8):
    g = torch.Generator().manual_seed(0)
    return [sample_block_masks(grid, cfg, batch, g) for _ in range(n)]


@pytest.mark.parametrize("grid,cfg", [
    ((8, 8), MaskConfig()),
    ((14, 14), MaskConfig()),
    ((4, 8, 8), MaskConfig(full_span_axes=(0,))),
    ((16, 12), MaskConfig(full_span_axes=(0,), target_aspect=(1.0, 1.0))),
    ((64,), MaskConfig(num_targets=2, target_scale=(0.1, 0.2))),
])
def test_sample_block_masks__shapes_disjoint_and_min_context(grid, cfg):
    n = math.prod(grid)
    for context, target in draws(grid, cfg, n=50):
        assert context.ndim == 2 and target.shape[:2] == (8, cfg.num_targets)
        assert context.shape[1] >= cfg.min_context
        assert int(context.max()) < n and int(target.max()) < n
        for c, t in zip(context, target):
            assert len(set(c.tolist())) == len(c)  # no duplicates
            assert not set(c.tolist()) & set(t.flatten().tolist())  # context never sees a target


def test_sample_block_masks__every_position_is_sometimes_target_and_sometimes_context():
    grid = (8, 8)
    as_target = torch.zeros(64)
    as_context = torch.zeros(64)
    for context, target in draws(grid, MaskConfig()):
        as_target.index_add_(0, target.flatten(), torch.ones(target.numel()))
        as_context.index_add_(0, context.flatten(), torch.ones(context.numel()))
    assert (as_target > 0).all() and (as_context > 0).all()


def test_sample_block_masks__target_share_matches_scale():
    cfg = MaskConfig(num_targets=1, target_scale=(0.15, 0.2), target_aspect=(1.0, 1.0))
    sizes = [t.shape[2] / 196 for _, t in draws((14, 14), cfg, n=100, batch=1)]
    assert 0.12 <= min(sizes) and max(sizes) <= 0.26
    assert 0.15 <= sum(sizes) / len(sizes) <= 0.21


def test_sample_block_masks__full_span_axis_is_covered_whole():
    grid = (4, 6, 6)  # video (t, row, col): tubes span all frames
    for _, target in draws(grid, MaskConfig(full_span_axes=(0,)), n=20):
        for block in target.reshape(-1, target.shape[-1]):
            t, rest = block // 36, block % 36
            for r in rest.unique():
                assert sorted(t[rest == r].tolist()) == [0, 1, 2, 3]


def test_sample_block_masks__deterministic_given_generator():
    a = sample_block_masks((8, 8), MaskConfig(), 4, torch.Generator().manual_seed(3))
    b = sample_block_masks((8, 8), MaskConfig(), 4, torch.Generator().manual_seed(3))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_sample_block_masks__tight_config_still_ends():
    # Targets can cover nearly the whole grid: the sampler must fall back, not loop.
    cfg = MaskConfig(num_targets=8, target_scale=(0.3, 0.4), context_scale=(0.2, 0.3), min_context=2)
    validate_mask(cfg, (6, 6), "test")
    for context, target in draws((6, 6), cfg, n=30):
        assert context.shape[1] >= 2


def test_block_extent__respects_aspect_and_bounds():
    assert block_extent((8, 8), 1.0, 1.0, ()) == (8, 8)
    h, w = block_extent((20, 20), 0.25, 4.0, ())
    assert h > w
    assert block_extent((3, 100), 0.1, 1.0, (0,)) == (3, 10)


def test_validate_mask__impossible_settings_raise():
    with pytest.raises(RecipeError, match="mask.target_scale"):
        validate_mask(MaskConfig(target_scale=(0.9, 1.0)), (8, 8), "x")
    with pytest.raises(RecipeError, match="mask.num_targets"):
        validate_mask(MaskConfig(num_targets=0), (8, 8), "x")
    with pytest.raises(RecipeError, match="mask.min_context"):
        validate_mask(MaskConfig(min_context=0), (8, 8), "x")
