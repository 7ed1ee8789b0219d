"""Building a bank, along its seams: the plan (``_make_plan``, ``check_resumable``), the shards this process
still has to do (``shard_ids``, ``shards_to_do``), computing and writing one shard (``compute_shard``,
``batch_views``, ``shards._save_shard``), and the manifest written last (``_write_manifest``)."""

from __future__ import annotations

import argparse
import errno
import hashlib
import io
import json
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .. import __version__, augment, load_denoiser
from ..data import build_loader, scan_dataset
from ..distributed import World, barrier, gather_objects, init_distributed
from ..hardware import keep_freed_memory
from ..io import atomic_write_bytes
from .common import (
    BANK_KIND,
    FORMAT_VERSION,
    BankError,
    _read_json,
    content_fingerprint,
    dataset_fingerprint,
    file_sha256,
    source_digests,
    view_noise,
    view_seed,
    view_t,
)
from .compute import _backend, _encode, _to_uint8, _unet_options, unet_gflops
from .shards import _no_space, _remove_temps, _save_shard, _shard_done, bank_bytes_needed, check_out_dir


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


@dataclass
class _Job:
    """One process's part of a build: the settings, its data and UNet, the shards it still has to write, and
    the running counts the progress line, the first-batch disk check and the final throughput use."""
    args: argparse.Namespace
    w: World
    out: Path
    index: object  # data.DatasetIndex of the source images
    den: object  # the loaded denoiser
    t_range: tuple[int, int]
    n_shards: int
    todo: list[int]
    say: Callable
    views_done: int = 0
    per_view: float | None = None  # mean encoded bytes per view, measured on the first batch
    t_start: float = 0.0

    @property
    def my_images(self) -> int:
        return sum(len(shard_ids(s, len(self.index.files), self.args.shard_images)) for s in self.todo)


def shard_ids(s: int, num_images: int, shard_images: int) -> list[int]:
    """The image indices of shard s: shards cut the dataset in order, ``shard_images`` images each."""
    return list(range(s * shard_images, min(num_images, (s + 1) * shard_images)))


def shards_to_do(shards: Path, mine: list[int]) -> list[int]:
    """Of this process's shards, those not yet written whole (a resumed build skips the others)."""
    return [s for s in mine if not _shard_done(shards, s)]


def check_build_args(a: argparse.Namespace) -> None:
    """The build settings that need neither the data nor the UNet, checked before anything is read or
    written: one SystemExit line each (the rest is checked against the UNet before --out is touched)."""
    if a.views < 1:
        raise SystemExit("--views must be >= 1")
    if not 1 <= a.quality <= 100:
        raise SystemExit("--quality must lie in 1..100")
    if a.t_min < 0 or (a.t_max is not None and a.t_max <= a.t_min):
        raise SystemExit(f"--t-min {a.t_min} --t-max {a.t_max}: the views' t is drawn from [t_min, t_max), so "
                         "0 <= t_min < t_max is needed (t_max defaults to the schedule's steps)")
    if not 1 <= a.image_size <= a.resize_size:
        raise SystemExit(f"--image-size {a.image_size} --resize-size {a.resize_size}: the views are the "
                         "image_size center crop of the image resized to resize_size, so 1 <= image_size <= "
                         "resize_size is needed")
    for flag, value, low in (("--batch-size", a.batch_size, 1), ("--shard-images", a.shard_images, 1),
                             ("--workers", a.workers, 0)):
        if value < low:
            raise SystemExit(f"{flag} {value}: must be >= {low}")


def build_bank(args: argparse.Namespace) -> dict | None:
    """Build, or resume building, the bank ``args.out`` (the CLI's build arguments), images split across the
    torchrun processes by shard. Returns the manifest on rank 0, None on the others."""
    check_build_args(args)
    w = init_distributed()
    say = print if w.is_main else (lambda *a, **k: None)
    out, data = Path(args.out), Path(args.data)
    index, den = _prepare(args, w, out, data)
    t_range = (args.t_min, args.t_max or den.num_steps)
    n_shards = math.ceil(len(index.files) / args.shard_images)
    mine = [s for s in range(n_shards) if s % w.size == w.rank]
    plan = _start_or_resume(args, w, out, data, index, den, t_range, mine, say)
    job = _Job(args, w, out, index, den, t_range, n_shards, shards_to_do(out / "shards", mine), say)
    views_total = len(index.files) * args.views
    size, gflop = args.image_size, unet_gflops(den, args.image_size)
    say(f"bank: {len(index.files)} images x {args.views} views = {views_total} UNet forwards at {size}x{size}, "
        f"{gflop:.0f} GFLOP each = {gflop * views_total / 1e6:.2f} PFLOP in total; {n_shards} shards, "
        f"{n_shards - sum(_shard_done(out / 'shards', s) for s in range(n_shards))} to build, {w.size} process(es)")
    _write_shards(job)
    rates = gather_objects((job.views_done, time.perf_counter() - job.t_start))
    if not w.is_main:
        return None
    return _write_manifest(out, plan, len(index.files), n_shards, rates, w, say)


