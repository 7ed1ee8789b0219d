"""The DiffAug view bank: pay the UNet once, train at baseline speed.

    python -m diffaug_fast.bank build --data DIR --unet CKPT --views K --out BANK
    torchrun --nproc-per-node N -m diffaug_fast.bank build ...        (images split across ranks)
    python -m diffaug_fast.bank verify BANK

One UNet forward costs ~70 ResNet-50 training steps (SPEC section 3), so DiffAug online on every image
cannot run near baseline throughput. The bank stores K DiffAug views of every training image, each the
x0 estimate of the image's Resize(256) + CenterCrop(224) at its own uniformly drawn t with its own noise
seed; the trainer then reads one stored view per image and epoch like an ordinary JPEG.

Layout of BANK:
    plan.json                    the settings the build was started with (a resume must match them), with
                                 what the views depend on: file list, source content fingerprint, checkpoint
                                 sha256, schedule, t range, image and resize size
    sources.npy                  uint64 [N] content digest per source image (size + 3 x 4 KiB samples)
    shards/shard-00000.tar       uncompressed tar, members "<index:08d>.<view>.jpg|png" (webdataset naming)
    shards/shard-00000.json      its index: sha256, bytes, and per member (index, view, t, seed, offset, size, crc32)
    manifest.json                written last: the plan, per-shard sha256 / bytes / index sha256, throughput

Every shard is written to a temporary name, fsynced and renamed, then its index is written the same
way: an interrupted build leaves only complete shards and resumes without redoing them; the next run
removes the temporary files a SIGKILL left. Opening checks every shard's presence and size; every view
read is checked against its crc32 (``BankReader``); ``open_for_training`` refuses a bank whose sources,
geometry, t range, schedule or checkpoint differ from the training run's.

A view is exactly recomputable: ``augment(x, denoiser, t=t, generator=torch.Generator().manual_seed(seed))``
on the image's [1, 3, 224, 224] view, noise drawn on the CPU generator.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import io
import json
import math
import os
import re
import shutil
import signal
import sys
import tarfile
import time
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from . import __version__, augment, load_denoiser
from .distributed import barrier, gather_objects, init_distributed
from .hardware import fast_half_dtype, keep_freed_memory
from .io import atomic_write_bytes

__all__ = ["view_seed", "view_t", "view_noise", "pick_view", "BankReader", "build_bank", "verify_bank", "BankError",
           "dataset_fingerprint", "file_sha256", "open_for_training", "source_digests", "content_fingerprint",
           "check_out_dir", "bank_bytes_needed"]

SHARD_IMAGES = 256  # images per shard: ~40 MB of JPEG views at K=4, small enough to redo on resume
# 2: per-view crc32 in the shard indexes, index sha256 and content fingerprint of the sources in the manifest
FORMAT_VERSION = 2
BANK_KIND = "diffaug_fast view bank"  # plan.json's marker: a folder holding it is ours to resume into


class BankError(RuntimeError):
    """A bank that is incomplete, corrupt, or was built from other data or another checkpoint."""


# ---------------------------------------------------------------------------------------------------- seeds


def _hash64(*parts) -> int:
    h = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1  # < 2**63: a valid torch seed


def view_seed(bank_seed: int, index: int, view: int) -> int:
    """The noise seed of view ``view`` of image ``index``."""
    return _hash64("noise", bank_seed, index, view)


def view_t(bank_seed: int, index: int, view: int, t_range: tuple[int, int]) -> int:
    """The diffusion time of a view: uniform over [lo, hi), independent of its noise seed."""
    lo, hi = t_range
    return lo + _hash64("t", bank_seed, index, view) % (hi - lo)


def view_noise(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """N(0, 1) noise of one view, drawn on the CPU generator (the same on every machine)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def pick_view(seed: int, epoch: int, index: int, views: int) -> int:
    """The view image ``index`` trains on in ``epoch``: a random permutation of the K views per block of
    K epochs, so every K consecutive epochs see all K views, in an order that differs per image."""
    block, slot = divmod(epoch, views)
    perm = np.random.default_rng(_hash64("pick", seed, index, block)).permutation(views)
    return int(perm[slot])


# ---------------------------------------------------------------------------------------------------- reading


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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


