"""``verify_bank``: every check there is, a sample of views recomputed, and ``--repair``."""

from __future__ import annotations

import hashlib
import io
import math
import os
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .. import augment, load_denoiser
from ..data import build_loader, scan_dataset
from .common import (
    BankError,
    content_fingerprint,
    dataset_fingerprint,
    file_sha256,
    source_digests,
    view_noise,
    view_seed,
    view_t,
)
from .compute import _to_uint8, _unet_options
from .reader import BankReader, _Member, _open_bank


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
    damaged = _damaged_shards(man, members, paths, problems)
    if repair and damaged:
        problems.append(_repair(root, damaged))
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


def _damaged_shards(man: dict, members: dict, paths: list[Path], problems: list[str]) -> list[dict]:
    """Read every shard whole (``_check_shard_views``); return the manifest records of the damaged ones
    (missing, truncated, index unreadable, or a view that fails its checks), adding what was found to
    ``problems`` (``_open_bank`` already reported the first three kinds)."""
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
    return damaged


def _repair(root: Path, damaged: list[dict]) -> str:
    """Delete the damaged shards (tar and index) and manifest.json: rerunning the build command then
    rebuilds exactly those. Returns the line that says so."""
    for rec in damaged:
        for name in (rec["tar"], rec["index"]):
            (root / "shards" / name).unlink(missing_ok=True)
    (root / "manifest.json").unlink(missing_ok=True)
    return (f"repair: removed {len(damaged)} damaged shard(s) ({', '.join(r['tar'] for r in damaged)}) "
            "and manifest.json; rerun the build command with its original settings to rebuild them")


def _recompute_sample(root: Path, man: dict, result: dict, *, sample: int, loader: str, seed: int) -> list[str]:
    """Recompute ``sample`` random views from the bank's sources and compare them with the stored ones;
    records "recomputed" and "min_psnr_db" in ``result`` and returns the problems found."""
    index, problem = _unchanged_sources(man)
    if problem is not None:
        return [problem]
    den = load_denoiser(man["checkpoint"], man["unet"] if man["unet"] != "custom" else None,
                        **_unet_options(man["half"], man["conv_algo"], False, torch.device("cpu"),
                                        man.get("fused_norm", False)))
    reader = BankReader(root)
    rng = np.random.default_rng(seed)
    picks = sorted({(int(rng.integers(reader.num_images)), int(rng.integers(reader.views))) for _ in range(sample)})
    threads = torch.get_num_threads()
    torch.set_num_threads(man["build"]["threads"])
    worst, problems = [], []
    try:
        for i, v in picks:
            ref = _recompute_view(index, man, den, i, v, loader)
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


def _unchanged_sources(man: dict):
    """(dataset index, None) when the bank's source folder and checkpoint are still what it was built
    from, else (None or the index, one line saying what changed)."""
    try:
        index = scan_dataset(man["dataset"], progress=False)
    except (OSError, ValueError) as e:
        return None, f"cannot scan the source dataset {man['dataset']}: {e}"
    if dataset_fingerprint(index, man["dataset"]) != man["dataset_fingerprint"]:
        return index, f"the dataset at {man['dataset']} changed since the bank was built (file list or labels)"
    try:
        if "content_fingerprint" in man and content_fingerprint(source_digests(index.files)) != man["content_fingerprint"]:
            return index, f"the dataset at {man['dataset']} changed since the bank was built (image content)"
        if file_sha256(Path(man["checkpoint"])) != man["checkpoint_sha256"]:
            return index, f"the checkpoint at {man['checkpoint']} changed since the bank was built"
    except (OSError, BankError) as e:
        return index, f"cannot read the bank's sources: {e}"
    return index, None


def _recompute_view(index, man: dict, den, i: int, v: int, loader: str) -> np.ndarray:
    """View v of image i as the build made it: uint8 [H, W, 3], on the CPU."""
    # Recompute each view inside the very batch it was built in: a conv's rounding depends on the batch
    # size, and at t ~ 999 the x0 step multiplies eps rounding by ~157 (docs/method.md).
    ids = _build_batch_of(i, man)
    backend = man.get("loader", "auto") if loader == "auto" else loader  # the build's own decoder
    batch = next(iter(build_loader(index.subset(ids), "val", batch_size=len(ids), backend=backend,
                                   output="uint8", crop_size=man["image_size"],
                                   resize_size=man["resize_size"], num_workers=1)))
    x = batch["image"].permute(0, 3, 1, 2).float() / 127.5 - 1
    ts = torch.tensor([view_t(man["seed"], j, v, tuple(man["t_range"])) for j in ids])
    noise = torch.cat([view_noise(view_seed(man["seed"], j, v), tuple(x[:1].shape)) for j in ids])
    return _to_uint8(augment(x, den, t=ts, noise=noise))[ids.index(i)]
