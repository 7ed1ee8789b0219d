"""One training loop for every classifier recipe: the [clean; DiffAug] step, online / bank / fraction modes,
DDP under torchrun, locked run folders with atomic two-generation checkpoints and exact resume, tqdm,
JSON-lines logs and evaluation hooks. What a recipe supplies is described in recipe.py beside this file; the
set-up is in setup.py, the step in step.py, what every trainer shares (folder, checkpoints, signals) in core.py.
"""

from __future__ import annotations

import functools
import math
import os
import signal
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from ..bank import BankError
from ..eval.ensemble import evaluate_folder
from ..hardware import keep_freed_memory
from .core import TrainLoop, read_log
from .flags import given_flags, parse_settings, setting
from .recipe import Recipe
from .report import final_report
from .setup import SetupMixin, one_line
from .step import DiffAugPlan, StepParts, Throughput, seed_global_rngs, step_generator, train_step

__all__ = ["EngineSettings", "Recipe", "Trainer", "run", "parse_settings", "given_flags", "setting"]


@dataclass(frozen=True)
class EngineSettings:
    """The flags every recipe has; a recipe subclasses this with its own (model, optimizer) fields."""

    data: str | None = setting(None, "root with train/ and val/ (ImageNet layout); None: the embedded synthetic demo")
    out: str = setting("runs", "folder that holds the run folders")
    run_name: str | None = setting(None, "run folder name under --out (default: recipe-mode-date)")
    epochs: int | None = setting(90, "training epochs (unset: as many as --max-steps needs)")
    batch_size: int = setting(256, "global batch size, over all processes")
    image_size: int = setting(224, "training crop size in pixels (the UNet runs at this size too)")
    resize_size: int = setting(256, "Resize size before the centre crop of the DiffAug and val views")
    eval_crop_ratio: float | None = setting(None, "evaluation view: Resize(image_size / ratio) + CenterCrop(image_size) "
                                                  "(0.875: Resize 256 + CenterCrop 224; 1.0: DeiT-III's); unset: "
                                                  "image_size / resize_size, the DiffAug view's")
    eval_interpolation: str = setting("bilinear", "filter of the evaluation view's Resize: bilinear | bicubic (DeiT-III)")
    amp: bool = setting(False, "mixed precision: fp16 on GPU, bf16 on a CPU with native bf16, else float32")
    compile: bool = setting(False, "torch.compile the classifier")
    channels_last: bool = setting(True, "channels_last memory format for the batch and the classifier")
    sync_bn: bool = setting(True, "SyncBatchNorm under DDP on GPU (the authors' setting); gloo/CPU cannot sync BN")
    loader: str = setting("auto", "data backend: auto | dali | torch")
    workers: int = setting(2, "loader worker processes (threads for DALI)")
    drop_last: bool = setting(True, "False: train on the last partial batch too (needed when batch > dataset)")
    strict: bool = setting(False, "refuse bad images and train class folders without images instead of warning")
    diffaug: str = setting("online", "off | online | bank:BANK_DIR (stored views, see python -m diffaug_fast.bank)")
    diffaug_fraction: float | None = setting(None, "online: default 1.0; bank: share of views made online, default 0")
    bank_on_bad: str = setting("error", "a stored view failing its checksum: error (stop, naming it) | online (remake it)")
    unet: str | None = setting(None, "diffusion checkpoint for DiffAug (OpenAI .pt, .safetensors or a train_denoiser output)")
    unet_preset: str | None = setting(None, "UNet preset name: forces the architecture, or a random-weight UNet without --unet")
    t_min: int = setting(0, "smallest diffusion time t of a DiffAug view")
    t_max: int | None = setting(None, "largest diffusion time t, exclusive (default: the schedule's steps, 1000)")
    seed: int = setting(0, "seed of every random draw (data order, crops, t, noise, init)")
    resume: bool = setting(False, "continue the run in the run folder from its last checkpoint")
    overwrite: bool = setting(False, "start afresh in a folder that holds a run (its checkpoints and log are deleted)")
    eval_every: int = setting(1, "evaluate on val every this many epochs")
    de_eval: bool = setting(True, "DiffAug Ensemble evaluation at the end")
    val_c: str | None = setting(None, "ImageNet-C style tree evaluated at the end (default: DATA/val-c if present; none: skip)")
    log_every: int = setting(10, "write a step line to log.jsonl every this many steps")
    max_steps: int | None = setting(None, "stop after this many steps in total (smoke tests, benchmarks)")
    stop_after_steps: int | None = setting(None, "send ourselves SIGTERM after this many steps (tests the resume path)")
    bench_steps: int = setting(0, "at the end, time this many steps baseline vs DiffAug (the demo does)")
    progress: bool = setting(True, "show progress bars")