def _read_json(path: Path, what: str, sha256: str | None = None) -> tuple[object, str | None]:
    """(parsed JSON, None) or (None, a one-line problem naming the file); with ``sha256``, the file's bytes
    must also hash to it."""
    try:
        raw = path.read_bytes()
        if sha256 is not None and hashlib.sha256(raw).hexdigest() != sha256:
            return None, f"{what} {path.name} was modified after the build (sha256 differs from the manifest)"
        return json.loads(raw), None
    except FileNotFoundError:
        return None, f"{what} {path.name} is missing"
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None, f"{what} {path.name} is unreadable or not JSON ({type(e).__name__}: {str(e)[:80]})"


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
        if self.on_bad == "error":
            raise BankError(f"damaged view in {where}; run `python -m diffaug_fast.bank verify {self.root}`, "
                            "or train with on_bad=online to make damaged views online")
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


def dataset_fingerprint(index, root: str | os.PathLike) -> str:
    """sha256 of the validated (relative path, label) list and the class names (names only, see
    ``content_fingerprint`` for the pixels)."""
    h = hashlib.sha256()
    h.update(json.dumps(list(index.classes)).encode())
    for f, y in zip(index.files, index.labels):
        h.update(f"{os.path.relpath(f, root)}\t{y}\n".encode())
    return h.hexdigest()


# Content fingerprint of a source file: its size and three 4 KiB samples (head, middle, tail); the whole
# file when it is <= 12 KiB. A JPEG's entropy-coded data starts within its first ~1 KiB, so another image
# under the same name differs in the samples (or the size); an in-place edit of bytes outside the samples
# that keeps the size is not seen. It runs at every trainer start, so it must be cheap. Measured on 2000
# files of 60-160 KB (ImageNet's mean is ~110 KB), page cache warm, one thread, 2-core machine under load:
# 32 us CPU per file sampled vs 107 us for a full sha256 (1.0 GB/s, SHA-NI). ImageNet (1.28 M files,
# 140 GB): sampled ~41 s CPU and 15 GB of 4 KiB reads; full sha256 ~140 s CPU and all 140 GB read on
# every start (~70 s from a 2 GB/s NVMe, ~15 min from 150 MB/s network storage, cold).
_SAMPLE = 4096


