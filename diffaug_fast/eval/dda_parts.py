"""DDA's two building blocks (dda.py beside this file uses them): the respaced reverse chain, as guided_diffusion's
SpacedDiffusion computes it (float64 tables), and the low-pass filter phi (down and up by D with antialiased
cubic resizing and zero borders, as resize_right), as matrices applied on both sides of an image."""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
from torch import nn

__all__ = ["RespacedChain", "respaced_timesteps", "lowpass_matrix", "LowPass"]


# ----------------------------------------------------------------------------------------------------
# the respaced chain (guided_diffusion's SpacedDiffusion, in float64 like it)


@lru_cache(maxsize=32)
def _respaced_timesteps(num_steps: int, count: int) -> tuple[int, ...]:
    # one section of ``count`` steps, fractional stride (T - 1) / (count - 1), rounded: space_timesteps
    stride = (num_steps - 1) / (count - 1)
    pos, taken = 0.0, []
    for _ in range(count):
        taken.append(round(pos))
        pos += stride  # accumulated the same way, so the rounding lands on the same integers
    return tuple(sorted(set(taken)))


def respaced_timesteps(num_steps: int, count: int) -> np.ndarray:
    """int64 [count]: the original timesteps kept by a ``count``-step respacing of a ``num_steps`` schedule
    (guided_diffusion's ``space_timesteps(num_steps, [count])``: evenly strided, 0 and T-1 included)."""
    if not (2 <= count <= num_steps):
        raise ValueError(f"cannot respace {num_steps} steps into {count}")
    kept = _respaced_timesteps(num_steps, count)
    if len(kept) != count:
        raise ValueError(f"respacing {num_steps} steps into {count} repeats a step")
    return np.array(kept, dtype=np.int64)


