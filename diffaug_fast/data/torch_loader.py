"""torchvision/PIL fallback: a DataLoader over the same plan and boxes as the DALI backend.

Workers decode with PIL (libjpeg-turbo, like DALI's CPU decoder: same pixels, measured 0 levels apart on
RGB, grayscale and CMYK JPEGs) and resample each view box straight to 224x224 with PIL's antialiased
bilinear filter (``Image.resize(box=...)``, what torchvision's Resize uses on PIL images). Batches leave the
workers as uint8 NHWC; normalisation (output="float") runs once per batch in the main process, on the
loader's device.
"""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image

from .base import DECODE_ERRORS, Loader, decode_rgb
from .plan import center_box, train_boxes
from .scan import worker_context

__all__ = ["TorchLoader", "ViewDataset"]


class ViewDataset(torch.utils.data.Dataset):
    """Map-style dataset keyed by (epoch, dataset index) -> dict of uint8 HWC views and the index."""

    def __init__(self, files: list[str], sizes: np.ndarray, split: str, seed: int, crop: int = 224,
                 resize: int = 256, extra_views: dict | None = None, clean_transform=None,
                 interpolation: str = "bilinear"):
        self.files, self.sizes, self.split, self.seed = files, sizes, split, seed
        self.center_filter = Image.BICUBIC if interpolation == "bicubic" else Image.BILINEAR
        self.crop, self.resize, self.extra_views = crop, resize, dict(extra_views or {})
        self.clean_transform = clean_transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, i = key
        try:
            img = decode_rgb(self.files[i])
        except DECODE_ERRORS:  # deleted / replaced / undecodable since the scan: _collate leaves it out
            return {"index": i, "unreadable": True}
        h, w = (int(s) for s in self.sizes[i])
        if img.size != (w, h):
            raise RuntimeError(f"{self.files[i]}: size {img.size} differs from the scan's {(w, h)} "
                               "(file changed? rescan with cache=False)")
        crop = (self.crop, self.crop)
        y0, x0, y1, x1 = center_box(h, w, self.resize, self.crop)
        center = img.resize(crop, self.center_filter, box=(x0, y0, x1, y1))
        extra = {}
        for name, fn in self.extra_views.items():
            data = fn(epoch, i)
            ok = data is not None
            extra[name] = (torch.from_numpy(np.array(Image.open(io.BytesIO(data)).convert("RGB"))) if ok
                           else torch.zeros(self.crop, self.crop, 3, dtype=torch.uint8))
            extra[f"{name}_ok"] = ok
        if self.split != "train":
            return {"image": torch.from_numpy(np.array(center)), "index": i, **extra}
        (top, left, ch, cw), flip = train_boxes(self.seed, epoch, i, h, w)
        clean = img.resize(crop, Image.BILINEAR, box=(left, top, left + cw, top + ch))
        if flip:
            clean = clean.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.clean_transform is not None:
            clean = self.clean_transform(clean, sample_seed(self.seed, epoch, i))
        return {"clean": torch.from_numpy(np.array(clean)), "diffaug": torch.from_numpy(np.array(center)),
                "index": i, **extra}


def sample_seed(seed: int, epoch: int, i: int) -> int:
    """A 32-bit seed for one sample's random transform, from (loader seed, epoch, dataset index)."""
    return int(np.random.SeedSequence([seed, epoch, i]).generate_state(1)[0])


def _collate(items: list[dict]) -> dict:
    """default_collate over the readable items; an all-unreadable batch gives only an empty index."""
    good = [it for it in items if not it.get("unreadable")]
    if not good:
        return {"index": torch.zeros(0, dtype=torch.int64), "empty": True}
    return torch.utils.data.default_collate(good)


class _Batches:
    """Batch sampler over a fixed list of plan batches, items keyed by (epoch, index)."""

    def __init__(self, batches: list[np.ndarray], epoch: int):
        self.batches, self.epoch = batches, epoch

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for b in self.batches:
            yield [(self.epoch, int(i)) for i in b]


class TorchLoader(Loader):
    backend = "torch"

    def __init__(self, index, split, *, prefetch: int = 2, **kw):
        super().__init__(index, split, **kw)
        self.prefetch = prefetch
        self._dataset = ViewDataset(index.files, self._sizes, split, self.seed, self.crop_size, self.resize_size,
                                    self.extra_views, self.clean_transform, self.interpolation)

    def _produce(self, batches: list[np.ndarray], epoch: int) -> Iterator[dict]:
        if not batches:
            return
        workers = self.num_workers
        dl = torch.utils.data.DataLoader(
            self._dataset, batch_sampler=_Batches(batches, epoch), num_workers=workers,
            prefetch_factor=self.prefetch if workers > 0 else None, pin_memory=self.device.type == "cuda",
            multiprocessing_context=worker_context() if workers > 0 else None, collate_fn=_collate,
        )
        for out in dl:
            if out.pop("empty", False):  # every image of the batch unreadable: empty tensors of each view
                c = self.crop_size
                out.update({v: torch.zeros(0, c, c, 3, dtype=torch.uint8) for v in self.views})
                out.update({f"{v}_ok": torch.zeros(0, dtype=torch.bool) for v in self.extra_views})
            out["index"] = out["index"].to(torch.int64)
            yield out
