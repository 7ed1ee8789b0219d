"""The UNet-heavy paths against the bare UNet forward: how much of the UNet's speed each one keeps.

One run measures, for the demo's denoiser (train/demo.py DEMO_CONFIG, random weights, 48 px, batch 64):

- the bare forward: ``Denoiser(x_t, t)`` of the training's fast UNet (train/setup.py FAST_UNET), images/s;
- DiffAug Ensemble evaluation (eval/ensemble.py ``ensemble_probs``, what train/eval.py --de runs per batch):
  channels_last normalized input as eval's loader gives it, the UNet loaded as train/eval.py loads it;
- certification's denoised smoothing (eval/smoothing.py ``Smooth._sample_counts``, train/certify.py's UNet);
- the bank build's view generation (bank/build.py ``batch_views``: noise, augment, uint8 and JPEG q98);
- DDA (eval/dda.py ``adapt``, guided as the reference): UNet calls per image from ``unet_calls_per_image``.

Each path is reported as UNet images/s (UNet calls x batch / s) and as a ratio to the bare forward at the
same batch and precision, by CPU time (``extra_info["ratio"]``; by wall time: ``ratio_wall``). The
classifier in DE and certification is a pooled linear head, so the ratio is the UNet path's own overhead. DDA's guided steps add a backward pass through the UNet,
so ~0.5 is its ceiling. Then fp32 against bf16 (fp16 on a GPU) for the bare forward and a ResNet-18 training
step at 48 px: low precision only where the device computes it natively (hardware.fast_half_dtype); elsewhere
the case is skipped and says why (emulated bf16 is ~25x slower, which measures nothing useful).

Small rounds so the file runs in ~2 minutes on 2 cores: the paths run at the precision --precision auto picks
(BENCH_PATHS_PRECISION=fp32|bf16|fp16 to force one), BENCH_PATHS_ROUNDS timed rounds (default 1, the best
is kept) after one shared warm-up per UNet, DE over 2 of its 9 t values (the rate per UNet call does not
depend on how many), DDA over 2 reverse steps, guided and unguided. Load average and thread count are in every extra_info.

Run:  OMP_NUM_THREADS=2 python -m pytest bench/bench_paths.py --benchmark-only
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torchvision
from conftest import load_test_helpers
from torch import nn

import diffaug_fast as df
from diffaug_fast.bank.build import batch_views
from diffaug_fast.bank.compute import _unet_options
from diffaug_fast.constants import IMAGENET_MEAN, IMAGENET_STD
from diffaug_fast.eval.dda import DDASettings, adapt, unet_calls_per_image
from diffaug_fast.eval.ensemble import ensemble_probs
from diffaug_fast.eval.smoothing import Smooth
from diffaug_fast.hardware import cpu_flags, fast_half_dtype, precision_name, resolve_precision
from diffaug_fast.train.demo import DEMO_CONFIG
from diffaug_fast.train.setup import FAST_UNET

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BATCH, SIZE = 64, 48
ROUNDS = int(os.environ.get("BENCH_PATHS_ROUNDS", "1"))
PRECISION = os.environ.get("BENCH_PATHS_PRECISION", "auto")
DE_TS = (0, 150, 450)  # t = 0 is the plain view (no UNet call): 2 UNet calls per batch
DDA = {"guided": DDASettings(respaced_steps=20, start_step=2),  # 2 reverse steps, each with a backward
       "unguided": DDASettings(respaced_steps=20, start_step=2, guidance_scale=0.0)}  # the chain alone
_BARE: dict[str, tuple[float, float]] = {}  # precision name -> bare forward images/s (wall, CPU time)
_BARE_ROUND: list[tuple[float, float]] = []  # (wall, CPU) seconds of the bare forwards beside a path's rounds
_BARE_DEN: dict[str, object] = {}  # precision name -> the bare forward's Denoiser




def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _machine() -> dict:
    flags = sorted(f for f in cpu_flags() if f.startswith(("avx512", "amx")) or f == "avx2")
    return {"device": str(DEVICE), "threads": torch.get_num_threads(), "load_avg_1min": os.getloadavg()[0],
            "cpu_flags": " ".join(flags)}


def _timed(benchmark, fn, bare=None) -> tuple[float, float]:
    """(best wall seconds, least process CPU seconds) per call over ROUNDS timed rounds (the caller warmed the
    UNet up). With ``bare`` (a callable) each round first times one bare forward, outside the benchmark's
    clock, into _BARE_ROUND: on a shared machine, times taken a minute apart see other loads, so each ratio
    is taken against forwards timed beside the path's own calls; CPU time is the steadier of the two
    (bench_dda.py's finding)."""
    times: list[tuple[float, float]] = []
    _BARE_ROUND.clear()

    def clock(f):
        c0, t0 = time.process_time(), time.perf_counter()
        out = f()
        _sync()
        return out, (time.perf_counter() - t0, time.process_time() - c0)

    def setup():
        if bare is not None:
            _BARE_ROUND.append(clock(bare)[1])
        return (), {}

    def run():
        out, dt = clock(fn)
        times.append(dt)
        return out

    benchmark.pedantic(run, setup=setup, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    return min(w for w, _ in times), min(c for _, c in times)


@pytest.fixture(scope="module")
def weights():
    return load_test_helpers().randomize_(df.UNet(DEMO_CONFIG), seed=0).state_dict()


@pytest.fixture(scope="module")
def half():
    """The low-precision dtype the paths run in (None: float32)."""
    return resolve_precision(PRECISION, DEVICE)


def _denoiser(weights, dtype, **kw):
    den = df.load_denoiser(weights, DEMO_CONFIG, device=DEVICE, dtype=dtype or torch.float32, **kw)
    x = torch.zeros(BATCH, 3, SIZE, SIZE, device=DEVICE)
    with torch.no_grad():
        den(x.to(den.dtype), torch.full((BATCH,), 100, device=DEVICE))  # warm-up: allocations, oneDNN primitives
    return den


def _images(channels_last: bool = False, normalized: bool = False) -> torch.Tensor:
    x = torch.rand(BATCH, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    if normalized:
        x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    else:
        x = x * 2 - 1
    x = x.to(DEVICE)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _head() -> nn.Module:
    """A pooled linear classifier: negligible next to the UNet, so a path's ratio is its UNet work."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 10)).to(DEVICE).eval()


def _bare_forward(weights, dtype):
    """A callable running one bare forward of the fast UNet at BATCH in ``dtype`` (loaded and warmed once)."""
    name = precision_name(dtype)
    if name not in _BARE_DEN:
        _BARE_DEN[name] = _denoiser(weights, dtype, **FAST_UNET)
    den = _BARE_DEN[name]
    x, t = _images().to(den.dtype), torch.full((BATCH,), 200, device=DEVICE)

    def forward():
        with torch.no_grad():
            return den(x, t)

    return forward


def _report(benchmark, request, path: str, unet_images: int, seconds: tuple[float, float], weights, dtype,
            note: str = ""):
    """extra_info["ratio"]: UNet images per CPU second against the bare forward's (wall: "ratio_wall")."""
    rate, rate_cpu = (unet_images / s for s in seconds)
    bare, bare_cpu = (BATCH / min(r[i] for r in _BARE_ROUND) for i in (0, 1))  # forwards beside these rounds
    ratio, ratio_wall = rate_cpu / bare_cpu, rate / bare
    benchmark.extra_info.update(_machine(), path=path, precision=precision_name(dtype), batch=BATCH, size=SIZE,
                                unet_images_per_s=round(rate, 2), bare_forward_images_per_s=round(bare, 2),
                                unet_images_per_cpu_s=round(rate_cpu, 2), bare_images_per_cpu_s=round(bare_cpu, 2),
                                ratio=round(ratio, 3), ratio_wall=round(ratio_wall, 3))
    request.config.bench_report.append(
        f"{path:<28} {precision_name(dtype)}: {rate:6.1f} UNet img/s, {rate_cpu:6.1f} per CPU s = {ratio:.2f}x the bare "
        f"forward by CPU time, {ratio_wall:.2f}x by wall{note}")


def _low_precision_or_skip(name: str) -> torch.dtype | None:
    """None for fp32; the native low-precision dtype for "half"; skip (saying why) where there is none."""
    if name == "fp32":
        return None
    native = fast_half_dtype(DEVICE)
    if native is None:
        pytest.skip("no native bf16 on this CPU (no amx_bf16 / avx512_bf16 in /proc/cpuinfo): oneDNN would "
                    "emulate it, ~25x slower than fp32; measured only where it is native or on a GPU")
    return native


@pytest.mark.parametrize("precision", ["fp32", "half"])
def test_bare_forward(benchmark, request, weights, precision):
    dtype = _low_precision_or_skip(precision)
    wall, cpu = _timed(benchmark, _bare_forward(weights, dtype))
    name = precision_name(dtype)
    _BARE[name] = BATCH / wall, BATCH / cpu
    benchmark.extra_info.update(_machine(), path="bare forward", precision=name, images_per_s=round(BATCH / wall, 2),
                                images_per_cpu_s=round(BATCH / cpu, 2))
    line = (f"{'bare UNet forward':<28} {name}: {BATCH / wall:6.1f} img/s, {BATCH / cpu:6.1f} per CPU s (batch {BATCH}, "
            f"{SIZE} px, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f})")
    if name != "fp32" and "fp32" in _BARE:
        benchmark.extra_info["speedup_vs_fp32"] = round(BATCH / wall / _BARE["fp32"][0], 3)
        line += f" = {BATCH / wall / _BARE['fp32'][0]:.2f}x fp32"
    request.config.bench_report.append(line)


def test_de_evaluation(benchmark, request, weights, half):
    """train/eval.py --de: the UNet as train/eval.py loads it (FAST_UNET), one augment per t, then the classifier."""
    den = _denoiser(weights, half, **FAST_UNET)
    x, head = _images(channels_last=True, normalized=True), _head()
    g = torch.Generator(device=DEVICE).manual_seed(0)
    s = _timed(benchmark, lambda: ensemble_probs(head, x, den, timesteps=DE_TS, generator=g, autocast_dtype=half),
               _bare_forward(weights, half))
    _report(benchmark, request, "DE evaluation", BATCH * sum(t > 0 for t in DE_TS), s, weights, half)


def test_certify_denoised_smoothing(benchmark, request, weights, half):
    """train/certify.py --unet: BATCH noisy copies of one image per UNet call (its --batch-size)."""
    den = _denoiser(weights, half)
    smooth = Smooth(_head(), 10, 0.5, den, autocast_dtype=half)
    x = _images()[0] * 0.5 + 0.5  # one [0, 1] image
    s = _timed(benchmark, lambda: smooth._sample_counts(x, BATCH, BATCH), _bare_forward(weights, half))
    _report(benchmark, request, "certify (denoised smooth.)", BATCH, s, weights, half)


def test_bank_views(benchmark, request, weights, half):
    """The bank build's per-batch work: one view of BATCH images, encoded as JPEG q98 (its default)."""
    if (half is not None) != (fast_half_dtype(DEVICE) is not None):
        pytest.skip("the bank builds in the device's native half precision or fp32 only (bank/cli.py)")
    opts = _unet_options(half is not None, "direct", False, DEVICE)
    den = _denoiser(weights, opts.pop("dtype"), **opts)
    x = _images()
    with ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as pool:
        s = _timed(benchmark, lambda: batch_views(x, list(range(BATCH)), 0, den, seed=0, t_range=(0, 1000),
                                                  fmt="jpeg", quality=98, pool=pool), _bare_forward(weights, half))
    _report(benchmark, request, "bank view generation", BATCH, s, weights, half, note="; JPEG encoding included")


@pytest.mark.parametrize("mode", ["guided", "unguided"])
def test_dda(benchmark, request, weights, half, mode):
    """DDA's reverse steps: guided (the reference) adds an input-gradient backward per UNet call (ceiling
    ~0.5x); unguided (guidance_scale 0) is the chain alone (ceiling 1x)."""
    den = _denoiser(weights, half)
    x = _images()
    calls = unet_calls_per_image(DDA[mode], den.num_steps)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    s = _timed(benchmark, lambda: adapt(x, den, DDA[mode], generator=g), _bare_forward(weights, half))
    _report(benchmark, request, f"DDA ({mode})", BATCH * calls, s, weights, half,
            note=f"; {calls} calls/image" + (", each with a backward" if mode == "guided" else ""))


@pytest.mark.parametrize("precision", ["fp32", "half"])
def test_resnet18_train_step(benchmark, request, precision):
    """One SGD step of ResNet-18 at 48 px, batch 64, channels_last; low precision under autocast."""
    dtype = _low_precision_or_skip(precision)
    model = torchvision.models.resnet18(num_classes=10).to(DEVICE, memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = _images(channels_last=True), torch.randint(0, 10, (BATCH,), device=DEVICE)
    scaler = torch.amp.GradScaler(DEVICE.type, enabled=dtype == torch.float16)

    def step():
        with torch.autocast(DEVICE.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    step()  # warm-up
    wall, cpu = _timed(benchmark, step)
    name = precision_name(dtype)
    benchmark.extra_info.update(_machine(), path="resnet18 train step", precision=name,
                                images_per_s=round(BATCH / wall, 2), images_per_cpu_s=round(BATCH / cpu, 2))
    request.config.bench_report.append(f"{'ResNet-18 train step':<28} {name}: {BATCH / wall:6.1f} img/s, "
                                       f"{BATCH / cpu:6.1f} per CPU s")


