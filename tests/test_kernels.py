"""Fused pre/post ops: every backend against the float32 reference (reference.py), Philox noise, the
backend registry, torch.library checks, torch.compile, and the augment()/DiffAug surface built on them.

Device dimension: the op tests take the ``device`` fixture and a backend parameter, "native"
(the compiled kernel of the device: cpp on CPU, cuda on CUDA), "triton" or "reference". Inputs are made on
the CPU and moved, keeping their layout; the expected values are always the float32 reference on the CPU.
On a CPU-only machine Triton runs in its interpreter (TRITON_INTERPRET=1, set by conftest.py); its bf16 is
wrong in the interpreter, so there bf16 is checked on the C++ kernel only.
"""

from __future__ import annotations

import math
import os
import shutil

import pytest
import torch
from conftest import backend_on

import diffaug_fast as df
from diffaug_fast.ops import _ext, fused, reference
from diffaug_fast.ops.philox import philox4x32_10, philox_normal

TABLE = df.make_schedule().coefficient_table()
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FAST = [b for b in ("cpp", "triton") if b in fused.available_backends("cpu")]
ULP = {torch.float32: 1e-6, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float64: 1e-6}
OPS = ["native", "triton", "reference"]  # resolved per device by conftest.backend_on


def test_extension_built_when_a_compiler_exists():
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler: setup.py skips the extension")
    assert _ext.loaded(), _ext.error()
    assert "cpp" in fused.available_backends("cpu")


def _skip(backend, device, *dtypes):
    if backend == "triton" and device.type == "cpu" and torch.bfloat16 in dtypes:
        pytest.skip("the Triton interpreter computes bf16 wrongly; bf16 is covered by the C++ kernel")


def _timesteps(case: str, b: int) -> torch.Tensor:
    if case == "mixed":
        return torch.tensor([0, 999, 17, 640, 250][:b] + [3] * max(0, b - 5))
    return torch.full((b,), int(case))


