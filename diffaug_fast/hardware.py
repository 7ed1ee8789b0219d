"""Which half-precision dtype a device computes natively, if any; glibc's allocator for big CPU tensors."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

import torch

__all__ = ["fast_half_dtype", "keep_freed_memory"]

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


def fast_half_dtype(device: torch.device | str) -> torch.dtype | None:
    """float16 on a GPU; bfloat16 on a CPU with native bf16 (AVX512-BF16 / AMX); else None (use float32).

    Without native bf16 oneDNN emulates it: on this project's 2-core AVX2 machine a ResNet-50 training step
    at 48 px, batch 32, took 19.9 s under bf16 autocast against 0.8 s in float32 (channels_last).
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.bfloat16
    return None
