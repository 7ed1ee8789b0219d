"""The loader both backends share: epochs, shards, resume, labels, output layout; and ``build_loader``."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator

import numpy as np
import torch

from .plan import CROP, RESIZE, epoch_order, shard_batches
from .scan import DatasetIndex

__all__ = ["build_loader", "Loader", "available_backends"]

_BACKENDS = ("dali", "torch")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def available_backends() -> list[str]:
    """Backends that can run in this environment, in the order "auto" tries them."""
    return [b for b in _BACKENDS if b != "dali" or _dali_available()]


def _resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cpu")
    if device == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device} requested but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    elif device.type != "cpu":
        raise ValueError(f"device must be None, 'auto', 'cpu' or a CUDA device, got {device}")
    return device


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
                 clean_transform: Callable | None = None):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if output not in ("uint8", "float"):
            raise ValueError(f"output must be 'uint8' or 'float', got {output!r}")
        if output == "float" and dtype not in _FLOAT_DTYPES:
            raise ValueError(f"dtype must be one of {_FLOAT_DTYPES} for output='float', got {dtype}")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std need 3 values each, std > 0; got {mean}, {std}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if not 0 < crop_size <= resize_size:
            raise ValueError(f"need 0 < crop_size <= resize_size, got {crop_size}, {resize_size}")
        self.crop_size, self.resize_size = int(crop_size), int(resize_size)
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


def build_loader(
    index: DatasetIndex,
    split: str = "train",
    *,
    batch_size: int,
    backend: str = "auto",
    output: str = "uint8",
    dtype: torch.dtype = torch.float32,
    channels_last: bool = True,
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
    shard_id: int = 0,
    num_shards: int = 1,
    seed: int = 0,
    num_workers: int = 2,
    drop_last: bool | None = None,
    device=None,
    prefetch: int = 2,
    crop_size: int = CROP,
    resize_size: int = RESIZE,
    extra_views: dict[str, Callable[[int, int], bytes]] | None = None,
    clean_transform: Callable | None = None,
) -> Loader:
    """Batches of crop_size x crop_size views (default 224, from Resize(256)) of ``index``'s images.

    train batches: {"clean": RandomResizedCrop(224)+flip view, "diffaug": Resize(256)+CenterCrop(224) view of the
    same decoded image, "label": int64 [B], "index": int64 [B] (position in index.files)}; val batches:
    {"image": Resize(256)+CenterCrop(224), "label", "index"}. output="uint8": uint8 [B,224,224,3] (NHWC, 0..255);
    output="float": ``dtype`` [B,3,224,224], (x/255 - mean)/std, channels_last memory format if asked.

    backend: "dali" | "torch" | "auto" (env DIFFAUG_DATA_BACKEND, then DALI if installed, else torch).
    device: None/"cpu" -> CPU tensors; "auto" -> the current CUDA device when there is one; DALI then decodes on
    the GPU ("mixed": nvJPEG / hardware decoder). num_workers: DALI CPU threads or DataLoader worker processes.
    Sharding: each of num_shards ranks passes its shard_id; drop_last defaults to True for train, False for val.
    extra_views: {name: fn(epoch, index) -> bytes | None}: more views per sample, given as encoded crop_size
    images (the trainer's bank mode: a stored DiffAug view), decoded and laid out like the others. fn returns
    None for a view it cannot give (a damaged bank view, ``BankReader(on_bad="online")``): that row of
    batch[name] is zeros and batch[name + "_ok"] (bool [B], always present) is False there.
    An image that cannot be read any more (deleted or replaced after the scan) is left out of its batch
    (the batch is one smaller), named once as a warning and listed in ``loader.skipped``.
    clean_transform: fn(pil_image, seed) -> pil_image applied to the clean train view after crop and flip
    (e.g. RandAugment); PIL-based, so the torch backend only. seed comes from (seed, epoch, dataset index).
    """
    if backend == "auto":
        backend = os.environ.get("DIFFAUG_DATA_BACKEND", "auto")
    avail = available_backends()
    if backend == "auto":
        backend = avail[0]
    if backend not in avail:
        raise ValueError(f"data backend {backend!r} is not available; available: {avail}")
    if clean_transform is not None and backend != "torch":
        raise ValueError(f"clean_transform (a PIL transform such as RandAugment) needs the torch backend, "
                         f"not {backend!r}")
    kw = dict(batch_size=batch_size, output=output, dtype=dtype, channels_last=channels_last, mean=mean, std=std,
              shard_id=shard_id, num_shards=num_shards, seed=seed, num_workers=num_workers,
              drop_last=(split == "train") if drop_last is None else drop_last, device=_resolve_device(device),
              crop_size=crop_size, resize_size=resize_size, extra_views=extra_views,
              clean_transform=clean_transform)
    if backend == "dali":
        from .dali import DaliLoader

        return DaliLoader(index, split, prefetch=prefetch, **kw)
    from .torch_loader import TorchLoader

    return TorchLoader(index, split, prefetch=prefetch, **kw)