def _prepare(args: argparse.Namespace, w: World, out: Path, data: Path):
    """Check --data and --out, scan the dataset (rank 0 first: the others read its scan cache), load the UNet.
    Returns (dataset index, denoiser); a user mistake is one SystemExit line."""
    if not data.is_dir():
        raise SystemExit(f"--data {data}: no such directory")
    if w.is_main:
        check_out_dir(out)  # reads only: --out is created below, once every setting has been checked
    index = _scan(data, progress=w.is_main) if w.is_main else None
    barrier()
    if index is None:
        index = _scan(data, progress=False)  # reads the scan cache rank 0 wrote
    if w.device.type == "cpu":
        keep_freed_memory()  # big activations reuse their pages instead of faulting them in every call
    try:
        den = load_denoiser(args.unet, args.unet_preset, device=w.device, **_unet_options(args.half, args.conv_algo,
                                                                                           args.compile, w.device))
    except Exception as e:  # CheckpointError, OSError: one clear line, no traceback
        raise SystemExit(f"--unet {args.unet}: {e}") from None
    _check_against_unet(args, den)
    if w.is_main:
        (out / "shards").mkdir(parents=True, exist_ok=True)
    return index, den


def _scan(data: Path, progress: bool):
    try:
        return scan_dataset(data, progress=progress)
    except ValueError as e:  # no class folders, or no valid image (then the scan's counts and first bad file)
        lines = [x.strip() for x in str(e).strip().splitlines()]
        msg = lines[0].removeprefix(f"{data.resolve()}: ").removeprefix(f"{os.path.abspath(data)}: ")
        msg += f" ({lines[1].split(': ', 1)[-1]}; {lines[2]})" if len(lines) > 2 else ""
        raise SystemExit(f"--data {data}: {msg}") from None


def _check_against_unet(args: argparse.Namespace, den) -> None:
    """The t range and image size the loaded UNet can take (before --out is created)."""
    steps = den.num_steps
    if args.t_max is not None and args.t_max > steps:
        raise SystemExit(f"--t-max {args.t_max}: the UNet's schedule ({den.schedule.name}) has {steps} steps, so "
                         f"t_max <= {steps} (the default) is needed")
    if args.t_min >= (args.t_max or steps):
        raise SystemExit(f"--t-min {args.t_min}: the views' t is drawn from [t_min, {args.t_max or steps}), which "
                         "is empty; lower --t-min")
    down = den.total_downsampling
    if args.image_size % down:
        raise SystemExit(f"--image-size {args.image_size}: the UNet downsamples {down}x in total, so the image size "
                         f"must be a multiple of {down} (e.g. {max(down, args.image_size // down * down)})")


def _start_or_resume(args, w: World, out: Path, data: Path, index, den, t_range, mine: list[int],
                     say: Callable) -> dict | None:
    """Remove the temporaries a killed build left, then on rank 0 fingerprint the sources and either write
    the plan (a new build) or check it equals the one in ``out`` (a resume). Returns the plan on rank 0."""
    shards = out / "shards"
    plan = None
    if w.is_main:
        _remove_temps(out, shards, mine)
        try:
            digests = source_digests(list(index.files), progress=args.progress)
        except BankError as e:
            raise SystemExit(f"--data {data}: {e}") from None
        plan = _make_plan(args, data, index, den, t_range, content_fingerprint(digests))
        if (out / "plan.json").exists():
            check_resumable(out, plan)
            say(f"resuming the build in {out}")
        else:
            atomic_write_bytes(_npy_bytes(digests), out / "sources.npy")
            atomic_write_bytes(json.dumps(plan, indent=1).encode(), out / "plan.json")
    barrier()
    if not w.is_main:
        _remove_temps(None, shards, mine)
    return plan


def check_resumable(out: Path, plan: dict) -> None:
    """Refuse to resume into ``out`` unless its plan.json has this format and equals ``plan`` (the package
    version aside): one SystemExit line naming the differing settings."""
    old, err = _read_json(out / "plan.json", "plan")
    if (old or {}).get("format_version", 1) != FORMAT_VERSION:
        raise SystemExit(f"{out} holds a bank build of format {(old or {}).get('format_version', 1)}; this "
                         f"version writes format {FORMAT_VERSION}: use another --out (or delete that one)")
    diff = sorted(k for k in plan if k != "package_version" and (old or {}).get(k) != plan[k])
    if diff:
        raise SystemExit(f"{out} holds a build started with other settings ({', '.join(diff)} differ): "
                         "use another --out, or the original settings to resume")


