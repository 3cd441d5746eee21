"""Packed (block-diagonal) attention against independent dense references.

The references here never use Segments' own indices: block-diagonal masks are built from the
lengths in the test, the per-sequence checks run the plain dense Transformer, and the padded-batch
check runs the Transformer's weights through a dense forward with a key mask, written here (the
library has no masked dense path: padded batches are packed).
"""

import pytest
import torch
import torch.nn.functional as F

from multijepa.core.transformer import Block, Segments, Transformer, packed_attention, padding_waste, unpack

LENGTHS = [3, 7, 1, 5]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="varlen / compiled flex need CUDA")
# Eager flex_attention on CPU is deliberate in these tests (it checks the flex path's logic).
quiet_flex = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def block_diagonal(lengths):
    """bool [T, T], True where both tokens belong to the same sequence, from Python lists."""
    ids = torch.tensor([i for i, n in enumerate(lengths) for _ in range(n)])
    return ids[:, None] == ids[None, :]


def dense_block_attention(q, k, v, lengths):
    """Reference: SDPA over the whole pack [T, H, hd] with a block-diagonal mask."""
    out = F.scaled_dot_product_attention(*(z.transpose(0, 1) for z in (q, k, v)),
                                         attn_mask=block_diagonal(lengths))
    return out.transpose(0, 1)


def pack(x, real):
    """Reference packing of a padded batch, as ``encode_batches`` does it: x [B, N, D] and real bool
    [B, N] (a real token in every row) -> the real tokens [T, D] in row-major order and their Segments."""
    return x[real], Segments(real.sum(1))


