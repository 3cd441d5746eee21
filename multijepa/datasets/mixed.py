"""Training batches: from one source (a single-modality recipe) or several, one per modality, by weight.

>>> import multijepa as mj
>>> data = mj.datasets.Mixed({"audio": mj.datasets.AudioFolder("speech/"),
...                           "image": mj.datasets.ImageFolder("photos/")},
...                          weights={"audio": 2, "image": 1})  # doctest: +SKIP
>>> mj.pretrain(mj.load_recipe("recipes/multimodal.yaml"), data=data)  # doctest: +SKIP

Every run trains through :func:`build_train_loader`: a single-modality recipe is one source. A batch
holds one homogeneous sub-batch per modality drawn for it. How many samples each source
gives a step is a function of (seed, step) alone (``data.mix``: a fixed proportion of every batch,
or each sample's source drawn by weight), and which samples, of (seed, step, rank): every source
walks its own chain of per-epoch permutations, and under ``torchrun`` rank r takes its own share
of every source's samples for the step. A resumed run therefore sees exactly the batches an
uninterrupted run would have, mid-epoch included. Shard sources stream instead (see ShardDataset).
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

import torch
from torch.utils.data import DataLoader, IterableDataset

from multijepa.datasets.files import IN_MEMORY, FileDataset, _mix, detect_format, index_files, valid_mask
from multijepa.datasets.shards import ShardDataset, shard_urls
from multijepa.errors import DataError, DecodeError, RecipeError
from multijepa.modalities import MODALITIES
from multijepa.recipe import Recipe, SourceConfig, recipe_from_dict, recipe_to_dict, source_counts


@dataclass(frozen=True)
class Source:
    """One modality's training samples: files (a folder, a file list, webdataset shards, one data
    file, as ``data.path``) or in-memory tensors.

    Tensors are raw samples, prepared like decoded files: images uint8 [C, H, W] (or float in
    [0, 1]), waveforms float [C, S] or [S] at ``audio.sample_rate``, series float [C, L] or [L]
    (NaN = missing), clouds [P, 3 + F] (xyz, then ``pointcloud.features``), video clips float
    [C, T, H, W] already normalised.
    """

    modality: str
    path: str = ""
    format: str = "auto"
    tensors: Optional[Sequence[torch.Tensor]] = None

    def __post_init__(self) -> None:
        if (self.tensors is None) == (not self.path):
            raise DataError(f"a {self.modality} source needs a path or tensors (one of them)")
        if self.tensors is not None and len(self.tensors) == 0:
            raise DataError(f"the {self.modality} source's tensors are empty")


def ImageFolder(path: str) -> Source:  # noqa: N802 (named like the data set it reads)
    """Images under ``path`` (class sub-folders optional)."""
    return Source("image", str(path))


def AudioFolder(path: str) -> Source:  # noqa: N802
    """Audio files under ``path`` (class sub-folders optional)."""
    return Source("audio", str(path))


def VideoFolder(path: str) -> Source:  # noqa: N802
    """Videos under ``path`` (class sub-folders optional)."""
    return Source("video", str(path))


def TimeSeriesFolder(path: str) -> Source:  # noqa: N802
    """Series under ``path``: a folder, or one data file that holds many (a .ts file, a wide CSV)."""
    return Source("timeseries", str(path))


def PointCloudFolder(path: str) -> Source:  # noqa: N802
    """Point clouds and meshes under ``path`` (class sub-folders optional)."""
    return Source("pointcloud", str(path))


def Files(modality: str, path: str, format: str = "auto") -> Source:  # noqa: N802, A002
    """Any files source: a folder, a .txt file list, webdataset shards or one data file."""
    return Source(modality, str(path), format)


def Tensors(modality: str, tensors: Sequence[torch.Tensor]) -> Source:  # noqa: N802
    """In-memory samples of one modality (see :class:`Source` for their shapes)."""
    return Source(modality, tensors=tensors)


class Mixed:
    """Several sources trained together, at most one per modality.

    Args:
        sources: {modality: Source}.
        weights: {modality: relative share of the samples}; equal shares when omitted.
        mix: "proportion" (the same share of every batch) or "weights" (each sample's source drawn
            at random by weight); see ``data.mix``.
    """

    def __init__(self, sources: dict[str, Source], weights: Optional[dict[str, float]] = None,
                 mix: str = "proportion"):
        if not sources:
            raise DataError("Mixed needs at least one source")
        for name, src in sources.items():
            if src.modality != name:
                raise DataError(f"Mixed: the source under {name!r} reads {src.modality}; "
                                f"key each source by its modality")
        unknown = set(weights or {}) - set(sources)
        if unknown:
            raise DataError(f"Mixed: weights for {', '.join(sorted(unknown))}, which have no source")
        self.sources, self.mix = dict(sources), mix
        self.weights = {m: float((weights or {}).get(m, 1.0)) for m in sources}

    def apply_to(self, recipe: Recipe) -> Recipe:
        """The recipe training on these sources: their paths, weights and mix; loss weights and masks
        stay those of the recipe's source of the same modality (a single-modality recipe counts as
        one source, with its mask section)."""
        own = {s.modality: s for s in recipe.all_sources}
        missing = [m for m in self.sources if m not in own and recipe.modality != "mixed"]
        if missing:
            raise RecipeError(f"the data has {', '.join(missing)} but this is a {recipe.modality} recipe; "
                              f"use a mixed recipe (modality: mixed, e.g. recipes/multimodal.yaml)")
        configs = tuple(dataclasses.replace(own.get(m, SourceConfig(m)), path=src.path or IN_MEMORY,
                                            format=src.format if src.path else "auto", weight=self.weights[m])
                        for m, src in self.sources.items())
        data = dataclasses.replace(recipe.data, path="", mix=self.mix)
        raw = recipe_to_dict(dataclasses.replace(recipe, modality="mixed", sources=configs, data=data))
        return recipe_from_dict(raw, "the recipe with the Mixed data's sources")

    def tensors(self) -> dict[str, Sequence[torch.Tensor]]:
        return {m: s.tensors for m, s in self.sources.items() if s.tensors is not None}


# --------------------------------------------------------------------------- which samples each step


class MixPlan:
    """How many samples each source gives step s, and where in its sample order they start.

    With ``data.mix: proportion`` the counts are the same every step (``source_counts``); with
    ``weights`` each of the batch's samples draws its source from a generator seeded by (seed,
    step), so every rank of a run draws the same counts.
    """

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.fixed = source_counts(recipe) if recipe.data.mix == "proportion" else None
        weights = torch.tensor([s.weight for s in recipe.all_sources], dtype=torch.float64)
        self.probs = weights / weights.sum()
        self._cursor_step, self._cursor = 0, [0] * len(weights)

    def counts(self, step: int) -> list[int]:
        if self.fixed is not None:
            return list(self.fixed)
        g = torch.Generator().manual_seed(_mix(self.recipe.train.seed, step, 11))
        drawn = torch.multinomial(self.probs, self.recipe.data.batch_size, replacement=True, generator=g)
        return torch.bincount(drawn, minlength=len(self.probs)).tolist()

    def starts(self, step: int) -> list[int]:
        """Per source, the samples all earlier steps took from it (per rank)."""
        if self.fixed is not None:
            return [step * c for c in self.fixed]
        if step < self._cursor_step:  # replay from the start: counts are a function of the step alone
            self._cursor_step, self._cursor = 0, [0] * len(self.probs)
        while self._cursor_step < step:
            self._cursor = [a + b for a, b in zip(self._cursor, self.counts(self._cursor_step))]
            self._cursor_step += 1
        return list(self._cursor)


class _Chain:
    """Sample indices of one source in an endless chain of per-epoch permutations seeded by (seed, epoch)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self._perms = n, seed, {}

    def __getitem__(self, position: int) -> int:
        epoch, offset = divmod(position, self.n)
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(_mix(self.seed, epoch))
            self._perms = {epoch: torch.randperm(self.n, generator=g)}
        return int(self._perms[epoch][offset])


