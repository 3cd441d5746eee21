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
import yaml
from torch.utils.data import DataLoader, Dataset

from multijepa.checkpoint import load_checkpoint
from multijepa.core.jepa import Backbone, build_model, pool_tokens
from multijepa.datasets.files import EMBED_VIEWS, valid_mask
from multijepa.datasets.readers import modality_of, readers_of
from multijepa.errors import DecodeError, MultijepaError
from multijepa.recipe import Recipe, apply_overrides, recipe_from_dict, recipe_to_dict
from multijepa.train import resolve_device

Item = Union[str, Path, torch.Tensor]

# Modalities whose files embed as several windows of one sample, and the seconds between window starts
# (None where it differs from file to file: video clips are spread evenly over each video).
WINDOW_HOP_SECONDS: dict[str, Callable[[Recipe], Optional[float]]] = {
    "audio": lambda r: r.audio.window_hop_samples / r.audio.sample_rate,
    "video": lambda r: None,
}


class _Views(Dataset):
    """Per item, its samples' views (``EMBED_VIEWS``), decoded in DataLoader workers."""

    def __init__(self, items: Sequence[Item], recipe: Recipe):
        self.items, self.recipe = items, recipe

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> list[list[torch.Tensor]]:
        item = self.items[i]
        name = f"input {i}" if isinstance(item, torch.Tensor) else str(item)
        return EMBED_VIEWS[self.recipe.modality](item if isinstance(item, torch.Tensor) else str(item), self.recipe,
                                                 name)


