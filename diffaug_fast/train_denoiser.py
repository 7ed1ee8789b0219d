"""python -m diffaug_fast.train_denoiser: train an ADM denoiser on an ImageFolder tree (see denoiser_training).

    python -m diffaug_fast.train_denoiser --data DIR --preset NAME|--config JSON --image-size S --steps N
        --batch-size B --lr LR --out CKPT [--resume | --overwrite] [--ema-rate R] [--val DIR]

Checkpoints (raw + EMA weights, optimizer, scaler, step) go to the run folder every --save-every steps, at
the end and on SIGTERM/SIGINT; --resume continues bit-identically. The EMA weights are exported to CKPT.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from .bank import dataset_fingerprint
from .data import build_loader, scan_dataset
from .denoiser_training import (
    PSNR_TS,
    DenoiserSettings,
    LossTables,
    LossWindow,
    ModelFn,
    check_out_path,
    diffusion_forward,
    export_checkpoint,
    format_psnr_table,
    optimizer_step,
    psnr_table,
    resolve_config,
    save_grid_png,
)
from .distributed import World, any_rank, barrier, init_distributed
from .hardware import fast_half_dtype
from .runs import JsonLog, RunDir, RunError, open_run
from .unet import UNet, count_parameters

HALF = (0.5, 0.5, 0.5)  # the loader's (x/255 - mean)/std with these gives [-1, 1], the diffusion data range


def parse_args(argv: list[str] | None) -> DenoiserSettings:
    from .training import given_flags

    return DenoiserSettings(**given_flags(DenoiserSettings, argv, __doc__, prog="python -m diffaug_fast.train_denoiser"))


def _check_numbers(s: DenoiserSettings) -> None:
    checks = [(s.steps >= 1, "--steps must be >= 1"), (s.batch_size >= 1, "--batch-size must be >= 1"),
              (s.lr > 0, "--lr must be > 0"), (0.0 <= s.ema_rate < 1.0, "--ema-rate must lie in [0, 1)"),
              (s.grad_clip > 0, "--grad-clip must be > 0"), (s.held_out >= 1, "--held-out must be >= 1"),
              (min(s.eval_every, s.log_every, s.save_every) >= 1, "--eval-every/--log-every/--save-every must be >= 1")]
    for ok, msg in checks:
        if not ok:
            raise SystemExit(msg)


def _scan(path: str, flag: str, progress: bool):
    root = Path(path)
    if not root.is_dir():
        raise SystemExit(f"{flag} {root}: no such folder")
    try:
        return scan_dataset(root, progress=progress)
    except ValueError as e:
        raise SystemExit(f"{flag} {root}: {str(e).splitlines()[0].replace(str(root.resolve()), '').strip(': ')}"
                         " (expected an ImageFolder tree: one sub-folder per class holding the images)") from None


def split_data(s: DenoiserSettings, progress: bool):
    """(train index, held-out index): --val's first images, else --held-out images taken out of --data."""
    index = _scan(s.data, "--data", progress)
    if s.val:
        val = _scan(s.val, "--val", progress)
        held = val.subset(np.random.default_rng(s.seed).permutation(len(val))[: s.held_out].tolist())
        train = index
    else:
        if len(index) <= s.held_out:
            raise SystemExit(f"--data {s.data}: {len(index)} images, not enough to hold out --held-out {s.held_out}")
        perm = np.random.default_rng(s.seed).permutation(len(index))
        held, train = index.subset(sorted(perm[: s.held_out].tolist())), index.subset(sorted(perm[s.held_out:].tolist()))
    if len(train) < s.batch_size:
        raise SystemExit(f"--data {s.data}: {len(train)} training images, fewer than --batch-size {s.batch_size}")
    return index, train, held


def load_images(index, size: int) -> torch.Tensor:
    """float32 [N, 3, size, size] in [-1, 1]: Resize(size) + CenterCrop(size) of every image in ``index``."""
    loader = build_loader(index, "val", batch_size=len(index), backend="torch", output="float", mean=HALF, std=HALF,
                          channels_last=False, num_workers=0, crop_size=size, resize_size=size)
    return next(iter(loader))["image"].float()


def _resume_mismatch(ck: dict, ident: dict) -> list[str]:
    have = ck.get("identity", {})
    return [f"{k}: checkpoint {have.get(k)!r} vs now {v!r}" for k, v in ident.items() if have.get(k) != v]


