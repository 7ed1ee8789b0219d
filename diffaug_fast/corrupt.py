"""Write an ImageNet-C style corrupted copy of an image-folder tree (``diffaug_fast.data.corruptions``).

    python -m diffaug_fast.corrupt SRC DST [--corruptions all|standard|validation|NAME,...] [--severities 1-5]
        [--constants auto|cifar|imagenet] [--seed 0] [--workers N] [--overwrite]

SRC holds one folder per class (ImageFolder; JPEG and PNG files, as ``scan_dataset`` accepts). DST gets
``DST/<corruption>/<severity>/<class>/<stem>.png``, the layout ``evaluate_corruptions`` reads: PNG, so the
noise is stored as made. jpeg_compression is stored as ``<stem>.jpg``, the JPEG file itself (decoding it
gives exactly ``corrupt()``'s output). Default: the 15 benchmark corruptions and the 4 validation ones, at
severities 1-5.

Deterministic and resumable: image i (its position in SRC's scanned list) at corruption c and severity s
draws from ``np.random.default_rng(derive_seed(seed, k, s, i))``, k = c's position in ``ALL_CORRUPTIONS``,
so any output can be remade alone. Each file is written to a temporary name and renamed (a kill leaves at
most hidden ``.*.tmp`` files, which readers skip); files already in DST are kept, so a rerun finishes an
interrupted one. ``DST/manifest.json`` records the settings, the constants used and the counts; a rerun
into a DST made with another seed, constants choice or file list is refused (``--overwrite`` remakes
every requested file instead).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .constants import derive_seed
from .data import scan_dataset
from .data.corruptions import (
    ALL_CORRUPTIONS,
    CORRUPTIONS,
    FAMILIES,
    SEVERITY_CONSTANTS,
    SMALL_IMAGE_MAX_SIDE,
    VALIDATION_CORRUPTIONS,
    corrupt,
    jpeg_compression_bytes,
    resolve_constants,
)
from .data.scan import worker_context
from .io import atomic_write_bytes

__all__ = ["Settings", "parse_args", "parse_corruptions", "parse_severities", "image_seed", "output_name", "run",
           "main"]

MANIFEST = "manifest.json"
# Bumped whenever a corruption's pixels change: a DST made by another version is not resumed into.
ALGORITHM_VERSION = 1
_GROUPS = {"all": ALL_CORRUPTIONS, "standard": CORRUPTIONS, "validation": VALIDATION_CORRUPTIONS, **FAMILIES}
_CHUNK = 16  # images per job: ~16 x 5 outputs, long enough to hide the process pool's per-job overhead


@dataclass(frozen=True)
class Settings:
    """Resolved command-line settings (see ``parse_args``)."""

    src: Path
    dst: Path
    corruptions: tuple[str, ...] = ALL_CORRUPTIONS
    severities: tuple[int, ...] = (1, 2, 3, 4, 5)
    constants: str = "auto"
    seed: int = 0
    workers: int = 0
    overwrite: bool = False
    progress: bool = True


def parse_corruptions(text: str) -> tuple[str, ...]:
    """Comma list of corruption names and groups (all, standard, validation, noise, blur, weather, digital)
    -> names in ``ALL_CORRUPTIONS`` order, each once. An unknown name is one SystemExit line listing them."""
    names: set[str] = set()
    for token in (t.strip() for t in text.split(",")):
        if token in _GROUPS:
            names.update(_GROUPS[token])
        elif token in ALL_CORRUPTIONS:
            names.add(token)
        else:
            raise SystemExit(f"--corruptions: unknown corruption {token!r}; known: {', '.join(ALL_CORRUPTIONS)} "
                             f"(or a group: {', '.join(_GROUPS)})")
    return tuple(n for n in ALL_CORRUPTIONS if n in names)


def parse_severities(text: str) -> tuple[int, ...]:
    """"1-5", "3", "1,3,5" or "2-4,5" -> sorted distinct ints, each in 1..5 (else one SystemExit line)."""
    out: set[int] = set()
    for token in (t.strip() for t in text.split(",")):
        lo, _, hi = token.partition("-")
        try:
            a, b = int(lo), int(hi or lo)
        except ValueError:
            raise SystemExit(f"--severities: expected a range like 1-5 or a list like 1,3,5, got {text!r}") from None
        if not (1 <= a <= 5 and 1 <= b <= 5) or a > b:
            raise SystemExit(f"--severities: {token!r} is outside 1-5 (severities are 1..5)")
        out.update(range(a, b + 1))
    return tuple(sorted(out))


def parse_args(argv: Sequence[str] | None = None) -> Settings:
    p = argparse.ArgumentParser(prog="python -m diffaug_fast.corrupt", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", metavar="SRC", help="class-folder tree of images (one sub-folder per class)")
    p.add_argument("dst", metavar="DST", help="output root: DST/<corruption>/<severity>/<class>/<stem>.png")
    p.add_argument("--corruptions", default="all",
                   help="comma list of names or groups: all (the 15 + the 4 validation ones, the default), "
                        "standard (the 15), validation (the 4), noise, blur, weather, digital")
    p.add_argument("--severities", default="1-5", help="range or list within 1-5, e.g. 1-5, 3, 1,3,5 (default 1-5)")
    p.add_argument("--constants", default="auto", choices=["auto", "cifar", "imagenet"],
                   help=f"severity tables: CIFAR-10-C's (32 px) or ImageNet-C's (224 px); auto: cifar when the "
                        f"shorter side is <= {SMALL_IMAGE_MAX_SIDE} px, else imagenet (default auto)")
    p.add_argument("--seed", type=int, default=0, help="base seed (>= 0) of every image's generator (default 0)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="worker processes (default: all cores; 0 or 1: in this process)")
    p.add_argument("--overwrite", action="store_true",
                   help="remake every requested file, and accept a DST made with other settings")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    a = p.parse_args(argv)
    if a.seed < 0:
        raise SystemExit(f"--seed must be >= 0, got {a.seed}")
    return Settings(Path(a.src), Path(a.dst), parse_corruptions(a.corruptions), parse_severities(a.severities),
                    a.constants, a.seed, max(0, a.workers), a.overwrite, a.progress)


def image_seed(seed: int, corruption: str, severity: int, index: int) -> int:
    """The seed of image ``index``'s generator at ``corruption`` and ``severity``."""
    return derive_seed(seed, ALL_CORRUPTIONS.index(corruption), severity, index)


