"""A small synthetic JPEG dataset for the embedded demo: a few visually distinct, learnable classes.

Layout (what ``--data`` expects of real data too)::

    root/train/<class>/*.jpg
    root/val/<class>/*.jpg
    root/val-c/<corruption>/<severity>/<class>/*.jpg   (an ImageNet-C style corrupted copy of val)
    root/ood/<shape>/*.jpg                              (a fifth shape never trained on: out-of-distribution)

Created once in a cache folder (``$DIFFAUG_CACHE``, else ``$XDG_CACHE_HOME/diffaug_fast``, else
``~/.cache/diffaug_fast``), built in a temporary folder and renamed, so an interrupted build never
leaves a half dataset behind.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ..constants import cache_dir

__all__ = ["CLASSES", "OOD_CLASSES", "CORRUPTIONS", "cache_dir", "make_synthetic_dataset", "corrupt"]

CLASSES = ("circles", "squares", "stripes", "triangles")
OOD_CLASSES = ("crosses",)  # drawn like the others (same colours, noise, sizes), a shape the classifier never sees
CORRUPTIONS = ("gaussian_noise", "blur", "contrast")
# v2: val grown from 12 to 100 per class (a top-1 difference of a few points is readable on 400 images), ood/ added
# v3: light shapes on a dark ground (see _draw)
_VERSION = "v3"


def _draw(cls: str, size: int, rng: np.random.Generator) -> Image.Image:
    """2-4 overlapping filled shapes of one kind (or stripes across the image), light shapes of random hue on a
    dark background of random hue, plus pixel noise.

    v3: light on dark. In v2 each channel of the background was uniform and the shapes took its inverse, so
    half the images were dark shapes on a light ground: a from-scratch ResNet had to learn edges of both
    polarities and stayed near 50% (stripes learned, circles/squares/triangles confused) for hundreds of steps
    (bench/NOTES.md, demo sizing). Objects lighter than their ground removes that without making any class
    easier than another; the geometry is v2's.
    """
    bg = rng.integers(0, 110, 3)
    im = Image.new("RGB", (size, size), tuple(int(v) for v in bg))
    d = ImageDraw.Draw(im)

    def color() -> tuple[int, int, int]:  # every channel at least 40 levels above the background's
        return tuple(int(v) for v in rng.integers(150, 256, 3))

    for _ in range(int(rng.integers(2, 5))):
        r = rng.uniform(0.12, 0.25) * size
        cx, cy = rng.uniform(r, size - r, 2)
        fill = color()
        if cls == "circles":
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif cls == "squares":
            d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif cls == "triangles":
            d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
        elif cls == "crosses":
            a = r / 3
            d.rectangle([cx - r, cy - a, cx + r, cy + a], fill=fill)
            d.rectangle([cx - a, cy - r, cx + a, cy + r], fill=fill)
        else:  # stripes across the whole image
            w = max(2, int(size / rng.uniform(8, 14)))
            for x in range(int(rng.integers(0, w)), size, 2 * w):
                d.rectangle([x, 0, x + w - 1, size], fill=fill)
            break
    arr = np.asarray(im).astype(np.float32) + rng.normal(0, 8, (size, size, 3))
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def corrupt(im: Image.Image, kind: str, severity: int, rng: np.random.Generator) -> Image.Image:
    """ImageNet-C style corruptions at severity 1..5 (a small subset, same spirit)."""
    if kind == "gaussian_noise":
        sigma = (8, 16, 24, 36, 50)[severity - 1]
        arr = np.asarray(im).astype(np.float32) + rng.normal(0, sigma, (im.height, im.width, 3))
        return Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    if kind == "blur":
        return im.filter(ImageFilter.GaussianBlur((0.5, 1, 1.5, 2, 3)[severity - 1]))
    if kind == "contrast":
        c = (0.6, 0.45, 0.3, 0.2, 0.12)[severity - 1]
        arr = np.asarray(im).astype(np.float32)
        mean = arr.mean(axis=(0, 1), keepdims=True)
        return Image.fromarray(((arr - mean) * c + mean).clip(0, 255).astype(np.uint8))
    raise ValueError(f"unknown corruption {kind!r}; known: {CORRUPTIONS}")


def make_synthetic_dataset(
    root: str | Path | None = None,
    *,
    train_per_class: int = 400,
    val_per_class: int = 100,
    ood_per_class: int = 100,
    size: int = 64,
    severities: tuple[int, ...] = (3,),
    seed: int = 0,
) -> Path:
    """Create the dataset (once) and return its root. An existing complete dataset is reused.

    train/val/val-c come from one random stream seeded by ``seed``, ood/ from its own, so adding it changed no
    other image.
    """
    name = (f"synthetic-{_VERSION}-{size}px-{train_per_class}x{val_per_class}x{ood_per_class}"
            f"-s{''.join(map(str, severities))}-{seed}")
    root = Path(root) if root is not None else cache_dir() / name
    if (root / "COMPLETE").exists():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=root.name + ".", dir=root.parent))
    rng = np.random.default_rng(seed)
    try:
        for split, n in (("train", train_per_class), ("val", val_per_class)):
            for cls in CLASSES:
                folder = tmp / split / cls
                folder.mkdir(parents=True)
                for i in range(n):
                    im = _draw(cls, size, rng)
                    im.save(folder / f"{cls}_{i:04d}.jpg", quality=92)
                    if split == "val":
                        for kind in CORRUPTIONS:
                            for sev in severities:
                                out = tmp / "val-c" / kind / str(sev) / cls
                                out.mkdir(parents=True, exist_ok=True)
                                corrupt(im, kind, sev, rng).save(out / f"{cls}_{i:04d}.jpg", quality=92)
        ood_rng = np.random.default_rng([seed, 1])
        for cls in OOD_CLASSES if ood_per_class else ():
            folder = tmp / "ood" / cls
            folder.mkdir(parents=True)
            for i in range(ood_per_class):
                _draw(cls, size, ood_rng).save(folder / f"{cls}_{i:04d}.jpg", quality=92)
        (tmp / "COMPLETE").write_text("ok\n")
        if root.exists():  # an older incomplete attempt
            shutil.rmtree(root)
        tmp.rename(root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root