def source_chains(recipe: Recipe, sizes: list[int]) -> list[_Chain]:
    """Each source's sample order, seeded by (seed, source number); size 0 (a shard stream) gets a stub."""
    return [_Chain(max(n, 1), _mix(recipe.train.seed, k, 13)) for k, n in enumerate(sizes)]


def step_keys(plan: MixPlan, sizes: list[int], step: int, rank: int = 0, world: int = 1,
              chains: Optional[list[_Chain]] = None) -> list[tuple[int, int]]:
    """(source number, sample index) for every sample rank ``rank`` takes at ``step``, by source.

    Source k's global positions for the step are ``[start * world, (start + count) * world)``;
    rank r takes the r-th run of ``count`` of them, so ranks never share a sample within an epoch.
    """
    chains = chains or source_chains(plan.recipe, sizes)
    keys = []
    for k, (start, count) in enumerate(zip(plan.starts(step), plan.counts(step))):
        first = start * world + rank * count
        keys.extend((k, chains[k][p]) for p in range(first, first + count))
    return keys


# --------------------------------------------------------------------------- reading


class _TensorSamples:
    """In-memory samples indexed like FileDataset: ``(step, i)`` -> a sample dict."""

    def __init__(self, tensors: Sequence[torch.Tensor], recipe: Recipe):
        self.tensors, self.recipe = tensors, recipe

    def __len__(self) -> int:
        return len(self.tensors)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        step, i = key
        g = torch.Generator().manual_seed(_mix(self.recipe.train.seed, step, i))
        try:
            m = self.recipe.modality
            x = MODALITIES[m].from_tensor(torch.as_tensor(self.tensors[i]), self.recipe.section(m), g)
        except (DecodeError, RuntimeError, IndexError, ValueError) as e:
            raise DataError(f"{self.recipe.modality} tensor {i}: cannot be used as a sample ({e}); see "
                            f"multijepa.datasets.Source for the shapes each modality takes") from None
        return {"input": x, "label": -1, "step": step, "bad": []}


