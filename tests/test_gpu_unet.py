"""GPU-only fast-UNet checks: fp16 and bf16 under ``compile=True`` (max-autotune with CUDA
graphs, batch buckets) against the float32 oracle with the 2x rule of test_fast_unet.py: each compiled
low-precision result at most 2x as far from the oracle as the reference code in the same precision on
the same GPU. The eager low-precision modes and the float32 compiled path run on cuda through the
``device`` fixture in test_fast_unet.py. CPU Inductor compiles of low-precision graphs take minutes on
the development machines, so there is no CPU twin of this case.
"""

from __future__ import annotations

import pytest
import torch
from conftest import full_fp32, requires_cuda
from test_fast_unet import TS, _per_t_err, _reference_low, _setup
from torch._dynamo.utils import counters

import diffaug_fast as df

pytestmark = [requires_cuda, pytest.mark.gpu]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_compiled_low_precision_within_2x_and_bucketed(dtype):
    cuda = torch.device("cuda")
    with full_fp32(cuda):
        cfg, oracle, x, t, ts, truth = _setup("adm-tiny")
        ref_err = _per_t_err(_reference_low(oracle, dtype, cuda)(x, ts), truth)
        den = df.load_denoiser(oracle.state_dict(), cfg, dtype=dtype, channels_last=True, eps_only=True,
                               compile=True, device=cuda)
        skips = counters["inductor"]["cudagraph_skips"]
        den.warmup(2, 32, 32)  # one bucket: batch 2
        outs = [den(x[i:j].to(cuda), t[i:j].to(cuda)) for i, j in ((0, 1), (1, 3), (0, len(TS)))]
        full = outs[-1].cpu()
    assert len(den.compile_log) == 1, den.compile_log  # batch 1 padded, 5 chunked: no recompilation
    assert counters["inductor"]["cudagraph_skips"] == skips  # CUDA graphs captured
    err = _per_t_err(full, truth)
    assert (err <= 2 * ref_err).all() and (err > 0).all(), f"{err.tolist()} vs reference {ref_err.tolist()}"
    # the padded and the chunked calls give what the full batch gave, image by image (same compiled graph;
    # an image's position in the bucket may change a kernel's blocking, hence not bit-exact)
    tol = 1e-3 * full.abs().max().item()
    torch.testing.assert_close(outs[0].cpu(), full[0:1], rtol=0, atol=tol)
    torch.testing.assert_close(outs[1].cpu(), full[1:3], rtol=0, atol=tol)
