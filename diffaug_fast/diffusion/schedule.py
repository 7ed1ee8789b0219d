"""Noise schedules and the per-t coefficient tables DiffAug needs.

Everything is computed in float64 (numpy), exactly like OpenAI's guided-diffusion / improved-diffusion
``GaussianDiffusion``, and cast to float32 only when gathered by t. That order matters: at t = 999 an
error in eps is multiplied by sqrt(1/abar - 1) ~ 157 (docs/method.md), so the coefficients themselves
must carry no avoidable rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["Schedule", "linear_betas", "cosine_betas", "make_schedule"]


def linear_betas(num_steps: int) -> np.ndarray:
    """Ho et al. linear schedule, rescaled so any step count spans the same noise range as 1000 steps."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    scale = 1000.0 / num_steps
    return np.linspace(scale * 0.0001, scale * 0.02, num_steps, dtype=np.float64)


def cosine_betas(num_steps: int, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal cosine schedule: abar(s) = cos^2(((s + 0.008) / 1.008) * pi / 2), beta <= 0.999."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")

    def abar(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [
        min(1.0 - abar((i + 1) / num_steps) / abar(i / num_steps), max_beta) for i in range(num_steps)
    ]
    return np.array(betas, dtype=np.float64)


_BETAS = {"linear": linear_betas, "cosine": cosine_betas}


@dataclass(frozen=True)
class Schedule:
    """A discrete diffusion schedule with the float64 tables DiffAug gathers by t.

    ``rescale_timesteps`` is the timestep convention of the checkpoint family: guided-diffusion models
    are called with the integer t; improved-diffusion models (``rescale_timesteps=True`` by default there)
    with the float ``t * 1000 / num_steps``.
    """

    name: str
    num_steps: int
    rescale_timesteps: bool = False
    betas: np.ndarray = field(init=False, repr=False, compare=False)
    alphas_cumprod: np.ndarray = field(init=False, repr=False, compare=False)
    _tables: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.name not in _BETAS:
            raise ValueError(f"unknown noise schedule {self.name!r}; known: {sorted(_BETAS)}")
        betas = _BETAS[self.name](self.num_steps)
        object.__setattr__(self, "betas", betas)
        object.__setattr__(self, "alphas_cumprod", np.cumprod(1.0 - betas, axis=0))
        object.__setattr__(self, "_tables", {})

    # float64 tables, one value per step ------------------------------------------------------------
    @property
    def sqrt_alphas_cumprod(self) -> np.ndarray:
        return np.sqrt(self.alphas_cumprod)

    @property
    def sqrt_one_minus_alphas_cumprod(self) -> np.ndarray:
        return np.sqrt(1.0 - self.alphas_cumprod)

    @property
    def sqrt_recip_alphas_cumprod(self) -> np.ndarray:
        return np.sqrt(1.0 / self.alphas_cumprod)

    @property
    def sqrt_recipm1_alphas_cumprod(self) -> np.ndarray:
        return np.sqrt(1.0 / self.alphas_cumprod - 1.0)

    def coefficient_table(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """float32 [num_steps, 4]: sqrt(abar), sqrt(1 - abar), sqrt(1/abar), sqrt(1/abar - 1).

        Each column is computed in float64 and cast to float32 once, which is bit-identical to the
        OpenAI code's ``th.from_numpy(arr)[t].float()``. Cached per device (one small upload).
        """
        device = torch.device(device)
        if device in self._tables:
            return self._tables[device]
        cols = np.stack(
            [
                self.sqrt_alphas_cumprod,
                self.sqrt_one_minus_alphas_cumprod,
                self.sqrt_recip_alphas_cumprod,
                self.sqrt_recipm1_alphas_cumprod,
            ],
            axis=1,
        )
        table = torch.from_numpy(cols).to(device=device, dtype=torch.float32)
        self._tables[device] = table
        return table

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """float32 [B, 4] coefficients for integer timesteps ``t`` [B] (see ``coefficient_table``)."""
        return self.coefficient_table(t.device)[t.long()]

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The timestep values the UNet is called with: integer t, or float t*1000/T when rescaled."""
        if self.rescale_timesteps:
            return t.float() * (1000.0 / self.num_steps)
        return t

    def snr_timestep(self, sigma: float) -> int:
        """The FIRST t whose noise-to-signal ratio sqrt((1 - abar_t) / abar_t) is >= 2 * sigma.

        Denoised smoothing (Carlini et al. 2023) adds N(0, sigma^2) to [0, 1] images, i.e. noise 2 * sigma
        on [-1, 1] images; scaled by sqrt(abar_t) it is a valid x_t only if the schedule's noise at t is at
        least that. The nearest t could sit below it (linear-1000: t = 144 has ratio 0.4997 < 0.5), so a
        certificate would assume more noise than the model was trained to remove. Linear 1000 steps:
        145 / 259 / 396 for sigma = 0.25 / 0.5 / 1.0. ValueError if sigma <= 0 or above the last t's ratio.
        """
        if not (sigma > 0 and math.isfinite(sigma)):
            raise ValueError(f"sigma must be a positive number, got {sigma}")
        ratio = np.sqrt((1.0 - self.alphas_cumprod) / self.alphas_cumprod)
        hits = np.nonzero(ratio >= 2.0 * sigma)[0]
        if hits.size == 0:
            raise ValueError(f"sigma = {sigma} needs noise ratio {2 * sigma:.4g}, beyond the schedule's largest "
                             f"({ratio[-1]:.4g} at t = {self.num_steps - 1})")
        return int(hits[0])


def make_schedule(name: str = "linear", num_steps: int = 1000, rescale_timesteps: bool = False) -> Schedule:
    return Schedule(name=name, num_steps=num_steps, rescale_timesteps=rescale_timesteps)
