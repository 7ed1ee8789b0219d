"""Reading a finished bank: ``BankReader`` (per-view crc32 checks) and ``open_for_training`` (refuses a
bank whose views were not made from this training set and settings)."""

from __future__ import annotations

import os
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .common import (
    FORMAT_VERSION,
    BankError,
    _read_json,
    content_fingerprint,
    dataset_fingerprint,
    file_sha256,
    pick_view,
    source_digests,
)


@dataclass(frozen=True)
class _Member:
    shard: int
    offset: int
    size: int
    t: int
    seed: int
    crc32: int | None = None  # None in format-1 banks (no per-view checksums)


_MANIFEST_KEYS = ("format_version", "views", "num_images", "shards", "image_size", "resize_size", "t_range",
                  "schedule", "checkpoint_sha256", "dataset_fingerprint")
ON_BAD = ("error", "online")


def _open_bank(root: Path) -> tuple[dict | None, dict, list[Path], list[str]]:
    """Read the manifest and every shard index; check each shard exists with its recorded size (no data read).

    Returns (manifest or None, {(image, view): _Member}, shard paths, problems); every problem is one line
    naming the file, so ``verify`` lists them all and the trainer refuses with the first few.
    """
    if not (root / "manifest.json").is_file():
        raise BankError(f"{root} is not a finished DiffAug bank (no manifest.json): build it first, "
                        "or resume an interrupted build with the same command")
    man, err = _read_json(root / "manifest.json", "manifest")
    if err is None and not (isinstance(man, dict) and all(k in man for k in _MANIFEST_KEYS)):
        err = f"manifest manifest.json lacks {[k for k in _MANIFEST_KEYS if k not in (man or {})]}"
    if err is not None:
        return None, {}, [], [err + " (delete it and rerun the build command: finished shards are kept)"]
    members: dict[tuple[int, int], _Member] = {}
    paths, problems = [], []
    for s, rec in enumerate(man["shards"]):
        tar = root / "shards" / rec["tar"]
        paths.append(tar)
        try:
            size = tar.stat().st_size
        except FileNotFoundError:
            problems.append(f"shard {rec['tar']} is missing")
            size = None
        if size is not None and size != rec["bytes"]:
            kind = "truncated" if size < rec["bytes"] else "longer than recorded"
            problems.append(f"shard {rec['tar']} is {kind}: {size} bytes, the manifest records {rec['bytes']}")
        index, err = _read_json(root / "shards" / rec["index"], "shard index", rec.get("index_sha256"))
        if err is not None:
            problems.append(err)
            continue
        for m in index["members"]:
            members[(m["index"], m["view"])] = _Member(s, m["offset"], m["size"], m["t"], m["seed"], m.get("crc32"))
    return man, members, paths, problems


def _summary(problems: list[str], limit: int = 3) -> str:
    more = f"; and {len(problems) - limit} more" if len(problems) > limit else ""
    return "; ".join(problems[:limit]) + more