def source_digest(path: str | os.PathLike) -> bytes:
    """8-byte blake2b of a file's size and its head, middle and tail 4 KiB (all of it when small)."""
    with open(path, "rb") as f:
        fd = f.fileno()
        n = os.fstat(fd).st_size
        h = hashlib.blake2b(n.to_bytes(8, "little"), digest_size=8)
        if n <= 3 * _SAMPLE:
            h.update(f.read())
        else:
            for off in (0, n // 2 - _SAMPLE // 2, n - _SAMPLE):
                h.update(os.pread(fd, _SAMPLE, off))
    return h.digest()


def source_digests(files: list[str], *, workers: int = 8, progress: bool = False) -> np.ndarray:
    """uint64 [N] ``source_digest`` of each file (threads: the work is opens and small reads).
    Raises BankError naming the first file that cannot be read."""
    def one(path):
        try:
            return source_digest(path)
        except OSError as e:
            raise BankError(f"cannot read source image {path}: {e.strerror}") from None

    with ThreadPoolExecutor(max_workers=workers) as pool:
        digests = list(tqdm(pool.map(one, files, chunksize=256), total=len(files), disable=not progress,
                            desc="fingerprinting images", unit="img", leave=False))
    return np.frombuffer(b"".join(digests), dtype="<u8").copy()


def content_fingerprint(digests: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(digests, dtype="<u8").tobytes()).hexdigest()


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


# ---------------------------------------------------------------------------------------------------- building


def unet_gflops(denoiser, size: int) -> float:
    """Forward GFLOP per image at size x size, counted on the meta device (no compute)."""
    from torch.utils.flop_counter import FlopCounterMode

    from .unet import UNet

    with torch.device("meta"):
        model = UNet(denoiser.config)
        x = torch.zeros(1, denoiser.config.in_channels, size, size)
        t = torch.zeros(1, dtype=torch.long)
    with FlopCounterMode(display=False) as fc:
        model(x, t)
    return fc.get_total_flops() / 1e9


def _unet_options(half: bool, conv_algo: str, compile: bool, device: torch.device, fused_norm: bool = True) -> dict:
    """The fast UNet path: half precision where the device computes it natively (fp16 on GPU, bf16 on
    AMX/AVX512-BF16 CPUs), only the eps rows of the last conv, channels_last on GPU, the fused
    GroupNorm+SiLU kernel (CPU float32), optional compile. Banks built before fused_norm existed
    record none and are recomputed without it."""
    dtype = (fast_half_dtype(device) if half else None) or torch.float32
    return dict(dtype=dtype, eps_only=True, channels_last=device.type == "cuda",
                conv_algo=conv_algo if dtype == torch.float32 else "direct", compile=compile, fused_norm=fused_norm)


def _encode(img: np.ndarray, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpeg":
        Image.fromarray(img).save(buf, format="JPEG", quality=quality, subsampling=0 if quality >= 90 else 2)
    else:
        Image.fromarray(img).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _to_uint8(x0: torch.Tensor) -> np.ndarray:
    """[-1, 1] NCHW -> uint8 NHWC, rounding to nearest."""
    return ((x0.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def _write_shard(path: Path, members: list[tuple[str, bytes]]) -> list[tuple[int, int]]:
    """Write an uncompressed tar atomically; return (data offset, size) per member. A failed write (ENOSPC,
    a signal) removes its temporary file; a SIGKILL leaves it for the next run to remove."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for name, data in members:
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime, info.mode = len(data), 0, 0o644  # mtime 0: byte-identical rebuilds
                    tar.addfile(info, io.BytesIO(data))
            f.flush()
            os.fsync(f.fileno())
        with tarfile.open(tmp, "r") as tar:
            offsets = [(m.offset_data, m.size) for m in tar.getmembers()]
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return offsets


def _shard_done(shards: Path, s: int) -> bool:
    idx = shards / f"shard-{s:05d}.json"
    tar = shards / f"shard-{s:05d}.tar"
    if not (idx.is_file() and tar.is_file()):
        return False
    rec, err = _read_json(idx, "shard index")
    return err is None and isinstance(rec, dict) and rec.get("bytes") == tar.stat().st_size


_BANK_FILES = {"plan.json", "manifest.json", "shards", "sources.npy"}
_SHARD_FILE = re.compile(r"shard-\d{5}\.(tar|json)")


def _is_temp(name: str) -> bool:
    """A temporary file of ours (atomic_write_bytes / _write_shard): ".<final name>.<suffix>.tmp"."""
    return name.startswith(".") and name.endswith(".tmp")


def check_out_dir(out: Path) -> None:
    """Refuse ``--out`` unless it is absent, empty, or a (possibly unfinished) bank of ours: one line, no traceback."""
    fix = "give a new or empty folder (or the folder of the bank to resume)"
    if out.exists() and not out.is_dir():
        raise SystemExit(f"--out {out} is a file, not a folder: {fix}")
    if not out.exists():
        return
    names = {e.name for e in out.iterdir()}
    foreign = sorted(n for n in names if n not in _BANK_FILES and not _is_temp(n))
    shards = out / "shards"
    if shards.exists():
        if not shards.is_dir():
            foreign.append("shards (a file)")
        else:
            foreign += sorted(f"shards/{e.name}" for e in shards.iterdir()
                              if not (_SHARD_FILE.fullmatch(e.name) or _is_temp(e.name)))
    if foreign:
        raise SystemExit(f"--out {out} holds files that are not part of a DiffAug bank ({', '.join(foreign[:5])}"
                         f"{' ...' if len(foreign) > 5 else ''}): {fix}")
    if "plan.json" in names:
        plan, err = _read_json(out / "plan.json", "plan")
        ours = err is None and isinstance(plan, dict) and plan.get("kind") == BANK_KIND
        ours = ours or (isinstance(plan, dict) and str(plan.get("recompute", "")).startswith("augment("))  # format 1
        if not ours:
            raise SystemExit(f"--out {out}: its plan.json is not a DiffAug bank plan: {fix}")
    elif "manifest.json" in names or (shards.is_dir() and any(shards.iterdir())):
        raise SystemExit(f"--out {out} holds a manifest.json or shards but no plan.json, so it is not a bank "
                         f"this package started: {fix}")


def _remove_temps(out: Path | None, shards: Path, mine: list[int]) -> None:
    """Temporary files a killed build left (SIGKILL runs no cleanup): the bank's own files (out, rank 0
    only), and this rank's shards (other ranks may be writing theirs right now)."""
    for stale in out.glob(".*.tmp") if out is not None else ():
        stale.unlink(missing_ok=True)
    mine = set(mine)
    for stale in shards.glob(".shard-*.tmp"):
        if int(stale.name.split("-")[1].split(".")[0]) in mine:
            stale.unlink(missing_ok=True)


# tar: a 512-byte header per member, data padded to 512, 1 KiB end marker, the file padded to 10 KiB;
# the index: ~150 bytes of JSON per view; the manifest: ~300 bytes per shard
_TAR_MEMBER, _TAR_SHARD, _INDEX_VIEW, _MANIFEST_SHARD = 512 + 511, 1024 + 10240, 150, 300


def bank_bytes_needed(bytes_per_view: float, views: int, shards: int) -> float:
    """Disk bytes a bank of ``views`` stored views of ~bytes_per_view each, in ``shards`` shards, takes
    (upper bound: tar headers and padding, shard indexes and manifest included)."""
    return views * (bytes_per_view + _TAR_MEMBER + _INDEX_VIEW) + shards * (_TAR_SHARD + _MANIFEST_SHARD)


def _no_space(out: Path, s: int, need: float) -> SystemExit:
    free = shutil.disk_usage(out).free
    return SystemExit(f"no space left on the device of {out} while writing shard {s} ({free / 2**30:.2f} GiB free, "
                      f"~{need / 2**30:.2f} GiB still to write): finished shards are kept; free space and rerun the "
                      "same command to resume")


def _save_shard(shards: Path, s: int, ids: list[int], members: list, meta: list) -> None:
    """Write shard s (tar, then its index), each atomically: a kill leaves either both or a shard to redo."""
    tar_path = shards / f"shard-{s:05d}.tar"
    offsets = _write_shard(tar_path, members)
    for m, (off, sz), (_, data) in zip(meta, offsets, members, strict=True):
        m["offset"], m["size"], m["crc32"] = off, sz, zlib.crc32(data)
    atomic_write_bytes(json.dumps({"shard": s, "tar": tar_path.name, "sha256": file_sha256(tar_path),
                                   "bytes": tar_path.stat().st_size, "images": [ids[0], ids[-1]],
                                   "members": meta}).encode(), shards / f"shard-{s:05d}.json")


def _backend(name: str) -> str:
    """The data backend "auto" resolves to (as build_loader does): verify recomputes with the same one."""
    from .data import available_backends

    name = os.environ.get("DIFFAUG_DATA_BACKEND", "auto") if name == "auto" else name
    return available_backends()[0] if name == "auto" else name


def _make_plan(args, data: Path, index, den, t_range, content: str) -> dict:
    fmt = "png" if args.lossless else "jpeg"
    return {
        "kind": BANK_KIND, "format_version": FORMAT_VERSION, "package_version": __version__,
        "dataset": str(data.resolve()), "dataset_fingerprint": dataset_fingerprint(index, data),
        "content_fingerprint": content, "num_images": len(index.files),
        "classes": list(index.classes), "checkpoint": str(Path(args.unet).resolve()),
        "checkpoint_sha256": file_sha256(args.unet), "unet": den.name,
        "schedule": {"name": den.schedule.name, "steps": den.num_steps, "rescale_timesteps": den.schedule.rescale_timesteps},
        "t_range": list(t_range), "views": args.views, "seed": args.seed, "format": fmt,
        "quality": None if args.lossless else args.quality, "image_size": args.image_size,
        "resize_size": args.resize_size, "shard_images": args.shard_images, "batch_size": args.batch_size,
        "half": bool(args.half), "conv_algo": args.conv_algo, "fused_norm": True, "loader": _backend(args.loader),
        "recompute": "augment(view, denoiser, t=t, generator=torch.Generator().manual_seed(seed))",
    }


def build_bank(args: argparse.Namespace) -> dict | None:
    from .data import build_loader, scan_dataset

    w = init_distributed()
    say = print if w.is_main else (lambda *a, **k: None)
    out = Path(args.out)
    shards = out / "shards"
    data = Path(args.data)
    if not data.is_dir():
        raise SystemExit(f"--data {data}: no such directory")
    if w.is_main:
        check_out_dir(out)
        shards.mkdir(parents=True, exist_ok=True)
    index = scan_dataset(data, progress=w.is_main) if w.is_main else None
    barrier()
    if index is None:
        index = scan_dataset(data, progress=False)  # reads the scan cache rank 0 wrote
    if w.device.type == "cpu":
        keep_freed_memory()  # big activations reuse their pages instead of faulting them in every call
    try:
        den = load_denoiser(args.unet, args.unet_preset, device=w.device, **_unet_options(args.half, args.conv_algo,
                                                                                           args.compile, w.device))
    except Exception as e:  # CheckpointError, OSError: one clear line, no traceback
        raise SystemExit(f"--unet {args.unet}: {e}") from None
    size = args.image_size
    t_range = (args.t_min, args.t_max or den.num_steps)
    fmt = "png" if args.lossless else "jpeg"
    n_shards = math.ceil(len(index.files) / args.shard_images)
    mine = [s for s in range(n_shards) if s % w.size == w.rank]
    plan_path = out / "plan.json"
    if w.is_main:
        _remove_temps(out, shards, mine)
        try:
            digests = source_digests(list(index.files), progress=args.progress)
        except BankError as e:
            raise SystemExit(f"--data {data}: {e}") from None
        plan = _make_plan(args, data, index, den, t_range, content_fingerprint(digests))
        if plan_path.exists():
            old, err = _read_json(plan_path, "plan")
            if (old or {}).get("format_version", 1) != FORMAT_VERSION:
                raise SystemExit(f"{out} holds a bank build of format {(old or {}).get('format_version', 1)}; this "
                                 f"version writes format {FORMAT_VERSION}: use another --out (or delete that one)")
            diff = sorted(k for k in plan if k != "package_version" and (old or {}).get(k) != plan[k])
            if diff:
                raise SystemExit(f"{out} holds a build started with other settings ({', '.join(diff)} differ): "
                                 "use another --out, or the original settings to resume")
            say(f"resuming the build in {out}")
        else:
            atomic_write_bytes(_npy_bytes(digests), out / "sources.npy")
            atomic_write_bytes(json.dumps(plan, indent=1).encode(), plan_path)
    barrier()
    if not w.is_main:
        _remove_temps(None, shards, mine)

    todo = [s for s in mine if not _shard_done(shards, s)]
    views_total = len(index.files) * args.views
    gflop = unet_gflops(den, size)
    say(f"bank: {len(index.files)} images x {args.views} views = {views_total} UNet forwards at {size}x{size}, "
        f"{gflop:.0f} GFLOP each = {gflop * views_total / 1e6:.2f} PFLOP in total; {n_shards} shards, "
        f"{n_shards - sum(_shard_done(shards, s) for s in range(n_shards))} to build, {w.size} process(es)")

    stop = {"sig": None}
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.__setitem__("sig", signum))
    pool = ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1)))
    my_images = sum(len(range(s * args.shard_images, min(len(index.files), (s + 1) * args.shard_images)))
                    for s in todo)
    bar = tqdm(total=my_images * args.views, unit="view", desc=f"rank {w.rank}", disable=not w.is_main or not args.progress)
    t_start, views_done, per_view = time.perf_counter(), 0, None
    for n_done, s in enumerate(todo):
        ids = list(range(s * args.shard_images, min(len(index.files), (s + 1) * args.shard_images)))
        loader = build_loader(index.subset(ids), "val", batch_size=args.batch_size, backend=args.loader,
                              output="uint8", crop_size=size, resize_size=args.resize_size, num_workers=args.workers)
        members, meta = [], []
        for batch in loader:
            img = batch["image"]  # uint8 [B, H, W, 3], the Resize + CenterCrop view
            gidx = [ids[j] for j in batch["index"].tolist()]
            x = img.to(w.device).permute(0, 3, 1, 2).float() / 127.5 - 1
            for v in range(args.views):
                seeds = [view_seed(args.seed, i, v) for i in gidx]
                ts = torch.tensor([view_t(args.seed, i, v, t_range) for i in gidx], device=w.device)
                noise = torch.cat([view_noise(sd, (1, 3, size, size)) for sd in seeds]).to(w.device)
                x0 = augment(x, den, t=ts, noise=noise)
                encoded = list(pool.map(lambda a: _encode(a, fmt, args.quality), _to_uint8(x0)))
                for i, sd, t, data_ in zip(gidx, seeds, ts.tolist(), encoded):
                    members.append((f"{i:08d}.{v}.{'png' if fmt == 'png' else 'jpg'}", data_))
                    meta.append({"index": i, "view": v, "t": t, "seed": sd})
                bar.update(len(gidx))
                views_done += len(gidx)
            if per_view is None:
                per_view = sum(len(m[1]) for m in members) / len(members)
                rate = views_done / (time.perf_counter() - t_start)
                need = bank_bytes_needed(per_view, my_images * args.views, len(todo)) * 1.05
                free = shutil.disk_usage(out).free
                say(f"  measured {rate:.2f} views/s on rank 0 (first batch, warm-up included): about "
                    f"{views_total / rate / w.size / 3600:.2f} h for the bank; ~{per_view / 1024:.0f} KiB per view, "
                    f"~{bank_bytes_needed(per_view, views_total, n_shards) / 2**30:.2f} GiB in all with tar and "
                    "index overhead")
                if need > free:
                    raise SystemExit(f"not enough disk in {out}: this process needs ~{need / 2**30:.3f} GiB "
                                     f"(views, tar headers and indexes), {free / 2**30:.3f} GiB free")
        try:
            _save_shard(shards, s, ids, members, meta)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            left = sum(len(range(q * args.shard_images, min(len(index.files), (q + 1) * args.shard_images)))
                       for q in todo[n_done:]) * args.views
            raise _no_space(out, s, bank_bytes_needed(per_view or 0, left, len(todo) - n_done)) from None
        if args.stop_after_shards is not None and n_done + 1 == args.stop_after_shards:
            os.kill(os.getpid(), signal.SIGTERM)
        if stop["sig"] is not None:
            bar.close()
            say(f"\ninterrupted after shard {s}: finished shards are kept; rerun the same command to resume")
            sys.exit(128 + stop["sig"])
    bar.close()
    seconds = time.perf_counter() - t_start
    rates = gather_objects((views_done, seconds))
    if not w.is_main:
        return None
    records = []
    for s in range(n_shards):
        if not _shard_done(shards, s):
            raise SystemExit(f"shard {s} is missing after the build: rerun the same command to finish it")
        ipath = shards / f"shard-{s:05d}.json"
        raw = ipath.read_bytes()
        rec = json.loads(raw)
        records.append({"tar": rec["tar"], "index": ipath.name, "sha256": rec["sha256"], "bytes": rec["bytes"],
                        "images": rec["images"], "index_sha256": hashlib.sha256(raw).hexdigest()})
    total_views = sum(v for v, _ in rates)
    wall = max(sec for _, sec in rates) or float("nan")
    manifest = {**plan, "shards": records, "total_bytes": sum(r["bytes"] for r in records),
                "bytes_per_image": sum(r["bytes"] for r in records) / len(index.files),
                "build": {"views_this_run": total_views, "seconds": wall, "views_per_s": total_views / wall,
                          "processes": w.size, "device": str(w.device), "threads": torch.get_num_threads()}}
    try:
        atomic_write_bytes(json.dumps(manifest, indent=1).encode(), out / "manifest.json")
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise SystemExit(f"no space left on the device of {out} for manifest.json: all shards are kept; free "
                         "space and rerun the same command to finish") from None
    say(f"bank complete: {out} ({manifest['total_bytes'] / 2**20:.1f} MiB, "
        f"{manifest['bytes_per_image'] / 1024:.0f} KiB per image); this run {total_views} views in {wall:.1f} s "
        f"= {total_views / wall:.2f} views/s")
    return manifest


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------- verify


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


