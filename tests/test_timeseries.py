"""Time series: readers (good and malformed files), tokenizer, padding-aware masks and encoder, data
index, recipe, embedding windows, and a tiny run through the CLI."""

import json
import math
import re

import numpy as np
import pytest
import torch

from conftest import ROOT, TINY, TINY_TS, run_cli, write_ts
from multijepa.core.masking import sample_block_masks
from multijepa.datasets.files import FileDataset, detect_format, index_files, resolve_recipe, valid_mask
from multijepa.datasets.mixed import build_train_loader
from multijepa.errors import DataError, DecodeError, RecipeError
from multijepa.modalities import modality_of, readers_of
from multijepa.readers.series import fill_missing, read_series
from multijepa.recipe import MaskConfig, TimeSeriesConfig, load_recipe, token_grid
from multijepa.tokenizers.timeseries import SeriesTokenizer, instance_norm, valid_tokens
from multijepa.train import build_model
from multijepa.transforms import crop_or_pad, windows

RECIPE = ROOT / "recipes/timeseries.yaml"
CFG = TimeSeriesConfig()


def recipe(*extra: str):
    return load_recipe(RECIPE, TINY_TS + list(extra))


def waves(n: int, channels: int = 1, length: int = 24, seed: int = 0, vary: bool = False) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        l = int(rng.integers(length // 2, length + 1)) if vary else length
        t = np.arange(l)
        out.append(np.stack([np.sin(t / (2 + i % 3) + c) * (1 + c) + rng.normal(0, 0.1, l) for c in range(channels)]))
    return out


# --------------------------------------------------------------------------- readers


def test_read_series__ts_univariate_labels_in_file_order(tmp_path):
    series = waves(3)
    path = write_ts(tmp_path / "a.ts", series, labels=["b", "a", "b"])
    found = read_series(path, CFG)
    assert found.labels == ["b", "a", "b"] and [x.shape for x in found.series] == [(1, 24)] * 3
    assert np.allclose(found.series[1], series[1], atol=1e-5) and found.series[0].dtype == np.float32


def test_read_series__ts_multivariate_unequal_length(tmp_path):
    series = waves(4, channels=3, vary=True)
    found = read_series(write_ts(tmp_path / "m.ts", series, labels=[1, 2, 1, 2]), CFG)
    assert [x.shape for x in found.series] == [s.shape for s in series] and found.labels == ["1", "2", "1", "2"]


def test_read_series__ts_without_labels_and_missing_values(tmp_path):
    path = tmp_path / "m.ts"
    path.write_text("@problemName x\n@classLabel false\n@data\n1,?,3,NaN,5\n1,2,,4\n")
    found = read_series(path, CFG)
    assert found.labels == [None, None]
    assert found.series[0].tolist() == [[1, 2, 3, 4, 5]] and found.series[1].tolist() == [[1, 2, 3, 4]]
    assert read_series(path, TimeSeriesConfig(missing="zero")).series[0].tolist() == [[1, 0, 3, 0, 5]]
    with pytest.raises(DecodeError, match=r"m.ts, line 4, dimension 1, value 2: a missing value"):
        read_series(path, TimeSeriesConfig(missing="error"))


@pytest.mark.parametrize("body,match", [
    ("@classLabel true a b\n", "no @data line"),
    ("@classLabel true a b\n@data\n", "no series after @data"),
    ("@classLabel true a b\n@data\n1,2,3:a\n1,x,3:b\n", r"line 5, dimension 1, value 2: 'x' is not a number"),
    ("@classLabel true a b\n@data\n1,2,3:a\n1,2,3:c\n", r"line 5: class label 'c' is not one of"),
    ("@classLabel true a b\n@data\n1,2,3:a\n1,2,3\n", r"line 5: no class label after the values"),
    ("@dimensions 2\n@classLabel true a\n@data\n1,2:3,4:a\n1,2:a\n", r"line 6: 1 dimensions, expected 2"),
    ("@classLabel true a\n@data\n1,2:3,4,5:a\n", r"line 4: dimensions have different lengths"),
    ("@equalLength true\n@seriesLength 3\n@classLabel false\n@data\n1,2,3\n1,2\n", r"line 7: 2 values per dimension"),
    ("@timeStamps true\n@classLabel false\n@data\n(0,1),(1,2)\n", r"line 4: time-stamped"),
    ("@univariate maybe\n@data\n1,2\n", r"@univariate must be true or false"),
    ("@classLabel false\n@data\n1,inf,2\n", r"line 4, dimension 1, value 2: an infinite value"),
    ("@classLabel false\n@data\n1,2\n1,2:3\n", r"line 5: 2 dimensions, expected 1"),
    ("hello\n@data\n1,2\n", r"line 2: expected an @ header line"),
    ("@classLabel false\n@data\n?,?,?\n", r"line 4: the series holds no values"),
])
def test_read_series__malformed_ts_names_file_and_line(tmp_path, body, match):
    path = tmp_path / "bad.ts"
    path.write_text("@problemName bad\n" + body)
    with pytest.raises(DecodeError, match=match) as e:
        read_series(path, CFG)
    assert str(path) in str(e.value)


def test_read_series__long_csv_with_and_without_header(tmp_path):
    (tmp_path / "h.csv").write_text("x,y\n1,10\n2,\n3,30\n")
    (tmp_path / "n.csv").write_text("1,10\n2,20\n3,30\n\n")
    h, n = read_series(tmp_path / "h.csv", CFG), read_series(tmp_path / "n.csv", CFG)
    assert h.series[0].tolist() == [[1, 2, 3], [10, 20, 30]] == n.series[0].tolist() and h.labels == [None]


def test_read_series__wide_csv_labels_and_unequal_rows(tmp_path):
    (tmp_path / "w.csv").write_text("label,t0,t1,t2\ncat,1,2,3\ndog,4,5,\ncat,7,?,9\n")
    cfg = TimeSeriesConfig(csv_layout="wide", csv_label_column="first")
    found = read_series(tmp_path / "w.csv", cfg)
    assert found.labels == ["cat", "dog", "cat"]
    assert [x.tolist() for x in found.series] == [[[1, 2, 3]], [[4, 5]], [[7, 8, 9]]]
    (tmp_path / "l.csv").write_text("1,2,3,a\n4,5,6,b\n")
    last = read_series(tmp_path / "l.csv", TimeSeriesConfig(csv_layout="wide", csv_label_column="last"))
    assert last.labels == ["a", "b"] and last.series[1].tolist() == [[4, 5, 6]]
    (tmp_path / "n.csv").write_text("1,2,3\n4,5\n")
    plain = read_series(tmp_path / "n.csv", TimeSeriesConfig(csv_layout="wide"))
    assert plain.labels == [None, None] and [x.shape for x in plain.series] == [(1, 3), (1, 2)]


@pytest.mark.parametrize("text,cfg,match", [
    ("1,2\n3,4,5\n", {}, r"line 2: 3 fields, expected 2"),
    ("1,2\n3\n", {}, r"line 2: 1 fields, expected 2"),  # a short row does not change the delimiter
    ("a,b\n1,2\n3,x\n", {}, r"line 3, column 2: 'x' is not a number"),
    ("a,b\n", {}, r"has a header but no data rows"),
    ("\n\n", {}, r"holds no rows"),
    ("1,2\n1,?\n", {"missing": "error"}, r"line 2, column 2: a missing value"),
    ("1,2\n,\n3,4\n", {"missing": "error"}, r"line 2, column 1: a missing value"),
    ("a,1,2\nb,1,zz\n", {"csv_layout": "wide", "csv_label_column": "first"}, r"line 2, column 3: 'zz' is not"),
    ("a,1,2\n,1,2\n", {"csv_layout": "wide", "csv_label_column": "first"}, r"line 2: empty class label"),
    ("1,2\n,,\n3,4\n", {"csv_layout": "wide"}, r"line 2: a row without values"),
    ("1,2\n3,4\n,\n", {"csv_layout": "wide"}, r"line 3: a row without values"),
])
def test_read_series__malformed_csv_names_file_and_line(tmp_path, text, cfg, match):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(DecodeError, match=match) as e:
        read_series(path, TimeSeriesConfig(**cfg))
    assert str(path) in str(e.value)


def test_read_series__npy_npz_shapes_labels_and_nan_padding(tmp_path):
    np.save(tmp_path / "one.npy", np.arange(5.0))
    np.save(tmp_path / "many.npy", np.arange(12.0).reshape(3, 4).astype(np.float32))
    cube = np.random.default_rng(0).normal(size=(2, 3, 6))
    cube[1, :, 4:] = np.nan  # the second series is 4 long, padded as aeon writes unequal lengths
    np.savez(tmp_path / "set.npz", x=cube, y=np.array([7, 8]))
    assert [x.shape for x in read_series(tmp_path / "one.npy", CFG).series] == [(1, 5)]
    assert [x.shape for x in read_series(tmp_path / "many.npy", CFG).series] == [(1, 4)] * 3
    found = read_series(tmp_path / "set.npz", CFG)
    assert [x.shape for x in found.series] == [(3, 6), (3, 4)] and found.labels == ["7", "8"]
    assert np.allclose(found.series[1], cube[1, :, :4])


@pytest.mark.parametrize("make,match", [
    (lambda p: p.write_bytes(b"not numpy at all" * 4), "not a readable NumPy file"),
    (lambda p: np.save(p, np.array(["a", "b"])), "must be numbers"),
    (lambda p: np.save(p, np.zeros((2, 2, 2, 2))), "expected \\[time\\]"),
    (lambda p: np.save(p, np.array([1.0, np.inf])), "infinite"),
    (lambda p: p.write_bytes(np.lib.format.magic(1, 0) + b"\x10\x00{'descr': '<f8',"), "not a readable NumPy file"),
])
def test_read_series__malformed_npy_named(tmp_path, make, match):
    path = tmp_path / "bad.npy"
    make(path)
    with pytest.raises(DecodeError, match=match) as e:
        read_series(path, CFG)
    assert str(path) in str(e.value)


def test_read_series__npz_keys_and_labels_checked(tmp_path):
    np.savez(tmp_path / "k.npz", a=np.zeros(3), b=np.zeros(3))
    with pytest.raises(DecodeError, match="k.npz: no series array; .*under 'x'.*'X_train'/'X_test'.*holds a, b"):
        read_series(tmp_path / "k.npz", CFG)
    np.savez(tmp_path / "l.npz", x=np.zeros((2, 3)), y=np.zeros(3))
    with pytest.raises(DecodeError, match=r"labels have shape \[3\], expected \[2\]"):
        read_series(tmp_path / "l.npz", CFG)


def ucr_rows(series: list[np.ndarray], labels: list, sep: str, fmt: str = "{:.7e}") -> str:
    """Series [1, L] as UCR archive rows: the label first, then the values; shorter rows padded with NaN."""
    width = max(x.shape[1] for x in series)
    rows = [[fmt.format(label)] + [fmt.format(v) for v in x[0]] + ["NaN"] * (width - x.shape[1])
            for x, label in zip(series, labels)]
    return "".join(sep.join(row) + "\n" for row in rows)


def test_read_series__ucr_txt_and_tsv_label_first(tmp_path):
    series = waves(3, length=12, vary=True)
    (tmp_path / "a.txt").write_text(ucr_rows(series, [1, 2, -1], "  "))  # old UCR: %e, label 1.0000000e+00
    (tmp_path / "a.tsv").write_text(ucr_rows(series, [1, 2, -1], "\t", "{:g}"))  # UCR 2018
    for name in ("a.txt", "a.tsv"):
        found = read_series(tmp_path / name, CFG)
        assert found.labels == ["1", "2", "-1"], name
        assert [x.shape for x in found.series] == [x.shape for x in series]  # NaN padding dropped
        assert np.allclose(found.series[2], series[2], atol=1e-4)
    unlabelled = read_series(tmp_path / "a.tsv", TimeSeriesConfig(csv_label_column="none"))
    assert unlabelled.labels == [None] * 3 and unlabelled.series[0][0, 0] == 1
    (tmp_path / "b.tsv").write_text("0.5\t1.5\t2.5\tup\n3\t4\t5\tdown\n")
    last = read_series(tmp_path / "b.tsv", TimeSeriesConfig(csv_layout="wide", csv_label_column="last"))
    assert last.labels == ["up", "down"] and last.series[0].tolist() == [[0.5, 1.5, 2.5]]


@pytest.mark.parametrize("sep", [",", ";", "\t", " ", "   "])
def test_read_series__csv_delimiter_sniffed_long_and_wide(tmp_path, sep):
    path = tmp_path / "s.csv"
    path.write_text(sep.join(["a", "b"]) + "\n" + "".join(sep.join(r) + "\n" for r in [["1", "10"], ["2", "-2e1"]]))
    assert read_series(path, CFG).series[0].tolist() == [[1, 2], [10, -20]]  # long, header skipped
    path.write_text(f"x{sep}1{sep}2{sep}3\ny{sep}4{sep}5\n")
    wide = read_series(path, TimeSeriesConfig(csv_layout="wide", csv_label_column="first"))
    assert wide.labels == ["x", "y"] and [x.tolist() for x in wide.series] == [[[1, 2, 3]], [[4, 5]]]
    path.write_text(f"1{sep}2\n3{sep}zz\n")
    with pytest.raises(DecodeError, match=r"s.csv, line 2, column 2: 'zz' is not a number"):
        read_series(path, CFG)


def test_read_series__npz_train_test_layouts_and_split_key(tmp_path):
    train, test = np.stack([w[0] for w in waves(4)]), np.stack([w[0] for w in waves(2, length=20)])
    for x_train, y_train, x_test, y_test in [("X_train", "y_train", "X_test", "y_test"),
                                             ("x_train", "y_train", "x_test", "y_test"),
                                             ("train_x", "train_y", "test_x", "test_y")]:
        np.savez(tmp_path / "s.npz", **{x_train: train, y_train: np.array([1.0, 2.0, 1.0, 2.0]), x_test: test,
                                        y_test: np.array(["b", "a"])})
        got = {split: read_series(tmp_path / "s.npz", TimeSeriesConfig(npz_split=split))
               for split in ("train", "test", "all")}
        assert got["train"].labels == ["1", "2", "1", "2"] and [x.shape for x in got["train"].series] == [(1, 24)] * 4
        assert got["test"].labels == ["b", "a"] and np.allclose(got["test"].series[1], test[1:])
        assert got["all"].labels == got["train"].labels + got["test"].labels
    np.savez(tmp_path / "one.npz", X_test=test)  # one split: read whatever npz_split says
    assert len(read_series(tmp_path / "one.npz", CFG).series) == 2
    np.savez(tmp_path / "bad.npz", X_train=train, y_train=np.zeros(3))
    with pytest.raises(DecodeError, match=r"bad.npz, array 'X_train': labels have shape \[3\], expected \[4\]"):
        read_series(tmp_path / "bad.npz", CFG)


def test_read_series__empty_missing_binary_and_unknown(tmp_path):
    (tmp_path / "e.csv").write_bytes(b"")
    with pytest.raises(DecodeError, match="e.csv: the file is empty"):
        read_series(tmp_path / "e.csv", CFG)
    with pytest.raises(DecodeError, match="no such file"):
        read_series(tmp_path / "nope.ts", CFG)
    (tmp_path / "b.ts").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DecodeError, match="b.ts: not a text file"):
        read_series(tmp_path / "b.ts", CFG)
    assert modality_of("x.TS") == modality_of("x.csv") == modality_of("x.npz") == modality_of("x.tsv") == "timeseries"
    assert readers_of("X_TRAIN.txt") == ["timeseries", "pointcloud"]  # the model that reads it decides


def test_fill_missing__interpolates_inside_and_holds_edges():
    x = np.array([[np.nan, 0.0, np.nan, np.nan, 3.0, np.nan], [np.nan] * 6])
    assert fill_missing(x, "interpolate").tolist() == [[0, 0, 1, 2, 3, 3], [0] * 6]


# --------------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("independent,stride,n", [(True, 4, 3 * 8), (False, 4, 8), (False, 2, 15)])
def test_series_tokenizer__shapes_no_nan_backward(independent, stride, n):
    tok = SeriesTokenizer(3, patch_size=4, stride=stride, dim=16, widths=(8, 8), independent=independent)
    x = torch.randn(2, 3, 32)
    x[1, :, 20:] = float("nan")  # padding
    tokens, coords = tok(x)
    assert tokens.shape == (2, n, 16) and coords.shape == (2, n, 2 if independent else 1)
    assert torch.isfinite(tokens).all()
    tokens.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in tok.parameters())
    if independent:
        assert coords[0, :3].tolist() == [[0, 0], [0, 1], [0, 2]] and coords[0, 8].tolist() == [1, 0]


