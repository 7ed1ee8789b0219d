"""Which half-precision dtype a device computes natively, if any (and the --precision flag of the UNet-heavy
command lines built on it); glibc's allocator for big CPU tensors."""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import functools
import sys

import torch

__all__ = ["PRECISIONS", "add_precision_argument", "cpu_flags", "fast_half_dtype", "keep_freed_memory",
           "precision_name", "resolve_precision"]

# /proc/cpuinfo flags of the x86 instructions that compute bf16 natively (AMX tiles; AVX-512 BF16 dot products)
NATIVE_BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc <malloc.h>


@functools.cache
def keep_freed_memory() -> bool:
    """Make glibc serve large CPU allocations from the heap and keep freed memory for reuse (process-wide).

    By default glibc maps every allocation above its mmap threshold (at most 32 MB) afresh and unmaps
    it on free, so each such tensor pays its page faults again (~1 ms per MB here): a [1, 256, 224, 224]
    float32 activation of ADM-256 is 51 MB. ``mallopt(M_MMAP_MAX, 0)`` and a 2 GB trim threshold keep
    those pages mapped: an adm256 forward at 224 went from 12.1 to 10.0 s (bench/NOTES.md). The cost is
    that the process keeps its peak heap instead of returning it. The environment variables
    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<bytes> do the same from process start. Returns whether
    the settings took (False off glibc).
    """
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from the first ``flags`` line of /proc/cpuinfo (empty off Linux/x86)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip() == "flags":
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def fast_half_dtype(device: torch.device | str, flags: frozenset[str] | None = None) -> torch.dtype | None:
    """float16 on a GPU; bfloat16 on a CPU with native bf16 (AMX or AVX512-BF16: ``flags``, default
    ``cpu_flags()``); else None (use float32). This is ``--precision auto``.

    Without native bf16 oneDNN emulates it: on this project's 2-core AVX2 machine a ResNet-50 training step
    at 48 px, batch 32, took 19.9 s under bf16 autocast against 0.8 s in float32 (channels_last). oneDNN's own
    ``_is_mkldnn_bf16_supported`` is also true on plain AVX-512 CPUs (emulation there too), hence the flags.
    On a GPU float16 is guided-diffusion's own ``use_fp16`` mode for these UNets and runs on every CUDA GPU.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu" and NATIVE_BF16_FLAGS & (cpu_flags() if flags is None else flags):
        return torch.bfloat16
    return None


def precision_name(dtype: torch.dtype | None) -> str:
    """fp32 / bf16 / fp16 for a low-precision dtype or None (float32)."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


def add_precision_argument(p: argparse.ArgumentParser, default: str = "fp32") -> None:
    """The --precision flag (and --amp, its older spelling of ``auto``) of the UNet-heavy command lines."""
    p.add_argument("--precision", choices=(*PRECISIONS, "auto"), default=default,
                   help="UNet (block convolutions) and classifier precision: auto = what the device computes "
                        "natively (fp16 on a GPU, bf16 on a CPU with AMX or AVX512-BF16, else fp32); bf16 on a CPU "
                        f"without them runs emulated, many times slower (default: {default})")
    p.add_argument("--amp", dest="precision", action="store_const", const="auto", help="same as --precision auto")


def resolve_precision(name: str, device: torch.device | str, flags: frozenset[str] | None = None) -> torch.dtype | None:
    """--precision NAME on ``device`` -> the low-precision dtype to run in, or None for float32.

    fp16 on a CPU and bf16 on a GPU without it are refused (one line); bf16 on a CPU without native bf16 is
    run, with a warning on stderr that it is emulated (~25x slower than float32 on this project's AVX2 machine).
    """
    device = torch.device(device)
    if name == "auto":
        return fast_half_dtype(device, flags)
    if name not in PRECISIONS:
        raise SystemExit(f"--precision {name}: choose from {', '.join(PRECISIONS)} or auto")
    dtype = PRECISIONS[name]
    if dtype == torch.float32:
        return None
    if device.type == "cpu" and dtype == torch.float16:
        raise SystemExit("--precision fp16: CPUs have no fast float16 convolutions; use --precision bf16 (native on "
                         "AMX / AVX512-BF16 CPUs), fp32, or auto")
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise SystemExit(f"--precision bf16: {torch.cuda.get_device_name(device)} has no bfloat16; use fp16 or auto")
    if device.type == "cpu" and fast_half_dtype(device, flags) != dtype:
        print("warning: --precision bf16 on a CPU without AMX or AVX512-BF16: bfloat16 is emulated there, many times "
              "slower than fp32 (--precision auto picks fp32 here)", file=sys.stderr)
    return dtype
