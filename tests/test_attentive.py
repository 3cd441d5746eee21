"""The attentive probe: what it learns that a linear probe on mean-pooled tokens cannot, its token sets
(pooled exactly as embed pools, padding left out), and `probe --attentive` end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest

import multijepa
from multijepa.cli import main
import torch

from multijepa.evaluate import (AttentiveProbe, _concat_token_sets, attentive_probe_accuracy, linear_probe_accuracy,
                                probe, stratified_split, token_sets)

from conftest import IMAGE_RECIPE, TINY_IMAGE, TINY_TS, write_ts


FAST = dict(epochs=1, min_steps=400, batch_size=32)  # enough steps for this small task, in about a second


def _marked_token_task(n: int, tokens: int = 12, dim: int = 16, seed: int = 0):
    """The label is the sign of feature 1 of the one token marked by feature 0; every other token has a
    loud random feature 1. The mean over tokens drowns the marked token among the others, so a linear
    read-out of it is near chance, while attending to the marked token reads the label off."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 0.3, (n, tokens, dim)).astype(np.float32)
    x[:, :, 1] = 3.0 * rng.choice([-1.0, 1.0], (n, tokens))
    y = np.arange(n) % 2
    where = rng.integers(0, tokens, n)
    x[np.arange(n), where, 0] = 4.0
    x[np.arange(n), where, 1] = np.where(y == 1, 1.0, -1.0)
    return x, np.zeros((n, tokens), dtype=bool), y


def test_attentive_probe__reads_what_the_mean_of_tokens_hides():
    x, pad, y = _marked_token_task(320)
    tr, te = stratified_split(y, 0.25, seed=0)
    attentive = attentive_probe_accuracy(x[tr], pad[tr], y[tr], x[te], pad[te], y[te], seed=0, **FAST)
    linear = linear_probe_accuracy(x[tr].mean(1), y[tr], x[te].mean(1), y[te])
    assert attentive >= 0.9 and linear <= 0.7, (attentive, linear)


@pytest.mark.parametrize("queries", [1, 3])
def test_attentive_pooler__equals_multihead_attention_over_layer_normed_tokens(queries):
    """The pooler folds the key and value maps into the queries; it must give what projecting every token
    through nn.MultiheadAttention gives, padding and the layer norm's own scale and shift included."""
    torch.manual_seed(0)
    model = AttentiveProbe(48, 5, queries=queries)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # scale, shift and biases away from their initial 1 and 0
    x = torch.randn(4, 20, 48) * 2 + 1
    pad = torch.zeros(4, 20, dtype=torch.bool)
    pad[1, 13:] = True
    x[1, 13:] = 1e3  # loud padding
    kv = model.norm_kv(x)
    ref, _ = model.attn(model.query.expand(4, -1, -1), kv, kv, key_padding_mask=pad, need_weights=False)
    torch.testing.assert_close(model.pool(x, pad), ref + model.mlp(model.norm(ref)), rtol=1e-4, atol=1e-5)


def test_attentive_probe__ignores_padding_slots_and_is_deterministic():
    x, pad, y = _marked_token_task(320)
    junk = np.random.default_rng(1).normal(0, 50, (len(y), 6, x.shape[2])).astype(np.float32)  # loud padding
    xp, pp = np.concatenate([x, junk], 1), np.concatenate([pad, np.ones((len(y), 6), dtype=bool)], 1)
    tr, te = stratified_split(y, 0.25, seed=0)
    runs = [attentive_probe_accuracy(xp[tr], pp[tr], y[tr], xp[te], pp[te], y[te], seed=3, lr_grid=(3e-3,), **FAST)
            for _ in range(2)]  # one learning rate: no selection, one fit each
    assert runs[0] == runs[1] >= 0.9


def test_token_sets__pools_as_embed_does_and_drops_padding_tokens():
    views = [np.array([[[1.0, 2.0], [3.0, 4.0], [np.nan, np.nan]]]),  # one view, a padding token
             np.array([[[0.0, 0.0], [2.0, 2.0]], [[4.0, 4.0], [np.nan, np.nan]]])]  # two views
    tokens, pad, pooled = token_sets(views)
    assert tokens.shape == (2, 3, 2) and pad.tolist() == [[False, False, True], [False, False, False]]
    np.testing.assert_allclose(pooled, [[2.0, 3.0], [2.5, 2.5]])  # mean over views of each view's real-token mean
    both, both_pad = _concat_token_sets((tokens[:1, :2], pad[:1, :2]), (tokens, pad))
    assert both.shape == (3, 3, 2) and both_pad[0].tolist() == [False, False, True]


@pytest.fixture(autouse=True)
def _short_probes(monkeypatch):
    """The end-to-end tests check plumbing, not accuracy: a short probe keeps them fast."""
    monkeypatch.setattr("multijepa.evaluate.ATTENTIVE_MIN_STEPS", 20)


@pytest.fixture(scope="module")
def series_run(tmp_path_factory):
    """A tiny time-series model and a labelled .ts set of unequal lengths (NaN-padded tokens)."""
    root = tmp_path_factory.mktemp("att")
    rng = np.random.default_rng(0)
    series = [[np.sin(np.linspace(0, 6 + 6 * (i % 2), 24 + 4 * (i % 3))) + rng.normal(0, 0.1, 24 + 4 * (i % 3))]
              for i in range(24)]
    data = write_ts(root / "s.ts", series, labels=[i % 2 for i in range(24)])
    run = multijepa.pretrain(multijepa.load_recipe("timeseries", TINY_TS + [
        f"data.path={data}", f"run.dir={root / 'run'}", "train.steps=3"]))
    return data, run / "last.pt"


def test_probe__attentive_keeps_the_linear_and_knn_figures_and_pools_like_embed(series_run):
    data, ckpt = series_run
    plain = probe(str(data), str(ckpt), device="cpu", num_workers=0, precision="fp32")
    both = probe(str(data), str(ckpt), device="cpu", num_workers=0, precision="fp32", attentive=True)
    assert 0.0 <= both["attentive"] <= 1.0 and "attentive" not in plain
    assert both["linear"] == pytest.approx(plain["linear"]) and both["knn"] == pytest.approx(plain["knn"])
    assert (both["n_train"], both["n_test"]) == (plain["n_train"], plain["n_test"])


def test_probe__attentive_from_the_cli_with_a_test_set(series_run, tmp_path, capsys):
    data, ckpt = series_run
    assert main(["probe", str(data), "--test", str(data), "--checkpoint", str(ckpt), "--attentive", "--json",
                 "--workers", "0", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert "attentive probe accuracy" in printed[0] and json.loads(printed[1])["attentive"] >= 0.0


def test_probe__attentive_on_images(shapes, tmp_path):
    run = multijepa.pretrain(multijepa.load_recipe(IMAGE_RECIPE, TINY_IMAGE + [
        f"data.path={shapes}", f"run.dir={tmp_path / 'run'}", "train.steps=2"]))
    result = probe(str(shapes), str(run / "last.pt"), device="cpu", num_workers=0, attentive=True)
    assert set(result) >= {"linear", "knn", "attentive", "seconds_probing"}