def test_series_tokenizer__instance_norm_hides_scale_and_offset():
    torch.manual_seed(0)
    tok = SeriesTokenizer(2, patch_size=4, stride=4, dim=8, widths=(4,), independent=False)
    x = torch.randn(1, 2, 16)
    scaled = x * torch.tensor([[[100.0], [0.01]]]) + torch.tensor([[[5.0], [-3.0]]])
    assert torch.allclose(tok(x)[0], tok(scaled)[0], atol=1e-4)
    padded = torch.cat([x, torch.full((1, 2, 8), float("nan"))], -1)
    n = instance_norm(padded)[0]
    assert torch.allclose(n[..., :16].mean(-1), torch.zeros(1, 2), atol=1e-5) and (n[..., 16:] == 0).all()


@pytest.mark.parametrize("independent", [True, False])
def test_series_tokenizer__keep_levels_tells_levels_apart_over_real_samples_only(independent):
    torch.manual_seed(0)
    tok = SeriesTokenizer(2, patch_size=4, stride=4, dim=8, widths=(4,), independent=independent, keep_levels=True)
    plain = SeriesTokenizer(2, patch_size=4, stride=4, dim=8, widths=(4,), independent=independent)
    assert tok.levels.in_features == (2 if independent else 4) and plain.levels is None
    raw = SeriesTokenizer(2, patch_size=4, stride=4, dim=8, widths=(4,), independent=independent, normalize=False,
                          keep_levels=True)
    assert raw.levels is None  # without instance norm the tokens see the levels themselves: nothing to add
    x = torch.randn(1, 2, 16)
    moved = x.clone()
    moved[:, 0] = moved[:, 0] * 100.0 + 5.0  # channel 0's level and scale only: the same shape
    a, b = tok(x)[0], tok(moved)[0]
    assert torch.allclose(plain(x)[0], plain(moved)[0], atol=1e-4)  # without: levels are gone
    if independent:  # tokens are channel-major, 4 per channel: channel 0's move, channel 1's stay
        assert (a[0, :4] - b[0, :4]).abs().amax(-1).min() > 1e-2 and torch.allclose(a[0, 4:], b[0, 4:], atol=1e-5)
    else:
        assert (a - b).abs().amax(-1).min() > 1e-2
    padded = torch.cat([moved, torch.full((1, 2, 8), float("nan"))], -1)  # padding changes no level
    real = [0, 1, 2, 3, 6, 7, 8, 9] if independent else [0, 1, 2, 3]
    assert torch.allclose(tok(padded)[0][:, real], b, atol=1e-5)