def output_name(corruption: str, severity: int, rel: str) -> str:
    """Path under DST for the image at ``rel`` (relative to SRC: class/.../name.ext)."""
    ext = ".jpg" if corruption == "jpeg_compression" else ".png"
    return str(Path(corruption, str(severity), rel).with_suffix(ext))


@dataclass(frozen=True)
class _Job:
    """One corruption on a chunk of images, at the requested severities; items: (index, path, rel)."""

    dst: str
    corruption: str
    severities: tuple[int, ...]
    items: tuple[tuple[int, str, str], ...]
    seed: int
    constants: str
    overwrite: bool


def _run_job(job: _Job) -> tuple[int, int, list[tuple[str, str]]]:
    """Write the job's missing outputs. Returns (written, outputs of unreadable images, [(path, reason)])."""
    written, lost, failed = 0, 0, []
    for index, path, rel in job.items:
        todo = [s for s in job.severities if job.overwrite
                or not os.path.exists(os.path.join(job.dst, output_name(job.corruption, s, rel)))]
        if not todo:
            continue
        try:
            with Image.open(path) as im:
                x = np.asarray(im.convert("RGB"))
        except (OSError, ValueError, Image.DecompressionBombError) as e:  # changed or damaged since the scan
            failed.append((path, f"unreadable: {e}"))
            lost += len(todo)
            continue
        for s in todo:
            if job.corruption == "jpeg_compression":
                data = jpeg_compression_bytes(x, s, job.constants)
            else:
                rng = np.random.default_rng(image_seed(job.seed, job.corruption, s, index))
                buf = io.BytesIO()
                Image.fromarray(corrupt(x, job.corruption, s, rng, job.constants)).save(buf, format="PNG")
                data = buf.getvalue()
            atomic_write_bytes(data, os.path.join(job.dst, output_name(job.corruption, s, rel)))
            written += 1
    return written, lost, failed