def main(argv: list[str] | None = None, *, single_process: bool = False) -> dict:
    """Train as the command line says; returns a summary dict. ``single_process=True`` trains in this process
    alone even inside a torchrun job (the demo's denoiser, built by rank 0 while the others wait)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    s = parse_args(argv)
    if not s.data:
        raise SystemExit("--data DIR is required (an ImageFolder tree of training images)")
    _check_numbers(s)
    cfg = resolve_config(s.preset, s.config, s.image_size)
    out = check_out_path(s.out)
    if single_process:
        w = World(0, 1, torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else
                  torch.device("cpu"))
    else:
        w = init_distributed()
    rank, world = w.rank, w.size
    if s.batch_size % world:
        raise SystemExit(f"--batch-size {s.batch_size} is not divisible by the {world} processes")
    say = print if rank == 0 else (lambda *a, **k: None)
    _, train_index, held_index = split_data(s, progress=s.progress and rank == 0)
    run_dir = Path(s.run_dir) if s.run_dir else out.with_suffix(".run")
    run = None
    if rank == 0:
        try:
            run = open_run(run_dir, resume=s.resume, overwrite=s.overwrite)
        except RunError as e:
            raise SystemExit(str(e)) from None
    try:
        return _train(s, argv, cfg, out, w, run, run_dir, train_index, held_index, say)
    finally:
        if run is not None:
            run.close()  # frees the folder's lock also when training stops with an error


def _train(s, argv, cfg, out, w, run, run_dir, train_index, held_index, say) -> dict:
    rank, world, device = w.rank, w.size, w.device

    def sync() -> None:  # no collective in a single-process run, even inside a torchrun job
        if world > 1:
            barrier()

    sync()
    log = JsonLog(run_dir / "log.jsonl" if rank == 0 else None)
    fingerprint = dataset_fingerprint(train_index, train_index.root)
    # what a resumed run must share with the checkpoint it continues
    identity = json.loads(json.dumps({"unet_config": cfg.to_dict(), "batch_size": s.batch_size, "seed": s.seed,
                                      "image_size": s.image_size, "data_fingerprint": fingerprint}))

    torch.manual_seed(s.seed)
    model = UNet(cfg).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    amp_dtype = fast_half_dtype(device) if s.amp else None
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    schedule, tables = cfg.schedule(), LossTables(cfg.schedule())
    T = schedule.num_steps

    step = 0
    if s.resume:
        # every rank reads the same file rank 0 picks (last.pt, else prev.pt), without taking the lock
        ck, path = (run or RunDir(run_dir, None)).load_checkpoint(say=say)
        if bad := _resume_mismatch(ck, identity):
            raise SystemExit(f"--resume: {run_dir} holds a run of another configuration ({'; '.join(bad)}); "
                             "use the original flags, or --overwrite to start afresh")
        model.load_state_dict(ck["model"])
        ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["optimizer"])
        scaler.load_state_dict(ck["scaler"])
        step = int(ck["step"])
        say(f"resumed from {path}: step {step} of {s.steps}")

    per_rank = s.batch_size // world
    loader = build_loader(train_index, "train", batch_size=per_rank, backend=s.loader, output="float", mean=HALF,
                          std=HALF, channels_last=False, shard_id=rank, num_shards=world, seed=s.seed,
                          num_workers=s.workers, device=device if device.type == "cuda" else None,
                          crop_size=s.image_size, resize_size=s.image_size)
    spe = len(loader)
    epoch = step // spe
    if step % spe:
        loader.load_state_dict({"epoch": epoch, "position": step % spe})
    held = load_images(held_index, s.image_size).to(device) if rank == 0 else None
    log.write(event="settings", **dataclasses.asdict(s), command=argv, world_size=world, device=str(device),
              amp_dtype=str(amp_dtype), unet_config=cfg.to_dict(), parameters=count_parameters(model),
              train_images=len(train_index), held_out_images=len(held_index), data_fingerprint=fingerprint,
              resumed_at=step if s.resume else None, loader_backend=loader.backend)
    say(f"training a {count_parameters(model) / 1e6:.2f} M-parameter UNet ({'learned' if cfg.learn_sigma else 'fixed'} "
        f"sigma, {schedule.name} {T} steps) at {s.image_size} px on {len(train_index)} images, "
        f"{world} process(es) on {device}, {'float32' if amp_dtype is None else amp_dtype}; run folder {run_dir}")

    def evaluate(at: int) -> list[dict]:
        rows = {}
        for name, m in (("ema", ema), ("raw", model)):
            m.eval()
            rows[name] = psnr_table(ModelFn(m, schedule), held, ts=PSNR_TS, seed=s.seed)
            m.train()
        log.write(event="psnr", step=at, held_out=len(held), ema=rows["ema"], raw=rows["raw"])
        return rows["ema"]

    def save(at: int) -> None:
        if rank == 0:
            run.save_checkpoint({"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                                 "scaler": scaler.state_dict(), "step": at, "identity": identity})
        sync()

    stop = {"signal": None}
    old = {sig: signal.signal(sig, lambda n, f: stop.update(signal=n)) for sig in (signal.SIGTERM, signal.SIGINT)}
    bar = tqdm(total=s.steps, initial=step, unit="step", disable=not (s.progress and rank == 0), dynamic_ncols=True)
    window = LossWindow(T)
    timed, timed_s, t_start = 0, 0.0, time.perf_counter()
    try:
        while step < s.steps:
            loader.set_epoch(epoch)
            for batch in loader:
                t0 = time.perf_counter()
                torch.manual_seed((s.seed * 1_000_003 + step) * 4099 + rank)  # dropout, if the config has any
                terms, t = diffusion_forward(net, batch["clean"].float(), batch["index"], s.seed, step, tables,
                                             amp_dtype)
                loss = terms["loss"].mean()
                grad_norm = optimizer_step(loss, model, ema, opt, scaler, s.grad_clip, s.ema_rate)
                loss_val = loss.item()
                if not math.isfinite(loss_val):
                    raise SystemExit(f"loss is {loss_val} at step {step}: lower --lr or check the data")
                step += 1
                dt = time.perf_counter() - t0
                if step > 2:  # allocator / first-call warm-up excluded
                    timed, timed_s = timed + 1, timed_s + dt
                window.add(terms, t)
                bar.update(1)
                bar.set_postfix(loss=f"{loss_val:.4f}")
                if step % s.log_every == 0 or step == s.steps:
                    steps_s = timed / timed_s if timed_s else float("nan")
                    log.write(event="step", step=step, grad_norm=float(grad_norm), steps_per_s=steps_s,
                              images_per_s=steps_s * s.batch_size, **window.record())
                if rank == 0 and (step % s.eval_every == 0 or step == s.steps):
                    rows = evaluate(step)
                    bar.write(f"step {step}: EMA one-step PSNR gain " + ", ".join(
                        f"t={r['t']} {r['gain']:+.1f} dB" for r in rows))
                if s.stop_after_steps is not None and step == s.stop_after_steps:
                    os.kill(os.getpid(), signal.SIGTERM)
                stopping = any_rank(stop["signal"] is not None, device) if world > 1 else stop["signal"] is not None
                if stopping:
                    save(step)
                    bar.close()
                    say(f"\ninterrupted: checkpoint saved at step {step}; continue with --resume")
                    log.write(event="interrupted", step=step)
                    if world > 1:
                        dist.destroy_process_group()
                    sys.exit(128 + (stop["signal"] or signal.SIGTERM))
                if step % s.save_every == 0 and step < s.steps:
                    save(step)
                if step >= s.steps:
                    break
            else:
                epoch += 1
                continue
            break
    finally:
        bar.close()
        for sig, handler in old.items():
            signal.signal(sig, handler)
    save(step)
    summary = {"steps": step, "steps_per_s": timed / timed_s if timed_s else float("nan"),
               "train_seconds": time.perf_counter() - t_start, "run_dir": str(run_dir), "out": str(out)}
    summary["images_per_s"] = summary["steps_per_s"] * s.batch_size
    if rank == 0:
        ema.eval()
        rows = psnr_table(ModelFn(ema, schedule), held, ts=PSNR_TS, seed=s.seed)
        say(format_psnr_table(rows, f"EMA weights, {len(held)} held-out images: one-step PSNR (dB)"))
        meta = {"steps": step, "seed": s.seed, "batch_size": s.batch_size, "lr": s.lr, "ema_rate": s.ema_rate,
                "weights": "ema", "data": str(Path(s.data).resolve()), "data_fingerprint": fingerprint,
                "train_images": len(train_index), "command": ["python", "-m", "diffaug_fast.train_denoiser", *argv],
                "held_out_psnr": rows, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        export_checkpoint(ema.state_dict(), cfg, out, meta)
        grid = save_grid_png(ModelFn(ema, schedule), schedule, held[:6], run_dir / "denoising.png", s.seed,
                             f"one-step denoising, EMA weights after {step} steps")
        say(f"wrote {out} (+ .safetensors, .json) and {grid}; {summary['steps_per_s']:.2f} steps/s, "
            f"{summary['images_per_s']:.1f} images/s")
        log.write(event="summary", **summary, psnr=rows)
        summary["psnr"] = rows
    sync()
    if world > 1:
        dist.destroy_process_group()
    return summary


if __name__ == "__main__":
    main()