def test_series_tokenizer__a_token_sees_only_its_own_patch():
    torch.manual_seed(0)
    tok = SeriesTokenizer(1, patch_size=4, stride=4, dim=8, widths=(4, 4), kernel_size=3, normalize=False)
    x = torch.randn(1, 1, 16)
    y = x.clone()
    y[..., 8:12] += 1.0  # change patch 2 only
    changed = (tok(x)[0] - tok(y)[0]).abs().sum(-1)[0]
    assert changed[2] > 0 and changed[[0, 1, 3]].max() == 0  # no leak into neighbours (context vs target)


def test_valid_tokens__partial_patches_count_and_channels_repeat():
    x = torch.zeros(2, 2, 16)
    x[0, :, 5:] = float("nan")
    assert valid_tokens(x, 4, 4, independent=False).tolist() == [[True, True, False, False], [True] * 4]
    assert valid_tokens(x, 4, 4, independent=True)[0].tolist() == [True, True, False, False] * 2


# --------------------------------------------------------------------------- padding in masks and encoder


def test_sample_block_masks__padding_is_never_context_or_target():
    grid = (3, 10)  # (channels, patches)
    valid = torch.zeros(6, 3, 10, dtype=torch.bool)
    for b, n in enumerate([10, 7, 4, 2, 10, 5]):
        valid[b, :, :n] = True
    valid = valid.reshape(6, -1)
    cfg = MaskConfig(num_targets=3, target_scale=(0.15, 0.3), min_context=2, full_span_axes=(0,))
    g = torch.Generator().manual_seed(0)
    seen_t, seen_c = torch.zeros(6, 30), torch.zeros(6, 30)
    for _ in range(40):
        context, target = sample_block_masks(grid, cfg, 6, g, valid=valid)
        for b in range(6):
            c, t = context[b][context[b] >= 0], target[b][target[b] >= 0]
            assert len(c) >= 1 and len(t) >= 1 and valid[b, c].all() and valid[b, t].all()
            assert not set(c.tolist()) & set(t.tolist())
            seen_c[b, c] += 1
            seen_t[b, t] += 1
    assert ((seen_t > 0) | (seen_c > 0)).eq(valid).all()  # every valid token is used, no padded one


