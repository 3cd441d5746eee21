"""The speed work of issue #16: precision chosen by hardware, the measured attention kernel choice,
the predictor's last block computed for its queries alone, the fused optimizer and train.compile."""

import contextlib
import os
import platform
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from multijepa.core import transformer as tr
from multijepa.core.masking import sample_block_masks
from multijepa.core.transformer import ATTENTION_TABLE, Segments, Transformer, attention, attention_kernel
from multijepa.recipe import load_recipe, token_grid
from multijepa.train import autocast, build_model, native_bf16, pretrain, resolve_precision
from conftest import IMAGE_RECIPE, TINY_IMAGE, losses

CPU = torch.device("cpu")


# ---- precision -------------------------------------------------------------------------------------


@pytest.mark.parametrize("capabilities, expected", [
    ({"avx512_bf16": True, "amx_bf16": False}, "bf16"),
    ({"avx512_bf16": False, "amx_bf16": True}, "bf16"),
    ({"avx512_bf16": False, "amx_bf16": False, "avx2": True}, "fp32"),
    ({}, "fp32"),
])
def test_resolve_precision__auto_follows_the_cpu_bf16_units(monkeypatch, capabilities, expected):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    precision, why = resolve_precision("auto", CPU)
    assert precision == expected and why.startswith("auto")
    assert (native_bf16(CPU) is not None) == (expected == "bf16")
    # What the recipe sets is kept, whatever the hardware.
    assert resolve_precision("fp32", CPU)[0] == "fp32" and resolve_precision("bf16", CPU)[0] == "bf16"


def test_resolve_precision__rejects_unknown_names():
    with pytest.raises(Exception, match="precision 'fp16': use auto, fp32 or bf16"):
        resolve_precision("fp16", CPU)


# ---- the allocator ---------------------------------------------------------------------------------


_FAULTS = """
import resource, sys, torch
from multijepa.train import keep_freed_memory
tuned = keep_freed_memory() if sys.argv[1] == "tune" else False
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.ones(24 << 20).sum()  # 96 MiB, once, so the heap has grown to it
before = faults()
for _ in range(10):
    torch.ones(24 << 20).sum()  # the same size, allocated and freed again
print(tuned, faults() - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_keep_freed_memory__stops_refaulting_large_blocks():
    """Under glibc's defaults a 96 MiB tensor is mmapped and unmapped each time (24,576 fresh pages a
    time); once tuned the heap keeps and reuses it. MULTIJEPA_MALLOC=system leaves glibc's defaults."""
    def run(mode, **env):
        out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True,
                             env={**{k: v for k, v in os.environ.items() if k != "MULTIJEPA_MALLOC"}, **env}
                             ).stdout.split()
        return out[0] == "True", int(out[1])
    tuned, tuned_faults = run("tune")
    _, default_faults = run("default")
    off, _ = run("tune", MULTIJEPA_MALLOC="system")
    assert tuned and not off
    # Measured: 245,770 faults by default; tuned 0 (24,576 in one run of five: one refault of the ten).
    assert default_faults > 10 * 20000 and tuned_faults < default_faults / 4, (tuned_faults, default_faults)


def _tiny_batch(recipe, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 3, 16, 16, generator=g)
    ctx, tgt = sample_block_masks(token_grid(recipe), recipe.mask, 8, g)
    return {"image": {"input": x, "context_idx": ctx, "target_idx": tgt}}


@pytest.mark.parametrize("regularizer", ["none", "sigreg", "vicreg"])
def test_bf16_autocast__loss_agrees_with_fp32_and_stays_float32(regularizer):
    """On a fixed batch, weights and SIGReg directions the bf16 loss and its parts are within 1% of the
    fp32 ones (measured: within 0.02%); they, and the residual stream, stay float32."""
    recipe = load_recipe(IMAGE_RECIPE, TINY_IMAGE + [f"loss.regularizer={regularizer}", "loss.regularizer_weight=1"])
    torch.manual_seed(0)
    model = build_model(recipe)
    for seed in range(3):
        parts = _tiny_batch(recipe, seed)
        model.sigreg_draws = seed  # the same SIGReg directions
        out32 = model(parts)
        model.sigreg_draws = seed
        with autocast("bf16", CPU):
            out16 = model(parts)
        for key in ("loss", "prediction", "regularizer"):
            assert out16[key].dtype == torch.float32, key
            assert out16[key].item() == pytest.approx(out32[key].item(), rel=0.01, abs=1e-5), key
        assert out16["target_pooled"].dtype == torch.float32


