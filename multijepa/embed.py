"""File -> vector with a trained (or random-init) target encoder, rebuilt from a checkpoint alone.

>>> import multijepa
>>> model = multijepa.load("runs/image/last.pt")  # doctest: +SKIP
>>> model.embed(["cat.jpg", "dog.png"]).shape  # doctest: +SKIP
(2, 192)

Folders and file lists, as ``multijepa embed`` takes them:

>>> files = expand_inputs(["photos/", "more.txt"], model.modalities)  # doctest: +SKIP
>>> vectors, rows = model.embed_with_index(files, num_workers=2, progress=True)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader, Dataset

from multijepa.config import apply_overrides
from multijepa.core.jepa import Backbone, pool_tokens
from multijepa.datasets.files import expand_inputs, valid_mask
from multijepa.errors import DecodeError, MultijepaError
from multijepa.export import hub_download, push_to_hub, read_encoder, save_export
from multijepa.modalities import MODALITIES, modality_of, readers_of
from multijepa.recipe import Recipe, recipe_from_dict, recipe_to_dict, saved_modalities
from multijepa.train import autocast, build_model, resolve_device, resolve_precision

__all__ = ["Embedder", "check_out", "expand_inputs", "find_latest_checkpoint", "load", "rows_file",
           "write_embeddings"]

Item = Union[str, Path, torch.Tensor]


class _Views(Dataset):
    """Per item, its samples' views (the modality's ``embed_views``), decoded in DataLoader workers."""

    def __init__(self, items: Sequence[Item], recipe: Recipe):
        self.items, self.recipe = items, recipe

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Union[list[list[torch.Tensor]], MultijepaError]:
        """The item's views, or the error that names it: returned, not raised, so that a DataLoader worker
        hands the error itself back instead of a copy whose message holds the worker's traceback."""
        item = self.items[i]
        name = f"input {i}" if isinstance(item, torch.Tensor) else str(item)
        try:
            m = self.recipe.modality
            return MODALITIES[m].embed_views(item if isinstance(item, torch.Tensor) else str(item),
                                             self.recipe.section(m), name)
        except MultijepaError as e:
            return e
        except Exception as e:  # a decoder's own error type: still this input's problem, named
            return DecodeError(f"{name}: cannot be read as {self.recipe.modality} ({type(e).__name__}: {e})")


def _as_is(x):
    return x


