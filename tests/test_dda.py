"""DDA (diffusion-driven adaptation) and DDA-SE against independent references.

References: guided_diffusion's own SpacedDiffusion (respacing, q_sample, p_sample, p_mean_variance), the DDA
reference loop restated here on top of it, closed forms derived for a UNet that predicts eps = 0 or the
exact eps, and torch's antialiased bicubic resize (a = -0.5, like resize_right's cubic) with the zero
borders of resize_right's pad_mode='constant' made explicit, for the low-pass filter.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import oracle_model_and_diffusion, randomize_
from torch import nn

import diffaug_fast as df
from diffaug_fast.constants import IMAGENET_MEAN, IMAGENET_STD
from diffaug_fast.eval import dda
from diffaug_fast.eval.dda import DDASettings, LowPass, RespacedChain, adapt, dda_predict, self_ensemble

LINEAR = df.make_schedule("linear", 1000)


def _spaced_diffusion(cfg: df.UNetConfig, count: int):
    from guided_diffusion.script_util import create_gaussian_diffusion

    return create_gaussian_diffusion(steps=cfg.diffusion_steps, learn_sigma=cfg.learn_sigma,
                                     noise_schedule=cfg.noise_schedule, rescale_timesteps=cfg.rescale_timesteps,
                                     timestep_respacing=str(count))


def _oracle_and_ours(name: str, out_channels: int = 6, seed: int = 1):
    cfg = replace(df.get_preset(name), out_channels=out_channels)
    oracle, _ = oracle_model_and_diffusion(cfg)
    randomize_(oracle, seed=seed)
    return cfg, oracle, df.load_denoiser(oracle.state_dict(), cfg)


def _zero_padded_resize(x: torch.Tensor, size: tuple[int, int], pad: int) -> torch.Tensor:
    """torch's antialiased bicubic resize with the border treated as zeros (explicit zero padding, cropped)."""
    (h_in, w_in), (h, w) = x.shape[-2:], size
    ph, pw = round(pad * h / h_in), round(pad * w / w_in)
    out = F.interpolate(F.pad(x, (pad, pad, pad, pad)), size=(h + 2 * ph, w + 2 * pw), mode="bicubic",
                        antialias=True, align_corners=False)
    return out[..., ph:ph + h, pw:pw + w]


