"""mask.mode: future: context = the past, targets = the next spans along the modality's time axis."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import multijepa
from multijepa.core.masking import MaskConfig, sample_block_masks, sample_future_masks, sample_grid_masks
from multijepa.errors import RecipeError
from multijepa.recipe import load_recipe

from conftest import TINY_AUDIO, TINY_TS, write_ts

FUTURE = MaskConfig(mode="future", num_targets=2, target_scale=(0.1, 0.25), context_scale=(0.5, 1.0), min_context=3)


@pytest.mark.parametrize("grid, axis", [((12,), 0), ((4, 12), 1), ((6, 3, 3), 0), ((3, 16), 1)])
def test_future_masks__context_is_the_past_and_targets_the_next_spans(grid, axis):
    time = np.indices(grid)[axis].reshape(-1)
    per_step = math.prod(grid) // grid[axis]
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        ctx, tgt = sample_future_masks(grid, FUTURE, 4, g, axis)
        assert ctx.shape[1] >= FUTURE.min_context and tgt.shape[:2] == (4, 2)
        for b in range(4):
            c_steps, spans = time[ctx[b].numpy()], [np.unique(time[t.numpy()]) for t in tgt[b]]
            assert len(set(ctx[b].tolist())) == ctx.shape[1]
            assert c_steps.max() + 1 == spans[0][0]  # the context ends right before the first span
            assert np.array_equal(np.unique(c_steps), np.arange(c_steps.min(), c_steps.max() + 1))  # contiguous past
            assert spans[1][0] == spans[0][-1] + 1 and len(spans[0]) == len(spans[1])  # consecutive, equal
            assert tgt.shape[2] == len(spans[0]) * per_step  # each span covers the other axes whole


def test_future_masks__padding_is_never_context_or_target_and_short_samples_still_draw():
    grid = (16,)
    valid = torch.zeros(3, 16, dtype=torch.bool)
    valid[0, :16], valid[1, :7], valid[2, :3] = True, True, True  # the last one is too short for two 4-step spans
    g = torch.Generator().manual_seed(1)
    for _ in range(30):
        ctx, tgt = sample_future_masks(grid, MaskConfig(mode="future", num_targets=2, target_scale=(0.25, 0.25),
                                                        min_context=2), 3, g, 0, valid=valid)
        for b in range(3):
            c, t = ctx[b][ctx[b] >= 0], tgt[b][tgt[b] >= 0]
            assert len(c) >= 1 and len(t) >= 1 and valid[b, c].all() and valid[b, t].all()
            assert c.max() < tgt[b][0][tgt[b][0] >= 0].min()


def test_future_masks__the_same_generator_draws_the_same_masks():
    draw = [sample_future_masks((4, 12), FUTURE, 3, torch.Generator().manual_seed(7), 1) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*draw))


def test_recipe__future_masks_are_validated_against_the_time_axis():
    for name, extra in (("audio", []), ("video", []), ("timeseries", ["timeseries.length=64", "timeseries.channels=1"])):
        assert load_recipe(name, ["mask.mode=future", "mask.num_targets=1", *extra]).mask.mode == "future"
    with pytest.raises(RecipeError, match="mask.mode.*image tokens have no time axis"):
        load_recipe("image", ["mask.mode=future"])
    with pytest.raises(RecipeError, match="mask.mode.*point-cloud tokens have no time axis"):
        load_recipe("pointcloud", ["mask.mode=future"])
    with pytest.raises(RecipeError, match="mask.target_scale.*time steps"):
        load_recipe("video", ["mask.mode=future", "mask.num_targets=4", "mask.target_scale=[0.5,0.5]"])
    with pytest.raises(RecipeError, match="mask.mode"):
        load_recipe("audio", ["mask.mode=past"])


def test_future_share__a_share_of_batches_predicts_the_future_and_the_rest_keeps_its_tubes():
    grid = (4, 4, 4)  # video: time, rows, cols
    mix = MaskConfig(num_targets=4, target_scale=(0.15, 0.25), full_span_axes=(0,), future_share=0.5,
                     future_targets=1, future_scale=(0.25, 0.5))
    time = np.indices(grid)[0].reshape(-1)
    g, kinds = torch.Generator().manual_seed(3), []
    for _ in range(200):
        ctx, tgt = sample_grid_masks(grid, mix, 2, g, time_axis=0)
        if tgt.shape[1] == 1:  # a future batch: one span of 1-2 whole steps right after the context
            kinds.append("future")
            for b in range(2):
                steps = np.unique(time[tgt[b, 0].numpy()])
                assert time[ctx[b].numpy()].max() + 1 == steps[0] and len(steps) in (1, 2)
                assert tgt.shape[2] == 16 * len(steps)
        else:  # a blocks batch: four tubes through every frame
            kinds.append("tubes")
            assert tgt.shape[1] == 4 and all(len(np.unique(time[t.numpy()])) == 4 for t in tgt[0])
    assert 70 < kinds.count("future") < 130
    # No share, no extra draw: the masks are those of a run without the setting.
    plain = MaskConfig(num_targets=4, target_scale=(0.15, 0.25), full_span_axes=(0,))
    a = sample_grid_masks(grid, plain, 3, torch.Generator().manual_seed(5), time_axis=0)
    b = sample_block_masks(grid, plain, 3, torch.Generator().manual_seed(5))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_recipe__future_share_is_validated_with_the_keys_it_sizes_from():
    assert load_recipe("video", ["mask.future_share=0.5"]).mask.future_share == 0.5
    with pytest.raises(RecipeError, match="mask.future_share.*between 0 and 1"):
        load_recipe("video", ["mask.future_share=1.5"])
    with pytest.raises(RecipeError, match="mask.future_scale.*time steps"):
        load_recipe("video", ["mask.future_share=0.5", "mask.future_targets=2", "mask.future_scale=[0.5,0.75]"])
    # Clips of two time steps: a span of 25% is drawn as one step, not refused.
    assert load_recipe("video", ["video.frames=4", "mask.min_context=2", "mask.future_share=0.5"]).mask.future_share == 0.5
    with pytest.raises(RecipeError, match="mask.future_share.*image tokens have no time axis"):
        load_recipe("image", ["mask.future_share=0.5"])
    with pytest.raises(RecipeError, match="mask.future_share.*point-cloud tokens have no time axis"):
        load_recipe("pointcloud", ["mask.future_share=0.5"])


def test_pretrain__future_prediction_on_padded_series_and_on_audio(tmp_path):
    rng = np.random.default_rng(0)
    series = [[np.sin(np.linspace(0, 8, 20 + 4 * (i % 3))) + rng.normal(0, 0.1, 20 + 4 * (i % 3))] for i in range(16)]
    data = write_ts(tmp_path / "s.ts", series)
    run = multijepa.pretrain(load_recipe("timeseries", TINY_TS + [
        f"data.path={data}", f"run.dir={tmp_path / 'ts'}", "train.steps=3", "mask.mode=future", "mask.num_targets=2",
        "mask.target_scale=[0.15,0.25]"]))
    assert multijepa.load(run / "last.pt").embed([str(data)]).shape == (16, 32)
    run = multijepa.pretrain(load_recipe("timeseries", TINY_TS + [  # both objectives, batch by batch
        f"data.path={data}", f"run.dir={tmp_path / 'mix'}", "train.steps=6", "mask.future_share=0.5"]))
    assert multijepa.load(run / "last.pt").embed([str(data)]).shape == (16, 32)
    waves = [torch.sin(torch.linspace(0, 400 * (1 + i % 3), 4000))[None] for i in range(8)]
    run = multijepa.pretrain(load_recipe("audio", TINY_AUDIO + [f"run.dir={tmp_path / 'au'}", "train.steps=2",
                                                                 "mask.mode=future", "mask.num_targets=1"]),
                             data=multijepa.datasets.Mixed({"audio": multijepa.datasets.Tensors("audio", waves)}))
    assert (run / "last.pt").is_file()