class Embedder:
    """A frozen encoder with the recipe that says how to read its inputs.

    Args:
        encoder: the target (EMA) encoder of a JEPA.
        recipe: the resolved recipe it was trained with.
        device: "auto", "cpu" or "cuda[:N]".
        precision: "auto" (bf16 autocast where the device has native bf16 matrix products, as in
            training), "bf16" or "fp32"; the embeddings come out as float32 either way.
        provenance: where the weights come from (``step``, ``trained_from``, last ``metrics``), for
            :meth:`save_pretrained`'s config and model card.
    """

    def __init__(self, encoder: Backbone, recipe: Recipe, device: str = "auto", precision: str = "auto",
                 provenance: Optional[dict] = None):
        self.recipe = recipe
        self.provenance = dict(provenance or {})
        try:
            self.device = resolve_device(device)
        except RuntimeError as e:  # torch's word on a malformed name ("cuda:x", "gpu")
            raise MultijepaError(f"device {device!r}: {e}; use auto, cpu, cuda or cuda:N") from None
        self.precision, self.precision_reason = resolve_precision(precision, self.device)
        self.encoder = encoder.to(self.device).eval()

    @property
    def modalities(self) -> tuple[str, ...]:
        return self.recipe.modalities

    def for_modality(self, modality: str) -> "Embedder":
        """This encoder reading one of its modalities (a mixed model's audio side, say), as a
        single-modality Embedder: what ``probe`` and per-modality code use.

        >>> mj.load("runs/multimodal/last.pt").for_modality("audio").embed(["a.wav"])  # doctest: +SKIP
        """
        if self.modalities == (modality,):
            return self
        if modality not in self.modalities:
            raise MultijepaError(f"this model was trained on {', '.join(self.modalities)}, not {modality}")
        return Embedder(self.encoder, self.recipe.source(modality), str(self.device), self.precision, self.provenance)

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
    def from_checkpoint(cls, path: Union[str, Path], device: str = "auto", precision: str = "auto") -> "Embedder":
        """The target encoder of a ``last.pt`` (or milestone checkpoint), or of an export folder."""
        encoder, recipe, provenance = read_encoder(path)
        return cls(encoder, recipe, device, precision, provenance)

    def save_pretrained(self, out_dir: Union[str, Path]) -> Path:
        """Write this encoder as an export folder (``model.safetensors``, ``config.json``, ``README.md``),
        the layout the Hugging Face Hub hosts; :func:`multijepa.load` and :meth:`from_pretrained` read it.

        >>> mj.load("runs/audio/last.pt").save_pretrained("exported/audio")  # doctest: +SKIP
        """
        return save_export(self.encoder, self.recipe, out_dir, self.provenance)

    @classmethod
    def from_pretrained(cls, name: Union[str, Path], revision: Optional[str] = None, token: Optional[str] = None,
                        device: str = "auto", precision: str = "auto") -> "Embedder":
        """An export folder, or a Hugging Face Hub model repository (``"user/name"``) holding one.

        >>> Embedder.from_pretrained("user/multijepa-audio").embed(["a.wav"])  # doctest: +SKIP
        """
        return cls.from_checkpoint(hub_download(name, revision, token), device, precision)

    def push_to_hub(self, repo_id: str, token: Optional[str] = None, private: Optional[bool] = None,
                    commit_message: str = "Upload multijepa encoder") -> str:
        """Upload this encoder's export folder to a Hugging Face Hub model repository (created if
        needed); returns the commit's URL. Needs network and a token (``token`` or ``hf auth login``)."""
        return push_to_hub(self.encoder, self.recipe, self.provenance, repo_id, token, private, commit_message)

    @classmethod
    def random_init(cls, recipe: Recipe, seed: int = 0, device: str = "auto", precision: str = "auto") -> "Embedder":
        """The same architecture at initialisation: the baseline a probe compares against."""
        torch.manual_seed(seed)
        return cls(build_model(recipe).target, recipe, device, precision)

    def with_overrides(self, overrides: Sequence[str]) -> "Embedder":
        """The same encoder reading inputs with some recipe keys changed, e.g. other audio windows.

        Only keys that leave the weights' shapes alone make sense here (``audio.embed_window_seconds``,
        ``audio.embed_hop_seconds``); the changed recipe is validated like a recipe file.

        >>> model.with_overrides(["audio.embed_window_seconds=2"]).embed(["long.wav"])  # doctest: +SKIP
        """
        if not overrides:
            return self
        raw = apply_overrides(recipe_to_dict(self.recipe), list(overrides))
        return self.with_recipe(recipe_from_dict(raw, f"the checkpoint's recipe with {' '.join(overrides)}"))

    def with_recipe(self, recipe: Recipe) -> "Embedder":
        """The same encoder reading inputs as ``recipe`` says (keys that leave the weights' shapes alone)."""
        return Embedder(self.encoder, recipe, str(self.device), self.precision, self.provenance)

    @property
    def dim(self) -> int:
        return self.recipe.model.dim

    def embed(self, items: Sequence[Item], tokens: bool = False, batch_size: int = 64,
              num_workers: int = 0, windows: bool = False, progress: bool = False
              ) -> Union[np.ndarray, list[np.ndarray]]:
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
            num_workers: DataLoader workers decoding files (at most one per item is started).
            windows: one row per view (audio window, video clip) instead of the mean over a sample's views.
            progress: show a progress bar (tqdm, on stderr), one step per item.

        Returns:
            float32 array [S, D] (pooled) or [S, T, D] (tokens), S = samples; with ``windows`` a list
            of S arrays [W_i, D] (or [W_i, T, D] with ``tokens``), one row per window.
        """
        return self.embed_with_index(items, tokens, batch_size, num_workers, windows, progress)[0]

    @property
    def windowed(self) -> bool:
        """Whether a file may embed as several windows of one sample (audio windows, video clips)."""
        return any(MODALITIES[m].window_hop_seconds is not None for m in self.modalities)

    @property
    def window_hop_seconds(self) -> Optional[float]:
        """Seconds between the starts of consecutive windows (0 for modalities without windows, None
        where it differs per file)."""
        hops = {MODALITIES[m].window_hop_seconds(self.recipe.section(m)) if MODALITIES[m].window_hop_seconds
                else 0.0 for m in self.modalities}
        return hops.pop() if len(hops) == 1 else None

    def embed_with_index(self, items: Sequence[Item], tokens: bool = False, batch_size: int = 64,
                         num_workers: int = 0, windows: bool = False, progress: bool = False
                         ) -> tuple[Union[np.ndarray, list[np.ndarray]], list[tuple[int, int]]]:
        """Like :meth:`embed`, plus (item number, sample number within the item) for every row."""
        from tqdm.auto import tqdm

        items = list(items)
        kinds = [self.modality_for(item) for item in items]
        bar = tqdm(total=len(items), disable=not progress, desc="embed", unit="file", leave=False, dynamic_ncols=True,
                   mininterval=0.5)
        try:
            return self._embed_items(items, kinds, tokens, batch_size, num_workers, windows, bar)
        finally:
            bar.close()

    @torch.no_grad()
    def _embed_items(self, items: list, kinds: list[str], tokens: bool, batch_size: int, num_workers: int,
                     windows: bool, bar) -> tuple[Union[np.ndarray, list[np.ndarray]], list[tuple[int, int]]]:
        """:meth:`embed_with_index` on items whose modalities are known; ``bar`` steps once per item."""
        if len(self.modalities) > 1 or len(set(kinds)) > 1:
            return self._embed_by_modality(items, kinds, tokens, batch_size, num_workers, windows, bar)
        loader = DataLoader(_Views(items, self.recipe), batch_size=None, num_workers=min(num_workers, len(items)),
                            collate_fn=_as_is)
        rows: list[tuple[int, int]] = []
        per_row: list[list[torch.Tensor]] = []  # each row's view vectors, in view order
        pending: list[tuple[int, torch.Tensor]] = []  # (row, view)

        def forward(chunk: list[tuple[int, torch.Tensor]]) -> None:
            x = torch.stack([v for _, v in chunk]).to(self.device)
            valid = valid_mask(x, self.recipe)
            with autocast(self.precision, self.device):
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
            if isinstance(samples, MultijepaError):
                raise samples
            bar.update(1)
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
                           windows: bool, bar) -> tuple[Union[np.ndarray, list[np.ndarray]], list[tuple[int, int]]]:
        """Each modality's items through its side of the model, rows put back in item order."""
        found: dict[tuple[int, int], object] = {}
        for m in dict.fromkeys(kinds):
            mine = [i for i, k in enumerate(kinds) if k == m]
            vectors, rows = self.for_modality(m)._embed_items([items[i] for i in mine], [m] * len(mine), tokens,
                                                              batch_size, num_workers, windows, bar)
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


