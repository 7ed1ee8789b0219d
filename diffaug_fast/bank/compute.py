"""Computing views the way the build does (and verify recomputes them): UNet options, x0 -> uint8,
encoding, the data backend "auto" resolves to."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from ..data.loader import resolve_backend
from ..diffusion.unet import UNet
from ..hardware import fast_half_dtype


def unet_gflops(denoiser, size: int) -> float:
    """Forward GFLOP per image at size x size, counted on the meta device (no compute)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = UNet(denoiser.config)
        x = torch.zeros(1, denoiser.config.in_channels, size, size)
        t = torch.zeros(1, dtype=torch.long)
    with FlopCounterMode(display=False) as fc:
        model(x, t)
    return fc.get_total_flops() / 1e9


def _unet_options(half: bool, conv_algo: str, compile: bool, device: torch.device, fused_norm: bool = True) -> dict:
    """The fast UNet path: half precision where the device computes it natively (fp16 on GPU, bf16 on
    AMX/AVX512-BF16 CPUs), only the eps rows of the last conv, channels_last on GPU, the fused
    GroupNorm+SiLU kernel (CPU float32), optional compile. Banks built before fused_norm existed
    record none and are recomputed without it."""
    dtype = (fast_half_dtype(device) if half else None) or torch.float32
    return dict(dtype=dtype, eps_only=True, channels_last=device.type == "cuda",
                conv_algo=conv_algo if dtype == torch.float32 else "direct", compile=compile, fused_norm=fused_norm)


def _encode(img: np.ndarray, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpeg":
        Image.fromarray(img).save(buf, format="JPEG", quality=quality, subsampling=0 if quality >= 90 else 2)
    else:
        Image.fromarray(img).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _to_uint8(x0: torch.Tensor) -> np.ndarray:
    """[-1, 1] NCHW -> uint8 NHWC, rounding to nearest."""
    return ((x0.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def _backend(name: str) -> str:
    """The data backend "auto" resolves to (as build_loader does): verify recomputes with the same one."""
    return resolve_backend(name)