@pytest.mark.parametrize("regularizer", ["sigreg", "vicreg"])
def test_jepa__loss_section_runs_without_autocast(monkeypatch, regularizer):
    """Autocast would run the regularisers' matmuls in bf16 whatever ``.float()`` says: the model
    turns it off for the loss, and the regulariser sees float32 tokens."""
    from multijepa.core import jepa

    seen = []
    real = getattr(jepa, regularizer)

    def spy(z, *args, **kwargs):
        seen.append((torch.is_autocast_enabled("cpu"), z.dtype))
        return real(z, *args, **kwargs)

    monkeypatch.setattr(jepa, regularizer, spy)
    recipe = load_recipe(IMAGE_RECIPE, TINY_IMAGE + [f"loss.regularizer={regularizer}", "loss.regularizer_weight=1"])
    model = build_model(recipe)
    with autocast("bf16", CPU):
        assert torch.is_autocast_enabled("cpu")
        out = model(_tiny_batch(recipe))
    assert seen == [(False, torch.float32)]
    assert out["regularizer"].dtype == out["loss"].dtype == torch.float32


def test_embedder__bf16_embeddings_agree_with_fp32(monkeypatch):
    from multijepa.embed import Embedder

    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": True})
    recipe = load_recipe(IMAGE_RECIPE, TINY_IMAGE)
    images = [torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    auto = Embedder.random_init(recipe)
    fp32 = Embedder.random_init(recipe, precision="fp32")
    assert (auto.precision, fp32.precision) == ("bf16", "fp32")
    a, b = torch.from_numpy(auto.embed(images)), torch.from_numpy(fp32.embed(images))
    assert a.dtype == torch.float32 and a.shape == b.shape == (6, 32)
    assert F.cosine_similarity(a, b).min() > 0.999
    assert auto.for_modality("image").precision == "bf16"


def test_pretrain__says_device_precision_and_parameters_first(tmp_path, shapes, capfd, monkeypatch):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": False})
    run = tmp_path / "run"
    pretrain(load_recipe(IMAGE_RECIPE, TINY_IMAGE + [f"data.path={shapes}", f"run.dir={run}", "train.steps=2",
                                                     "train.log_every=1", "data.num_workers=0", "train.threads=1",
                                                     "train.progress=false", "train.precision=auto"]))
    first = capfd.readouterr().err.strip().splitlines()[0]
    assert first.startswith("pretrain image on cpu, 1 threads, fp32 (auto: no native bf16 matrix products on cpu)")
    assert "encoder 0.0" in first and "predictor 0.0" in first and "M parameters" in first and "from step 0" in first


# ---- attention kernel --------------------------------------------------------------------------------


def test_attention_table__rows_are_well_formed_and_sorted_by_head_dim():
    for (device, dtype, kind), rows in ATTENTION_TABLE.items():
        assert device in ("cpu", "cuda") and isinstance(dtype, torch.dtype) and kind in ("train", "infer")
        dims = [d for d, _, _ in rows]
        assert dims == sorted(dims) and len(set(dims)) == len(dims)
        assert all(form in ("sdpa", "matmul") and tokens > 0 for _, tokens, form in rows)


def test_attention_kernel__reads_the_measured_table():
    bf16, fp32 = torch.bfloat16, torch.float32
    # bf16 on the CPU: the plain form at JEPA's lengths (3.9x faster than SDPA at 64 tokens x 64), SDPA for long sequences.
    assert attention_kernel(CPU, bf16, 64, 64) == "matmul"
    assert attention_kernel(CPU, bf16, 1024, 64) == "sdpa"
    # The first row whose head dim covers the call decides: forward only, 200 tokens at head dim 32 are
    # past its 128, at head dim 64 within its 256.
    assert attention_kernel(CPU, bf16, 200, 32, training=False) == "sdpa"
    assert attention_kernel(CPU, bf16, 200, 64, training=False) == "matmul"
    # fp32: SDPA when training, the plain form forward-only on short sequences (the target encoder).
    assert attention_kernel(CPU, fp32, 64, 64, training=True) == "sdpa"
    assert attention_kernel(CPU, fp32, 64, 64, training=False) == "matmul"
    assert attention_kernel(CPU, fp32, 196, 64, training=False) == "sdpa"
    # Unmeasured: head dims over 128, CUDA, fp16.
    assert attention_kernel(CPU, bf16, 64, 256) == "sdpa"
    assert attention_kernel(torch.device("cuda"), bf16, 64, 64) == "sdpa"
    assert attention_kernel(CPU, torch.float16, 64, 64) == "sdpa"


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("grad", [False, True])
def test_attention__both_forms_give_sdpa_numbers_forward_and_backward(monkeypatch, dtype, tol, masked, grad):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, 10, 16, generator=g).to(dtype).requires_grad_(grad) for _ in range(3))
    mask = (torch.rand(3, 1, 1, 10, generator=g) > 0.3) if masked else None
    if mask is not None:
        mask[..., 0] = True  # every row keeps a key
    results = {}
    for form in ("sdpa", "matmul"):
        monkeypatch.setattr(tr, "attention_kernel", lambda *a, form=form, **kw: form)
        with torch.no_grad() if not grad else contextlib.nullcontext():
            out = attention(q, k, v, mask)
        grads = torch.autograd.grad(out.float().square().sum(), (q, k, v)) if grad else ()
        results[form] = (out.float(), [x.float() for x in grads])
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
    for form, (out, grads) in results.items():
        assert torch.allclose(out, ref, atol=tol, rtol=tol), form
    for a, b in zip(results["sdpa"][1], results["matmul"][1]):
        assert torch.allclose(a, b, atol=10 * tol, rtol=10 * tol)