def phi_ref(x: torch.Tensor, factor: int) -> torch.Tensor:
    """DDA's low-pass filter, independently: shrink by D (antialiased), crop, enlarge by D, zero borders."""
    h, w = x.shape[-2:]
    low = _zero_padded_resize(x, (h // factor, w // factor), 4 * factor)
    return _zero_padded_resize(low, (h, w), 4)


class StubDenoiser(nn.Module):
    """Duck-typed denoiser: eps = 0 (or the exact eps of a known clean image), records every call."""

    def __init__(self, out_channels: int = 3, clean: torch.Tensor | None = None, schedule=LINEAR):
        super().__init__()
        self.schedule, self.out_channels, self.clean = schedule, out_channels, clean
        self.calls: list[tuple[int, int, bool]] = []  # (batch, t, grad enabled)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls.append((x_t.shape[0], int(t[0]), torch.is_grad_enabled()))
        out = torch.zeros(x_t.shape[0], self.out_channels, *x_t.shape[2:])
        if self.clean is not None:  # the eps that x_t = sqrt(abar) clean + sqrt(1 - abar) eps implies
            abar = torch.from_numpy(self.schedule.alphas_cumprod)[t].float().view(-1, 1, 1, 1)
            out = out.clone()
            out[:, :3] = (x_t - abar.sqrt() * self.clean) / (1 - abar).sqrt()
        return out


def _noises(seed: int, shape, count: int) -> list[torch.Tensor]:
    """adapt's draws: the start noise, then one per step from N-1 down to 1 (count = N in all)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(count)]


# ----------------------------------------------------------------------------------------------------
# (a) the respaced chain is guided_diffusion's SpacedDiffusion


@pytest.mark.parametrize("steps,count", [(1000, 100), (4000, 100), (1000, 10), (50, 50), (4000, 37)])
def test_respaced_timesteps_equal_space_timesteps(steps, count):
    from guided_diffusion.respace import space_timesteps

    assert list(dda.respaced_timesteps(steps, count)) == sorted(space_timesteps(steps, [count]))


@pytest.mark.parametrize("name,out_channels", [("adm-tiny", 6), ("iddpm-tiny", 6), ("adm-tiny", 3)])
def test_reverse_step_equals_spaced_diffusion_p_sample(name, out_channels):
    """Unguided step at several respaced indices, same noise: learned-range variance (6 channels) and
    guided_diffusion's fixed-large default (3); iddpm-tiny covers cosine 4000 steps with rescaled t."""
    cfg, oracle, den = _oracle_and_ours(name, out_channels)
    count = 10
    diffusion = _spaced_diffusion(cfg, count)
    chain = RespacedChain(den.schedule, count)
    assert list(chain.timesteps) == diffusion.timestep_map
    np.testing.assert_allclose(chain.alphas_cumprod, diffusion.alphas_cumprod, rtol=1e-15)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, 32, 32, generator=g)
    y = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    for k in (0, 1, 5, count - 1):
        t = torch.full((3,), k)
        torch.manual_seed(k)  # p_sample draws its noise with randn_like
        with torch.no_grad():
            ref = diffusion.p_sample(oracle, x, t, clip_denoised=True)
        torch.manual_seed(k)
        noise = torch.randn_like(x)
        with torch.no_grad():
            sample, x0 = chain.p_sample(den, x, k, noise)
        torch.testing.assert_close(x0, ref["pred_xstart"], rtol=0, atol=1e-5)
        torch.testing.assert_close(sample, ref["sample"], rtol=0, atol=1e-5)
        torch.testing.assert_close(chain.q_sample(y, k, noise), diffusion.q_sample(y, t, noise=noise), rtol=0, atol=1e-6)


def _reference_dda(oracle, diffusion, y, start, factor, scale, group, noises):
    """DDA's loop (image_adapt/guided_diffusion/gaussian_diffusion.py, p_sample_loop_progressive), restated
    on guided_diffusion's p_mean_variance with the noise passed in: q_sample at index N, then for i = N-1..0
    a p_sample whose x_t requires grad, x_{t-1} -= scale * grad ||phi(y) - phi(pred_xstart)|| (one norm per
    group), clamped to [-1, 1] at the end (save_image's range)."""
    b = y.shape[0]
    img = diffusion.q_sample(y, torch.full((b,), start), noise=noises[0])
    target = phi_ref(y, factor)
    for i in range(start - 1, -1, -1):
        t = torch.full((b,), i)
        img = img.detach().requires_grad_()
        with torch.enable_grad():
            out = diffusion.p_mean_variance(oracle, img, t, clip_denoised=True)
            noise = noises[start - i] if i > 0 else torch.zeros_like(img)
            sample = out["mean"] + float(i != 0) * torch.exp(0.5 * out["log_variance"]) * noise
            diff = target - phi_ref(out["pred_xstart"], factor)
            norm = sum(torch.linalg.norm(part) for part in diff.split(group))
            (grad,) = torch.autograd.grad(norm, img)
        img = sample.detach() - grad * scale
    return img.clamp(-1, 1)


@pytest.mark.parametrize("batch,group", [(4, 4), (3, 1)])
def test_guided_chain_equals_reference_loop(batch, group):
    """The whole guided chain (respaced, gradient through the UNet, the group norm) against the reference
    loop on the oracle; batch 4 with one norm is the reference's own setting."""
    cfg, oracle, den = _oracle_and_ours("adm-tiny")
    s = DDASettings(respaced_steps=10, start_step=4, lowpass_factor=4, guidance_scale=6.0, norm_group=group)
    g = torch.Generator().manual_seed(3)
    y = (torch.rand(batch, 3, 32, 32, generator=g) * 2 - 1).clamp(-0.9, 0.9)
    ours = adapt(y, den, s, generator=torch.Generator().manual_seed(7))
    ref = _reference_dda(oracle, _spaced_diffusion(cfg, 10), y, 4, 4, 6.0, group, _noises(7, y.shape, 4))
    torch.testing.assert_close(ours, ref, rtol=0, atol=2e-5)  # measured 3e-6
    if group == 4:  # the guidance is not negligible in this comparison
        unguided = adapt(y, den, replace(s, guidance_scale=0.0), generator=torch.Generator().manual_seed(7))
        assert (ref - unguided).abs().max() > 1e-2


# ----------------------------------------------------------------------------------------------------
# (b) closed form for eps = 0


@pytest.mark.parametrize("out_channels", [3, 6])
@pytest.mark.parametrize("scale", [0.0, 6.0])
def test_zero_eps_chain_closed_form(out_channels, scale):
    """With eps = 0 and no clipping, x0_hat = x_k / sqrt(abar_k), the posterior mean is x_k / sqrt(alpha_k)
    (alpha_k = abar_k / abar_{k-1} of the respaced chain), and the guidance gradient is
    -phi^T(d) / (||d||_group sqrt(abar_k)) with d = phi(y) - phi(x0_hat). The std is sqrt(beta_k) for 3-channel
    models (fixed large) and (beta_k * posterior_var_k)^(1/4) for learned range with v = 0."""
    from guided_diffusion.respace import space_timesteps

    count, start, factor, group = 10, 5, 2, 4
    s = DDASettings(respaced_steps=count, start_step=start, lowpass_factor=factor, guidance_scale=scale,
                    norm_group=group, clip_denoised=False)
    g = torch.Generator().manual_seed(0)
    y = torch.rand(6, 3, 16, 16, generator=g) * 2 - 1  # groups of 4 and 2
    ours = adapt(y, StubDenoiser(out_channels), s, generator=torch.Generator().manual_seed(5))

    abar = LINEAR.alphas_cumprod[sorted(space_timesteps(1000, [count]))]
    abar_prev = np.append(1.0, abar[:-1])
    alpha, beta = abar / abar_prev, 1 - abar / abar_prev
    post_var = beta * (1 - abar_prev) / (1 - abar)
    post_var[0] = post_var[1]
    std = np.sqrt(beta) if out_channels == 3 else (beta * post_var) ** 0.25
    z = [n.double() for n in _noises(5, y.shape, start)]
    y64 = y.double()
    target = phi_ref(y64, factor)
    x = math.sqrt(abar[start]) * y64 + math.sqrt(1 - abar[start]) * z[0]
    for k in range(start - 1, -1, -1):
        x0 = x / math.sqrt(abar[k])
        d = target - phi_ref(x0, factor)
        phi_t_d = torch.autograd.functional.vjp(lambda v: phi_ref(v, factor), x0, d)[1]
        norms = torch.cat([torch.linalg.vector_norm(p).expand(p.shape[0]) for p in d.split(group)])
        grad = -phi_t_d / (norms.view(-1, 1, 1, 1) * math.sqrt(abar[k]))
        x = x / math.sqrt(alpha[k]) + (std[k] * z[start - k] if k > 0 else 0) - scale * grad
    torch.testing.assert_close(ours.double(), x.clamp(-1, 1), rtol=0, atol=2e-5)


# ----------------------------------------------------------------------------------------------------
# (c) fixed point: the exact denoiser returns the target, and guidance changes nothing


@pytest.mark.parametrize("kind", ["random", "constant"])
def test_exact_denoiser_returns_input_and_guidance_is_idle(kind):
    """An eps that is exact for y makes every x0_hat = y, so phi(y) - phi(x0_hat) = 0 (the norm's gradient
    is 0 there, not NaN), and the last step (coef on x_t = 0, on x0 = 1) returns y."""
    g = torch.Generator().manual_seed(1)
    y = torch.rand(5, 3, 32, 32, generator=g) * 1.8 - 0.9 if kind == "random" else torch.full((5, 3, 32, 32), 0.3)
    outs = []
    for scale in (0.0, 6.0):
        den = StubDenoiser(3, clean=y)
        out = adapt(y, den, DDASettings(guidance_scale=scale), generator=torch.Generator().manual_seed(2))
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, y, rtol=0, atol=1e-4)
        outs.append(out)
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------------------------------
# (d) the low-pass filter


