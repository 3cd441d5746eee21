"""Golden tests: exact numbers against independent references (hand arithmetic, numpy float64,
scikit-learn, or a re-derivation from the model's own pieces), not just orderings or finiteness.

scikit-learn is a test-only dependency of this file.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier

from conftest import ROOT
from multijepa.core.jepa import Backbone, Predictor, gather_tokens
from multijepa.core.losses import latent_loss, normalize_targets, sigreg, vicreg
from multijepa.core.transformer import sincos_embed
from multijepa.errors import TrainingError
from multijepa.evaluate import _fit_logistic, knn_accuracy, linear_probe_accuracy, stratified_split
from multijepa.recipe import ImageConfig, LossConfig, ModelConfig, Recipe, load_recipe, recipe_to_dict
from multijepa.tokenizers.pointcloud import PointGroupTokenizer, point_pos_embed
from multijepa.train import _check_resumable, build_model, param_groups

MIXED_RECIPE = ROOT / "recipes/multimodal.yaml"
TINY_MODEL = ModelConfig(dim=8, depth=1, heads=2, predictor_dim=8, predictor_depth=1, predictor_heads=2)


def tiny_image_recipe(**loss) -> Recipe:
    """8 px images in 4 px patches: a 2 x 2 grid of 4 tokens, width 8."""
    return Recipe(model=TINY_MODEL, loss=LossConfig(**loss)).with_section("image", ImageConfig(size=8, patch_size=4))


def tiny_image_model(**loss):
    """A tiny JEPA whose context encoder differs from its target encoder (as after some training),
    so a reference that used the wrong encoder for either view could not match."""
    torch.manual_seed(0)
    model = build_model(tiny_image_recipe(**loss))
    with torch.no_grad():  # weights of order 1: at init (std 0.02) the predictor barely reads its context
        for p in list(model.context.parameters()) + list(model.predictor.parameters()):
            p.add_(0.3 * torch.randn_like(p))
    return model


# =========================================================================== 1. the JEPA loss


def test_latent_loss__hand_computed_values():
    pred = torch.tensor([[0.0, 2.0], [1.0, 1.0]])
    target = torch.tensor([[1.0, 0.0], [1.0, 3.0]])
    # d = pred - target = [-1, 2, 0, -2]
    assert latent_loss(pred, target, "l1").item() == 1.25  # (1 + 2 + 0 + 2) / 4
    assert latent_loss(pred, target, "l2").item() == 2.25  # (1 + 4 + 0 + 4) / 4
    # smooth L1 (beta 1): 0.5 d^2 for |d| < 1, |d| - 0.5 otherwise: (0.5 + 1.5 + 0 + 1.5) / 4
    assert latent_loss(pred, target, "smooth_l1").item() == 0.875
    # the quadratic branch of smooth L1: d = [0.5, -3]
    pred, target = torch.tensor([0.5, -3.0]), torch.zeros(2)
    assert latent_loss(pred, target, "l1").item() == 1.75  # (0.5 + 3) / 2
    assert latent_loss(pred, target, "l2").item() == 4.625  # (0.25 + 9) / 2
    assert latent_loss(pred, target, "smooth_l1").item() == 1.3125  # (0.5 * 0.25 + 2.5) / 2


def test_normalize_targets__layer_hand_computed_and_numpy():
    feats = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]])
    # mean 2.5, biased variance (2.25 + 0.25 + 0.25 + 2.25) / 4 = 1.25, eps 1e-5
    expected = (np.array([1.0, 2.0, 3.0, 4.0]) - 2.5) / math.sqrt(1.25 + 1e-5)
    np.testing.assert_allclose(normalize_targets(feats, "layer")[0, 0].numpy(), expected, rtol=1e-6, atol=1e-7)
    x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(1)) * 3 + 2
    x64 = x.double().numpy()
    ref = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(normalize_targets(x, "layer").numpy(), ref, rtol=1e-5, atol=1e-6)


def test_normalize_targets__instance_over_valid_tokens_hand_computed_and_numpy():
    # one sample, one feature, tokens [1, 3, 100]; the 100 is padding: mean 2, variance 1 over [1, 3]
    feats = torch.tensor([[[1.0], [3.0], [100.0]]])
    valid = torch.tensor([[True, True, False]])
    out = normalize_targets(feats, "instance", valid)[0, :, 0].numpy()
    s = 1.0 / math.sqrt(1.0 + 1e-5)
    np.testing.assert_allclose(out, [-s, s, 0.0], rtol=1e-6, atol=0)
    # numpy reference per sample over its real tokens, padding -> exactly 0
    x = torch.randn(2, 6, 4, generator=torch.Generator().manual_seed(2)) * 2 + 5
    valid = torch.tensor([[True, False, True, True, False, True], [True] * 6])
    out = normalize_targets(x, "instance", valid).numpy()
    x64, v = x.double().numpy(), valid.numpy()
    for b in range(2):
        real = x64[b, v[b]]
        ref = (real - real.mean(0)) / np.sqrt(real.var(0) + 1e-5)
        np.testing.assert_allclose(out[b, v[b]], ref, rtol=1e-5, atol=1e-6)
        assert (out[b, ~v[b]] == 0).all()


def _layer_norm(f: torch.Tensor) -> torch.Tensor:
    return (f - f.mean(-1, keepdim=True)) / torch.sqrt(f.var(-1, unbiased=False, keepdim=True) + 1e-5)


def _instance_norm(f: torch.Tensor) -> torch.Tensor:  # over a sample's tokens (all real here)
    return (f - f.mean(0, keepdim=True)) / torch.sqrt(f.var(0, unbiased=False, keepdim=True) + 1e-5)


def _distance(pred: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    d = pred - target
    if kind == "l1":
        return d.abs().mean()
    if kind == "l2":
        return (d * d).mean()
    return torch.where(d.abs() < 1, 0.5 * d * d, d.abs() - 0.5).mean()


def _reference_jepa_loss(model, x: torch.Tensor, ctx_idx: list[list[int]], tgt_idx: list[list[list[int]]],
                         kind: str, norm: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The JEPA loss rebuilt from the model's pieces, one sample and one target block at a time:
    target encoder on all tokens -> normalise -> pick the target tokens; context encoder on the
    context tokens alone; predictor on [context, mask tokens at the target coords] per block; the
    distance averaged over every real (sample, block, token, feature). Index lists are ragged: no
    padding is ever formed. Returns the loss and the pooled (unnormalised) target features."""
    d, pred_net = model.context.dim, model.predictor
    preds, targets, pooled = [], [], []
    with torch.no_grad():
        for b in range(x.shape[0]):
            tokens, coords = model.target.tokenizers["image"](x[b:b + 1])
            feats = model.target.encoder(tokens + sincos_embed(coords, d))[0]  # [N, D]
            pooled.append(feats.mean(0))
            feats = _layer_norm(feats) if norm == "layer" else _instance_norm(feats)
            tokens, coords = model.context.tokenizers["image"](x[b:b + 1])
            emb = (tokens + sincos_embed(coords, d))[0]
            c = torch.tensor(ctx_idx[b])
            context = model.context.encoder(emb[c][None])[0]  # [Nc, D]
            ctx_in = pred_net.embed(context) + sincos_embed(coords[:, c], pred_net.pdim)[0]
            for block in tgt_idx[b]:
                t = torch.tensor(block)
                queries = pred_net.mask_token[0] + sincos_embed(coords[:, t], pred_net.pdim)[0]
                h = pred_net.transformer(torch.cat([ctx_in, queries])[None])[0]
                preds.append(pred_net.out(h[len(c):]))
                targets.append(feats[t])
    return _distance(torch.cat(preds), torch.cat(targets), kind), torch.stack(pooled)