def _as_is(x):
    return x


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

    @property
    def modalities(self) -> tuple[str, ...]:
        return self.recipe.modalities

    def for_modality(self, modality: str) -> "Embedder":
        """This encoder reading one of its modalities (a mixed model's audio side, say), as a
        single-modality Embedder: what ``probe`` and per-modality code use.

        >>> mj.load("runs/multimodal/last.pt").for_modality("audio").embed(["a.wav"])  # doctest: +SKIP
        """
        if self.recipe.modality == modality:
            return self
        if modality not in self.modalities:
            raise MultijepaError(f"this model was trained on {', '.join(self.modalities)}, not {modality}")
        return Embedder(self.encoder, self.recipe.source(modality), str(self.device))

    def modality_for(self, item: Item) -> str:
        """The modality of this model that reads ``item`` (a tensor: the model's only modality)."""
        if isinstance(item, torch.Tensor):
            if len(self.modalities) > 1:
                raise MultijepaError(f"a tensor given to a model of {', '.join(self.modalities)}: say which modality "
                                     f"with model.for_modality(name).embed(tensors)")
            return self.modalities[0]
        kinds = readers_of(item)  # by the modalities reading the extension, not modality_of: .npy belongs to several
        mine = [k for k in kinds if k in self.modalities]
        if not mine:
            if not kinds:
                modality_of(item)  # raises: a type no modality reads
            raise DecodeError(f"{item}: a {' or '.join(kinds)} file, but this model was trained on "
                              f"{', '.join(self.modalities)}; pass a {kinds[0]} checkpoint")
        if len(mine) > 1:
            raise DecodeError(f"{item}: {' and '.join(mine)} both read this file type; embed it with "
                              f"model.for_modality(name)")
        return mine[0]

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

    def embed(self, items: Sequence[Item], tokens: bool = False, batch_size: int = 64,
              num_workers: int = 0, windows: bool = False) -> Union[np.ndarray, list[np.ndarray]]:
        """Embed files (paths) or input tensors: one row per sample, in order.

        A file that holds many samples (a .ts file, a wide CSV, a 2-D .npy) gives one row per sample,
        in file order. A sample seen through several views (a series longer than the recipe's window,
        cut into windows) gets the mean of its views' vectors.

        A long audio file is covered by windows (``audio.embed_window_seconds`` every
        ``audio.embed_hop_seconds``); a shorter one is one window of its own length, padded to whole
        time patches. A video is seen through ``video.embed_clips`` clips spread evenly over it
        (fewer when it is too short to hold that many distinct clips), decoded one at a time.

        Args:
            items: paths of this model's modality, or tensors: a preprocessed image [C, H, W], a
                raw series [C, L] or [L] (any length; NaN = missing), or preprocessed video clips
                [C, T, H, W] or [K, C, T, H, W].
            tokens: per-token features [S, T, D] instead of the pooled mean [S, D] (one view per
                sample only; padding tokens are NaN).
            batch_size: views per forward pass.
            num_workers: DataLoader workers decoding files.
            windows: one row per view (audio window, video clip) instead of the mean over a sample's views.

        Returns:
            float32 array [S, D] (pooled) or [S, T, D] (tokens), S = samples; with ``windows`` a list
            of S arrays [W_i, D] (or [W_i, T, D] with ``tokens``), one row per window.
        """
        return self.embed_with_index(items, tokens, batch_size, num_workers, windows)[0]

    @property
    def windowed(self) -> bool:
        """Whether a file may embed as several windows of one sample (audio windows, video clips)."""
        return any(m in WINDOW_HOP_SECONDS for m in self.modalities)

    @property
    def window_hop_seconds(self) -> Optional[float]:
        """Seconds between the starts of consecutive windows (0 for modalities without windows, None
        where it differs per file)."""
        if self.recipe.modality == "mixed":
            hops = {self.for_modality(m).window_hop_seconds for m in self.modalities}
            return hops.pop() if len(hops) == 1 else None
        return WINDOW_HOP_SECONDS[self.recipe.modality](self.recipe) if self.windowed else 0.0

    @torch.no_grad()
    def embed_with_index(self, items: Sequence[Item], tokens: bool = False, batch_size: int = 64,
                         num_workers: int = 0, windows: bool = False
                         ) -> tuple[Union[np.ndarray, list[np.ndarray]], list[tuple[int, int]]]:
        """Like :meth:`embed`, plus (item number, sample number within the item) for every row."""
        items = list(items)
        kinds = [self.modality_for(item) for item in items]
        if self.recipe.modality == "mixed" or len(set(kinds)) > 1:
            return self._embed_by_modality(items, kinds, tokens, batch_size, num_workers, windows)
        loader = DataLoader(_Views(items, self.recipe), batch_size=None, num_workers=num_workers, collate_fn=_as_is)
        rows: list[tuple[int, int]] = []
        per_row: list[list[torch.Tensor]] = []  # each row's view vectors, in view order
        pending: list[tuple[int, torch.Tensor]] = []  # (row, view)

        def forward(chunk: list[tuple[int, torch.Tensor]]) -> None:
            x = torch.stack([v for _, v in chunk]).to(self.device)
            valid = valid_mask(x, self.recipe)
            feats, _ = self.encoder(x, self.recipe.modality, real=valid)
            if tokens:
                out = feats if valid is None else feats.masked_fill(~valid.unsqueeze(-1), float("nan"))
            else:
                out = pool_tokens(feats, valid)
            for (row, _), vec in zip(chunk, out.float().cpu()):
                per_row[row].append(vec)

        def flush(everything: bool) -> None:
            while pending and (everything or len(pending) >= batch_size):
                chunk = pending[:batch_size]
                del pending[:batch_size]
                shapes = [v.shape for _, v in chunk]  # views of other shapes (short audio) go on their own
                for shape in dict.fromkeys(shapes):
                    forward([c for c, s in zip(chunk, shapes) if s == shape])

        for i, samples in enumerate(loader):
            for k, views in enumerate(samples):
                if tokens and not windows and len(views) != 1:
                    raise MultijepaError(f"{items[i] if not isinstance(items[i], torch.Tensor) else f'input {i}'}: "
                                         f"sample {k + 1} is seen through {len(views)} windows; per-token features "
                                         f"need one: ask for them per window (windows=True, or --windows on "
                                         f"the command line), embed pooled vectors, or use a longer window")
                rows.append((i, k))
                per_row.append([])
                pending.extend((len(rows) - 1, v) for v in views)
            flush(everything=False)
        flush(everything=True)
        if windows:
            return [torch.stack(vs).numpy() for vs in per_row], rows
        if not rows:
            return np.zeros((0, self.dim), dtype=np.float32), rows
        return torch.stack([torch.stack(vs).mean(0) for vs in per_row]).numpy(), rows

    def _embed_by_modality(self, items: list, kinds: list[str], tokens: bool, batch_size: int, num_workers: int,
                           windows: bool) -> tuple[Union[np.ndarray, list[np.ndarray]], list[tuple[int, int]]]:
        """Each modality's items through its side of the model, rows put back in item order."""
        found: dict[tuple[int, int], object] = {}
        for m in dict.fromkeys(kinds):
            mine = [i for i, k in enumerate(kinds) if k == m]
            vectors, rows = self.for_modality(m).embed_with_index([items[i] for i in mine], tokens, batch_size,
                                                                  num_workers, windows)
            for (j, k), v in zip(rows, vectors):
                found[(mine[j], k)] = v
        rows = sorted(found)
        if windows:
            return [found[r] for r in rows], rows
        shapes = {found[r].shape for r in rows}
        if len(shapes) > 1:
            raise MultijepaError(f"per-token features of different modalities have different shapes "
                                 f"({sorted(shapes)}); embed one modality at a time")
        if not rows:
            return np.zeros((0, self.dim), dtype=np.float32), rows
        return np.stack([found[r] for r in rows]), rows


