"""Schedules and coefficient tables against OpenAI's GaussianDiffusion (the oracle)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffaug_fast.diffusion.schedule import cosine_betas, linear_betas, make_schedule


def _oracle(name, steps, rescale):
    from guided_diffusion.script_util import create_gaussian_diffusion

    return create_gaussian_diffusion(steps=steps, noise_schedule=name, learn_sigma=True, rescale_timesteps=rescale)


@pytest.mark.parametrize("name,steps", [("linear", 1000), ("cosine", 4000), ("linear", 250), ("cosine", 1000)])
def test_tables_equal_oracle(name, steps):
    ours = make_schedule(name, steps)
    od = _oracle(name, steps, False)
    np.testing.assert_allclose(ours.alphas_cumprod, od.alphas_cumprod, rtol=1e-12, atol=0)
    t = torch.arange(steps)
    coef = ours.gather(t)
    assert coef.dtype == torch.float32 and coef.shape == (steps, 4)
    # exactly the oracle's float64 -> float32 gather
    for col, arr in enumerate([od.sqrt_alphas_cumprod, od.sqrt_one_minus_alphas_cumprod,
                               od.sqrt_recip_alphas_cumprod, od.sqrt_recipm1_alphas_cumprod]):
        torch.testing.assert_close(coef[:, col], torch.from_numpy(arr).float(), rtol=1e-7, atol=0)


def test_spec_values():
    s = make_schedule("linear", 1000)
    table = {0: (0.9999, 0.010), 50: (0.970, 0.176), 250: (0.521, 0.96), 450: (0.126, 2.64),
             700: (0.00687, 12.0), 999: (4.04e-5, 157.4)}
    for t, (abar, gain) in table.items():
        assert s.alphas_cumprod[t] == pytest.approx(abar, rel=5e-3)
        assert s.sqrt_recipm1_alphas_cumprod[t] == pytest.approx(gain, rel=5e-3)


def test_linear_and_cosine_definitions():
    b = linear_betas(1000)
    assert b[0] == 1e-4 and b[-1] == 0.02 and b.dtype == np.float64
    np.testing.assert_allclose(linear_betas(4000), np.linspace(2.5e-5, 0.005, 4000))
    c = cosine_betas(4000)
    assert c.max() <= 0.999 and c[-1] == 0.999
    abar = np.cumprod(1 - c)
    s = np.arange(1, 4001) / 4000
    expect = np.cos((s + 0.008) / 1.008 * np.pi / 2) ** 2 / np.cos(0.008 / 1.008 * np.pi / 2) ** 2
    np.testing.assert_allclose(abar[:-1], expect[:-1], rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("steps,rescale", [(1000, False), (4000, True)])
def test_timestep_convention_matches_oracle(steps, rescale):
    s = make_schedule("cosine", steps, rescale)
    od = _oracle("cosine", steps, rescale)
    t = torch.tensor([0, 1, steps // 2, steps - 1])
    seen = {}

    def model(x, ts):
        seen["t"] = ts
        return torch.zeros(x.shape[0], 6, *x.shape[2:])

    od.p_mean_variance(model, torch.zeros(4, 3, 2, 2), t)
    ours = s.model_timesteps(t)
    assert ours.dtype == seen["t"].dtype
    torch.testing.assert_close(ours, seen["t"])


def test_unknown_schedule():
    with pytest.raises(ValueError, match="unknown noise schedule"):
        make_schedule("sigmoid", 1000)


@pytest.mark.parametrize("name,steps", [("linear", 1000), ("cosine", 4000), ("cosine", 1000)])
def test_snr_timestep_is_first_t_with_enough_noise(name, steps):
    """t* for denoised smoothing: the first t whose sqrt((1-abar)/abar) >= 2 sigma, so x_t never carries less
    noise than the certificate assumes (the nearest t, 144 on linear-1000 for sigma 0.25, would)."""
    s = make_schedule(name, steps)
    ratio = np.sqrt((1 - s.alphas_cumprod) / s.alphas_cumprod)
    for sigma in (0.12, 0.25, 0.5, 1.0):
        t = s.snr_timestep(sigma)
        assert ratio[t] >= 2 * sigma and (t == 0 or ratio[t - 1] < 2 * sigma)
    with pytest.raises(ValueError, match="positive"):
        s.snr_timestep(0.0)
    with pytest.raises(ValueError, match="beyond"):
        s.snr_timestep(1e6)


def test_snr_timestep_published_values():
    s = make_schedule("linear", 1000)  # Carlini et al. 2023 / the DiffAug paper: 145, 259, 396
    assert [s.snr_timestep(v) for v in (0.25, 0.5, 1.0)] == [145, 259, 396]