def _check_paths(src: Path, dst: Path) -> None:
    if not src.exists():
        raise SystemExit(f"SRC {src}: no such directory")
    if not src.is_dir():
        raise SystemExit(f"SRC {src}: not a directory (expected one folder per class)")
    if dst.exists() and not dst.is_dir():
        raise SystemExit(f"DST {dst}: is a file, expected a directory (or a path that does not exist yet)")
    s, d = src.resolve(), dst.resolve()
    if d == s or s in d.parents:
        raise SystemExit(f"DST {dst} lies inside SRC {src}: its images would be read back as classes")


def _scan(settings: Settings):
    try:
        index = scan_dataset(settings.src, progress=settings.progress)
    except ValueError as e:  # no class folders, no readable image: the scan's first line says which
        raise SystemExit(f"SRC {settings.src}: {str(e).splitlines()[0]}") from None
    for path, reason in index.bad[:20]:
        print(f"skipping {path}: {reason}", file=sys.stderr)
    if len(index.bad) > 20:
        print(f"skipping {len(index.bad) - 20} more unreadable files (all listed in {MANIFEST})", file=sys.stderr)
    return index


def _relative_paths(index) -> list[str]:
    """Each image's path relative to SRC; two files that would write the same output are one SystemExit."""
    rels = [os.path.relpath(p, index.root) for p in index.files]
    seen: dict[str, str] = {}
    for rel in rels:
        key = str(Path(rel).with_suffix(""))
        if key in seen:
            raise SystemExit(f"SRC: {seen[key]} and {rel} would both be written as {key}.png; rename one")
        seen[key] = rel
    return rels


def _identity(settings: Settings, rels: list[str]) -> dict:
    """What the pixels in DST depend on: a rerun must match it to add to the same DST."""
    files = hashlib.sha1("\n".join(rels).encode()).hexdigest()
    return {"algorithm_version": ALGORITHM_VERSION, "seed": settings.seed, "constants": settings.constants,
            "images": len(rels), "files_sha1": files}


def _read_manifest(dst: Path) -> dict | None:
    path = dst / MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"DST {dst}: unreadable {MANIFEST} ({e}); use --overwrite or another DST") from None


def _check_resumable(settings: Settings, identity: dict, old: dict | None) -> None:
    dst = settings.dst
    if settings.overwrite:
        return
    if old is None:
        if dst.is_dir() and any(dst.iterdir()):
            raise SystemExit(f"DST {dst}: not empty and holds no {MANIFEST}; use an empty folder or --overwrite")
        return
    diff = sorted(k for k in identity if old.get("identity", {}).get(k) != identity[k])
    if diff:
        raise SystemExit(f"DST {dst} was made with other settings ({', '.join(diff)} differ); use the original "
                         "settings to resume, another DST, or --overwrite")


def _manifest(settings: Settings, identity: dict, index, tables: Counter, old: dict | None, status: str,
              counts: dict, failed: list) -> dict:
    done = {k: set(v) for k, v in (old or {}).get("complete", {}).items()} if not settings.overwrite else {}
    if status == "complete":
        for c in settings.corruptions:
            done.setdefault(c, set()).update(settings.severities)
    used = sorted(tables)
    return {
        "status": status,
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "src": str(settings.src.resolve()),
        "identity": identity,
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(settings).items()
                     if k in ("corruptions", "severities", "constants", "seed", "overwrite")},
        "complete": {c: sorted(done[c]) for c in ALL_CORRUPTIONS if c in done},
        "constants": {
            "rule": f"auto: cifar when min(H, W) <= {SMALL_IMAGE_MAX_SIDE} px, else imagenet",
            "images_per_table": dict(tables),
            "tables": {t: {c: SEVERITY_CONSTANTS[t][c] for c in settings.corruptions} for t in used},
        },
        "counts": {"classes": len(index.classes), "images": len(index.files), "bad_images": len(index.bad), **counts},
        "bad_images": [list(b) for b in index.bad],
        "failed_images": [list(f) for f in failed],
    }


