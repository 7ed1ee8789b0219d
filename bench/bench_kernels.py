"""Fused pre/post ops vs the PyTorch reference chain, B=64 at 224x224, in GB/s and as a fraction of this
machine's copy bandwidth (measured in the same run).

    python -m pytest bench/bench_kernels.py --benchmark-only       (comparison lines print at the end)

The functional op ``pre`` allocates x_t on every call; on CPU a fresh 38.5 MB tensor costs ~40 ms of
first-touch page faults here (glibc maps blocks > 32 MB anew each time), so "<backend>-prealloc" times
``pre_into`` writing into a kept x_t: what ``augment(..., workspace=)`` and ``DiffAug`` run. GB/s counts the minimum traffic of each op (inputs read once, output written once), for the reference
too, so the ratio of GB/s is the speedup. The Triton backend is benchmarked only on a GPU (its CPU
interpreter is a correctness tool).
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch

from diffaug_fast.diffusion.schedule import make_schedule
from diffaug_fast.ops import fused, reference

B, C, H, W = 64, 3, 224, 224
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = [b for b in fused.available_backends(DEVICE) if b != "reference" and not (b == "triton" and DEVICE == "cpu")]
RESULTS: dict[tuple[str, str], float] = {}


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _median_seconds(fn, reps: int = 7) -> float:
    fn()
    times = []
    for _ in range(reps):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@pytest.fixture(scope="module")
def copy_gbps() -> float:
    """Copy bandwidth: read + write of a 38.5 MB float32 batch, the size of one x_t."""
    src = torch.randn(B, C, H, W, device=DEVICE)
    dst = torch.empty_like(src)
    return 2 * src.nbytes / _median_seconds(lambda: dst.copy_(src), reps=11) / 1e9


def _case(name: str):
    """(reference chain, fast op given a backend, bytes of minimum traffic) for one case."""
    g = torch.Generator(device=DEVICE).manual_seed(0)
    t = torch.randint(0, 1000, (B,), generator=g, device=DEVICE)
    table = make_schedule().coefficient_table(DEVICE)
    coef = table[t]
    f32 = torch.rand(B, C, H, W, generator=g, device=DEVICE) * 2 - 1
    noise = torch.randn(B, C, H, W, generator=g, device=DEVICE)
    if name in ("pre_f32", "pre_u8_nhwc", "pre_philox"):
        x = f32
        if name == "pre_u8_nhwc":  # DALI's output layout
            x = (f32 * 127.5 + 127.5).to(torch.uint8).permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
        philox = torch.tensor([1, 0], device=DEVICE) if name == "pre_philox" else None
        nz = None if philox is not None else noise

        def ref():
            z = torch.randn(x.shape, device=DEVICE) if nz is None else nz
            x0 = 2 * (x.float() / 255) - 1 if x.dtype == torch.uint8 else x.float()
            return reference.q_sample(x0, z, coef[:, 0], coef[:, 1])

        x_t = torch.empty_like(f32)

        def fast(backend):
            if backend.endswith("-prealloc"):  # the op into a kept x_t, as DiffAug's workspace runs it
                name = backend.removesuffix("-prealloc")
                return lambda: fused.pre_into(x, t, table, nz, philox, None, None, name, x_t)
            return lambda: fused.pre(x, t, table, nz, philox, None, None, torch.float32, False, backend)

        nbytes = x.nbytes + (0 if nz is None else nz.nbytes) + f32.nbytes
        return ref, fast, nbytes
    if name == "post_norm_slice":  # eps read in place from the 6-channel output, into batch[B:]
        model_out = torch.randn(B, 2 * C, H, W, generator=g, device=DEVICE)
        batch = torch.empty(2 * B, C, H, W, device=DEVICE)
        m = torch.tensor(MEAN, device=DEVICE).view(1, C, 1, 1)
        s = torch.tensor(STD, device=DEVICE).view(1, C, 1, 1)

        def ref():  # the old chain: slice, x0 step, normalize, then copy into the batch (the cat)
            x0 = reference.predict_x0(f32, reference.eps_from_output(model_out, C), coef[:, 2], coef[:, 3])
            batch[B:].copy_(((x0 + 1) / 2 - m) / s)

        def fast(backend):
            backend = backend.removesuffix("-prealloc")  # post always writes into the caller's tensor
            return lambda: fused.post(model_out, f32, t, table, MEAN, STD, True, backend, batch[B:])

        return ref, fast, 3 * f32.nbytes
    raise KeyError(name)


CASES = ["pre_f32", "pre_u8_nhwc", "pre_philox", "post_norm_slice"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", ["reference", *BACKENDS, *[f"{b}-prealloc" for b in BACKENDS if b != "triton"]])
def test_bench(benchmark, request, copy_gbps, case, backend):
    ref, fast, nbytes = _case(case)
    fn = ref if backend == "reference" else fast(backend)
    benchmark.pedantic(fn, setup=_sync, rounds=7, iterations=1, warmup_rounds=1)
    sec = benchmark.stats.stats.median
    gbps = nbytes / sec / 1e9
    RESULTS[(case, backend)] = gbps
    benchmark.extra_info.update(gb_per_s=round(gbps, 2), copy_gb_per_s=round(copy_gbps, 2),
                                fraction_of_copy=round(gbps / copy_gbps, 3), images_per_s=round(B / sec, 1))
    if (case, "reference") in RESULTS:
        benchmark.extra_info["speedup_vs_reference"] = round(gbps / RESULTS[(case, "reference")], 2)
    request.config.bench_report.append(f"{case:16s} {backend:13s} {sec * 1e3:8.1f} ms {gbps:7.2f} GB/s  {gbps / copy_gbps:6.1%} of copy "
          f"({copy_gbps:.2f} GB/s)  {benchmark.extra_info.get('speedup_vs_reference', 1.0):5.2f}x reference")