@pytest.mark.parametrize("factor,size", [(4, (32, 48)), (2, (16, 24)), (8, (64, 32)), (3, (27, 18)), (1, (8, 8))])
def test_lowpass_equals_antialiased_bicubic_with_zero_borders(factor, size):
    x = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    torch.testing.assert_close(LowPass(*size, factor)(x.float()).double(), phi_ref(x, factor), rtol=0, atol=1e-6)


def _interior(x: torch.Tensor, margin: int) -> torch.Tensor:
    return x[..., margin:-margin, margin:-margin]


@pytest.mark.parametrize("factor", [2, 4])
def test_lowpass_removes_checkerboard_keeps_smooth_images(factor):
    """Away from the zero borders (4 D pixels): a checkerboard cancels exactly (even D: each output pixel
    weighs symmetric pairs of opposite sign), and affine images pass unchanged (the antialiased mean of an
    affine function at the sample point, then a cubic that reproduces quadratics), so phi is idempotent on
    them. phi is not a projection in general (cubic down-up), hence the affine family."""
    n, m = 48, 4 * factor
    lp = LowPass(n, n, factor)
    i, j = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    checker = ((i + j) % 2 * 2 - 1).float().expand(1, 3, n, n)
    assert _interior(lp(checker), m).abs().max() < 1e-5
    assert lp(checker).norm() < 0.2 * checker.norm()
    ramp = (0.02 * i - 0.015 * j + 0.1).float().expand(1, 3, n, n)
    torch.testing.assert_close(_interior(lp(ramp), m), _interior(ramp, m), rtol=0, atol=1e-5)
    torch.testing.assert_close(_interior(lp(lp(ramp)), 2 * m), _interior(lp(ramp), 2 * m), rtol=0, atol=1e-5)
    const = torch.full((1, 3, n, n), 0.7)
    torch.testing.assert_close(_interior(lp(const), m), _interior(const, m), rtol=0, atol=1e-6)
    assert lp(const)[..., 0, 0].max() < 0.7  # zero padding darkens the corners, as resize_right does