def _write_shards(job: _Job) -> None:
    """Write the job's shards in order. SIGTERM/SIGINT finish the shard being written, then exit 128 + signal
    (finished shards are kept); a full disk is one SystemExit line saying how much is still to write."""
    args = job.args
    stop = {"sig": None}
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.__setitem__("sig", signum))
    pool = ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1)))
    bar = tqdm(total=job.my_images * args.views, unit="view", desc=f"rank {job.w.rank}",
               disable=not job.w.is_main or not args.progress)
    job.t_start = time.perf_counter()
    for n_done, s in enumerate(job.todo):
        ids, members, meta = compute_shard(job, s, pool, bar)
        try:
            _save_shard(job.out / "shards", s, ids, members, meta)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            left = sum(len(shard_ids(q, len(job.index.files), args.shard_images)) for q in job.todo[n_done:])
            need = bank_bytes_needed(job.per_view or 0, left * args.views, len(job.todo) - n_done)
            raise _no_space(job.out, s, need) from None
        if args.stop_after_shards is not None and n_done + 1 == args.stop_after_shards:
            os.kill(os.getpid(), signal.SIGTERM)
        if stop["sig"] is not None:
            bar.close()
            job.say(f"\ninterrupted after shard {s}: finished shards are kept; rerun the same command to resume")
            sys.exit(128 + stop["sig"])
    bar.close()


def compute_shard(job: _Job, s: int, pool: ThreadPoolExecutor, bar: tqdm) -> tuple[list[int], list, list]:
    """All K views of shard s's images, encoded: (image ids, [(tar member name, bytes)], [index entry per
    view without its offset/size/crc32]), members ordered by batch, then view, then image."""
    args = job.args
    ids = shard_ids(s, len(job.index.files), args.shard_images)
    loader = build_loader(job.index.subset(ids), "val", batch_size=args.batch_size, backend=args.loader,
                          output="uint8", crop_size=args.image_size, resize_size=args.resize_size,
                          num_workers=args.workers)
    members, meta = [], []
    for batch in loader:
        img = batch["image"]  # uint8 [B, H, W, 3], the Resize + CenterCrop view
        gidx = [ids[j] for j in batch["index"].tolist()]
        x = img.to(job.w.device).permute(0, 3, 1, 2).float() / 127.5 - 1
        for v in range(args.views):
            mem, met = batch_views(x, gidx, v, job.den, seed=args.seed, t_range=job.t_range,
                                   fmt="png" if args.lossless else "jpeg", quality=args.quality, pool=pool)
            members += mem
            meta += met
            bar.update(len(gidx))
            job.views_done += len(gidx)
        if job.per_view is None:
            job.per_view = sum(len(m[1]) for m in members) / len(members)
            _check_disk(job)
    return ids, members, meta


def batch_views(x: torch.Tensor, gidx: list[int], v: int, den, *, seed: int, t_range: tuple[int, int], fmt: str,
                quality: int, pool: ThreadPoolExecutor) -> tuple[list, list]:
    """View v of a batch: x float [B, 3, S, S] in [-1, 1] on the UNet's device, images ``gidx``; each image's
    x0 estimate at its own t and noise seed (``view_t``, ``view_seed`` of the bank seed), encoded as fmt
    ("jpeg" at ``quality``, or "png").
    Returns ([(member name, bytes)], [{"index", "view", "t", "seed"}]), one each per image."""
    seeds = [view_seed(seed, i, v) for i in gidx]
    ts = torch.tensor([view_t(seed, i, v, t_range) for i in gidx], device=x.device)
    noise = torch.cat([view_noise(sd, (1, *x.shape[1:])) for sd in seeds]).to(x.device)
    x0 = augment(x, den, t=ts, noise=noise)
    encoded = list(pool.map(lambda a: _encode(a, fmt, quality), _to_uint8(x0)))
    members, meta = [], []
    for i, sd, t, data_ in zip(gidx, seeds, ts.tolist(), encoded):
        members.append((f"{i:08d}.{v}.{'png' if fmt == 'png' else 'jpg'}", data_))
        meta.append({"index": i, "view": v, "t": t, "seed": sd})
    return members, meta


def _check_disk(job: _Job) -> None:
    """After the first batch: say the measured rate, time and size, and stop before writing anything when
    this process's shards (views, tar headers and indexes, +5%) will not fit on the disk."""
    args, views_total = job.args, len(job.index.files) * job.args.views
    rate = job.views_done / (time.perf_counter() - job.t_start)
    need = bank_bytes_needed(job.per_view, job.my_images * args.views, len(job.todo)) * 1.05
    free = shutil.disk_usage(job.out).free
    job.say(f"  measured {rate:.2f} views/s on rank 0 (first batch, warm-up included): about "
            f"{views_total / rate / job.w.size / 3600:.2f} h for the bank; ~{job.per_view / 1024:.0f} KiB per view, "
            f"~{bank_bytes_needed(job.per_view, views_total, job.n_shards) / 2**30:.2f} GiB in all with tar and "
            "index overhead")
    if need > free:
        raise SystemExit(f"not enough disk in {job.out}: this process needs ~{need / 2**30:.3f} GiB "
                         f"(views, tar headers and indexes), {free / 2**30:.3f} GiB free")


def _write_manifest(out: Path, plan: dict, num_images: int, n_shards: int, rates: list[tuple[int, float]],
                    w: World, say: Callable) -> dict:
    """Rank 0, once every process has finished: check every shard is there, then write manifest.json last
    (the plan, per-shard records, throughput of this run from ``rates``: (views, seconds) per process)."""
    shards = out / "shards"
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
                "bytes_per_image": sum(r["bytes"] for r in records) / num_images,
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
