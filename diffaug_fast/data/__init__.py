"""Data loading for DiffAug training: a validated image index, and loaders giving both views of each image.

    index = scan_dataset(root)                      # or scan_dataset(root, file_list="train.txt")
    loader = build_loader(index, "train", batch_size=256, output="uint8", device="auto")
    for batch in loader:  # {"clean", "diffaug", "label", "index"}; val: {"image", "label", "index"}
        ...

Backends: DALI (GPU decoding when the device is a GPU, CPU threads otherwise) and a torchvision/PIL
DataLoader fallback; both follow the same per-epoch plan (plan.py), so they yield the same samples in the
same order with the same crops.
"""

from .loader import Loader, available_backends, build_loader
from .scan import DatasetIndex, check_image, scan_dataset

__all__ = ["scan_dataset", "build_loader", "DatasetIndex", "Loader", "available_backends", "check_image"]
