"""Our pre-norm transformer, its attention kernel chosen by measurement, and coordinate position codes.

:func:`attention` runs ``F.scaled_dot_product_attention`` (SDPA: fused flash / memory-efficient
kernels on CUDA, a flash kernel on CPU) or the plain matmul-softmax-matmul form, whichever
:data:`ATTENTION_TABLE` measured faster for the device, dtype, head dim and sequence length.

The transformer runs on dense batches [B, N, D] in which every token is real, and on *packed*
batches: S sequences of different lengths laid end to end as [T, D], described by one
:class:`Segments`, with block-diagonal attention (``varlen_attn`` or FlexAttention on CUDA, a padded
SDPA reference on CPU). A padded batch is packed by keeping its real tokens (``x[real]``) and
restored with :func:`unpack`; the dense path stays the fast path when no sequence is padded.
"""

from __future__ import annotations

import math
from functools import cached_property
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn


def sincos_codes(coords: torch.Tensor, dim: int, freqs: torch.Tensor) -> torch.Tensor:
    """sin and cos of every coordinate at every frequency, axis by axis, zero-padded to ``dim``.

    The one body of the fixed position codes: :func:`sincos_embed` (geometric frequencies, for grids)
    and the point clouds' ``fourier_embed`` (octaves of pi, for xyz) differ only in ``freqs``.

    Args:
        coords: [B, N, C] positions, of any real dtype (computed in float32).
        dim: output width, at least ``2 * C * F``.
        freqs: float32 [F] angular frequencies, the same for every axis.

    Returns:
        float32 [B, N, dim]: for axis c, channels ``2cF .. 2cF + F`` hold the sines and the next F
        the cosines; the last ``dim - 2CF`` channels are zero.

    >>> sincos_codes(torch.tensor([[[0.0, 1.0]]]), 6, torch.tensor([1.0]))
    tensor([[[0.0000, 1.0000, 0.8415, 0.5403, 0.0000, 0.0000]]])
    """
    b, n, c = coords.shape
    width = c * 2 * freqs.numel()  # spelled out: reshape cannot infer a -1 when F is 0
    if width > dim:
        raise ValueError(f"{c} axes x {freqs.numel()} frequencies need {width} channels, more than dim={dim}")
    angles = coords.float().unsqueeze(-1) * freqs  # [B, N, C, F]
    out = torch.cat([angles.sin(), angles.cos()], dim=-1).reshape(b, n, width)
    if width < dim:
        out = F.pad(out, (0, dim - width))
    return out


PosEmbed = Callable[[torch.Tensor, int], torch.Tensor]  # pos_embed(coords [B, N, C], width) -> [B, N, width]


def sincos_embed(coords: torch.Tensor, dim: int, base: float = 10000.0) -> torch.Tensor:
    """Fixed sin-cos codes from coordinates, one band per axis, frequencies ``base^(-k / F)``.

    Args:
        coords: [B, N, C] positions (grid indices or continuous values).
        dim: output width; each of the C axes gets ``2 * (dim // (2 * C))`` channels, the rest are zero.

    Returns:
        [B, N, dim] float tensor.

    >>> sincos_embed(torch.zeros(1, 4, 2), 8).shape
    torch.Size([1, 4, 8])
    """
    per_axis = dim // (2 * coords.shape[-1])
    freqs = base ** (-torch.arange(per_axis, device=coords.device, dtype=torch.float32) / max(per_axis, 1))
    return sincos_codes(coords, dim, freqs)