def dense_masked_forward(net, x, real):
    """Reference: ``net``'s weights on a padded batch x [B, N, D], padded keys hidden by an SDPA mask
    from real bool [B, N]; the pre-norm blocks spelled out, no stochastic depth. Returns [B, N, D]."""
    b, n, d = x.shape
    for block in net.blocks:
        attn = block.attn
        q, k, v = attn.qkv(block.norm1(x)).view(b, n, 3, attn.heads, d // attn.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=real[:, None, None, :])
        x = x + attn.proj(out.transpose(1, 2).reshape(b, n, d))
        x = x + block.mlp(block.norm2(x))
    return net.norm(x)


def qkv(lengths, heads=2, head_dim=8, dtype=torch.float64, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape = (sum(lengths), heads, head_dim)
    return [torch.randn(shape, generator=gen, dtype=torch.float64).to(device, dtype).requires_grad_()
            for _ in range(3)]


def grads(out, inputs, seed=1):
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return torch.autograd.grad((out * weight.to(out)).sum(), inputs)


# --- Segments, unpack, padding_waste ------------------------------------------------------------

def test_segments__offsets_ids_and_key_mask():
    seg = Segments(torch.tensor(LENGTHS))
    assert seg.cu_seqlens.dtype == torch.int32 and seg.cu_seqlens.tolist() == [0, 3, 10, 11, 16]
    assert (seg.num_segments, seg.total, seg.max_len) == (4, 16, 7)
    assert seg.segment_ids.tolist() == [0] * 3 + [1] * 7 + [2] + [3] * 5
    assert seg.key_mask.sum(1).tolist() == LENGTHS and seg.key_mask.shape == (4, 7)
    assert seg.segment_ids is seg.segment_ids  # cached, shared by every layer


@pytest.mark.parametrize("bad", [[3, 0, 2], [], [[1, 2]]])
def test_segments__rejects_empty_or_bad_lengths(bad):
    with pytest.raises(ValueError):
        Segments(bad)


def test_unpack__inverts_packing_keeps_real_tokens_and_zeros_padding():
    real = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    x = torch.randn(3, 5, 4)
    packed, seg = pack(x, real)
    assert packed.shape == (9, 4) and seg.seqlens.tolist() == [3, 5, 1]
    assert torch.equal(packed[:3], x[0, :3]) and torch.equal(packed[8], x[2, 0])
    back = unpack(packed, real)
    assert torch.equal(back[real], x[real])
    assert torch.all(back[~real] == 0)


def test_padding_waste__known_layout():
    assert padding_waste(Segments(LENGTHS)) == pytest.approx(1 - 16 / 28)
    assert padding_waste(Segments([4, 4])) == 0.0


# --- packed_attention ---------------------------------------------------------------------------

def test_packed_attention_reference__equals_dense_block_diagonal_forward_and_grads():
    q, k, v = qkv(LENGTHS)
    out = packed_attention(q, k, v, Segments(LENGTHS), backend="reference")
    ref = dense_block_attention(q, k, v, LENGTHS)
    torch.testing.assert_close(out, ref)
    for got, want in zip(grads(out, (q, k, v)), grads(ref, (q, k, v))):
        torch.testing.assert_close(got, want)


def test_packed_attention_reference__equal_lengths_unmasked_path():
    q, k, v = qkv([4, 4, 4])
    out = packed_attention(q, k, v, Segments([4, 4, 4]), backend="reference")
    torch.testing.assert_close(out, dense_block_attention(q, k, v, [4, 4, 4]))


def test_packed_attention__segment_of_length_one_attends_only_to_itself():
    q, k, v = qkv([1, 4, 1])
    out = packed_attention(q, k, v, Segments([1, 4, 1]))
    torch.testing.assert_close(out[0], v[0])
    torch.testing.assert_close(out[5], v[5])


def test_packed_attention__auto_on_cpu_is_reference_and_bad_backend_raises():
    q, k, v = qkv(LENGTHS)
    seg = Segments(LENGTHS)
    assert torch.equal(packed_attention(q, k, v, seg), packed_attention(q, k, v, seg, backend="reference"))
    with pytest.raises(ValueError, match="unknown attention backend"):
        packed_attention(q, k, v, seg, backend="flash")


def test_packed_attention_varlen__torch_without_it_is_a_clear_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch.nn.attention.varlen", None)  # as on torch < 2.10
    q, _, _ = qkv(LENGTHS)
    with pytest.raises(NotImplementedError, match="needs torch >= 2.10"):
        packed_attention(q, q, q, Segments(LENGTHS), backend="varlen")


@quiet_flex
def test_packed_attention_flex__cpu_eager_forward_equals_reference():
    # Eager flex_attention on CPU has no backward in this torch, so only the forward is checked here.
    lengths = LENGTHS + [130, 2]  # crosses a 128-token block boundary, T not a multiple of 128
    q, k, v = (z.detach() for z in qkv(lengths))
    seg = Segments(lengths)
    out = packed_attention(q, k, v, seg, backend="flex")
    torch.testing.assert_close(out, dense_block_attention(q, k, v, lengths))
    torch.testing.assert_close(out, packed_attention(q, k, v, seg, backend="reference"))


@needs_cuda
@pytest.mark.parametrize("backend", ["varlen", "flex", "auto"])
def test_packed_attention_cuda__bf16_matches_fp32_reference_forward_and_grads(backend):
    lengths = [3, 70, 1, 130, 200]
    q, k, v = qkv(lengths, heads=4, head_dim=64, dtype=torch.bfloat16, device="cuda")
    q32, k32, v32 = (z.detach().float().requires_grad_() for z in (q, k, v))
    seg = Segments(lengths, device="cuda")
    out = packed_attention(q, k, v, seg, backend=backend)
    ref = packed_attention(q32, k32, v32, seg, backend="reference")
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    for got, want in zip(grads(out, (q, k, v)), grads(ref, (q32, k32, v32))):
        torch.testing.assert_close(got.float(), want, atol=5e-2, rtol=5e-2)


@needs_cuda
def test_packed_attention_cuda__fp32_flex_matches_reference_forward_and_grads():
    lengths = [3, 70, 1, 130]
    q, k, v = qkv(lengths, heads=2, head_dim=32, dtype=torch.float32, device="cuda")
    seg = Segments(lengths, device="cuda")
    out = packed_attention(q, k, v, seg)  # auto -> flex for fp32 on CUDA
    ref = packed_attention(q, k, v, seg, backend="reference")
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    for got, want in zip(grads(out, (q, k, v)), grads(ref, (q, k, v))):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


# --- Transformer / Block in packed mode -----------------------------------------------------------

def tiny_transformer(drop_path=0.0, depth=2):
    torch.manual_seed(0)
    return Transformer(16, depth=depth, heads=2, drop_path=drop_path).double()


def test_transformer_packed__equals_each_sequence_alone_forward_and_param_grads():
    net = tiny_transformer()
    xs = [torch.randn(n, 16, dtype=torch.float64) for n in LENGTHS]
    packed_out = net(torch.cat(xs), segments=Segments(LENGTHS))
    packed_grads = torch.autograd.grad(packed_out.square().sum(), list(net.parameters()))
    alone = [net(x[None])[0] for x in xs]
    alone_grads = torch.autograd.grad(sum(o.square().sum() for o in alone), list(net.parameters()))
    torch.testing.assert_close(packed_out, torch.cat(alone))
    for got, want in zip(packed_grads, alone_grads):
        torch.testing.assert_close(got, want)


def test_transformer_packed__equals_dense_padded_path_with_key_mask():
    net = tiny_transformer()
    real = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    x = torch.randn(3, 6, 16, dtype=torch.float64)
    dense = dense_masked_forward(net, x, real)
    packed, seg = pack(x, real)
    torch.testing.assert_close(unpack(net(packed, segments=seg), real)[real], dense[real])


def test_block_drop__packed_draws_once_per_segment():
    torch.manual_seed(0)
    block = Block(16, heads=2, drop_path=0.5).train()
    lengths = [3, 1, 5, 2] * 5
    seg = Segments(lengths)
    kept = block._drop(torch.ones(seg.total, 16), seg)
    for part in kept.split(lengths):
        assert torch.all(part == part[0, 0]) and part[0, 0].item() in (0.0, 2.0)
    per_segment = {part[0, 0].item() for part in kept.split(lengths)}
    assert per_segment == {0.0, 2.0}  # 20 draws at p=0.5: both outcomes occur (fixed seed)


@pytest.mark.parametrize("drop_path", [0.5, 0.95])
def test_block_packed__training_drops_whole_segments(drop_path):
    torch.manual_seed(1)
    block = Block(16, heads=2, drop_path=drop_path).double().train()
    lengths = [3, 1, 5, 2] * 4
    x = torch.randn(sum(lengths), 16, dtype=torch.float64)
    y = block(x, segments=Segments(lengths))
    unchanged = [(a == b).all(1) for a, b in zip(y.split(lengths), x.split(lengths))]
    assert all(u.all() or not u.any() for u in unchanged)  # a segment is all kept or all dropped
    assert any(u.all() for u in unchanged)  # at these rates some segment loses both branches


def test_block_packed__eval_ignores_drop_rate():
    x = torch.randn(sum(LENGTHS), 16, dtype=torch.float64)
    seg = Segments(LENGTHS)
    torch.manual_seed(0)
    plain = Block(16, heads=2, drop_path=0.0).double().eval()
    torch.manual_seed(0)
    dropping = Block(16, heads=2, drop_path=0.9).double().eval()
    assert torch.equal(plain(x, segments=seg), dropping(x, segments=seg))
