"""Pure-PyTorch DiffAug ops: the specification, the CPU fallback and the benchmark baseline.

Every fast backend is tested against these functions. They follow OpenAI's GaussianDiffusion
arithmetic exactly (float32 coefficients gathered from float64 tables, same operation order), so
``augment`` on float32 input reproduces ``p_sample(...)['pred_xstart']`` to float32 rounding.

Coefficients are per image, float32 [B] (see ``Schedule.gather``, columns 0..3).
"""

from __future__ import annotations

import torch

__all__ = ["q_sample", "eps_from_output", "predict_x0", "diffaug"]


def _per_image(c: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return c.reshape(-1, *([1] * (like.dim() - 1)))


def q_sample(x0: torch.Tensor, noise: torch.Tensor, sqrt_abar: torch.Tensor, sqrt_1m_abar: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * noise.

    x0, noise: [B, C, H, W] float32 (x0 in [-1, 1]); sqrt_abar, sqrt_1m_abar: float32 [B].
    """
    return _per_image(sqrt_abar, x0) * x0 + _per_image(sqrt_1m_abar, x0) * noise


def eps_from_output(out: torch.Tensor, channels: int = 3) -> torch.Tensor:
    """eps from the UNet output: the first ``channels`` of a learned-sigma (2C) output, else all of it."""
    if out.shape[1] == 2 * channels:
        return out[:, :channels]
    if out.shape[1] == channels:
        return out
    raise ValueError(f"UNet output has {out.shape[1]} channels; expected {channels} (eps) or {2 * channels}")


def predict_x0(
    x_t: torch.Tensor, eps: torch.Tensor, sqrt_recip: torch.Tensor, sqrt_recipm1: torch.Tensor, clip: bool = True
) -> torch.Tensor:
    """x0_hat = sqrt(1/abar) * x_t - sqrt(1/abar - 1) * eps, clamped to [-1, 1] when ``clip``."""
    x0 = _per_image(sqrt_recip, x_t) * x_t - _per_image(sqrt_recipm1, x_t) * eps.to(x_t.dtype)
    return x0.clamp(-1, 1) if clip else x0


def diffaug(x0: torch.Tensor, noise: torch.Tensor, coef: torch.Tensor, model_fn, clip: bool = True) -> torch.Tensor:
    """The whole reference chain on float32 tensors: q_sample, one model call, x0 step.

    coef: float32 [B, 4] from ``Schedule.gather``; model_fn(x_t) -> UNet output [B, 3 or 6, H, W].
    """
    x_t = q_sample(x0, noise, coef[:, 0], coef[:, 1])
    eps = eps_from_output(model_fn(x_t), x0.shape[1])
    return predict_x0(x_t, eps, coef[:, 2], coef[:, 3], clip)
