"""``diffaug_fast::group_norm_silu``: silu(GroupNorm(x) * (1 + scale) + shift) as one op.

The UNet's residual blocks run GroupNorm(32), the timestep scale/shift and SiLU back to back; in eager
PyTorch that is the statistics read plus four elementwise passes over the activation. On CPU the
extension's kernel (csrc/group_norm_cpu.cpp) folds the per-(image, channel) affine into one multiply-add
and applies it with SiLU in a single pass (float32, NCHW or channels_last). Elsewhere (GPU, other dtypes,
no extension) the op runs the unfused PyTorch chain, which is also its specification in the tests; on
GPU, torch.compile's fusion is the fuser. A fake implementation lets torch.compile trace the op.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from . import _ext

__all__ = ["group_norm_silu", "group_norm_silu_eager_or_op", "group_norm_silu_reference", "fused_kernel_available"]

Tensor = torch.Tensor


@functools.cache
def fused_kernel_available() -> bool:  # cached: asked on every call, ~60 times per UNet forward
    return _ext.has_op("group_norm_silu", "CPU")


def group_norm_silu_reference(x: Tensor, weight: Tensor, bias: Tensor, scale: Tensor | None, shift: Tensor | None,
                              groups: int, eps: float) -> Tensor:
    """The unfused chain in float32 (GroupNorm32's convention), cast back to x's dtype."""
    h = F.group_norm(x.float(), groups, weight.float(), bias.float(), eps)
    if scale is not None:
        h = h * (1 + scale.float()[:, :, None, None]) + shift.float()[:, :, None, None]
    return F.silu(h).to(x.dtype)


def group_norm_silu_eager_or_op(x: Tensor, weight: Tensor, bias: Tensor, scale: Tensor | None,
                                shift: Tensor | None, groups: int, eps: float) -> Tensor:
    """``group_norm_silu``, calling the extension kernel directly when not tracing: the custom op's Python
    dispatch costs ~0.25 ms per call, 15 ms per adm-small forward (61 calls)."""
    if not torch.compiler.is_compiling() and _kernel_applies(x, scale):
        return torch.ops.diffaug_fast_ext.group_norm_silu(
            x, weight, bias, None if scale is None else scale.contiguous(),
            None if shift is None else shift.contiguous(), groups, eps)
    return group_norm_silu(x, weight, bias, scale, shift, groups, eps)


def _kernel_applies(x: Tensor, scale: Tensor | None) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4
            and (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last))
            and (scale is None or scale.dtype == torch.float32) and fused_kernel_available())


_kernel_applies = torch.compiler.disable(_kernel_applies)  # never traced: the custom op decides inside


@torch.library.custom_op("diffaug_fast::group_norm_silu", mutates_args=())
def group_norm_silu(x: Tensor, weight: Tensor, bias: Tensor, scale: Tensor | None, shift: Tensor | None,
                    groups: int, eps: float) -> Tensor:
    """x [B, C, H, W]; weight, bias [C] (GroupNorm's affine); scale, shift [B, C] or both None.
    Returns a tensor like x (same dtype and memory format)."""
    if (scale is None) != (shift is None):
        raise ValueError("give both scale and shift, or neither")
    if _kernel_applies(x, scale):
        return torch.ops.diffaug_fast_ext.group_norm_silu(
            x, weight.float(), bias.float(), None if scale is None else scale.contiguous(),
            None if shift is None else shift.float().contiguous(), groups, eps)
    fmt = torch.channels_last if (x.dim() == 4 and not x.is_contiguous()
                                  and x.is_contiguous(memory_format=torch.channels_last)) else torch.contiguous_format
    return group_norm_silu_reference(x, weight, bias, scale, shift, groups, eps).contiguous(memory_format=fmt)


@group_norm_silu.register_fake
def _(x, weight, bias, scale, shift, groups, eps):
    fmt = torch.channels_last if (x.dim() == 4 and not x.is_contiguous()
                                  and x.is_contiguous(memory_format=torch.channels_last)) else torch.contiguous_format
    return torch.empty_like(x, memory_format=fmt)
