"""Fine-tuning: a checkpoint's encoder and a linear head trained together on labels (``multijepa finetune``).

The labelled data, its split and its seed are those of ``multijepa probe``, so the two numbers are
comparable: the same train and test samples for the same seed.

>>> from multijepa.finetune import finetune
>>> finetune("labelled/", "runs/image/last.pt", epochs=10)  # doctest: +SKIP
{'accuracy': 0.93, 'train_accuracy': 0.99, 'n_train': 400, 'n_test': 100, 'epochs': 10, 'seconds': 41.2, ...}
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from multijepa.core.jepa import Backbone, cosine_schedule, pool_tokens
from multijepa.datasets.files import FileDataset, FileIndex, valid_mask
from multijepa.embed import Embedder
from multijepa.errors import MultijepaError, TrainingError
from multijepa.evaluate import labelled_samples, model_to_score, stratified_split
from multijepa.recipe import Recipe
from multijepa.train import autocast

__all__ = ["Classifier", "LabelledSplit", "finetune", "finetune_model", "split_labelled"]


@dataclass
class LabelledSplit:
    """The labelled samples of DATA (and of a separate test set), split as ``probe`` splits them.

    ``sets``: (samples, the recipe reading them) for DATA and, with a test set, for it (read with the
    modality's test split); ``labels`` int [S]: every set's samples in order, numbered by ``classes``
    (sorted names), the array ``probe`` builds; ``train``, ``test``: indices into ``labels``.
    """

    sets: list[tuple[FileIndex, Recipe]]
    labels: np.ndarray
    classes: list[str]
    train: np.ndarray
    test: np.ndarray


def split_labelled(recipe: Recipe, data: str, test_data: Optional[str] = None, test_fraction: float = 0.2,
                   seed: int = 0) -> LabelledSplit:
    """DATA's samples for training and TEST_DATA's for testing, or a stratified split of DATA
    (``stratified_split(labels, test_fraction, seed)``, as ``probe``)."""
    sets = [labelled_samples(recipe, data, False, "finetuning")]
    if test_data is not None:
        sets.append(labelled_samples(recipe, test_data, True, "finetuning"))
    names = [index.classes[i] for index, _ in sets for i in index.labels]
    classes = sorted(set(names))
    labels = np.array([classes.index(n) for n in names])
    if test_data is None:
        train, test = stratified_split(labels, test_fraction, seed)
    else:
        train, test = np.arange(len(sets[0][0].files)), np.arange(len(sets[0][0].files), len(labels))
    for part, which in ((train, "training"), (test, "test")):
        if not len(part):
            raise MultijepaError(f"{data}: the split leaves no {which} samples ({len(labels)} samples in "
                                 f"{len(classes)} classes, test fraction {test_fraction}); give each class at "
                                 f"least two samples, change --test-fraction, or pass a test set (--test)")
    return LabelledSplit(sets, labels, classes, train, test)


class Classifier(nn.Module):
    """An encoder and a linear head: a batch of one modality -> class logits [B, classes].

    Features are the mean of the encoder's output over each input's real tokens [B, D] (as ``embed``
    pools); the head is LayerNorm + Linear (the pooled mean of normalised tokens is not itself
    normalised; MAE's fine-tuning head does the same).

    >>> from multijepa.recipe import Recipe
    >>> from multijepa.train import build_model
    >>> classifier = Classifier(build_model(Recipe()).target, Recipe(), ["cat", "dog"])
    >>> classifier(torch.zeros(2, 3, 32, 32)).shape  # two 32 px RGB images -> two classes' logits
    torch.Size([2, 2])
    """

    def __init__(self, encoder: Backbone, recipe: Recipe, classes: list[str]):
        super().__init__()
        self.encoder, self.recipe, self.classes = encoder, recipe, list(classes)
        self.head = nn.Sequential(nn.LayerNorm(encoder.dim), nn.Linear(encoder.dim, len(classes)))
        nn.init.normal_(self.head[1].weight, std=0.01)
        nn.init.zeros_(self.head[1].bias)

    def features(self, inputs: torch.Tensor) -> torch.Tensor:
        """Stacked model inputs [B, ...] -> pooled features [B, D]."""
        valid = valid_mask(inputs, self.recipe)
        tokens, _ = self.encoder(inputs, self.recipe.modality, real=valid)
        return pool_tokens(tokens, valid)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Stacked model inputs [B, ...] -> logits [B, classes]."""
        return self.head(self.features(inputs))


def _stack(samples: list[dict]) -> dict:
    """FileDataset samples -> {"input": [B, ...], "label": long [B], "bad": messages of skipped files}."""
    return {"input": torch.stack([s["input"] for s in samples]), "label": torch.tensor([s["label"] for s in samples]),
            "bad": [b for s in samples for b in s["bad"]]}


def _check_options(epochs, lr, encoder_lr_scale, weight_decay, batch_size, num_workers, test_fraction, has_test):
    rules = [
        (isinstance(epochs, int) and epochs >= 1, f"epochs={epochs} (--epochs): must be a whole number, at least 1"),
        (math.isfinite(lr) and lr > 0, f"lr={lr} (--lr): the head's learning rate must be positive, e.g. 1e-3"),
        (math.isfinite(encoder_lr_scale) and encoder_lr_scale >= 0,
         f"encoder_lr_scale={encoder_lr_scale} (--encoder-lr-scale): must be 0 (a frozen encoder: a linear head "
         f"trained on frozen features) or positive (the encoder learns at lr times it, e.g. 0.1)"),
        (math.isfinite(weight_decay) and weight_decay >= 0,
         f"weight_decay={weight_decay} (--weight-decay): must be 0 or positive, e.g. 0.05"),
        (isinstance(batch_size, int) and batch_size >= 1, f"batch_size={batch_size} (--batch-size): must be a whole "
                                                           f"number, at least 1"),
        (num_workers >= 0, f"num_workers={num_workers} (--workers): must be 0 (decode in this process) or more"),
        (has_test or 0 < test_fraction < 1,
         f"test_fraction={test_fraction} (--test-fraction): must be between 0 and 1, e.g. 0.2, or pass --test"),
    ]
    for ok, message in rules:
        if not ok:
            raise MultijepaError(message)


def finetune(data: str, checkpoint: Optional[str], test_data: Optional[str] = None, test_fraction: float = 0.2,
             seed: int = 0, epochs: int = 10, lr: float = 1e-3, encoder_lr_scale: float = 0.1,
             weight_decay: float = 0.05, batch_size: int = 32, device: str = "auto", precision: str = "auto",
             num_workers: int = 2, modality: Optional[str] = None, random_init: bool = False,
             progress: bool = False) -> dict:
    """Fine-tune a checkpoint's target encoder with a linear head on labelled data; score it on held-out data.

    ``data``, ``test_data``, ``test_fraction``, ``seed``, ``modality`` and ``random_init`` mean what they
    mean for :func:`multijepa.evaluate.probe`: the same samples, split and labels for the same seed.
    The checkpoint is read, never written; the encoder trained is a copy.

    Args:
        data: a folder with one sub-folder per class, or a data file with labels inside (a .ts file).
        checkpoint: a ``last.pt`` or export folder (with ``random_init``: the recipe it gives).
        test_data: a separate labelled test set (read with the modality's test split); otherwise a
            stratified ``test_fraction`` of ``data`` is held out.
        epochs: passes over the training samples, each seen as pretraining sees it (random crops,
            windows, clips), decoded in ``num_workers`` DataLoader workers.
        lr: the head's peak learning rate; the encoder's is ``lr * encoder_lr_scale`` (0: a frozen
            encoder, which is a linear head trained on frozen features). AdamW, weight decay on
            matrices only, a warm-up over the first tenth of the steps then a cosine to 0,
            gradients clipped at norm 1.
        device, precision: as for ``pretrain`` (``auto``: bf16 autocast where the hardware has it).
        progress: a progress bar on stderr (tqdm), one step per batch.

    Returns:
        {"accuracy": test accuracy, "train_accuracy": accuracy on the training samples, "n_train",
        "n_test", "epochs", "seconds", "precision"}. Both accuracies are scored on the modality's
        deterministic embedding views; a sample of several views (audio windows, video clips) is
        classified by the head applied to the mean of its views' pooled features, the vector
        ``embed`` gives it.
    """
    _check_options(epochs, lr, encoder_lr_scale, weight_decay, batch_size, num_workers, test_fraction,
                   test_data is not None)
    model = model_to_score("finetune", data, checkpoint, random_init, seed, device, precision, modality)
    return finetune_model(model, data, test_data, test_fraction, seed, epochs, lr, encoder_lr_scale, weight_decay,
                          batch_size, num_workers, progress)[0]


def finetune_model(model: Embedder, data: str, test_data: Optional[str] = None, test_fraction: float = 0.2,
                   seed: int = 0, epochs: int = 10, lr: float = 1e-3, encoder_lr_scale: float = 0.1,
                   weight_decay: float = 0.05, batch_size: int = 32, num_workers: int = 2,
                   progress: bool = False) -> tuple[dict, Classifier]:
    """:func:`finetune` on a single-modality Embedder already loaded (its encoder is copied, not
    changed): the result and the trained :class:`Classifier`.

    >>> result, classifier = finetune_model(mj.load("runs/image/last.pt"), "labelled/")  # doctest: +SKIP
    """
    _check_options(epochs, lr, encoder_lr_scale, weight_decay, batch_size, num_workers, test_fraction,
                   test_data is not None)
    if len(model.modalities) > 1:
        raise MultijepaError(f"a model of {', '.join(model.modalities)}: fine-tune one modality, "
                             f"finetune_model(model.for_modality(name), ...)")
    t0 = time.perf_counter()
    split = split_labelled(model.recipe, data, test_data, test_fraction, seed)
    device, precision = model.device, model.precision
    # Seeded here without touching the caller's random state: the head's init and drop-path draws.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        classifier = Classifier(copy.deepcopy(model.encoder), model.recipe, split.classes).to(device)
        _train(classifier, split, data, seed, epochs, lr, encoder_lr_scale, weight_decay, batch_size, num_workers,
               device, precision, progress)
    predicted = np.concatenate([_predict(classifier, index, recipe, device, precision, batch_size, num_workers,
                                         progress) for index, recipe in split.sets])
    correct = predicted == split.labels
    return {"accuracy": float(correct[split.test].mean()), "train_accuracy": float(correct[split.train].mean()),
            "n_train": int(len(split.train)), "n_test": int(len(split.test)), "epochs": int(epochs),
            "seconds": round(time.perf_counter() - t0, 2), "precision": precision}, classifier


def _train(classifier: Classifier, split: LabelledSplit, data: str, seed: int, epochs: int, lr: float,
           encoder_lr_scale: float, weight_decay: float, batch_size: int, num_workers: int, device: torch.device,
           precision: str, progress: bool) -> None:
    """The training loop, in place on ``classifier``: augmented training samples, AdamW, cosine schedule."""
    from tqdm.auto import tqdm

    index, recipe = split.sets[0]
    # The recipe names DATA in FileDataset's errors and seeds each sample's augmentation by (seed, epoch, sample).
    recipe = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, path=data),
                                 train=dataclasses.replace(recipe.train, seed=seed))
    rows = split.train
    train_set = FileIndex([index.files[i] for i in rows], [int(split.labels[i]) for i in rows], split.classes,
                          None if index.parts is None else [index.parts[i] for i in rows])
    order = np.random.default_rng(seed)
    batches = [[(epoch, int(k)) for k in perm[s:s + batch_size]]
               for epoch in range(epochs) for perm in [order.permutation(len(rows))]
               for s in range(0, len(rows), batch_size)]
    loader = DataLoader(FileDataset(train_set, recipe, train=True), batch_sampler=batches, collate_fn=_stack,
                        num_workers=min(num_workers, len(rows)), pin_memory=device.type == "cuda",
                        generator=torch.Generator().manual_seed(seed))
    frozen = encoder_lr_scale == 0
    classifier.encoder.requires_grad_(not frozen).train(not frozen)  # frozen: no drop-path either
    groups = []
    for module, group_lr in ((classifier.encoder, lr * encoder_lr_scale), (classifier.head, lr)):
        params = [p for p in module.parameters() if p.requires_grad]
        for decay in (True, False):  # weight decay on matrices only (train.param_groups)
            chosen = [p for p in params if (p.ndim > 1) == decay]
            if chosen:
                groups.append({"params": chosen, "base_lr": group_lr, "weight_decay": weight_decay * decay})
    trained = [p for g in groups for p in g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=lr, fused=device.type in ("cpu", "cuda"))
    steps, per_epoch = len(batches), len(batches) // epochs
    warmup = steps // 10
    epoch_loss = torch.zeros((), device=device)
    bar = tqdm(total=steps, disable=not progress, desc="finetune", dynamic_ncols=True, mininterval=0.5, leave=False)
    try:
        for step, batch in enumerate(loader):
            for message in batch["bad"]:
                warnings.warn(f"skipped data that could not be read: {message}", stacklevel=3)
            scale = (step + 1) / warmup if step < warmup else cosine_schedule(step, steps, 1.0, 0.0, warmup)
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * scale
            inputs, labels = batch["input"].to(device, non_blocking=True), batch["label"].to(device)
            with autocast(precision, device):
                with torch.set_grad_enabled(not frozen):
                    features = classifier.features(inputs)
                loss = F.cross_entropy(classifier.head(features).float(), labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            epoch_loss += loss.detach()
            bar.update(1)
            if (step + 1) % per_epoch == 0:  # one host sync per epoch
                mean = epoch_loss.item() / per_epoch
                if not math.isfinite(mean):
                    raise TrainingError(f"finetuning {data}: the loss became {mean} in epoch {(step + 1) // per_epoch}"
                                        f": lower --lr (now {lr}) or --encoder-lr-scale (now {encoder_lr_scale}), "
                                        f"or use --precision fp32, and run again")
                bar.set_postfix(epoch=(step + 1) // per_epoch, loss=f"{mean:.4f}", refresh=False)
                epoch_loss.zero_()
    finally:
        bar.close()
    classifier.eval()


@torch.no_grad()
def _predict(classifier: Classifier, index: FileIndex, recipe: Recipe, device: torch.device, precision: str,
             batch_size: int, num_workers: int, progress: bool) -> np.ndarray:
    """Predicted classes int [S] of every sample of ``index``: the head on ``embed``'s pooled vector."""
    embedder = Embedder(classifier.encoder, recipe, str(device), precision)
    features = embedder.embed(list(dict.fromkeys(index.files)), batch_size=batch_size, num_workers=num_workers,
                              progress=progress)
    assert len(features) == len(index.files)
    with autocast(precision, device):
        logits = classifier.head(torch.from_numpy(features).to(device))
    return logits.float().argmax(1).cpu().numpy()
