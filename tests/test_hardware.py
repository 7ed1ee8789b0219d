"""diffaug_fast.hardware: the half dtype choice and glibc's allocator setting for big CPU tensors."""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

import pytest
import torch

from diffaug_fast.hardware import fast_half_dtype, keep_freed_memory


def test_fast_half_dtype_on_cpu_follows_native_bf16():
    want = torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None
    assert fast_half_dtype("cpu") is want


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_keep_freed_memory_serves_big_tensors_from_the_heap():
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if not hasattr(libc, "mallinfo2"):
        pytest.skip("glibc older than 2.33 (no mallinfo2)")
    libc.mallinfo2.restype = _Mallinfo2
    assert keep_freed_memory() is True
    before = libc.mallinfo2().hblkhd  # bytes in mmapped blocks
    big = torch.empty(16 * 2**20)  # 64 MB: above glibc's largest mmap threshold, so mmapped by default
    big.fill_(1.0)
    assert libc.mallinfo2().hblkhd - before < 2**20, "a 64 MB tensor was still mmapped"
    del big
