"""DALI backend: one pipeline decodes each image once and cuts both views from it.

An external source feeds (encoded bytes, dataset index, view boxes) batch by batch from the epoch plan
(plan.py), so order, sharding and resume are decided in Python and are exactly checkable; DALI does the
heavy part: decoding (``mixed`` = nvJPEG / the A100+ hardware decoder when the loader's device is a GPU,
libjpeg-turbo on CPU threads otherwise) and one ROI resize per view (crop + resize + flip in one op: a
flipped ROI, x0 > x1, mirrors the output). Output is uint8 HWC or, with output="float", normalised by
crop_mirror_normalize in DALI (HWC when channels_last, so the NCHW view is channels_last with no copy).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from .base import Loader
from .plan import center_box, train_boxes

__all__ = ["DaliLoader"]


class _Source:
    """Callable for fn.external_source: the next batch of the plan, StopIteration at the end."""

    def __init__(self, loader: DaliLoader):
        self.loader, self.batches, self.epoch, self.k = loader, [], 0, 0

    def set(self, batches: list[np.ndarray], epoch: int) -> None:
        self.batches, self.epoch, self.k = batches, epoch, 0

    def __call__(self):
        if self.k >= len(self.batches):
            raise StopIteration
        batch, self.k = self.batches[self.k], self.k + 1
        ld = self.loader
        data, kept = [], []
        for i in batch:
            try:
                data.append(np.fromfile(ld.index.files[i], dtype=np.uint8))
                kept.append(i)
            except OSError:  # deleted / replaced / unreadable since the scan: Loader reports it, batch goes on
                pass
        batch = kept
        idx = [np.array(i, dtype=np.int64) for i in batch]
        starts, ends = [], []
        for i in batch:
            h, w = ld._sizes[i]
            boxes = []
            if ld.split == "train":
                (top, left, ch, cw), flip = train_boxes(ld.seed, self.epoch, int(i), int(h), int(w))
                x0, x1 = (left + cw, left) if flip else (left, left + cw)
                boxes.append((top, x0, top + ch, x1))
            boxes.append(center_box(int(h), int(w), ld.resize_size, ld.crop_size))
            starts.append([np.array(b[:2], dtype=np.float32) for b in boxes])
            ends.append([np.array(b[2:], dtype=np.float32) for b in boxes])
        rois = []
        for v in range(len(ld.views) - len(ld.extra_views)):
            rois += [[s[v] for s in starts], [e[v] for e in ends]]
        extra, oks = [], []
        for fn in ld.extra_views.values():
            got = [fn(self.epoch, int(i)) for i in batch]  # None: a view the source cannot give (damaged)
            extra.append([np.frombuffer(ld._blank() if b is None else b, dtype=np.uint8) for b in got])
            oks.append([np.array(b is not None) for b in got])
        return (data, idx, *rois, *extra, *oks)


class DaliLoader(Loader):
    backend = "dali"

    def __init__(self, index, split, *, prefetch: int = 2, **kw):
        super().__init__(index, split, **kw)
        self.prefetch = prefetch
        self._pipe = None
        self._source = _Source(self)
        self._busy, self._generation = False, 0  # an iteration is open / which one owns the pipeline
        self._blank_bytes = None

    def _blank(self) -> bytes:
        """A black crop_size PNG: decoded in place of an extra view its source could not give."""
        if self._blank_bytes is None:
            import io

            from PIL import Image

            buf = io.BytesIO()
            Image.new("RGB", (self.crop_size, self.crop_size)).save(buf, format="PNG")
            self._blank_bytes = buf.getvalue()
        return self._blank_bytes

    def _build(self):
        from nvidia.dali import fn, types
        from nvidia.dali.pipeline import Pipeline

        gpu = self.device.type == "cuda"
        pipe = Pipeline(batch_size=self.batch_size, num_threads=max(1, self.num_workers),
                        device_id=self.device.index if gpu else None, prefetch_queue_depth=self.prefetch)
        with pipe:
            n_cut = len(self.views) - len(self.extra_views)  # views cut from the decoded image by ROI
            n_extra = len(self.extra_views)
            data, idx, *rest = fn.external_source(source=self._source, batch=True,
                                                  num_outputs=2 + 2 * n_cut + 2 * n_extra)
            rois, extra, oks = rest[: 2 * n_cut], rest[2 * n_cut: 2 * n_cut + n_extra], rest[2 * n_cut + n_extra:]
            shape = fn.peek_image_shape(data, adjust_orientation=False)
            # fancy upsampling makes nvJPEG's chroma upsampling match libjpeg-turbo (and PIL) for GPU decoding
            dec_kw = {"jpeg_fancy_upsampling": True} if gpu else {}
            img = fn.decoders.image(data, device="mixed" if gpu else "cpu", output_type=types.RGB,
                                    adjust_orientation=False, **dec_kw)
            views = []
            crop = [self.crop_size, self.crop_size]
            for v in range(len(self.views)):
                if v < n_cut:
                    view = fn.resize(img, size=crop, roi_start=rois[2 * v], roi_end=rois[2 * v + 1],
                                     antialias=True, interp_type=types.INTERP_LINEAR)
                else:  # a stored crop_size image (bank view): decode only
                    view = fn.decoders.image(extra[v - n_cut], device="mixed" if gpu else "cpu",
                                             output_type=types.RGB, adjust_orientation=False, **dec_kw)
                if self.output == "float":
                    dali_dtype = types.FLOAT16 if self.dtype == torch.float16 else types.FLOAT
                    view = fn.crop_mirror_normalize(view, dtype=dali_dtype,
                                                    output_layout="HWC" if self.channels_last else "CHW",
                                                    mean=[255 * m for m in self.mean],
                                                    std=[255 * s for s in self.std])
                views.append(view)
            pipe.set_outputs(idx, shape, *views, *oks)
        pipe.build()
        return pipe

    def _to_torch(self, tl, dtype: torch.dtype) -> torch.Tensor:
        from nvidia.dali.plugin.pytorch import feed_ndarray

        t = tl.as_tensor()
        out = torch.empty(t.shape(), dtype=dtype, device=self.device)
        stream = torch.cuda.current_stream(self.device).cuda_stream if self.device.type == "cuda" else None
        feed_ndarray(t, out, cuda_stream=stream)
        return out

    def _produce(self, batches: list[np.ndarray], epoch: int) -> Iterator[dict]:
        if not batches:
            return
        self._generation += 1
        me = self._generation
        if self._busy:  # an earlier iteration is still open: its prefetched batches sit in that pipeline
            self._pipe = None
        self._busy = True
        self._source.set(batches, epoch)
        if self._pipe is None:
            self._pipe = self._build()
        pipe = self._pipe
        out_dtype = torch.uint8
        if self.output == "float":
            out_dtype = torch.float16 if self.dtype == torch.float16 else torch.float32
        done = False
        try:
            for k, batch in enumerate(batches):
                try:
                    idx_tl, shape_tl, *view_tls = pipe.run()
                except StopIteration:
                    raise RuntimeError(f"DALI pipeline ended after {k} of {len(batches)} batches") from None
                except RuntimeError as e:
                    names = "\n  ".join(self.index.files[i] for i in batch)
                    raise RuntimeError(f"DALI failed on a batch containing:\n  {names}\n{e}") from e
                ok_tls, view_tls = view_tls[len(self.views):], view_tls[: len(self.views)]
                idx = torch.from_numpy(np.array(idx_tl.as_tensor()).reshape(-1).astype(np.int64))
                shapes = np.array(shape_tl.as_tensor()).reshape(-1, 3)[:, :2]
                if not np.array_equal(shapes, self._sizes[idx.numpy()]):
                    bad = [self.index.files[i] for i, s in zip(idx.tolist(), shapes, strict=True)
                           if tuple(s) != tuple(self._sizes[i])]
                    raise RuntimeError(f"image size differs from the scan (file changed? rescan, cache=False): {bad}")
                out = {"index": idx}
                for name, tl in zip(self.views, view_tls, strict=True):
                    x = self._to_torch(tl, out_dtype)
                    if self.output == "float" and self.channels_last:
                        x = x.permute(0, 3, 1, 2)  # NHWC data = NCHW tensor in channels_last format
                    out[name] = x
                for name, tl in zip(self.extra_views, ok_tls, strict=True):
                    out[f"{name}_ok"] = torch.from_numpy(np.array(tl.as_tensor()).reshape(-1).astype(bool))
                yield out
            try:
                pipe.run()
            except StopIteration:
                pipe.reset()  # clean end of epoch: the pipeline can be reused
                done = True
        finally:
            if self._generation == me:  # a newer iteration owns the pipeline otherwise
                self._busy = False
                if not done:  # left early or failed: batches of this plan are queued inside; start afresh
                    self._pipe = None