@pytest.mark.parametrize("kind,norm", [("smooth_l1", "layer"), ("l2", "instance"), ("l1", "layer")])
def test_jepa_forward__prediction_loss_equals_recomputation_from_its_pieces(kind, norm):
    model = tiny_image_model(type=kind, target_norm=norm)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    ctx = [[0, 1], [1, 3]]
    tgt = [[[2, 3], [3, 1]], [[0, 2], [2, 1]]]  # [B=2, M=2, Nt=2]
    out = model({"image": {"input": x, "context_idx": torch.tensor(ctx), "target_idx": torch.tensor(tgt)}})
    ref, pooled = _reference_jepa_loss(model, x, ctx, tgt, kind, norm)
    assert out["prediction"].item() == pytest.approx(ref.item(), rel=1e-6, abs=1e-7)
    assert out["prediction/image"].item() == pytest.approx(ref.item(), rel=1e-6, abs=1e-7)
    assert out["loss"].item() == pytest.approx(ref.item(), rel=1e-6, abs=1e-7)  # no regularizer
    assert out["regularizer"].item() == 0.0
    torch.testing.assert_close(out["target_pooled"], pooled, rtol=1e-6, atol=1e-6)


def test_jepa_forward__padded_index_sets_equal_the_ragged_recomputation():
    """-1 entries (padding, with ``valid``) must be invisible: the loss equals the reference that
    never forms padding, averaged over the real targets only."""
    model = tiny_image_model()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    ctx = [[0, 1, 2], [3]]
    tgt = [[[3], [2, 3]], [[0, 1], [2]]]
    pad = lambda rows, n: [r + [-1] * (n - len(r)) for r in rows]  # noqa: E731
    part = {"input": x, "valid": torch.ones(2, 4, dtype=torch.bool),
            "context_idx": torch.tensor(pad(ctx, 3)), "target_idx": torch.tensor([pad(t, 2) for t in tgt])}
    out = model({"image": part})
    ref, _ = _reference_jepa_loss(model, x, ctx, tgt, "smooth_l1", "layer")
    assert out["prediction"].item() == pytest.approx(ref.item(), rel=1e-6, abs=1e-7)


