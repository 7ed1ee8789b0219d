"""Two-view train loading (clean RandomResizedCrop+flip view + DiffAug Resize256/CenterCrop224 view), img/s.

Contenders, same worker count (DALI CPU threads = DataLoader worker processes), same batch size, uint8 out:
- reference: torchvision ImageFolder + DataLoader, PIL decode once, torchvision transforms for both views;
- torch: our fallback backend (same plan and boxes as DALI, PIL box resampling);
- dali: our DALI backend, CPU decode (device None);
- dali-mixed (only where a GPU exists): the same pipeline with device="cuda": "mixed" decoding (nvJPEG or
  the hardware decoder) and GPU resizes, batches on the GPU (timed until they are there).
Each timed round is one full epoch, start-up included (what a training epoch pays).

    python -m pytest bench/bench_loader.py --benchmark-only -s    # BENCH_LOADER_IMAGES, BENCH_LOADER_WORKERS
"""

from __future__ import annotations

import os
import resource
import time

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image
from torchvision.datasets import ImageFolder

from diffaug_fast.data import available_backends, build_loader, scan_dataset

N_IMAGES = int(os.environ.get("BENCH_LOADER_IMAGES", "512"))
WORKERS = int(os.environ.get("BENCH_LOADER_WORKERS", "2"))
BATCH = 64
ROUNDS = 2
RESULTS: dict[str, float] = {}


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> str:
    """N_IMAGES ImageNet-like JPEGs (~500x375, quality 90, ~110 KB like ImageNet's mean) in 8 classes."""
    root = tmp_path_factory.mktemp("bench_jpegs")
    rng = np.random.default_rng(0)
    sizes = [(500, 375), (375, 500), (500, 333), (500, 400), (450, 350)]
    for i in range(N_IMAGES):
        w, h = sizes[i % len(sizes)]
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        img = np.stack([255 * xx / w, 255 * yy / h, 127 + 100 * np.sin((xx + 2 * yy) / (7 + i % 13))], -1)
        img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
        d = root / f"class{i % 8}"
        d.mkdir(exist_ok=True)
        Image.fromarray(img).save(d / f"{i:05d}.jpg", quality=90)
    return str(root)


class _TwoViews:
    def __init__(self):
        self.clean = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.PILToTensor()])
        self.center = T.Compose([T.Resize(256), T.CenterCrop(224), T.PILToTensor()])

    def __call__(self, img):
        return self.clean(img), self.center(img)


def _epoch(make_iter) -> int:
    n = 0
    for batch in make_iter():
        n += len(batch["label"] if isinstance(batch, dict) else batch[1])
    return n


def _cpu_seconds() -> float:
    """CPU time of this process (DALI threads included) + its exited children (DataLoader workers)."""
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + kids.ru_utime + kids.ru_stime


def _run(benchmark, name: str, make_iter) -> None:
    counts = []

    def one_epoch():
        counts.append(_epoch(make_iter))

    t0, c0 = time.perf_counter(), _cpu_seconds()
    benchmark.pedantic(one_epoch, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    wall, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    ips = sum(counts) / wall
    cpu_ms = 1e3 * cpu / sum(counts)  # robust to other users of the cores, unlike img/s
    RESULTS[name] = ips
    benchmark.extra_info.update(img_per_s=round(ips, 1), cpu_ms_per_img=round(cpu_ms, 2), images=counts[0],
                                workers=WORKERS, batch=BATCH, load_avg=os.getloadavg()[0])
    print(f"\n{name}: {ips:.1f} img/s, {cpu_ms:.2f} CPU-ms/img ({counts[0]} images/epoch, {WORKERS} workers, "
          f"batch {BATCH}, load avg {os.getloadavg()[0]:.1f})")


def test_reference_torchvision(benchmark, tree):
    ds = ImageFolder(tree, transform=_TwoViews())
    dl = torch.utils.data.DataLoader(ds, batch_size=BATCH, shuffle=True, num_workers=WORKERS, drop_last=True)
    _run(benchmark, "torchvision", lambda: iter(dl))


GPU_CASES = ["dali-mixed"] if torch.cuda.is_available() and "dali" in available_backends() else []


@pytest.mark.parametrize("backend", available_backends()[::-1] + GPU_CASES)
def test_ours(benchmark, tree, backend):
    index = scan_dataset(tree, cache=False, progress=False)
    gpu = backend == "dali-mixed"
    loader = build_loader(index, "train", batch_size=BATCH, backend=backend.removesuffix("-mixed"),
                          num_workers=WORKERS, output="uint8", device="cuda" if gpu else None)
    assert loader.backend == backend.removesuffix("-mixed")

    def epochs():
        loader.set_epoch(loader.epoch)
        if not gpu:
            return iter(loader)

        def synced():  # a batch counts once its pixels are on the GPU
            for batch in loader:
                torch.cuda.synchronize()
                yield batch
        return synced()

    _run(benchmark, backend, epochs)
    if "torchvision" in RESULTS:
        ratio = RESULTS[backend] / RESULTS["torchvision"]
        benchmark.extra_info["vs_torchvision"] = round(ratio, 2)
        print(f"{backend} / torchvision = {ratio:.2f}x (goal for dali on the 2-core box: >= 1.5x)")


def test_epoch_start_torch(benchmark, tree):
    """The torch backend's latency to the first batch of an epoch (a DataLoader per epoch: its worker processes
    start each time). Forks of a forkserver that has imported torch and our loader (data.scan.worker_context):
    0.46 s with 2 workers, decoding the batch included, where fresh interpreters importing them took 2.80 s
    (bench/NOTES.md)."""
    index = scan_dataset(tree, cache=False, progress=False)
    loader = build_loader(index, "train", batch_size=BATCH, backend="torch", num_workers=WORKERS, output="uint8")
    next(iter(loader))  # the forkserver itself starts once per process: not what each epoch pays

    def first_batch():
        loader.set_epoch(loader.epoch + 1)
        it = iter(loader)
        next(it)
        del it

    benchmark.pedantic(first_batch, rounds=3, iterations=1, warmup_rounds=0)
    s = benchmark.stats.stats.mean
    benchmark.extra_info.update(first_batch_s=round(s, 3), workers=WORKERS, load_avg=os.getloadavg()[0])
    print(f"\ntorch loader, first batch of an epoch: {s:.3f} s ({WORKERS} workers, batch {BATCH})")
