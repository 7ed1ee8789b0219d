"""Denoiser training step (diffaug_fast.train_denoiser): steps/s and images/s, forward / backward split.

One step = the trainer's step without the loader: t and noise drawn per sample, x_t, the UNet forward with
the hybrid loss (improved-diffusion's mse + vb), backward, gradient clipping, AdamW, EMA update. Timed
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

from diffaug_fast.denoiser_training import DEMO_CONFIG, ema_update, sample_t_noise
from diffaug_fast.diffusion_loss import LossTables, hybrid_loss
from diffaug_fast.hardware import fast_half_dtype
from diffaug_fast.unet import UNet

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
        self.schedule, self.tables = cfg.schedule(), LossTables(cfg.schedule())
        self.x0 = torch.rand(BATCH, 3, size, size, device=device) * 2 - 1
        self.device, self.step_no = device, 0

    def forward(self):
        t, noise = sample_t_noise(0, self.step_no, torch.arange(BATCH), tuple(self.x0.shape[1:]), 1000)
        t, noise = t.to(self.device), noise.to(self.device)
        x_t = self.tables("sqrt_abar", t) * self.x0 + self.tables("sqrt_1m_abar", t) * noise
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            out = self.model(x_t, self.schedule.model_timesteps(t))
        return hybrid_loss(out.float(), self.x0, x_t, noise, t, self.tables)["loss"].mean()

    def backward(self, loss):
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.opt)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.scaler.step(self.opt)
        self.scaler.update()
        ema_update(self.ema, self.model, 0.9999)
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