# =========================================================================== 2. SIGReg


def _directions(d: int, k: int, seed: int) -> np.ndarray:
    """The unit directions sigreg draws from a generator seeded ``seed``: randn(d, k), columns normalised."""
    a = torch.randn(d, k, generator=torch.Generator().manual_seed(seed)).double().numpy()
    return a / np.linalg.norm(a, axis=0, keepdims=True)


def _epps_pulley_integral(z: np.ndarray, a: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Per direction: integral over the grid t of |phi_emp(t) - exp(-t^2/2)|^2 exp(-t^2/2) (float64)."""
    proj = z @ a  # [N, K]
    gauss = np.exp(-0.5 * t**2)
    out = []
    for k in range(a.shape[1]):
        angles = np.outer(proj[:, k], t)  # [N, T]
        err = (np.cos(angles).mean(0) - gauss) ** 2 + np.sin(angles).mean(0) ** 2
        out.append(np.trapezoid(err * gauss, t))
    return np.array(out)


T_MAX, NUM_POINTS, K_DIRS = 3.0, 17, 16  # sigreg's defaults for the grid
FINE = np.linspace(-T_MAX, T_MAX, 4001)


def _sigreg_cases() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return {"gaussian": torch.randn(512, 16, generator=g),
            "collapsed": torch.randn(512, 1, generator=g).expand(-1, 16) * 0.01}


@pytest.mark.parametrize("case", ["gaussian", "collapsed"])
def test_sigreg__equals_n_times_the_epps_pulley_integral_averaged_over_directions(case):
    """LeJEPA's statistic: N times the integral, so that its weights carry over from the paper."""
    z = _sigreg_cases()[case]
    n = z.shape[0]
    a = _directions(16, K_DIRS, seed=7)
    lib = sigreg(z, K_DIRS, torch.Generator().manual_seed(7)).item()
    z64 = z.double().numpy()
    # (a) the continuous integral over [-t_max, t_max] on a fine grid
    continuous = n * _epps_pulley_integral(z64, a, FINE).mean()
    # (b) the same statistic discretised as the library does: 17-point trapezoid on [0, t_max], doubled
    coarse = n * 2 * _epps_pulley_integral(z64, a, np.linspace(0.0, T_MAX, NUM_POINTS)).mean()
    assert lib == pytest.approx(coarse, rel=1e-5)  # float32 vs float64 on the same grid
    assert lib == pytest.approx(continuous, rel=1e-3)  # the coarse quadrature's error: 1.2e-4, 4.6e-4 here
    # the values themselves: near 1 for Gaussian samples (see the null-mean test), ~0.4 N when collapsed
    expected = {"gaussian": 512 * 2.14542e-3, "collapsed": 512 * 0.402085}[case]
    assert continuous == pytest.approx(expected, rel=1e-5)


def test_sigreg__exactly_collapsed_samples_equal_the_closed_form():
    """All samples at 0: phi_emp = 1, so the statistic is N times the integral over [-3, 3] of
    (1 - g)^2 g with g = exp(-t^2/2), i.e. sum of c * int exp(-a t^2/2) = c sqrt(2 pi / a) erf(3 sqrt(a/2))
    over (a, c) in (1, 1), (2, -2), (3, 1): 0.4022337... for every direction."""
    closed = sum(c * math.sqrt(2 * math.pi / a) * math.erf(T_MAX * math.sqrt(a / 2)) for a, c in [(1, 1), (2, -2), (3, 1)])
    assert closed == pytest.approx(0.4022337, rel=1e-6)
    lib = sigreg(torch.zeros(64, 8), 4, torch.Generator().manual_seed(0)).item()
    assert lib == pytest.approx(64 * closed, rel=1e-3)  # 17-point trapezoid vs the exact integral


def test_sigreg__on_a_wide_grid_equals_the_closed_form_over_the_real_line():
    """Integrated over all t, the Epps-Pulley statistic of a 1-D sample x_1..x_N has a closed form
    (expand |phi_N|^2 and the cross term; each piece is a Gaussian integral):
    N [sqrt(2 pi) / N^2 sum_jk exp(-(x_j - x_k)^2 / 2) - 2 sqrt(pi) / N sum_j exp(-x_j^2 / 4) + sqrt(2 pi / 3)].
    A one-dimensional z makes every direction the same (up to sign, and the statistic is even)."""
    g = torch.Generator().manual_seed(11)
    for z in (torch.randn(300, 1, generator=g), 0.5 * torch.randn(300, 1, generator=g) + 0.7):
        x = z[:, 0].double().numpy()
        n = len(x)
        closed = n * (math.sqrt(2 * math.pi) / n**2 * np.exp(-0.5 * (x[:, None] - x[None, :]) ** 2).sum()
                      - 2 * math.sqrt(math.pi) / n * np.exp(-(x**2) / 4).sum() + math.sqrt(2 * math.pi / 3))
        lib = sigreg(z, 3, torch.Generator().manual_seed(0), num_points=801, t_max=10.0).item()
        assert lib == pytest.approx(closed, rel=1e-4, abs=1e-4)


def test_sigreg__null_mean_does_not_depend_on_n():
    """Under the null (Gaussian samples) E|phi_emp - phi|^2 = (1 - exp(-t^2)) / N, so the N-scaled
    statistic has the N-free mean int (exp(-t^2/2) - exp(-3t^2/2)) dt = 1.05266 over [-3, 3]."""
    null_mean = math.sqrt(2 * math.pi) * math.erf(T_MAX / math.sqrt(2)) \
        - math.sqrt(2 * math.pi / 3) * math.erf(T_MAX * math.sqrt(1.5))
    assert null_mean == pytest.approx(1.052659, rel=1e-6)
    g = torch.Generator().manual_seed(8)
    for n in (256, 4096):  # 1.234 and 1.043 here
        z = torch.randn(n, 16, generator=g)
        assert sigreg(z, 64, torch.Generator().manual_seed(9)).item() == pytest.approx(null_mean, rel=0.25)


# =========================================================================== 3. VICReg


def test_vicreg__equals_its_definition_in_float64():
    z = torch.randn(64, 6, generator=torch.Generator().manual_seed(10)) * torch.tensor([0.3, 0.8, 1.0, 2.0, 0.05, 1.5])
    z[:, 1] += 0.7 * z[:, 0]  # some covariance
    z64 = z.double().numpy()
    eps = 1e-4
    variance = np.maximum(0.0, 1.0 - np.sqrt(z64.var(0, ddof=1) + eps)).mean()
    cov = np.cov(z64, rowvar=False, ddof=1)
    off = cov - np.diag(np.diag(cov))
    covariance = (off**2).sum() / z64.shape[1]
    assert vicreg(z, eps).item() == pytest.approx(variance + covariance, rel=1e-6, abs=1e-6)
    # collapsed to a point: variance term 1 - sqrt(eps) = 0.99 per dimension, no covariance
    assert vicreg(torch.full((16, 4), 3.0)).item() == pytest.approx(1.0 - math.sqrt(1e-4), abs=1e-6)


# =========================================================================== 4. probes


def _gaussian_classes(seed: int, n_per_class: int, dim: int = 5, spread: float = 1.0):
    """3 Gaussian classes with overlapping clouds: separable only in part."""
    rng = np.random.default_rng(seed)
    centres = np.zeros((3, dim))
    centres[0, 0], centres[1, 1], centres[2, :2] = 2.0, 2.0, -1.5
    centres += 1.0  # away from the origin, so cosine kNN sees the classes as directions
    x = np.concatenate([c + spread * rng.standard_normal((n_per_class, dim)) for c in centres])
    y = np.repeat(np.arange(3), n_per_class)
    return x, y


def _sklearn_logistic(xtr, ytr, xte, l2: float):
    """sklearn's multinomial L2 logistic regression with the probe's objective: mean cross-entropy +
    l2 * |W|^2 (bias free) is sklearn's C * sum CE + |W|^2 / 2 divided by C n: C = 1 / (2 l2 n)."""
    mean, std = xtr.mean(0), xtr.std(0) + 1e-6
    clf = LogisticRegression(C=1.0 / (2 * l2 * len(xtr)), tol=1e-10, max_iter=10_000)
    clf.fit((xtr - mean) / std, ytr)
    return clf, (xte - mean) / std


@pytest.mark.parametrize("l2", [1e-3, 3e-2])
def test_linear_probe_accuracy__equals_sklearn_logistic_regression(l2):
    x, y = _gaussian_classes(11, 80)
    xt, yt = _gaussian_classes(12, 40)
    acc = linear_probe_accuracy(x, y, xt, yt, l2_grid=(l2,))
    clf, xt_std = _sklearn_logistic(x, y, xt, l2)
    ref = float((clf.predict(xt_std) == yt).mean())
    assert 0.6 < ref < 0.98  # the data are neither trivial nor hopeless, so the comparison means something
    assert acc == ref


@pytest.mark.parametrize("l2", [1e-3, 3e-2, 1.0])
def test_fit_logistic__weights_equal_sklearn_with_c_mapped_from_l2(l2):
    """Accuracies hardly move with the L2 strength on these data (C off by 2x gives the same
    accuracy), so the penalty convention is pinned on the weights: the probe's W equals sklearn's
    coef_ under C = 1 / (2 l2 n) (C off by 2x moves them by 0.1-0.3); the unpenalised biases are
    defined up to a common shift, so they are compared centred."""
    x, y = _gaussian_classes(11, 80)
    clf, xs = _sklearn_logistic(x, y, x, l2)
    w = _fit_logistic(torch.tensor(xs), torch.tensor(y), 3, l2).numpy()  # [D + 1, classes], bias last
    np.testing.assert_allclose(w[:-1], clf.coef_.T, rtol=0, atol=1e-4)
    np.testing.assert_allclose(w[-1] - w[-1].mean(), clf.intercept_ - clf.intercept_.mean(), rtol=0, atol=1e-4)


def test_linear_probe_accuracy__grid_selection_equals_sklearn_on_the_same_split():
    """With a grid, the L2 strength is the first best on a stratified 20% validation part, then the
    classifier is refitted on all training data: replayed with sklearn on the same split."""
    x, y = _gaussian_classes(13, 40, spread=1.3)
    xt, yt = _gaussian_classes(14, 40, spread=1.3)
    grid = (1e-4, 1e-2, 3e-1)
    fit, val = stratified_split(y, 0.2, seed=0)
    best, best_acc = grid[0], -1.0
    for l2 in grid:
        clf, xv = _sklearn_logistic(x[fit], y[fit], x[val], l2)
        a = float((clf.predict(xv) == y[val]).mean())
        if a > best_acc:
            best, best_acc = l2, a
    clf, xt_std = _sklearn_logistic(x, y, xt, best)
    assert linear_probe_accuracy(x, y, xt, yt, l2_grid=grid) == float((clf.predict(xt_std) == yt).mean())


def _knn_reference(xtr, ytr, xte, k: int, temperature: float) -> np.ndarray:
    """DINO kNN in numpy float64: cosine similarity, top k, votes exp(sim / T) per class, argmax."""
    a = xtr / np.linalg.norm(xtr, axis=1, keepdims=True)
    b = xte / np.linalg.norm(xte, axis=1, keepdims=True)
    sims = b @ a.T
    top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    votes = np.zeros((len(b), ytr.max() + 1))
    for i in range(len(b)):
        np.add.at(votes[i], ytr[top[i]], np.exp(sims[i, top[i]] / temperature))
    return votes.argmax(1)


@pytest.mark.parametrize("k,temperature", [(20, 0.07), (5, 0.5), (1, 0.07)])
def test_knn_accuracy__equals_numpy_and_sklearn_cosine_knn(k, temperature):
    x, y = _gaussian_classes(15, 60)
    xt, yt = _gaussian_classes(16, 50)
    acc = knn_accuracy(x, y, xt, yt, k=k, temperature=temperature)
    ours = float((_knn_reference(x, y, xt, k, temperature) == yt).mean())
    sk = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute",
                              weights=lambda dist: np.exp((1.0 - dist) / temperature)).fit(x, y)
    theirs = float((sk.predict(xt) == yt).mean())
    assert 0.5 < ours < 0.99
    assert acc == ours
    assert acc == theirs