def _build_batch_of(i: int, man: dict) -> list[int]:
    """The image indices of the build batch that held image i (shards are cut in order, then batches)."""
    per, bs = man["shard_images"], man["batch_size"]
    first = i // per * per
    start = first + (i - first) // bs * bs
    return list(range(start, min(start + bs, first + per, man["num_images"])))


def _check_shard_views(path: Path, rec: dict, views: list[tuple[tuple[int, int], _Member]]) -> list[str]:
    """Read one shard whole: its sha256, then every view's crc32 and the tar header naming the view at its
    offset (an index with swapped offsets points a view at another view's bytes)."""
    data = path.read_bytes()
    problems = []
    if hashlib.sha256(data).hexdigest() != rec["sha256"]:
        problems.append(f"checksum mismatch in shard {path.name} (sha256 differs from the manifest)")
    bad = []
    for (i, v), m in views:
        name = data[max(0, m.offset - 512): max(0, m.offset - 512) + 100].split(b"\0")[0].decode(errors="replace")
        if m.offset < 512 or not name.startswith(f"{i:08d}.{v}."):
            bad.append(f"image {i}, view {v}: the index points at tar member {name!r} (index offsets wrong)")
        elif m.crc32 is not None and zlib.crc32(data[m.offset: m.offset + m.size]) != m.crc32:
            bad.append(f"image {i}, view {v}: checksum mismatch")
    problems += [f"shard {path.name}, {b}" for b in bad[:5]]
    if len(bad) > 5:
        problems.append(f"shard {path.name}: {len(bad) - 5} more damaged views")
    return problems


