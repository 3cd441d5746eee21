"""Frozen-feature evaluation of a labelled set: a linear probe and a kNN classifier on pooled
embeddings, and an attentive probe (learned queries attending over the frozen tokens, V-JEPA's).

>>> from multijepa.evaluate import linear_probe_accuracy
>>> import numpy as np
>>> x = np.r_[np.zeros((20, 2)), np.ones((20, 2))]; y = np.r_[np.zeros(20), np.ones(20)].astype(int)
>>> linear_probe_accuracy(x, y, x, y) == 1.0
True
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from torch import nn

from multijepa.datasets.files import FileIndex, expand_samples, list_folder
from multijepa.embed import Embedder, load
from multijepa.errors import MultijepaError
from multijepa.modalities import MODALITIES, readers_of


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Train and test indices with each class split in the same proportion."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = max(1, int(round(len(idx) * test_fraction))) if len(idx) > 1 else 0
        test.extend(idx[:k])
        train.extend(idx[k:])
    return np.sort(np.array(train, dtype=int)), np.sort(np.array(test, dtype=int))


def stratified_folds(labels: np.ndarray, folds: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(folds)]
    for c in np.unique(labels):
        for j, i in enumerate(rng.permutation(np.flatnonzero(labels == c))):
            parts[j % folds].append(int(i))
    return [np.sort(np.array(p, dtype=int)) for p in parts]


def _fit_logistic(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float, iters: int = 200) -> torch.Tensor:
    """Multinomial logistic regression by L-BFGS; returns weights [D+1, classes]."""
    xb = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    w = torch.zeros(xb.shape[1], classes, dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=iters, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xb @ w, y) + l2 * w[:-1].pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


def _predict(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1) @ w).argmax(1)


def linear_probe_accuracy(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                          l2_grid: Sequence[float] = (1e-5, 1e-4, 1e-3, 1e-2), seed: int = 0) -> float:
    """Test accuracy of a linear classifier on standardised frozen features.

    The L2 strength is chosen on a stratified 20% validation part of the training set, then the
    classifier is refitted on all training data.
    """
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    xtr = torch.tensor((x_train - mean) / std, dtype=torch.float64)
    xte = torch.tensor((x_test - mean) / std, dtype=torch.float64)
    classes = int(max(y_train.max(), y_test.max())) + 1
    ytr = torch.tensor(y_train, dtype=torch.long)
    fit, val = stratified_split(y_train, 0.2, seed)
    best_l2, best_acc = l2_grid[0], -1.0
    if len(val) and len(l2_grid) > 1:
        for l2 in l2_grid:
            w = _fit_logistic(xtr[fit], ytr[fit], classes, l2)
            acc = (_predict(w, xtr[val]) == ytr[val]).double().mean().item()
            if acc > best_acc:
                best_l2, best_acc = l2, acc
    w = _fit_logistic(xtr, ytr, classes, best_l2)
    return float((_predict(w, xte).numpy() == y_test).mean())


def knn_accuracy(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                 k: int = 20, temperature: float = 0.07) -> float:
    """Cosine kNN with similarity-weighted votes (the DINO protocol)."""
    a = F.normalize(torch.tensor(x_train, dtype=torch.float32), dim=1)
    b = F.normalize(torch.tensor(x_test, dtype=torch.float32), dim=1)
    classes = int(max(y_train.max(), y_test.max())) + 1
    k = min(k, len(a))
    sims, idx = (b @ a.T).topk(k, dim=1)
    votes = torch.zeros(len(b), classes).scatter_add_(1, torch.tensor(y_train)[idx], (sims / temperature).exp())
    return float((votes.argmax(1).numpy() == y_test).mean())


ATTENTIVE_MIN_STEPS = 1000  # the fewest optimizer steps an attentive probe trains for (see attentive_probe_accuracy)


class AttentiveProbe(nn.Module):
    """Learned queries cross-attend over a sample's frozen tokens; a linear head classifies the result.

    tokens [B, T, D] and ``pad`` bool [B, T] (True: a padding slot) -> logits [B, classes]. The
    pooler is V-JEPA's: layer-normed keys and values, one multi-head cross-attention, a residual MLP.
    """

    def __init__(self, dim: int, classes: int, queries: int = 1):
        super().__init__()
        heads = next(h for h in (16, 12, 8, 6, 4, 3, 2, 1) if dim % h == 0 and dim // h >= 16 or h == 1)
        self.query = nn.Parameter(torch.randn(1, queries, dim) * 0.02)
        self.norm_kv, self.norm = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.head = nn.Linear(queries * dim, classes)

    def forward(self, tokens: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(tokens, pad).flatten(1))

    def pool(self, tokens: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        """``attn(query, norm_kv(tokens), norm_kv(tokens))`` followed by the residual MLP: [B, Q, D].

        Computed without projecting every token to a key and a value. With linear key and value maps,
        a query's logit q . (W_k n_t + b_k) is (W_k^T q) . n_t plus a constant that the softmax drops,
        and sum_t a_t (W_v n_t + b_v) is W_v (sum_t a_t n_t) + b_v; likewise for the layer norm's own
        scale and shift. So the tokens are read twice, against Q x heads vectors, instead of being
        multiplied by two D x D matrices: about D / heads times less work on long token sets.
        """
        b, _, d = tokens.shape
        q_count, heads = self.query.shape[1], self.attn.num_heads
        wq, wk, wv = self.attn.in_proj_weight.chunk(3)
        bq, _, bv = self.attn.in_proj_bias.chunk(3)
        n = F.layer_norm(tokens, (d,), eps=self.norm_kv.eps)  # the layer norm without its scale and shift
        gain, shift = self.norm_kv.weight, self.norm_kv.bias
        q = (self.query[0] @ wq.T + bq).view(q_count, heads, d // heads) * (d // heads) ** -0.5
        look = torch.einsum("qhe,hed->qhd", q, wk.view(heads, d // heads, d)) * gain  # each query-head in token space
        logits = (n @ look.reshape(q_count * heads, d).T).masked_fill(pad[:, :, None], float("-inf"))
        seen = torch.einsum("btk,btd->bkd", logits.softmax(1), n) * gain + shift  # [B, Q x heads, D]
        values = torch.einsum("bqhd,hed->bqhe", seen.view(b, q_count, heads, d), wv.view(heads, d // heads, d))
        x = self.attn.out_proj(values.reshape(b, q_count, d) + bv)
        return x + self.mlp(self.norm(x))


def _fit_attentive(tokens: torch.Tensor, pad: torch.Tensor, y: torch.Tensor, rows: torch.Tensor, classes: int,
                   lr: float, steps: int, seed: int, batch_size: int = 64) -> AttentiveProbe:
    """Train an :class:`AttentiveProbe` on the samples ``rows`` for ``steps`` AdamW steps (one-cycle
    schedule, shuffled epochs); a batch gathers its rows, so no copy of the token sets is made."""
    torch.manual_seed(seed)
    model = AttentiveProbe(tokens.shape[-1], classes).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    done = 0
    while done < steps:
        for idx in rows[torch.randperm(len(rows), generator=g)].split(batch_size):
            loss = F.cross_entropy(model(tokens[idx], pad[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            done += 1
            if done == steps:
                break
    return model


@torch.no_grad()
def _attentive_predict(model: AttentiveProbe, tokens: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    model.eval()
    return torch.cat([model(t, p).argmax(1) for t, p in zip(tokens.split(256), pad.split(256))])


def attentive_probe_accuracy(tokens_train: np.ndarray, pad_train: np.ndarray, y_train: np.ndarray,
                             tokens_test: np.ndarray, pad_test: np.ndarray, y_test: np.ndarray, seed: int = 0,
                             epochs: int = 20, min_steps: Optional[int] = None, batch_size: int = 64,
                             lr_grid: Sequence[float] = (3e-3, 1e-3)) -> float:
    """Test accuracy of an attentive probe on frozen tokens [S, T, D] (``pad`` bool [S, T]: padding).

    It trains for ``epochs`` passes or ``min_steps`` optimizer steps, whichever is more (a cross-
    attention pooler needs several hundred steps to learn where to look, however small the set). The
    learning rate is chosen on a stratified 20% validation part of the training set, as the linear
    probe chooses its L2; the probe is then retrained on all of it.
    """
    xtr, ptr = torch.as_tensor(tokens_train, dtype=torch.float32), torch.as_tensor(pad_train, dtype=torch.bool)
    ytr = torch.as_tensor(y_train, dtype=torch.long)
    classes = int(max(y_train.max(), y_test.max())) + 1
    steps = max(epochs * -(-len(ytr) // batch_size), ATTENTIVE_MIN_STEPS if min_steps is None else min_steps)
    fit, val = (torch.as_tensor(part) for part in stratified_split(y_train, 0.2, seed))
    best_lr, best_acc = lr_grid[0], -1.0
    if len(val) and len(lr_grid) > 1:
        for lr in lr_grid:
            model = _fit_attentive(xtr, ptr, ytr, fit, classes, lr, steps, seed, batch_size)
            acc = float((_attentive_predict(model, xtr[val], ptr[val]) == ytr[val]).double().mean())
            if acc > best_acc:
                best_lr, best_acc = lr, acc
    model = _fit_attentive(xtr, ptr, ytr, torch.arange(len(ytr)), classes, best_lr, steps, seed, batch_size)
    pred = _attentive_predict(model, torch.as_tensor(tokens_test, dtype=torch.float32),
                              torch.as_tensor(pad_test, dtype=torch.bool))
    return float((pred.numpy() == y_test).mean())


def token_sets(windows: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per sample its views' tokens ([W_i, T, D], NaN rows: padding) -> (tokens [S, T_max, D] with every
    real token of a sample's views, pad bool [S, T_max], pooled [S, D]: the mean over views of each
    view's mean real token, which is what ``Embedder.embed`` returns)."""
    flat = [w.reshape(-1, w.shape[-1]) for w in windows]
    real = [~np.isnan(f).any(1) for f in flat]
    longest = max(int(r.sum()) for r in real)
    tokens = np.zeros((len(flat), longest, flat[0].shape[1]), dtype=np.float32)
    pad = np.ones((len(flat), longest), dtype=bool)
    for i, (f, r) in enumerate(zip(flat, real)):
        tokens[i, :r.sum()], pad[i, :r.sum()] = f[r], False
    pooled = np.stack([np.nanmean(w, axis=1).mean(0) for w in windows]).astype(np.float32)
    return tokens, pad, pooled


