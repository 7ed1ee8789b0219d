"""Denoiser training on the core: ``python -m diffaug_fast.train_denoiser`` trains an ADM UNet of our family
with improved-diffusion's objective on an ImageFolder tree.

    python -m diffaug_fast.train_denoiser --data DIR --preset NAME|--config JSON --image-size S --steps N
        --batch-size B --lr LR --out CKPT [--resume | --overwrite] [--ema-rate R] [--val DIR]
    torchrun --nproc-per-node 8 -m diffaug_fast.train_denoiser ...

As improved-diffusion trains (its image_datasets.py and train_util.py): each image resized so its shorter side
is --image-size and centre-cropped, no flip (--crop random-resized and --flip train on other views), no gradient
clipping (--grad-clip N clips at N), AdamW, an EMA of the weights; the EMA decay warms up as diffusers' EMAModel
(min(--ema-rate, (1 + n) / (10 + n)) at update n; --no-ema-warmup: the constant rate), so a short run exports
weights that denoise, and the export warns when its held-out gain at t = 250 is under 1 dB.

Outputs: ``--out`` (the EMA weights as a plain OpenAI-format state_dict, which guided-diffusion's UNetModel
loads strictly), the same tensors as ``.safetensors``, and a JSON sidecar (``model.json`` beside
``model.pt``) with the UNetConfig, the schedule, the image size, steps, seed, data fingerprint, run folder and
the command; ``load_denoiser(path)`` reads the architecture and schedule from it. --out is locked while the run
lives, and an existing file there that another run (or anyone else) wrote is refused unless --overwrite. The run
folder (``--run-dir``, default ``<out without suffix>.run/``) holds last.pt/prev.pt (raw + EMA weights,
optimizer, step, the training settings a --resume must repeat), written every --save-every steps, at the end
and on SIGTERM/SIGINT, log.jsonl, the list of bad images and the PNG grid of one-step denoising.

Randomness: the crop/flip of a sample comes from (seed, epoch or step, dataset index), its t and noise from
(seed, step, dataset index); so a resumed run replays the same steps bit for bit, and N processes see the same
global batch, t and noise as one (DDP averages the same gradient up to summation order).
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..bank import dataset_fingerprint
from ..constants import UNIT_MEAN, UNIT_STD, derive_seed, rank_seed
from ..data import build_loader, scan_dataset
from ..diffusion.unet import UNet, count_parameters
from ..distributed import World
from ..hardware import fast_half_dtype
from ..runs import LAST, LOCK_NAME, PREV
from .core import TrainLoop
from .denoiser_checks import check_numbers, check_out_path, hyper_mismatch, lock_out, resolve_config
from .denoiser_parts import (
    PSNR_TS,
    WEAK_GAIN_DB,
    WEAK_GAIN_T,
    LossTables,
    LossWindow,
    ModelFn,
    diffusion_forward,
    ema_decay,
    export_checkpoint,
    format_psnr_table,
    optimizer_step,
    psnr_table,
    report_bad_images,
    save_grid_png,
    training_view,
)
from .flags import given_flags, setting

__all__ = ["DenoiserSettings", "DenoiserTrainer", "main", "parse_args", "load_images"]


@dataclass(frozen=True)
class DenoiserSettings:
    data: str | None = setting(None, "ImageFolder root (one folder per class; classes are ignored)")
    out: str | None = setting(None, "checkpoint path (.pt); .safetensors and .json are written beside it")
    preset: str | None = setting(None, "a UNet preset name (diffaug_fast.diffusion.unet.PRESETS)")
    config: str | None = setting(None, "JSON file or inline JSON of UNetConfig fields (over the preset, if both)")
    image_size: int = setting(64, "training image size in pixels (a multiple of the UNet's downsampling)")
    steps: int = setting(10000, "optimizer steps in total")
    batch_size: int = setting(64, "global batch size, over all processes")
    lr: float = setting(1e-4, "AdamW learning rate")
    weight_decay: float = setting(0.0, "improved-diffusion's default")
    ema_rate: float = setting(0.9999, "decay of the exported EMA weights (improved-diffusion's)")
    ema_warmup: bool = setting(True, "EMA decay min(--ema-rate, (1 + n) / (10 + n)) at update n, as diffusers' "
                                     "EMAModel: a short run exports trained weights, not its initial ones")
    grad_clip: float = setting(0.0, "clip the gradient norm at this value; 0 = no clipping (improved-diffusion "
                                    "only logs the norm)")
    crop: str = setting("center", "training view: center (the shorter side resized to --image-size, the centre "
                                  "cut: improved-diffusion's) | random-resized (RandomResizedCrop, scale 0.08-1)")
    flip: bool = setting(False, "mirror half of the training views (improved-diffusion does not)")
    amp: bool = setting(True, "fp16 + GradScaler on GPU, bf16 on a CPU with native bf16, else float32")
    seed: int = setting(0, "seed of every random draw (init, data order, crops, t, noise)")
    val: str | None = setting(None, "held-out images from this tree; default: --held-out images taken out of --data")
    held_out: int = setting(8, "held-out images for the PSNR report")
    eval_every: int = setting(500, "one-step PSNR by t on the held-out images")
    log_every: int = setting(50, "write a step line to log.jsonl every this many steps")
    save_every: int = setting(1000, "checkpoint every this many steps")
    run_dir: str | None = setting(None, "run folder (default: --out without its suffix + .run)")
    resume: bool = setting(False, "continue the run in the run folder")
    overwrite: bool = setting(False, "start afresh in a run folder that holds a run (its checkpoints and log are deleted)")
    loader: str = setting("auto", "data backend: auto | dali | torch")
    workers: int = setting(2, "loader worker processes")
    stop_after_steps: int | None = setting(None, "interrupt ourselves after this many steps (tests the resume path)")
    progress: bool = setting(True, "show a progress bar")




def parse_args(argv: list[str] | None) -> DenoiserSettings:
    return DenoiserSettings(**given_flags(DenoiserSettings, argv, __doc__, prog="python -m diffaug_fast.train_denoiser"))


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
    """(train index, held-out index, {flag: the index as scanned, bad files listed}): the held-out images are
    --val's first ones, else --held-out images taken out of --data."""
    index = _scan(s.data, "--data", progress)
    scanned = {"--data": index}
    if s.val:
        val = scanned["--val"] = _scan(s.val, "--val", progress)
        held = val.subset(np.random.default_rng(s.seed).permutation(len(val))[: s.held_out].tolist())
        train = index
    else:
        if len(index) <= s.held_out:
            raise SystemExit(f"--data {s.data}: {len(index)} images, not enough to hold out --held-out {s.held_out}")
        perm = np.random.default_rng(s.seed).permutation(len(index))
        held, train = index.subset(sorted(perm[: s.held_out].tolist())), index.subset(sorted(perm[s.held_out:].tolist()))
    if len(train) < s.batch_size:
        raise SystemExit(f"--data {s.data}: {len(train)} training images, fewer than --batch-size {s.batch_size}")
    return train, held, scanned


