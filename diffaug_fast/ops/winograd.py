"""Winograd 3x3 convolution on CPU through NNPACK, as a torch.library custom op.

Why: on this project's 2-core AVX2 CPU there is no bf16/fp16 hardware (oneDNN falls back to a reference
loop at ~16 GFLOP/s, against ~150 GFLOP/s for float32 direct convolution), so the only way to beat the
float32 reference on CPU is to do fewer multiplications. NNPACK's Winograd F(6x6, 3x3) reaches an
*effective* ~280 GFLOP/s on the 256-channel 224x224 and 112x112 layers of ADM-256 that hold ~75% of its
FLOPs (bench/NOTES.md). Small maps (H*W < 56*56) run faster as direct convolutions, so the module keeps
them there.

The op is registered with a fake (meta) implementation so torch.compile traces through it (Inductor calls
it as an extern kernel). NNPACK's single-image path is its fast inference path; batches run image by image.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["winograd_conv3x3", "WinogradConv2d", "winograd_supported"]


@functools.cache
def winograd_supported() -> bool:
    # _nnpack_available() also initialises NNPACK; without that first call every NNPACK conv fails.
    return bool(torch._nnpack_available())


@torch.library.custom_op("diffaug_fast::winograd_conv3x3", mutates_args=())
def winograd_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """3x3, stride 1, padding 1 convolution. x [B, Cin, H, W] float32 CPU; weight [Cout, Cin, 3, 3];
    bias [Cout]. Returns [B, Cout, H, W] float32, contiguous NCHW."""
    if not winograd_supported():
        raise RuntimeError("NNPACK is not available in this PyTorch build")
    x = x.contiguous()
    weight = weight.contiguous()
    outs = [torch._nnpack_spatial_convolution(x[i : i + 1], weight, bias, [1, 1], [1, 1]) for i in range(x.shape[0])]
    return outs[0] if len(outs) == 1 else torch.cat(outs)


@winograd_conv3x3.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return x.new_empty((x.shape[0], weight.shape[0], x.shape[2], x.shape[3]))


class WinogradConv2d(nn.Conv2d):
    """An nn.Conv2d (same parameters, same state_dict) whose 3x3 stride-1 float32 CPU calls on maps of at
    least ``min_hw`` pixels go through ``winograd_conv3x3``; everything else is the ordinary convolution."""

    min_hw: int = 56 * 56

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if (
            input.device.type == "cpu"
            and input.dtype == torch.float32
            and weight.dtype == torch.float32
            and input.dim() == 4
            and input.shape[-1] * input.shape[-2] >= self.min_hw
            and self.padding == (1, 1)
            and self.dilation == (1, 1)
            and self.groups == 1
            and self.padding_mode == "zeros"
        ):
            if bias is None:
                bias = weight.new_zeros(weight.shape[0])
            return winograd_conv3x3(input, weight, bias)
        return F.conv2d(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)