# =========================================================================== 5. weight decay groups


def test_param_groups__decay_exactly_the_matrices_but_not_the_mask_token():
    model = build_model(tiny_image_recipe())
    decay, no_decay = param_groups(model, 0.05)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.05, 0.0)
    names = {id(p): n for n, p in model.named_parameters()}
    dec = [names[id(p)] for p in decay["params"]]
    nodec = [names[id(p)] for p in no_decay["params"]]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(dec + nodec) == sorted(trainable)  # every trainable parameter exactly once
    assert len(set(dec + nodec)) == len(dec) + len(nodec)
    params = dict(model.named_parameters())
    assert set(dec) == {n for n in trainable if params[n].ndim >= 2 and n != "predictor.mask_token"}
    layer_norms = {f"{m}.{p}" for m, mod in model.named_modules() if isinstance(mod, torch.nn.LayerNorm)
                   and not m.startswith("target.") for p in ("weight", "bias")}
    biases = {n for n in trainable if n.endswith(".bias")}
    assert layer_norms and layer_norms <= set(trainable)
    assert set(nodec) == (layer_norms | biases | {"predictor.mask_token"})
    assert not any(n.startswith("target.") for n in dec + nodec)
    assert all(not p.requires_grad for n, p in model.named_parameters() if n.startswith("target."))
    # the matrices, by name: the patch conv, qkv / proj / MLP weights of both transformers, predictor in / out
    block = ["attn.qkv.weight", "attn.proj.weight", "mlp.0.weight", "mlp.2.weight"]
    assert sorted(dec) == sorted(["context.tokenizers.image.proj.weight", "predictor.embed.weight", "predictor.out.weight"]
                                 + [f"context.encoder.blocks.0.{w}" for w in block]
                                 + [f"predictor.transformer.blocks.0.{w}" for w in block])