def verify_bank(root: str | os.PathLike, *, sample: int = 4, recompute: bool = True, loader: str = "auto",
                seed: int = 0, repair: bool = False) -> dict:
    """Every check there is, all problems in one list: manifest and shard indexes readable, every shard
    present with its size and sha256, every view's crc32 and tar header (catches swapped index offsets
    without sampling), coverage (every image has K views), then a sample of views recomputed and compared.
    Raises BankError listing every problem (one per line), else returns a summary dict.

    Each sampled view is recomputed in its build batch with the build's thread count, on the CPU: lossless
    banks built on a CPU must match exactly, JPEG banks must reach PSNR >= 40 dB (a bank built on a GPU is
    held to the 40 dB bound either way: other kernels round differently).

    repair: delete every damaged shard (tar and index) and manifest.json, so that rerunning the build
    command with its original settings rebuilds exactly those shards (the error says which were removed).
    """
    root = Path(root)
    man, members, paths, problems = _open_bank(root)
    if man is None:
        raise BankError(problems[0])
    by_shard: dict[int, list] = {}
    for key, m in members.items():
        by_shard.setdefault(m.shard, []).append((key, m))
    damaged = []
    for s, (rec, path) in enumerate(zip(man["shards"], paths)):
        if not (path.is_file() and path.stat().st_size == rec["bytes"]) or s not in by_shard:
            damaged.append(rec)  # missing, truncated, or its index unreadable: reported by _open_bank
            continue
        found = _check_shard_views(path, rec, sorted(by_shard[s]))
        if found:
            damaged.append(rec)
            problems += found
    if repair and damaged:
        for rec in damaged:
            for name in (rec["tar"], rec["index"]):
                (root / "shards" / name).unlink(missing_ok=True)
        (root / "manifest.json").unlink(missing_ok=True)
        problems.append(f"repair: removed {len(damaged)} damaged shard(s) ({', '.join(r['tar'] for r in damaged)}) "
                        "and manifest.json; rerun the build command with its original settings to rebuild them")
    views = int(man["views"])
    missing = [(i, v) for i in range(int(man["num_images"])) for v in range(views) if (i, v) not in members]
    if missing:
        problems.append(f"{len(missing)} views missing from the shard indexes, e.g. (image, view) {missing[:4]}")
    result = {"shards": len(man["shards"]), "views": int(man["num_images"]) * views,
              "checksums": "ok", "coverage": "ok"}
    if recompute and sample and not problems:
        problems += _recompute_sample(root, man, result, sample=sample, loader=loader, seed=seed)
    if problems:
        raise BankError("\n  ".join(problems))
    return result


