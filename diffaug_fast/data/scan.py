"""Scan an image tree once: decode-check every file in parallel, keep a validated list, report the bad ones.

Real datasets contain files a pipeline must not meet unprepared: CMYK and grayscale JPEGs (kept: both
decoders turn them into the same RGB pixels), PNGs named .jpg (kept: decoders sniff the content),
truncated or empty files, 16-bit PNGs, tiny or extremely elongated images, stray non-image files (all
rejected with a reason). The loaders only ever see ``DatasetIndex.files``.

Cache: the result is stored as JSON in ``cache_dir`` (default ``$DIFFAUG_CACHE_DIR`` or
``~/.cache/diffaug_fast/scan``), NOT inside the tree: writing into the tree would change the root's mtime
and invalidate the key. The key hashes the absolute root, the mtime_ns of the root and of every directory
under it (adding, removing or renaming a file changes its directory's mtime), the file list's path, size
and mtime_ns when one is used, and the scan settings. Files rewritten in place keep their directory's
mtime: pass ``cache=False`` after such edits. A cached-good file that is no longer a readable regular
file (permissions, a dangling link) is rescanned on the next call, reported bad and left out.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import stat
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

from PIL import Image, ImageFile, UnidentifiedImageError
from tqdm.auto import tqdm

from ..constants import cache_dir

__all__ = ["DatasetIndex", "scan_dataset", "check_image", "worker_context"]

_SCAN_VERSION = 1
# Modes whose RGB conversion DALI's CPU decoder and PIL agree on bit for bit (measured on generated files:
# RGB/L/CMYK JPEG, RGB/RGBA/P/LA/L PNG; a 16-bit PNG ("I;16") differs by up to 253 levels -> rejected).
_OK_MODES = {"JPEG": {"RGB", "L", "CMYK"}, "PNG": {"RGB", "RGBA", "P", "LA", "L"}}
# Files scanned in-process below this count: starting worker processes costs more than it saves.
_INLINE_BELOW = 64


@dataclass
class DatasetIndex:
    """A validated list of images with labels.

    files: absolute paths of the images that decoded cleanly; labels: int class of each (0..len(classes)-1);
    sizes: (height, width) of each as decoded (EXIF orientation ignored, like torchvision's ImageFolder);
    classes: class names, label i is classes[i]; bad: (path, reason) of every rejected file.
    """

    root: str
    files: list[str]
    labels: list[int]
    sizes: list[tuple[int, int]]
    classes: list[str]
    bad: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.files)

    def report(self, max_names: int = 20) -> str:
        """Human-readable summary: counts, then up to ``max_names`` bad files with their reasons."""
        lines = [f"{self.root}: {len(self.files)} images in {len(self.classes)} classes, {len(self.bad)} bad files"]
        for path, reason in self.bad[:max_names]:
            lines.append(f"  bad: {path}: {reason}")
        if len(self.bad) > max_names:
            lines.append(f"  ... and {len(self.bad) - max_names} more")
        return "\n".join(lines)

    def subset(self, ids: Iterable[int]) -> DatasetIndex:
        """The images at positions ``ids`` (same classes and label numbering), e.g. one bank shard's images."""
        ids = [int(i) for i in ids]
        return DatasetIndex(self.root, [self.files[i] for i in ids], [self.labels[i] for i in ids],
                            [self.sizes[i] for i in ids], list(self.classes))

    def save_classes(self, path: str | os.PathLike) -> None:
        """Write the label -> class name mapping as JSON: {"classes": [...], "root": ...}."""
        with open(path, "w") as f:
            json.dump({"root": self.root, "classes": self.classes}, f, indent=1)


_FORKSERVER_PRELOAD = ["__main__", "torch", "diffaug_fast.data.torch_loader"]


def worker_context() -> multiprocessing.context.BaseContext:
    """Worker processes started from a clean server, never forked from this process: a fork copies the
    locks of whatever threads run here (DALI's, OpenMP's) and a worker can wait on one forever. Seen in
    the test suite: a DataLoader worker asleep on a futex, single-threaded, the run hung.

    The server imports torch and our loader once (beside Python's default, the main script), so each new
    worker is a fork of it instead of a fresh interpreter importing them: the torch loader's first batch of
    an epoch took 2.80 s with 2 workers, 0.46 s with the preload (bench_loader.py::test_epoch_start_torch).
    A loader made per epoch or per evaluated folder paid that every time. The server does nothing but
    fork, so no thread of it holds a lock."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(_FORKSERVER_PRELOAD)  # takes effect when the server starts (first use)
    return ctx


def check_image(path: str, min_size: int = 8, max_aspect: float = 20.0) -> tuple[str | None, int, int]:
    """Fully decode one file; returns (reason it is bad or None, height, width)."""
    try:
        if os.path.getsize(path) == 0:
            return "empty file", 0, 0
        with Image.open(path) as im:
            fmt, mode = im.format, im.mode
            w, h = im.size
            if fmt not in _OK_MODES:
                return f"unsupported format {fmt}", h, w
            if mode not in _OK_MODES[fmt]:
                return f"unsupported {fmt} mode {mode}", h, w
            im.load()  # full decode: truncated data raises here (LOAD_TRUNCATED_IMAGES is forced off)
    except UnidentifiedImageError:
        return "not an image", 0, 0
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
        return f"unreadable: {e.strerror}", 0, 0
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        return f"corrupt or truncated: {e}", 0, 0
    if min(h, w) < min_size:
        return f"too small: {w}x{h} (min side {min_size})", h, w
    if max(h, w) / min(h, w) > max_aspect:
        return f"too elongated: {w}x{h} (aspect > {max_aspect:g})", h, w
    return None, h, w


def _check_many(args: tuple[list[str], int, float]) -> list[tuple[str | None, int, int]]:
    paths, min_size, max_aspect = args
    before = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # another library may have turned it on: truncation must raise
    try:
        return [check_image(p, min_size, max_aspect) for p in paths]
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = before


def _list_tree(root: str) -> tuple[list[str], list[str], list[int], list[str]]:
    """(classes, files, labels, directories) of an ImageFolder-style tree; hidden names are skipped."""
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ValueError(f"{root}: no class folders found (expected one folder per class)")
    files, labels, dirs = [], [], [root]
    for label, name in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, name), followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            dirs.append(dirpath)
            for fn in sorted(filenames):
                if not fn.startswith("."):
                    files.append(os.path.join(dirpath, fn))
                    labels.append(label)
    return classes, files, labels, dirs


def _read_file_list(root: str, file_list: str) -> tuple[list[str], list[str], list[int]]:
    files, labels = [], []
    with open(file_list) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.rsplit(None, 1)  # paths may contain spaces; the label is the last field
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit() or int(parts[1]) < 0:
                raise ValueError(f"{file_list}:{n}: expected 'relative/path label' with label an int >= 0: {line!r}")
            files.append(os.path.join(root, parts[0]))
            labels.append(int(parts[1]))
    if not files:
        raise ValueError(f"{file_list}: no entries")
    classes = [str(i) for i in range(max(labels) + 1)]
    return classes, files, labels


def _cache_key(root: str, dirs: Iterable[str], file_list: str | None, settings: tuple) -> str:
    h = hashlib.sha1(repr((_SCAN_VERSION, root, settings)).encode())
    for d in dirs:
        h.update(f"{d}\0{os.stat(d).st_mtime_ns}\n".encode())
    if file_list is not None:
        st = os.stat(file_list)
        h.update(f"{os.path.abspath(file_list)}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _default_cache_dir() -> str:
    return str(cache_dir() / "scan")


def scan_dataset(
    root: str | os.PathLike,
    *,
    file_list: str | os.PathLike | None = None,
    strict: bool = False,
    num_workers: int | None = None,
    cache: bool | str | os.PathLike = True,
    progress: bool = True,
    min_size: int = 8,
    max_aspect: float = 20.0,
) -> DatasetIndex:
    """Scan ``root`` (one folder per class, labels = sorted folder names) or the ``file_list`` under it.

    Every file is fully decoded once (``num_workers`` processes, default all cores) behind a tqdm bar.
    Bad files (see module doc; also images with a side < ``min_size`` or aspect ratio > ``max_aspect``)
    are skipped and listed in ``index.bad``; ``strict=True`` raises ValueError naming the first one.
    ``cache``: True (default directory), False, or a directory to store the JSON result in.
    """
    root = os.path.abspath(os.fspath(root))
    if not os.path.isdir(root):
        raise ValueError(f"dataset root {root!r} is not a directory")
    if file_list is not None:
        file_list = os.path.abspath(os.fspath(file_list))
        classes, paths, labels = _read_file_list(root, file_list)
        dirs = sorted({os.path.dirname(p) for p in paths if os.path.isdir(os.path.dirname(p))})
    else:
        classes, paths, labels, dirs = _list_tree(root)
    settings = (min_size, float(max_aspect))

    cache_path = None
    if cache:
        cache_dir = _default_cache_dir() if cache is True else os.fspath(cache)
        cache_path = os.path.join(cache_dir, _cache_key(root, dirs, file_list, settings) + ".json")
    results = None
    if cache_path and os.path.exists(cache_path):
        try:
            with open(cache_path) as f:
                data = json.load(f)
            if data.get("paths") == paths:
                results = [list(r) for r in data["results"]]
        except (OSError, ValueError, KeyError):
            results = None  # unreadable cache: scan again
    stale = _stale_entries(paths, results) if results is not None else []
    if stale:  # cached as good, unreadable now (permissions, a dangling link): the key cannot see that
        for i, r in zip(stale, _scan([paths[i] for i in stale], settings, num_workers, False), strict=True):
            results[i] = r
    fresh = results is None
    if fresh:
        results = _scan(paths, settings, num_workers, progress)
    if cache_path and (fresh or stale):
        os.makedirs(os.path.dirname(cache_path), exist_ok=True)
        tmp = f"{cache_path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump({"root": root, "paths": paths, "results": results}, f)
        os.replace(tmp, cache_path)  # atomic: concurrent ranks never read half a file

    index = DatasetIndex(root=root, files=[], labels=[], sizes=[], classes=classes)
    for path, label, (reason, h, w) in zip(paths, labels, results, strict=True):
        if reason is None:
            index.files.append(path)
            index.labels.append(label)
            index.sizes.append((h, w))
        else:
            if strict:
                raise ValueError(f"bad image file {path}: {reason} (strict=True; pass strict=False to skip it)")
            index.bad.append((path, reason))
    if not index.files:
        raise ValueError(f"{root}: no valid images found\n{index.report()}")
    return index


def _stale_entries(paths: list[str], results: list) -> list[int]:
    """Positions of cached-good files that are no longer readable regular files: a stat each (~2 s for
    ImageNet's 1.28 M files on a warm cache), plus os.access, which sees permissions (except as root)."""
    stale = []
    for i, (path, r) in enumerate(zip(paths, results, strict=True)):
        if r[0] is None:
            try:
                ok = stat.S_ISREG(os.stat(path).st_mode) and os.access(path, os.R_OK)
            except OSError:
                ok = False
            if not ok:
                stale.append(i)
    return stale


def _scan(paths: list[str], settings: tuple, num_workers: int | None, progress: bool) -> list:
    num_workers = num_workers or os.cpu_count() or 1
    chunk = 32
    chunks = [(paths[i : i + chunk], *settings) for i in range(0, len(paths), chunk)]
    bar = tqdm(total=len(paths), desc="scanning images", unit="img", disable=not progress, leave=False)
    out: list = []
    with bar:
        if num_workers <= 1 or len(paths) < _INLINE_BELOW:
            for c in chunks:
                out.extend(_check_many(c))
                bar.update(len(c[0]))
        else:
            with ProcessPoolExecutor(num_workers, mp_context=worker_context()) as pool:
                for c, res in zip(chunks, pool.map(_check_many, chunks), strict=True):
                    out.extend(res)
                    bar.update(len(c[0]))
    return [list(r) for r in out]