def test_backbone__padding_does_not_change_real_tokens():
    r = recipe("timeseries.length=16", "timeseries.channels=2")
    short = build_model(r).target.eval()
    x = torch.randn(1, 2, 16)
    padded = torch.cat([x, torch.full((1, 2, 16), float("nan"))], -1)
    valid = valid_tokens(padded, 4, 4, independent=True)
    alone, _ = short(x, "timeseries")
    inside, _ = short(padded, "timeseries", real=valid)
    # tokens are channel-major: channel c's 4 real patches sit at c * 8 + [0..3] in the padded grid
    assert torch.allclose(alone, inside[:, valid[0]], atol=1e-5)


def test_jepa__padded_batch_trains_with_finite_loss():
    r = recipe("timeseries.length=32", "timeseries.channels=2")
    model = build_model(r)
    x = torch.randn(4, 2, 32)
    x[1, :, 9:] = x[2, :, 20:] = float("nan")
    valid = valid_mask(x, r)
    ctx, tgt = sample_block_masks(token_grid(r), r.mask, 4, torch.Generator().manual_seed(0), valid=valid)
    assert (ctx < 0).any() or (tgt < 0).any()  # sets of different size are padded
    out = model({"timeseries": {"input": x, "context_idx": ctx, "target_idx": tgt, "valid": valid}})
    assert torch.isfinite(out["loss"]) and out["target_pooled"].shape == (4, 32)
    out["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.context.parameters() if p.grad is not None)


# --------------------------------------------------------------------------- recipe


@pytest.mark.parametrize("override,key", [
    ("timeseries.length=30", "timeseries.length"),  # not patch_size + k * stride
    ("timeseries.stride=8", "timeseries.stride"),
    ("timeseries.kernel_size=4", "timeseries.kernel_size"),
    ("timeseries.conv_widths=[]", "timeseries.conv_widths"),
    ("timeseries.csv_label_column=first", "timeseries.csv_label_column"),
    ("timeseries.channel_mode=mixed", "mask.full_span_axes"),  # a (t,) grid: spans cannot cover axis 0
    ("timeseries.missing=drop", "timeseries.missing"),
    ("timeseries.window_hop=-1", "timeseries.window_hop"),
    ("timeseries.npz_split=val", "timeseries.npz_split"),
])
def test_load_recipe__bad_timeseries_values_name_the_key(override, key):
    with pytest.raises(RecipeError, match=f"'{key}'"):
        load_recipe(RECIPE, [override])


def test_token_grid__channel_independent_or_mixed():
    assert token_grid(recipe("timeseries.length=32", "timeseries.channels=3")) == (3, 8)
    mixed = recipe("timeseries.length=32", "timeseries.channels=3", "timeseries.channel_mode=mixed",
                   "mask.full_span_axes=[]", "timeseries.stride=2")
    assert token_grid(mixed) == (15,)
    with pytest.raises(RecipeError, match="mask.target_scale"):  # validated once the grid is known
        load_recipe(RECIPE, TINY_TS + ["timeseries.length=8", "timeseries.channels=1"])


# --------------------------------------------------------------------------- data index, loader, embed


def test_index_files__a_ts_file_is_a_data_set_with_labels(tmp_path):
    path = write_ts(tmp_path / "set.ts", waves(5), labels=["x", "y", "x", "z", "y"])
    r = recipe(f"data.path={path}")
    assert detect_format(r) == "file"
    index = index_files(r)
    assert index.files == [str(path)] * 5 and index.parts == [0, 1, 2, 3, 4]
    assert index.classes == ["x", "y", "z"] and index.labels == [0, 1, 0, 2, 1]


def test_index_files__folder_mixes_formats_with_folder_labels(tmp_path):
    for cls in ("up", "down"):
        (tmp_path / cls).mkdir()
        np.savetxt(tmp_path / cls / "a.csv", waves(1, channels=2)[0].T, delimiter=",")
        np.save(tmp_path / cls / "b.npy", np.stack(waves(3)))[..., 0] if False else np.save(
            tmp_path / cls / "b.npy", np.stack([w[0] for w in waves(3)]))
    index = index_files(recipe(f"data.path={tmp_path}"))
    assert len(index.files) == 8 and index.classes == ["down", "up"]
    assert index.labels == [0] * 4 + [1] * 4 and index.parts == [0, 0, 1, 2] * 2


def test_detect_format__a_data_file_is_never_taken_for_a_file_list(tmp_path):
    row = "  ".join(f"{v:.7e}" for v in np.linspace(-1, 1, 40))  # 640 characters: too long for a file name
    for name in ("X_TRAIN.txt", "X_TRAIN.tsv", "X_TRAIN.csv"):
        (tmp_path / name).write_text(f"1 {row}\n2 {row}\n")
        assert detect_format(recipe(f"data.path={tmp_path / name}")) == "file", name
    index = index_files(recipe(f"data.path={tmp_path / 'X_TRAIN.txt'}"))
    assert index.parts == [0, 1] and index.classes == ["1", "2"]
    write_ts(tmp_path / "a.ts", waves(2))
    (tmp_path / "list.txt").write_text("a.ts\n")
    assert detect_format(recipe(f"data.path={tmp_path / 'list.txt'}")) == "filelist"
    image = load_recipe(ROOT / "recipes/image.yaml", [f"data.path={tmp_path / 'X_TRAIN.txt'}"])
    with pytest.raises(DataError, match=r"X_TRAIN.txt, line 1: 1 -1.0000000e\+00 .* does not exist"):
        index_files(image)  # not an image type: read as a file list, whose line names no file


def test_resolve_recipe__length_and_channels_from_the_data(tmp_path):
    path = write_ts(tmp_path / "v.ts", waves(6, channels=2, length=30, vary=True), labels=[0, 1] * 3)
    r = resolve_recipe(recipe(f"data.path={path}"))
    longest = max(x.shape[1] for x in read_series(path, CFG).series)
    assert r.timeseries.channels == 2 and r.timeseries.length == 4 * math.ceil(longest / 4)
    capped = resolve_recipe(recipe(f"data.path={path}", "timeseries.max_auto_length=10"))
    assert longest > 10 and capped.timeseries.length == 12  # at most 10 samples, rounded up to whole patches
    (tmp_path / "mix").mkdir()
    write_ts(tmp_path / "mix/a.ts", waves(2, channels=1))
    write_ts(tmp_path / "mix/b.ts", waves(2, channels=3))
    with pytest.raises(DataError, match="different channel counts"):
        resolve_recipe(recipe(f"data.path={tmp_path / 'mix'}"))


def test_train_loader__crops_pads_and_masks_only_real_tokens(tmp_path):
    series = waves(10, channels=2, length=40, vary=True)
    path = write_ts(tmp_path / "v.ts", series)
    r = recipe(f"data.path={path}", "timeseries.length=32", "timeseries.channels=2")
    batch = next(iter(build_train_loader(r)))["parts"]["timeseries"]
    assert batch["input"].shape == (8, 2, 32) and batch["valid"].shape == (8, 16)
    assert torch.equal(batch["valid"], valid_mask(batch["input"], r))
    for b in range(8):
        for idx in (batch["context_idx"][b], batch["target_idx"][b].flatten()):
            assert batch["valid"][b, idx[idx >= 0]].all()
    short = write_ts(tmp_path / "s.ts", [np.ones((2, 3)), np.ones((2, 30))])
    ds = FileDataset(index_files(recipe(f"data.path={short}", "timeseries.length=32", "timeseries.channels=2")),
                     r, train=True)
    sample = ds[(0, 0)]  # series 1 fills one patch: skipped in training and reported
    assert "too short" in sample["bad"][0] and sample["input"].shape == (2, 32)


def test_crop_or_pad_and_windows__cover_the_series():
    x = torch.arange(10.0)[None]
    crops = {tuple(crop_or_pad(x, 4, torch.Generator().manual_seed(s))[0].tolist()) for s in range(30)}
    assert len(crops) > 3 and all(c == tuple(range(int(c[0]), int(c[0]) + 4)) for c in crops)
    wins = windows(x, 4, 4, flush=True)
    assert wins.shape == (3, 1, 4) and [w[0, 0].item() for w in wins] == [0, 4, 6]
    short = windows(x, 16, 8, flush=True)
    assert short.shape == (1, 1, 16) and torch.isnan(short[0][0, 10:]).all() and torch.equal(short[0, :, :10], x)


def test_embed__one_row_per_series_and_windows_pooled(tmp_path):
    from multijepa.embed import Embedder

    r = recipe("timeseries.length=16", "timeseries.channels=1", "timeseries.window_hop=8")
    model = Embedder.random_init(r, device="cpu")
    series = waves(3, length=40) + [waves(1, length=10)[0]]
    path = write_ts(tmp_path / "e.ts", series)
    rows = model.embed([path])
    assert rows.shape == (4, 32) and np.isfinite(rows).all()
    assert np.allclose(rows, model.embed([torch.tensor(s) for s in series]), atol=1e-5)
    windows = [torch.tensor(series[0][:, s:s + 16]) for s in (0, 8, 16, 24)]
    assert np.allclose(rows[0], model.embed(windows).mean(0), atol=1e-5)
    tokens = model.embed([torch.tensor(series[3])], tokens=True)
    assert tokens.shape == (1, 16 // 4, 32) and np.isnan(tokens[0, 3]).all() and np.isfinite(tokens[0, :3]).all()


# --------------------------------------------------------------------------- command line end to end


def test_cli__pretrain_on_ts_then_embed_ts_csv_npy(tmp_path):
    series = waves(12, channels=2, length=32, vary=True)
    data = write_ts(tmp_path / "train.ts", series, labels=[0, 1, 2] * 4)
    run_cli("pretrain", str(RECIPE), *TINY_TS, f"data.path={data}", "run.dir=runs/ts", "train.steps=3", cwd=tmp_path)
    saved = load_recipe(tmp_path / "runs/ts/recipe.yaml")
    assert saved.timeseries.channels == 2 and saved.timeseries.length == 32
    np.savetxt(tmp_path / "one.csv", series[0].T, delimiter=",", header="a,b", comments="")
    np.save(tmp_path / "one.npy", series[1][None])
    out = run_cli("embed", "train.ts", "one.csv", "one.npy", "--out", "v.jsonl", cwd=tmp_path)
    assert "using runs/ts/last.pt" in out.stderr
    rows = [json.loads(line) for line in (tmp_path / "v.jsonl").read_text().splitlines()]
    assert [(r["file"], r["index"]) for r in rows] == [("train.ts", k) for k in range(12)] + [("one.csv", 0),
                                                                                           ("one.npy", 0)]
    vectors = np.array([r["embedding"] for r in rows])
    assert vectors.shape == (14, 32) and np.allclose(vectors[12], vectors[0], atol=1e-5)
    write_ts(tmp_path / "test.ts", waves(6, channels=2, length=32, seed=1), labels=[0, 1, 2] * 2)
    out = run_cli("probe", "train.ts", "--test", "test.ts", "--checkpoint", "runs/ts/last.pt", "--json",
                  "--workers", "0", cwd=tmp_path)
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["n_train"] == 12 and result["n_test"] == 6 and 0 <= result["linear"] <= 1
    bad = tmp_path / "bad.csv"
    bad.write_text("1,2\n3\n")
    proc = run_cli("embed", str(bad), "--checkpoint", str(tmp_path / "runs/ts/last.pt"), check=False)
    assert proc.returncode == 2 and "bad.csv, line 2" in proc.stderr and "Traceback" not in proc.stderr


def test_embed__a_txt_is_a_series_table_or_points_by_the_model(tmp_path):
    from multijepa.embed import Embedder

    (tmp_path / "X.txt").write_text(ucr_rows(waves(3), [1, 2, 1], "  "))
    series_model = Embedder.random_init(recipe("timeseries.length=24", "timeseries.channels=1"), device="cpu")
    assert series_model.embed([tmp_path / "X.txt"]).shape == (3, 32)
    np.savetxt(tmp_path / "points.txt", np.random.default_rng(0).normal(size=(200, 3)), delimiter=",")
    points = load_recipe(ROOT / "recipes/pointcloud.yaml", TINY + [
        "pointcloud.num_points=128", "pointcloud.num_groups=16", "pointcloud.group_size=8",
        "pointcloud.pointnet_width=16", "mask.min_context=2"])
    assert Embedder.random_init(points, device="cpu").embed([tmp_path / "points.txt"]).shape == (1, 32)


def write_ucr_set(folder, kind: str, n: int = 12, seed: int = 0) -> str:
    """A two-class univariate set as the archives ship it: a UCR .txt or .tsv, or an .npz with
    X_train/y_train and a 6-series X_test/y_test (labels 1, 2)."""
    series, labels = waves(n, length=32, seed=seed), [1 + i % 2 for i in range(n)]
    name = f"X_{'TEST' if seed else 'TRAIN'}.{kind}"
    if kind == "npz":
        test = waves(6, length=32, seed=seed + 1)
        np.savez(folder / name, X_train=np.stack([x[0] for x in series]), y_train=np.array(labels),
                 X_test=np.stack([x[0] for x in test]), y_test=np.array([1, 2] * 3))
    else:
        (folder / name).write_text(ucr_rows(series, labels, "  " if kind == "txt" else "\t",
                                            "{:.7e}" if kind == "txt" else "{:g}"))
    return name


def test_cli__pretrain_embed_probe_on_ucr_txt_tsv_and_npz(tmp_path, monkeypatch, capsys):
    from multijepa.cli import main
    from multijepa.embed import load
    from multijepa.evaluate import _embed_labelled

    monkeypatch.chdir(tmp_path)
    for kind in ("txt", "tsv", "npz"):
        data = write_ucr_set(tmp_path, kind)
        assert main(["pretrain", str(RECIPE), *TINY_TS, f"data.path={data}", f"run.dir={kind}", "train.steps=2"]) == 0
        assert load_recipe(f"{kind}/recipe.yaml").timeseries.length == 32
        assert main(["embed", data, "--checkpoint", f"{kind}/last.pt", "--out", f"{kind}.jsonl"]) == 0
        rows = [json.loads(line) for line in (tmp_path / f"{kind}.jsonl").read_text().splitlines()]
        assert [(r["file"], r["index"]) for r in rows] == [(data, k) for k in range(12)]

    def probe(*args: str) -> dict:
        capsys.readouterr()
        assert main(["probe", *args, "--json", "--workers", "0"]) == 0
        return json.loads(capsys.readouterr().out.splitlines()[-1])

    # A .txt set scored on a .tsv one: the labels 1.0000000e+00 and 1 are one class.
    scored = probe("X_TRAIN.txt", "--test", write_ucr_set(tmp_path, "tsv", n=6, seed=1), "--checkpoint", "txt/last.pt")
    assert (scored["n_train"], scored["n_test"]) == (12, 6) and 0 <= scored["linear"] <= 1
    split = probe("X_TRAIN.npz", "--checkpoint", "npz/last.pt")  # the recipe's npz_split: train
    assert (split["n_train"], split["n_test"]) == (10, 2)
    feats, names, _ = _embed_labelled(load("npz/last.pt", "cpu"), "X_TRAIN.npz", 64, 0, test_split=True)
    assert feats.shape == (6, 32) and names == ["1", "2"] * 3  # the test split, as --test on the same file reads it
    assert main(["embed", "X_TRAIN.npz", "--checkpoint", "npz/last.pt", "--set", "timeseries.npz_split=test",
                 "--out", "test.npz"]) == 0
    assert np.load(tmp_path / "test.npz")["embeddings"] == pytest.approx(feats, abs=1e-5)  # the split chosen
    (tmp_path / "bad.txt").write_text("1 0.5 0.6\n2 0.5 oops\n")
    (tmp_path / "bad.tsv").write_text("1\t0.5\t0.6\n2\t0.5\t1,5\n")
    np.savez(tmp_path / "bad.npz", a=np.zeros(3), b=np.zeros(3))
    for bad, match in [("bad.txt", r"bad.txt, line 2, column 3: 'oops' is not a number"),
                       ("bad.tsv", r"bad.tsv, line 2, column 3: '1,5' is not a number"),
                       ("bad.npz", r"bad.npz: no series array; .*it holds a, b")]:
        for command in (["embed", bad, "--checkpoint", "txt/last.pt"],
                        ["pretrain", str(RECIPE), *TINY_TS, f"data.path={bad}", "run.dir=bad"]):
            assert main(command) == 2
            assert re.search(match, capsys.readouterr().err), command


def test_shards__one_series_per_member_with_explicit_shape(tmp_path):
    from multijepa.datasets.shards import write_shards

    for cls in ("a", "b"):
        (tmp_path / "src" / cls).mkdir(parents=True)
        for i, x in enumerate(waves(4, channels=2, length=20, seed=ord(cls))):
            np.save(tmp_path / "src" / cls / f"{i}.npy", x[None])
    write_shards(tmp_path / "src", tmp_path / "shards", per_shard=5)
    with pytest.raises(DataError, match="with shards, set timeseries.length and timeseries.channels in the recipe"):
        resolve_recipe(recipe(f"data.path={tmp_path / 'shards'}"))
    r = recipe(f"data.path={tmp_path / 'shards'}", "timeseries.length=16", "timeseries.channels=2")
    batch = next(iter(build_train_loader(r)))["parts"]["timeseries"]
    assert batch["input"].shape == (8, 2, 16) and batch["valid"].all()
