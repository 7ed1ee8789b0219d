"""The bank folder on disk while it is built: atomic shard writes, which shards are done, refusing an
``--out`` that is not ours, leftover temporaries, and the disk a bank needs."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tarfile
import zlib
from pathlib import Path

from ..io import atomic_write_bytes
from .common import BANK_KIND, _read_json, file_sha256


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
