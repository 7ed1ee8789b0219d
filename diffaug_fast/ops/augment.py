"""The public DiffAug op: validate, draw t and noise, noise-inject, one UNet call, x0 step."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np
import torch

from ..diffusion.denoiser import Denoiser
from . import fused

__all__ = ["augment", "resolve_timesteps", "check_images", "as_nchw"]

# Inputs may come from float16 loaders or resampling that overshoots slightly; more than this is a
# different convention ([0, 1], [0, 255], mean/std-normalized), which we name in the error.
_RANGE_TOL = 1e-2


def as_nchw(x: torch.Tensor, channels: int) -> torch.Tensor:
    """The [B, C, H, W] view of x: uint8 pixels come NHWC [B, H, W, C] (DALI's output) and are permuted."""
    if x.dtype == torch.uint8 and x.dim() == 4 and x.shape[-1] == channels:
        return x.permute(0, 3, 1, 2)
    return x


def check_images(
    x: torch.Tensor,
    denoiser: Denoiser,
    name: str = "x",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> None:
    """Raise a clear error unless x is a batch the denoiser can take: float NCHW [B, C, H, W] in [-1, 1]
    (or normalized with mean/std, i.e. (x01 - mean) / std with x01 in [0, 1]), or uint8 NHWC [B, H, W, C]."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    cin = denoiser.config.in_channels
    pixels = x.dtype == torch.uint8 and x.dim() == 4 and x.shape[-1] == cin
    x = as_nchw(x, cin)
    if x.dim() != 4:
        raise ValueError(f"{name} must be 4-D NCHW [B, {cin}, H, W]; got shape {tuple(x.shape)}")
    if x.shape[1] != cin:
        hint = " (it looks channels-last NHWC: use x.permute(0, 3, 1, 2))" if x.shape[-1] == cin else ""
        raise ValueError(f"{name} must have {cin} channels in dim 1 (NCHW); got shape {tuple(x.shape)}{hint}")
    if not (x.is_floating_point() or pixels):
        kind = "complex" if x.is_complex() else "boolean" if x.dtype == torch.bool else "integer"
        fix = (f"for uint8 pixels: x.float() / 127.5 - 1, or pass them NHWC [B, H, W, {cin}]" if kind == "integer"
               else "pass a real tensor, e.g. x.real" if kind == "complex" else "x.float() * 2 - 1")
        raise TypeError(f"{name} has {kind} dtype {x.dtype}; DiffAug takes real float images in [-1, 1] ({fix})")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch")
    down = denoiser.total_downsampling
    h, w = x.shape[-2:]
    if h % down or w % down:
        raise ValueError(
            f"{name} is {h}x{w}, but the UNet downsamples {down}x in total, so H and W must be multiples of "
            f"{down} (e.g. crop to {max(down, h // down * down)}x{max(down, w // down * down)})"
        )
    if pixels or torch.compiler.is_compiling():  # uint8 is in range by type; value checks would sync
        return
    if mean is not None:  # back to [0, 1], then to [-1, 1], per channel
        m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
        s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
        x = 2 * (x.detach().float() * s + m) - 1
    lo, hi = (v.item() for v in torch.aminmax(x.detach()))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")
    if lo < -1 - _RANGE_TOL or hi > 1 + _RANGE_TOL:
        guess = (" it looks like [0, 255] pixels: use x / 127.5 - 1" if hi > 2 and lo >= 0
                 else " it looks mean/std-normalized: undo the normalization, then map [0, 1] to [-1, 1]")
        if mean is not None:
            raise ValueError(f"{name} normalized with mean={list(mean)}, std={list(std)} maps to [{lo:.3g}, {hi:.3g}] "
                             "in [-1, 1] units: are mean/std the ones the loader used?")
        raise ValueError(f"{name} must lie in [-1, 1]; its values span [{lo:.3g}, {hi:.3g}]:{guess}")


def philox_key(seed, offset, numel: int) -> tuple[int, int]:
    """(seed, offset) as the int64 pair the kernels take. Any integer seed (Python or numpy) is reduced
    modulo 2**64 to the 64-bit Philox key it names, as ops/philox.py does (so 2**64 + 5 is seed 5 and -1 is
    2**64 - 1); offset must keep offset + numel below 2**63 (the element counter is int64)."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int, got {seed!r}")
    if isinstance(offset, bool) or not isinstance(offset, numbers.Integral):
        raise TypeError(f"offset must be an int, got {offset!r}")
    if not 0 <= offset < 2**63 - numel:
        raise ValueError(f"offset must lie in [0, 2**63 - x.numel()) = [0, {2**63 - numel}); got {offset}")
    key = int(seed) % 2**64
    return key - 2**64 if key >= 2**63 else key, int(offset)


def resolve_timesteps(
    t: int | torch.Tensor | None,
    batch: int,
    num_steps: int,
    t_range: tuple[int, int] | None,
    device: torch.device,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """int64 [batch] timesteps: uniform integers in [lo, hi) when t is None, else t checked and broadcast."""
    if t is None:
        lo, hi = (0, num_steps) if t_range is None else t_range
        if not (0 <= lo < hi <= num_steps):
            raise ValueError(f"t_range must satisfy 0 <= lo < hi <= {num_steps} (the schedule's steps); got {t_range}")
        return torch.randint(int(lo), int(hi), (batch,), generator=generator, device=device)
    if isinstance(t, torch.Tensor):
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"t must be an integer tensor, got dtype {t.dtype}")
        if t.dim() == 0:
            t = t.expand(batch)
        if t.shape != (batch,):
            raise ValueError(f"t must be an int or an integer tensor of shape [{batch}]; got shape {tuple(t.shape)}")
        t = t.to(device=device, dtype=torch.long)
    elif isinstance(t, numbers.Integral) and not isinstance(t, bool):  # int, numpy.int64, ...
        if not -(2**63) <= int(t) < 2**63:
            raise ValueError(f"t out of range: {t}, the schedule has steps 0..{num_steps - 1}")
        t = torch.full((batch,), int(t), dtype=torch.long, device=device)
    elif isinstance(t, np.ndarray) and np.issubdtype(t.dtype, np.integer):
        return resolve_timesteps(torch.from_numpy(t.astype(np.int64)), batch, num_steps, t_range, device, generator)
    else:
        raise TypeError(f"t must be None, an int or an integer tensor / array; got {type(t).__name__}"
                        + (f" of dtype {t.dtype}" if isinstance(t, np.ndarray) else ""))
    if torch.compiler.is_compiling():  # .item() would break the graph; the kernels index the table with t
        return t
    lo, hi = (v.item() for v in torch.aminmax(t))
    if lo < 0 or hi >= num_steps:
        raise ValueError(f"t out of range: values span [{lo}, {hi}], the schedule has steps 0..{num_steps - 1}")
    return t


def _check_params(mean, std, channels: int) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std (the classifier's normalization), or neither")
    if mean is None:
        return None, None
    mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"mean and std need {channels} values each (one per channel); got {mean}, {std}")
    if any(not math.isfinite(v) or v == 0 for v in std):
        raise ValueError(f"std must be finite and non-zero; got {std}")
    return mean, std


def _check_out(out: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if not isinstance(out, torch.Tensor) or out.shape != like.shape:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"out must be a tensor of shape {tuple(like.shape)} (NCHW); got {shape}")
    if not out.is_floating_point() or out.device != like.device:
        raise TypeError(f"out must be a float tensor on {like.device}; got {out.dtype} on {out.device}")
    return out


def augment(
    x: torch.Tensor,
    denoiser: Denoiser,
    *,
    t: int | torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    t_range: tuple[int, int] | None = None,
    clip: bool = True,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    seed: int | None = None,
    offset: int = 0,
    out: torch.Tensor | None = None,
    backend: str | None = None,
    workspace: fused.Workspace | None = None,
) -> torch.Tensor:
    """DiffAug: the one-step denoised estimate x0_hat of a noised copy of x.

    x: float [B, 3, H, W] in [-1, 1], H and W multiples of ``denoiser.total_downsampling``; or, with
    ``mean``/``std`` (the classifier's per-channel normalization), float (x01 - mean) / std with x01 in
    [0, 1]; or uint8 pixels NHWC [B, H, W, 3] (DALI's output), mapped as 2 * (p / 255) - 1. Any strides.
    t: None (uniform integers in ``t_range``, one per image), an int, or an integer tensor [B].
    t_range: (lo, hi), half-open; default (0, T) with T the schedule's steps, i.e. (0, 1000) for ADM.
    noise: None (drawn from N(0, 1) with ``generator``) or a float tensor shaped like x's [B, 3, H, W] view.
    seed, offset: instead of noise, draw it in-kernel from Philox4x32-10 (element i of the [B, 3, H, W]
    view is lane (offset + i) % 4 of block (offset + i) // 4, see ops/philox.py): same (seed, offset) ->
    same noise on every backend and layout. Give
    the next call offset + x's element count for fresh noise. t is still drawn with ``generator``. Any
    integer seed is taken modulo 2**64 (the 64-bit Philox key), see ``philox_key``.
    out: write the result here ([B, 3, H, W], any float dtype and strides, e.g. ``batch[B:]`` of a
    preallocated [clean; diffaug] batch) and return it.
    backend: "cuda", "triton", "cpp", "reference" or None ($DIFFAUG_BACKEND, else the fastest available).
    workspace: a ``diffaug_fast.Workspace`` that keeps the x_t buffer between calls (``DiffAug`` holds
    one): on CPU a fresh x_t of a 64 x 224^2 batch costs more in page faults than the noise step itself.
    Returns x0_hat [B, 3, H, W], clamped to [-1, 1] when ``clip``, normalized with mean/std when given;
    dtype and layout of x (float32 for uint8 input) unless ``out`` is given. x_t is written in the UNet's
    dtype and the x0 step reads that same x_t, so x0_hat is consistent with what the UNet saw (with a
    bf16/fp16 UNet this differs from an fp32 x0 step by up to sqrt(1/abar) x the x_t rounding). No autograd graph is built through the UNet. The same generator state (or seed) gives
    the same t, noise and output.
    """
    cin = denoiser.config.in_channels
    mean, std = _check_params(mean, std, cin)
    check_images(x, denoiser, mean=mean, std=std)
    xv = as_nchw(x, cin).detach()
    t = resolve_timesteps(t, x.shape[0], denoiser.num_steps, t_range, x.device, generator)
    philox = None
    if seed is not None:
        if noise is not None:
            raise ValueError("give either noise or seed (in-kernel Philox noise), not both")
        philox = torch.tensor(philox_key(seed, offset, xv.numel()), dtype=torch.int64, device=x.device)
    elif noise is None:
        noise = torch.randn(xv.shape, generator=generator, device=x.device, dtype=torch.float32)
    else:
        if not isinstance(noise, torch.Tensor) or noise.shape != xv.shape:
            shape = tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__
            raise ValueError(f"noise must be a tensor shaped like x {tuple(xv.shape)}; got {shape}")
        if not noise.is_floating_point():
            raise TypeError(f"noise must be a float tensor, got {noise.dtype}")
        noise = noise.detach().to(device=x.device, dtype=torch.float32)
        if not torch.compiler.is_compiling() and not bool(torch.isfinite(noise).all()):
            raise ValueError("noise contains non-finite values (NaN or inf): give N(0, 1) noise")
    name = fused.resolve_backend(backend, x.device)
    if out is None:
        out = torch.empty_like(xv, dtype=x.dtype if x.is_floating_point() else torch.float32)
    else:
        out = _check_out(out, xv)
    table = denoiser.schedule.coefficient_table(x.device)
    with torch.no_grad():
        # x_t in the UNet's dtype (the UNet would cast to it anyway); channels_last on GPU for its convs
        if workspace is None:
            x_t = fused.pre(xv, t, table, noise, philox, mean, std, denoiser.dtype, x.is_cuda, name)
        else:
            x_t = workspace.get(xv.shape, denoiser.dtype, x.device, x.is_cuda)
            fused.pre_into(xv, t, table, noise, philox, mean, std, name, x_t)
        fused.post(denoiser(x_t, t), x_t, t, table, mean, std, clip, name, out)
    return out
