"""GPU-only checks of the fused ops: what the device-generic tests in test_kernels.py cannot
show on small CPU-made inputs. The CUDA kernel's Philox noise is bit-equal to the CPU kernel's (the
reason csrc/ is built with --fmad=false), and the cuda and triton kernels stay equal to the float32
reference at a full ImageNet batch, where grid sizes and 32-bit index arithmetic are exercised.

On a CPU-only machine every case here skips with conftest's one reason; the same code paths run on
CPU tensors in test_kernels.py (test_gpu_elementwise_noise_matches_spec_and_cpu_blocks compiles the
GPU's per-element Philox for the CPU).
"""

from __future__ import annotations

import pytest
import torch
from conftest import backend_on, requires_cuda

import diffaug_fast as df
from diffaug_fast.ops import fused, reference

pytestmark = [requires_cuda, pytest.mark.gpu]
TABLE = df.make_schedule().coefficient_table()
CUDA = torch.device("cuda")


def _philox_x_t(backend: str, device, shape, seed: int, offset: int, channels_last: bool) -> torch.Tensor:
    """x_t of x0 = 0 at t = 999 (= sqrt(1 - abar) z): the op's noise, scaled, as float32 on the CPU."""
    t = torch.full((shape[0],), 999, device=device)
    ph = torch.tensor([seed, offset], device=device)
    x = torch.zeros(shape, device=device)
    out = fused.pre(x, t, TABLE.to(device), None, ph, None, None, torch.float32, channels_last, backend)
    return out.cpu().contiguous()


@pytest.mark.parametrize("offset", [0, 1, 3, 4 * (2**32 - 3) + 2])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_philox_bit_equal_to_cpu_kernel(offset, channels_last):
    """Same (seed, offset) -> the same float32 bits on the GPU as the CPU kernel draws, for offsets
    mid-block and across the low counter word's wrap."""
    backend_on("native", torch.device("cpu"))  # skips when the extension lacks CPU kernels
    backend_on("native", CUDA)
    shape = (3, 3, 37, 41)
    cpu = _philox_x_t("cpp", "cpu", shape, 2**40 + 77, offset, channels_last)
    gpu = _philox_x_t("cuda", CUDA, shape, 2**40 + 77, offset, channels_last)
    diff = (gpu - cpu).abs().max().item()
    assert torch.equal(gpu, cpu), f"CUDA and CPU Philox noise differ (max |diff| {diff:.3g})"


@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_full_batch_pre_post_equal_reference(backend, channels_last):
    """A 64 x 3 x 224 x 224 uint8 NHWC batch (DALI's output) through pre and post on the GPU against the
    float32 reference on the CPU: 9.6M elements, far more programs/blocks than the small-shape tests."""
    backend = backend_on(backend, CUDA)
    g = torch.Generator().manual_seed(0)
    b, h, w = 64, 224, 224
    nhwc = torch.randint(0, 256, (b, h, w, 3), generator=g, dtype=torch.uint8)
    t = torch.randint(0, 1000, (b,), generator=g)
    noise = torch.randn(b, 3, h, w, generator=g)
    coef = TABLE[t]
    unit = 2 * (nhwc.permute(0, 3, 1, 2).float() / 255) - 1
    want = reference.q_sample(unit, noise, coef[:, 0], coef[:, 1])
    x = nhwc.to(CUDA).permute(0, 3, 1, 2)
    x_t = fused.pre(x, t.to(CUDA), TABLE.to(CUDA), noise.to(CUDA), None, None, None, torch.float32,
                    channels_last, backend)
    torch.testing.assert_close(x_t.cpu(), want, rtol=1e-6, atol=1e-6)
    model_out = torch.randn(b, 6, h, w, generator=g)
    # post's reference from the GPU's own x_t: a 1-ulp x_t difference would be amplified ~157x at t ~ 999
    x0 = reference.predict_x0(x_t.cpu(), model_out[:, :3], coef[:, 2], coef[:, 3], clip=True)
    out = torch.empty(2 * b, 3, h, w, device=CUDA)[b:]  # the DiffAug half of a [clean; diffaug] batch
    fused.post(model_out.to(CUDA), x_t, t.to(CUDA), TABLE.to(CUDA), None, None, True, backend, out)
    torch.testing.assert_close(out.cpu(), x0, rtol=1e-6, atol=1e-6)
