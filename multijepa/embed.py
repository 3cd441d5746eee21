"""File -> vector with a trained (or random-init) target encoder, rebuilt from a checkpoint alone.

>>> import multijepa
>>> model = multijepa.load("runs/image/last.pt")  # doctest: +SKIP
>>> model.embed(["cat.jpg", "dog.png"]).shape  # doctest: +SKIP
(2, 192)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader, Dataset

from multijepa.checkpoint import load_checkpoint
from multijepa.core.jepa import Backbone, build_model
from multijepa.datasets.files import load_input
from multijepa.datasets.readers import EXTENSIONS, modality_of
from multijepa.errors import DecodeError, MultijepaError
from multijepa.recipe import Recipe, recipe_from_dict
from multijepa.train import resolve_device

Item = Union[str, Path, torch.Tensor]


class _Files(Dataset):
    def __init__(self, items: Sequence[Item], recipe: Recipe):
        self.items, self.recipe = items, recipe

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> torch.Tensor:
        item = self.items[i]
        if isinstance(item, torch.Tensor):
            return item
        return load_input(str(item), self.recipe)


class Embedder:
    """A frozen encoder with the recipe that says how to read its inputs.

    Args:
        encoder: the target (EMA) encoder of a JEPA.
        recipe: the resolved recipe it was trained with.
        device: "auto", "cpu" or "cuda[:N]".
    """

    def __init__(self, encoder: Backbone, recipe: Recipe, device: str = "auto"):
        self.recipe = recipe
        self.device = resolve_device(device)
        self.encoder = encoder.to(self.device).eval()

    @classmethod
    def from_checkpoint(cls, path: Union[str, Path], device: str = "auto") -> "Embedder":
        state = load_checkpoint(path)
        recipe = recipe_from_dict(state["recipe"], f"{path} (its saved recipe)")
        model = build_model(recipe)
        model.load_state_dict(state["model"])
        return cls(model.target, recipe, device)

    @classmethod
    def random_init(cls, recipe: Recipe, seed: int = 0, device: str = "auto") -> "Embedder":
        """The same architecture at initialisation: the baseline a probe compares against."""
        torch.manual_seed(seed)
        return cls(build_model(recipe).target, recipe, device)

    @property
    def dim(self) -> int:
        return self.recipe.model.dim

    @torch.no_grad()
    def embed(self, items: Sequence[Item], tokens: bool = False, batch_size: int = 64,
              num_workers: int = 0) -> np.ndarray:
        """Embed files (paths) or preprocessed input tensors.

        Args:
            items: paths of this model's modality, or tensors shaped like one model input.
            tokens: return per-token features [N, T, D] instead of the pooled mean [N, D].
            batch_size: inputs per forward pass.
            num_workers: DataLoader workers decoding files.

        Returns:
            float32 array [N, D] (pooled) or [N, T, D] (tokens).
        """
        items = list(items)
        for item in items:
            # By extension membership, not modality_of: some extensions (.npy) belong to several modalities.
            if not isinstance(item, torch.Tensor) and Path(item).suffix.lower() not in EXTENSIONS[self.recipe.modality]:
                kind = modality_of(item)  # raises for a type no modality reads
                raise DecodeError(f"{item}: a {kind} file, but this model was trained on "
                                  f"{self.recipe.modality}; pass a {kind} checkpoint")
        if not items:
            return np.zeros((0, self.dim), dtype=np.float32)
        loader = DataLoader(_Files(items, self.recipe), batch_size=batch_size, num_workers=num_workers)
        out = []
        for batch in loader:
            feats, _ = self.encoder(batch.to(self.device))
            out.append((feats if tokens else feats.mean(1)).float().cpu())
        return torch.cat(out).numpy()


def load(path: Union[str, Path], device: str = "auto") -> Embedder:
    """Load a checkpoint for embedding (the Python API's ``multijepa.load``)."""
    return Embedder.from_checkpoint(path, device)


def find_latest_checkpoint(modality: str, runs: Union[str, Path] = "runs") -> Optional[Path]:
    """The newest ``runs/*/last.pt`` whose run recipe is of ``modality``, or None."""
    best = None
    for ckpt in Path(runs).glob("*/last.pt"):
        recipe_file = ckpt.parent / "recipe.yaml"
        if not recipe_file.exists():
            continue
        if (yaml.safe_load(recipe_file.read_text()) or {}).get("modality") != modality:
            continue
        if best is None or ckpt.stat().st_mtime > best.stat().st_mtime:
            best = ckpt
    return best


def write_embeddings(files: Sequence[str], vectors: np.ndarray, out: Optional[str]) -> None:
    """Save to .npy (one array) or .jsonl (one {"file", "embedding"} line per file); stdout when out is None."""
    if out and out.endswith(".npy"):
        np.save(out, vectors)
        return
    lines = (json.dumps({"file": f, "embedding": np.round(v, 6).tolist()}) for f, v in zip(files, vectors))
    if out:
        if not out.endswith(".jsonl"):
            raise MultijepaError(f"--out {out}: use a .npy or .jsonl file name")
        Path(out).write_text("".join(line + "\n" for line in lines))
    else:
        for line in lines:
            print(line)