def probe_features(features: np.ndarray, labels: np.ndarray, test_fraction: float = 0.2, folds: int = 0,
                   seed: int = 0, test_index: Optional[np.ndarray] = None,
                   tokens: Optional[tuple[np.ndarray, np.ndarray]] = None) -> dict[str, float]:
    """Linear and kNN accuracy on features with labels, by a stratified split, k-fold, or a given test set;
    with ``tokens`` (tokens [S, T, D], pad [S, T], as :func:`token_sets` gives) the attentive probe's too,
    on the same splits.

    Returns:
        {"linear": accuracy, "knn": accuracy, ("attentive": accuracy,) "n_train": ..., "n_test": ...}
        (means over folds).
    """
    if test_index is not None:
        splits = [(np.setdiff1d(np.arange(len(labels)), test_index), np.asarray(test_index))]
    elif folds and folds > 1:
        parts = stratified_folds(labels, folds, seed)
        splits = [(np.concatenate(parts[:i] + parts[i + 1:]), parts[i]) for i in range(folds)]
    else:
        splits = [stratified_split(labels, test_fraction, seed)]
    lin, knn, att = [], [], []
    for tr, te in splits:
        lin.append(linear_probe_accuracy(features[tr], labels[tr], features[te], labels[te], seed=seed))
        knn.append(knn_accuracy(features[tr], labels[tr], features[te], labels[te]))
        if tokens is not None:
            x, pad = tokens
            att.append(attentive_probe_accuracy(x[tr], pad[tr], labels[tr], x[te], pad[te], labels[te], seed=seed))
    out = {"linear": float(np.mean(lin)), "knn": float(np.mean(knn))}
    if att:
        out["attentive"] = float(np.mean(att))
    return {**out, "n_train": int(len(splits[0][0])), "n_test": int(len(splits[0][1]))}


