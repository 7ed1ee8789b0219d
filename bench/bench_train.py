"""Train-step throughput: baseline vs DiffAug online, and the DiffAug step's bound, in one run.

    pytest bench/bench_train.py --benchmark-only

The bound of a DiffAug step is what its parts cost measured alone, in the same run:
one UNet forward on the B DiffAug views + a classifier step on B images, twice (clean and DiffAug
halves). The goal: the DiffAug step within 15% of that bound, i.e. no overhead of its own
beyond the UNet and the doubled classifier batch. ResNet-50 at 224x224 with bf16 autocast (--amp on
CPU with native bf16, else float32), denoiser preset adm-small (random weights), B = 8 per step; set
BENCH_TRAIN_BATCH to change B.

Bank mode trains on [clean; stored view] with no UNet call: its step costs a classifier step
on 2B images. Throughput is compared as images through the classifier per second (clean + DiffAug
views); goal: bank mode >= 0.95 x baseline. Decoding the stored JPEG is the loader's work
(bench_loader.py), not part of this step.
"""

from __future__ import annotations

import importlib
import os
import time
from pathlib import Path

import pytest
import torch
import torchvision

import diffaug_fast as df
from diffaug_fast.hardware import fast_half_dtype

REPO = Path(__file__).resolve().parents[1]
B = int(os.environ.get("BENCH_TRAIN_BATCH", "8"))
SIZE = 224
RESULTS: dict[str, float] = {}
AMP = fast_half_dtype("cpu")  # None on CPUs without native bf16: emulated bf16 is ~25x slower there


def _load_trainer():
    return importlib.import_module("diffaug_fast.train.recipes.rn50")