def _to_json(obj, indent: str = "") -> str:
    """JSON with one key per line; a list without dicts that fits in 100 characters stays on one line
    (severities, a constants table's row), longer ones get one item per line."""
    inner = indent + " "
    if isinstance(obj, dict) and obj:
        rows = [f"{inner}{json.dumps(str(k))}: {_to_json(v, inner)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(rows) + "\n" + indent + "}"
    text = json.dumps(obj)
    if isinstance(obj, (list, tuple)) and obj and ("{" in text or len(text) > 100):
        return "[\n" + ",\n".join(inner + _to_json(v, inner) for v in obj) + "\n" + indent + "]"
    return text


def _write_manifest(dst: Path, manifest: dict) -> None:
    atomic_write_bytes((_to_json(manifest) + "\n").encode(), dst / MANIFEST)


def _execute(jobs: list[_Job], pending: int, settings: Settings) -> tuple[int, int, list]:
    """Run the jobs (in this process, or a pool of ``settings.workers``) behind one progress bar."""
    written, lost, failed = 0, 0, []
    bar = tqdm(total=pending, unit="img", desc="corrupting", disable=not settings.progress)
    with bar:
        if settings.workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                w, n, f = _run_job(job)
                written, lost = written + w, lost + n
                failed += f
                bar.update(w + n)
            return written, lost, failed
        with ProcessPoolExecutor(settings.workers, mp_context=worker_context()) as pool:
            futures = [pool.submit(_run_job, job) for job in jobs]
            try:
                for fut in as_completed(futures):
                    w, n, f = fut.result()
                    written, lost = written + w, lost + n
                    failed += f
                    bar.update(w + n)
            except BaseException:
                for fut in futures:
                    fut.cancel()
                raise
    return written, lost, failed


def run(settings: Settings) -> dict:
    """Corrupt SRC into DST as ``settings`` say; returns the manifest written to DST/manifest.json."""
    _check_paths(settings.src, settings.dst)
    index = _scan(settings)
    rels = _relative_paths(index)
    identity = _identity(settings, rels)
    old = _read_manifest(settings.dst)
    _check_resumable(settings, identity, old)
    tables = Counter(resolve_constants(h, w, settings.constants) for h, w in index.sizes)

    items = [(i, p, r) for i, (p, r) in enumerate(zip(index.files, rels))]
    dst = str(settings.dst.resolve())
    jobs, pending, present = [], 0, 0
    for c in settings.corruptions:  # corruption by corruption: whole corruption folders are finished early
        for start in range(0, len(items), _CHUNK):
            chunk = tuple(items[start : start + _CHUNK])
            todo = len(chunk) * len(settings.severities)
            if not settings.overwrite:
                todo = sum(not os.path.exists(os.path.join(dst, output_name(c, s, rel)))
                           for _, _, rel in chunk for s in settings.severities)
            present += len(chunk) * len(settings.severities) - todo
            if todo:
                pending += todo
                jobs.append(_Job(dst, c, settings.severities, chunk, settings.seed, settings.constants,
                                 settings.overwrite))
    counts = {"outputs": len(items) * len(settings.severities) * len(settings.corruptions),
              "already_present": present}
    settings.dst.mkdir(parents=True, exist_ok=True)
    _write_manifest(settings.dst, _manifest(settings, identity, index, tables, old, "running", counts, []))
    try:
        written, lost, failed = _execute(jobs, pending, settings)
    except KeyboardInterrupt:
        _write_manifest(settings.dst, _manifest(settings, identity, index, tables, old, "interrupted", counts, []))
        raise SystemExit(f"interrupted: finished files are kept in {settings.dst}; rerun the command to resume") from None
    failed = sorted(set(failed))
    for path, reason in failed:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    counts.update(written=written, failed=lost)
    manifest = _manifest(settings, identity, index, tables, old, "complete", counts, failed)
    _write_manifest(settings.dst, manifest)
    return manifest


def main(argv: Sequence[str] | None = None) -> dict:
    settings = parse_args(argv)
    manifest = run(settings)
    c = manifest["counts"]
    print(f"{settings.dst}: wrote {c['written']} files, {c['already_present']} were already there, "
          f"{c['failed']} skipped ({c['images']} images, {c['bad_images']} unreadable; "
          f"tables {manifest['constants']['images_per_table']})")
    return manifest


if __name__ == "__main__":
    main()