def test_attention__picks_its_form_by_the_table(monkeypatch):
    calls = []
    real_sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **kw: calls.append("sdpa") or real_sdpa(*a, **kw))
    q = torch.randn(2, 2, 8, 64, dtype=torch.bfloat16)
    attention(q, q, q)  # bf16, 8 tokens: the plain form
    assert calls == []
    attention(q.float(), q.float(), q.float().requires_grad_())  # fp32 training: SDPA
    assert calls == ["sdpa"]


def test_packed_reference_attention__uses_the_chosen_form_and_matches_per_sequence(monkeypatch):
    """The CPU packed path (padded, key-masked) runs the bf16-chosen plain form and still equals
    each sequence attended alone."""
    g = torch.Generator().manual_seed(0)
    lengths = [5, 3, 7]
    q, k, v = (torch.randn(sum(lengths), 2, 8, generator=g).to(torch.bfloat16) for _ in range(3))
    assert attention_kernel(CPU, torch.bfloat16, 7, 8, training=False) == "matmul"
    out = tr.packed_attention(q, k, v, Segments(lengths)).float()
    start = 0
    for n in lengths:
        s = slice(start, start + n)
        alone = F.scaled_dot_product_attention(*(z[s].float().transpose(0, 1) for z in (q, k, v))).transpose(0, 1)
        assert torch.allclose(out[s], alone, atol=3e-2)
        start += n


# ---- the predictor's last block ---------------------------------------------------------------------


