"""Building a bank: the plan (and resume check), the shards this process still has to do, writing them."""

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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .. import __version__, augment, load_denoiser
from ..distributed import barrier, gather_objects, init_distributed
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


def build_bank(args: argparse.Namespace) -> dict | None:
    from ..data import build_loader, scan_dataset

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
