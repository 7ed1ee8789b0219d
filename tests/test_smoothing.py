"""Randomized smoothing: exact radii of a linear classifier, scipy's Clopper-Pearson, the denoised path
against guided_diffusion's p_sample, the t* rule, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import oracle_model_and_diffusion, randomize_
from scipy.stats import binomtest, norm

import diffaug_fast as df
from diffaug_fast.eval.smoothing import ABSTAIN, Smooth, certified_accuracy, lower_confidence_bound
from diffaug_fast.ops.philox import philox_normal

SHAPE = (3, 4, 4)


class Linear2(torch.nn.Module):
    """f(x) = [w.x + b > 0] as two logits (-(w.x + b), w.x + b)."""

    def __init__(self, w: torch.Tensor, b: float):
        super().__init__()
        self.w, self.b = w, b

    def forward(self, x):
        s = x.flatten(1) @ self.w.flatten() + self.b
        return torch.stack([-s, s], 1)


def _linear_points(seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(SHAPE, generator=g)
    x = torch.rand(SHAPE, generator=g)
    return w, x


@pytest.mark.parametrize("sigma", [0.25, 1.0])
def test_linear_classifier_radius_is_sound_and_tight(sigma, device):
    """g's true radius is |w.x + b| / ||w||: certified <= true, within 15% for pA in [0.7, 0.99]."""
    w, x = (v.to(device) for v in _linear_points())
    wn = w.norm().item()
    wx = (w * x).sum().item()
    for i, p_a in enumerate(np.linspace(0.7, 0.99, 6)):
        for side in (1, -1):
            # choose b so the margin puts P(f(x + d) = class) at exactly p_a
            margin = side * sigma * wn * norm.ppf(p_a)
            smooth = Smooth(Linear2(w, margin - wx), 2, sigma, seed=100 * i + side)
            label, radius = smooth.certify(x, n0=100, n=10_000, alpha=0.001, batch_size=10_000)
            true_radius = abs(margin) / wn
            assert label == (1 if side > 0 else 0)
            assert radius <= true_radius, (p_a, radius, true_radius)
            assert radius >= 0.85 * true_radius, (p_a, radius, true_radius)
            assert smooth.predict(x, n=10_000, alpha=0.001, batch_size=10_000) == label


def test_boundary_points_abstain():
    w, x = _linear_points(1)
    wx = (w * x).sum().item()
    for seed in range(3):
        smooth = Smooth(Linear2(w, -wx), 2, 0.5, seed=seed)  # x on the decision boundary: pA = 1/2
        assert smooth.certify(x, 100, 10_000, 0.001, 5_000) == (ABSTAIN, 0.0)
        assert smooth.predict(x, 2_000, 0.001, 2_000) == ABSTAIN


def test_bound_equals_scipy_clopper_pearson():
    for n_a, n in [(0, 100), (1, 100), (50, 100), (99, 100), (100, 100), (7_013, 10_000), (9_990, 10_000)]:
        for alpha in (0.001, 0.05):
            ref = binomtest(n_a, n).proportion_ci(confidence_level=1 - 2 * alpha, method="exact").low
            assert lower_confidence_bound(n_a, n, alpha) == pytest.approx(ref, abs=1e-12)


def test_noise_is_philox_and_fresh_per_draw(device):
    w, x = (v.to(device) for v in _linear_points())
    smooth = Smooth(Linear2(w, 0.0), 2, 0.5, seed=7)
    a, b = smooth.noisy_views(x, 3), smooth.noisy_views(x, 3)
    z = philox_normal((6, *SHAPE), 7, 0, device)
    torch.testing.assert_close(torch.cat([a, b]), x + 0.5 * z, atol=1e-5, rtol=0)


def test_certified_accuracy_counts_correct_and_radius():
    radius = [0.0, 0.3, 0.6, 1.2, 2.9]
    correct = [0, 1, 1, 0, 1]
    assert certified_accuracy(radius, correct, [0.0, 0.5, 1.0, 3.0]) == [0.6, 0.4, 0.2, 0.0]


