"""diffaug_fast.hardware: the half dtype choice and glibc's allocator setting for big CPU tensors."""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
import re
from pathlib import Path

import pytest
import torch

from diffaug_fast.hardware import cpu_flags, fast_half_dtype, keep_freed_memory, precision_name, resolve_precision

AVX2_ONLY = frozenset({"sse4_2", "avx", "avx2", "fma"})  # this project's EPYC: bf16 emulated
AVX512 = AVX2_ONLY | {"avx512f", "avx512bw", "avx512_vnni"}  # Skylake/Cascade Lake: oneDNN emulates bf16 too
SAPPHIRE_RAPIDS = AVX512 | {"avx512_bf16", "amx_bf16", "amx_tile", "amx_int8"}
COOPER_LAKE = AVX512 | {"avx512_bf16"}


def _proc_flags() -> set[str] | None:
    """The first processor's flags in /proc/cpuinfo, read here independently of diffaug_fast.hardware."""
    path = Path("/proc/cpuinfo")
    if not path.is_file():
        return None
    lines = re.findall(r"^flags\s*:(.*)$", path.read_text(), flags=re.MULTILINE)
    return set(lines[0].split()) if lines else None


def test_cpu_flags_are_proc_cpuinfos_and_decide_native_bf16():
    flags = _proc_flags()
    if flags is None:
        pytest.skip("no x86 flags line in /proc/cpuinfo")
    assert cpu_flags() == flags
    native = "amx_bf16" in flags or "avx512_bf16" in flags
    assert fast_half_dtype("cpu") is (torch.bfloat16 if native else None)
    assert resolve_precision("auto", "cpu") is (torch.bfloat16 if native else None)


@pytest.mark.parametrize("flags,want", [(AVX2_ONLY, None), (AVX512, None), (COOPER_LAKE, torch.bfloat16),
                                        (SAPPHIRE_RAPIDS, torch.bfloat16), (frozenset(), None)])
def test_auto_precision_maps_cpu_flags(flags, want):
    assert fast_half_dtype("cpu", frozenset(flags)) is want
    assert resolve_precision("auto", "cpu", frozenset(flags)) is want
    assert fast_half_dtype("cuda", frozenset(flags)) is torch.float16  # the GPU ignores the host's flags


def test_explicit_precisions_on_cpu(capsys):
    assert resolve_precision("fp32", "cpu", SAPPHIRE_RAPIDS) is None
    assert resolve_precision("bf16", "cpu", SAPPHIRE_RAPIDS) is torch.bfloat16
    assert capsys.readouterr().err == ""
    assert resolve_precision("bf16", "cpu", AVX2_ONLY) is torch.bfloat16  # allowed, but warned about
    err = capsys.readouterr().err
    assert "emulated" in err and err.count("\n") == 1
    with pytest.raises(SystemExit, match="fp16"):
        resolve_precision("fp16", "cpu", SAPPHIRE_RAPIDS)
    with pytest.raises(SystemExit, match="choose from"):
        resolve_precision("fp8", "cpu")
    assert [precision_name(d) for d in (None, torch.float32, torch.bfloat16, torch.float16)] == [
        "fp32", "fp32", "bf16", "fp16"]


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
