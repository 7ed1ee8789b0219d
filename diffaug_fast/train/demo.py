"""The embedded demo (``make demo``, ``python train/rn50.py`` without --data): its synthetic data, a denoiser
trained on those images by our own code (once, cached beside them), and the demo's extra report lines."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..constants import UNIT_MEAN, UNIT_STD
from ..data import build_loader, scan_dataset
from ..data.synthetic import make_synthetic_dataset
from ..diffusion.denoiser import load_denoiser, read_sidecar, sidecar_path
from ..diffusion.loss import format_psnr_table, psnr_table
from ..diffusion.unet import UNetConfig
from .denoiser import main as train_denoiser_main

__all__ = ["DEMO_CONFIG", "DemoSetup", "classifier_demo", "demo_denoiser", "demo_unet", "demo_psnr_report"]

# The demo's denoiser: our guided family (resblock up/down, scale-shift norm), learned sigma, linear 1000 steps
# (t over 0..999, DiffAug's range), no attention, 0.94 M parameters.
DEMO_CONFIG = UNetConfig(model_channels=32, num_res_blocks=1, channel_mult=(1, 1, 2), attention_ds=(),
                         resblock_updown=True, image_size=48, family="guided-diffusion")




@dataclass(frozen=True)
class DemoSetup:
    """What a classifier recipe runs without --data: ``prepare(trainer) -> settings`` (data and, if wanted, the
    demo's denoiser filled in), the run folder's name, and the line that introduces the denoiser."""

    run_name: str
    prepare: Callable = None  # type: ignore[assignment]
    note: str = ("  the demo's denoiser: an ADM UNet trained on the demo's training images by `python -m "
                 "diffaug_fast.train_denoiser` (command and seed in its .json); its one-step PSNR is reported at the end")


def _prepare(tr):
    """The demo's data (rank 0 makes it, every rank gets the path) and, unless a UNet is named, its denoiser."""
    s = tr.s
    data = tr.share(str(make_synthetic_dataset()) if tr.is_main else None)
    unet = s.unet
    if not (s.unet or s.unet_preset) and (s.diffaug == "online" or s.de_eval):
        # a denoiser trained on the demo's own images (once, cached beside them): real DiffAug views
        unet = tr.share(str(demo_denoiser(data, say=tr.say)) if tr.is_main else None)
        tr.demo_unet = True
    return dataclasses.replace(s, data=data, unet=unet)


def classifier_demo(run_name: str) -> DemoSetup:
    return DemoSetup(run_name=run_name, prepare=_prepare)



# The shipped demo denoiser: trained by our own code (the argv below, seed 0) on the demo's training images and
# kept in the package (3.7 MB), so the demo starts with a denoiser that denoises: one-step x0 keeps the shapes
# at t = 500 (a 120-step one, all a first run could afford, returned noise there). ``make demo-denoiser``
# retrains it and compares the weights bit for bit (same CPU class and thread count: float sums differ with them).
ASSETS = Path(__file__).resolve().parents[1] / "assets"
SHIPPED = ASSETS / "demo_denoiser.safetensors"
DEMO_DENOISER_STEPS = 1500
DEMO_DENOISER_THREADS = 2  # the shipped file was trained with OMP_NUM_THREADS=2 (make demo-denoiser sets it)


def demo_denoiser_argv(data_root: str | os.PathLike, steps: int, out: str | os.PathLike) -> list[str]:
    """The exact train_denoiser command line of the demo's denoiser (the shipped one used steps = 1500)."""
    data_root = Path(data_root)
    return ["--data", str(data_root / "train"), "--val", str(data_root / "val"),
            "--config", json.dumps({k: getattr(DEMO_CONFIG, k) for k in (
                "model_channels", "num_res_blocks", "channel_mult", "attention_ds", "resblock_updown")}),
            "--image-size", str(DEMO_CONFIG.image_size), "--steps", str(steps), "--batch-size", "32",
            "--lr", "2e-3", "--ema-rate", "0.999", "--seed", "0", "--eval-every", str(min(250, steps)),
            "--log-every", str(min(50, steps)), "--save-every", str(min(100, steps)), "--workers", "0",
            "--no-progress", "--out", str(out)]


def train_content_sha256(data_root: str | os.PathLike) -> str:
    """sha256 over the demo's training files (relative path and bytes, in sorted order): the data fingerprint
    the shipped denoiser records (its JPEG bytes depend on the Pillow build that wrote them)."""
    train = Path(data_root) / "train"
    h = hashlib.sha256()
    for f in sorted(p for p in train.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(train)}\n".encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def shipped_denoiser(data_root: str | os.PathLike, say=print) -> Path | None:
    """The shipped checkpoint when it was trained on this demo dataset (same generator, size, counts and seed:
    the folder name), else None. Bytes that differ (another Pillow's JPEG encoder) are said in one line: the
    images are the same drawings, so it still denoises them."""
    side = read_sidecar(SHIPPED) if SHIPPED.is_file() else None
    if side is None or side[2].get("demo_data") != Path(data_root).name:
        return None
    if side[2].get("train_sha256") != train_content_sha256(data_root):
        say(f"note: the demo's training images differ in their bytes from those {SHIPPED.name} was trained on "
            "(another JPEG encoder?); it is used anyway (same drawings, same seed)")
    return SHIPPED


def demo_denoiser(data_root: str | os.PathLike, *, steps: int | None = None, say=print) -> Path:
    """The embedded demo's denoiser: the shipped one when it was trained on this dataset (``steps`` None), else
    trained once on ``data_root/train`` (``steps``, default DEMO_DENOISER_STEPS) and cached beside the dataset.

    Returns the checkpoint path (``<data_root>.denoiser-<steps>/model.pt`` with its .safetensors and .json when
    trained). Trained with a fixed seed; the exact command is recorded in the sidecar. Built in a temporary
    folder that is renamed at the end, so a killed first run never leaves a half checkpoint behind. Trains in
    this process alone: under torchrun call it on rank 0 only and broadcast the path.
    """
    data_root = Path(data_root)
    if steps is None:
        if (shipped := shipped_denoiser(data_root, say)) is not None:
            return shipped
        steps = DEMO_DENOISER_STEPS
    final = data_root.parent / f"{data_root.name}.denoiser-{steps}"
    ckpt = final / "model.pt"
    if sidecar_path(ckpt).is_file():
        return ckpt
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".", dir=final.parent))
    argv = demo_denoiser_argv(data_root, steps, tmp / "model.pt")
    say(f"training the demo's denoiser once ({steps} steps; cached in {final}): python -m "
        f"diffaug_fast.train_denoiser {' '.join(argv)}")
    start = time.perf_counter()
    try:
        train_denoiser_main(argv, single_process=True)
        if final.exists():  # an older, incomplete attempt
            shutil.rmtree(final)
        tmp.rename(final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    say(f"demo denoiser trained in {time.perf_counter() - start:.0f} s: {ckpt}")
    return ckpt


def demo_unet(data_root: str | os.PathLike, say=print) -> Path:
    """The demo's denoiser for the data at ``data_root``: the shipped one, else trained once and cached."""
    return demo_denoiser(data_root, say=say)


def demo_psnr_report(ckpt: str | os.PathLike, data_root: str | os.PathLike, n: int = 64, say=print) -> list[dict]:
    """The demo's printed denoiser table: one-step PSNR by t on ``n`` val images of the demo data."""
    den = load_denoiser(ckpt)
    index = scan_dataset(Path(data_root) / "val", progress=False)
    size = den.config.image_size
    sub = index.subset(list(range(0, len(index), max(1, len(index) // n)))[:n])  # spread over the classes
    loader = build_loader(sub, "val", batch_size=len(sub), backend="torch", output="float", mean=UNIT_MEAN,
                          std=UNIT_STD, channels_last=False, num_workers=0, crop_size=size, resize_size=size)
    images = next(iter(loader))["image"]
    rows = psnr_table(den, images, ts=(50, 100, 250, 500, 750), seed=0)
    say(format_psnr_table(rows, f"denoiser {ckpt} on {len(images)} val images: one-step PSNR (dB)"))
    return rows