def masked_moments(x: torch.Tensor, keep: Optional[torch.Tensor], dims: tuple[int, ...]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (biased) variance of ``x`` over ``dims``, counting only entries where ``keep`` is set.

    ``keep`` is a bool or 0/1 tensor that broadcasts against ``x`` (None: every entry counts). Both
    results keep the reduced dims (size 1); an all-excluded slice has mean and variance 0.

    >>> m, v = masked_moments(torch.tensor([[1.0, 3.0, 100.0]]), torch.tensor([[True, True, False]]), (1,))
    >>> m.item(), v.item()
    (2.0, 1.0)
    """
    w = torch.ones_like(x) if keep is None else keep.to(x.dtype).expand_as(x)
    count = w.sum(dims, keepdim=True).clamp_min(1.0)
    mean = (x * w).sum(dims, keepdim=True) / count
    var = ((x - mean).square() * w).sum(dims, keepdim=True) / count
    return mean, var


class Segments:
    """S sequences of lengths ``seqlens`` laid end to end as one packed batch of T tokens.

    Built once per forward and shared by every layer; what a backend needs (cumulative offsets,
    token -> segment ids, re-padding indices, a FlexAttention BlockMask) is computed on first use
    and cached on the object.

    Args:
        seqlens: long [S] (or a list of ints), every length >= 1.
        device: where the cached index tensors live; default: ``seqlens``' device.

    >>> seg = Segments([3, 1, 2])
    >>> seg.cu_seqlens.tolist(), seg.max_len, seg.segment_ids.tolist()
    ([0, 3, 4, 6], 3, [0, 0, 0, 1, 2, 2])
    """

    def __init__(self, seqlens: Union[torch.Tensor, Sequence[int]],
                 device: Optional[Union[torch.device, str]] = None):
        seqlens = torch.as_tensor(seqlens, dtype=torch.long)
        self.seqlens = seqlens.to(device) if device is not None else seqlens
        self.device = self.seqlens.device
        if self.seqlens.dim() != 1 or self.seqlens.numel() == 0:
            raise ValueError(f"seqlens must be a non-empty 1-d tensor, got shape {tuple(self.seqlens.shape)}")
        # One host sync per forward: the lengths' sum and max are shapes, so they must be Python ints.
        lengths = self.seqlens.cpu()
        if int(lengths.min()) < 1:
            raise ValueError(f"every sequence length must be >= 1, got {lengths.tolist()}")
        self.num_segments = int(lengths.numel())
        self.total = int(lengths.sum())
        self.max_len = int(lengths.max())
        self._block_masks: Dict[Tuple[torch.device, int], Any] = {}

    @cached_property
    def cu_seqlens(self) -> torch.Tensor:
        """int32 [S+1]: offsets of each segment in the pack, starting at 0 (the varlen convention)."""
        return F.pad(self.seqlens.cumsum(0), (1, 0)).to(torch.int32)

    @cached_property
    def segment_ids(self) -> torch.Tensor:
        """long [T]: the segment each token belongs to."""
        ids = torch.arange(self.num_segments, device=self.device)
        return ids.repeat_interleave(self.seqlens, output_size=self.total)

    @cached_property
    def pad_index(self) -> torch.Tensor:
        """long [T]: where each token goes in a flattened [S * max_len] padded layout."""
        starts = self.cu_seqlens[:-1].long()[self.segment_ids]
        position = torch.arange(self.total, device=self.device) - starts
        return self.segment_ids * self.max_len + position

    @cached_property
    def key_mask(self) -> torch.Tensor:
        """bool [S, max_len]: True at real tokens of the padded layout (row-major order = pack order)."""
        return torch.arange(self.max_len, device=self.device) < self.seqlens[:, None]

    def block_mask(self, device: torch.device, block_size: int = 128) -> Any:
        """FlexAttention BlockMask [1, 1, T, T] that lets a token attend only within its own segment."""
        key = (torch.device(device), block_size)
        if key not in self._block_masks:
            # Pad the ids to whole blocks with a sentinel id so that a kernel reading past T
            # (lengths not a multiple of the block size) never indexes out of range.
            padded = math.ceil(self.total / block_size) * block_size
            doc = F.pad(self.segment_ids, (0, padded - self.total), value=-1).to(device)

            def same_segment(b, h, q_idx, kv_idx):
                return doc[q_idx] == doc[kv_idx]

            build = _compiled("create_block_mask") if key[0].type == "cuda" else _flex_module().create_block_mask
            self._block_masks[key] = build(same_segment, None, None, self.total, self.total,
                                           device=device, BLOCK_SIZE=block_size)
        return self._block_masks[key]


def padding_waste(*packs: Segments) -> float:
    """Share of dense [S, max_len] layouts of these packs' sequences that would be padding (0 for none).

    >>> padding_waste(Segments([3, 7, 1, 5]))  # 1 - 16 / (4 * 7)
    0.4285714285714286
    """
    dense = sum(s.num_segments * s.max_len for s in packs)
    return 1.0 - sum(s.total for s in packs) / dense if dense else 0.0


def unpack(packed: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Re-pad a packed batch: packed [T, D], real bool [B, N] -> [B, N, D] with zeros at padding.

    The inverse of packing by ``x[real]``: the T = ``real.sum()`` tokens are the real ones in
    row-major order, so each row's tokens are one contiguous segment of the pack.

    >>> real = torch.tensor([[True, False], [True, True]])
    >>> unpack(torch.ones(3, 2), real)[0, 1].tolist()
    [0.0, 0.0]
    """
    out = packed.new_zeros(*real.shape, packed.shape[-1])
    out[real] = packed
    return out


# The faster attention form on the CPU, measured with bench/speed_attention.py (2 threads of an AMD
# EPYC with avx512_bf16, torch 2.14; the table in docs/results.md, "Attention kernels"), dense and
# key-masked alike: {(device type, dtype, pass): ((head dim up to, tokens up to, form), ...)}. The
# first row whose head dim covers the call decides: its form up to its token count, SDPA beyond.
# "train" is forward + backward, "infer" forward only (the target encoder, embedding). Anything
# unlisted (CUDA, fp16, head dims over 128) runs SDPA; in fp32 training SDPA was as fast or faster.
ATTENTION_TABLE: Dict[Tuple[str, torch.dtype, str], Tuple[Tuple[int, int, str], ...]] = {
    ("cpu", torch.bfloat16, "train"): ((128, 256, "matmul"),),
    ("cpu", torch.bfloat16, "infer"): ((16, 128, "matmul"), (32, 128, "matmul"), (128, 256, "matmul")),
    ("cpu", torch.float32, "infer"): ((64, 64, "matmul"), (128, 32, "matmul")),
}


def attention_kernel(device: torch.device, dtype: torch.dtype, tokens: int, head_dim: int,
                     training: bool = True) -> str:
    """``"sdpa"`` or ``"matmul"``: the faster attention form for keys of ``tokens`` x ``head_dim``
    on ``device`` in ``dtype``, forward + backward (``training``) or forward only, read from
    :data:`ATTENTION_TABLE`.

    >>> cpu = torch.device("cpu")
    >>> attention_kernel(cpu, torch.bfloat16, 64, 64), attention_kernel(cpu, torch.bfloat16, 1024, 64)
    ('matmul', 'sdpa')
    >>> attention_kernel(cpu, torch.float16, 64, 64)  # not measured: SDPA
    'sdpa'
    """
    for max_dim, max_tokens, form in ATTENTION_TABLE.get((device.type, dtype, "train" if training else "infer"), ()):
        if head_dim <= max_dim:
            return form if tokens <= max_tokens else "sdpa"
    return "sdpa"


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd)) v over [..., N, hd], ``mask`` (bool, True = attend) broadcast over
    the scores, through the form :func:`attention_kernel` picks; the same numbers either way.

    >>> q = torch.randn(2, 3, 5, 8)
    >>> torch.allclose(attention(q, q, q), F.scaled_dot_product_attention(q, q, q), atol=1e-6)
    True
    """
    training = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if attention_kernel(q.device, q.dtype, k.shape[-2], q.shape[-1], training) == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1) @ v


_COMPILED: Dict[str, Callable] = {}
_VARLEN_UNSUPPORTED: set = set()  # (head_dim, dtype) where varlen_attn raised; go straight to flex


def _flex_module():
    # Imported lazily: only the flex backend needs it, and importing it is not free.
    from torch.nn.attention import flex_attention
    return flex_attention


def _compiled(name: str) -> Callable:
    """torch.compile'd flex_attention / create_block_mask, built once per process (CUDA only)."""
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(getattr(_flex_module(), name))
    return _COMPILED[name]


