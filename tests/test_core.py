import copy

import pytest
import torch

from multijepa.core.jepa import cosine_schedule
from multijepa.core.losses import feature_health, latent_loss, normalize_targets, sigreg, vicreg
from multijepa.core.masking import sample_block_masks
from multijepa.core.transformer import sincos_embed
from multijepa.recipe import load_recipe, token_grid
from multijepa.tokenizers.image import image_tokenizer
from multijepa.train import build_model
from conftest import IMAGE_RECIPE, TINY_IMAGE


def test_image_tokenizer__shapes_and_row_major_coords():
    tokens, coords = image_tokenizer(channels=3, patch_size=4, dim=24)(torch.randn(2, 3, 12, 16))
    assert tokens.shape == (2, 12, 24) and coords.shape == (2, 12, 2)
    assert coords[0, :5].tolist() == [[0, 0], [0, 1], [0, 2], [0, 3], [1, 0]]


def test_sincos_embed__distinct_per_position_and_padded():
    coords = torch.tensor([[[0.0, 0.0], [0.0, 1.0], [1.0, 0.0]]])
    e = sincos_embed(coords, 10)
    assert e.shape == (1, 3, 10)
    assert not torch.allclose(e[0, 1], e[0, 2])
    assert torch.all(e[..., 8:] == 0)


