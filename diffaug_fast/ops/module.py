"""``DiffAug``: the augment op as an nn.Module for training loops (fresh Philox noise every call)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..diffusion.denoiser import Denoiser
from .augment import augment
from .fused import Workspace

__all__ = ["DiffAug"]


class DiffAug(nn.Module):
    """x -> x0_hat, the DiffAug view of a batch, with t uniform in ``t_range`` per image.

    denoiser: a frozen ``Denoiser`` (kept as a submodule, so ``.to(device)`` moves it).
    mean, std: the classifier's normalization: input and output are then (x01 - mean) / std.
    seed: base Philox seed (default: drawn once from torch's global RNG). Each call uses offset = the
    number of noise values drawn so far, so consecutive batches get disjoint Philox streams and a run
    restarted with the same seed reproduces its noise. Timesteps come from torch's global RNG (or
    ``generator``). ``forward(x, t=None, out=None)`` takes what ``augment`` takes: float NCHW or uint8
    NHWC, and ``out`` such as ``batch[B:]`` of a preallocated [clean; diffaug] batch.
    """

    def __init__(
        self,
        denoiser: Denoiser,
        *,
        t_range: tuple[int, int] | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        clip: bool = True,
        seed: int | None = None,
        backend: str | None = None,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        self.denoiser = denoiser
        self.t_range = t_range
        self.mean = None if mean is None else tuple(float(v) for v in mean)
        self.std = None if std is None else tuple(float(v) for v in std)
        self.clip = clip
        self.backend = backend
        self.generator = generator
        self.seed = int(torch.randint(0, 2**62, (), generator=generator)) if seed is None else int(seed)
        self.offset = 0  # Philox counter: advanced by the element count of every batch
        self.workspace = Workspace()  # x_t is written into the same buffer every call

    def forward(self, x: torch.Tensor, t: int | torch.Tensor | None = None, out: torch.Tensor | None = None):
        y = augment(x, self.denoiser, t=t, t_range=self.t_range, clip=self.clip, mean=self.mean, std=self.std,
                    seed=self.seed, offset=self.offset, out=out, backend=self.backend, generator=self.generator,
                    workspace=self.workspace)
        self.offset += y.numel()
        return y

    def extra_repr(self) -> str:
        return f"t_range={self.t_range}, mean={self.mean}, std={self.std}, clip={self.clip}, backend={self.backend}"
