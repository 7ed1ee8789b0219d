#!/usr/bin/env python
"""Lean ResNet-50 trainer with DiffAug (Sastry et al., NeurIPS 2024). One file, read top to bottom.

    python train/rn50.py --amp                                  # embedded demo: synthetic data, a few minutes
    python train/rn50.py --data /imagenet --unet 256x256_diffusion_uncond.pt --amp
    torchrun --nproc-per-node 8 train/rn50.py --data /imagenet --unet ... --amp

Every step trains on [clean; diffaug] in one classifier forward: loss = CE(clean) + CE(diffaug), same
labels, no gradient into the UNet. The clean view is RandomResizedCrop + flip, the DiffAug view the same
image's Resize + CenterCrop, diffused to a random t and denoised in one UNet call (x0 estimate).
--diffaug-fraction p augments a random p of each batch. Recipe defaults: torchvision's ResNet-50 (global
batch 256, SGD lr 0.1 x batch/256, momentum 0.9, wd 1e-4, lr x0.1 every 30 epochs, 90 epochs).

Checkpoints (model, optimizer, scaler, scheduler, epoch, position in the epoch, RNG states) are written
atomically at every epoch end and on SIGTERM/SIGINT; --resume continues exactly where the run stopped:
all randomness of a step is derived from (seed, epoch, step, rank), so a resumed run ends with the same
weights as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from tqdm import tqdm

import diffaug_fast as df
from diffaug_fast.bank import BankError, BankReader, dataset_fingerprint, file_sha256
from diffaug_fast.data import build_loader, scan_dataset
from diffaug_fast.distributed import any_rank, barrier, broadcast_object, init_distributed
from diffaug_fast.ensemble import (
    DE_TIMESTEPS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    evaluate_corruptions,
    evaluate_folder,
)
from diffaug_fast.hardware import fast_half_dtype, keep_freed_memory
from diffaug_fast.io import atomic_save
from diffaug_fast.ops.fused import to_unit
from diffaug_fast.synthetic import make_synthetic_dataset
from diffaug_fast.viz import save_grid

GRID_TS = (0, 100, 250, 500, 750, 999)


@dataclass
class Settings:
    data: str | None = None  # root with train/ and val/ (ImageNet layout); None: the embedded synthetic demo
    out: str = "runs"
    run_name: str | None = None
    arch: str = "resnet50"
    epochs: int = 90
    batch_size: int = 256  # global, over all processes
    lr: float | None = None  # default 0.1 * batch_size / 256
    momentum: float = 0.9
    zero_init_residual: bool = False  # zero the last BN of each residual branch (Goyal et al.): steadier start
    weight_decay: float = 1e-4
    lr_step: int = 30
    lr_gamma: float = 0.1
    image_size: int = 224
    resize_size: int = 256
    amp: bool = False
    compile: bool = False
    channels_last: bool = True
    sync_bn: bool = False
    loader: str = "auto"  # auto | dali | torch
    workers: int = 2
    diffaug: str = "online"  # off | online | bank:BANK_DIR (stored views, see python -m diffaug_fast.bank)
    diffaug_fraction: float | None = None  # online: default 1.0; bank: share of views made online, default 0
    unet: str | None = None
    unet_preset: str | None = None
    t_min: int = 0
    t_max: int | None = None  # default: the schedule's steps (1000)
    seed: int = 0
    resume: bool = False
    eval_every: int = 1
    de_eval: bool = True  # DiffAug Ensemble evaluation at the end
    val_c: str | None = None  # ImageNet-C style tree evaluated at the end
    log_every: int = 10
    max_steps: int | None = None  # stop after this many steps in total (smoke tests, benchmarks)
    stop_after_steps: int | None = None  # send ourselves SIGTERM after this many steps (tests the resume path)
    bench_steps: int = 0  # at the end, time this many steps baseline vs DiffAug (the demo does)
    progress: bool = True


# The embedded demo (no --data): synthetic 64 px images, 4 classes x 40; sized to train in a few minutes on 2 cores.
DEMO = dict(epochs=10, batch_size=32, lr=0.005, image_size=48, resize_size=55, unet_preset="adm-tiny", diffaug_fraction=0.5,
            zero_init_residual=True,
            bench_steps=3)


def parse_args(argv: list[str] | None = None) -> Settings:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            kind = {"int": int, "float": float}.get(f.type.split(" ")[0], str)
            p.add_argument(flag, type=kind, default=None)
    given = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    defaults = dict(DEMO) if given.get("data") is None else {}
    return Settings(**{**defaults, **given})


# ---------------------------------------------------------------------------------------------------- setup


def check_data_root(root: Path) -> None:
    if not root.is_dir():
        raise SystemExit(f"--data {root}: no such directory")
    missing = [s for s in ("train", "val") if not (root / s).is_dir()]
    if missing:
        raise SystemExit(f"--data {root}: expected sub-folders train/ and val/ (one folder per class inside "
                         f"each, the ImageNet layout); missing: {', '.join(missing)}")


def amp_dtype_for(device: torch.device, say) -> torch.dtype | None:
    """--amp: fp16 on GPU, bf16 on a CPU with native bf16, else float32 (bf16 emulation is far slower)."""
    dtype = fast_half_dtype(device)
    if dtype is None:
        say(f"--amp: this CPU ({torch.backends.cpu.get_cpu_capability()}) has no native bf16, where bf16 autocast "
            "is ~25x slower than float32: training in float32")
    return dtype


def load_unet(s: Settings, device: torch.device) -> df.Denoiser:
    if s.unet:
        try:
            return df.load_denoiser(s.unet, s.unet_preset, device=device, **FAST_UNET)
        except df.CheckpointError as e:
            raise SystemExit(f"--unet {s.unet}: {e}") from None
    torch.manual_seed(s.seed)
    preset = s.unet_preset or "adm-tiny"
    return df.Denoiser(df.UNet(df.get_preset(preset)).to(device), name=f"{preset} (random weights)", **FAST_UNET)


# the UNet's fast path for online DiffAug (bench/NOTES.md): only the eps rows of the last conv,
# channels_last on GPU, GroupNorm + scale/shift + SiLU fused (the CPU float32 kernel)
FAST_UNET = dict(eps_only=True, channels_last=None, fused_norm=True)


def open_bank(path: str, index, train_root: Path, s: Settings) -> BankReader:
    """The bank, refused unless it was built from exactly this training set (and this UNet, if given)."""
    try:
        bank = BankReader(path)
        bank.check_compatible(dataset_fingerprint(index, train_root),
                              file_sha256(s.unet) if s.unet else None)
    except BankError as e:
        raise SystemExit(f"--diffaug bank:{path}: {e}") from None
    if bank.manifest["image_size"] != s.image_size:
        raise SystemExit(f"--diffaug bank:{path}: its views are {bank.manifest['image_size']} px, "
                         f"training uses --image-size {s.image_size}")
    return bank


def step_generator(s: Settings, epoch: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    """All randomness of one step comes from here: a resumed run replays it exactly."""
    return torch.Generator(device=device).manual_seed(((s.seed * 1_000_003 + epoch) * 1_000_003 + step) * 4099 + rank)


def numpy_rng_state() -> tuple:
    """numpy's RNG state with its key array as a tensor, so checkpoints load with weights_only=True."""
    name, keys, *rest = np.random.get_state()
    return (name, torch.from_numpy(keys.copy()), *rest)


