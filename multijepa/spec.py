"""What the toolkit knows about a modality, in one typed record: :class:`ModalitySpec`.

Each modality module (``multijepa/modalities/<name>.py``) defines its recipe section (a frozen
dataclass), validates it, and fills in one ``ModalitySpec``; ``multijepa.modalities.MODALITIES``
lists them. The loaders, the embedder, recipe validation and the CLI read that table and nothing
else, so adding a modality means writing one module (``docs/adding-a-modality.md``).

Every function in a spec takes the modality's own recipe section (``cfg``), never the whole recipe:
a modality knows nothing of the others, and the core knows nothing of any.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from multijepa.core.masking import MaskConfig, sample_grid_masks, validate_grid_mask
from multijepa.core.transformer import PosEmbed, sincos_embed
from multijepa.errors import require
from multijepa.readers import Source

# (stacked inputs, generator, valid tokens bool [B, N] or None) -> (model inputs, context_idx [B, Nc],
# target_idx [B, M, Nt]); runs in DataLoader workers.
Masker = Callable[[torch.Tensor, torch.Generator, Optional[torch.Tensor]], tuple]


def _sincos(cfg: Any, dim: int) -> PosEmbed:
    return sincos_embed


def _nothing_from_data(cfg: Any) -> tuple[str, ...]:
    return ()


def grid_masker(grid: tuple[int, ...], mask: MaskConfig, inputs: torch.Tensor, g: torch.Generator,
                valid: Optional[torch.Tensor] = None, time_axis: Optional[int] = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs on a token grid: unchanged, with the masks ``mask.mode`` asks for on the grid (multi-block,
    or future spans along ``time_axis``), padding-aware with ``valid``."""
    return (inputs, *sample_grid_masks(grid, mask, len(inputs), g, valid=valid, time_axis=time_axis))


@dataclass(frozen=True)
class ModalitySpec:
    """One modality, described once.

    Required:
        name: the modality's name: its recipe section's key and the ``modality:`` value that selects it.
        config: the recipe section's frozen dataclass; its defaults are the section's defaults.
        extensions: file types its reader takes (lower case, with the dot).
        validate: ``(cfg, where)``: raise :class:`~multijepa.errors.RecipeError` naming the dotted key
            of a value no run could use (``multijepa.errors.check``).
        tokenizer: ``(cfg, width) -> nn.Module`` mapping a batch to ``tokens [B, N, width], coords [B, N, C]``.
        load: ``(source, cfg, name, part, generator) -> input``: one training sample from a file (``part``:
            which sample of a file holding many, None for a one-sample file; a generator: random
            augmentation, None: fixed). Raises DecodeError naming ``name``.
        from_tensor: ``(tensor, cfg, generator) -> input``: one training sample from an in-memory raw sample.
        embed_views: ``(source or tensor, cfg, name) -> [[view, ...], ...]``: per sample of a file, in
            file order, the inputs (crops, windows) whose features are pooled into its one vector.

    Optional:
        token_grid: ``cfg -> grid shape`` of the tokens (multi-block masks are drawn on it); None where
            tokens have no grid (then ``masks`` and ``check_masks`` are required).
        masks: ``(cfg, mask section) -> Masker``: how a batch gets its masks; default: blocks on ``token_grid``.
        check_masks: ``(cfg, mask section, where)``: reject masks that cannot be drawn; default:
            :func:`~multijepa.core.masking.validate_mask` on ``token_grid``.
        pos_embed: ``(cfg, width) -> pos_embed(coords, width)``: fixed sin-cos per axis by default; a
            returned ``nn.Module`` is trained and saved with the model.
        valid_tokens: ``(stacked inputs, cfg) -> bool [B, N]``: which tokens are real where inputs hold
            padding (NaN-padded series and waveforms); None: every token is real.
        list_samples: ``(path, cfg) -> [label or None, ...]``: one entry per sample of a file that holds
            many (a .ts file); None: a file is one sample.
        waits_for_data: ``cfg -> dotted keys`` still to be read from the training data (left at 0), or ().
        from_data: ``(cfg, files, where) -> cfg``: those settings filled in from the training files.
        window_hop_seconds: ``cfg -> seconds or None``: for modalities whose files embed through several
            views of one sample (audio windows, video clips), the seconds between view starts (None when
            it differs per file); the spec's own None: one view per sample.
        test_split: ``cfg -> cfg`` reading the test split of a file that holds both (an .npz with
            X_train/X_test): what ``probe --test`` reads from such a file.
        requires: import names of the optional packages it cannot work without (keys of
            ``multijepa.errors.EXTRAS``), checked before a model of it is built.
        time_axis: ``cfg -> axis`` of ``token_grid`` that is time (video frames, audio time, series
            steps), along which ``mask.mode: future`` predicts; None: the tokens have no time order.
    """

    name: str
    config: type
    extensions: tuple[str, ...]
    validate: Callable[[Any, str], None]
    tokenizer: Callable[[Any, int], nn.Module]
    load: Callable[[Source, Any, str, Optional[int], Optional[torch.Generator]], torch.Tensor]
    from_tensor: Callable[[torch.Tensor, Any, Optional[torch.Generator]], torch.Tensor]
    embed_views: Callable[[Union[Source, torch.Tensor], Any, str], list]
    token_grid: Optional[Callable[[Any], tuple[int, ...]]] = None
    masks: Optional[Callable[[Any, MaskConfig], Masker]] = None
    check_masks: Optional[Callable[[Any, MaskConfig, str], None]] = None
    pos_embed: Callable[[Any, int], PosEmbed] = _sincos
    valid_tokens: Optional[Callable[[torch.Tensor, Any], torch.Tensor]] = None
    list_samples: Optional[Callable[[str, Any], list]] = None
    waits_for_data: Callable[[Any], tuple[str, ...]] = _nothing_from_data
    from_data: Optional[Callable[[Any, list, str], Any]] = None
    window_hop_seconds: Optional[Callable[[Any], Optional[float]]] = None
    test_split: Optional[Callable[[Any], Any]] = None
    requires: tuple[str, ...] = ()
    time_axis: Optional[Callable[[Any], int]] = None

    def __post_init__(self) -> None:
        if self.token_grid is None and (self.masks is None or self.check_masks is None):
            raise TypeError(f"modality {self.name!r}: without a token_grid, give masks and check_masks")

    def check_installed(self) -> None:
        """Raise :class:`~multijepa.errors.MissingExtraError` naming the ``pip install`` to run when a
        package this modality needs is missing."""
        for module in self.requires:
            require(module, f"the {self.name} modality")

    def masker(self, cfg: Any, mask: MaskConfig) -> Masker:
        """How a stacked batch of this modality gets its context and target indices."""
        if self.masks is not None:
            return self.masks(cfg, mask)
        return functools.partial(grid_masker, self.token_grid(cfg), mask,
                                 time_axis=self.time_axis(cfg) if self.time_axis else None)

    def validate_masks(self, cfg: Any, mask: MaskConfig, where: str) -> None:
        """Reject a mask section that this modality's tokens cannot satisfy (a sampler must always end)."""
        if self.check_masks is not None:
            self.check_masks(cfg, mask, where)
        else:
            validate_grid_mask(mask, self.token_grid(cfg), where, self.time_axis(cfg) if self.time_axis else None,
                               self.name)
