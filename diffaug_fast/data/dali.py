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

from .base import DECODE_ERRORS, Loader, decode_rgb
from .plan import center_box, train_boxes

__all__ = ["DaliLoader", "undecodable"]


class _Source:
    """Callable for fn.external_source: the next batch of the plan, StopIteration at the end.

    ``k`` counts the batches handed to DALI (it runs ``prefetch`` batches ahead of the one the loader
    outputs). An extra view's source that raises (a damaged bank view) does not fail the pipeline: the
    exception is kept in ``errors`` under the batch's position and the loader raises it when it reaches that
    batch, as the torch backend does, so it surfaces as itself and never inside a DALI traceback."""

    def __init__(self, loader: DaliLoader):
        self.loader, self.batches, self.epoch, self.k = loader, [], 0, 0
        self.errors: dict[int, BaseException] = {}
        self.failed: BaseException | None = None  # an error of this code itself (not of an image): re-raised

    def set(self, batches: list[np.ndarray], epoch: int, start: int = 0) -> None:
        self.batches, self.epoch, self.k = batches, epoch, start
        self.errors, self.failed = {}, None

    def __call__(self):
        if self.k >= len(self.batches):
            raise StopIteration
        pos, batch, self.k = self.k, self.batches[self.k], self.k + 1
        try:
            return self._feed(pos, batch)
        except Exception as e:
            self.failed = e
            raise

    def _feed(self, pos: int, batch: np.ndarray) -> tuple:
        ld = self.loader
        data, kept = [], []
        for i in batch:
            if int(i) in ld.broken:  # found undecodable earlier: left out like an unreadable file
                continue
            try:
                data.append(np.fromfile(ld.index.files[i], dtype=np.uint8))
                kept.append(int(i))
            except OSError:  # deleted / replaced / unreadable since the scan: Loader reports it, batch goes on
                pass
        if not kept:  # DALI refuses an empty batch: a blank image with index -1 stands in (DaliLoader drops it)
            data, kept = [np.frombuffer(ld._blank(), dtype=np.uint8)], [-1]
        boxes = [self._boxes(i) for i in kept]
        rois = []
        for v in range(len(ld.views) - len(ld.extra_views)):
            rois += [[np.array(b[v][:2], dtype=np.float32) for b in boxes],
                     [np.array(b[v][2:], dtype=np.float32) for b in boxes]]
        extra, oks = [], []
        for fn in ld.extra_views.values():
            try:  # None: a view the source cannot give (damaged)
                got = [None if i < 0 else fn(self.epoch, i) for i in kept]
            except Exception as e:  # noqa: BLE001 - re-raised as itself by DaliLoader at this batch
                self.errors.setdefault(pos, e)
                got = [None] * len(kept)
            extra.append([np.frombuffer(ld._blank() if b is None else b, dtype=np.uint8) for b in got])
            oks.append([np.array(b is not None) for b in got])
        return (data, [np.array(i, dtype=np.int64) for i in kept], *rois, *extra, *oks)

    def _boxes(self, i: int) -> list[tuple]:
        """Source-pixel boxes (y0, x0, y1, x1) of image i's cut views (x0 > x1: mirrored); i = -1 is the
        blank crop_size stand-in of an empty batch."""
        ld = self.loader
        h, w = (int(v) for v in ld._sizes[i]) if i >= 0 else (ld.crop_size, ld.crop_size)
        boxes = []
        if ld.split == "train":
            (top, left, ch, cw), flip = train_boxes(ld.seed, self.epoch, i, h, w) if i >= 0 else ((0, 0, h, w), False)
            x0, x1 = (left + cw, left) if flip else (left, left + cw)
            boxes.append((top, x0, top + ch, x1))
        boxes.append(center_box(h, w, ld.resize_size, ld.crop_size))
        return boxes


def undecodable(path: str) -> bool:
    """True when PIL cannot decode ``path`` any more (garbage, truncated, not an image): the torch backend's
    test (``decode_rgb``), used on the images of a batch DALI failed on."""
    try:
        decode_rgb(path)
    except DECODE_ERRORS:
        return True
    return False


def _dali_reason(e: BaseException) -> str:
    """The line of a DALI error that says what failed (the one after "encountered:"), else its last line."""
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    for a, b in zip(lines, lines[1:]):
        if a.startswith("encountered"):
            return b
    return lines[-1] if lines else type(e).__name__