def source_recipes(recipe: Recipe) -> list[Recipe]:
    """Each source's single-modality recipe, with a seed of its own so that sources draw different
    crops and masks for the same step."""
    return [dataclasses.replace(r, train=dataclasses.replace(r.train, seed=_mix(recipe.train.seed, k, 17)))
            for k, r in enumerate(recipe.source(m) for m in recipe.modalities)]


class MaskCollate:
    """Stacks samples and samples the batch's masks (runs in DataLoader workers)."""

    def __init__(self, recipe: Recipe, rank: int = 0):
        self.recipe, self.rank, self.seed = recipe, rank, recipe.train.seed
        self.masker = MODALITIES[recipe.modality].masker(recipe.section(recipe.modality), recipe.mask)

    def __call__(self, samples: list[dict]) -> dict:
        """Returns input, label, context_idx, target_idx, valid (bool [B, N], or None where the
        modality has no padding; with it, index sets are padded with -1), bad and count."""
        bad = [b for s in samples for b in s["bad"]]
        good = [s for s in samples if s["input"] is not None]
        if not good:
            return {"input": None, "bad": bad, "count": len(bad)}
        g = torch.Generator().manual_seed(_mix(self.seed, samples[0]["step"], self.rank, 7))
        inputs = torch.stack([s["input"] for s in good])
        valid = valid_mask(inputs, self.recipe)
        inputs, context_idx, target_idx = self.masker(inputs, g, valid)
        return {"input": inputs, "label": torch.tensor([s["label"] for s in good]),
                "context_idx": context_idx, "target_idx": target_idx, "valid": valid,
                "bad": bad, "count": len(good) + len(bad)}  # files tried, decoded or not