rn50 = _load_trainer()


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = torchvision.models.resnet50(num_classes=1000).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    den = df.Denoiser(df.UNet(df.get_preset("adm-small")), name="adm-small")
    g = torch.Generator().manual_seed(0)
    mean = torch.tensor(rn50.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(rn50.IMAGENET_STD).view(1, 3, 1, 1)

    def images():  # classifier-normalized views of [0, 1] images, as the loader gives them
        return ((torch.rand(B, 3, SIZE, SIZE, generator=g) - mean) / std).contiguous(memory_format=torch.channels_last)

    batch = {
        "clean": images(),
        "diffaug": images(),
        "label": torch.randint(0, 1000, (B,), generator=g),
    }
    batch["bank"] = batch["diffaug"].clone()  # stands in for the decoded stored view
    buf = torch.empty(2 * B, 3, SIZE, SIZE, memory_format=torch.channels_last)
    return model, opt, scaler, den, batch, buf


def _settings(fraction: float) -> object:
    return rn50.Settings(data="-", diffaug_fraction=fraction)


def _without_bank(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "bank"}


def _record(benchmark, name: str, images: int) -> None:
    mean = benchmark.stats.stats.mean
    RESULTS[name] = mean
    benchmark.extra_info.update(seconds_per_step=mean, img_per_s=images / mean, batch=B, size=SIZE)


def _step(setup, den, fraction, bank=False):
    model, opt, scaler, _, batch, buf = setup
    s = _settings(fraction)
    g = torch.Generator().manual_seed(1)
    batch = batch if bank else _without_bank(batch)
    return lambda: rn50.train_step(model, opt, scaler, batch, den, s, g, buf, torch.device("cpu"), AMP)[0].item()


def test_baseline_step(benchmark, setup):
    benchmark.pedantic(_step(setup, None, 0.0), rounds=3, warmup_rounds=1)
    _record(benchmark, "baseline", B)


def test_diffaug_online_step(benchmark, setup):
    benchmark.pedantic(_step(setup, setup[3], 1.0), rounds=3, warmup_rounds=1)
    _record(benchmark, "diffaug", B)


def test_bank_mode_step(benchmark, setup):
    benchmark.pedantic(_step(setup, None, 0.0, bank=True), rounds=3, warmup_rounds=1)
    _record(benchmark, "bank", 2 * B)


def test_bound_unet_forward(benchmark, setup):
    den = setup[3]
    x = torch.rand(B, 3, SIZE, SIZE) * 2 - 1
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
    vit_report(request.config.bench_report)
    if not {"baseline", "diffaug", "bank", "unet"} <= RESULTS.keys():
        return
    bound = RESULTS["unet"] + 2 * RESULTS["baseline"]
    ratio = RESULTS["diffaug"] / bound
    classifier = {"baseline": B / RESULTS["baseline"], "bank": 2 * B / RESULTS["bank"],
                  "diffaug": 2 * B / RESULTS["diffaug"]}
    request.config.bench_report.extend([
        f"train step, B={B} clean images at {SIZE}x{SIZE}, ResNet-50 {AMP or torch.float32}, UNet adm-small, "
        f"{time.ctime()}",
        f"  baseline        {B / RESULTS['baseline']:7.2f} img/s  ({RESULTS['baseline']:.2f} s/step)",
        f"  DiffAug online  {B / RESULTS['diffaug']:7.2f} img/s  ({RESULTS['diffaug']:.2f} s/step)",
        f"  bound: UNet {RESULTS['unet']:.2f} s + 2 x classifier step {RESULTS['baseline']:.2f} s = {bound:.2f} s",
        f"  DiffAug step / bound = {ratio:.3f} (goal <= 1.15)",
        f"  images through the classifier per second: baseline {classifier['baseline']:.2f}, bank mode "
        f"{classifier['bank']:.2f} ({classifier['bank'] / classifier['baseline']:.2f}x, goal >= 0.95), "
        f"online {classifier['diffaug']:.2f} ({classifier['diffaug'] / classifier['baseline']:.2f}x)",
    ])


# ------------------------------------------------------------------------------------------------ ViT
# The DeiT-III finetune recipe's step (train/vit.py): timm ViT-S/16 with LayerScale at 224 (ViT-B/16 is ~4x
# the FLOPs: too slow for a CPU bench), AdamW with timm's groups, Mixup/CutMix over both halves, soft-target
# CE; same B, size and UNet (adm-small) as above, so the UNet forward measured above is its bound's UNet term.

VIT_ARCH = "deit3_small_patch16_224"


def _load_vit():
    return importlib.import_module("diffaug_fast.train.recipes.vit")


@pytest.fixture(scope="module")
def vit_setup(setup):
    from diffaug_fast.train.engine import Recipe

    vit = _load_vit()
    torch.manual_seed(0)
    model = vit.create_vit(VIT_ARCH, 1000, img_size=SIZE, drop_path=0.2)
    opt = vit.create_optimizer(model, 1e-5, 0.1)
    s = vit.Settings(data="-")
    recipe = Recipe(name="vit", build_model=None, build_optimizer=None, loss_fn=vit.soft_cross_entropy,
                    batch_transform=vit.make_batch_transform(s, 1000))
    return vit, model, opt, recipe


def _vit_step(setup, vit_setup, den, fraction, bank=False):
    from diffaug_fast.train.step import DiffAugPlan, StepParts, train_step

    _, _, scaler, _, batch, buf = setup
    vit, model, opt, recipe = vit_setup
    s = vit.Settings(data="-", diffaug_fraction=fraction)
    g = torch.Generator().manual_seed(1)
    batch = batch if bank else _without_bank(batch)
    parts = StepParts(model, opt, scaler, buf, torch.device("cpu"), AMP, DiffAugPlan.of(s, den), recipe)
    return lambda: train_step(parts, batch, g)[0].item()


def test_vit_baseline_step(benchmark, setup, vit_setup):
    benchmark.pedantic(_vit_step(setup, vit_setup, None, 0.0), rounds=3, warmup_rounds=1)
    _record(benchmark, "vit_baseline", B)


def test_vit_diffaug_online_step(benchmark, setup, vit_setup):
    benchmark.pedantic(_vit_step(setup, vit_setup, setup[3], 1.0), rounds=3, warmup_rounds=1)
    _record(benchmark, "vit_diffaug", B)


def test_vit_bank_mode_step(benchmark, setup, vit_setup):
    benchmark.pedantic(_vit_step(setup, vit_setup, None, 0.0, bank=True), rounds=3, warmup_rounds=1)
    _record(benchmark, "vit_bank", 2 * B)


def vit_report(lines: list[str]) -> None:
    if not {"vit_baseline", "vit_diffaug", "vit_bank", "unet"} <= RESULTS.keys():
        return
    base, online, bank, unet = (RESULTS[k] for k in ("vit_baseline", "vit_diffaug", "vit_bank", "unet"))
    bound = unet + 2 * base
    lines.extend([
        f"ViT train step (train/vit.py recipe), B={B} clean images at {SIZE}x{SIZE}, timm {VIT_ARCH} "
        f"{AMP or torch.float32}, AdamW, Mixup/CutMix on both halves, UNet adm-small, {time.ctime()}",
        f"  baseline        {B / base:7.2f} img/s  ({base:.2f} s/step)",
        f"  DiffAug online  {B / online:7.2f} img/s  ({online:.2f} s/step)",
        f"  bound: UNet {unet:.2f} s + 2 x classifier step {base:.2f} s = {bound:.2f} s",
        f"  DiffAug step / bound = {online / bound:.3f} (goal <= 1.15)",
        f"  images through the classifier per second: baseline {B / base:.2f}, bank mode {2 * B / bank:.2f} "
        f"({(2 * B / bank) / (B / base):.2f}x, goal >= 0.95), online {2 * B / online:.2f} "
        f"({(2 * B / online) / (B / base):.2f}x)",
    ])
