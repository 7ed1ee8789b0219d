"""Train-step throughput: baseline vs DiffAug online, and the DiffAug step's bound, in one run.

    pytest bench/bench_train.py --benchmark-only

The bound of a DiffAug step is what its parts cost measured alone, in the same run:
one UNet forward on the B DiffAug views + a classifier step on B images, twice (clean and DiffAug
halves). The goal (issue 6): the DiffAug step within 15% of that bound, i.e. no overhead of its own
beyond the UNet and the doubled classifier batch. ResNet-50 at 224x224 with bf16 autocast (--amp on
CPU), denoiser preset adm-small (random weights), B = 8 per step; set BENCH_TRAIN_BATCH to change B.
"""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

import pytest
import torch
import torchvision

import diffaug_fast as df

REPO = Path(__file__).resolve().parents[1]
B = int(os.environ.get("BENCH_TRAIN_BATCH", "8"))
SIZE = 224
RESULTS: dict[str, float] = {}


def _load_trainer():
    spec = importlib.util.spec_from_file_location("rn50", REPO / "train" / "rn50.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


rn50 = _load_trainer()


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = torchvision.models.resnet50(num_classes=1000).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    den = df.Denoiser(df.UNet(df.get_preset("adm-small")), name="adm-small")
    g = torch.Generator().manual_seed(0)
    batch = {
        "clean": torch.randn(B, 3, SIZE, SIZE, generator=g).contiguous(memory_format=torch.channels_last),
        "diffaug": torch.randn(B, 3, SIZE, SIZE, generator=g).clamp(-2, 2).contiguous(memory_format=torch.channels_last),
        "label": torch.randint(0, 1000, (B,), generator=g),
    }
    buf = torch.empty(2 * B, 3, SIZE, SIZE, memory_format=torch.channels_last)
    return model, opt, scaler, den, batch, buf


def _settings(fraction: float) -> object:
    return rn50.Settings(data="-", diffaug_fraction=fraction)


def _record(benchmark, name: str, images: int) -> None:
    mean = benchmark.stats.stats.mean
    RESULTS[name] = mean
    benchmark.extra_info.update(seconds_per_step=mean, img_per_s=images / mean, batch=B, size=SIZE)


def _step(setup, den, fraction):
    model, opt, scaler, _, batch, buf = setup
    s = _settings(fraction)
    g = torch.Generator().manual_seed(1)
    return lambda: rn50.train_step(model, opt, scaler, batch, den, s, g, buf, torch.device("cpu"),
                                   torch.bfloat16)[0].item()


def test_baseline_step(benchmark, setup):
    benchmark.pedantic(_step(setup, None, 0.0), rounds=3, warmup_rounds=1)
    _record(benchmark, "baseline", B)


def test_diffaug_online_step(benchmark, setup):
    benchmark.pedantic(_step(setup, setup[3], 1.0), rounds=3, warmup_rounds=1)
    _record(benchmark, "diffaug", B)


def test_bound_unet_forward(benchmark, setup):
    den, batch = setup[3], setup[4]
    x = batch["diffaug"].clamp(-1, 1)
    t = torch.full((B,), 500)

    def run():
        with torch.no_grad():
            den(x, t)

    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    _record(benchmark, "unet", B)


@pytest.fixture(scope="module", autouse=True)
def report(request):
    """After the module: the comparison, printed in pytest's terminal summary (bench/conftest.py)."""
    yield
    if len(RESULTS) < 3:
        return
    bound = RESULTS["unet"] + 2 * RESULTS["baseline"]
    ratio = RESULTS["diffaug"] / bound
    request.config.bench_report.extend([
        f"train step, B={B} clean images at {SIZE}x{SIZE}, ResNet-50 bf16 autocast, UNet adm-small, {time.ctime()}",
        f"  baseline        {B / RESULTS['baseline']:7.2f} img/s  ({RESULTS['baseline']:.2f} s/step)",
        f"  DiffAug online  {B / RESULTS['diffaug']:7.2f} img/s  ({RESULTS['diffaug']:.2f} s/step)",
        f"  bound: UNet {RESULTS['unet']:.2f} s + 2 x classifier step {RESULTS['baseline']:.2f} s = {bound:.2f} s",
        f"  DiffAug step / bound = {ratio:.3f} (goal <= 1.15)",
    ])
