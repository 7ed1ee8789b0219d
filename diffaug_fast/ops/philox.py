"""Philox4x32-10 normal noise in plain PyTorch: the specification of the in-kernel generator.

Element i of a [B, C, H, W] draw (i = its logical NCHW index) gets counter offset + i and key seed, and
one N(0, 1) value by Box-Muller from the first two Philox words (csrc/augment_math.h, the Triton kernel
and this file implement the same function; the tests compare them). Integer math runs in int64 with
32-bit words split into 16-bit halves, so no product overflows.
"""

from __future__ import annotations

import math

import torch

__all__ = ["philox4x32_10", "philox_normal"]

_M32 = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85


def _mulhilo(a: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of the 64-bit product a * x, for a constant a < 2^32 and int64 x < 2^32."""
    lo_part = a * (x & 0xFFFF)  # < 2^48
    hi_part = a * (x >> 16)  # < 2^48
    hi = (hi_part + (lo_part >> 16)) >> 16
    lo = (((hi_part & 0xFFFF) << 16) + lo_part) & _M32
    return hi, lo


def philox4x32_10(idx: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first two output words (int64 holding uint32) for int64 counters ``idx`` and a 64-bit seed."""
    c0, c1 = idx & _M32, (idx >> 32) & _M32
    c2 = torch.zeros_like(idx)
    c3 = torch.zeros_like(idx)
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(10):
        hi_b, lo_b = _mulhilo(_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
    return c0, c1


def philox_normal(shape: tuple[int, ...], seed: int, offset: int = 0, device: torch.device | str = "cpu") -> torch.Tensor:
    """float32 N(0, 1) noise of ``shape`` from Philox (seed, offset); element i uses counter offset + i."""
    n = math.prod(shape)
    idx = torch.arange(n, dtype=torch.int64, device=device) + int(offset)
    r0, r1 = philox4x32_10(idx, int(seed) & 0xFFFFFFFFFFFFFFFF)
    u1 = ((r0 >> 8) + 1).float() * 2.0**-24
    u2 = (r1 >> 8).float() * 2.0**-24
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(6.2831853071795865 * u2)
    return z.reshape(shape)