class DaliLoader(Loader):
    backend = "dali"

    def __init__(self, index, split, *, prefetch: int = 2, **kw):
        super().__init__(index, split, **kw)
        self.prefetch = prefetch
        self._pipe = None
        self._source = _Source(self)
        self._busy, self._generation = False, 0  # an iteration is open / which one owns the pipeline
        self._blank_bytes = None
        # dataset indices DALI failed to decode and PIL confirmed undecodable: left out from then on
        self.broken: set[int] = set()

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
                    # the last cut view is the Resize + CenterCrop one: bicubic when asked (DALI's cubic filter)
                    interp = (types.INTERP_CUBIC if v == n_cut - 1 and self.interpolation == "bicubic"
                              else types.INTERP_LINEAR)
                    view = fn.resize(img, size=crop, roi_start=rois[2 * v], roi_end=rois[2 * v + 1],
                                     antialias=True, interp_type=interp)
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
        pipe, k, done = self._pipe, 0, False
        try:
            while k < len(batches):
                try:
                    idx_tl, shape_tl, *view_tls = pipe.run()
                except StopIteration:
                    raise RuntimeError(f"DALI pipeline ended after {k} of {len(batches)} batches") from None
                except Exception as e:  # noqa: BLE001 - DALI raises RuntimeError, or what a source raised
                    if self._source.failed is not None:  # our feeding code failed, not an image: raise as is
                        raise self._source.failed from None
                    pipe = self._restart_without_broken(batches, epoch, k, e)
                    continue
                err = self._source.errors.pop(k, None)
                if err is not None:  # an extra view's source failed on this batch (a damaged bank view)
                    raise err
                yield self._batch_out(idx_tl, shape_tl, view_tls)
                k += 1
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

    def _restart_without_broken(self, batches: list[np.ndarray], epoch: int, k: int, e: BaseException):
        """DALI failed while batch k was due; the failing image may sit in any batch it had been handed
        (it runs ahead). Images PIL cannot decode either changed after the scan: leave them out (the base
        Loader names them once and lists them in ``skipped``, as the torch backend does) and rebuild the
        pipeline from batch k. Returns the new pipeline; a failure no image explains is one line, raised."""
        fed = [int(i) for b in batches[k:max(self._source.k, k + 1)] for i in b if int(i) not in self.broken]
        bad = {i for i in fed if undecodable(self.index.files[i])}
        if not bad:
            names = ", ".join(self.index.files[i] for i in fed[:4]) + (" ..." if len(fed) > 4 else "")
            raise RuntimeError(f"DALI failed on the batch of {names} ({_dali_reason(e)}), yet PIL decodes each of "
                               "these images: try --loader torch, and report it") from e
        self.broken |= bad
        self._pipe = None  # a DALI pipeline that failed is no longer usable
        self._source.set(batches, epoch, start=k)
        self._pipe = self._build()
        return self._pipe

    def _batch_out(self, idx_tl, shape_tl, view_tls) -> dict:
        """One DALI output -> {"index", each view, "<extra>_ok"} as torch tensors on the loader's device."""
        ok_tls, view_tls = view_tls[len(self.views):], view_tls[: len(self.views)]
        idx = torch.from_numpy(np.array(idx_tl.as_tensor()).reshape(-1).astype(np.int64))
        if idx.tolist() == [-1]:  # every image of the batch left out: empty views, as the torch backend gives
            c = self.crop_size
            return {"index": idx[:0], **{v: torch.zeros(0, c, c, 3, dtype=torch.uint8) for v in self.views},
                    **{f"{v}_ok": torch.zeros(0, dtype=torch.bool) for v in self.extra_views}}
        shapes = np.array(shape_tl.as_tensor()).reshape(-1, 3)[:, :2]
        if not np.array_equal(shapes, self._sizes[idx.numpy()]):
            bad = [self.index.files[i] for i, s in zip(idx.tolist(), shapes, strict=True)
                   if tuple(s) != tuple(self._sizes[i])]
            raise RuntimeError(f"image size differs from the scan (file changed? rescan, cache=False): {bad}")
        out_dtype = torch.uint8
        if self.output == "float":
            out_dtype = torch.float16 if self.dtype == torch.float16 else torch.float32
        out = {"index": idx}
        for name, tl in zip(self.views, view_tls, strict=True):
            x = self._to_torch(tl, out_dtype)
            if self.output == "float" and self.channels_last:
                x = x.permute(0, 3, 1, 2)  # NHWC data = NCHW tensor in channels_last format
            out[name] = x
        for name, tl in zip(self.extra_views, ok_tls, strict=True):
            out[f"{name}_ok"] = torch.from_numpy(np.array(tl.as_tensor()).reshape(-1).astype(bool))
        return out
