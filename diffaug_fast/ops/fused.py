"""The fused DiffAug ops ``diffaug_fast::pre`` / ``diffaug_fast::post`` and the backend registry.

Two torch.library custom ops wrap the two memory-bound steps around the UNet call, each one pass over
memory on every backend (one read of each input, one write of the result):

- ``pre``: loader batch -> x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) z, written in the UNet's dtype and
  memory format. x0 comes from uint8 pixels (2 * (p / 255) - 1), from classifier-normalized floats
  (2 * (x * std + mean) - 1) or from floats already in [-1, 1]. z is an explicit float32 tensor or
  Philox4x32-10 noise drawn in-kernel from an int64 [2] (seed, offset) tensor (see ops/philox.py).
- ``post``: x0_hat = sqrt(1/abar_t) x_t - sqrt(1/abar_t - 1) eps, clamped, mapped to the classifier's
  normalization ((x0 + 1) / 2 - mean) / std when given, written into a caller-given ``out`` (any float
  dtype and strides, e.g. the DiffAug half of a preallocated batch). eps is read in place from the
  UNet's [B, 2C, H, W] learned-sigma output.

Both take the per-image timesteps t (int64 [B]) and the float32 [T, 4] table of
``Schedule.coefficient_table`` and gather the coefficients in-kernel. All math is float32 in the order
of ops/reference.py. Fake implementations make them traceable by torch.compile (fullgraph).

Backends, in one registry (``BACKENDS``): ``cuda`` (csrc/ CUDA kernels), ``triton`` (ops/triton_augment.py;
on CPU only under TRITON_INTERPRET=1), ``cpp`` (csrc/ OpenMP CPU kernel) and ``reference`` (PyTorch).
``resolve_backend`` picks one: the argument, then $DIFFAUG_BACKEND, then auto (cuda, triton, reference on
CUDA tensors; cpp, reference on CPU).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..constants import op_backend_env
from . import _ext, reference
from .philox import philox_normal

__all__ = ["pre", "pre_into", "post", "Workspace", "BACKENDS", "available_backends", "resolve_backend"]

Tensor = torch.Tensor
Params = Sequence[float] | None


# ---------------------------------------------------------------------------------------------------
# reference implementations (the spec of both ops, in float32)


def _channel(v: Sequence[float], like: Tensor) -> Tensor:
    return torch.tensor(list(v), dtype=torch.float32, device=like.device).view(1, -1, 1, 1)


def to_unit(x: Tensor, mean: Params = None, std: Params = None) -> Tensor:
    """float32 [-1, 1] view of a loader batch: uint8 -> 2 * (p / 255) - 1; normalized -> 2 * (x * std + mean) - 1."""
    if x.dtype == torch.uint8:
        return 2 * (x.float() / 255) - 1
    if mean is not None:
        return 2 * (x.float() * _channel(std, x) + _channel(mean, x)) - 1
    return x.float()


def from_unit(x0: Tensor, mean: Params = None, std: Params = None) -> Tensor:
    """[-1, 1] -> classifier normalization ((x0 + 1) / 2 - mean) / std (identity without mean/std)."""
    if mean is None:
        return x0
    return ((x0 + 1) / 2 - _channel(mean, x0)) / _channel(std, x0)


def _pre_reference(x, t, table, noise, philox, mean, std, x_t) -> None:
    coef = table[t]
    if noise is None:
        seed, offset = philox.tolist()
        noise = philox_normal(tuple(x.shape), seed, offset, x.device)
    x_t.copy_(reference.q_sample(to_unit(x, mean, std), noise, coef[:, 0], coef[:, 1]))


def _post_reference(model_out, x_t, t, table, mean, std, clip, out) -> None:
    coef = table[t]
    eps = reference.eps_from_output(model_out, x_t.shape[1]).float()
    out.copy_(from_unit(reference.predict_x0(x_t.float(), eps, coef[:, 2], coef[:, 3], clip), mean, std))


# ---------------------------------------------------------------------------------------------------
# backend registry


def _ext_pre(x, t, table, noise, philox, mean, std, x_t) -> None:
    _ext.loaded()  # registers torch.ops.diffaug_fast_ext (cached after the first call)
    torch.ops.diffaug_fast_ext.pre(x, t, table, noise, philox, mean, std, x_t)


def _ext_post(model_out, x_t, t, table, mean, std, clip, out) -> None:
    _ext.loaded()
    torch.ops.diffaug_fast_ext.post(model_out, x_t, t, table, mean, std, clip, out)


def _triton_pre(*args) -> None:
    from . import triton_augment

    triton_augment.pre(*args)


def _triton_post(*args) -> None:
    from . import triton_augment

    triton_augment.post(*args)


def _triton_missing(device_type: str) -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "triton runs CPU tensors only under TRITON_INTERPRET=1"
    if device_type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device"
    if device_type not in ("cpu", "cuda"):
        return f"triton does not support {device_type} tensors here"
    return None


def _ext_missing(key: str) -> Callable[[str], str | None]:
    def missing(device_type: str) -> str | None:
        if device_type != key.lower():
            return f"it runs on {key.lower()} tensors only"
        if key == "CUDA" and not torch.cuda.is_available():
            return "no CUDA device"
        if not _ext.has_kernel(key):
            return _ext.error() or f"the extension was built without {key} kernels"
        return None

    return missing


@dataclass(frozen=True)
class Backend:
    name: str
    pre: Callable[..., None]
    post: Callable[..., None]
    missing: Callable[[str], str | None]  # device type -> None when usable, else the reason


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("cuda", _ext_pre, _ext_post, _ext_missing("CUDA")),
        Backend("triton", _triton_pre, _triton_post, _triton_missing),
        Backend("cpp", _ext_pre, _ext_post, _ext_missing("CPU")),
        Backend("reference", _pre_reference, _post_reference, lambda device_type: None),
    )
}
_AUTO = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpp", "reference")}


@torch.compiler.assume_constant_result
def _missing(name: str, device_type: str) -> str | None:
    # a constant while tracing: torch.compile(fullgraph=True) cannot trace the extension's dispatcher queries
    return BACKENDS[name].missing(device_type)


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run on tensors of ``device``, in auto order first."""
    dt = torch.device(device).type
    order = list(_AUTO.get(dt, ())) + [n for n in BACKENDS if n not in _AUTO.get(dt, ())]
    return [n for n in order if _missing(n, dt) is None]


