"""The fused GroupNorm + timestep scale/shift + SiLU op (ops/norm.py, csrc/group_norm_cpu.cpp) against
the unfused PyTorch chain in float64, and inside the UNet against OpenAI's guided_diffusion model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import oracle_model_and_diffusion, randomize_

import diffaug_fast as df
from diffaug_fast.ops.norm import fused_kernel_available, group_norm_silu

needs_kernel = pytest.mark.skipif(not fused_kernel_available(), reason="the C++ extension is not built")


def _chain64(x, w, b, scale, shift, groups=32, eps=1e-5):
    """The unfused chain in float64: the independent reference."""
    h = F.group_norm(x.double(), groups, w.double(), b.double(), eps)
    if scale is not None:
        h = h * (1 + scale.double()[:, :, None, None]) + shift.double()[:, :, None, None]
    return F.silu(h)


def _inputs(b, c, h, w, seed, offset=0.0, cl=False, scaled=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, h, w, generator=g) * 3 + offset
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    wt, bs = torch.randn(c, generator=g), torch.randn(c, generator=g)
    scale = torch.randn(b, c, generator=g) * 0.5 if scaled else None
    shift = torch.randn(b, c, generator=g) if scaled else None
    return x, wt, bs, scale, shift


@needs_kernel
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("scaled", [True, False], ids=["scale_shift", "plain"])
@pytest.mark.parametrize("shape", [(2, 64, 7, 13), (1, 96, 48, 48), (3, 32, 1, 5)])
def test_kernel_matches_float64_chain(cl, scaled, shape):
    x, w, b, scale, shift = _inputs(*shape, seed=sum(shape), cl=cl, scaled=scaled)
    got = group_norm_silu(x, w, b, scale, shift, 32, 1e-5)
    assert got.dtype == torch.float32 and got.shape == x.shape
    assert got.is_contiguous(memory_format=torch.channels_last if cl and shape[2] * shape[3] > 1 else
                             torch.contiguous_format)
    want = _chain64(x, w, b, scale, shift)
    # the float32 unfused chain's own error, for scale: the fused kernel must be as accurate
    f32 = F.silu(F.group_norm(x, 32, w, b, 1e-5) * (1 + scale[:, :, None, None]) + shift[:, :, None, None]) \
        if scaled else F.silu(F.group_norm(x, 32, w, b, 1e-5))
    err, err32 = (got.double() - want).abs().max().item(), (f32.double() - want).abs().max().item()
    assert err <= max(4 * err32, 1e-5), (err, err32)


@needs_kernel
def test_kernel_statistics_survive_a_large_mean():
    # a one-pass E[x^2] - E[x]^2 in float32 would lose the variance of N(1000, 3^2) data entirely (errors
    # of order 1); what is left is x's own float32 rounding at 1000 (6e-5) times rstd * gamma * (1 + scale),
    # which PyTorch's float32 GroupNorm has too
    for cl in (False, True):
        x, w, b, scale, shift = _inputs(2, 64, 20, 20, seed=1, offset=1000.0, cl=cl)
        got = group_norm_silu(x, w, b, scale, shift, 32, 1e-5)
        want = _chain64(x, w, b, scale, shift)
        f32 = F.silu(F.group_norm(x, 32, w, b, 1e-5) * (1 + scale[:, :, None, None]) + shift[:, :, None, None])
        err, err32 = (got.double() - want).abs().max().item(), (f32.double() - want).abs().max().item()
        assert err <= 4 * err32 and err < 1e-3, (err, err32)


def test_fallback_for_other_dtypes_and_errors(device):
    x, w, b, scale, shift = _inputs(2, 64, 6, 6, seed=2)
    on = [v.to(device) for v in (x.bfloat16(), w, b, scale, shift)]
    got = group_norm_silu(*on, 32, 1e-5)  # not the kernel: the float32 chain
    assert got.dtype == torch.bfloat16 and got.device == on[0].device
    torch.testing.assert_close(got.double().cpu(), _chain64(x.bfloat16(), w, b, scale, shift), rtol=1e-2, atol=1e-2)
    if device.type == "cuda":  # float32 on cuda: also the chain (the fused kernel is CPU-only)
        got32 = group_norm_silu(x.to(device), *on[1:], 32, 1e-5).cpu()
        err = (got32.double() - _chain64(x, w, b, scale, shift)).abs().max().item()
        assert err < 1e-5, err
    with pytest.raises(ValueError, match="both scale and shift"):
        group_norm_silu(x, w, b, scale, None, 32, 1e-5)
    if fused_kernel_available():
        with pytest.raises(RuntimeError, match="not divisible by groups"):
            group_norm_silu(x[:, :48].contiguous(), w[:48], b[:48], None, None, 32, 1e-5)


def test_opcheck():
    x, w, b, scale, shift = _inputs(2, 64, 5, 6, seed=3)
    torch.library.opcheck(group_norm_silu, (x, w, b, scale, shift, 32, 1e-5))
    torch.library.opcheck(group_norm_silu, (x.contiguous(memory_format=torch.channels_last), w, b, None, None,
                                            32, 1e-5))


@needs_kernel
@pytest.mark.parametrize("kw", [dict(), dict(channels_last=True, eps_only=True)])
@pytest.mark.parametrize("name", ["adm-tiny", "iddpm-tiny"])
def test_unet_with_fused_norm_matches_oracle_to_rounding(name, kw, device):
    """On cpu the fused kernel runs; on cuda (no GPU kernel) the op takes the unfused float32 chain, and
    the UNet must still equal the oracle (run on the CPU) to float32 rounding."""
    cfg = df.get_preset(name)
    oracle, _ = oracle_model_and_diffusion(cfg)
    randomize_(oracle, seed=7)
    g = torch.Generator().manual_seed(7)
    x = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    t = torch.tensor([0, 500, cfg.diffusion_steps - 1])
    ts = t.float() * (1000.0 / cfg.diffusion_steps) if cfg.rescale_timesteps else t
    with torch.no_grad():
        truth = oracle(x, ts)
        den = df.load_denoiser(oracle.state_dict(), cfg, fused_norm=True, device=device, **kw)
        assert den.unet.fused_norm and "fused_norm=True" in repr(den)
        out = den(x.to(device), t.to(device)).cpu()
    c = out.shape[1]
    assert c == (3 if kw.get("eps_only") else cfg.out_channels)
    torch.testing.assert_close(out, truth[:, :c], rtol=0, atol=2e-5 * truth.abs().max().item())
    if device.type == "cpu":
        assert not torch.equal(out, truth[:, :c])  # the fused kernel really ran (different roundings)
