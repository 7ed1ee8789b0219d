"""UNet inference: the DiffAug reference path against our Denoiser modes, same input, same run.

Reference: guided_diffusion's UNetModel called the way the DiffAug reference code calls it,
``diffusion.p_sample(model, x_t, t, clip_denoised=True)['pred_xstart']`` (fp32; fp16 = convert_to_fp16 under
autocast; bf16 = the same with bfloat16). Ours: ``Denoiser(x_t, t)`` + the x0 step (``ops.reference``).

Reported per case in extra_info (--benchmark-json=FILE) and as a line at the end of the run: img/s, GFLOP/s (FLOPs of the full UNet forward,
counted once with torch.utils.flop_counter on the meta device, the same figure for every case, so
"effective" GFLOP/s for Winograd), the fraction of this machine's peak for the case's dtype measured in the
same run (best of a matmul and a 256-channel 3x3 conv at 56x56), the speed-up over the reference fp32
path, and the error of pred_xstart against the reference fp32 output (relative L2).

Run:  python -m pytest bench/bench_unet.py --benchmark-only --benchmark-json=unet.json -k adm-small
      python -m pytest bench/bench_unet.py --benchmark-only --benchmark-json=unet.json -k adm256  (~12 s/img fp32)
On CPU the compiled cases, the reference's bf16/fp16 cases and adm256's low-precision cases take many
minutes each; they run only with DIFFAUG_BENCH_ALL=1.

On a GPU every case runs on cuda at batch 64 (BENCH_UNET_BATCH), the reference under cuda
autocast, peaks measured there (8192^3 matmuls); img/s counts images, not batches. The CPU-only modes
(Winograd through NNPACK, the fused GroupNorm kernel) and the compiled cases (max-autotune of adm256
takes many minutes) are skipped there unless DIFFAUG_BENCH_ALL=1. `make gpu-check` runs
``-k "adm256 and (fp16 or bf16 or ref-fp32)"``.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.nn.functional as F
from conftest import load_test_helpers
from torch.utils.flop_counter import FlopCounterMode

import diffaug_fast as df
from diffaug_fast.ops import reference

_helpers = load_test_helpers()
oracle_model_and_diffusion, randomize_ = _helpers.oracle_model_and_diffusion, _helpers.randomize_

SIZE = 224
T = 500
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BATCH = int(os.environ.get("BENCH_UNET_BATCH", "64" if DEVICE.type == "cuda" else "1"))
LOW = (torch.float16, torch.bfloat16)
# (name, dtype, Denoiser options); "ref-*" are the guided_diffusion reference path.
CASES = [
    ("ref-fp32", torch.float32, None),
    ("ours-fp32", torch.float32, dict(channels_last=True, eps_only=True)),
    ("ours-fp32-fused", torch.float32, dict(channels_last=True, eps_only=True, fused_norm=True)),
    ("ours-fp32-winograd", torch.float32, dict(conv_algo="winograd", eps_only=True)),
    ("ours-fp32-winograd-fused", torch.float32, dict(conv_algo="winograd", eps_only=True, fused_norm=True)),
    ("ours-fp32-compiled", torch.float32, dict(channels_last=True, eps_only=True, compile=True)),
    ("ref-bf16", torch.bfloat16, None),
    ("ours-bf16-fast", torch.bfloat16, dict(mode="fast", channels_last=True, eps_only=True)),
    ("ours-bf16-reference", torch.bfloat16, dict(mode="reference", channels_last=True, eps_only=True)),
    ("ref-fp16", torch.float16, None),
    ("ours-fp16-fast", torch.float16, dict(mode="fast", channels_last=True, eps_only=True)),
    ("ours-fp16-reference", torch.float16, dict(mode="reference", channels_last=True, eps_only=True)),
]
PRESETS = ["adm-small", "adm256-uncond"]
_STATE: dict[str, dict] = {}


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, reps: int = 2) -> float:
    fn()
    _sync()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync()
    return (time.perf_counter() - start) / reps


@pytest.fixture(scope="module")
def peaks() -> dict[torch.dtype, float]:
    """GFLOP/s of the best plain-torch kernel per dtype on this machine, measured now."""
    out = {}
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            # 2048^3 for fp32; 512^3 in bf16/fp16, which run at <1 GFLOP/s through matmul on CPUs without
            # units; on a GPU 8192^3 (and a batch of 32 for the conv) to fill the tensor cores
            gpu = DEVICE.type == "cuda"
            n = 8192 if gpu else 512 if dtype in LOW else 2048
            a, b = (torch.randn(n, n, dtype=dtype, device=DEVICE) for _ in range(2))
            mm = 2 * n**3 / _time(lambda a=a, b=b: a @ b, 3) / 1e9
            nb = 32 if gpu else 1
            x = torch.randn(nb, 256, 56, 56, dtype=dtype, device=DEVICE).contiguous(memory_format=torch.channels_last)
            w = torch.randn(256, 256, 3, 3, dtype=dtype, device=DEVICE).contiguous(memory_format=torch.channels_last)
            conv = nb * 2 * 256 * 256 * 9 * 56 * 56 / _time(lambda x=x, w=w: F.conv2d(x, w, padding=1), 3) / 1e9
            out[dtype] = max(mm, conv)
    return out


def _state(preset: str) -> dict:
    """Random-weight oracle (timing does not depend on the weights), the input, FLOPs, the fp32 truth."""
    if preset not in _STATE:
        cfg = df.get_preset(preset)
        oracle, diffusion = oracle_model_and_diffusion(cfg)
        randomize_(oracle)
        oracle.to(DEVICE)
        g = torch.Generator().manual_seed(0)
        x_t = torch.randn(BATCH, 3, SIZE, SIZE, generator=g).to(DEVICE)
        t = torch.full((BATCH,), T, device=DEVICE)
        with torch.device("meta"):
            meta = df.UNet(cfg)
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            meta(torch.empty(1, 3, SIZE, SIZE, device="meta"), torch.empty(1, device="meta"))
        # FLOPs of one image's forward (the counter ran batch 1), times the batch
        _STATE[preset] = dict(cfg=cfg, oracle=oracle, diffusion=diffusion, x_t=x_t, t=t,
                              flops=fc.get_total_flops() * BATCH)
    return _STATE[preset]


def _reference_fn(st: dict, dtype: torch.dtype):
    model, diffusion, x_t, t = st["oracle"], st["diffusion"], st["x_t"], st["t"]
    if dtype == torch.float32:
        def run():
            with torch.no_grad():
                return diffusion.p_sample(model, x_t, t, clip_denoised=True)["pred_xstart"]
        return run
    model = _helpers.oracle_low_precision(model, dtype)

    def run_low():
        with torch.no_grad(), torch.autocast(DEVICE.type, dtype=dtype):
            return diffusion.p_sample(model, x_t, t, clip_denoised=True)["pred_xstart"].float()
    return run_low


def _ours_fn(st: dict, dtype: torch.dtype, opts: dict):
    den = df.load_denoiser(st["oracle"].state_dict(), st["cfg"], dtype=dtype, device=DEVICE, **opts)
    x_t, t = st["x_t"], st["t"]
    coef = den.schedule.gather(t)
    warm = den.warmup(BATCH, SIZE, SIZE, iters=1) if opts.get("compile") else 0.0

    def run():
        with torch.no_grad():
            eps = reference.eps_from_output(den(x_t, t), 3)
            return reference.predict_x0(x_t, eps, coef[:, 2], coef[:, 3])
    return run, warm


@pytest.mark.parametrize("case,dtype,opts", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("preset", PRESETS)
def test_unet(benchmark, peaks, request, preset, case, dtype, opts):
    cpu = DEVICE.type == "cpu"
    heavy = (opts or {}).get("compile") or (cpu and dtype in LOW and (opts is None or preset == "adm256-uncond"))
    cpu_only_mode = (opts or {}).get("conv_algo") == "winograd" or (opts or {}).get("fused_norm")
    if not cpu and cpu_only_mode and not os.environ.get("DIFFAUG_BENCH_ALL"):
        pytest.skip("a CPU-only mode (NNPACK Winograd, the fused GroupNorm CPU kernel)")
    if heavy and not os.environ.get("DIFFAUG_BENCH_ALL"):
        # On this AVX2 CPU (no bf16/fp16 units) a channels_last bf16 3x3 conv runs at ~16 GFLOP/s and an NCHW
        # one, the reference's layout, at ~0.4 GFLOP/s: ref-bf16 on adm-small takes >4 min per image.
        # CPU Inductor compiles take 2-4 min per graph here and ran slower than eager (bench/NOTES.md).
        pytest.skip("heavy (compile: minutes per graph; on CPU the low-precision reference and adm256): "
                    "DIFFAUG_BENCH_ALL=1")
    st = _state(preset)
    warm = 0.0
    if opts is None:
        fn = _reference_fn(st, dtype)
    else:
        fn, warm = _ours_fn(st, dtype, opts)

    def synced():
        out = fn()
        _sync()  # a GPU call returns before the work is done
        return out

    out = benchmark.pedantic(synced, rounds=1 if preset == "adm256-uncond" else 2, iterations=1, warmup_rounds=1)
    sec = benchmark.stats.stats.min / BATCH  # per image
    r = dict(s_per_img=sec, img_per_s=1 / sec, gflop_per_s=st["flops"] / BATCH / sec / 1e9, batch=BATCH,
             device=str(DEVICE),
             peak_gflop_per_s=peaks[dtype], warmup_s=warm, load_avg_1min=os.getloadavg()[0])
    r["peak_fraction"] = r["gflop_per_s"] / peaks[dtype]
    if case == "ref-fp32":
        st["ref32"] = (sec, out)
    if "ref32" in st:
        ref_sec, ref_out = st["ref32"]
        r["speedup_vs_ref_fp32"] = ref_sec / sec
        r["rel_err_vs_ref_fp32"] = ((out - ref_out).norm() / ref_out.norm()).item()
    benchmark.extra_info.update(r)
    report = getattr(request.config, "bench_report", None)  # printed at the end by bench/conftest.py
    if report is not None:
        report.append(f"unet {preset} b{BATCH} {DEVICE.type} {case:20} {sec:8.4f} s/img {1 / sec:7.3f} img/s {r['gflop_per_s']:7.1f} GFLOP/s "
                      f"{100 * r['peak_fraction']:4.0f}% of {dtype} peak ({peaks[dtype]:.0f}) "
                      f"x{r.get('speedup_vs_ref_fp32', float('nan')):.2f} vs ref-fp32, "
                      f"pred_xstart rel err {r.get('rel_err_vs_ref_fp32', float('nan')):.1e}; "
                      f"load {r['load_avg_1min']:.1f}")