def load(path: Union[str, Path], device: str = "auto", precision: str = "auto") -> Embedder:
    """Load a checkpoint (``last.pt``) or an export folder (``multijepa export``) for embedding: the
    Python API's ``multijepa.load``."""
    return Embedder.from_checkpoint(path, device, precision)


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
        trained = set(saved_modalities(saved))
        if not wanted <= trained:
            continue
        if best is None or ckpt.stat().st_mtime > best.stat().st_mtime:
            best = ckpt
    return best


OUT_TYPES = (".jsonl", ".npy", ".npz")


def check_out(out: Optional[str]) -> None:
    """Raise MultijepaError unless ``out`` (None: stdout) is a file name embeddings can be written to."""
    if out is None:
        return
    if not out.lower().endswith(OUT_TYPES):
        raise MultijepaError(f"--out {out}: use a .jsonl, .npy or .npz file name")
    if os.path.isdir(out):
        raise MultijepaError(f"--out {out}: is a folder; give a file name such as {Path(out) / 'vectors.npz'}")


def rows_file(out: Union[str, Path]) -> Path:
    """The file naming the rows of an .npy written by :func:`write_embeddings`: ``vectors.npy`` ->
    ``vectors.rows.jsonl``."""
    return Path(out).with_suffix(".rows.jsonl")


