"""Which half-precision dtype a device computes natively, if any."""

from __future__ import annotations

import torch

__all__ = ["fast_half_dtype"]


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
