"""The DiffAug view bank: pay the UNet once, train at baseline speed.

    python -m diffaug_fast.bank build --data DIR --unet CKPT --views K --out BANK
    torchrun --nproc-per-node N -m diffaug_fast.bank build ...        (images split across ranks)
    python -m diffaug_fast.bank verify BANK

One UNet forward costs ~70 ResNet-50 training steps (SPEC section 3), so DiffAug online on every image
cannot run near baseline throughput. The bank stores K DiffAug views of every training image, each the
x0 estimate of the image's Resize(256) + CenterCrop(224) at its own uniformly drawn t with its own noise
seed; the trainer then reads one stored view per image and epoch like an ordinary JPEG.

Layout of BANK:
    plan.json                    the settings the build was started with (a resume must match them)
    shards/shard-00000.tar       uncompressed tar, members "<index:08d>.<view>.jpg|png" (webdataset naming)
    shards/shard-00000.json      its index: sha256, bytes, and per member (index, view, t, seed, offset, size)
    manifest.json                written last: checkpoint hash, schedule, t range, K, format, quality,
                                 package version, per-shard checksums, throughput of the build

Every shard is written to a temporary name, fsynced and renamed, then its index is written the same
way: an interrupted build leaves only complete shards and resumes without redoing them.

A view is exactly recomputable: ``augment(x, denoiser, t=t, generator=torch.Generator().manual_seed(seed))``
on the image's [1, 3, 224, 224] view, noise drawn on the CPU generator.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import shutil
import signal
import sys
import tarfile
import time
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
           "dataset_fingerprint", "file_sha256"]

SHARD_IMAGES = 256  # images per shard: ~40 MB of JPEG views at K=4, small enough to redo on resume


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


class BankReader:
    """Random access to stored views: ``view_bytes(index, view)`` returns the encoded image."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        mpath = self.root / "manifest.json"
        if not mpath.is_file():
            raise BankError(f"{self.root} is not a finished DiffAug bank (no manifest.json): build it first, "
                            "or resume an interrupted build with the same command")
        self.manifest = json.loads(mpath.read_text())
        self.views = int(self.manifest["views"])
        self.num_images = int(self.manifest["num_images"])
        self._members: dict[tuple[int, int], _Member] = {}
        self._paths = []
        for s, shard in enumerate(self.manifest["shards"]):
            self._paths.append(self.root / "shards" / shard["tar"])
            index = json.loads((self.root / "shards" / shard["index"]).read_text())
            for m in index["members"]:
                self._members[(m["index"], m["view"])] = _Member(s, m["offset"], m["size"], m["t"], m["seed"])
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

    def view_bytes(self, index: int, view: int) -> bytes:
        m = self.meta(index, view)
        fd = self._fds.get(m.shard)
        if fd is None:
            fd = self._fds[m.shard] = os.open(self._paths[m.shard], os.O_RDONLY)
        return os.pread(fd, m.size, m.offset)

    def epoch_view_bytes(self, seed: int, epoch: int, index: int) -> bytes:
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
    """sha256 of the validated (relative path, label) list and the class names."""
    h = hashlib.sha256()
    h.update(json.dumps(list(index.classes)).encode())
    for f, y in zip(index.files, index.labels):
        h.update(f"{os.path.relpath(f, root)}\t{y}\n".encode())
    return h.hexdigest()


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
    """Write an uncompressed tar atomically; return (data offset, size) per member."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
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
    return offsets


def _shard_done(shards: Path, s: int) -> bool:
    idx = shards / f"shard-{s:05d}.json"
    tar = shards / f"shard-{s:05d}.tar"
    if not (idx.is_file() and tar.is_file()):
        return False
    return json.loads(idx.read_text())["bytes"] == tar.stat().st_size


def build_bank(args: argparse.Namespace) -> dict | None:
    from .data import build_loader, scan_dataset

    w = init_distributed()
    say = print if w.is_main else (lambda *a, **k: None)
    out = Path(args.out)
    shards = out / "shards"
    if w.is_main:
        shards.mkdir(parents=True, exist_ok=True)
    data = Path(args.data)
    if not data.is_dir():
        raise SystemExit(f"--data {data}: no such directory")
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
    plan = {
        "format_version": 1, "package_version": __version__, "dataset": str(data.resolve()),
        "dataset_fingerprint": dataset_fingerprint(index, data), "num_images": len(index.files),
        "classes": list(index.classes), "checkpoint": str(Path(args.unet).resolve()),
        "checkpoint_sha256": file_sha256(args.unet), "unet": den.name,
        "schedule": {"name": den.schedule.name, "steps": den.num_steps, "rescale_timesteps": den.schedule.rescale_timesteps},
        "t_range": list(t_range), "views": args.views, "seed": args.seed, "format": fmt,
        "quality": None if args.lossless else args.quality, "image_size": size, "resize_size": args.resize_size,
        "shard_images": args.shard_images, "batch_size": args.batch_size, "half": bool(args.half),
        "conv_algo": args.conv_algo, "fused_norm": True,
        "recompute": "augment(view, denoiser, t=t, generator=torch.Generator().manual_seed(seed))",
    }
    plan_path = out / "plan.json"
    if w.is_main:
        if plan_path.exists():
            old = json.loads(plan_path.read_text())
            diff = sorted(k for k in plan if k != "package_version" and old.get(k) != plan[k])
            if diff:
                raise SystemExit(f"{out} holds a build started with other settings ({', '.join(diff)} differ): "
                                 "use another --out, or the original settings to resume")
            say(f"resuming the build in {out}")
        else:
            atomic_write_bytes(json.dumps(plan, indent=1).encode(), plan_path)
    barrier()

    n_shards = math.ceil(len(index.files) / args.shard_images)
    mine = [s for s in range(n_shards) if s % w.size == w.rank]
    todo = [s for s in mine if not _shard_done(shards, s)]
    for stale in shards.glob(".shard-*.tmp"):  # a kill mid-write leaves only these: never a visible shard
        if int(stale.name.split("-")[1].split(".")[0]) in mine:
            stale.unlink()
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
    t_start, views_done, checked_disk = time.perf_counter(), 0, False
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
            if not checked_disk:
                checked_disk = True
                per_view = sum(len(m[1]) for m in members) / len(members)
                rate = views_done / (time.perf_counter() - t_start)
                need = per_view * my_images * args.views * 1.05
                free = shutil.disk_usage(out).free
                say(f"  measured {rate:.2f} views/s on rank 0 (first batch, warm-up included): about "
                    f"{views_total / rate / w.size / 3600:.2f} h for the bank; ~{per_view / 1024:.0f} KiB per view, "
                    f"~{per_view * views_total / 2**30:.2f} GiB in all")
                if need > free:
                    raise SystemExit(f"not enough disk in {out}: this process needs ~{need / 2**30:.2f} GiB, "
                                     f"{free / 2**30:.2f} GiB free")
        tar_path = shards / f"shard-{s:05d}.tar"
        offsets = _write_shard(tar_path, members)
        for m, (off, sz) in zip(meta, offsets):
            m["offset"], m["size"] = off, sz
        atomic_write_bytes(json.dumps({"shard": s, "tar": tar_path.name, "sha256": file_sha256(tar_path),
                                       "bytes": tar_path.stat().st_size, "images": [ids[0], ids[-1]],
                                       "members": meta}).encode(), shards / f"shard-{s:05d}.json")
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
        rec = json.loads((shards / f"shard-{s:05d}.json").read_text())
        records.append({"tar": rec["tar"], "index": f"shard-{s:05d}.json", "sha256": rec["sha256"],
                        "bytes": rec["bytes"], "images": rec["images"]})
    total_views = sum(v for v, _ in rates)
    wall = max(sec for _, sec in rates) or float("nan")
    manifest = {**plan, "shards": records, "total_bytes": sum(r["bytes"] for r in records),
                "bytes_per_image": sum(r["bytes"] for r in records) / len(index.files),
                "build": {"views_this_run": total_views, "seconds": wall, "views_per_s": total_views / wall,
                          "processes": w.size, "device": str(w.device), "threads": torch.get_num_threads()}}
    atomic_write_bytes(json.dumps(manifest, indent=1).encode(), out / "manifest.json")
    say(f"bank complete: {out} ({manifest['total_bytes'] / 2**20:.1f} MiB, "
        f"{manifest['bytes_per_image'] / 1024:.0f} KiB per image); this run {total_views} views in {wall:.1f} s "
        f"= {total_views / wall:.2f} views/s")
    return manifest


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


def verify_bank(root: str | os.PathLike, *, sample: int = 4, recompute: bool = True, loader: str = "auto",
                seed: int = 0) -> dict:
    """Checksums, coverage (every image has K views), and a sample of views recomputed and compared.

    Each sampled view is recomputed in its build batch with the build's thread count, on the CPU: lossless
    banks built on a CPU must match exactly, JPEG banks must reach PSNR >= 40 dB (a bank built on a GPU is
    held to the 40 dB bound either way: other kernels round differently).
    """
    from .data import build_loader, scan_dataset

    reader = BankReader(root)
    man = reader.manifest
    bad = [r["tar"] for r in man["shards"] if file_sha256(reader.root / "shards" / r["tar"]) != r["sha256"]]
    if bad:
        raise BankError(f"checksum mismatch in {len(bad)} shard(s): {bad[:4]}")
    missing = [(i, v) for i in range(reader.num_images) for v in range(reader.views) if (i, v) not in reader._members]
    if missing:
        raise BankError(f"{len(missing)} views missing, e.g. (image, view) {missing[:4]}")
    result = {"shards": len(man["shards"]), "views": reader.num_images * reader.views, "checksums": "ok",
              "coverage": "ok"}
    if recompute and sample:
        index = scan_dataset(man["dataset"], progress=False)
        if dataset_fingerprint(index, man["dataset"]) != man["dataset_fingerprint"]:
            raise BankError(f"the dataset at {man['dataset']} changed since the bank was built")
        if file_sha256(Path(man["checkpoint"])) != man["checkpoint_sha256"]:
            raise BankError(f"the checkpoint at {man['checkpoint']} changed since the bank was built")
        den = load_denoiser(man["checkpoint"], man["unet"] if man["unet"] != "custom" else None,
                            **_unet_options(man["half"], man["conv_algo"], False, torch.device("cpu"),
                                           man.get("fused_norm", False)))
        rng = np.random.default_rng(seed)
        picks = sorted({(int(rng.integers(reader.num_images)), int(rng.integers(reader.views))) for _ in range(sample)})
        # Recompute each view inside the very batch it was built in: a conv's rounding depends on the batch
        # size, and at t ~ 999 the x0 step multiplies eps rounding by ~157 (SPEC section 1).
        threads = torch.get_num_threads()
        torch.set_num_threads(man["build"]["threads"])
        worst = []
        try:
            for i, v in picks:
                ids = _build_batch_of(i, man)
                batch = next(iter(build_loader(index.subset(ids), "val", batch_size=len(ids), backend=loader,
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
                    raise BankError(f"view {v} of image {i} differs from its recomputation (PSNR {p:.1f} dB)")
                if p < 40:
                    raise BankError(f"view {v} of image {i}: PSNR {p:.1f} dB against its recomputation (< 40 dB)")
                worst.append(p)
        finally:
            torch.set_num_threads(threads)
        result["recomputed"] = len(picks)
        result["min_psnr_db"] = min(worst)
    return result


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
    a = p.parse_args(argv)
    if a.cmd == "build":
        if a.views < 1:
            raise SystemExit("--views must be >= 1")
        if not 1 <= a.quality <= 100:
            raise SystemExit("--quality must lie in 1..100")
        return build_bank(a)
    try:
        res = verify_bank(a.bank, sample=a.sample, recompute=not a.no_recompute, loader=a.loader)
    except BankError as e:
        raise SystemExit(f"verify failed: {e}") from None
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
