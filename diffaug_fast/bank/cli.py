"""The command line: ``python -m diffaug_fast.bank build|verify ...`` (see the package docstring)."""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from ..hardware import PRECISIONS, fast_half_dtype, precision_name
from .build import build_bank
from .common import SHARD_IMAGES, BankError
from .verify import verify_bank


def main(argv: list[str] | None = None):
    """Parse ``argv`` (default sys.argv) and build or verify; --help prints the package docstring."""
    p = argparse.ArgumentParser(prog="python -m diffaug_fast.bank", description=sys.modules[__package__].__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build (or resume building) a bank")
    b.add_argument("--data", required=True, help="class-folder training set (the trainer's DATA/train)")
    b.add_argument("--unet", required=True)
    b.add_argument("--unet-preset", default=None)
    b.add_argument("--views", type=int, default=4)
    b.add_argument("--out", required=True)
    # q98: the views carry diffusion noise, which JPEG keeps poorly; measured on DiffAug views of the sample
    # images (64 px): min PSNR 35.8 dB at q95, 40.1 at q97, 43.1 at q98 (+32% bytes vs q95), 50.5 at q100
    b.add_argument("--quality", type=int, default=98, help="JPEG quality (default 98: >= 40 dB PSNR)")
    b.add_argument("--lossless", action="store_true", help="store PNG instead of JPEG")
    b.add_argument("--t-min", type=int, default=0)
    b.add_argument("--t-max", type=int, default=None)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--image-size", type=int, default=224)
    b.add_argument("--resize-size", type=int, default=256)
    b.add_argument("--batch-size", type=int, default=32)
    b.add_argument("--shard-images", type=int, default=SHARD_IMAGES)
    b.add_argument("--half", action=argparse.BooleanOptionalAction, default=True,
                   help="half-precision UNet where the device computes it natively (fp16 GPU, bf16 AMX CPU)")
    b.add_argument("--precision", choices=(*PRECISIONS, "auto"), default=None,
                   help="the UNet's precision: auto (= --half) or fp32 (= --no-half); bf16/fp16 only where they are "
                        "what auto picks (the manifest records half precision as the device's native dtype)")
    b.add_argument("--conv-algo", choices=("direct", "winograd"), default="direct",
                   help="float32 convolutions on CPU: winograd measured 1.76x faster on adm256 at 224")
    b.add_argument("--compile", action="store_true", help="torch.compile the UNet (one compile per batch size)")
    b.add_argument("--loader", default="auto")
    b.add_argument("--workers", type=int, default=2)
    b.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    b.add_argument("--stop-after-shards", type=int, default=None, help=argparse.SUPPRESS)  # tests the resume path
    v = sub.add_parser("verify", help="checksums, coverage and recomputed samples")
    v.add_argument("bank")
    v.add_argument("--sample", type=int, default=4)
    v.add_argument("--no-recompute", action="store_true")
    v.add_argument("--loader", default="auto")
    v.add_argument("--repair", action="store_true",
                   help="delete damaged shards and the manifest; rerunning the build command then rebuilds them")
    a = p.parse_args(argv)
    if a.cmd == "build":
        _precision(a)
        return build_bank(a)
    try:
        res = verify_bank(a.bank, sample=a.sample, recompute=not a.no_recompute, loader=a.loader, repair=a.repair)
    except BankError as e:
        raise SystemExit(f"verify failed: {e}") from None
    print(json.dumps(res, indent=1))


def _precision(a: argparse.Namespace) -> None:
    """--precision onto --half, which the manifest records (verify recomputes with the native half dtype of its
    own device, compute._unet_options): so bf16 or fp16 are taken only where they are that native dtype."""
    name = a.precision or ("auto" if a.half else "fp32")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    native = fast_half_dtype(device)
    if name in ("bf16", "fp16") and PRECISIONS[name] != native:
        raise SystemExit(f"--precision {name}: the bank builds in the {device.type}'s native half precision "
                         f"({precision_name(native)} here) or in fp32; use --precision auto or fp32")
    a.half = name != "fp32" and native is not None
    if os.environ.get("RANK", "0") == "0":
        print(f"bank build: precision {precision_name(native if a.half else None)} (--precision {name})")