class JsonLog:
    def __init__(self, path: Path | None):
        self.path = path

    def write(self, **rec) -> None:
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps({"time": time.time(), **rec}) + "\n")


# ---------------------------------------------------------------------------------------------------- step


def diffaug_half(batch: dict, labels: torch.Tensor, den: df.Denoiser | None, s: Settings, g: torch.Generator,
                 out: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Fill ``out`` (the DiffAug half of the preallocated batch) and return its labels.

    online: DiffAug of a random ``diffaug_fraction`` of the Resize+CenterCrop views, written by the fused op
    straight into ``out`` (no torch.cat). bank: the stored views read by the loader, except a random
    ``diffaug_fraction`` of them made online instead.
    """
    b = labels.shape[0]
    bank = batch.get("bank")
    k = 0 if den is None else round(s.diffaug_fraction * b)
    if bank is None and k == 0:
        return labels[:0]
    perm = torch.randperm(b, generator=g, device=g.device).to(device) if 0 < k < b else None
    online = perm[:k] if perm is not None else None
    if k:
        view = batch["diffaug"].to(device, non_blocking=True)
        sel = view if online is None else view.index_select(0, online)
        df.augment(sel, den, t_range=(s.t_min, s.t_max or den.num_steps), generator=g, mean=IMAGENET_MEAN,
                   std=IMAGENET_STD, out=out[:k])
    if bank is None:
        return labels if online is None else labels.index_select(0, online)
    if k == b:
        return labels
    stored = perm[k:] if perm is not None else torch.arange(b, device=device)
    out[k:b].copy_(bank.to(device, non_blocking=True).index_select(0, stored))
    return labels if perm is None else labels.index_select(0, perm)


def train_step(model, opt, scaler, batch, den, s: Settings, g, buf, device, amp_dtype):
    clean = batch["clean"].to(device, non_blocking=True)
    y = batch["label"].to(device, non_blocking=True)
    b = clean.shape[0]
    buf[:b].copy_(clean)
    y_aug = diffaug_half(batch, y, den, s, g, buf[b:], device)
    k = y_aug.shape[0]
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        logits = model(buf[: b + k])
        loss = F.cross_entropy(logits[:b].float(), y)
        if k:
            loss = loss + F.cross_entropy(logits[b:].float(), y_aug)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    return loss.detach(), b + k


# ---------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    s = parse_args(argv)
    w = init_distributed()
    rank, world, device = w.rank, w.size, w.device
    if device.type == "cpu":
        keep_freed_memory()  # big CPU tensors reuse their pages (diffaug_fast.hardware)
    demo = s.data is None
    if demo:
        s.data = broadcast_object(str(make_synthetic_dataset()) if rank == 0 else None)
    root = Path(s.data)
    check_data_root(root)
    if s.batch_size % world:
        raise SystemExit(f"--batch-size {s.batch_size} is not divisible by the {world} processes")
    bank_dir = s.diffaug[5:] if s.diffaug.startswith("bank:") else None
    if s.diffaug not in ("off", "online") and not bank_dir:
        raise SystemExit(f"--diffaug {s.diffaug!r}: expected off, online or bank:BANK_DIR")
    if s.diffaug_fraction is None:
        s.diffaug_fraction = 1.0 if s.diffaug == "online" else 0.0
    if not 0.0 <= s.diffaug_fraction <= 1.0:
        raise SystemExit("--diffaug-fraction must lie in [0, 1]")
    lr = s.lr if s.lr is not None else 0.1 * s.batch_size / 256
    s.run_name = s.run_name or ("demo" if demo else f"rn50-{s.diffaug}-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir = Path(s.out) / s.run_name
    ckpt_path = run_dir / "last.pt"
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
    log = JsonLog(run_dir / "log.jsonl" if rank == 0 else None)
    say = print if rank == 0 else (lambda *a, **k: None)

    # data: validated file lists, labels in sorted class-folder order, saved with the run
    train_index = scan_dataset(root / "train", progress=s.progress and rank == 0)
    val_index = scan_dataset(root / "val", progress=s.progress and rank == 0)
    classes = train_index.classes
    if rank == 0:
        train_index.save_classes(run_dir / "classes.json")
        for idx in (train_index, val_index):
            if idx.bad:
                say(idx.report())
    per_rank = s.batch_size // world
    geometry = dict(crop_size=s.image_size, resize_size=s.resize_size)
    extra = {}
    if bank_dir:
        bank = open_bank(bank_dir, train_index, root / "train", s)
        extra["bank"] = functools.partial(bank.epoch_view_bytes, s.seed)
    loader = build_loader(train_index, "train", batch_size=per_rank, backend=s.loader, output="float",
                          channels_last=s.channels_last, shard_id=rank, num_shards=world, seed=s.seed,
                          num_workers=s.workers, device=device if device.type == "cuda" else None,
                          extra_views=extra, **geometry)

    torch.manual_seed(s.seed)
    extra_model_args = {"zero_init_residual": True} if s.zero_init_residual else {}
    model = torchvision.models.get_model(s.arch, num_classes=len(classes), **extra_model_args).to(device)
    if s.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if s.sync_bn and world > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    if s.compile:
        net = torch.compile(net)
    decay = [p for n, p in model.named_parameters() if p.dim() > 1]
    no_decay = [p for n, p in model.named_parameters() if p.dim() <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                          lr=lr, momentum=s.momentum)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=s.lr_step, gamma=s.lr_gamma)
    amp_dtype = amp_dtype_for(device, say) if s.amp else None
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    den = load_unet(s, device) if s.diffaug == "online" or (bank_dir and s.diffaug_fraction > 0) else None

    start_epoch, start_pos, total_steps = 0, 0, 0
    if s.resume:
        if not ckpt_path.exists():
            raise SystemExit(f"--resume: no checkpoint at {ckpt_path}")
        ck = torch.load(ckpt_path, map_location=device, weights_only=True)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        scaler.load_state_dict(ck["scaler"])
        start_epoch, start_pos, total_steps = ck["epoch"], ck["position"], ck["total_steps"]
        random.setstate(ck["rng"]["python"])
        name, keys, *rest = ck["rng"]["numpy"]
        np.random.set_state((name, keys.numpy(), *rest))
        torch.set_rng_state(ck["rng"]["torch"])
        say(f"resumed from {ckpt_path}: epoch {start_epoch}, step {start_pos} of that epoch")

    settings = dataclasses.asdict(s) | {"lr_effective": lr, "world_size": world, "device": str(device),
                                        "loader_backend": loader.backend, "num_classes": len(classes),
                                        "unet_name": den.name if den else None, "resumed": s.resume}
    log.write(event="settings", **settings)
    say(f"data {root} ({len(train_index.files)} train / {len(val_index.files)} val images, {len(classes)} classes), "
        f"loader {loader.backend}, {world} process(es) on {device}")
    mode = f"bank {bank_dir} ({bank.views} stored views per image, one per epoch)" if bank_dir else s.diffaug
    say(f"DiffAug mode: {mode}" + (f", fraction {'online ' if bank_dir else ''}{s.diffaug_fraction}, UNet {den.name} "
        f"({'checkpoint ' + s.unet if s.unet else 'no checkpoint'}), t in [{s.t_min}, {s.t_max or den.num_steps})"
                                   if den else ""))
    if den is not None and not s.unet:
        say("  note: a random-weight UNet predicts eps = 0, so its 'DiffAug' is only noise; real DiffAug needs a "
            "pretrained checkpoint: --unet 256x256_diffusion_uncond.pt")

    stop = {"signal": None}

    def on_signal(signum, frame):
        stop["signal"] = signum

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def save_checkpoint(epoch: int, position: int) -> None:
        if rank == 0:
            atomic_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                         "scaler": scaler.state_dict(), "epoch": epoch, "position": position,
                         "total_steps": total_steps, "settings": settings, "classes": classes,
                         "rng": {"python": random.getstate(), "numpy": numpy_rng_state(),
                                 "torch": torch.get_rng_state()}}, ckpt_path)
        barrier()

    buf = torch.empty(2 * per_rank, 3, s.image_size, s.image_size, device=device,
                      memory_format=torch.channels_last if s.channels_last else torch.contiguous_format)
    # img/s counts every image the classifier trains on (clean + DiffAug views); clean img/s is also reported
    timed_images, timed_clean, timed_seconds, warmup = 0, 0, 0.0, 2
    steps_per_epoch = len(loader)
    for epoch in range(start_epoch, s.epochs):
        net.train()
        loader.set_epoch(epoch)
        pos = start_pos if epoch == start_epoch else 0
        if pos:
            loader.load_state_dict({"epoch": epoch, "position": pos})
        bar = tqdm(total=steps_per_epoch, initial=pos, desc=f"epoch {epoch + 1}/{s.epochs}", unit="step",
                   disable=not (s.progress and rank == 0), dynamic_ncols=True)
        seen_this_epoch = 0
        for step, batch in enumerate(loader, start=pos):
            t0 = time.perf_counter()
            g = step_generator(s, epoch, step, rank, device)
            loss, n_img = train_step(net, opt, scaler, batch, den, s, g, buf, device, amp_dtype)
            loss_val = loss.item()  # syncs: the timing below covers the whole step
            dt = time.perf_counter() - t0
            total_steps += 1
            seen_this_epoch += 1
            if total_steps > warmup:  # exclude compile / allocator warm-up
                timed_images += n_img * world
                timed_clean += batch["clean"].shape[0] * world
                timed_seconds += dt
            if not math.isfinite(loss_val):
                raise SystemExit(f"loss is {loss_val} at epoch {epoch} step {step}: lower --lr or check the data")
            rate = timed_images / timed_seconds if timed_seconds else float("nan")
            bar.set_postfix(loss=f"{loss_val:.3f}", img_s=f"{rate:.1f}")
            bar.update(1)
            if step % s.log_every == 0:
                log.write(event="step", epoch=epoch, step=step, loss=loss_val, lr=opt.param_groups[0]["lr"],
                          img_per_s=rate, images_in_batch=n_img)
            if s.stop_after_steps is not None and total_steps == s.stop_after_steps:
                os.kill(os.getpid(), signal.SIGTERM)
            stopping = any_rank(stop["signal"] is not None, device)  # every rank stops at the same step
            if stopping or (s.max_steps is not None and total_steps >= s.max_steps):
                bar.close()
                save_checkpoint(epoch, step + 1)
                if stopping:
                    say(f"\ninterrupted: checkpoint saved at epoch {epoch}, step {step + 1}; continue with --resume")
                    log.write(event="interrupted", epoch=epoch, position=step + 1)
                    if world > 1:
                        dist.destroy_process_group()
                    sys.exit(128 + (stop["signal"] or signal.SIGTERM))
                return {"img_per_s": rate, "steps": total_steps, "run_dir": str(run_dir)}
        bar.close()
        sched.step()
        save_checkpoint(epoch + 1, 0)
        if rank == 0 and (epoch + 1) % s.eval_every == 0:
            res = evaluate_folder(model, val_index, classes, batch_size=per_rank, backend=s.loader,
                                  device=device, autocast_dtype=amp_dtype, **geometry)
            say(f"epoch {epoch + 1}: val top-1 {res['top1']:.2f}% ({res['n']} images)")
            log.write(event="eval", epoch=epoch + 1, **res)
        barrier()

    rate = timed_images / timed_seconds if timed_seconds else float("nan")
    clean_rate = timed_clean / timed_seconds if timed_seconds else float("nan")
    summary: dict = {"img_per_s": rate, "clean_img_per_s": clean_rate, "steps": total_steps, "run_dir": str(run_dir)}
    say(f"trained {total_steps} steps; measured {rate:.1f} img/s through the classifier (clean + DiffAug views), "
        f"{clean_rate:.1f} clean img/s; warm-up and evaluation excluded")
    if rank == 0:
        summary |= final_report(s, model, den, val_index, classes, per_rank, device, amp_dtype, geometry,
                                root, run_dir, say, log, opt, scaler, loader)
        log.write(event="summary", **summary)
    barrier()
    if world > 1:
        dist.destroy_process_group()
    return summary


def final_report(s, model, den, val_index, classes, per_rank, device, amp_dtype, geometry, root, run_dir, say, log,
                 opt, scaler, loader) -> dict:
    """DE evaluation, the corrupted split, baseline-vs-DiffAug step timing and the picture of the views."""
    out: dict = {}
    if s.de_eval and den is not None:
        res = evaluate_folder(model, val_index, classes, batch_size=per_rank, backend=s.loader, device=device,
                              denoiser=den, timesteps=DE_TIMESTEPS, autocast_dtype=amp_dtype, **geometry)
        say(f"val top-1: plain {res['top1']:.2f}%, DiffAug Ensemble {res['top1_de']:.2f}% "
            f"(t in {list(DE_TIMESTEPS)}, {res['n']} images)")
        out["val"] = res
    val_c = Path(s.val_c) if s.val_c else (root / "val-c" if (root / "val-c").is_dir() else None)
    if val_c is not None:
        table = evaluate_corruptions(model, val_c, classes, batch_size=per_rank, backend=s.loader, device=device,
                                     denoiser=den if s.de_eval else None, autocast_dtype=amp_dtype, **geometry)
        say(f"corrupted val ({val_c}):")
        for row in table:
            say("  " + "  ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        out["val_c"] = table
    if s.bench_steps:
        out["bench"] = bench_steps(s, model, den, device, amp_dtype, loader, say)
    images = first_of_each_class(val_index, classes, geometry, s.loader)
    if images is not None and den is not None:
        g = torch.Generator(device=device).manual_seed(s.seed)
        unit = to_unit(images.to(device), IMAGENET_MEAN, IMAGENET_STD)
        cols = [unit] + [df.augment(unit, den, t=t, generator=g) for t in GRID_TS]
        path = save_grid(cols, run_dir / "diffaug_views.png", col_labels=["clean"] + [f"t={t}" for t in GRID_TS],
                         row_labels=[classes[i] for i in range(len(cols[0]))], title=f"DiffAug views, UNet {den.name}")
        say(f"wrote {path}")
        out["grid"] = str(path)
    return out


def first_of_each_class(val_index, classes, geometry, backend, limit: int = 6) -> torch.Tensor | None:
    """Up to ``limit`` val images (normalized, one per class) for the picture."""
    picks, seen = [], set()
    for i, y in enumerate(val_index.labels):
        if y not in seen:
            seen.add(y)
            picks.append(i)
        if len(picks) == limit:
            break
    sub = val_index.subset(picks)
    loader = build_loader(sub, "val", batch_size=len(picks), backend=backend, output="float", channels_last=False,
                          **geometry)
    for batch in loader:
        order = torch.argsort(batch["label"])
        return batch["image"][order]
    return None


def bench_steps(s, model, den, device, amp_dtype, loader, say) -> dict:
    """Time a few steps baseline (clean only) vs DiffAug online on throwaway copies of the model."""
    batch = next(iter(loader))
    res = {}
    for mode in ("baseline", "diffaug"):
        m = copy.deepcopy(model)
        o = torch.optim.SGD(m.parameters(), lr=0.0, momentum=0.9)
        sc = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
        b = batch["clean"].shape[0]
        buf = torch.empty(2 * b, *batch["clean"].shape[1:], device=device, memory_format=torch.channels_last)
        d = den if mode == "diffaug" else None
        times = []
        for i in range(s.bench_steps + 1):
            g = step_generator(s, 10**6, i, 0, device)
            t0 = time.perf_counter()
            train_step(m, o, sc, batch, d, s, g, buf, device, amp_dtype)[0].item()
            times.append(time.perf_counter() - t0)
        res[mode] = b / (sum(times[1:]) / s.bench_steps)
    say(f"throughput (clean images/s, {s.bench_steps} timed steps): baseline {res['baseline']:.1f}, "
        f"DiffAug online {res['diffaug']:.1f} ({res['diffaug'] / res['baseline']:.2f}x baseline)")
    return res


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        main()