class Trainer(SetupMixin, TrainLoop):
    """One run of a recipe: ``Trainer(recipe, settings).run() -> summary dict``."""

    def __init__(self, recipe: Recipe, s):
        super().__init__()
        self.recipe, self.s = recipe, s
        self.model = self.net = self.opt = self.sched = self.den = None
        self.bank = None
        self.demo = self.demo_unet = self.fresh = False
        self.epoch = self.position = self.total_steps = 0

    def run(self) -> dict:
        if self.device.type == "cpu":
            keep_freed_memory()  # big CPU tensors reuse their pages (diffaug_fast.hardware)
        try:
            self.check_settings()
            self.setup_data()
            self.resolve_settings()
            self.open_run_dir()
            self.build()
            self.restore()
            self.announce()
            return self.fit()
        except BankError as e:  # a damaged stored view (--bank-on-bad error): named, no traceback
            raise SystemExit(f"--diffaug {self.s.diffaug}: {one_line(e)}; --bank-on-bad online makes damaged "
                             "views online instead, `python -m diffaug_fast.bank verify --repair` rebuilds them") from None
        finally:
            self.close()

    # ------------------------------------------------------------------ checkpoints, schedule, evaluation

    def save(self, epoch: int, position: int) -> None:
        """last.pt atomically (the one it replaces kept as prev.pt) on rank 0; every rank waits for it."""
        self.save_state({"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                         "scheduler": self.sched.state_dict() if self.sched is not None else None,
                         "scaler": self.scaler.state_dict(), "epoch": epoch, "position": position,
                         "total_steps": self.total_steps, "settings": self.settings, "classes": self.classes,
                         "recipe": self.recipe.name} if self.is_main else {})

    def sched_step(self, where: str) -> None:
        """After an update (``where="step"``) or an epoch ("epoch"): torch schedulers step where the recipe
        says; timm schedulers get both calls, with the update count / the next epoch index, as in timm."""
        if self.sched is None:
            return
        if hasattr(self.sched, "step_update"):  # timm.scheduler.Scheduler
            if where == "step":
                self.sched.step_update(self.total_steps)
            else:
                self.sched.step(self.epoch)
        elif self.recipe.schedule == where:
            self.sched.step()

    def evaluate(self, epoch: int) -> None:
        self.hooks.before_eval(self, epoch)
        if self.recipe.evaluate is not None:
            res = self.recipe.evaluate(self, epoch)
        else:
            res = evaluate_folder(self.model, self.val_index, self.classes, batch_size=self.per_rank,
                                  backend=self.s.loader, device=self.device, autocast_dtype=self.amp_dtype,
                                  num_workers=self.s.workers, **self.eval_geometry)
            self.say(f"epoch {epoch}: val top-1 {res['top1']:.2f}% ({res['n']} images)")
        self.log.write(event="eval", epoch=epoch, **res)

    def _eval_pending(self) -> bool:
        """A kill during the evaluation after epoch E leaves a checkpoint at (E, 0) and no eval line: redo it."""
        e = self.epoch
        if not (self.s.resume and self.is_main and self.position == 0 and e > 0 and e % self.s.eval_every == 0):
            return False
        return not any(r.get("event") == "eval" and r.get("epoch") == e for r in read_log(self.log.path))

    def step_parts(self) -> StepParts:
        s = self.s
        buf = torch.empty((2 + self.recipe.num_extra_views) * self.per_rank, 3, s.image_size, s.image_size,
                          device=self.device,
                          memory_format=torch.channels_last if s.channels_last else torch.contiguous_format)
        return StepParts(self.net, self.opt, self.scaler, buf, self.device, self.amp_dtype,
                         DiffAugPlan.of(s, self.den), self.recipe,
                         after_backward=lambda: self.hooks.after_backward(self, self.total_steps + 1))

    # ------------------------------------------------------------------ the loop

    def _finished_before(self, trained: bool) -> bool:
        return trained and self.share(self.is_main and any(r.get("event") == "summary" for r in read_log(self.log.path)))

    def fit(self) -> dict:
        """Train from the restored position to --epochs / --max-steps, then evaluate and report."""
        s = self.s
        # a resumed run whose training is done but whose evaluation/report was cut short just finishes those
        trained = self.epoch >= s.epochs or (s.max_steps is not None and self.total_steps >= s.max_steps)
        if self._finished_before(trained):
            raise SystemExit(f"--resume: {self.run_dir} already finished (epoch {self.epoch}, {self.total_steps} "
                             "steps): nothing to do; raise --epochs or --max-steps to train on")
        if self._eval_pending():
            self.evaluate(self.epoch)
        self.sync()
        parts, meter = self.step_parts(), Throughput(self.size)
        start_epoch, start_pos = self.epoch, self.position
        with self.stop_signals():
            for epoch in range(start_epoch, start_epoch if trained else s.epochs):
                end = self._train_epoch(epoch, start_pos if epoch == start_epoch else 0, parts, meter)
                if end < self.steps_per_epoch:  # --max-steps ends the run inside an epoch
                    self.save(epoch, end)
                    break
                self._end_epoch(epoch)
                if s.max_steps is not None and self.total_steps >= s.max_steps:
                    break
        if self.total_steps == 0:
            raise SystemExit(f"trained 0 steps: --epochs {s.epochs} leaves nothing to do")
        return self._finish(meter)

    def _end_epoch(self, epoch: int) -> None:
        self.epoch = epoch + 1
        self.sched_step("epoch")
        self.save(epoch + 1, 0)
        if self.is_main and (epoch + 1) % self.s.eval_every == 0:
            self.evaluate(epoch + 1)
        self.sync()

    def _train_epoch(self, epoch: int, pos: int, parts: StepParts, meter: Throughput) -> int:
        """Steps ``pos``.. of ``epoch`` (until its end or --max-steps); returns the position reached. A stop
        signal on any rank saves the position and exits on every rank at the same step."""
        s = self.s
        self.epoch = epoch
        self.net.train()
        self.loader.set_epoch(epoch)
        if pos:
            self.loader.load_state_dict({"epoch": epoch, "position": pos})
        bar = tqdm(total=self.steps_per_epoch, initial=pos, desc=f"epoch {epoch + 1}/{s.epochs}", unit="step",
                   disable=not (s.progress and self.is_main), dynamic_ncols=True)
        for step, batch in enumerate(self.loader, start=pos):
            if batch["label"].numel() > 0:  # empty: every image of this batch became unreadable after the scan
                self._one_step(epoch, step, batch, parts, meter, bar)
            bar.update(1)
            if s.stop_after_steps is not None and self.total_steps == s.stop_after_steps:
                os.kill(os.getpid(), signal.SIGTERM)
            if self.stop_requested():  # every rank stops at the same step
                bar.close()
                pos = step + 1
                self.interrupt(functools.partial(self.save, epoch, pos), f"epoch {epoch}, step {pos}", epoch=epoch, position=pos)
            if s.max_steps is not None and self.total_steps >= s.max_steps:
                bar.close()
                return step + 1
        bar.close()
        return self.steps_per_epoch

    def _one_step(self, epoch: int, step: int, batch: dict, parts: StepParts, meter: Throughput, bar) -> None:
        t0 = time.perf_counter()
        g = step_generator(self.s.seed, epoch, step, self.rank, self.device)
        seed_global_rngs(g)
        loss, n_img = train_step(parts, batch, g)
        loss_val = loss.item()  # syncs: the timing below covers the whole step
        self.total_steps += 1
        meter.add(self.total_steps, n_img, batch["clean"].shape[0], time.perf_counter() - t0)
        self.sched_step("step")
        if not math.isfinite(loss_val):
            raise SystemExit(f"loss is {loss_val} at epoch {epoch} step {step}: lower --lr or check the data")
        bar.set_postfix(loss=f"{loss_val:.3f}", img_s=f"{meter.rate:.1f}")
        if step % self.s.log_every == 0:
            self.log.write(event="step", epoch=epoch, step=step, loss=loss_val, lr=self.opt.param_groups[0]["lr"],
                           img_per_s=meter.rate, images_in_batch=n_img)

    def _finish(self, meter: Throughput) -> dict:
        summary: dict = {"img_per_s": meter.rate, "clean_img_per_s": meter.clean_rate, "steps": self.total_steps,
                         "run_dir": str(self.run_dir)}
        self.say(f"trained {self.total_steps} steps; measured {meter.rate:.1f} img/s through the classifier (clean + "
                 f"DiffAug views), {meter.clean_rate:.1f} clean img/s; warm-up and evaluation excluded")
        if self.is_main:
            summary |= (self.recipe.final_report or final_report)(self)
            self.log.write(event="summary", **summary)
        self.sync()
        return summary


def run(recipe: Recipe, s) -> dict:
    """Train ``recipe`` with settings ``s`` (an :class:`EngineSettings` subclass); returns the summary."""
    return Trainer(recipe, s).run()