# ----------------------------------------------------------------------------------------------------
# (e) DDA-SE


def test_self_ensemble_sums_probabilities_not_logits():
    p = torch.tensor([[0.6, 0.4, 0.0], [0.2, 0.3, 0.5]])
    q = torch.tensor([[0.1, 0.9, 0.0], [0.2, 0.7, 0.1]])
    torch.testing.assert_close(self_ensemble(p, q), torch.tensor([[0.35, 0.65, 0.0], [0.2, 0.5, 0.3]]))
    # logits where the two rules disagree: a confident input outvotes the adapted image on probabilities
    a, b = torch.tensor([[2.0, 0.0, -10.0]]), torch.tensor([[-10.0, 0.5, 2.0]])
    assert (a + b).argmax(1).item() == 1
    assert self_ensemble(a.softmax(1), b.softmax(1)).argmax(1).item() == 0
    with pytest.raises(ValueError, match="shapes differ"):
        self_ensemble(p, q[:, :2])


def test_dda_predict_scores_plain_dda_and_se_from_one_adaptation():
    _, _, den = _oracle_and_ours("adm-tiny")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).eval()
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    x01 = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    xn = (x01 - mean) / std
    s = DDASettings(respaced_steps=10, start_step=3)
    with torch.inference_mode():  # evaluators run under it; the guidance re-enables autograd for itself
        out = dda_predict(model, xn, den, settings=s, generator=torch.Generator().manual_seed(9), class_idx=[4, 0, 2])
    assert set(out) == {"plain", "dda", "dda_se"}
    adapted = adapt(2 * x01 - 1, den, s, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        plain = model(xn)[:, [4, 0, 2]].softmax(1)
        dda_p = model(((adapted + 1) / 2 - mean) / std)[:, [4, 0, 2]].softmax(1)
    torch.testing.assert_close(out["plain"], plain)
    torch.testing.assert_close(out["dda"], dda_p, rtol=0, atol=1e-5)
    torch.testing.assert_close(out["dda_se"], (plain + dda_p) / 2, rtol=0, atol=1e-5)
    torch.testing.assert_close(out["dda_se"].sum(1), torch.ones(3))


# ----------------------------------------------------------------------------------------------------
# settings, cost, and what runs where


def test_calls_per_image_whole_batch_and_guided_steps():
    den = StubDenoiser(6)
    y = torch.zeros(7, 3, 16, 16)
    adapt(y, den, DDASettings(guidance_steps=(10, 20)), generator=torch.Generator().manual_seed(0))
    assert len(den.calls) == dda.unet_calls_per_image(DDASettings()) == 50
    assert all(b == 7 for b, _, _ in den.calls)  # each call carries the whole batch
    ts = [t for _, t, _ in den.calls]
    assert ts[0] == 494 and ts[-1] == 0 and ts == sorted(ts, reverse=True)  # noised at t = 505, run from 494
    chain = RespacedChain(LINEAR, 100)
    guided = [k for k, (_, _, grad) in zip(range(49, -1, -1), den.calls) if grad]
    assert sorted(guided) == list(range(10, 20)) and int(chain.timesteps[50]) == 505


def test_adapt_is_reproducible_and_in_range():
    y = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    den = StubDenoiser(6, clean=y.flip(0))  # a wrong clean image: guidance and clamping both act
    s = DDASettings(respaced_steps=10, start_step=3)
    a, b = (adapt(y, den, s, generator=torch.Generator().manual_seed(1)) for _ in range(2))
    assert torch.equal(a, b) and a.dtype == torch.float32 and a.shape == y.shape
    assert a.min() >= -1 and a.max() <= 1


def test_settings_follow_the_schedule():
    assert DDASettings().for_schedule(4000) == DDASettings()
    short = DDASettings(guidance_steps=(0, 20)).for_schedule(50)
    assert (short.respaced_steps, short.start_step, short.guidance_steps) == (50, 25, (0, 10))
    assert dda.unet_calls_per_image(DDASettings(), 50) == 25
    assert DDASettings().noise_matched(LINEAR).start_step == 50
    cosine = df.make_schedule("cosine", 4000, True)
    matched = DDASettings().noise_matched(cosine)
    t = int(dda.respaced_timesteps(4000, 100)[matched.start_step])
    assert abs(math.log(cosine.alphas_cumprod[t] / 0.0739)) < 0.2 and matched.start_step > 50


# ----------------------------------------------------------------------------------------------------
# (f) bad input


def test_bad_inputs_raise_clear_errors():
    den = StubDenoiser(6)
    ok = torch.zeros(2, 3, 16, 16)
    with pytest.raises(ValueError, match="D = 3 must divide"):
        adapt(ok, den, DDASettings(lowpass_factor=3))
    with pytest.raises(ValueError, match="must divide the image width 18"):
        LowPass(16, 18, 4)
    with pytest.raises(ValueError, match="NCHW"):
        adapt(ok[0], den)
    with pytest.raises(ValueError, match="NCHW"):
        adapt(torch.zeros(2, 4, 16, 16), den)
    with pytest.raises(TypeError, match="float images"):
        adapt(ok.to(torch.uint8), den)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        adapt(ok + 2, den)
    with pytest.raises(ValueError, match="non-finite"):
        adapt(ok.clone().fill_(float("nan")), den)
    with pytest.raises(ValueError, match="empty batch"):
        adapt(ok[:0], den)
    with pytest.raises(ValueError, match="maps to"):
        dda_predict(nn.Identity(), ok + 5, den)
    for bad in (dict(start_step=100), dict(start_step=0), dict(respaced_steps=1), dict(lowpass_factor=0),
                dict(guidance_scale=-1.0), dict(guidance_scale=float("inf")), dict(norm_group=0),
                dict(guidance_steps=(5, 60)), dict(guidance_steps=(5, 5))):
        with pytest.raises(ValueError):
            DDASettings(**bad)
    with pytest.raises(ValueError, match="cannot respace"):
        dda.respaced_timesteps(50, 100)


def test_denoiser_modes_that_cannot_guide_are_refused():
    cfg = df.get_preset("adm-tiny")
    unet = df.UNet(cfg)
    x = torch.zeros(1, 3, 32, 32)
    with pytest.raises(ValueError, match="compile=False"):
        adapt(x, df.Denoiser(unet, compile=True), DDASettings(respaced_steps=10, start_step=2))
    with pytest.raises(ValueError, match="eps_only=False"):
        adapt(x, df.Denoiser(df.UNet(cfg), eps_only=True), DDASettings(respaced_steps=10, start_step=2))
    with pytest.raises(ValueError, match="multiples of 4"):
        adapt(torch.zeros(1, 3, 34, 34), df.Denoiser(df.UNet(cfg)), DDASettings(lowpass_factor=2))