def resolve_backend(name: str | None, device: torch.device | str) -> str:
    """The backend to run on ``device``: ``name``, else $DIFFAUG_BACKEND, else the first available in auto
    order. Raises ValueError naming the available backends when the requested one cannot run."""
    dt = torch.device(device).type
    name = name or op_backend_env() or "auto"
    if name == "auto":
        for cand in _AUTO.get(dt, ("reference",)):
            if _missing(cand, dt) is None:
                return cand
        return "reference"
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; known: {list(BACKENDS)} or 'auto'")
    why = _missing(name, dt)
    if why is not None:
        raise ValueError(
            f"backend {name!r} is not available for {dt} tensors ({why}); available: {available_backends(dt)}"
        )
    return name


# ---------------------------------------------------------------------------------------------------
# the custom ops


@torch.library.custom_op("diffaug_fast::pre", mutates_args=())
def pre(
    x: Tensor,
    t: Tensor,
    table: Tensor,
    noise: Tensor | None,
    philox: Tensor | None,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    dtype: torch.dtype,
    channels_last: bool,
    backend: str,
) -> Tensor:
    """x_t [B, C, H, W] in ``dtype`` (channels_last or contiguous) from a loader batch.

    x: [B, C, H, W] view of uint8 pixels (e.g. ``nhwc.permute(0, 3, 1, 2)``), of float normalized with
    mean/std, or of float in [-1, 1]; any strides. t: int64 [B]; table: float32 [T, 4] on x's device.
    noise: float32 [B, C, H, W], or None with philox = int64 [2] (seed, offset) on x's device.
    """
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x_t = torch.empty(x.shape, dtype=dtype, device=x.device, memory_format=fmt)
    BACKENDS[backend].pre(x, t, table, noise, philox, mean, std, x_t)
    return x_t


@pre.register_fake
def _(x, t, table, noise, philox, mean, std, dtype, channels_last, backend):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(x.shape, dtype=dtype, device=x.device, memory_format=fmt)


@torch.library.custom_op("diffaug_fast::pre_into", mutates_args=("x_t",))
def pre_into(
    x: Tensor,
    t: Tensor,
    table: Tensor,
    noise: Tensor | None,
    philox: Tensor | None,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    backend: str,
    x_t: Tensor,
) -> None:
    """``pre`` writing into a caller-kept ``x_t`` (any float dtype and strides) instead of a fresh tensor.

    On CPU a fresh [64, 3, 224, 224] float32 x_t costs ~40 ms of first-touch page faults per call
    (allocations this size are mapped anew each time), twice the kernel itself; a ``Workspace`` that
    keeps x_t between calls avoids it.
    """
    BACKENDS[backend].pre(x, t, table, noise, philox, mean, std, x_t)


@pre_into.register_fake
def _(x, t, table, noise, philox, mean, std, backend, x_t):
    return None


class Workspace:
    """Buffers kept between calls (one per shape, dtype, device and memory format), so a training loop
    writes every batch's x_t into the same memory. Not thread-safe; one per stream of calls."""

    def __init__(self):
        self._buffers: dict[tuple, Tensor] = {}

    def get(self, shape: Sequence[int], dtype: torch.dtype, device: torch.device, channels_last: bool) -> Tensor:
        key = (tuple(shape), dtype, torch.device(device), channels_last)
        buf = self._buffers.get(key)
        if buf is None:
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            buf = self._buffers[key] = torch.empty(key[0], dtype=dtype, device=device, memory_format=fmt)
        return buf

    def clear(self) -> None:
        self._buffers.clear()

    def __len__(self) -> int:
        return len(self._buffers)


@torch.library.custom_op("diffaug_fast::post", mutates_args=("out",))
def post(
    model_out: Tensor,
    x_t: Tensor,
    t: Tensor,
    table: Tensor,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    clip: bool,
    backend: str,
    out: Tensor,
) -> None:
    """Writes x0_hat into ``out`` [B, C, H, W] (any float dtype / strides).

    model_out: UNet output [B, C or 2C, H, W] (eps = first C channels, read in place); x_t: from ``pre``.
    """
    BACKENDS[backend].post(model_out, x_t, t, table, mean, std, clip, out)


@post.register_fake
def _(model_out, x_t, t, table, mean, std, clip, backend, out):
    return None