def _reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg: Segments) -> torch.Tensor:
    t, h, hd = q.shape
    index = seg.pad_index.to(q.device)

    def to_padded(z: torch.Tensor) -> torch.Tensor:  # [T, H, hd] -> [S, H, max_len, hd]
        flat = z.new_zeros(seg.num_segments * seg.max_len, h, hd).index_copy(0, index, z)
        return flat.view(seg.num_segments, seg.max_len, h, hd).transpose(1, 2)

    # Equal lengths need no mask, which keeps SDPA free to pick a fused kernel.
    mask = None if seg.total == seg.num_segments * seg.max_len else seg.key_mask.to(q.device)[:, None, None, :]
    out = attention(to_padded(q), to_padded(k), to_padded(v), mask)
    return out.transpose(1, 2).reshape(-1, h, hd).index_select(0, index)


def _varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg: Segments) -> torch.Tensor:
    try:
        from torch.nn.attention.varlen import varlen_attn  # torch >= 2.10
    except ImportError:  # auto then falls back to flex, as for a shape varlen refuses
        raise NotImplementedError(f"the varlen attention backend needs torch >= 2.10 (torch.nn.attention.varlen); "
                                  f"this is torch {torch.__version__}: use backend 'flex' or 'auto'") from None
    cu = seg.cu_seqlens.to(q.device)
    return varlen_attn(q, k, v, cu, cu, seg.max_len, seg.max_len)


