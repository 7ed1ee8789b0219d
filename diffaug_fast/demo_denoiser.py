"""The shipped demo denoiser (diffaug_fast/assets/demo_denoiser.safetensors + .json): rebuild it and compare.

    make demo-denoiser                                   # = the first line (OMP_NUM_THREADS=2), ~30 min on 2 cores
    OMP_NUM_THREADS=2 python -m diffaug_fast.demo_denoiser           # retrain with the recorded command, compare
    OMP_NUM_THREADS=2 python -m diffaug_fast.demo_denoiser --install # ... and write the result into the package
    python -m diffaug_fast.demo_denoiser --from RUN/model.pt --install  # install a finished run of that command

The training is ``python -m diffaug_fast.train_denoiser`` with ``train.demo.demo_denoiser_argv`` (seed 0, 1500
steps) on the demo's synthetic training images (made first if missing). It is kill-safe: rerunning continues the
interrupted run from its last checkpoint. The comparison is bit for bit, tensor by tensor: expect identity on the
CPU class and thread count the shipped file names in its .json (float sums are ordered by both), and small
differences elsewhere. Exit 0: identical (or installed); 1: different (the largest difference is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from .constants import cache_dir
from .data.synthetic import make_synthetic_dataset
from .diffusion.denoiser import read_sidecar, sidecar_path
from .hardware import cpu_flags
from .io import atomic_write_bytes
from .train.demo import DEMO_DENOISER_STEPS, DEMO_DENOISER_THREADS, SHIPPED, demo_denoiser_argv, train_content_sha256
from .train.denoiser import main as train_denoiser_main

REBUILD = "make demo-denoiser"


def compare(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[bool, str]:
    """(identical, one line): tensor names, shapes and every bit; else the largest absolute difference."""
    if a.keys() != b.keys():
        return False, f"different tensors: {sorted(set(a) ^ set(b))[:5]}"
    worst, where = 0.0, None
    for k in a:
        if a[k].shape != b[k].shape:
            return False, f"{k}: shape {tuple(a[k].shape)} vs {tuple(b[k].shape)}"
        if not torch.equal(a[k], b[k]):
            d = float((a[k].double() - b[k].double()).abs().max())
            if d >= worst:
                worst, where = d, k
    if where is None:
        return True, f"all {len(a)} tensors bit-identical"
    return False, f"largest absolute difference {worst:.3g} in {where}"


def install(model: Path, data_root: Path) -> Path:
    """Copy a finished run's weights and sidecar into the package, with what the rebuild needs to match."""
    side = read_sidecar(model)
    if side is None:
        raise SystemExit(f"--from {model}: no train_denoiser sidecar ({sidecar_path(model).name}) beside it")
    meta = side[2]
    want = demo_denoiser_argv(data_root, DEMO_DENOISER_STEPS, model)
    if [c for c in meta.get("command", [])[3:] if c != "--resume"] != want:  # a resumed run is the same run
        raise SystemExit(f"--from {model}: not trained with the demo's command (python -m diffaug_fast.train_denoiser "
                         f"{' '.join(want)})")
    meta |= {"demo_data": data_root.name, "train_sha256": train_content_sha256(data_root), "rebuild": REBUILD,
             "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "torch": torch.__version__,
             "machine": {"cpu": platform.processor() or platform.machine(),
                         "flags": sorted(f for f in cpu_flags() if f.startswith(("avx", "amx")))}}
    SHIPPED.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model.with_suffix(".safetensors"), SHIPPED)
    atomic_write_bytes((json.dumps(meta, indent=1) + "\n").encode(), sidecar_path(SHIPPED))
    return SHIPPED


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m diffaug_fast.demo_denoiser", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=None, help="where the rebuild trains (default: the cache, demo-denoiser-build)")
    p.add_argument("--from", dest="source", default=None, help="a finished run's model.pt: compare or install it "
                                                                "instead of training")
    p.add_argument("--install", action="store_true", help="write the result into diffaug_fast/assets/")
    a = p.parse_args(argv)
    data = make_synthetic_dataset()
    if a.source:
        model = Path(a.source)
        if not model.with_suffix(".safetensors").is_file():
            raise SystemExit(f"--from {model}: no {model.with_suffix('.safetensors').name} beside it")
    else:
        if os.environ.get("OMP_NUM_THREADS") != str(DEMO_DENOISER_THREADS):
            print(f"note: the shipped file was trained with OMP_NUM_THREADS={DEMO_DENOISER_THREADS}; with another "
                  "thread count expect small differences, not identity")
        work = Path(a.work) if a.work else cache_dir() / "demo-denoiser-build"
        model = work / "model.pt"
        resume = (work / "model.run" / "last.pt").is_file() or (work / "model.run" / "prev.pt").is_file()
        if sidecar_path(model).is_file():
            print(f"{model} is already trained (delete {work} to train again)")
        else:
            run = demo_denoiser_argv(data, DEMO_DENOISER_STEPS, model)
            print(f"python -m diffaug_fast.train_denoiser {' '.join(run)}{' --resume' if resume else ''}")
            train_denoiser_main(run + (["--resume"] if resume else []), single_process=True)
    if a.install:
        print(f"installed {install(model, data)} (+ {sidecar_path(SHIPPED).name})")
        return 0
    if not SHIPPED.is_file():
        print(f"no shipped denoiser at {SHIPPED} to compare with (--install writes it)")
        return 1
    same, line = compare(load_file(str(model.with_suffix(".safetensors"))), load_file(str(SHIPPED)))
    print(f"{model.with_suffix('.safetensors')} vs {SHIPPED}: {line}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