def labelled_samples(recipe, data: str, test_split: bool = False, command: str = "probing"):
    """(FileIndex with one entry per sample, files in order and samples in file order; the recipe that
    reads them) of a labelled folder or data file with labels inside; ``test_split``: the test split of a
    file that holds both (an .npz with X_train/X_test), where the modality has one. What ``probe`` and
    ``finetune`` read."""
    spec = MODALITIES[recipe.modality]
    if not os.path.exists(data):
        raise MultijepaError(f"{data}: no such folder or file; give a folder with one sub-folder per class, or a "
                             f"data file with labels inside (a .ts file)")
    if test_split and spec.test_split is not None:
        recipe = recipe.with_section(spec.name, spec.test_split(recipe.section(spec.name)))
    base = FileIndex([data], [-1]) if os.path.isfile(data) else list_folder(data, spec.extensions)
    index = expand_samples(base, recipe)
    if min(index.labels) < 0 or len(index.classes) < 2:
        raise MultijepaError(f"{data}: {command} needs labels: one sub-folder per class, or a file with class labels "
                             f"inside (a .ts file, a UCR .tsv/.txt, a wide CSV with a label column, an .npz with "
                             f"y), at least two classes")
    return index, recipe


def _embed_labelled(model, data: str, batch_size: int, num_workers: int, test_split: bool = False,
                    progress: bool = False, attentive: bool = False) -> tuple[np.ndarray, list[str], Optional[tuple]]:
    """Features and class names of every sample of a labelled folder, or of one data file with labels
    inside (a .ts file with class labels, a wide CSV with a label column); ``test_split``: read the
    test split of a file that holds both (an .npz with X_train/X_test), where the modality has one."""
    index, recipe = labelled_samples(model.recipe, data, test_split)
    if recipe is not model.recipe:
        model = model.with_recipe(recipe)
    files = list(dict.fromkeys(index.files))
    tokens = None
    if attentive:  # every view's tokens; the pooled features are computed from them, as embed pools
        tokens, pad, feats = token_sets(model.embed(files, tokens=True, windows=True, batch_size=batch_size,
                                                    num_workers=num_workers, progress=progress))
        tokens = (tokens, pad)
    else:
        feats = model.embed(files, batch_size=batch_size, num_workers=num_workers, progress=progress)
    assert len(feats) == len(index.labels)
    return feats, [index.classes[i] for i in index.labels], tokens