class RespacedChain:
    """The reverse process over a respaced subset of a schedule's steps, with float64 tables.

    Respaced index k runs the UNet at the original timestep ``timesteps[k]``; its betas are re-derived
    from abar at the kept steps (beta_k = 1 - abar_k / abar_{k-1}), and every posterior table follows
    from them as in guided_diffusion's GaussianDiffusion. Coefficients are cast to float32 when used.
    """

    def __init__(self, schedule, count: int):
        self.schedule = schedule
        self.timesteps = respaced_timesteps(schedule.num_steps, count)
        abar_kept = np.asarray(schedule.alphas_cumprod, dtype=np.float64)[self.timesteps]
        self.betas = 1.0 - abar_kept / np.append(1.0, abar_kept[:-1])
        alphas = 1.0 - self.betas
        abar = np.cumprod(alphas)  # recomputed from the new betas, as the respaced diffusion does
        abar_prev = np.append(1.0, abar[:-1])
        post_var = self.betas * (1.0 - abar_prev) / (1.0 - abar)
        self.alphas_cumprod = abar
        self.tables = {
            "sqrt_abar": np.sqrt(abar),
            "sqrt_1m_abar": np.sqrt(1.0 - abar),
            "sqrt_recip_abar": np.sqrt(1.0 / abar),
            "sqrt_recipm1_abar": np.sqrt(1.0 / abar - 1.0),
            "coef_x0": self.betas * np.sqrt(abar_prev) / (1.0 - abar),
            "coef_xt": (1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar),
            # the posterior variance is 0 at k = 0: its log is clipped to the value at k = 1
            "min_log": np.log(np.append(post_var[1], post_var[1:])),
            "max_log": np.log(self.betas),
            # 3-channel models (no learned sigma): guided_diffusion's default FIXED_LARGE variance
            "fixed_large_log": np.log(np.append(post_var[1], self.betas[1:])),
        }
        self._on: dict[torch.device, dict[str, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.timesteps)

    def coef(self, name: str, k: int, device: torch.device) -> torch.Tensor:
        """0-d float32 tensor: table ``name`` at respaced index k (float64 cast once, like _extract_into_tensor)."""
        if device not in self._on:
            with torch.inference_mode(False):  # cached for later calls: never an inference tensor
                self._on[device] = {n: torch.from_numpy(v).to(device=device, dtype=torch.float32)
                                    for n, v in self.tables.items()}
        return self._on[device][name][k]

    def q_sample(self, x0: torch.Tensor, k: int, noise: torch.Tensor) -> torch.Tensor:
        """x_k = sqrt(abar_k) x0 + sqrt(1 - abar_k) noise; float32 like x0."""
        d = x0.device
        return self.coef("sqrt_abar", k, d) * x0 + self.coef("sqrt_1m_abar", k, d) * noise

    def p_sample(self, denoiser: nn.Module, x: torch.Tensor, k: int, noise: torch.Tensor | None,
                 clip_denoised: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """One reverse step from respaced index k: (x_{k-1} sample, clipped x0 estimate), both [B, C, H, W].

        x: float32 [B, C, H, W]; noise: like x (ignored at k = 0, where the step adds none; may be None
        there). The UNet is called once on the whole batch at the original timestep ``timesteps[k]``.
        Differentiable in x (the guidance backpropagates through it).
        """
        d, c = x.device, x.shape[1]
        t = torch.full((x.shape[0],), int(self.timesteps[k]), dtype=torch.long, device=d)
        out = denoiser(x, t).float()
        eps = out[:, :c]
        x0 = self.coef("sqrt_recip_abar", k, d) * x - self.coef("sqrt_recipm1_abar", k, d) * eps
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
        mean = self.coef("coef_x0", k, d) * x0 + self.coef("coef_xt", k, d) * x
        if k == 0:
            return mean, x0
        if out.shape[1] == 2 * c:  # learned range: the variance channels interpolate the log variance
            frac = (out[:, c:] + 1) / 2
            log_var = frac * self.coef("max_log", k, d) + (1 - frac) * self.coef("min_log", k, d)
        else:
            log_var = self.coef("fixed_large_log", k, d)
        return mean + torch.exp(0.5 * log_var) * noise, x0


# ----------------------------------------------------------------------------------------------------
# the low-pass filter phi: resize_right's cubic resize down by D, then up by D, as one matrix per axis


def _cubic(x: np.ndarray) -> np.ndarray:
    """Keys cubic convolution kernel with a = -0.5, support (-2, 2)."""
    ax = np.abs(x)
    return np.where(ax <= 1, 1.5 * ax**3 - 2.5 * ax**2 + 1,
                    np.where(ax < 2, -0.5 * ax**3 + 2.5 * ax**2 - 4 * ax + 2, 0.0))


def _resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """float64 [n_out, n_in]: 1-D cubic resize with resize_right's conventions.

    Output pixel i sits at input coordinate p_i = i / s + (n_in - 1) / 2 - (n_out - 1) / (2 s), s = n_out / n_in.
    Shrinking stretches the kernel by 1 / s (antialiasing). Weights are normalised over every tap of the
    kernel's window, including taps beyond the border, whose pixels are zeros: zero padding.
    """
    s = n_out / n_in
    stretch = 1.0 / s if s < 1 else 1.0
    p = np.arange(n_out) / s + (n_in - 1) / 2 - (n_out - 1) / (2 * s)
    half = 2.0 * stretch
    lo = np.floor(p - half).astype(np.int64)
    taps = lo[:, None] + np.arange(int(math.ceil(2 * half)) + 2)[None, :]
    w = _cubic((p[:, None] - taps) / stretch)
    w /= w.sum(axis=1, keepdims=True)
    m = np.zeros((n_out, n_in))
    inside = (taps >= 0) & (taps < n_in)
    rows = np.broadcast_to(np.arange(n_out)[:, None], taps.shape)
    np.add.at(m, (rows[inside], taps[inside]), w[inside])
    return m


@lru_cache(maxsize=32)
def _lowpass_matrix(size: int, factor: int) -> np.ndarray:
    if factor == 1:
        return np.eye(size)
    return _resize_matrix(size // factor, size) @ _resize_matrix(size, size // factor)


def lowpass_matrix(size: int, factor: int) -> np.ndarray:
    """float64 [size, size]: phi along one axis (down by ``factor``, then up by it). ValueError unless
    ``factor`` divides ``size``."""
    if factor < 1 or size % factor:
        raise ValueError(f"the low-pass factor D = {factor} must divide the image size {size} "
                         f"(DDA shrinks the image D times and enlarges it back)")
    return _lowpass_matrix(size, factor).copy()


class LowPass:
    """phi(x) = A_H x A_W^T for x [..., H, W]: DDA's low-pass filter, linear and separable.

    The reference resizes twice with resize_right (down by D, up by D); the product of the two 1-D
    resize matrices is the same map, applied as two small matmuls. float32 on x's device.
    """

    def __init__(self, height: int, width: int, factor: int, device: torch.device | str = "cpu"):
        for name, size in (("height", height), ("width", width)):
            if factor < 1 or size % factor:
                raise ValueError(f"the low-pass factor D = {factor} must divide the image {name} {size}; "
                                 f"use an image size that is a multiple of {factor} or another lowpass_factor")
        self.factor = factor
        self.a_h = torch.from_numpy(lowpass_matrix(height, factor)).to(device=device, dtype=torch.float32)
        self.a_w = torch.from_numpy(lowpass_matrix(width, factor)).to(device=device, dtype=torch.float32)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.factor == 1:
            return x
        return self.a_h @ x @ self.a_w.T