def _flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg: Segments) -> torch.Tensor:
    # Eager flex_attention runs on CPU (forward only, full scores matrix); on CUDA it is compiled.
    attend = _compiled("flex_attention") if q.device.type == "cuda" else _flex_module().flex_attention
    q4, k4, v4 = (z.transpose(0, 1).unsqueeze(0) for z in (q, k, v))  # [1, H, T, hd]
    out = attend(q4, k4, v4, block_mask=seg.block_mask(q.device))
    return out.squeeze(0).transpose(0, 1)


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: Segments,
                     backend: str = "auto") -> torch.Tensor:
    """Block-diagonal (per segment), non-causal attention with the default 1/sqrt(hd) scale.

    Args:
        q, k, v: [T, H, hd] packed tokens.
        segments: how the T tokens split into sequences.
        backend: ``"reference"`` (re-pad to [S, H, max_len, hd], one masked SDPA call; any device),
            ``"varlen"`` (``varlen_attn``; CUDA, fp16/bf16), ``"flex"`` (FlexAttention; compiled on
            CUDA, eager and forward-only on CPU) or ``"auto"``: varlen for CUDA fp16/bf16 (flex where
            varlen refuses the shape), flex for CUDA fp32, reference elsewhere.

    Returns:
        [T, H, hd].

    >>> q = torch.randn(6, 2, 4)
    >>> packed_attention(q, q, q, Segments([3, 1, 2])).shape
    torch.Size([6, 2, 4])
    """
    if q.dim() != 3 or q.shape[0] != segments.total:
        raise ValueError(f"q must be [T={segments.total}, H, hd], got {tuple(q.shape)}")
    if backend == "auto":
        if q.device.type != "cuda":
            backend = "reference"
        elif q.dtype in (torch.float16, torch.bfloat16):
            key = (q.shape[-1], q.dtype)
            if key not in _VARLEN_UNSUPPORTED:
                try:
                    return _varlen_attention(q, k, v, segments)
                except torch.OutOfMemoryError:
                    raise
                except (NotImplementedError, RuntimeError):
                    _VARLEN_UNSUPPORTED.add(key)  # e.g. a head dim the flash kernel lacks
            backend = "flex"
        else:
            backend = "flex"
    if backend == "reference":
        return _reference_attention(q, k, v, segments)
    if backend == "varlen":
        return _varlen_attention(q, k, v, segments)
    if backend == "flex":
        return _flex_attention(q, k, v, segments)
    raise ValueError(f"unknown attention backend {backend!r}: use auto, reference, varlen or flex")


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, segments: Optional[Segments] = None, outputs_from: int = 0,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: [B, N, D], every token attending to every other (or, with ``mask`` bool [N, N], True =
        attend, to those it allows); or, with ``segments``, a packed [T, D] batch whose attention stays
        within each segment. Returns the shape of x, or with ``outputs_from`` (dense only) the outputs of
        tokens ``outputs_from:`` alone [B, N - outputs_from, D]: every token is still a key, but no query,
        projection or output is computed for the others."""
        # Heads are split and merged by view/permute, not einops.rearrange: its ~3 us a call (pattern
        # lookup) measured ~5% of a small model's packed forward + backward, in every block.
        if segments is not None:
            t, d = x.shape
            q, k, v = self.qkv(x).view(t, 3, self.heads, d // self.heads).unbind(1)
            return self.proj(packed_attention(q, k, v, segments).reshape(t, d))
        b, n, d = x.shape
        if outputs_from:
            q = F.linear(x[:, outputs_from:], self.qkv.weight[:d], self.qkv.bias[:d])
            q = q.view(b, n - outputs_from, self.heads, d // self.heads).transpose(1, 2)
            k, v = F.linear(x, self.qkv.weight[d:], self.qkv.bias[d:]).view(b, n, 2, self.heads, d // self.heads
                                                                             ).permute(2, 0, 3, 1, 4)
        else:
            q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = attention(q, k, v, None if mask is None else mask[outputs_from:])
        return self.proj(out.transpose(1, 2).reshape(b, n - outputs_from, d))


class Block(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)), with optional stochastic depth."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop_path = drop_path

    def _drop(self, y: torch.Tensor, segments: Optional[Segments] = None) -> torch.Tensor:
        if not self.training or self.drop_path == 0.0:
            return y
        keep = 1.0 - self.drop_path
        if segments is not None:
            # Packed [T, D]: one draw per sequence, as the dense path draws one per sample.
            per_segment = y.new_empty(segments.num_segments).bernoulli_(keep)
            return y * (per_segment[segments.segment_ids.to(y.device)] / keep)[:, None]
        mask = y.new_empty(y.shape[0], 1, 1).bernoulli_(keep)
        return y * mask / keep

    def forward(self, x: torch.Tensor, segments: Optional[Segments] = None, outputs_from: int = 0,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: [B, N, D], or packed [T, D] with ``segments``; ``outputs_from``, ``mask``: see :class:`Attention`."""
        x = x[:, outputs_from:] + self._drop(self.attn(self.norm1(x), segments, outputs_from, mask), segments)
        return x + self._drop(self.mlp(self.norm2(x)), segments)