def _modality_of_data(data: str, modalities: tuple[str, ...]) -> str:
    """Which of a model's modalities a labelled folder or data file holds (it must be exactly one)."""
    if len(modalities) == 1:
        return modalities[0]
    if os.path.isfile(data):
        found = [m for m in readers_of(data) if m in modalities]
    else:
        suffixes = {p.suffix.lower() for p in Path(data).rglob("*") if p.is_file()}
        found = [m for m in modalities if suffixes & set(MODALITIES[m].extensions)]
    if len(found) != 1:
        raise MultijepaError(f"{data}: holds {' and '.join(found) or 'none'} of this model's modalities "
                             f"({', '.join(modalities)}); say which to probe with --modality")
    return found[0]


def model_to_score(command: str, data: str, checkpoint: Optional[str], random_init: bool, seed: int, device: str,
                   precision: str, modality: Optional[str]) -> Embedder:
    """The one-modality encoder ``probe`` and ``finetune`` score on ``data``: a checkpoint's (or the same
    architecture at random init, seeded), reading the modality ``data`` holds (or ``modality``)."""
    if checkpoint is None:
        raise MultijepaError(f"{command} needs --checkpoint PATH (with --random-init it uses that checkpoint's recipe)")
    model = load(checkpoint, device, precision)
    if random_init:
        model = Embedder.random_init(model.recipe, seed=seed, device=device, precision=precision)
    return model.for_modality(modality or _modality_of_data(data, model.modalities))


def probe(data: str, checkpoint: Optional[str] = None, random_init: bool = False, test_fraction: float = 0.2,
          folds: int = 0, seed: int = 0, device: str = "auto", batch_size: int = 256,
          num_workers: int = 2, test_data: Optional[str] = None, modality: Optional[str] = None,
          precision: str = "auto", progress: bool = False, attentive: bool = False) -> dict:
    """Embed labelled data with a checkpoint's encoder (or the same encoder at random init) and probe it.

    ``data`` is a folder with one sub-folder per class, or a data file with labels inside (a .ts
    file). With ``test_data`` (the same kinds) the probes fit on all of ``data`` and are scored on
    it; otherwise on a stratified split or k folds of ``data``. A model of several modalities is
    probed on one of them: ``modality``, or the one whose files ``data`` holds. ``attentive`` adds
    the attentive probe on the frozen tokens of every view (:func:`attentive_probe_accuracy`).

    Returns:
        {"linear": acc, "knn": acc, ("attentive": acc,) "n_train", "n_test", "seconds_embedding",
        "precision"} (the precision the features were computed in: ``precision`` resolved as in training).
    """
    model = model_to_score("probe", data, checkpoint, random_init, seed, device, precision, modality)
    t0 = time.perf_counter()
    feats, names, tokens = _embed_labelled(model, data, batch_size, num_workers, progress=progress,
                                           attentive=attentive)
    test_index = None
    if test_data is not None:
        test_feats, test_names, test_tokens = _embed_labelled(model, test_data, batch_size, num_workers,
                                                              test_split=True, progress=progress, attentive=attentive)
        test_index = np.arange(len(names), len(names) + len(test_names))
        feats, names = np.concatenate([feats, test_feats]), names + test_names
        if attentive:
            tokens = _concat_token_sets(tokens, test_tokens)
    classes = sorted(set(names))
    labels = np.array([classes.index(n) for n in names])
    t_embedded = time.perf_counter()
    result = probe_features(feats, labels, test_fraction=test_fraction, folds=folds, seed=seed, test_index=test_index,
                            tokens=tokens)
    result["seconds_embedding"] = round(t_embedded - t0, 2)
    result["seconds_probing"] = round(time.perf_counter() - t_embedded, 2)
    result["precision"] = model.precision
    return result


def _concat_token_sets(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> tuple:
    """Two (tokens [S, T, D], pad [S, T]) sets as one, padded to the longer T."""
    longest = max(a[0].shape[1], b[0].shape[1])

    def padded(x: np.ndarray, pad: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        extra = longest - x.shape[1]
        return (np.pad(x, ((0, 0), (0, extra), (0, 0))), np.pad(pad, ((0, 0), (0, extra)), constant_values=True))

    (xa, pa), (xb, pb) = padded(*a), padded(*b)
    return np.concatenate([xa, xb]), np.concatenate([pa, pb])
