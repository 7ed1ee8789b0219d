"""The loader both backends share: epochs, shards, resume, labels, output layout (dali.py and torch_loader.py
subclass it; loader.py builds one)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator

import numpy as np
import torch
from PIL import Image, ImageFile

from .plan import CROP, RESIZE, epoch_order, shard_batches
from .scan import DatasetIndex

__all__ = ["Loader", "FLOAT_DTYPES", "INTERPOLATIONS", "DECODE_ERRORS", "decode_rgb"]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# what PIL raises on a file that is no longer a decodable image (garbage, truncated, a bad chunk): both
# backends leave such an image out of its batch (the scan's check_image treats the same errors as bad)
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
INTERPOLATIONS = ("bilinear", "bicubic")



def decode_rgb(path: str) -> Image.Image:
    """The whole image at ``path`` as RGB; raises one of DECODE_ERRORS when it cannot be decoded. Truncated
    data always raises, whatever ``ImageFile.LOAD_TRUNCATED_IMAGES`` says (DALI's decoders refuse it too, so
    both backends skip the same files)."""
    before = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = before

class Loader:
    """Iterable over batches of one shard; see ``build_loader`` for the batch format.

    Epoch state: iterating an epoch to its end moves to the next epoch (position 0). ``set_epoch(e)`` starts
    epoch e from its beginning, except right after ``load_state_dict`` for that same epoch (then the restored
    position is kept), so ``for e in range(sd["epoch"], E): loader.set_epoch(e); for b in loader: ...``
    resumes exactly. An iteration left early continues where it stopped the next time. One active iterator
    per loader.
    """

    backend = "base"

    def __init__(self, index: DatasetIndex, split: str, *, batch_size: int, output: str, dtype: torch.dtype,
                 channels_last: bool, mean, std, shard_id: int, num_shards: int, seed: int, num_workers: int,
                 drop_last: bool, device: torch.device, crop_size: int = CROP, resize_size: int = RESIZE,
                 extra_views: dict[str, Callable[[int, int], bytes]] | None = None,
                 clean_transform: Callable | None = None, interpolation: str = "bilinear"):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if output not in ("uint8", "float"):
            raise ValueError(f"output must be 'uint8' or 'float', got {output!r}")
        if output == "float" and dtype not in FLOAT_DTYPES:
            raise ValueError(f"dtype must be one of {FLOAT_DTYPES} for output='float', got {dtype}")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std need 3 values each, std > 0; got {mean}, {std}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if not 0 < crop_size <= resize_size:
            raise ValueError(f"need 0 < crop_size <= resize_size, got {crop_size}, {resize_size}")
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
        self.crop_size, self.resize_size = int(crop_size), int(resize_size)
        # the filter of the Resize + CenterCrop view (val images, the train DiffAug view); the clean train
        # view (RandomResizedCrop) stays bilinear
        self.interpolation = interpolation
        # extra views: name -> fn(epoch, dataset index) -> encoded image bytes of a crop_size x crop_size
        # image (e.g. a stored DiffAug view from the bank), decoded by the same pipeline as the others
        self.extra_views = dict(extra_views or {})
        # clean_transform(pil_image, seed) -> pil_image: a PIL transform of the clean train view (the ViT
        # recipe's RandAugment), given a seed from (loader seed, epoch, dataset index) so it replays on resume
        self.clean_transform = clean_transform
        self.index, self.split, self.batch_size = index, split, batch_size
        self.output, self.dtype, self.channels_last = output, dtype, channels_last
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.shard_id, self.num_shards, self.seed = shard_id, num_shards, seed
        self.num_workers, self.drop_last, self.device = num_workers, drop_last, device
        self.classes = list(index.classes)
        self.epoch, self.position = 0, 0
        self._resume_epoch: int | None = None
        self._labels = torch.as_tensor(np.asarray(index.labels, dtype=np.int64))
        self._sizes = np.asarray(index.sizes, dtype=np.int64).reshape(-1, 2)
        # validates shard_id / batch_size early
        self._n_batches = len(shard_batches(np.arange(len(index)), batch_size, shard_id, num_shards, drop_last))
        self.views = (("clean", "diffaug") if split == "train" else ("image",)) + tuple(self.extra_views)
        self.skipped: dict[int, str] = {}  # dataset index -> path of images that could not be read

    def __len__(self) -> int:
        return self._n_batches

    def set_epoch(self, epoch: int) -> None:
        if epoch == self._resume_epoch:
            return
        self._resume_epoch = None
        self.epoch, self.position = int(epoch), 0

    def state_dict(self) -> dict:
        """{"epoch", "position" (batches handed out this epoch), "samples" (their sample count), plan settings}."""
        return {"epoch": self.epoch, "position": self.position, "samples": self._samples_before(self.position),
                "seed": self.seed, "shard_id": self.shard_id, "num_shards": self.num_shards,
                "batch_size": self.batch_size, "drop_last": self.drop_last, "num_samples": len(self.index),
                "split": self.split}

    def load_state_dict(self, sd: dict) -> None:
        """Restore epoch and position; the plan settings must match (shard_id may differ: ranks share a state)."""
        for key in ("seed", "num_shards", "batch_size", "drop_last", "num_samples", "split"):
            mine = len(self.index) if key == "num_samples" else getattr(self, key)
            if key in sd and sd[key] != mine:
                raise ValueError(f"loader state has {key}={sd[key]!r} but this loader has {mine!r}: cannot resume")
        if not 0 <= sd["position"] <= len(self):
            raise ValueError(f"position {sd['position']} outside [0, {len(self)}]")
        self.epoch, self.position = int(sd["epoch"]), int(sd["position"])
        self._resume_epoch = self.epoch

    def _samples_before(self, position: int) -> int:
        return min(position * self.batch_size, sum(len(b) for b in self._plan()))

    def _plan(self) -> list[np.ndarray]:
        order = epoch_order(len(self.index), self.seed, self.epoch, shuffle=self.split == "train")
        return shard_batches(order, self.batch_size, self.shard_id, self.num_shards, self.drop_last)

    def __iter__(self) -> Iterator[dict]:
        batches, start = self._plan(), self.position
        self._resume_epoch = None
        for k, out in enumerate(self._produce(batches[start:], self.epoch), start):
            idx = out["index"]
            planned = torch.from_numpy(batches[k])
            kept = torch.isin(planned, idx.cpu())
            if not torch.equal(idx.cpu(), planned[kept]):
                # labels are looked up by index below: a reordered batch would mean wrong labels
                raise RuntimeError(f"{self.backend} loader returned samples out of order in batch {k}")
            self._report_skipped(planned[~kept].tolist())
            out["label"] = self._labels[idx.cpu()].to(self.device)
            out["index"] = idx.to(self.device)
            for v in self.views:
                out[v] = self._finish(out[v])
            for v in self.extra_views:
                out[f"{v}_ok"] = out[f"{v}_ok"].to(self.device, torch.bool)
            self.position = k + 1
            yield out
        self.epoch, self.position = self.epoch + 1, 0

    def _report_skipped(self, ids: list[int]) -> None:
        """Images the backend could not read (deleted, replaced or made unreadable after the scan): the
        batch goes on without them; each is named once on stderr and kept in ``self.skipped``."""
        for i in ids:
            if i not in self.skipped:
                self.skipped[i] = self.index.files[i]
                warnings.warn(f"skipped {self.index.files[i]}: it cannot be read any more (changed after the "
                              "scan); rescan the dataset to drop it for good", stacklevel=3)

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC from a backend -> the requested layout; float tensors are already normalised NCHW."""
        x = x.to(self.device, non_blocking=True)
        if self.output == "uint8" or x.dtype != torch.uint8:
            return x.to(self.dtype) if x.is_floating_point() and x.dtype != self.dtype else x
        mean = torch.tensor(self.mean, device=x.device).mul_(255).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).mul_(255).view(1, 3, 1, 1)
        x = x.permute(0, 3, 1, 2).float().sub_(mean).div_(std).to(self.dtype)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return x.contiguous(memory_format=fmt)

    def _produce(self, batches: list[np.ndarray], epoch: int) -> Iterator[dict]:
        raise NotImplementedError
