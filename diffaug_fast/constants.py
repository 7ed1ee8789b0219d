"""Shared constants and every environment variable the package reads, in one place.

Environment variables:

    DIFFAUG_CACHE         cache folder (the demo's data and denoiser, the dataset-scan cache); default
                          $XDG_CACHE_HOME/diffaug_fast, else ~/.cache/diffaug_fast. DIFFAUG_CACHE_DIR, its
                          old name, is still read (with a warning) when DIFFAUG_CACHE is unset.
    DIFFAUG_BACKEND       the fused op's backend when the caller names none: cuda | triton | cpp | reference
    DIFFAUG_DATA_BACKEND  the data loader's backend when the caller says "auto": dali | torch

Seeds: every derived seed (a training step's generator, a denoiser sample's t and noise) is a fold of its
parts with :func:`derive_seed`, so a resumed or re-sharded run replays the same draws.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "UNIT_MEAN", "UNIT_STD", "cache_dir", "op_backend_env",
           "data_backend_env", "derive_seed", "rank_seed"]

# torchvision's ImageNet normalization (the classifier's input convention everywhere in this package)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# (x/255 - 0.5)/0.5 maps pixels to [-1, 1], the diffusion models' data range
UNIT_MEAN = (0.5, 0.5, 0.5)
UNIT_STD = (0.5, 0.5, 0.5)

_PRIME = 1_000_003  # the fold's multiplier: distinct parts give distinct seeds for any realistic run size


def cache_dir() -> Path:
    """The package's cache folder (not created here)."""
    if os.environ.get("DIFFAUG_CACHE"):
        return Path(os.environ["DIFFAUG_CACHE"])
    if os.environ.get("DIFFAUG_CACHE_DIR"):
        warnings.warn("DIFFAUG_CACHE_DIR is the old name of DIFFAUG_CACHE; set DIFFAUG_CACHE instead",
                      DeprecationWarning, stacklevel=2)
        return Path(os.environ["DIFFAUG_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "diffaug_fast"


def op_backend_env() -> str | None:
    """$DIFFAUG_BACKEND, or None."""
    return os.environ.get("DIFFAUG_BACKEND") or None


def data_backend_env() -> str:
    """$DIFFAUG_DATA_BACKEND, else "auto"."""
    return os.environ.get("DIFFAUG_DATA_BACKEND", "auto")


def derive_seed(seed: int, *parts: int) -> int:
    """Fold ``parts`` into ``seed``: ((seed * P + p0) * P + p1) * P + ... with P = 1,000,003."""
    for p in parts:
        seed = seed * _PRIME + int(p)
    return seed


def rank_seed(seed: int, rank: int) -> int:
    """A per-process seed from a shared one (4099 > any process count: ranks never collide)."""
    return seed * 4099 + rank