@pytest.mark.parametrize("drop_path", [0.0, 0.3])
def test_transformer_outputs_from__same_outputs_and_gradients_for_less_work(drop_path):
    torch.manual_seed(0)
    t = Transformer(32, depth=3, heads=4, drop_path=drop_path)
    x = torch.randn(4, 12, 32, requires_grad=True)
    torch.manual_seed(1)
    full = t(x)[:, 7:]
    gx_full, = torch.autograd.grad(full.square().sum(), x)
    gw_full = torch.autograd.grad(t(x)[:, 7:].square().sum(), t.blocks[-1].attn.qkv.weight) if not drop_path else None
    torch.manual_seed(1)
    part = t(x, outputs_from=7)
    assert part.shape == (4, 5, 32)
    assert torch.allclose(part, full, atol=1e-6)
    gx_part, = torch.autograd.grad(part.square().sum(), x)
    assert torch.allclose(gx_part, gx_full, atol=1e-5)
    if gw_full is not None:
        gw_part = torch.autograd.grad(t(x, outputs_from=7).square().sum(), t.blocks[-1].attn.qkv.weight)
        assert torch.allclose(gw_part[0], gw_full[0], atol=1e-5)
    with pytest.raises(ValueError, match="dense"):
        t(x[0], segments=Segments([12]), outputs_from=7)


def test_predictor__dense_and_packed_predictions_agree():
    """The dense pass (queries only in the last block) and the packed pass (everything) predict the same."""
    recipe = load_recipe(IMAGE_RECIPE, TINY_IMAGE)
    torch.manual_seed(0)
    model = build_model(recipe).eval()
    parts = _tiny_batch(recipe)["image"]
    ctx, coords = model.context(parts["input"], "image", parts["context_idx"])
    b, m, nt = parts["target_idx"].shape
    _, all_coords = model.context(parts["input"], "image")
    tc = all_coords.gather(1, parts["target_idx"].reshape(b, -1, 1).expand(-1, -1, 2)).reshape(b, m, nt, 2)
    dense = model.predictor(ctx, coords, tc)
    real_c, real_t = torch.ones(ctx.shape[:2], dtype=torch.bool), torch.ones(b, m, nt, dtype=torch.bool)
    real_t[0, 0, -1] = False  # one padded query forces the packed path (and changes its own sequence)
    packed = model.predictor(ctx, coords, tc, real_c, real_t)
    assert torch.allclose(dense[1:], packed[1:], atol=1e-5) and torch.allclose(dense[0, 1:], packed[0, 1:], atol=1e-5)


# ---- optimizer and compile ---------------------------------------------------------------------------


def test_pretrain__fused_adamw_resumes_on_the_same_curve(tmp_path, shapes):
    base = TINY_IMAGE + [f"data.path={shapes}", "train.log_every=1", "data.num_workers=0", "train.threads=1",
                         "train.progress=false", "train.checkpoint_every=2"]
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    pretrain(load_recipe(IMAGE_RECIPE, base + [f"run.dir={straight}", "train.steps=4"]))
    pretrain(load_recipe(IMAGE_RECIPE, base + [f"run.dir={halves}", "train.steps=2"]))
    pretrain(load_recipe(IMAGE_RECIPE, base + [f"run.dir={halves}", "train.steps=4"]))
    state = torch.load(straight / "last.pt", weights_only=True)
    assert state["optimizer"]["param_groups"][0]["fused"] is True
    a, b = losses(halves), losses(straight)  # the first half ran a 2-step schedule: equal to rounding
    assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], rel=1e-4) for k in a)


def test_pretrain__compile_trains_and_checkpoints_eager_names(tmp_path, shapes):
    """train.compile: the same run, compiled (its parameter names, and so its checkpoints, unchanged);
    losses within float rounding of the eager run's."""
    base = TINY_IMAGE + [f"data.path={shapes}", "train.log_every=1", "data.num_workers=0", "train.threads=1",
                         "train.progress=false", "train.steps=2", "train.precision=fp32"]
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    pretrain(load_recipe(IMAGE_RECIPE, base + [f"run.dir={eager}"]))
    pretrain(load_recipe(IMAGE_RECIPE, base + [f"run.dir={compiled}", "train.compile=true"]))
    a, b = losses(eager), losses(compiled)
    assert a.keys() == b.keys() and all(b[k] == pytest.approx(a[k], rel=1e-4) for k in a)
    names = set(torch.load(compiled / "last.pt", weights_only=True)["model"])
    assert names == set(torch.load(eager / "last.pt", weights_only=True)["model"])
    assert not any("_orig_mod" in n for n in names)
