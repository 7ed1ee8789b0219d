"""DDA test-time adaptation (diffaug_fast.eval.dda.adapt): images/s against the bound set by the bare UNet.

adapt runs ``unet_calls_per_image(settings)`` UNet forwards per image (50 with the reference's settings),
each on the whole batch, so the bare forward rate at the same batch and size bounds it:
bound = forward img/s / calls per image. The reference's guidance differentiates through the UNet, so each
guided step adds a backward pass (input gradient only, weights frozen: about one forward's work) and the
expected fraction of the bound is ~1/2; the unguided case (guidance_scale=0, forward only under no_grad) shows what the chain itself
costs. Model: the ``adm-tiny`` preset with random weights (timing does not depend on them), 48 px, batch 16
(BENCH_DDA_BATCH), float32, the reference's DDASettings (100 respaced steps, start 50, D = 4, scale 6).

Reported in extra_info and as lines at the end: img/s, process CPU seconds per image, the UNet calls per
image, the bound and the fraction of it reached, by wall time and by CPU time (on a shared machine wall
times taken minutes apart see different loads; CPU time is steadier, best with OMP_NUM_THREADS=1 there,
where two spinning OpenMP threads on two busy cores waste several times the work), and the load average.

Run:  python -m pytest bench/bench_dda.py --benchmark-only
"""

from __future__ import annotations

import os
import time

import pytest
import torch
from conftest import load_test_helpers

import diffaug_fast as df
from diffaug_fast.eval.dda import DDASettings, adapt, unet_calls_per_image

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BATCH = int(os.environ.get("BENCH_DDA_BATCH", "16"))
SIZE = 48
SETTINGS = {"guided": DDASettings(), "unguided": DDASettings(guidance_scale=0.0)}
_STATE: dict[str, tuple[float, float]] = {}  # "forward": (wall, CPU) seconds per image


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(scope="module")
def setup():
    helpers = load_test_helpers()
    cfg = df.get_preset("adm-tiny")
    unet = helpers.randomize_(df.UNet(cfg)).to(DEVICE)  # random weights: a non-zero output and gradient
    den = df.Denoiser(unet)
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(BATCH, 3, SIZE, SIZE, generator=g) * 2 - 1).to(DEVICE)
    t = torch.full((BATCH,), 494, device=DEVICE)
    return den, x, t


def _timed(benchmark, fn, rounds: int, warmup: int) -> tuple[float, float]:
    """(best wall seconds, least process CPU seconds) per call, over the timed rounds."""
    times: list[tuple[float, float]] = []

    def run():
        c0, w0 = time.process_time(), time.perf_counter()
        out = fn()
        _sync()
        times.append((time.perf_counter() - w0, time.process_time() - c0))
        return out

    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=warmup)
    timed = times[warmup:]
    return min(w for w, _ in timed), min(c for _, c in timed)


def _forward(den, x, t) -> None:
    with torch.no_grad():
        den(x, t)


def test_unet_forward(benchmark, setup, request):
    den, x, t = setup
    wall, cpu = _timed(benchmark, lambda: _forward(den, x, t), rounds=10, warmup=2)
    _STATE["forward"] = (wall / BATCH, cpu / BATCH)
    benchmark.extra_info.update(img_per_s=BATCH / wall, cpu_s_per_img=cpu / BATCH, batch=BATCH, size=SIZE,
                                device=str(DEVICE), load_avg_1min=os.getloadavg()[0])
    report = getattr(request.config, "bench_report", None)
    if report is not None:
        report.append(f"dda adm-tiny {SIZE}px b{BATCH} {DEVICE.type} unet forward    {BATCH / wall:9.1f} img/s "
                      f"{1e3 * cpu / BATCH:7.2f} CPU-ms/img; {torch.get_num_threads()} threads, "
                      f"load {os.getloadavg()[0]:.1f}")


@pytest.mark.parametrize("case", list(SETTINGS))
def test_adapt(benchmark, setup, request, case):
    den, x, _ = setup
    settings = SETTINGS[case]
    den, x, t = setup
    calls = unet_calls_per_image(settings, den.num_steps)
    if "forward" not in _STATE:  # run alone (-k adapt): measure the bare forward here, untimed by pytest-benchmark
        _forward(den, x, t)
        runs = []
        for _ in range(5):
            c0, w0 = time.process_time(), time.perf_counter()
            _forward(den, x, t)
            _sync()
            runs.append((time.perf_counter() - w0, time.process_time() - c0))
        _STATE["forward"] = (min(w for w, _ in runs) / BATCH, min(c for _, c in runs) / BATCH)

    g = torch.Generator(device=DEVICE)

    def run():
        g.manual_seed(0)
        return adapt(x, den, settings, generator=g)

    # no warm-up round: a round is 50 UNet calls, the forward test (or the loop above) warmed the UNet up
    wall, cpu = _timed(benchmark, run, rounds=2, warmup=0)
    fwd_wall, fwd_cpu = _STATE["forward"]
    rate, bound = BATCH / wall, 1 / (fwd_wall * calls)
    r = dict(img_per_s=rate, cpu_s_per_img=cpu / BATCH, unet_calls_per_img=calls, bound_img_per_s=bound,
             fraction_of_bound=rate / bound, fraction_of_bound_cpu=fwd_cpu * calls * BATCH / cpu, batch=BATCH,
             size=SIZE, device=str(DEVICE), threads=torch.get_num_threads(), load_avg_1min=os.getloadavg()[0])
    benchmark.extra_info.update(r)
    report = getattr(request.config, "bench_report", None)
    if report is not None:
        report.append(f"dda adm-tiny {SIZE}px b{BATCH} {DEVICE.type} adapt {case:9} {rate:9.2f} img/s "
                      f"{1e3 * cpu / BATCH:7.1f} CPU-ms/img, {calls} UNet calls/img, bound {bound:.2f} img/s "
                      f"(forward rate / calls): {100 * r['fraction_of_bound']:.0f}% of it by wall time, "
                      f"{100 * r['fraction_of_bound_cpu']:.0f}% by CPU time; {r['threads']} threads, "
                      f"load {r['load_avg_1min']:.1f}")
