"""Philox4x32-10 normal noise in plain PyTorch: the specification of the in-kernel generator.

Element i of a [B, C, H, W] draw (i = its logical NCHW index) takes Philox block g = (offset + i) // 4
(counter g, key seed) and lane (offset + i) % 4 of its four Box-Muller normals: lanes 0 and 1 are the
cosine and sine branches of words (0, 1), lanes 2 and 3 of words (2, 3). One block feeds four elements,
so the CPU kernel runs a quarter of the Philox rounds and half the logarithms of a draw per element
(csrc/augment_math.h, the Triton kernel and this file implement the same function; the tests compare them). Integer math runs in int64 with
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


def philox4x32_10(idx: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The four output words (int64 holding uint32) for int64 counters ``idx`` and a 64-bit seed."""
    c0, c1 = idx & _M32, (idx >> 32) & _M32
    c2 = torch.zeros_like(idx)
    c3 = torch.zeros_like(idx)
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(10):
        hi_b, lo_b = _mulhilo(_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
    return c0, c1, c2, c3


def philox_normal(shape: tuple[int, ...], seed: int, offset: int = 0, device: torch.device | str = "cpu") -> torch.Tensor:
    """float32 N(0, 1) noise of ``shape`` from Philox (seed, offset); element i is lane (offset + i) % 4 of
    block (offset + i) // 4."""
    n = math.prod(shape)
    idx = torch.arange(n, dtype=torch.int64, device=device) + int(offset)
    r0, r1, r2, r3 = philox4x32_10(idx >> 2, int(seed) & 0xFFFFFFFFFFFFFFFF)
    lane = idx & 3
    first = lane < 2
    u1 = ((torch.where(first, r0, r2) >> 8) + 1).float() * 2.0**-24
    u2 = (torch.where(first, r1, r3) >> 8).float() * 2.0**-24
    angle = 6.2831853071795865 * u2
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.where(lane % 2 == 0, torch.cos(angle), torch.sin(angle))
    return z.reshape(shape)