class BankReader:
    """Random access to stored views: ``view_bytes(index, view)`` returns the encoded image.

    Opening reads the manifest and the shard indexes and checks that every shard exists with its recorded
    size (a stat per shard, no data read); a damaged bank is refused with a BankError naming what is wrong.
    Every view read is checked against its crc32 (format 2): a damaged view raises BankError naming shard,
    image and view (on_bad="error"), or is returned as None (on_bad="online": the loader marks the row in
    ``batch["<view name>_ok"]`` and the trainer makes that row online).
    """

    def __init__(self, root: str | os.PathLike, *, on_bad: str = "error"):
        if on_bad not in ON_BAD:
            raise ValueError(f"on_bad must be one of {ON_BAD}, got {on_bad!r}")
        self.root, self.on_bad = Path(root), on_bad
        self.manifest, self._members, self._paths, problems = _open_bank(self.root)
        if problems:
            raise BankError(f"bank {self.root} is damaged: {_summary(problems)}; run `python -m diffaug_fast.bank "
                            "verify` for the full list, then rerun the build command to rebuild what is missing")
        self.views = int(self.manifest["views"])
        self.num_images = int(self.manifest["num_images"])
        self.bad_views: set[tuple[int, int]] = set()  # views found damaged by this process (on_bad="online")
        self._fds: dict[int, int] = {}

    def check_compatible(self, dataset_fingerprint: str, checkpoint_sha256: str | None = None) -> None:
        """Refuse a bank built from another dataset (or another checkpoint, when one is given)."""
        if self.manifest["dataset_fingerprint"] != dataset_fingerprint:
            raise BankError(f"bank {self.root} was built from another dataset (file list / labels differ: "
                            f"{self.manifest['dataset_fingerprint'][:12]} vs {dataset_fingerprint[:12]})")
        if checkpoint_sha256 is not None and self.manifest["checkpoint_sha256"] != checkpoint_sha256:
            raise BankError(f"bank {self.root} was built with another UNet checkpoint")

    def meta(self, index: int, view: int) -> _Member:
        try:
            return self._members[(index, view)]
        except KeyError:
            raise BankError(f"bank has no view {view} of image {index}") from None

    def _read(self, m: _Member) -> bytes:
        fd = self._fds.get(m.shard)
        if fd is None:
            fd = self._fds[m.shard] = os.open(self._paths[m.shard], os.O_RDONLY)
        return os.pread(fd, m.size, m.offset)

    def view_bytes(self, index: int, view: int) -> bytes | None:
        """The stored encoded view, checked against its crc32; None if damaged and on_bad="online"."""
        m = self.meta(index, view)
        try:
            data = self._read(m)
            why = (f"short read: {len(data)} of {m.size} bytes" if len(data) != m.size else
                   "checksum mismatch" if m.crc32 is not None and zlib.crc32(data) != m.crc32 else None)
        except OSError as e:
            data, why = None, f"unreadable: {e.strerror}"
        if why is None:
            return data
        where = f"bank {self.root}: shard {self._paths[m.shard].name}, image {index}, view {view}: {why}"
        if self.on_bad == "error":  # the trainer adds its flag (--bank-on-bad online) to this line
            raise BankError(f"damaged view in {where}; `python -m diffaug_fast.bank verify {self.root}` lists "
                            "every damaged view")
        if (index, view) not in self.bad_views:
            self.bad_views.add((index, view))
            warnings.warn(f"damaged view, made online instead: {where}", stacklevel=2)
        return None

    def epoch_view_bytes(self, seed: int, epoch: int, index: int) -> bytes | None:
        return self.view_bytes(index, pick_view(seed, epoch, index, self.views))

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __getstate__(self):  # picklable into loader workers: file descriptors are reopened there
        state = self.__dict__.copy()
        state["_fds"] = {}
        return state


def open_for_training(path: str | os.PathLike, index, train_root: str | os.PathLike, *,
                      unet_path: str | os.PathLike | None, image_size: int, resize_size: int,
                      t_range: tuple[int, int | None], schedule: dict | None = None,
                      on_bad: str = "error") -> BankReader:
    """The trainer's one call: open the bank at ``path`` and refuse it unless its views were made from
    exactly this training set and settings. Raises BankError with one line naming the first differing field.

    Checked in this order (cheap first): format (per-view checksums and content fingerprints, format 2),
    image_size, resize_size, t_range ((t_min, t_max); t_max None = the schedule's steps), schedule ({"name",
    "steps", "rescale_timesteps"}, when given), the UNet checkpoint's sha256 (when unet_path is given), the
    file list and labels, then the content of every source file (``source_digests``: size + 3 x 4 KiB each).
    on_bad: what reading a damaged view does, see ``BankReader``.
    """
    bank = BankReader(path, on_bad=on_bad)
    man, root = bank.manifest, bank.root
    if man.get("format_version", 1) < FORMAT_VERSION:
        raise BankError(f"bank {root} has format {man.get('format_version', 1)} (no per-view checksums or "
                        f"content fingerprints): rebuild it with this version (format {FORMAT_VERSION})")
    lo, hi = t_range
    hi = man["schedule"]["steps"] if hi is None else hi
    sched = None if schedule is None else {k: schedule[k] for k in ("name", "steps", "rescale_timesteps")}
    checks = [("image_size", man["image_size"], image_size), ("resize_size", man["resize_size"], resize_size),
              ("t_range", list(man["t_range"]), [lo, hi])]
    if sched is not None:
        checks.append(("schedule", man["schedule"], sched))
    for field, built, now in checks:
        if built != now:
            raise BankError(f"bank {root} was built with {field}={built}, training uses {now}: "
                            "rebuild the bank with these settings or train with the bank's")
    if unet_path is not None and file_sha256(unet_path) != man["checkpoint_sha256"]:
        raise BankError(f"bank {root} was built with another UNet checkpoint (sha256 "
                        f"{man['checkpoint_sha256'][:12]}, {unet_path} has another)")
    bank.check_compatible(dataset_fingerprint(index, train_root))
    digests = source_digests(list(index.files))
    if content_fingerprint(digests) != man["content_fingerprint"]:
        first = None
        try:
            stored = np.load(root / "sources.npy")
            first = next((index.files[i] for i in range(len(digests)) if stored[i] != digests[i]), None)
        except (OSError, ValueError, IndexError):
            pass
        which = f" (first: {first})" if first else ""
        raise BankError(f"bank {root} was built from other pixels: source image content differs{which}; "
                        "rebuild the bank for this dataset")
    return bank