def _recompute_sample(root: Path, man: dict, result: dict, *, sample: int, loader: str, seed: int) -> list[str]:
    from .data import build_loader, scan_dataset

    try:
        index = scan_dataset(man["dataset"], progress=False)
    except (OSError, ValueError) as e:
        return [f"cannot scan the source dataset {man['dataset']}: {e}"]
    if dataset_fingerprint(index, man["dataset"]) != man["dataset_fingerprint"]:
        return [f"the dataset at {man['dataset']} changed since the bank was built (file list or labels)"]
    try:
        if "content_fingerprint" in man and content_fingerprint(source_digests(index.files)) != man["content_fingerprint"]:
            return [f"the dataset at {man['dataset']} changed since the bank was built (image content)"]
        if file_sha256(Path(man["checkpoint"])) != man["checkpoint_sha256"]:
            return [f"the checkpoint at {man['checkpoint']} changed since the bank was built"]
    except (OSError, BankError) as e:
        return [f"cannot read the bank's sources: {e}"]
    den = load_denoiser(man["checkpoint"], man["unet"] if man["unet"] != "custom" else None,
                        **_unet_options(man["half"], man["conv_algo"], False, torch.device("cpu"),
                                        man.get("fused_norm", False)))
    reader = BankReader(root)
    rng = np.random.default_rng(seed)
    picks = sorted({(int(rng.integers(reader.num_images)), int(rng.integers(reader.views))) for _ in range(sample)})
    # Recompute each view inside the very batch it was built in: a conv's rounding depends on the batch
    # size, and at t ~ 999 the x0 step multiplies eps rounding by ~157 (SPEC section 1).
    threads = torch.get_num_threads()
    torch.set_num_threads(man["build"]["threads"])
    worst, problems = [], []
    try:
        for i, v in picks:
            ids = _build_batch_of(i, man)
            backend = man.get("loader", "auto") if loader == "auto" else loader  # the build's own decoder
            batch = next(iter(build_loader(index.subset(ids), "val", batch_size=len(ids), backend=backend,
                                           output="uint8", crop_size=man["image_size"],
                                           resize_size=man["resize_size"], num_workers=1)))
            x = batch["image"].permute(0, 3, 1, 2).float() / 127.5 - 1
            ts = torch.tensor([view_t(man["seed"], j, v, tuple(man["t_range"])) for j in ids])
            noise = torch.cat([view_noise(view_seed(man["seed"], j, v), tuple(x[:1].shape)) for j in ids])
            ref = _to_uint8(augment(x, den, t=ts, noise=noise))[ids.index(i)]
            stored = np.asarray(Image.open(io.BytesIO(reader.view_bytes(i, v))).convert("RGB"))
            p = psnr(stored, ref)
            exact = man["format"] == "png" and not man["build"]["device"].startswith("cuda")
            if exact and p != float("inf"):
                problems.append(f"view {v} of image {i} differs from its recomputation (PSNR {p:.1f} dB)")
            elif p < 40:
                problems.append(f"view {v} of image {i}: PSNR {p:.1f} dB against its recomputation (< 40 dB)")
            worst.append(p)
    finally:
        torch.set_num_threads(threads)
    result["recomputed"] = len(picks)
    result["min_psnr_db"] = min(worst)
    return problems