def load_images(index, size: int) -> torch.Tensor:
    """float32 [N, 3, size, size] in [-1, 1]: Resize(size) + CenterCrop(size) of every image in ``index``."""
    loader = build_loader(index, "val", batch_size=len(index), backend="torch", output="float", mean=UNIT_MEAN,
                          std=UNIT_STD, channels_last=False, num_workers=0, crop_size=size, resize_size=size)
    return next(iter(loader))["image"].float()


class DenoiserTrainer(TrainLoop):
    """One denoiser run: ``DenoiserTrainer(settings, argv).run() -> summary`` (methods in the order they run).
    Everything the command line can get wrong is refused in ``__init__`` and ``setup`` before the run folder or
    --out is touched, so a corrected rerun is never refused because of the failed one."""

    def __init__(self, s: DenoiserSettings, argv: list[str], world: World | None = None):
        super().__init__(world)
        if s.batch_size % self.size:
            raise SystemExit(f"--batch-size {s.batch_size} is not divisible by the {self.size} processes")
        self.s, self.argv = s, argv
        self.cfg = resolve_config(s.preset, s.config, s.image_size, say=self.say)
        self.out, self.run_dir = check_out_path(s.out, s.run_dir, s.overwrite)
        self.step, self.epoch, self.out_lock = 0, 0, None
        # what a resumed run must repeat: the optimizer, EMA and data settings (the identity adds the model's)
        self.hyper = {k: getattr(s, k) for k in ("lr", "weight_decay", "ema_rate", "ema_warmup", "grad_clip", "crop",
                                                 "flip")}

    def run(self) -> dict:
        try:
            self.setup()
            self.restore()
            self.announce()
            with self.stop_signals():
                self.run_loop()
            self.save(self.step)
            return self.finish()
        finally:
            self.close()

    def setup(self) -> None:
        s = self.s
        self.train_index, self.held_index, scanned = split_data(s, progress=s.progress and self.is_main)
        # --resume of a run killed before its first checkpoint (its folder holds our lock file but no checkpoint):
        # nothing to continue, nothing lost by starting over
        fresh = self.share(s.resume and (self.run_dir / LOCK_NAME).exists()
                           and not any((self.run_dir / f).exists() for f in (LAST, PREV)))
        if fresh:
            self.say(f"--resume: {self.run_dir} has no checkpoint yet (stopped before its first): starting it afresh")
            self.s = s = dataclasses.replace(s, resume=False, overwrite=True)
        error = None
        if self.is_main:
            try:
                self.out_lock = lock_out(self.out)
            except SystemExit as e:
                error = str(e.code)
        if error := self.share(error):  # every rank stops, not only rank 0
            raise SystemExit(error)
        self.open_folder(self.run_dir, resume=s.resume, overwrite=s.overwrite)
        self.sync()
        if self.is_main and (text := report_bad_images(scanned, self.run_dir / "bad_images.txt")):
            self.say(text)
        self.fingerprint = dataset_fingerprint(self.train_index, self.train_index.root)
        # what a resumed run must share with the checkpoint it continues
        self.identity = json.loads(json.dumps({"unet_config": self.cfg.to_dict(), "batch_size": s.batch_size,
                                               "seed": s.seed, "image_size": s.image_size,
                                               "data_fingerprint": self.fingerprint}))
        torch.manual_seed(s.seed)
        self.model = UNet(self.cfg).to(self.device)
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
        self.amp_dtype = fast_half_dtype(self.device) if s.amp else None
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.net = torch.nn.parallel.DistributedDataParallel(self.model) if self.size > 1 else self.model
        self.schedule = self.cfg.schedule()
        self.tables = LossTables(self.schedule)
        # the train split shuffles per epoch and gives both views: "clean" (random-resized + flip) and "diffaug"
        # (resize + centre crop), from which training_view picks --crop's
        self.loader = build_loader(self.train_index, "train", batch_size=s.batch_size // self.size, backend=s.loader,
                                   output="float", mean=UNIT_MEAN, std=UNIT_STD, channels_last=False,
                                   shard_id=self.rank, num_shards=self.size, seed=s.seed, num_workers=s.workers,
                                   device=self.device if self.device.type == "cuda" else None,
                                   crop_size=s.image_size, resize_size=s.image_size)
        self.sizes = np.asarray(self.train_index.sizes, dtype=np.int64).reshape(-1, 2)  # (h, w) by dataset index
        self.held = load_images(self.held_index, s.image_size).to(self.device) if self.is_main else None

    def restore(self) -> None:
        """--resume: weights, EMA, optimizer and step from the newest readable checkpoint of the same run,
        refused when the model, data or training settings differ from the checkpoint's."""
        if not self.s.resume:
            return
        ck, path = self.load_state(map_location="cpu")
        have = ck.get("identity", {})
        if bad := [f"{k}: checkpoint {have.get(k)!r} vs now {v!r}" for k, v in self.identity.items() if have.get(k) != v]:
            raise SystemExit(f"--resume: {self.run_dir} holds a run of another configuration ({'; '.join(bad)}); "
                             "use the original flags, or --overwrite to start afresh")
        if refusal := hyper_mismatch(ck.get("hyper"), self.hyper, path):
            raise SystemExit(refusal)
        self.model.load_state_dict(ck["model"])
        self.ema.load_state_dict(ck["ema"])
        self.opt.load_state_dict(ck["optimizer"])
        self.scaler.load_state_dict(ck["scaler"])
        self.step = int(ck["step"])
        self.say(f"resumed from {path}: step {self.step} of {self.s.steps}")

    def announce(self) -> None:
        s, cfg = self.s, self.cfg
        self.log.write(event="settings", **dataclasses.asdict(s), command=self.argv, world_size=self.size,
                       device=str(self.device), amp_dtype=str(self.amp_dtype), unet_config=cfg.to_dict(),
                       parameters=count_parameters(self.model), train_images=len(self.train_index),
                       held_out_images=len(self.held_index), data_fingerprint=self.fingerprint,
                       resumed_at=self.step if s.resume else None, loader_backend=self.loader.backend)
        self.say(f"training a {count_parameters(self.model) / 1e6:.2f} M-parameter UNet "
                 f"({'learned' if cfg.learn_sigma else 'fixed'} sigma, {self.schedule.name} {self.schedule.num_steps} "
                 f"steps) at {s.image_size} px on {len(self.train_index)} images, {self.size} process(es) on "
                 f"{self.device}, {'float32' if self.amp_dtype is None else self.amp_dtype}; run folder {self.run_dir}")

    def run_loop(self) -> None:
        """Epochs of the loader until --steps; a stop signal saves and exits at a step boundary."""
        s = self.s
        spe = len(self.loader)
        self.epoch = self.step // spe
        if self.step % spe:
            self.loader.load_state_dict({"epoch": self.epoch, "position": self.step % spe})
        self.bar = tqdm(total=s.steps, initial=self.step, unit="step", disable=not (s.progress and self.is_main),
                        dynamic_ncols=True)
        self.window = LossWindow(self.schedule.num_steps)
        self.timed, self.timed_s, self.t_start = 0, 0.0, time.perf_counter()
        try:
            while self.step < s.steps:
                self.loader.set_epoch(self.epoch)
                for batch in self.loader:
                    self.run_step(batch)
                    self.after_step()
                    if self.step >= s.steps:
                        break
                self.epoch += 1
        finally:
            self.bar.close()

    def run_step(self, batch: dict) -> None:
        """One update: the training view, loss terms, backward, clip (if asked), AdamW, EMA; timing, the window."""
        s, t0 = self.s, time.perf_counter()
        torch.manual_seed(rank_seed(derive_seed(s.seed, self.step), self.rank))  # dropout, if any
        x0 = training_view(batch, s.crop, s.flip, seed=s.seed, step=self.step, epoch=self.epoch,
                           sizes=self.sizes)
        terms, t = diffusion_forward(self.net, x0, batch["index"], s.seed, self.step, self.tables, self.amp_dtype)
        loss = terms["loss"].mean()
        self.grad_norm = optimizer_step(loss, self.model, self.ema, self.opt, self.scaler, s.grad_clip,
                                        ema_decay(s.ema_rate, self.step, s.ema_warmup),
                                        lambda: self.hooks.after_backward(self, self.step + 1))
        loss_val = loss.item()
        if not math.isfinite(loss_val):
            raise SystemExit(f"loss is {loss_val} at step {self.step}: lower --lr or check the data")
        self.step += 1
        if self.step > 2:  # allocator / first-call warm-up excluded
            self.timed, self.timed_s = self.timed + 1, self.timed_s + time.perf_counter() - t0
        self.window.add(terms, t)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss_val:.4f}")

    def after_step(self) -> None:
        """Log, evaluate, checkpoint and stop on their schedules."""
        s, step = self.s, self.step
        if step % s.log_every == 0 or step == s.steps:
            self.log.write(event="step", step=step, grad_norm=float(self.grad_norm), steps_per_s=self.steps_per_s,
                           images_per_s=self.steps_per_s * s.batch_size, **self.window.record())
        if self.is_main and (step % s.eval_every == 0 or step == s.steps):
            rows = self.evaluate(step)
            self.bar.write(f"step {step}: EMA one-step PSNR gain " + ", ".join(
                f"t={r['t']} {r['gain']:+.1f} dB" for r in rows))
        if s.stop_after_steps is not None and step == s.stop_after_steps:
            os.kill(os.getpid(), signal.SIGTERM)
        if self.stop_requested():
            self.bar.close()
            self.interrupt(lambda: self.save(step), f"step {step}", step=step)
        if step % s.save_every == 0 and step < s.steps:
            self.save(step)

    @property
    def steps_per_s(self) -> float:
        return self.timed / self.timed_s if self.timed_s else float("nan")

    def evaluate(self, at: int) -> list[dict]:
        """One-step PSNR by t of the EMA and raw weights on the held-out images (rank 0); the EMA rows."""
        rows = {}
        for name, m in (("ema", self.ema), ("raw", self.model)):
            m.eval()
            rows[name] = psnr_table(ModelFn(m, self.schedule), self.held, ts=PSNR_TS, seed=self.s.seed)
            m.train()
        self.log.write(event="psnr", step=at, held_out=len(self.held), ema=rows["ema"], raw=rows["raw"])
        return rows["ema"]

    def save(self, at: int) -> None:
        self.save_state({"model": self.model.state_dict(), "ema": self.ema.state_dict(),
                         "optimizer": self.opt.state_dict(), "scaler": self.scaler.state_dict(), "step": at,
                         "identity": self.identity, "hyper": self.hyper} if self.is_main else {})

    def finish(self) -> dict:
        """Export the EMA weights (rank 0) with their sidecar and the PNG grid; the summary."""
        s = self.s
        summary = {"steps": self.step, "steps_per_s": self.steps_per_s,
                   "train_seconds": time.perf_counter() - self.t_start, "run_dir": str(self.run_dir),
                   "out": str(self.out)}
        summary["images_per_s"] = summary["steps_per_s"] * s.batch_size
        if self.is_main:
            summary["psnr"] = self.export(summary)
        self.sync()
        return summary

    def export(self, summary: dict) -> list[dict]:
        s, ema = self.s, self.ema
        ema.eval()
        rows = psnr_table(ModelFn(ema, self.schedule), self.held, ts=PSNR_TS, seed=s.seed)
        self.say(format_psnr_table(rows, f"EMA weights, {len(self.held)} held-out images: one-step PSNR (dB)"))
        gain = next(r["gain"] for r in rows if r["t"] == WEAK_GAIN_T)
        if gain < WEAK_GAIN_DB:
            self.say(f"warning: the exported EMA weights hardly denoise: one-step PSNR gain {gain:+.2f} dB at t = "
                     f"{WEAK_GAIN_T} on the held-out images (< {WEAK_GAIN_DB:g} dB); train longer (--steps), or "
                     "lower --ema-rate / keep --ema-warmup so the EMA follows the training")
        meta = {"steps": self.step, "seed": s.seed, "batch_size": s.batch_size, **self.hyper, "weights": "ema",
                "data": str(Path(s.data).resolve()), "data_fingerprint": self.fingerprint,
                "train_images": len(self.train_index), "run_dir": str(self.run_dir.resolve()),
                "command": ["python", "-m", "diffaug_fast.train_denoiser", *self.argv],
                "held_out_psnr": rows, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        try:
            export_checkpoint(ema.state_dict(), self.cfg, self.out, meta)
        except OSError as e:
            raise SystemExit(f"cannot write --out {self.out}: {e.strerror or e}; the trained run is kept in "
                             f"{self.run_dir}: free space (or fix the folder), then rerun the same command with "
                             "--resume to export it") from None
        grid = save_grid_png(ModelFn(ema, self.schedule), self.schedule, self.held[:6], self.run_dir / "denoising.png",
                             s.seed, f"one-step denoising, EMA weights after {self.step} steps")
        self.say(f"wrote {self.out} (+ .safetensors, .json) and {grid}; {summary['steps_per_s']:.2f} steps/s, "
                 f"{summary['images_per_s']:.1f} images/s")
        self.log.write(event="summary", **summary, psnr=rows)
        return rows

    def close(self) -> None:
        super().close()
        if self.out_lock is not None:
            os.close(self.out_lock)  # frees --out's lock
            self.out_lock = None


def main(argv: list[str] | None = None, *, single_process: bool = False) -> dict:
    """Train as the command line says; returns a summary dict. ``single_process=True`` trains in this process
    alone even inside a torchrun job (the demo's denoiser, built by rank 0 while the others wait)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    s = parse_args(argv)
    if not s.data:
        raise SystemExit("--data DIR is required (an ImageFolder tree of training images)")
    check_numbers(s)
    world = None
    if single_process:
        world = World(0, 1, torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else
                      torch.device("cpu"))
    return DenoiserTrainer(s, argv, world).run()