# =========================================================================== 6. predictor blocks


def _tiny_predictor() -> Predictor:
    torch.manual_seed(0)
    pred = Predictor(TINY_MODEL, {"image": sincos_embed}).eval()
    with torch.no_grad():  # weights of order 1: at init (std 0.02) the queries barely read the context
        for p in pred.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return pred


def test_predictor__each_target_block_is_predicted_in_its_own_sequence():
    pred = _tiny_predictor()
    g = torch.Generator().manual_seed(17)
    context = torch.randn(2, 3, 8, generator=g)
    ctx_coords = torch.tensor([[[0.0, 0], [0, 1], [1, 0]], [[1.0, 1], [2, 0], [0, 2]]])
    tgt_coords = torch.randint(0, 4, (2, 3, 2, 2), generator=g).float()  # [B, M=3, Nt=2, 2]
    with torch.no_grad():
        base = pred(context, ctx_coords, tgt_coords)
        # reference: each block alone (M = 1) gives the same predictions as inside the batch of blocks
        for j in range(3):
            torch.testing.assert_close(base[:, j], pred(context, ctx_coords, tgt_coords[:, j:j + 1])[:, 0],
                                       rtol=1e-6, atol=1e-6)
        moved = tgt_coords.clone()
        moved[:, 1] += torch.tensor([5.0, 7.0])  # block 1 elsewhere
        out = pred(context, ctx_coords, moved)
        for i in (0, 2):
            torch.testing.assert_close(out[:, i], base[:, i], rtol=1e-6, atol=1e-6)
        assert (out[:, 1] - base[:, 1]).abs().min() > 1e-4  # every query of the moved block changed
        other = context.clone()
        other[0] += torch.randn(3, 8, generator=g)  # sample 0's context only
        out = pred(other, ctx_coords, tgt_coords)
        assert (out[0] - base[0]).abs().amin(-1).min() > 1e-4  # every query of every block of sample 0
        torch.testing.assert_close(out[1], base[1], rtol=1e-6, atol=1e-6)