class Batches(IterableDataset):
    """Endless collated batches ``{"parts": {modality: sub-batch}, "bad", "count", "step"}``.

    DataLoader worker w of W makes the batches of steps start + w, start + w + W, ...; the loader
    hands them out round-robin, so batches arrive in step order for any worker count.
    """

    def __init__(self, recipe: Recipe, start_step: int = 0, rank: int = 0, world: int = 1,
                 tensors: Optional[dict[str, Sequence[torch.Tensor]]] = None):
        self.recipe, self.start_step, self.rank, self.world = recipe, start_step, rank, world
        self.subs = source_recipes(recipe)
        self.samples: list[Union[FileDataset, _TensorSamples, ShardDataset]] = []
        tensors = tensors or {}
        for sub in self.subs:
            m = sub.modality
            if sub.data.path == IN_MEMORY:
                if m not in tensors:
                    raise DataError(f"the recipe's {m} source was in-memory tensors; pass them again "
                                    f"(pretrain(recipe, data=Mixed(...))) to resume")
                self.samples.append(_TensorSamples(tensors[m], sub))
            elif detect_format(sub) == "shards":
                self.samples.append(ShardDataset(shard_urls(sub.data.path), sub, start_step, rank, world))
            else:
                self.samples.append(FileDataset(index_files(sub), sub, train=True))
        if recipe.data.mix == "proportion":
            for sub, samples, count in zip(self.subs, self.samples, source_counts(recipe)):
                if isinstance(samples, FileDataset) and len(samples) < count * world:
                    warnings.warn(f"{sub.data.path}: {len(samples)} samples is fewer than the {count} x {world} a "
                                  f"step takes from it; samples repeat within a step", stacklevel=3)
        self.collates = [MaskCollate(sub, rank) for sub in self.subs]

    def describe(self) -> str:
        """What the run trains on, for its start-up line: "5000 image samples" or "12 audio shards + ..."."""
        def one(sub: Recipe, samples) -> str:
            if isinstance(samples, ShardDataset):
                return f"{len(samples.urls)} {sub.modality} shard{'s' * (len(samples.urls) != 1)}"
            return f"{len(samples)} {sub.modality} sample{'s' * (len(samples) != 1)}"

        return " + ".join(one(sub, samples) for sub, samples in zip(self.subs, self.samples))

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        plan = MixPlan(self.recipe)
        sizes = [0 if isinstance(s, ShardDataset) else len(s) for s in self.samples]
        chains = source_chains(self.recipe, sizes)
        streams = {k: iter(s) for k, s in enumerate(self.samples) if isinstance(s, ShardDataset)}
        step = self.start_step + worker
        while True:
            by_source: list[list[dict]] = [[] for _ in self.samples]
            for k, index in step_keys(plan, sizes, step, self.rank, self.world, chains):
                by_source[k].append(next(streams[k]) if k in streams else self.samples[k][(step, index)])
            parts, bad, count = {}, [], 0
            for k, samples in enumerate(by_source):
                if not samples:
                    continue
                for s in samples:
                    s["step"] = step  # masks are seeded by the step (shard samples carry a stream counter)
                part = self.collates[k](samples)
                bad += part.pop("bad")
                count += part.pop("count")
                if part["input"] is not None:
                    parts[self.subs[k].modality] = part
            yield {"parts": parts, "bad": bad, "count": count, "step": step}
            step += workers


def build_train_loader(recipe: Recipe, start_step: int = 0, rank: int = 0, world: int = 1,
                       tensors: Optional[dict[str, Sequence[torch.Tensor]]] = None) -> DataLoader:
    """The endless training loader of any recipe, one source or several (see :class:`Batches`); each
    batch carries its masks."""
    d = recipe.data
    # An own generator: worker seeding must not draw from the global RNG, whose state a checkpoint restores.
    kwargs = dict(num_workers=d.num_workers, batch_size=None, pin_memory=torch.cuda.is_available(),
                  generator=torch.Generator().manual_seed(_mix(recipe.train.seed, start_step, rank)))
    if d.num_workers > 0:
        kwargs["prefetch_factor"] = 4
    return DataLoader(Batches(recipe, start_step, rank, world, tensors), **kwargs)