def _loader_batch(kind: str, b: int, h: int, w: int, g: torch.Generator, device="cpu"):
    """(x as passed to the op: a [B, C, H, W] view on ``device``, its float32 [-1, 1] value by the spec on
    the CPU, mean, std). The layout is made on the device itself (moving a strided view would densify it)."""
    x01 = torch.rand(b, 3, h, w, generator=g)
    if kind == "u8_nhwc":
        nhwc = (x01 * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
        x = nhwc.permute(0, 3, 1, 2)
        return nhwc.to(device).permute(0, 3, 1, 2), 2 * (x.float() / 255) - 1, None, None  # 2 * (p / 255) - 1
    if kind == "normalized":
        m, s = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
        x = (x01 - m) / s
        return x.to(device), 2 * (x * s + m) - 1, MEAN, STD
    unit = x01 * 2 - 1
    if kind == "f32_nchw":
        return unit.to(device), unit, None, None
    if kind == "f32_cl":
        return unit.to(device).contiguous(memory_format=torch.channels_last), unit, None, None
    if kind == "f32_view":  # non-contiguous: every other column of a wider batch
        wide = torch.rand(b, 3, h, 2 * w, generator=g) * 2 - 1
        return wide.to(device)[:, :, :, ::2], wide[:, :, :, ::2], None, None
    dt = {"f16": torch.float16, "bf16": torch.bfloat16, "f64": torch.float64}[kind]
    x = unit.to(dt)
    return x.to(device), x.float(), None, None


KINDS = ["f32_nchw", "f32_cl", "u8_nhwc", "f32_view", "normalized", "f16", "bf16", "f64"]
SHAPES = [(1, 17, 33), (3, 8, 12)]


# ---------------------------------------------------------------------------------------------------
# pre: x_t = sqrt(abar) x0 + sqrt(1 - abar) z


@pytest.mark.parametrize("backend", OPS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("xt_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tcase", ["0", "999", "mixed"])
@pytest.mark.parametrize("shape", SHAPES)
def test_pre_equals_reference(device, backend, kind, xt_dtype, tcase, shape):
    backend = backend_on(backend, device)
    _skip(backend, device, xt_dtype, torch.bfloat16 if kind == "bf16" else None)
    b, h, w = shape
    g = torch.Generator().manual_seed(hash((kind, tcase, shape)) % 2**31)
    x, unit, mean, std = _loader_batch(kind, b, h, w, g, device)
    t = _timesteps(tcase, b)
    noise = torch.randn(b, 3, h, w, generator=g)
    coef = TABLE[t]
    want = reference.q_sample(unit, noise, coef[:, 0], coef[:, 1]).to(xt_dtype)
    got = fused.pre(x, t.to(device), TABLE.to(device), noise.to(device), None, mean, std, xt_dtype,
                    kind == "f32_cl", backend)
    assert got.dtype == xt_dtype and got.shape == want.shape and got.device == x.device
    assert got.is_contiguous(memory_format=torch.channels_last if kind == "f32_cl" else torch.contiguous_format)
    torch.testing.assert_close(got.float().cpu(), want.float(), rtol=ULP[xt_dtype], atol=1e-6)


@pytest.mark.parametrize("backend", OPS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("xt_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_pre_into_writes_what_pre_returns(device, backend, kind, xt_dtype):
    """pre_into (the Workspace path) into a caller's x_t of either layout equals pre, Philox noise included."""
    backend = backend_on(backend, device)
    _skip(backend, device, xt_dtype, torch.bfloat16 if kind == "bf16" else None)
    g = torch.Generator().manual_seed(hash(kind) % 2**31)
    x, _, mean, std = _loader_batch(kind, 3, 8, 12, g, device)
    t, table = _timesteps("mixed", 3).to(device), TABLE.to(device)
    ph = torch.tensor([2**33 + 5, 6], device=device)
    for cl in (False, True):
        want = fused.pre(x, t, table, None, ph, mean, std, xt_dtype, cl, backend)
        fmt = torch.channels_last if cl else torch.contiguous_format
        x_t = torch.full(x.shape, 9.0, dtype=xt_dtype, device=device).contiguous(memory_format=fmt)
        fused.pre_into(x, t, table, None, ph, mean, std, backend, x_t)
        assert torch.equal(x_t, want), (kind, cl)


# ---------------------------------------------------------------------------------------------------
# post: x0 = sqrt(1/abar) x_t - sqrt(1/abar - 1) eps, clamp, classifier normalization


def _out_tensor(kind: str, b, h, w, device="cpu"):
    """(out as passed to the op, the full tensor it lives in or None, its dtype), on ``device``."""
    if kind == "slice":  # the DiffAug half of a preallocated [clean; diffaug] batch
        batch = torch.full((2 * b, 3, h, w), 7.0, device=device)
        return batch[b:], batch, torch.float32
    if kind == "cl":
        out = torch.empty(b, 3, h, w, device=device).contiguous(memory_format=torch.channels_last)
        return out, None, torch.float32
    if kind == "view":
        return torch.empty(b, 3, h, 2 * w, device=device)[..., ::2], None, torch.float32
    dt = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16, "f64": torch.float64}[kind]
    return torch.empty(b, 3, h, w, dtype=dt, device=device), None, dt


@pytest.mark.parametrize("backend", OPS)
@pytest.mark.parametrize("out_kind", ["f32", "cl", "slice", "view", "f16", "bf16", "f64"])
@pytest.mark.parametrize("unet_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tcase", ["0", "999", "mixed"])
@pytest.mark.parametrize("norm", [False, True])
def test_post_equals_reference(device, backend, out_kind, unet_dtype, tcase, norm):
    backend = backend_on(backend, device)
    b, h, w = (3, 8, 12) if tcase == "mixed" else (1, 17, 33)
    out, batch, out_dtype = _out_tensor(out_kind, b, h, w, device)
    _skip(backend, device, unet_dtype, out_dtype)
    g = torch.Generator().manual_seed(hash((out_kind, tcase, norm)) % 2**31)
    t = _timesteps(tcase, b)
    x_t = torch.randn(b, 3, h, w, generator=g).to(unet_dtype)
    model_out = torch.randn(b, 6, h, w, generator=g).to(unet_dtype)  # learned sigma: eps = channels 0..2
    if out_kind == "cl":
        model_out = model_out.contiguous(memory_format=torch.channels_last)
        x_t = x_t.contiguous(memory_format=torch.channels_last)
    mean, std = (MEAN, STD) if norm else (None, None)
    clip = tcase != "999"  # unclamped at t = 999: the eps gain of ~157 shows any arithmetic difference
    coef = TABLE[t]
    x0 = reference.predict_x0(x_t.float(), model_out[:, :3].float(), coef[:, 2], coef[:, 3], clip)
    if norm:
        x0 = ((x0 + 1) / 2 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    on = dict(device=device, memory_format=torch.preserve_format)
    fused.post(model_out.to(**on), x_t.to(**on), t.to(device), TABLE.to(device), mean, std, clip, backend, out)
    torch.testing.assert_close(out.float().cpu(), x0.to(out_dtype).float(), rtol=ULP[out_dtype], atol=1e-6)
    if batch is not None:
        assert torch.all(batch[:b] == 7.0), "post wrote outside its slice"


# ---------------------------------------------------------------------------------------------------
# Philox noise


def test_philox_known_answer():
    # Random123's known-answer vector for philox4x32-10: counter 0, key 0 -> 6627e8d5 e169c58d ...
    words = philox4x32_10(torch.tensor([0]), 0)
    assert [w.item() for w in words] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


needs_ext = pytest.mark.skipif("cpp" not in FAST, reason="the C++ extension is not built")


@needs_ext
def test_gpu_elementwise_noise_matches_spec_and_cpu_blocks():
    """augment_math.h's philox_normal (one element per GPU thread) against the Python spec, and the CPU
    kernel's blockwise generator (AVX2, 8 blocks at a time) against it bit for bit, at offsets that start
    mid-block and across the low counter word's wrap (block 2^32 - 3 .. 2^32 + 5)."""
    seed = 2**40 + 77
    for offset in (0, 1, 3, 4 * (2**32 - 3) + 2):
        shape = (2, 3, 5, 37)  # rows of 37: every lane alignment occurs
        idx = torch.arange(math.prod(shape)) + offset
        gpu = torch.ops.diffaug_fast_ext.philox_normal_elementwise(idx, seed).reshape(shape)
        torch.testing.assert_close(gpu, philox_normal(shape, seed, offset), rtol=0, atol=2e-5)
        for cl in (False, True):
            x = torch.zeros(shape)
            x = x.contiguous(memory_format=torch.channels_last) if cl else x
            x_t = torch.empty_like(x)
            t = torch.full((shape[0],), 999)
            torch.ops.diffaug_fast_ext.pre(x, t, TABLE, None, torch.tensor([seed, offset]), None, None, x_t)
            assert torch.equal(x_t, (TABLE[999, 1] * gpu).contiguous()), (offset, cl)


def _noise(backend: str, shape, seed: int, offset: int, device="cpu") -> torch.Tensor:
    """z as the op draws it on ``device`` (returned on the CPU): x0 = 0 at t = 999 gives x_t = sqrt(1 - abar) z."""
    t = torch.full((shape[0],), 999, device=device)
    ph = torch.tensor([seed, offset], device=device)
    x_t = fused.pre(torch.zeros(shape, device=device), t, TABLE.to(device), None, ph, None, None, torch.float32,
                    False, backend)
    return x_t.cpu() / TABLE[999, 1]


@pytest.mark.parametrize("backend", OPS)
def test_philox_deterministic_seeded_and_offset(device, backend):
    backend = backend_on(backend, device)
    shape = (2, 3, 9, 11)
    a = _noise(backend, shape, 123, 0, device)
    assert torch.equal(a, _noise(backend, shape, 123, 0, device))
    assert not torch.allclose(a, _noise(backend, shape, 124, 0, device), atol=1e-3)
    # element i draws from offset + i: shifting the offset shifts the stream (also by non-multiples of the
    # four lanes of a Philox block)
    for k in (5, 4, 2):
        shifted = _noise(backend, shape, 123, k, device).flatten()
        torch.testing.assert_close(shifted[:-k], a.flatten()[k:], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["native", "triton"])
def test_philox_same_stream_on_every_backend_and_layout(device, backend):
    backend = backend_on(backend, device)
    shape = (2, 3, 9, 11)
    want = philox_normal(shape, 2**40 + 77, 1000)
    torch.testing.assert_close(_noise(backend, shape, 2**40 + 77, 1000, device), want, rtol=0, atol=2e-5)
    # channels_last uint8 input and channels_last x_t: noise of element (b, c, h, w) is unchanged
    x = torch.full((2, 9, 11, 3), 255, dtype=torch.uint8, device=device).permute(0, 3, 1, 2)  # +1 after mapping
    t = torch.full((2,), 999, device=device)
    ph = torch.tensor([2**40 + 77, 1000], device=device)
    x_t = fused.pre(x, t, TABLE.to(device), None, ph, None, None, torch.float32, True, backend)
    z = (x_t.cpu() - TABLE[999, 0]) / TABLE[999, 1]
    torch.testing.assert_close(z, want, rtol=0, atol=1e-3)


@pytest.mark.parametrize("backend", ["native", "triton"])
def test_philox_statistics(device, backend):
    backend = backend_on(backend, device)
    b, h, w = (8, 32, 32) if (backend == "triton" and device.type == "cpu") else (16, 64, 64)  # interpreter: small
    z = _noise(backend, (b, 3, h, w), seed=2024, offset=0, device=device)
    flat = z.flatten().double()
    n = flat.numel()
    assert abs(flat.mean().item()) < 5 / math.sqrt(n)
    assert abs(flat.std().item() - 1) < 5 * math.sqrt(1 / (2 * n))
    assert abs(((flat - flat.mean()) ** 4).mean().item() / flat.var().item() ** 2 - 3) < 10 * math.sqrt(24 / n)
    assert flat.abs().max() < 5.8  # Box-Muller bound with u1 >= 2^-24
    per_image = z.flatten(1)
    corr = torch.corrcoef(per_image)
    off = corr[~torch.eye(b, dtype=torch.bool)]
    assert off.abs().max() < 5 / math.sqrt(per_image.shape[1])  # images are not correlated
    lag1 = torch.corrcoef(torch.stack([flat[:-1], flat[1:]]))[0, 1]
    assert abs(lag1) < 5 / math.sqrt(n)  # neighbouring elements are not correlated


# ---------------------------------------------------------------------------------------------------
# the registry


def test_backend_resolution(monkeypatch):
    monkeypatch.delenv("DIFFAUG_BACKEND", raising=False)
    assert fused.resolve_backend(None, "cpu") == ("cpp" if "cpp" in FAST else "reference")
    assert fused.resolve_backend("reference", "cpu") == "reference"
    monkeypatch.setenv("DIFFAUG_BACKEND", "reference")
    assert fused.resolve_backend(None, "cpu") == "reference"
    assert fused.resolve_backend("auto", "cpu") != "triton"  # the argument wins over the environment
    monkeypatch.setenv("DIFFAUG_BACKEND", "cuda")
    with pytest.raises(ValueError, match=r"'cuda' is not available.*available: \[.*'reference'"):
        fused.resolve_backend(None, "cpu")
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        fused.resolve_backend("nope", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        fused.resolve_backend("triton", "cpu")


@pytest.mark.parametrize("backend", OPS)
def test_opcheck(device, backend):
    backend = backend_on(backend, device)
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(2, 9, 11, 3, generator=g) * 255).to(torch.uint8).to(device).permute(0, 3, 1, 2)
    t = torch.tensor([3, 998], device=device)
    noise = torch.randn(2, 3, 9, 11, generator=g).to(device)
    table = TABLE.to(device)
    torch.library.opcheck(fused.pre, (x, t, table, noise, None, MEAN, STD, torch.float16, True, backend))
    torch.library.opcheck(fused.pre, (x.float() / 255, t, table, None, torch.tensor([1, 2], device=device), None,
                                      None, torch.float32, False, backend))
    out = torch.zeros(4, 3, 9, 11, device=device)[2:]
    model_out = torch.randn(2, 6, 9, 11, generator=g).to(device)
    torch.library.opcheck(fused.post, (model_out, noise, t, table, MEAN, STD, True, backend, out))
    x_t = torch.empty(2, 3, 9, 11, dtype=torch.bfloat16, device=device).contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(fused.pre_into, (x, t, table, None, torch.tensor([7, 3], device=device), None, None,
                                           backend, x_t))


# ---------------------------------------------------------------------------------------------------
# augment() and DiffAug on the fused ops


@pytest.fixture(scope="module")
def den_cpu():
    from conftest import randomize_

    return df.Denoiser(randomize_(df.UNet(df.get_preset("adm-tiny")), seed=3))


@pytest.fixture
def den(den_cpu, device):
    """The module's tiny denoiser on ``device`` (a copy on cuda; the CPU one itself on cpu)."""
    import copy

    return den_cpu if device.type == "cpu" else copy.deepcopy(den_cpu).to(device)


@pytest.mark.parametrize("backend", ["native", "triton"])
def test_augment_backends_agree_with_reference(den, den_cpu, device, backend):
    """On ``device``: the fast backend against the reference backend on the same device (same UNet call,
    so 1 ulp), and against the float32 chain on the CPU (on cuda the UNet itself differs by float32
    reordering, amplified by the x0 step's sqrt(1/abar) ~ 157 at t = 999: 1e-4 bounds that)."""
    backend = backend_on(backend, device)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 16, 20, generator=g) * 2 - 1
    noise = torch.randn(x.shape, generator=g)
    t = torch.tensor([0, 999, 400])
    xd, nd, td = x.to(device), noise.to(device), t.to(device)
    want = df.augment(xd, den, t=td, noise=nd, backend="reference", clip=False)
    got = df.augment(xd, den, t=td, noise=nd, backend=backend, clip=False)
    assert got.device == xd.device
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # the old chain: reference.diffaug on float32, on the CPU
    coef = den_cpu.schedule.gather(t)
    old = reference.diffaug(x, noise, coef, lambda x_t: den_cpu(x_t, t), clip=False)
    tol = 1e-6 if device.type == "cpu" else 1e-4
    torch.testing.assert_close(got.cpu(), old, rtol=tol, atol=tol)


def test_augment_uint8_nhwc_and_normalized_match_float(den, device):
    g = torch.Generator().manual_seed(1)
    nhwc = torch.randint(0, 256, (2, 16, 16, 3), generator=g, dtype=torch.uint8).to(device)
    unit = 2 * (nhwc.permute(0, 3, 1, 2).float() / 255) - 1
    noise = torch.randn(2, 3, 16, 16, generator=g).to(device)
    t = torch.tensor([5, 700], device=device)
    base = df.augment(unit, den, t=t, noise=noise)
    from_u8 = df.augment(nhwc, den, t=t, noise=noise)
    assert from_u8.dtype == torch.float32 and from_u8.shape == (2, 3, 16, 16)
    assert from_u8.is_contiguous(memory_format=torch.channels_last)  # keeps the loader's layout
    torch.testing.assert_close(from_u8, base, rtol=1e-6, atol=1e-6)
    m, s = torch.tensor(MEAN, device=device).view(1, 3, 1, 1), torch.tensor(STD, device=device).view(1, 3, 1, 1)
    # normalizing and un-normalizing x costs ~1 ulp; at t = 700 the x0 step multiplies it by ~12 and the
    # output normalization by 1 / (2 std) ~ 2.2: 1e-4 is ~10x that, far below a wrong mean/std (~0.1)
    normed = df.augment(((unit + 1) / 2 - m) / s, den, t=t, noise=noise, mean=MEAN, std=STD)
    torch.testing.assert_close(normed, ((base + 1) / 2 - m) / s, rtol=0, atol=1e-4)
    from_u8_normed = df.augment(nhwc, den, t=t, noise=noise, mean=MEAN, std=STD)  # exact: no input round trip
    torch.testing.assert_close(from_u8_normed, ((from_u8 + 1) / 2 - m) / s, rtol=1e-6, atol=1e-6)


def test_augment_out_slice_seed_and_errors(den_cpu):
    den = den_cpu
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    batch = torch.zeros(4, 3, 16, 16)
    batch[:2] = x
    r = df.augment(x, den, t=50, seed=9, out=batch[2:])
    assert r.data_ptr() == batch[2:].data_ptr() and torch.equal(batch[:2], x)
    assert torch.equal(r, df.augment(x, den, t=50, seed=9))
    assert not torch.equal(r, df.augment(x, den, t=50, seed=9, offset=x.numel()))
    with pytest.raises(ValueError, match="noise or seed"):
        df.augment(x, den, seed=1, noise=torch.zeros_like(x))
    with pytest.raises(ValueError, match="out must be a tensor of shape"):
        df.augment(x, den, out=torch.empty(2, 3, 16, 8))
    with pytest.raises(ValueError, match="both mean and std"):
        df.augment(x, den, mean=MEAN)
    with pytest.raises(ValueError, match="are mean/std the ones"):
        df.augment(x * 5, den, mean=MEAN, std=STD)
    with pytest.raises(ValueError, match=r"available: \["):
        df.augment(x, den, backend="cuda")


def test_diffaug_module_advances_noise(den_cpu):
    den = den_cpu
    aug = df.DiffAug(den, seed=11, t_range=(100, 101))
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    a, b = aug(x), aug(x)
    assert not torch.equal(a, b)  # fresh Philox stream per call
    again = df.DiffAug(den, seed=11, t_range=(100, 101))
    assert torch.equal(again(x), a)
    nhwc = (torch.rand(2, 16, 16, 3) * 255).to(torch.uint8)
    out = torch.empty(4, 3, 16, 16)[2:]
    assert aug(nhwc, out=out).data_ptr() == out.data_ptr()
    assert len(aug.workspace) == 1  # one x_t buffer, reused by all four calls


@pytest.mark.parametrize("backend", OPS)
def test_workspace_reuses_x_t_and_changes_nothing(den, device, backend):
    backend = backend_on(backend, device)
    x = torch.rand(3, 3, 16, 16, device=device) * 2 - 1
    ws = df.Workspace()
    want = df.augment(x, den, t=70, seed=4, backend=backend)
    got = df.augment(x, den, t=70, seed=4, backend=backend, workspace=ws)
    assert torch.equal(got, want)
    (buf,) = ws._buffers.values()
    ptr = buf.data_ptr()
    again = df.augment(x, den, t=70, seed=4, offset=x.numel(), backend=backend, workspace=ws)
    assert len(ws) == 1 and next(iter(ws._buffers.values())).data_ptr() == ptr
    assert not torch.equal(again, want)
    df.augment(x[:2], den, t=70, seed=4, backend=backend, workspace=ws)  # another shape: another buffer
    assert len(ws) == 2


def test_compile_fullgraph_no_graph_breaks(device):
    """augment compiles without a graph break on every device (on cuda: the cuda backend's custom ops and
    the Workspace buffer inside one graph)."""
    cfg = df.UNetConfig(model_channels=32, num_res_blocks=1, channel_mult=(1,), attention_ds=())
    small = df.Denoiser(df.UNet(cfg)).to(device)
    x = torch.rand(2, 3, 8, 8, device=device) * 2 - 1
    t = torch.tensor([0, 999], device=device)
    noise = torch.randn_like(x)

    ws = df.Workspace()

    def fn(x, t, noise):
        y = df.augment(x, small, t=t, noise=noise, mean=MEAN, std=STD)
        return df.augment(x, small, t=t, seed=5, offset=7, workspace=ws) + y

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)  # raises on any graph break
    torch.testing.assert_close(compiled(x, t, noise), fn(x, t, noise), rtol=1e-5, atol=1e-5)


def test_package_works_without_the_extension():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['diffaug_fast._C'] = None\n"  # import of the extension now fails
        "import torch, diffaug_fast as df\n"
        "assert df.available_backends('cpu') == ['reference'], df.available_backends('cpu')\n"
        "den = df.Denoiser(df.UNet(df.get_preset('adm-tiny')))\n"
        "x = torch.rand(1, 3, 8, 8) * 2 - 1\n"
        "assert df.augment(x, den, t=5, seed=1).shape == x.shape\n"
        "try:\n    df.augment(x, den, backend='cpp')\nexcept ValueError as e:\n    print(e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("DIFFAUG_BACKEND", "TRITON_INTERPRET")}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "'cpp' is not available" in r.stdout and "not built" in r.stdout and "['reference']" in r.stdout


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_unet_sees_and_post_uses_the_same_x_t(dtype):
    """x_t is written in the UNet's dtype and the x0 step reads that same x_t. With an ideal denoiser
    (eps computed exactly from the x_t it is given) x0_hat is then x0 up to fp32 rounding even at t = 999;
    an x0 step on the unrounded fp32 x_t would add sqrt(1/abar) * (x_t - round(x_t)) ~ 157 * 2^-9 |x_t|."""
    den = df.Denoiser(df.UNet(df.get_preset("adm-tiny")).set_compute_dtype(dtype))
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(2, 3, 8, 8, generator=g) * 2 - 1
    t = torch.tensor([999, 600])
    coef = TABLE[t].view(2, 4, 1, 1)
    seen = {}

    def ideal(x_t, t_model):
        assert x_t.dtype == dtype
        seen["x_t"] = x_t
        eps = (x_t.float() - coef[:, 0:1] * x0) / coef[:, 1:2]
        return torch.cat([eps, torch.zeros_like(eps)], 1)

    den.forward = ideal
    noise = torch.randn(x0.shape, generator=g)
    got = df.augment(x0, den, t=t, noise=noise, clip=False)
    assert (got - x0).abs().max() < 1e-3
    # the fp32-x_t alternative, for contrast: visibly wrong at t = 999
    x_t32 = reference.q_sample(x0, noise, TABLE[t, 0], TABLE[t, 1])
    eps = ideal(seen["x_t"], t)[:, :3]
    alt = reference.predict_x0(x_t32, eps, TABLE[t, 2], TABLE[t, 3], clip=False)
    assert (alt - x0)[0].abs().max() > 0.05