class Transformer(nn.Module):
    """A stack of :class:`Block` followed by a final LayerNorm.

    Runs on a dense batch [B, N, D] or on a packed batch [T, D] with its :class:`Segments` (a
    padded batch's real tokens ``x[real]``, restored by :func:`unpack`).

    >>> Transformer(16, depth=2, heads=2)(torch.randn(3, 5, 16)).shape
    torch.Size([3, 5, 16])
    >>> Transformer(16, depth=2, heads=2)(torch.randn(9, 16), segments=Segments([4, 5])).shape
    torch.Size([9, 16])
    """

    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, r) for r in rates)
        self.norm = nn.LayerNorm(dim)
        init_weights(self)
        # Rescale residual output projections by depth, as in I-JEPA, so deep stacks start stable.
        for i, blk in enumerate(self.blocks):
            blk.attn.proj.weight.data.div_(math.sqrt(2.0 * (i + 1)))
            blk.mlp[2].weight.data.div_(math.sqrt(2.0 * (i + 1)))

    def forward(self, x: torch.Tensor, segments: Optional[Segments] = None, outputs_from: int = 0,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: [B, N, D] -> [B, N, D], or packed x: [T, D] with ``segments`` -> [T, D].

        ``outputs_from`` (dense only): return the outputs of tokens ``outputs_from:`` alone, [B, N -
        outputs_from, D], the same numbers for less work (the last block computes nothing else; the
        predictor needs only its queries' outputs). ``mask`` (dense only): bool [N, N], True where
        query i may attend to key j (the world model's block-causal mask)."""
        if (outputs_from or mask is not None) and segments is not None:
            raise ValueError("outputs_from and mask apply to dense batches only")
        for i, block in enumerate(self.blocks):
            x = block(x, segments, outputs_from if i == len(self.blocks) - 1 else 0, mask)
        return self.norm(x)


def init_weights(module: nn.Module) -> None:
    """Truncated-normal linear weights, zero biases, unit LayerNorms (the ViT/I-JEPA init)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
