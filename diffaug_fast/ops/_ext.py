"""Loads the compiled extension ``diffaug_fast._C`` once and tells which of its kernels exist.

The extension is optional (setup.py skips it without a compiler): every function here answers False
instead of raising, and ``error()`` says why it is missing.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["loaded", "has_kernel", "has_op", "error"]

_ERROR: list[str] = []


@functools.cache
def loaded() -> bool:
    """True when ``diffaug_fast._C`` imported and registered ``torch.ops.diffaug_fast_ext``."""
    try:
        from .. import _C  # noqa: F401  (importing it runs the TORCH_LIBRARY registrations)
    except ImportError as e:
        _ERROR.append(f"the C++ extension diffaug_fast._C is not built ({e}); run `pip install -e .`")
        return False
    return True


def has_kernel(key: str) -> bool:
    """Whether the extension has kernels for dispatch key ``key`` ("CPU" or "CUDA")."""
    return loaded() and all(
        torch._C._dispatch_has_kernel_for_dispatch_key(f"diffaug_fast_ext::{op}", key) for op in ("pre", "post")
    )


def has_op(op: str, key: str) -> bool:
    """Whether the extension defines ``diffaug_fast_ext::<op>`` with a kernel for dispatch key ``key``
    (an extension built from older sources may lack newer ops)."""
    if not loaded():
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"diffaug_fast_ext::{op}", key)
    except RuntimeError:  # the op is not defined at all
        return False


def error() -> str | None:
    loaded()
    return _ERROR[0] if _ERROR else None