# =========================================================================== 7. selects_tokens


def test_backbone_embed__selected_point_groups_equal_gathering_the_full_embedding():
    torch.manual_seed(0)
    cfg = ModelConfig(dim=16, depth=1, heads=2)
    tok = PointGroupTokenizer(in_channels=3, dim=16, num_groups=8, group_size=8, width=16)
    assert tok.selects_tokens is True
    net = Backbone({"pointcloud": tok}, cfg, {"pointcloud": point_pos_embed("mlp", 16)}).eval()
    calls = []
    tok.register_forward_pre_hook(lambda mod, args: calls.append(len(args)))
    clouds = torch.rand(2, 64, 3, generator=torch.Generator().manual_seed(18)) * 2 - 1
    keep = torch.tensor([[6, 0, 3, 5, 1], [2, 7, 4, 0, 6]])
    with torch.no_grad():
        full, full_coords = net.embed(clouds, "pointcloud")
        part, part_coords = net.embed(clouds, "pointcloud", keep)
        assert calls == [1, 2]  # the tokenizer was really asked for the kept groups only
        torch.testing.assert_close(part, gather_tokens(full, keep), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(part_coords, gather_tokens(full_coords, keep), rtol=0, atol=0)
        feats, _ = net(clouds, "pointcloud", keep)
        torch.testing.assert_close(feats, net.encoder(gather_tokens(full, keep)), rtol=1e-6, atol=1e-6)


# =========================================================================== 8. resume


def _with_sources(recipe: Recipe, names: list[str], **changes) -> Recipe:
    by_name = {s.modality: s for s in recipe.sources}
    return dataclasses.replace(recipe, sources=tuple(dataclasses.replace(by_name[n], **changes) for n in names))


@pytest.mark.parametrize("now", [["audio", "timeseries"], ["image", "audio"], ["audio"],
                                 ["audio", "image", "timeseries"]], ids="+".join)
def test_check_resumable__mixed_run_with_other_sources_is_refused(now, tmp_path):
    base = load_recipe(MIXED_RECIPE)
    saved = recipe_to_dict(_with_sources(base, ["audio", "image"]))
    with pytest.raises(TrainingError, match=rf"trained on the sources \['audio', 'image'\], not "
                                            rf"\[{', '.join(repr(m) for m in now)}\]"):
        _check_resumable(saved, _with_sources(base, now), tmp_path / "last.pt")


def test_check_resumable__mixed_run_with_the_same_sources_resumes(tmp_path):
    base = load_recipe(MIXED_RECIPE)
    saved = recipe_to_dict(_with_sources(base, ["audio", "image"]))
    assert _check_resumable(saved, _with_sources(base, ["audio", "image"]), tmp_path / "last.pt") is None
    # where the data lie is not part of the architecture
    assert _check_resumable(saved, _with_sources(base, ["audio", "image"], path="elsewhere/"),
                            tmp_path / "last.pt") is None
    # the same sources with another model width are still refused, by section
    wider = dataclasses.replace(_with_sources(base, ["audio", "image"]),
                                model=dataclasses.replace(base.model, dim=base.model.dim * 2))
    with pytest.raises(TrainingError, match="different 'model' section"):
        _check_resumable(saved, wider, tmp_path / "last.pt")
