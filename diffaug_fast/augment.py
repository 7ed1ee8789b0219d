"""The public DiffAug op: validate, draw t and noise, noise-inject, one UNet call, x0 step."""

from __future__ import annotations

import math

import torch

from .denoiser import Denoiser
from .ops import reference

__all__ = ["augment", "resolve_timesteps", "check_images"]

# Inputs may come from float16 loaders or resampling that overshoots slightly; more than this is a
# different convention ([0, 1], [0, 255], mean/std-normalized), which we name in the error.
_RANGE_TOL = 1e-2


def check_images(x: torch.Tensor, denoiser: Denoiser, name: str = "x") -> None:
    """Raise a clear error unless x is float NCHW [B, C, H, W] in [-1, 1] the denoiser can take."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    cin = denoiser.config.in_channels
    if x.dim() != 4:
        raise ValueError(f"{name} must be 4-D NCHW [B, {cin}, H, W]; got shape {tuple(x.shape)}")
    if x.shape[1] != cin:
        hint = " (it looks channels-last NHWC: use x.permute(0, 3, 1, 2))" if x.shape[-1] == cin else ""
        raise ValueError(f"{name} must have {cin} channels in dim 1 (NCHW); got shape {tuple(x.shape)}{hint}")
    if not x.is_floating_point():
        raise TypeError(
            f"{name} has integer dtype {x.dtype}; DiffAug takes float images in [-1, 1] "
            "(for uint8 pixels: x.float() / 127.5 - 1)"
        )
    if x.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch")
    down = denoiser.total_downsampling
    h, w = x.shape[-2:]
    if h % down or w % down:
        raise ValueError(
            f"{name} is {h}x{w}, but the UNet downsamples {down}x in total, so H and W must be multiples of "
            f"{down} (e.g. crop to {max(down, h // down * down)}x{max(down, w // down * down)})"
        )
    lo, hi = (v.item() for v in torch.aminmax(x.detach()))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")
    if lo < -1 - _RANGE_TOL or hi > 1 + _RANGE_TOL:
        guess = (" it looks like [0, 255] pixels: use x / 127.5 - 1" if hi > 2 and lo >= 0
                 else " it looks mean/std-normalized: undo the normalization, then map [0, 1] to [-1, 1]")
        raise ValueError(f"{name} must lie in [-1, 1]; its values span [{lo:.3g}, {hi:.3g}]:{guess}")


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
    elif isinstance(t, int) and not isinstance(t, bool):
        t = torch.full((batch,), t, dtype=torch.long, device=device)
    else:
        raise TypeError(f"t must be None, an int or an integer tensor; got {type(t).__name__}")
    lo, hi = (v.item() for v in torch.aminmax(t))
    if lo < 0 or hi >= num_steps:
        raise ValueError(f"t out of range: values span [{lo}, {hi}], the schedule has steps 0..{num_steps - 1}")
    return t


def augment(
    x: torch.Tensor,
    denoiser: Denoiser,
    *,
    t: int | torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    t_range: tuple[int, int] | None = None,
    clip: bool = True,
) -> torch.Tensor:
    """DiffAug: the one-step denoised estimate x0_hat of a noised copy of x.

    x: float [B, 3, H, W] in [-1, 1], H and W multiples of ``denoiser.total_downsampling``.
    t: None (uniform integers in ``t_range``, one per image), an int, or an integer tensor [B].
    t_range: (lo, hi), half-open; default (0, T) with T the schedule's steps, i.e. (0, 1000) for ADM.
    noise: None (drawn from N(0, 1) with ``generator``) or a tensor shaped like x.
    Returns x0_hat with x's shape, dtype and device, clamped to [-1, 1] when ``clip``. No autograd graph
    is built through the UNet. The same generator state gives the same t, noise and output.
    """
    check_images(x, denoiser)
    t = resolve_timesteps(t, x.shape[0], denoiser.num_steps, t_range, x.device, generator)
    if noise is None:
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
    else:
        if not isinstance(noise, torch.Tensor) or noise.shape != x.shape:
            shape = tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__
            raise ValueError(f"noise must be a tensor shaped like x {tuple(x.shape)}; got {shape}")
        if not noise.is_floating_point():
            raise TypeError(f"noise must be a float tensor, got {noise.dtype}")
        noise = noise.to(device=x.device, dtype=torch.float32)
    coef = denoiser.schedule.gather(t)
    with torch.no_grad():
        x0 = reference.diffaug(x.float(), noise, coef, lambda x_t: denoiser(x_t, t), clip)
    return x0.to(x.dtype)
