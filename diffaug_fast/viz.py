"""Pictures people would rather look at than read: built-in sample images and labelled PNG grids."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

__all__ = ["sample_images", "to_uint8", "save_grid"]


def sample_images(size: int = 224) -> torch.Tensor:
    """Four deterministic, visually distinct RGB images [4, 3, size, size] float32 in [-1, 1].

    Drawn here (no files, no downloads): a landscape, concentric rings, a checkerboard under a colour
    ramp, and a still life of shapes. Fine detail and flat areas both, so DiffAug's effect shows.
    """
    s = size
    imgs = []

    # 1. landscape: sky gradient, sun, two mountain ranges, a lake
    yy = np.linspace(0, 1, s)[:, None, None]
    sky = (1 - yy) * np.array([70, 130, 220]) + yy * np.array([250, 190, 140])
    im = Image.fromarray(np.broadcast_to(sky, (s, s, 3)).astype(np.uint8))
    d = ImageDraw.Draw(im)
    d.ellipse([0.62 * s, 0.12 * s, 0.82 * s, 0.32 * s], fill=(255, 230, 120))
    d.polygon([(0, 0.7 * s), (0.25 * s, 0.35 * s), (0.5 * s, 0.65 * s), (0.7 * s, 0.4 * s), (s, 0.7 * s)],
              fill=(90, 100, 120))
    d.polygon([(0, 0.75 * s), (0.35 * s, 0.55 * s), (0.6 * s, 0.75 * s)], fill=(60, 110, 70))
    d.rectangle([0, 0.75 * s, s, s], fill=(40, 90, 150))
    for i in range(6):
        y = 0.8 * s + i * 0.03 * s
        d.line([(0.1 * s + 7 * i, y), (0.5 * s + 11 * i, y)], fill=(200, 220, 240), width=1)
    imgs.append(np.asarray(im))

    # 2. concentric coloured rings
    y, x = np.mgrid[0:s, 0:s] / s - 0.5
    r = np.sqrt(x**2 + y**2)
    ang = np.arctan2(y, x)
    rings = np.stack([np.sin(40 * r), np.sin(40 * r + 2.1 + ang), np.sin(40 * r + 4.2)], -1)
    imgs.append(((rings * 0.5 + 0.5) * 255).astype(np.uint8))

    # 3. checkerboard under a colour ramp
    cells = max(4, s // 16)
    check = ((np.arange(s)[:, None] // cells + np.arange(s)[None, :] // cells) % 2).astype(np.float64)
    ramp = np.stack([x + 0.5, 1 - (y + 0.5), 0.5 + 0.5 * np.sin(6 * x)], -1)
    imgs.append(((0.25 + 0.75 * check[..., None]) * ramp * 255).clip(0, 255).astype(np.uint8))

    # 4. still life: table, vase, fruit, a striped cloth
    im = Image.new("RGB", (s, s), (235, 225, 205))
    d = ImageDraw.Draw(im)
    d.rectangle([0, 0.65 * s, s, s], fill=(140, 90, 50))
    for i in range(0, s, max(2, s // 28)):
        d.line([(i, 0.65 * s), (i + 0.2 * s, s)], fill=(120, 75, 40), width=1)
    d.ellipse([0.15 * s, 0.3 * s, 0.45 * s, 0.72 * s], fill=(40, 80, 160))
    d.rectangle([0.24 * s, 0.18 * s, 0.36 * s, 0.34 * s], fill=(40, 80, 160))
    d.ellipse([0.55 * s, 0.52 * s, 0.72 * s, 0.69 * s], fill=(210, 40, 40))
    d.ellipse([0.68 * s, 0.5 * s, 0.86 * s, 0.68 * s], fill=(240, 180, 30))
    d.rectangle([0.5 * s, 0.1 * s, 0.9 * s, 0.4 * s], outline=(90, 60, 30), width=max(1, s // 60))
    imgs.append(np.asarray(im))

    arr = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float()
    return arr / 127.5 - 1


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3] (values outside the range are clipped)."""
    return ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def save_grid(
    columns: Sequence[torch.Tensor],
    path: str | Path,
    col_labels: Sequence[str] | None = None,
    row_labels: Sequence[str] | None = None,
    title: str | None = None,
    pad: int = 4,
) -> Path:
    """Write a PNG grid: column j shows columns[j] ([B, 3, H, W] in [-1, 1]), one row per image.

    Writes to a temporary name and renames, so an interrupted run never leaves a broken PNG.
    """
    cols = [to_uint8(c) for c in columns]
    b, h, w, _ = cols[0].shape
    if any(c.shape != cols[0].shape for c in cols):
        raise ValueError("all columns must have the same shape")
    top = 18 if col_labels else 0
    head = 20 if title else 0
    left = 70 if row_labels else 0
    width = left + len(cols) * (w + pad) + pad
    height = head + top + b * (h + pad) + pad
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    d = ImageDraw.Draw(canvas)
    if title:
        d.text((pad, 4), title, fill=(0, 0, 0))
    for j, col in enumerate(cols):
        x0 = left + pad + j * (w + pad)
        if col_labels:
            d.text((x0 + 2, head + 3), str(col_labels[j]), fill=(0, 0, 0))
        for i in range(b):
            canvas.paste(Image.fromarray(col[i]), (x0, head + top + pad + i * (h + pad)))
    if row_labels:
        for i, label in enumerate(row_labels):
            d.text((pad, head + top + pad + i * (h + pad) + h // 2 - 6), str(label)[:11], fill=(0, 0, 0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    canvas.save(tmp, format="PNG")
    tmp.replace(path)
    return path