@pytest.mark.parametrize("regularizer", ["none", "sigreg", "vicreg"])
@pytest.mark.parametrize("loss", ["l1", "l2", "smooth_l1"])
def test_jepa__forward_backward_finite(loss, regularizer):
    recipe = load_recipe(IMAGE_RECIPE, TINY_IMAGE + [f"loss.type={loss}", f"loss.regularizer={regularizer}"])
    model = build_model(recipe)
    x = torch.randn(4, 3, 16, 16)
    ctx, tgt = sample_block_masks(token_grid(recipe), recipe.mask, 4, torch.Generator().manual_seed(0))
    out = model({"image": {"input": x, "context_idx": ctx, "target_idx": tgt}})
    assert torch.isfinite(out["loss"]) and out["target_pooled"].shape == (4, 32)
    out["loss"].backward()
    grads = [p.grad for p in model.context.parameters()] + [p.grad for p in model.predictor.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(p.grad is None for p in model.target.parameters())


@pytest.mark.parametrize("regularizer", ["sigreg", "vicreg"])
def test_jepa__regularizer_sees_one_embedding_per_sample_or_every_real_context_token(monkeypatch, regularizer):
    """loss.regularizer_on=samples: the mean of each sample's real context tokens; tokens: all of them,
    padding left out. SIGReg draws its directions from a counter (the same on every rank)."""
    from multijepa.core import jepa

    seen, real = [], getattr(jepa, regularizer)
    monkeypatch.setattr(jepa, regularizer, lambda z, *a, **k: (seen.append(z.detach().clone()), real(z, *a, **k))[1])
    x = torch.randn(4, 3, 16, 16)
    ctx, tgt = sample_block_masks(token_grid(load_recipe(IMAGE_RECIPE, TINY_IMAGE)), load_recipe(IMAGE_RECIPE).mask, 4,
                                  torch.Generator().manual_seed(0))
    ctx[0, -2:] = -1  # two padded context slots in sample 0
    part = {"input": x, "context_idx": ctx, "target_idx": tgt, "valid": torch.ones(4, 16, dtype=torch.bool)}
    for on in ("samples", "tokens"):
        recipe = load_recipe(IMAGE_RECIPE, TINY_IMAGE + [f"loss.regularizer={regularizer}", f"loss.regularizer_on={on}"])
        torch.manual_seed(0)
        model = build_model(recipe)
        assert torch.isfinite(model({"image": part})["loss"])
        contexts, _ = model.context.encode({"image": (x, ctx.clamp_min(0), ctx >= 0)})
        enc, real_ctx = contexts["image"][0], ctx >= 0
        if on == "samples":
            expected = torch.stack([enc[i][real_ctx[i]].mean(0) for i in range(4)])
        else:
            expected = enc[real_ctx]
        torch.testing.assert_close(seen[-1], expected, rtol=1e-4, atol=1e-5)
        assert model.sigreg_draws == (1 if regularizer == "sigreg" else 0)


def test_normalize_targets__none_layer_and_instance_over_real_tokens():
    feats = torch.randn(2, 6, 8) * 3 + 5
    assert torch.equal(normalize_targets(feats, "none"), feats)
    layer = normalize_targets(feats, "layer")
    assert torch.allclose(layer.mean(-1), torch.zeros(2, 6), atol=1e-5)
    inst = normalize_targets(feats, "instance")  # each feature over the sample's tokens
    assert torch.allclose(inst.mean(1), torch.zeros(2, 8), atol=1e-5)
    assert torch.allclose(inst.std(1, unbiased=False), torch.ones(2, 8), atol=1e-3)
    assert torch.allclose(normalize_targets(feats + torch.randn(2, 1, 8), "instance"), inst, atol=1e-4)
    valid = torch.tensor([[True] * 4 + [False] * 2, [True] * 6])
    padded = torch.cat([feats[:1, :4], torch.full((1, 2, 8), 1e3)], 1)  # padding values must not count
    out = normalize_targets(torch.cat([padded, feats[1:]]), "instance", valid)
    assert torch.allclose(out[0, :4], normalize_targets(feats[:1, :4], "instance")[0], atol=1e-5)
    assert (out[0, 4:] == 0).all() and torch.allclose(out[1], inst[1], atol=1e-5)
    with pytest.raises(ValueError, match="loss.target_norm"):
        normalize_targets(feats, "batch")


def test_jepa__instance_normalised_targets_train():
    x = torch.randn(4, 3, 16, 16)
    losses = {}
    for how in ["layer", "instance"]:
        recipe = load_recipe(IMAGE_RECIPE, TINY_IMAGE + [f"loss.target_norm={how}"])
        torch.manual_seed(0)
        model = build_model(recipe)
        ctx, tgt = sample_block_masks(token_grid(recipe), recipe.mask, 4, torch.Generator().manual_seed(0))
        out = model({"image": {"input": x, "context_idx": ctx, "target_idx": tgt}})
        assert torch.isfinite(out["loss"])
        out["loss"].backward()
        losses[how] = out["prediction"].item()
    assert losses["layer"] != pytest.approx(losses["instance"], rel=1e-3)  # the setting reaches the loss


def test_update_target__is_exact_ema():
    model = build_model(load_recipe(IMAGE_RECIPE, TINY_IMAGE))
    with torch.no_grad():
        for p in model.context.parameters():
            p.add_(torch.randn_like(p))
    before = copy.deepcopy(model.target.state_dict())
    online = copy.deepcopy(model.context.state_dict())
    model.update_target(0.9)
    after = model.target.state_dict()
    for name in before:
        assert torch.allclose(after[name], 0.9 * before[name] + 0.1 * online[name], atol=1e-6)
    model.update_target(1.0)
    assert all(torch.equal(after[k], model.target.state_dict()[k]) for k in after)


def test_latent_loss__values():
    a, b = torch.zeros(2, 3), torch.full((2, 3), 2.0)
    assert latent_loss(a, b, "l1") == 2.0 and latent_loss(a, b, "l2") == 4.0 and latent_loss(a, b, "smooth_l1") == 1.5


def test_sigreg__small_for_gaussian_large_for_collapsed():
    g = torch.Generator().manual_seed(0)
    gaussian = torch.randn(2048, 32, generator=g)
    collapsed = torch.randn(2048, 1, generator=g).expand(-1, 32) * 0.01
    assert sigreg(gaussian, 64, g) < 2 < 100 < sigreg(collapsed, 64, g)  # N-scaled: ~1 and ~0.4 N


def test_vicreg__penalises_collapse():
    assert vicreg(torch.randn(512, 16)) < vicreg(torch.zeros(512, 16))


def test_feature_health__detects_collapse():
    spread = feature_health(torch.randn(64, 32))
    collapsed = feature_health(torch.ones(64, 32) + 1e-6 * torch.randn(64, 32))
    assert spread["target_erank"] > 20 and spread["target_std"] > 0.5
    assert collapsed["target_std"] < 1e-3


def test_cosine_schedule__warmup_then_decay():
    assert cosine_schedule(5, 100, 1.0, 0.0, warmup=10) == 0.5
    assert cosine_schedule(10, 100, 1.0, 0.0, warmup=10) == 1.0
    assert abs(cosine_schedule(55, 100, 1.0, 0.0, warmup=10) - 0.5) < 1e-9
    assert cosine_schedule(100, 100, 0.996, 1.0) == 1.0  # EMA momentum rises
