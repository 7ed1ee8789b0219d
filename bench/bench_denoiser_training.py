"""Denoiser training step (diffaug_fast.train_denoiser): steps/s and images/s, forward / backward split.

One step = the trainer's own step functions without the loader (denoiser_training.diffusion_forward: t and
noise per sample, x_t, the UNet forward, the hybrid loss; optimizer_step: backward, gradient clipping, AdamW,
EMA update). Timed
separately: forward + loss, and backward + optimizer + EMA. Model: the demo's UNet (DEMO_CONFIG, 0.94 M
parameters) at the demo size (48 px) and at 64 px, batch 32, float32 and, where the device computes it
natively, the half dtype the trainer's --amp picks. extra_info: steps_per_s, images_per_s, forward_s,
backward_s, cpu_s_per_step (process CPU time: on a loaded machine wall time / 2 cores underestimates an idle
machine's speed, CPU time per step does not).

Run:  python -m pytest bench/bench_denoiser_training.py --benchmark-only --benchmark-json=den.json
"""

from __future__ import annotations

import copy
import time
from dataclasses import replace

import pytest
import torch

from diffaug_fast.diffusion.loss import LossTables
from diffaug_fast.diffusion.unet import UNet
from diffaug_fast.hardware import fast_half_dtype
from diffaug_fast.train.demo import DEMO_CONFIG
from diffaug_fast.train.denoiser_parts import diffusion_forward, optimizer_step

BATCH = 32
SIZES = [48, 64]
DTYPES = ["fp32", "amp"]
_STEPS = 3


class _Trainer:
    def __init__(self, size: int, amp: bool, device: torch.device):
        torch.manual_seed(0)
        cfg = replace(DEMO_CONFIG, image_size=size)
        self.model = UNet(cfg).to(device)
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.dtype = fast_half_dtype(device) if amp else None
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
        self.tables = LossTables(cfg.schedule())
        self.x0 = torch.rand(BATCH, 3, size, size, device=device) * 2 - 1
        self.device, self.step_no = device, 0

    def forward(self):
        terms, _ = diffusion_forward(self.model, self.x0, torch.arange(BATCH), 0, self.step_no, self.tables, self.dtype)
        return terms["loss"].mean()

    def backward(self, loss):
        optimizer_step(loss, self.model, self.ema, self.opt, self.scaler, 1.0, 0.9999)
        self.step_no += 1

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", SIZES)
def test_train_step(benchmark, size, dtype, request):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dtype == "amp" and fast_half_dtype(device) is None:
        pytest.skip(f"{device} has no native half dtype: --amp trains in float32 (the fp32 case)")
    tr = _Trainer(size, dtype == "amp", device)
    tr.backward(tr.forward())  # warm-up: allocator, oneDNN primitive creation
    fwd, bwd = [], []
    cpu0 = time.process_time()

    def step():
        t0 = time.perf_counter()
        loss = tr.forward()
        tr.sync()
        t1 = time.perf_counter()
        tr.backward(loss)
        tr.sync()
        fwd.append(t1 - t0)
        bwd.append(time.perf_counter() - t1)

    benchmark.pedantic(step, rounds=_STEPS, iterations=1)
    cpu = (time.process_time() - cpu0) / len(fwd)
    f, b = sum(fwd) / len(fwd), sum(bwd) / len(bwd)
    info = {"steps_per_s": 1 / (f + b), "images_per_s": BATCH / (f + b), "forward_s": f, "backward_s": b,
            "cpu_s_per_step": cpu, "batch": BATCH, "size": size, "dtype": str(tr.dtype or torch.float32),
            "threads": torch.get_num_threads(), "device": str(device)}
    benchmark.extra_info.update(info)
    request.config.bench_report.append(
        f"denoiser train step {size}px {info['dtype']} batch {BATCH}: {info['steps_per_s']:.3f} steps/s, "
        f"{info['images_per_s']:.1f} img/s (forward+loss {f:.2f} s, backward+AdamW+EMA {b:.2f} s; "
        f"{cpu:.2f} CPU-s/step on {info['threads']} threads)")
