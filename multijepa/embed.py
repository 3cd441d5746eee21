"""File -> vector with a trained (or random-init) target encoder, rebuilt from a checkpoint alone.

>>> import multijepa
>>> model = multijepa.load("runs/image/last.pt")  # doctest: +SKIP
>>> model.embed(["cat.jpg", "dog.png"]).shape  # doctest: +SKIP
(2, 192)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from multijepa.checkpoint import load_checkpoint
from multijepa.core.jepa import Backbone, build_model
from multijepa.datasets.files import INPUT_NDIM, load_input
from multijepa.datasets.readers import modality_of
from multijepa.errors import DecodeError, MultijepaError
from multijepa.recipe import Recipe, apply_overrides, recipe_from_dict, recipe_to_dict
from multijepa.train import resolve_device

Item = Union[str, Path, torch.Tensor]


# Modalities whose files embed as several windows, and the seconds between window starts.
WINDOW_HOP_SECONDS: dict[str, Callable[[Recipe], float]] = {
    "audio": lambda r: r.audio.window_hop_samples / r.audio.sample_rate,
}


class _Files(Dataset):
    """Item i as a stack of windows [W, *input shape]; W = 1 for a fixed-size input."""

    def __init__(self, items: Sequence[Item], recipe: Recipe):
        self.items, self.recipe = items, recipe

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> torch.Tensor:
        item = self.items[i]
        x = item if isinstance(item, torch.Tensor) else load_input(str(item), self.recipe)
        ndim = INPUT_NDIM[self.recipe.modality]
        if x.ndim == ndim:
            return x.unsqueeze(0)
        if x.ndim == ndim + 1 and len(x) > 0:
            return x
        raise MultijepaError(f"item {i}: a tensor of shape {tuple(x.shape)}, but a {self.recipe.modality} model "
                             f"takes {ndim}-d inputs (or a stack of windows, {ndim + 1}-d)")


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

    def with_overrides(self, overrides: Sequence[str]) -> "Embedder":
        """The same encoder reading inputs with some recipe keys changed, e.g. other audio windows.

        Only keys that leave the weights' shapes alone make sense here (``audio.embed_window_seconds``,
        ``audio.embed_hop_seconds``); the changed recipe is validated like a recipe file.

        >>> model.with_overrides(["audio.embed_window_seconds=2"]).embed(["long.wav"])  # doctest: +SKIP
        """
        if not overrides:
            return self
        raw = apply_overrides(recipe_to_dict(self.recipe), list(overrides))
        return Embedder(self.encoder, recipe_from_dict(raw, f"the checkpoint's recipe with {' '.join(overrides)}"),
                        str(self.device))

    @property
    def dim(self) -> int:
        return self.recipe.model.dim

    @property
    def windowed(self) -> bool:
        """Whether a file may embed as several windows (audio)."""
        return self.recipe.modality in WINDOW_HOP_SECONDS

    @property
    def window_hop_seconds(self) -> float:
        """Seconds between the starts of consecutive windows (0 for modalities without windows)."""
        return WINDOW_HOP_SECONDS[self.recipe.modality](self.recipe) if self.windowed else 0.0

    @torch.no_grad()
    def embed(self, items: Sequence[Item], tokens: bool = False, windows: bool = False, batch_size: int = 64,
              num_workers: int = 0) -> Union[np.ndarray, list[np.ndarray]]:
        """Embed files (paths) or preprocessed input tensors.

        A long audio file is covered by windows (``audio.embed_window_seconds`` every
        ``audio.embed_hop_seconds``); a shorter one is one window of its own length, padded to whole
        time patches.

        Args:
            items: paths of this model's modality, or tensors shaped like one model input (or a
                stack of windows, as ``load_input`` gives for audio).
            tokens: per-token features instead of the mean over tokens.
            windows: one result per window instead of the mean over a file's windows.
            batch_size: inputs (windows) per forward pass.
            num_workers: DataLoader workers decoding files.

        Returns:
            Without ``windows``: float32 array [N, D] (mean over tokens, then windows), or [N, T, D]
            with ``tokens`` (then every item must fit one window). With ``windows``: a list of N
            arrays [W_i, D] (or [W_i, T, D] with ``tokens``), one row per window.

        >>> model.embed(["long.wav"], windows=True)[0].shape  # doctest: +SKIP
        (19, 192)
        """
        items = list(items)
        for item in items:
            if not isinstance(item, torch.Tensor):
                kind = modality_of(item)
                if kind != self.recipe.modality:
                    raise DecodeError(f"{item}: a {kind} file, but this model was trained on "
                                      f"{self.recipe.modality}; pass a {kind} checkpoint")
        if not items:
            return [] if windows else np.zeros((0, self.dim), dtype=np.float32)
        loader = DataLoader(_Files(items, self.recipe), batch_size=None, num_workers=num_workers)
        per_item: list[list[torch.Tensor]] = [[] for _ in items]
        pending: list[tuple[int, torch.Tensor]] = []  # (item, windows) waiting for one forward pass

        def flush() -> None:
            feats, _ = self.encoder(torch.cat([w for _, w in pending]).to(self.device))
            feats = (feats if tokens else feats.mean(1)).float().cpu()
            for (i, w), f in zip(pending, feats.split([len(w) for _, w in pending])):
                per_item[i].append(f)
            pending.clear()

        for i, x in enumerate(loader):
            if tokens and not windows and len(x) > 1:
                what = f"item {i}" if isinstance(items[i], torch.Tensor) else str(items[i])
                raise MultijepaError(f"{what}: spans {len(x)} windows; ask for tokens per window "
                                     f"(windows=True, or --windows on the command line)")
            for start in range(0, len(x), batch_size):
                chunk = x[start:start + batch_size]
                full = pending and sum(len(w) for _, w in pending) + len(chunk) > batch_size
                if full or (pending and pending[0][1].shape[1:] != chunk.shape[1:]):  # short audio: own length
                    flush()
                pending.append((i, chunk))
        if pending:
            flush()
        per_window = [torch.cat(parts) for parts in per_item]
        if windows:
            return [f.numpy() for f in per_window]
        return torch.stack([f.mean(0) if not tokens else f[0] for f in per_window]).numpy()


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
        import yaml

        if (yaml.safe_load(recipe_file.read_text()) or {}).get("modality") != modality:
            continue
        if best is None or ckpt.stat().st_mtime > best.stat().st_mtime:
            best = ckpt
    return best


def write_embeddings(files: Sequence[str], vectors: Union[np.ndarray, list[np.ndarray]], out: Optional[str],
                     window_hop_seconds: float = 0.0) -> None:
    """Save to .npy (one array) or .jsonl (one {"file", "embedding"} line per file); stdout when out is None.

    ``vectors`` as a list (``embed(windows=True)``) holds one [W_i, ...] array per file: .npy then
    stacks them to [N, W, ...] (every file must have W windows) and JSON lines get one line per
    window with its index and start time, ``{"file", "window", "start_s", "embedding"}``.
    """
    windowed = isinstance(vectors, list)
    if out and not out.endswith((".npy", ".jsonl")):
        raise MultijepaError(f"--out {out}: use a .npy or .jsonl file name")
    if out and out.endswith(".npy"):
        if windowed:
            shapes = sorted({v.shape for v in vectors})
            if len(shapes) > 1:
                raise MultijepaError(f"--out {out}: the files give arrays of different shapes ({shapes[0]} to "
                                     f"{shapes[-1]}: numbers of windows, or tokens of short audio), which one .npy "
                                     f"array cannot hold; write .jsonl instead")
            vectors = np.stack(vectors) if vectors else np.zeros((0,), dtype=np.float32)
        np.save(out, vectors)
        return
    if windowed:
        rows = ({"file": f, "window": k, "start_s": round(k * window_hop_seconds, 6),
                 "embedding": np.round(w, 6).tolist()} for f, v in zip(files, vectors) for k, w in enumerate(v))
    else:
        rows = ({"file": f, "embedding": np.round(v, 6).tolist()} for f, v in zip(files, vectors))
    lines = (json.dumps(r) for r in rows)
    if out:
        Path(out).write_text("".join(line + "\n" for line in lines))
    else:
        for line in lines:
            print(line)
