"""AugMix (diffaug_fast/train/recipes/augmix.py) against the formulas of the authors' code
(google-research/augmix augmentations.py and imagenet.py's ``aug``), re-derived here as distributions:
each operation's magnitude (KS tests over 10,000 draws), the operation, depth, chain-weight and mixing-weight
draws, the pixel operations against numpy closed forms, and the views the rn50 recipe trains on."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from scipy import stats

from diffaug_fast.constants import IMAGENET_MEAN, IMAGENET_STD
from diffaug_fast.train.recipes import augmix as am
from diffaug_fast.train.recipes import rn50
from diffaug_fast.train.step import DiffAugPlan, StepParts, train_step

N = 10_000


def _level_cdf(level, severity):
    """CDF of the reference's sample_level(severity) = np.random.uniform(0.1, severity)."""
    return np.clip((np.asarray(level, dtype=float) - 0.1) / (severity - 0.1), 0, 1)


def _int_cdf(k, scale, severity):
    """CDF of K = int(level * scale) (the reference's int_parameter(level, 10 * scale)), k integer."""
    k = np.asarray(k, dtype=float)
    return np.where(k < 0, 0.0, _level_cdf((k + 1) / scale, severity))


def _signed_int_cdf(x, scale, severity):
    """CDF of +-K, each sign with probability 1/2, at integer x."""
    return 0.5 * _int_cdf(x, scale, severity) + 0.5 * (1 - _int_cdf(-x - 1, scale, severity))


def _jittered_ks(samples, int_cdf, rng) -> float:
    """KS p-value of integer samples X against their CDF, made continuous: Y = X + U(0, 1) has the CDF
    F(floor y - 1) + frac(y) * P(X = floor y), exact for a discrete X (a plain KS test of ties is not)."""
    y = np.asarray(samples, dtype=float) + rng.uniform(size=len(samples))

    def cdf(v):
        f = np.floor(v)
        lo, hi = int_cdf(f - 1), int_cdf(f)
        return lo + (v - f) * (hi - lo)

    return stats.kstest(y, cdf).pvalue


# the reference's magnitude of each operation as (scale of int(level * scale), sign?, offset, direction)
# posterize 4 - int(0.4 L); solarize 256 - int(25.6 L); rotate +-int(3 L); translate +-int(L * S / 30)
_DISCRETE = {"posterize": (0.4, False), "solarize": (25.6, False), "rotate": (3.0, True),
             "translate_x": (224 / 30, True), "translate_y": (224 / 30, True)}


@pytest.mark.parametrize("severity", [1.0, 3.0, 10.0])
@pytest.mark.parametrize("op", ["posterize", "solarize", "rotate", "translate_x", "translate_y", "shear_x", "shear_y"])
def test_magnitude_distribution_is_the_references(op, severity):
    rng = np.random.default_rng([am.OPS.index(op), int(severity * 10)])  # fixed: the verdict never varies
    draws = np.array([am.draw_op_param(op, rng, severity, 224) for _ in range(N)], dtype=float)
    jitter = np.random.default_rng(1)
    if op in ("shear_x", "shear_y"):  # +-0.3 L / 10: continuous
        def cdf(x):
            return 0.5 * _level_cdf(x / 0.03, severity) + 0.5 * (1 - _level_cdf(-x / 0.03, severity))
        p = stats.kstest(draws, cdf).pvalue
        assert np.abs(draws).max() <= 0.03 * severity
    else:
        scale, signed = _DISCRETE[op]
        if op == "posterize":
            k = 4 - draws
        elif op == "solarize":
            k = 256 - draws
        else:
            k = draws
        assert np.all(k == np.round(k))
        ref = (lambda x: _signed_int_cdf(x, scale, severity)) if signed else (lambda x: _int_cdf(x, scale, severity))
        p = _jittered_ks(k, ref, jitter)
        if op == "rotate" and severity == 1.0:
            # the test can fail: torchvision's AugMix(severity=1) rotates by exactly 0 degrees every time
            assert _jittered_ks(np.zeros(N), ref, jitter) < 1e-6
            assert set(np.unique(draws)) == {-2, -1, 0, 1, 2}
    assert p > 1e-3, (op, severity, p)


def test_magnitudeless_operations_draw_nothing():
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    assert am.draw_op_param("autocontrast", rng, 1.0, 224) is None
    assert am.draw_op_param("equalize", rng, 1.0, 224) is None
    assert rng.bit_generator.state == state