def write_embeddings(files: Sequence[str], vectors: Union[np.ndarray, list[np.ndarray]], out: Optional[str],
                     index: Optional[Sequence[int]] = None, window_hop_seconds: Optional[float] = 0.0) -> list[str]:
    """Save embeddings with the name of each row's file; JSON lines on stdout when out is None.

    ``files[i]`` names row i's file; ``index`` (rows of many-sample files) adds each row's position in
    its file. ``vectors`` as a list (``embed(windows=True)``) holds one [W_i, ...] array per row.

    - ``.jsonl``: one ``{"file", ["index",] "embedding"}`` object per row; with windows one per window,
      ``{"file", ["index",] "window", "start_s", "embedding"}`` (no ``start_s`` when ``window_hop_seconds``
      is None: video clips, spread evenly over each video).
    - ``.npy``: the array alone ([N, D], [N, T, D] tokens; windows stacked to [N, W, ...], so every row
      must have W windows), and beside it ``NAME.rows.jsonl`` (:func:`rows_file`): one ``{"file"[, "index"]}``
      line per row of the array's first axis.
    - ``.npz``: ``embeddings`` with its row names, ``files`` and ``index`` (many-sample files); with windows
      one row per window, plus ``window`` and ``start_s`` per row.

    Returns:
        The paths written (none for stdout).
    """
    check_out(out)
    windowed = isinstance(vectors, list)
    head = [{"file": str(files[i]), **({"index": int(index[i])} if index is not None else {})}
            for i in range(len(vectors))]
    hop = window_hop_seconds

    def window_rows(i: int) -> list[dict]:
        return [{**head[i], "window": k, **({} if hop is None else {"start_s": round(k * hop, 6)})}
                for k in range(len(vectors[i]))]

    def stacked(arrays: list[np.ndarray], what: str) -> np.ndarray:
        shapes = sorted({a.shape for a in arrays})
        if len(shapes) > 1:
            raise MultijepaError(f"--out {out}: the files give arrays of different shapes ({shapes[0]} to "
                                 f"{shapes[-1]}: {what}), which one {Path(out).suffix} array cannot hold; "
                                 f"write .jsonl instead")
        return np.stack(arrays) if arrays else np.zeros((0, 0), dtype=np.float32)

    if out is None or out.lower().endswith(".jsonl"):
        rows = (r for i in range(len(vectors)) for r in (window_rows(i) if windowed else [head[i]]))
        values = (w for v in vectors for w in v) if windowed else iter(vectors)
        lines = (json.dumps({**r, "embedding": np.round(v, 6).tolist()}) for r, v in zip(rows, values))
        if out is None:
            for line in lines:
                print(line)
            return []
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w") as f:
            f.writelines(line + "\n" for line in lines)
        return [out]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    if out.lower().endswith(".npy"):
        array = stacked(vectors, "numbers of windows, or tokens of short audio") if windowed else vectors
        with open(out, "wb") as f:
            np.save(f, array)
        names = rows_file(out)
        names.write_text("".join(json.dumps(r) + "\n" for r in head))
        return [out, str(names)]
    rows = [r for i in range(len(vectors)) for r in window_rows(i)] if windowed else head
    array = stacked([w for v in vectors for w in v], "tokens of short audio") if windowed else vectors
    arrays = {"embeddings": array, "files": np.array([r["file"] for r in rows], dtype=str)}
    for key, dtype in (("index", np.int64), ("window", np.int64), ("start_s", np.float64)):
        if rows and key in rows[0]:
            arrays[key] = np.array([r[key] for r in rows], dtype=dtype)
    with open(out, "wb") as f:
        np.savez(f, **arrays)
    return [out]
