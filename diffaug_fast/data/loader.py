"""``build_loader``: the backend chosen once (DALI or torch), the batch format, the device."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..constants import IMAGENET_MEAN, IMAGENET_STD, data_backend_env
from .base import Loader
from .dali import DaliLoader
from .plan import CROP, RESIZE
from .scan import DatasetIndex
from .torch_loader import TorchLoader

__all__ = ["build_loader", "Loader", "available_backends"]

_BACKENDS = ("dali", "torch")


def _dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def available_backends() -> list[str]:
    """Backends that can run in this environment, in the order "auto" tries them."""
    return [b for b in _BACKENDS if b != "dali" or _dali_available()]


def resolve_backend(name: str = "auto") -> str:
    """The data backend ``name`` means here: "auto" -> $DIFFAUG_DATA_BACKEND, then the first available."""
    if name == "auto":
        name = data_backend_env()
    avail = available_backends()
    if name == "auto":
        name = avail[0]
    if name not in avail:
        raise ValueError(f"data backend {name!r} is not available; available: {avail}")
    return name


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


def build_loader(
    index: DatasetIndex,
    split: str = "train",
    *,
    batch_size: int,
    backend: str = "auto",
    output: str = "uint8",
    dtype: torch.dtype = torch.float32,
    channels_last: bool = True,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
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
    interpolation: str = "bilinear",
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
    interpolation: "bilinear" (default) or "bicubic", the antialiased filter of the Resize + CenterCrop view
    (torchvision's Resize on PIL images; DeiT evaluates with bicubic); the RandomResizedCrop view stays bilinear.
    """
    backend = resolve_backend(backend)
    if clean_transform is not None and backend != "torch":
        raise ValueError(f"clean_transform (a PIL transform such as RandAugment) needs the torch backend, "
                         f"not {backend!r}")
    kw = dict(batch_size=batch_size, output=output, dtype=dtype, channels_last=channels_last, mean=mean, std=std,
              shard_id=shard_id, num_shards=num_shards, seed=seed, num_workers=num_workers,
              drop_last=(split == "train") if drop_last is None else drop_last, device=_resolve_device(device),
              crop_size=crop_size, resize_size=resize_size, extra_views=extra_views,
              clean_transform=clean_transform, interpolation=interpolation)
    if backend == "dali":
        return DaliLoader(index, split, prefetch=prefetch, **kw)
    return TorchLoader(index, split, prefetch=prefetch, **kw)