def test_chain_and_mixing_draws_are_the_references():
    """Over 10,000 plans: op uniform over the 9 base operations, depth uniform in {1, 2, 3}, chain weights
    Dirichlet(1, 1, 1) (marginals Beta(1, 2): mean 1/3, variance 1/18; sum 1), mixing weight Beta(1, 1)."""
    rng = np.random.default_rng(0)
    plans = [am.draw_plan(rng, am.AugMixConfig(), 224) for _ in range(N)]
    ws = np.stack([p.weights for p in plans])
    m = np.array([p.mix for p in plans])
    assert ws.dtype == np.float32 and ws.shape == (N, 3)
    np.testing.assert_allclose(ws.sum(1), 1, atol=1e-6)
    for j in range(3):
        assert stats.kstest(ws[:, j], stats.beta(1, 2).cdf).pvalue > 1e-3
    se_mean, se_var = np.sqrt(1 / 18 / N), 0.002  # 5 standard errors below
    assert abs(ws.mean() - 1 / 3) < 5 * se_mean and abs(ws.var(axis=0).mean() - 1 / 18) < 5 * se_var
    assert stats.kstest(m, stats.uniform(0, 1).cdf).pvalue > 1e-3
    assert abs(m.mean() - 0.5) < 5 * np.sqrt(1 / 12 / N) and abs(m.var() - 1 / 12) < 5 * 0.0008
    depths = np.bincount([len(c) for p in plans for c in p.chains], minlength=4)[1:]
    assert stats.chisquare(depths).pvalue > 1e-3
    ops = [name for p in plans for c in p.chains for name, _ in c]
    counts = np.array([ops.count(o) for o in am.OPS])
    assert stats.chisquare(counts).pvalue > 1e-3


def _img(seed: int = 0, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def test_pixel_operations_against_closed_forms():
    x = _img()
    img = Image.fromarray(x)
    np.testing.assert_array_equal(np.asarray(am.apply_op(img, "posterize", 4)), x & 0xF0)
    np.testing.assert_array_equal(np.asarray(am.apply_op(img, "solarize", 240)), np.where(x >= 240, 255 - x, x))
    # PIL's affine reads output (i, j) from input (i + c): an integer translation is an exact shift
    t = np.asarray(am.apply_op(img, "translate_x", 3))
    np.testing.assert_array_equal(t[:, :-3], x[:, 3:])
    assert not t[:, -3:].any()
    t = np.asarray(am.apply_op(img, "translate_y", -2))
    np.testing.assert_array_equal(t[2:], x[:-2])
    for op in ("rotate", "shear_x", "shear_y"):
        np.testing.assert_array_equal(np.asarray(am.apply_op(img, op, 0)), x)
    lo = Image.fromarray((x // 2 + 40).astype(np.uint8))  # autocontrast stretches [40, 167] to [0, 255]
    out = np.asarray(am.apply_op(lo, "autocontrast", None))
    assert out.min() == 0 and out.max() == 255


def _normalized(pixels: np.ndarray) -> torch.Tensor:
    """uint8 [b, H, W, 3] -> the loader's float [b, 3, H, W] ((p / 255 - mean) / std), computed in float64."""
    mean, std = np.array(IMAGENET_MEAN), np.array(IMAGENET_STD)
    x = (pixels.astype(np.float64) / 255 - mean) / std
    return torch.from_numpy(x.astype(np.float32)).permute(0, 3, 1, 2)


def test_recipe_views_with_every_op_disabled_are_the_clean_crop(monkeypatch):
    """The rn50 --augmix step: with every operation disabled, both AugMix views in the trained batch equal
    the clean crop's pixels within one 8-bit level (the views are made from the crop's own pixels)."""
    pixels = np.stack([_img(i) for i in range(4)])
    clean = _normalized(pixels)
    monkeypatch.setattr(rn50, "AUGMIX", am.AugMixConfig(ops=()))
    s = rn50.Settings(data="-", augmix=True, diffaug="off", diffaug_fraction=0.0)
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=4)
    buf = torch.empty(3 * 4, 3, 32, 32)
    parts = StepParts(model, torch.optim.SGD(model.parameters(), lr=0.0), torch.amp.GradScaler("cpu", enabled=False),
                      buf, torch.device("cpu"), None, DiffAugPlan.of(s, None), rn50.make_recipe(s))
    train_step(parts, {"clean": clean, "label": torch.arange(4)}, torch.Generator().manual_seed(1))
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    for v in (1, 2):
        diff = ((buf[4 * v:4 * (v + 1)] - clean) * std * 255).abs()
        assert diff.max() <= 1, (v, diff.max())
    assert torch.equal(am.crop_pixels(clean), torch.from_numpy(pixels))


def test_views_are_mixtures_of_the_crop_and_replay_from_the_step_seed():
    """Default config: a view lies within the range spanned by the clean crop and its chains' outputs, the
    same step seed gives the same views (resume), another seed other views."""
    pixels = np.stack([_img(i) for i in range(3)])
    clean = _normalized(pixels)
    a = am.augmix_views(clean, torch.Generator().manual_seed(5))
    b = am.augmix_views(clean, torch.Generator().manual_seed(5))
    c = am.augmix_views(clean, torch.Generator().manual_seed(6))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[0], a[1])
    # view 0 of image 1, recomputed from its plan (drawn as augmix_views draws it) with the reference's mix
    plan = am.draw_plan(np.random.default_rng([5, 0, 1]), am.AugMixConfig(), 32)
    chains = []
    for chain in plan.chains:
        im = Image.fromarray(pixels[1])
        for name, param in chain:
            im = am.apply_op(im, name, param)
        chains.append(np.asarray(im, dtype=np.float64) / 255)
    want = (1 - plan.mix) * pixels[1] / 255 + plan.mix * sum(w * ch for w, ch in zip(plan.weights, chains))
    got = (a[0][1].permute(1, 2, 0).double().numpy() * np.array(IMAGENET_STD) + np.array(IMAGENET_MEAN))
    np.testing.assert_allclose(got, want, atol=1e-5)
