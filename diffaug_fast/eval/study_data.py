"""The study's data: the evaluated subset of each split (class-balanced, deterministic), the classifier-view
PNGs of val and their corrupted tree (``python -m diffaug_fast.corrupt``), and an ImageNet-C tree's splits."""

from __future__ import annotations

import io
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..corrupt import Settings as CorruptSettings
from ..corrupt import run as corrupt_run
from ..data.plan import center_box
from ..data.scan import DatasetIndex, check_image
from ..io import atomic_write_bytes

__all__ = ["Split", "select_files", "split_index", "write_views", "generate_corrupted", "find_splits"]

_IMAGE_EXT = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
_SELECT_SEED = 0  # fixed: the evaluated subset is a property of the data, not of a classifier seed


@dataclass(frozen=True)
class Split:
    """One evaluated folder: the clean val split (corruption "clean", severity 0) or a corrupted copy.

    native: the images are already the classifier's crop (the generated tree): no Resize + CenterCrop."""

    corruption: str
    severity: int
    folder: Path
    native: bool = False

    @property
    def name(self) -> str:
        return "clean" if self.corruption == "clean" else f"{self.corruption}-{self.severity}"


def _list_split(folder: Path) -> dict[str, list[Path]]:
    """{class folder name: image files sorted by name (stem first)} of an ImageFolder-style folder."""
    out = {}
    for d in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = [p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in _IMAGE_EXT
                 and not p.name.startswith(".")]
        out[d.name] = sorted(files, key=lambda p: (str(p.relative_to(d).with_suffix("")), p.suffix))
    return out


def select_files(listing: dict[str, list[Path]], max_images: int | None) -> list[tuple[str, Path]]:
    """(class, file) pairs: all of them, or ``max_images`` class-balanced ones.

    Each class's files are shuffled by a generator seeded with the class name, the classes by seed 0, and
    one file of each class is taken in turn: class counts differ by at most one (unless a class runs out),
    and a corrupted tree that mirrors val's file names yields the same images as val."""
    if max_images is None or sum(map(len, listing.values())) <= max_images:
        return [(c, f) for c, files in listing.items() for f in files]
    queues = {c: [files[i] for i in np.random.default_rng([_SELECT_SEED, zlib.crc32(c.encode())]).permutation(
        len(files))] for c, files in listing.items()}
    order = [list(listing)[i] for i in np.random.default_rng(_SELECT_SEED).permutation(len(listing))]
    picked, depth = [], 0
    while len(picked) < max_images:
        row = [(c, queues[c][depth]) for c in order if depth < len(queues[c])]
        if not row:
            break
        picked += row[: max_images - len(picked)]
        depth += 1
    return sorted(picked, key=lambda cf: (cf[0], str(cf[1])))


def split_index(folder: Path, classes: Sequence[str], max_images: int | None) -> DatasetIndex:
    """The evaluated images of one split as a DatasetIndex whose labels are the classifier's class indices
    (a split may lack some classes; the logits are never sliced to the classes present)."""
    listing = _list_split(folder)
    pos = {c: i for i, c in enumerate(classes)}
    unknown = [c for c in listing if c not in pos]
    if unknown:
        raise SystemExit(f"{folder}: class folder(s) {', '.join(unknown[:3])} are not among the {len(classes)} "
                         "training classes")
    index = DatasetIndex(root=str(folder), files=[], labels=[], sizes=[], classes=list(classes))
    for cls, path in select_files(listing, max_images):
        reason, h, w = check_image(str(path))
        if reason is not None:
            index.bad.append((str(path), reason))
            continue
        index.files.append(str(path))
        index.labels.append(pos[cls])
        index.sizes.append((h, w))
    if not index.files:
        raise SystemExit(f"{folder}: no readable images" + (f" ({index.bad[0][0]}: {index.bad[0][1]})" if index.bad
                                                              else ""))
    return index


def write_views(index: DatasetIndex, dst: Path, *, crop: int, resize: int, progress: bool = True) -> Path:
    """dst/<class>/<stem>.png: the Resize(resize) + CenterCrop(crop) view of every image of ``index``, the
    pixels the evaluation's loader makes of it (same box, same PIL filter); files already there are kept."""
    for path, label in tqdm(list(zip(index.files, index.labels, strict=True)), desc="val views", unit="img",
                            disable=not progress, dynamic_ncols=True):
        out = dst / index.classes[label] / (Path(path).stem + ".png")
        if out.is_file():
            continue
        with Image.open(path) as im:
            img = im.convert("RGB")
        y0, x0, y1, x1 = center_box(img.height, img.width, resize, crop)
        buf = io.BytesIO()
        img.resize((crop, crop), Image.BILINEAR, box=(x0, y0, x1, y1)).save(buf, format="PNG")
        atomic_write_bytes(buf.getvalue(), out)
    return dst


def generate_corrupted(index: DatasetIndex, out: Path, corruptions: Sequence[str], severities: Sequence[int], *,
                       crop: int, resize: int, workers: int = 0, progress: bool = True) -> Path:
    """OUT/corrupted/<corruption>/<severity>/<class>/<stem>.png (.jpg for jpeg_compression): the evaluated
    val images' Resize + CenterCrop views (OUT/val_views) corrupted by ``python -m diffaug_fast.corrupt``
    (its seeds, its resumable writing, its manifest). Corrupting the crop the classifier sees is how ImageNet-C
    was made (224 px centre crops); the severity tables follow the crop size (the corruptions module's "auto")."""
    views = write_views(index, out / "val_views", crop=crop, resize=resize, progress=progress)
    dst = out / "corrupted"
    corrupt_run(CorruptSettings(views, dst, tuple(corruptions), tuple(sorted(severities)), workers=workers,
                                progress=progress))
    return dst


def find_splits(root: Path, corruptions: Sequence[str] | None, severities: Sequence[int] | None,
                native: bool = False) -> list[Split]:
    """The <corruption>/<severity>/ folders of an ImageNet-C layout tree (optionally only those named)."""
    found = {}
    for cdir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        sevs = sorted(int(p.name) for p in cdir.iterdir() if p.is_dir() and p.name.isdigit())
        if sevs:
            found[cdir.name] = sevs
    if not found:
        raise SystemExit(f"--corrupted {root}: expected <corruption>/<severity>/<class>/ folders (the ImageNet-C "
                         "layout)")
    if corruptions is not None:
        missing = [c for c in corruptions if c not in found]
        if missing:
            raise SystemExit(f"--corruptions: {', '.join(missing)} not in {root} (it has {', '.join(found)})")
    splits = []
    for c, sevs in found.items():
        if corruptions is not None and c not in corruptions:
            continue
        splits += [Split(c, sev, root / c / str(sev), native) for sev in sevs if severities is None or sev in severities]
    if not splits:
        raise SystemExit(f"--corrupted {root}: no folder for severities {list(severities or [])}")
    return splits


