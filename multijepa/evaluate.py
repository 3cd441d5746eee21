"""Frozen-feature evaluation: a linear probe and a kNN classifier on embeddings of a labelled set.

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


def probe_features(features: np.ndarray, labels: np.ndarray, test_fraction: float = 0.2, folds: int = 0,
                   seed: int = 0, test_index: Optional[np.ndarray] = None) -> dict[str, float]:
    """Linear and kNN accuracy on features with labels, by a stratified split, k-fold, or a given test set.

    Returns:
        {"linear": accuracy, "knn": accuracy, "n_train": ..., "n_test": ...} (means over folds).
    """
    if test_index is not None:
        splits = [(np.setdiff1d(np.arange(len(labels)), test_index), np.asarray(test_index))]
    elif folds and folds > 1:
        parts = stratified_folds(labels, folds, seed)
        splits = [(np.concatenate(parts[:i] + parts[i + 1:]), parts[i]) for i in range(folds)]
    else:
        splits = [stratified_split(labels, test_fraction, seed)]
    lin, knn = [], []
    for tr, te in splits:
        lin.append(linear_probe_accuracy(features[tr], labels[tr], features[te], labels[te], seed=seed))
        knn.append(knn_accuracy(features[tr], labels[tr], features[te], labels[te]))
    return {"linear": float(np.mean(lin)), "knn": float(np.mean(knn)),
            "n_train": int(len(splits[0][0])), "n_test": int(len(splits[0][1]))}


def _embed_labelled(model, data: str, batch_size: int, num_workers: int, test_split: bool = False,
                    progress: bool = False) -> tuple[np.ndarray, list[str]]:
    """Features and class names of every sample of a labelled folder, or of one data file with labels
    inside (a .ts file with class labels, a wide CSV with a label column); ``test_split``: read the
    test split of a file that holds both (an .npz with X_train/X_test), where the modality has one."""
    spec = MODALITIES[model.recipe.modality]
    if test_split and spec.test_split is not None:
        reading = spec.test_split(model.recipe.section(spec.name))
        model = model.with_recipe(model.recipe.with_section(spec.name, reading))
    recipe = model.recipe
    base = FileIndex([data], [-1]) if os.path.isfile(data) else list_folder(data, spec.extensions)
    index = expand_samples(base, recipe)  # one entry per sample, files in order, samples in file order
    if min(index.labels) < 0 or len(index.classes) < 2:
        raise MultijepaError(f"{data}: probing needs labels: one sub-folder per class, or a file with class labels "
                             f"inside (a .ts file, a UCR .tsv/.txt, a wide CSV with a label column, an .npz with "
                             f"y), at least two classes")
    feats = model.embed(list(dict.fromkeys(index.files)), batch_size=batch_size, num_workers=num_workers,
                        progress=progress)
    assert len(feats) == len(index.labels)
    return feats, [index.classes[i] for i in index.labels]


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


def probe(data: str, checkpoint: Optional[str] = None, random_init: bool = False, test_fraction: float = 0.2,
          folds: int = 0, seed: int = 0, device: str = "auto", batch_size: int = 256,
          num_workers: int = 2, test_data: Optional[str] = None, modality: Optional[str] = None,
          precision: str = "auto", progress: bool = False) -> dict:
    """Embed labelled data with a checkpoint's encoder (or the same encoder at random init) and probe it.

    ``data`` is a folder with one sub-folder per class, or a data file with labels inside (a .ts
    file). With ``test_data`` (the same kinds) the probes fit on all of ``data`` and are scored on
    it; otherwise on a stratified split or k folds of ``data``. A model of several modalities is
    probed on one of them: ``modality``, or the one whose files ``data`` holds.

    Returns:
        {"linear": acc, "knn": acc, "n_train", "n_test", "seconds_embedding", "precision"} (the
        precision the features were computed in: ``precision`` resolved as in training).
    """
    if checkpoint is None:
        raise MultijepaError("probe needs --checkpoint PATH (with --random-init it uses that checkpoint's recipe)")
    model = load(checkpoint, device, precision)
    if random_init:
        model = Embedder.random_init(model.recipe, seed=seed, device=device, precision=precision)
    model = model.for_modality(modality or _modality_of_data(data, model.modalities))
    t0 = time.perf_counter()
    feats, names = _embed_labelled(model, data, batch_size, num_workers, progress=progress)
    test_index = None
    if test_data is not None:
        test_feats, test_names = _embed_labelled(model, test_data, batch_size, num_workers, test_split=True,
                                                 progress=progress)
        test_index = np.arange(len(names), len(names) + len(test_names))
        feats, names = np.concatenate([feats, test_feats]), names + test_names
    classes = sorted(set(names))
    labels = np.array([classes.index(n) for n in names])
    result = probe_features(feats, labels, test_fraction=test_fraction, folds=folds, seed=seed, test_index=test_index)
    result["seconds_embedding"] = round(time.perf_counter() - t0, 2)
    result["precision"] = model.precision
    return result