def load(path: Union[str, Path], device: str = "auto") -> Embedder:
    """Load a checkpoint for embedding (the Python API's ``multijepa.load``)."""
    return Embedder.from_checkpoint(path, device)


def find_latest_checkpoint(modalities: Union[str, Sequence[str]], runs: Union[str, Path] = "runs") -> Optional[Path]:
    """The newest ``runs/*/last.pt`` whose model reads ``modalities`` (one name, or all of several:
    a mixed run), or None."""
    wanted = {modalities} if isinstance(modalities, str) else set(modalities)
    best = None
    for ckpt in Path(runs).glob("*/last.pt"):
        recipe_file = ckpt.parent / "recipe.yaml"
        if not recipe_file.exists():
            continue
        saved = yaml.safe_load(recipe_file.read_text()) or {}
        trained = {s.get("modality") for s in saved.get("sources") or []} if saved.get("modality") == "mixed" \
            else {saved.get("modality")}
        if not wanted <= trained:
            continue
        if best is None or ckpt.stat().st_mtime > best.stat().st_mtime:
            best = ckpt
    return best


def write_embeddings(files: Sequence[str], vectors: Union[np.ndarray, list[np.ndarray]], out: Optional[str],
                     index: Optional[Sequence[int]] = None, window_hop_seconds: Optional[float] = 0.0) -> None:
    """Save to .npy (one array) or .jsonl (one {"file", "embedding"} line per row); stdout when out is None.

    ``files[i]`` names row i's file; ``index`` (rows of many-sample files) adds each row's position in
    its file. ``vectors`` as a list (``embed(windows=True)``) holds one [W_i, ...] array per row: .npy
    then stacks them to [N, W, ...] (every row must have W windows) and JSON lines get one line per
    window with its index and start time, ``{"file", "window", "start_s", "embedding"}`` (no ``start_s``
    when ``window_hop_seconds`` is None: video clips, spread evenly over each video).
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

    def rows(i: int) -> list[dict]:
        head = {"file": files[i], **({"index": int(index[i])} if index is not None else {})}
        if not windowed:
            return [{**head, "embedding": np.round(vectors[i], 6).tolist()}]
        hop = window_hop_seconds
        return [{**head, "window": k, **({} if hop is None else {"start_s": round(k * hop, 6)}),
                 "embedding": np.round(w, 6).tolist()} for k, w in enumerate(vectors[i])]

    lines = (json.dumps(r) for i in range(len(vectors)) for r in rows(i))
    if out:
        Path(out).write_text("".join(line + "\n" for line in lines))
    else:
        for line in lines:
            print(line)
