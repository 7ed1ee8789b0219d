"""The public augment(): oracle parity, input validation, and the statistics of its random path."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import oracle_model_and_diffusion, randomize_

import diffaug_fast as df


@pytest.fixture(scope="module", params=["adm-tiny", "iddpm-tiny"])
def pair(request):
    cfg = df.get_preset(request.param)
    oracle, diffusion = oracle_model_and_diffusion(cfg)
    randomize_(oracle, seed=7)
    return oracle, diffusion, df.load_denoiser(oracle.state_dict(), request.param)


def _on(den, device):
    """The denoiser on ``device`` (a copy on cuda, so the module's CPU fixture stays on the CPU)."""
    return den if device.type == "cpu" else copy.deepcopy(den).to(device)


def _images(b=4, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, size, size, generator=g) * 2 - 1


@pytest.mark.parametrize("t", [0, 1, 500, 999, "mixed", "last"])
def test_augment_equals_p_sample_pred_xstart(pair, t, device):
    """Ours on ``device`` against the oracle on the CPU. On cuda the UNet's float32 convolutions sum in
    another order (~1e-6 relative on eps); the x0 step multiplies eps by sqrt(1/abar - 1), up to ~157 at
    t = 999, so 5e-4 there instead of the CPU's 1e-5 (a wrong coefficient or t is off by >1e-2)."""
    oracle, diffusion, den = pair
    den = _on(den, device)
    x = _images()
    steps = den.num_steps
    t = {"mixed": torch.tensor([0, 17, 640, 999]), "last": steps - 1}.get(t, t)
    tt = t if isinstance(t, torch.Tensor) else torch.full((4,), t)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = diffusion.p_sample(oracle, diffusion.q_sample(x, tt, noise), tt, clip_denoised=True)["pred_xstart"]
    td = t.to(device) if isinstance(t, torch.Tensor) else t
    ours = df.augment(x.to(device), den, t=td, noise=noise.to(device))
    assert ours.shape == x.shape and ours.dtype == x.dtype and ours.device.type == device.type
    torch.testing.assert_close(ours.cpu(), ref, rtol=0, atol=1e-5 if device.type == "cpu" else 5e-4)


def test_clip_false_is_unclamped(pair):
    _, _, den = pair
    x = _images()
    noise = torch.randn_like(x)
    raw = df.augment(x, den, t=999, noise=noise, clip=False)
    assert raw.abs().max() > 1.5  # at t=999 the eps error gain is ~157: far outside [-1, 1]
    torch.testing.assert_close(df.augment(x, den, t=999, noise=noise), raw.clamp(-1, 1))


def test_same_generator_seed_same_output(pair, device):
    den = _on(pair[2], device)
    x = _images().to(device)
    a = df.augment(x, den, generator=torch.Generator(device).manual_seed(5))
    b = df.augment(x, den, generator=torch.Generator(device).manual_seed(5))
    c = df.augment(x, den, generator=torch.Generator(device).manual_seed(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_output_keeps_dtype_and_shape(pair, dtype, device):
    den = _on(pair[2], device)
    x = _images(b=2).to(device, dtype)
    out = df.augment(x, den, t=10)
    assert out.dtype == dtype and out.shape == x.shape and out.device == x.device


def test_no_autograd_through_unet_and_usable_downstream(pair):
    _, _, den = pair
    x = _images(b=2).requires_grad_(True)
    out = df.augment(x, den, t=100)
    assert not out.requires_grad
    w = torch.nn.Parameter(torch.ones(()))
    (out * w).sum().backward()  # a classifier can consume it (no inference-mode tensors)
    assert w.grad is not None


# ---------------------------------------------------------------------------------------------------
# errors


@pytest.fixture(scope="module")
def tiny():
    return df.Denoiser(df.UNet(df.get_preset("adm-tiny")))


@pytest.mark.parametrize(
    "x,exc,match",
    [
        (torch.zeros(3, 32, 32), ValueError, "4-D"),
        (torch.zeros(1, 1, 32, 32), ValueError, "3 channels"),
        (torch.zeros(1, 32, 32, 3), ValueError, "NHWC"),
        (torch.zeros(1, 3, 30, 32), ValueError, "multiples of 4"),
        (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), TypeError, "integer dtype"),
        (torch.full((1, 3, 32, 32), float("nan")), ValueError, "non-finite"),
        (torch.full((1, 3, 32, 32), float("inf")), ValueError, "non-finite"),
        (torch.full((1, 3, 32, 32), 200.0), ValueError, r"\[0, 255\]"),
        (torch.full((1, 3, 32, 32), -2.1), ValueError, "normalized"),
        (torch.zeros(0, 3, 32, 32), ValueError, "empty"),
        ([[0.0]], TypeError, "torch.Tensor"),
    ],
)
def test_bad_input_errors(tiny, x, exc, match):
    with pytest.raises(exc, match=match):
        df.augment(x, tiny)


@pytest.mark.parametrize(
    "kw,exc,match",
    [
        (dict(t=1000), ValueError, "out of range"),
        (dict(t=-1), ValueError, "out of range"),
        (dict(t=torch.tensor([0, 1000])), ValueError, "out of range"),
        (dict(t=torch.tensor([0.5, 1.0])), TypeError, "integer tensor"),
        (dict(t=torch.tensor([1, 2, 3])), ValueError, "shape"),
        (dict(t=2.0), TypeError, "int"),
        (dict(t_range=(0, 1001)), ValueError, "t_range"),
        (dict(t_range=(10, 10)), ValueError, "t_range"),
        (dict(noise=torch.zeros(2, 3, 32, 16)), ValueError, "noise must be a tensor shaped like x"),
        (dict(noise=torch.zeros(2, 3, 32, 32, dtype=torch.int64)), TypeError, "noise must be a float"),
    ],
)
def test_bad_argument_errors(tiny, kw, exc, match):
    with pytest.raises(exc, match=match):
        df.augment(torch.zeros(2, 3, 32, 32), tiny, **kw)


def test_scalar_tensor_t_broadcasts(tiny):
    x = torch.zeros(2, 3, 32, 32)
    n = torch.randn_like(x)
    torch.testing.assert_close(df.augment(x, tiny, t=torch.tensor(7), noise=n), df.augment(x, tiny, t=7, noise=n))


# ---------------------------------------------------------------------------------------------------
# statistics of the random path: t uniform, noise N(0, 1), images independent


def _draws(n_batches=40, b=16, t_range=None, seed=0):
    """Run augment on zero images with a UNet that outputs zeros: then x0_hat = sqrt(1/abar) x_t, so the
    t it drew (seen by the UNet) and the noise it drew can be read back exactly (clip=False)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(b, 3, 8, 8)
    ts, noises = [], []
    seen = {}

    def spy(x_t, t):
        seen["t"] = t.clone()
        return torch.zeros(x_t.shape[0], 6, *x_t.shape[2:])

    den = df.Denoiser(df.UNet(df.get_preset("adm-tiny")))
    den.forward = spy  # observe what augment feeds the UNet
    coef_all = den.schedule.coefficient_table()
    for _ in range(n_batches):
        out = df.augment(x, den, generator=g, t_range=t_range, clip=False)
        t = seen["t"]
        c = coef_all[t]
        # x0 = 0, eps = 0 -> out = sqrt(1/abar) * sqrt(1 - abar) * z
        z = out / (c[:, 2] * c[:, 1]).view(-1, 1, 1, 1)
        ts.append(t)
        noises.append(z)
    return torch.cat(ts), torch.cat(noises)


def test_t_uniform_over_t_range():
    t, _ = _draws(n_batches=125, b=16)  # 2000 draws over 10 bins
    assert t.min() >= 0 and t.max() <= 999
    counts = torch.bincount(t // 100, minlength=10).float()
    expected = t.numel() / 10
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 27.9  # chi-square, 9 dof, p = 0.001
    t2, _ = _draws(n_batches=20, b=16, t_range=(100, 200), seed=1)
    assert t2.min() >= 100 and t2.max() < 200 and len(t2.unique()) > 50


def test_noise_standard_normal_and_independent_per_image():
    _, z = _draws(n_batches=40, b=16)  # 640 images x 192 values
    flat = z.flatten()
    n = flat.numel()
    assert abs(flat.mean().item()) < 5 / math.sqrt(n)
    assert abs(flat.std().item() - 1) < 5 * math.sqrt(2 / n)
    # kurtosis of a normal is 3
    assert abs(((flat - flat.mean()) ** 4).mean().item() / flat.var().item() ** 2 - 3) < 0.1
    per_image = z.flatten(1)
    corr = torch.corrcoef(per_image[:64])
    off = corr[~torch.eye(64, dtype=torch.bool)]
    assert off.abs().max() < 5 / math.sqrt(per_image.shape[1])
    assert not torch.equal(per_image[0], per_image[1])