# ---------------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None):
    p = argparse.ArgumentParser(prog="python -m diffaug_fast.bank", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build (or resume building) a bank")
    b.add_argument("--data", required=True, help="class-folder training set (the trainer's DATA/train)")
    b.add_argument("--unet", required=True)
    b.add_argument("--unet-preset", default=None)
    b.add_argument("--views", type=int, default=4)
    b.add_argument("--out", required=True)
    # q98: the views carry diffusion noise, which JPEG keeps poorly; measured on DiffAug views of the sample
    # images (64 px): min PSNR 35.8 dB at q95, 40.1 at q97, 43.1 at q98 (+32% bytes vs q95), 50.5 at q100
    b.add_argument("--quality", type=int, default=98, help="JPEG quality (default 98: >= 40 dB PSNR)")
    b.add_argument("--lossless", action="store_true", help="store PNG instead of JPEG")
    b.add_argument("--t-min", type=int, default=0)
    b.add_argument("--t-max", type=int, default=None)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--image-size", type=int, default=224)
    b.add_argument("--resize-size", type=int, default=256)
    b.add_argument("--batch-size", type=int, default=32)
    b.add_argument("--shard-images", type=int, default=SHARD_IMAGES)
    b.add_argument("--half", action=argparse.BooleanOptionalAction, default=True,
                   help="half-precision UNet where the device computes it natively (fp16 GPU, bf16 AMX CPU)")
    b.add_argument("--conv-algo", choices=("direct", "winograd"), default="direct",
                   help="float32 convolutions on CPU: winograd measured 1.76x faster on adm256 at 224")
    b.add_argument("--compile", action="store_true", help="torch.compile the UNet (one compile per batch size)")
    b.add_argument("--loader", default="auto")
    b.add_argument("--workers", type=int, default=2)
    b.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    b.add_argument("--stop-after-shards", type=int, default=None, help=argparse.SUPPRESS)  # tests the resume path
    v = sub.add_parser("verify", help="checksums, coverage and recomputed samples")
    v.add_argument("bank")
    v.add_argument("--sample", type=int, default=4)
    v.add_argument("--no-recompute", action="store_true")
    v.add_argument("--loader", default="auto")
    v.add_argument("--repair", action="store_true",
                   help="delete damaged shards and the manifest; rerunning the build command then rebuilds them")
    a = p.parse_args(argv)
    if a.cmd == "build":
        if a.views < 1:
            raise SystemExit("--views must be >= 1")
        if not 1 <= a.quality <= 100:
            raise SystemExit("--quality must lie in 1..100")
        return build_bank(a)
    try:
        res = verify_bank(a.bank, sample=a.sample, recompute=not a.no_recompute, loader=a.loader, repair=a.repair)
    except BankError as e:
        raise SystemExit(f"verify failed: {e}") from None
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
