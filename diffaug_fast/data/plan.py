"""What each epoch reads and how each view is cut: pure Python, shared by the DALI and the torch backends.

Both backends take the sample order, the shard split and every crop box from here, so they produce the
same samples in the same order with the same geometry; only decoding and resampling differ (by at most
one 8-bit level, measured in tests/test_data.py).

Views (source-pixel boxes, resampled to 224x224 with an antialiased bilinear filter):
- clean (train): RandomResizedCrop(224, scale=(0.08, 1), ratio=(3/4, 4/3)) + horizontal flip with p=0.5,
  torchvision's algorithm, drawn from a generator seeded by (seed, epoch, dataset index): independent of
  the shard count, the worker count and the backend.
- diffaug (train) and val: Resize(256) + CenterCrop(224) with torchvision's integer rounding, expressed as
  one box in source pixels. Resampling that box straight to 224x224 gives the same pixels as resizing the
  whole image then cropping (same scale, same sample centres; measured max difference 1 level against
  torchvision) while never materialising the resized image (a 20:1 image at 256 would be 5120 px long).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["epoch_order", "shard_batches", "center_box", "random_resized_box", "train_boxes"]

CROP = 224
RESIZE = 256


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """Dataset indices in the order of this epoch: a permutation of range(n) reproducible from (seed, epoch)."""
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    return np.random.default_rng([seed, epoch]).permutation(n).astype(np.int64)


def shard_batches(
    order: np.ndarray, batch_size: int, shard_id: int, num_shards: int, drop_last: bool
) -> list[np.ndarray]:
    """This shard's batches of one epoch.

    drop_last=False: shard s takes order[s::num_shards] (sizes differ by at most one), the last batch may be
    short; across shards every sample appears exactly once. drop_last=True: every shard gets the same number
    of full batches (what synchronous data-parallel training needs); at most num_shards*batch_size-1 samples
    of the epoch are dropped, different ones every epoch.
    """
    if not 0 <= shard_id < num_shards:
        raise ValueError(f"shard_id must be in [0, {num_shards}), got {shard_id}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if drop_last:
        per_shard = len(order) // num_shards
        mine = order[: per_shard * num_shards][shard_id::num_shards]
        nb = len(mine) // batch_size
    else:
        mine = order[shard_id::num_shards]
        nb = math.ceil(len(mine) / batch_size)
    return [mine[i * batch_size : (i + 1) * batch_size] for i in range(nb)]


def center_box(h: int, w: int, size: int = RESIZE, crop: int = CROP) -> tuple[float, float, float, float]:
    """(y0, x0, y1, x1) in source pixels of Resize(size) + CenterCrop(crop), torchvision rounding."""
    if h <= w:
        nh, nw = size, int(size * w / h)
    else:
        nh, nw = int(size * h / w), size
    top, left = int(round((nh - crop) / 2.0)), int(round((nw - crop) / 2.0))
    sy, sx = h / nh, w / nw
    return top * sy, left * sx, (top + crop) * sy, (left + crop) * sx


def random_resized_box(
    rng: np.random.Generator, h: int, w: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)
) -> tuple[int, int, int, int]:
    """(top, left, height, width): torchvision's RandomResizedCrop.get_params, drawn from ``rng``."""
    area = h * w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(rng.integers(0, h - ch + 1))
            left = int(rng.integers(0, w - cw + 1))
            return top, left, ch, cw
    # fallback: whole image clipped to the ratio range, centred
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
        ch, cw = h, int(round(h * ratio[1]))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def train_boxes(seed: int, epoch: int, index: int, h: int, w: int) -> tuple[tuple[int, int, int, int], bool]:
    """Clean-view crop (top, left, height, width) and flip flag of one sample in one epoch."""
    rng = np.random.default_rng([seed, epoch, index, 1])
    box = random_resized_box(rng, h, w)
    return box, bool(rng.random() < 0.5)