@pytest.fixture(scope="module")
def pair():
    cfg = df.get_preset("adm-tiny")
    oracle, diffusion = oracle_model_and_diffusion(cfg)
    randomize_(oracle, seed=3)
    return oracle, diffusion, df.load_denoiser(oracle.state_dict(), "adm-tiny")


@pytest.mark.parametrize("sigma", [0.25, 0.5])
def test_denoised_path_equals_p_sample_pred_xstart(pair, sigma):
    oracle, diffusion, den = pair
    x = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    smooth = Smooth(torch.nn.Identity(), 2, sigma, den, seed=11)
    assert smooth.t == den.schedule.snr_timestep(sigma)
    ours = smooth.noisy_views(x, 2)
    t = torch.full((2,), smooth.t)
    abar = den.schedule.alphas_cumprod[smooth.t]
    z = philox_normal((2, 3, 32, 32), 11, 0)
    x_t = (float(np.sqrt(abar)) * (2 * (x + sigma * z) - 1)).float()  # Carlini et al.: [0,1] + noise -> [-1,1] -> scaled
    with torch.no_grad():
        ref = diffusion.p_sample(oracle, x_t, t, clip_denoised=True)["pred_xstart"]
    torch.testing.assert_close(ours, (ref + 1) / 2, atol=2e-5, rtol=0)
    assert ours.min() >= 0 and ours.max() <= 1


def test_bad_input():
    w, x = _linear_points()
    clf = Linear2(w, 0.0)
    for sigma in (0.0, -0.5, float("nan")):
        with pytest.raises(ValueError, match="sigma must be a positive"):
            Smooth(clf, 2, sigma)
    smooth = Smooth(clf, 2, 0.5)
    with pytest.raises(ValueError, match="n0 <= n"):
        smooth.certify(x, 200, 100, 0.001, 50)
    with pytest.raises(ValueError, match=r"one float image \[C, H, W\]"):
        smooth.certify(x[None], 10, 100, 0.001, 50)
    with pytest.raises(ValueError, match="3 logits"):
        Smooth(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 3)), 2, 0.5).predict(x, 10, 0.001, 10)


def test_certify_and_predict_refuse_what_is_not_a_0_1_image(pair):
    """As augment's check_images does for [-1, 1]: NaN/inf, [0, 255] pixels, [-1, 1] or normalized images,
    uint8, and channels the UNet cannot take are one ValueError each, before any sample is drawn."""
    w, x = _linear_points()
    calls = []

    class Spy(Linear2):
        def forward(self, v):
            calls.append(len(v))
            return super().forward(v)

    smooth = Smooth(Spy(w, 0.0), 2, 0.5)
    bad = x.clone()
    bad[0, 1, 2] = float("nan")
    for img, match in [(bad, r"non-finite values \(NaN or inf\)"),
                       (x * 255, r"must lie in \[0, 1\] .* \[0, 255\] pixels: use x / 255"),
                       (x * 2 - 1, r"must lie in \[0, 1\] .* a \[-1, 1\] image: use \(x \+ 1\) / 2"),
                       ((x - 0.45) / 0.05, r"must lie in \[0, 1\] .* mean/std-normalized"),
                       ((x * 255).to(torch.uint8), r"one float image \[C, H, W\] in \[0, 1\]; got .*uint8 .*x.float\(\) / 255")]:
        with pytest.raises(ValueError, match=match):
            smooth.certify(img, 10, 100, 0.001, 50)
        with pytest.raises(ValueError, match=match):
            smooth.predict(img, 100, 0.001, 50)
    bad[0, 1, 2] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        smooth.certify(bad, 10, 100, 0.001, 50)
    assert calls == []  # refused before the first noisy batch
    # a resampling overshoot of a fraction of a grey level is an image, not another convention
    smooth.certify((x * 1.004).clamp(max=1.004), 10, 100, 0.001, 50)
    _, _, den = pair
    with pytest.raises(ValueError, match="x has 1 channels in dim 0, the UNet takes 3"):
        Smooth(torch.nn.Identity(), 2, 0.5, den).certify(torch.rand(1, 32, 32), 10, 100, 0.001, 50)
