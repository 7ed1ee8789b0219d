"""Triton kernels for the fused DiffAug ops (GPU; runs on CPU tensors under TRITON_INTERPRET=1).

One program handles BLOCK pixels (b, h, w) and loops over the C channels, so loads and stores are
coalesced for NCHW and channels_last alike. The math is csrc/augment_math.h's, operation by operation:
IEEE division (div_rn) and no FMA contraction (enable_fp_fusion=False) keep fp32 results equal to the
reference; the noise is the same Philox4x32-10 stream (element offset + NCHW index = lane i % 4 of block
i // 4, key seed) with the same Box-Muller mapping as diffaug_fast/ops/philox.py. Philox is written out here rather than taken from
tl.randint4x: that one is decorated when torch imports triton, so under TRITON_INTERPRET=1 set later (as
the tests do) the interpreter refuses to call it.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["pre", "post", "interpreted"]

BLOCK = 1024  # pixels per program; 3 channels -> 3K elements, enough in flight for a memory-bound kernel
INV_2POW24 = 5.9604644775390625e-8


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _philox_normal(idx, seed):
    """N(0, 1) of element idx: lane idx % 4 of the Box-Muller normals of Philox4x32-10 block idx // 4
    (counter (lo, hi, 0, 0), key (lo(seed), hi(seed)))."""
    blk = idx >> 2
    lane = idx & 3
    c0 = blk.to(tl.uint32)
    c1 = (blk >> 32).to(tl.uint32)
    c2 = c0 * 0
    c3 = c0 * 0
    k0 = seed.to(tl.uint32)
    k1 = (seed >> 32).to(tl.uint32)
    for _ in tl.static_range(10):
        n0 = tl.umulhi(c2, 0xCD9E8D57) ^ c1 ^ k0
        n2 = tl.umulhi(c0, 0xD2511F53) ^ c3 ^ k1
        c1 = c2 * 0xCD9E8D57
        c3 = c0 * 0xD2511F53
        c0 = n0
        c2 = n2
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    first = lane < 2
    u1 = ((tl.where(first, c0, c2) >> 8) + 1).to(tl.float32) * INV_2POW24
    u2 = (tl.where(first, c1, c3) >> 8).to(tl.float32) * INV_2POW24
    angle = 6.2831853071795865 * u2
    return tl.sqrt(-2.0 * tl.log(u1)) * tl.where((lane & 1) == 0, tl.cos(angle), tl.sin(angle))


@triton.jit
def _pixels(t_ptr, table_ptr, n_pix, H, W, COL: tl.constexpr, BLOCK: tl.constexpr):
    """This program's BLOCK pixels (b, h, w), their mask, and their image's coefficients table[t[b], COL:COL + 2]."""
    pix = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = pix < n_pix
    w = pix % W
    h = (pix // W) % H
    b = pix // (W * H)
    step = tl.load(t_ptr + b, mask=mask, other=0)
    k0 = tl.load(table_ptr + step * 4 + COL, mask=mask, other=0.0)
    k1 = tl.load(table_ptr + step * 4 + COL + 1, mask=mask, other=0.0)
    return mask, b, h, w, k0, k1


@triton.jit
def _pre_kernel(x_ptr, noise_ptr, philox_ptr, t_ptr, table_ptr, mean_ptr, std_ptr, xt_ptr, n_pix, H, W,
                sxb, sxc, sxh, sxw, snb, snc, snh, snw, stb, stc, sth, stw,
                C: tl.constexpr, MODE: tl.constexpr, HAS_NOISE: tl.constexpr, BLOCK: tl.constexpr):
    mask, b, h, w, sa, s1ma = _pixels(t_ptr, table_ptr, n_pix, H, W, 0, BLOCK)
    if not HAS_NOISE:
        seed = tl.load(philox_ptr)
        offset = tl.load(philox_ptr + 1)
    for c in tl.static_range(C):
        v = tl.load(x_ptr + b * sxb + c * sxc + h * sxh + w * sxw, mask=mask, other=0).to(tl.float32)
        if MODE == 2:  # uint8 pixels: 2 * (p / 255) - 1
            v = 2.0 * tl.math.div_rn(v, 255.0) - 1.0
        elif MODE == 1:  # classifier-normalized: 2 * (x * std + mean) - 1
            v = 2.0 * (v * tl.load(std_ptr + c) + tl.load(mean_ptr + c)) - 1.0
        if HAS_NOISE:
            z = tl.load(noise_ptr + b * snb + c * snc + h * snh + w * snw, mask=mask, other=0.0)
        else:
            z = _philox_normal(offset + ((b * C + c) * H + h) * W + w, seed)
        y = sa * v + s1ma * z
        tl.store(xt_ptr + b * stb + c * stc + h * sth + w * stw, y.to(xt_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _post_kernel(eps_ptr, xt_ptr, t_ptr, table_ptr, mean_ptr, std_ptr, out_ptr, n_pix, H, W,
                 seb, sec, seh, sew, stb, stc, sth, stw, sob, soc, soh, sow,
                 C: tl.constexpr, NORM: tl.constexpr, CLIP: tl.constexpr, BLOCK: tl.constexpr):
    mask, b, h, w, sr, srm1 = _pixels(t_ptr, table_ptr, n_pix, H, W, 2, BLOCK)
    for c in tl.static_range(C):
        x_t = tl.load(xt_ptr + b * stb + c * stc + h * sth + w * stw, mask=mask, other=0.0).to(tl.float32)
        eps = tl.load(eps_ptr + b * seb + c * sec + h * seh + w * sew, mask=mask, other=0.0).to(tl.float32)
        x0 = sr * x_t - srm1 * eps
        if CLIP:  # where() rather than min/max so NaN propagates like torch.clamp
            x0 = tl.where(x0 < -1.0, -1.0, tl.where(x0 > 1.0, 1.0, x0))
        if NORM:
            x0 = tl.math.div_rn((x0 + 1.0) * 0.5 - tl.load(mean_ptr + c), tl.load(std_ptr + c))
        tl.store(out_ptr + b * sob + c * soc + h * soh + w * sow, x0.to(out_ptr.dtype.element_ty), mask=mask)


def _params(mean, std, device) -> tuple[torch.Tensor, torch.Tensor]:
    if mean is None:
        dummy = torch.zeros(1, dtype=torch.float32, device=device)
        return dummy, dummy
    return (torch.tensor(list(mean), dtype=torch.float32, device=device),
            torch.tensor(list(std), dtype=torch.float32, device=device))


def _launch_opts() -> dict:
    # the interpreter has no compiler options; on GPU, FMA contraction would break fp32 parity
    return {} if interpreted() else {"enable_fp_fusion": False}


def pre(x, t, table, noise, philox, mean, std, x_t) -> None:
    """Writes x_t (see diffaug_fast.ops.fused.pre for the contract)."""
    B, C, H, W = x.shape
    n_pix = B * H * W
    if n_pix == 0:
        return
    mode = 2 if x.dtype == torch.uint8 else (1 if mean is not None else 0)
    m, s = _params(mean, std, x.device)
    dummy = x_t
    nz = noise if noise is not None else dummy
    grid = (triton.cdiv(n_pix, BLOCK),)
    _pre_kernel[grid](x, nz, philox if philox is not None else t, t, table, m, s, x_t, n_pix, H, W,
                      *x.stride(), *nz.stride(), *x_t.stride(),
                      C=C, MODE=mode, HAS_NOISE=noise is not None, BLOCK=BLOCK, **_launch_opts())


def post(model_out, x_t, t, table, mean, std, clip, out) -> None:
    """Writes out (see diffaug_fast.ops.fused.post for the contract)."""
    B, C, H, W = x_t.shape
    n_pix = B * H * W
    if n_pix == 0:
        return
    m, s = _params(mean, std, x_t.device)
    grid = (triton.cdiv(n_pix, BLOCK),)
    _post_kernel[grid](model_out, x_t, t, table, m, s, out, n_pix, H, W,
                       *model_out.stride(), *x_t.stride(), *out.stride(),
                       C=C, NORM=mean is not None, CLIP=clip, BLOCK=BLOCK, **_launch_opts())
