"""One training loop for every classifier recipe: the [clean; DiffAug] step, online / bank / fraction modes,
DDP under torchrun, locked run folders with atomic two-generation checkpoints and exact resume, tqdm,
JSON-lines logs and evaluation hooks. A recipe (train/rn50.py, train/vit.py) is settings + a few hooks:

    @dataclass
    class Settings(EngineSettings):           # the engine's flags plus the recipe's own
        lr: float = 0.1

    recipe = Recipe(name="rn50", build_model=..., build_optimizer=...)
    run(recipe, parse_settings(Settings, argv, __doc__, demo={...}))

Hooks (all receive the :class:`Trainer`, whose attributes ``s``, ``device``, ``world``, ``classes``,
``steps_per_epoch``, ``say`` and, once built, ``model``/``opt``/``sched`` they may read):

- ``build_model(tr) -> nn.Module`` on ``tr.device``; seeded with ``s.seed`` before the call.
- ``build_optimizer(tr, model) -> (optimizer, scheduler or None)``. A torch scheduler steps after each
  epoch (``Recipe.schedule = "epoch"``) or after every update (``"step"``). A timm scheduler is driven as
  timm's train.py does, whatever ``schedule`` says: ``step_update(num_updates)`` after every update and
  ``step(epoch + 1)`` after each epoch (its ``t_in_epochs`` picks which one moves the lr).
- ``loss_fn(logits, targets) -> scalar``: applied to the clean half and the DiffAug half, summed.
  Targets are class indices [B] int64 or soft targets [B, C] float (F.cross_entropy takes both).
- ``batch_transform(clean, aug, y, y_aug, g) -> (clean, aug, t_clean, t_aug)``: e.g. Mixup/CutMix.
  clean [b, 3, H, W] and aug [k, 3, H, W] (k <= b; k = 0 without DiffAug) are normalized float views into
  the preallocated batch (in-place edits are free; returned tensors of other storage are copied back);
  y [b], y_aug [k] int64; g the step's torch.Generator (seed global RNGs are also set per step).
- ``extra_views(clean, g) -> list of [b, 3, H, W]`` with ``num_extra_views`` set: more views of the clean
  crop in the same forward (AugMix), and ``extra_loss(logits_clean, [logits_view...], y) -> scalar`` added.
- ``init_state(tr)``: fresh runs only, after model and optimizer exist (``--init`` weights/optimizer).
- ``evaluate(tr, epoch) -> dict`` (default: plain top-1 on val/), ``final_report(tr) -> dict`` (default:
  DiffAug Ensemble, ImageNet-C, step timing, the picture of the views).
- ``clean_transform``: ``fn(pil_image, seed) -> pil_image`` run by the loader on each clean train view after
  crop and flip (RandAugment); the seed comes from (seed, epoch, image), so resume replays it. Torch loader only.
- ``model_settings(tr) -> dict``: entries merged into the checkpoint's ``settings`` (e.g. ``arch``,
  ``model_source``, ``model_kwargs``: what train/eval.py needs to rebuild a timm model).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import random
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from .augment import augment
from .bank import BankError, BankReader, open_for_training
from .data import build_loader, scan_dataset
from .denoiser import Denoiser, load_denoiser
from .distributed import any_rank, barrier, broadcast_object, gather_objects, init_distributed
from .ensemble import IMAGENET_MEAN, IMAGENET_STD, evaluate_folder
from .hardware import fast_half_dtype, keep_freed_memory
from .runs import JsonLog, RunDir, RunError, load_checkpoint_file, open_run

__all__ = ["EngineSettings", "Recipe", "Trainer", "run", "parse_settings", "train_step", "diffaug_half",
           "step_generator", "open_bank_for_training", "FAULT_ENV"]

# test-only fault injection: "step:N" (SIGKILL inside global step N), "save:E" / "save-mid:E" (inside the
# checkpoint write at the end of epoch E: before / in the middle of writing last.pt), "eval:E" (inside the
# evaluation after epoch E). tests/test_faults_train.py kills runs at random points with it.
FAULT_ENV = "DIFFAUG_FAULT"


@dataclass
class EngineSettings:
    """The flags every recipe has; a recipe subclasses this with its own (model, optimizer) fields."""

    data: str | None = None  # root with train/ and val/ (ImageNet layout); None: the embedded synthetic demo
    out: str = "runs"
    run_name: str | None = None
    epochs: int | None = 90  # None: as many as --max-steps needs
    batch_size: int = 256  # global, over all processes
    image_size: int = 224
    resize_size: int = 256
    amp: bool = False
    compile: bool = False
    channels_last: bool = True
    sync_bn: bool = True  # SyncBatchNorm under DDP on GPU (the authors' setting); gloo/CPU cannot sync BN
    loader: str = "auto"  # auto | dali | torch
    workers: int = 2
    drop_last: bool = True  # False: train on the last partial batch too (needed when batch > dataset)
    strict: bool = False  # refuse bad images and train class folders without images instead of warning
    diffaug: str = "online"  # off | online | bank:BANK_DIR (stored views, see python -m diffaug_fast.bank)
    diffaug_fraction: float | None = None  # online: default 1.0; bank: share of views made online, default 0
    bank_on_bad: str = "error"  # a stored view failing its checksum: error (stop, naming it) | online (remake it)
    unet: str | None = None
    unet_preset: str | None = None
    t_min: int = 0
    t_max: int | None = None  # default: the schedule's steps (1000)
    seed: int = 0
    resume: bool = False
    overwrite: bool = False  # start afresh in a folder that holds a run (its checkpoints and log are deleted)
    eval_every: int = 1
    de_eval: bool = True  # DiffAug Ensemble evaluation at the end
    val_c: str | None = None  # ImageNet-C style tree evaluated at the end
    log_every: int = 10
    max_steps: int | None = None  # stop after this many steps in total (smoke tests, benchmarks)
    stop_after_steps: int | None = None  # send ourselves SIGTERM after this many steps (tests the resume path)
    bench_steps: int = 0  # at the end, time this many steps baseline vs DiffAug (the demo does)
    progress: bool = True


def given_flags(cls: type, argv: list[str] | None, description: str, prog: str | None = None) -> dict:
    """The flags given on the command line for the dataclass ``cls``: one ``--flag-name`` per field
    (``--x/--no-x`` for bools, int/float/str from the annotation); flags not given are left out."""
    p = argparse.ArgumentParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            kind = {"int": int, "float": float}.get(f.type.split(" ")[0], str)
            p.add_argument(flag, type=kind, default=None)
    return {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}


def parse_settings(cls: type, argv: list[str] | None, description: str, demo: dict,
                   presets: dict[str, dict] | None = None) -> Any:
    """argparse over the dataclass ``cls`` (``--flag-name``, ``--x/--no-x`` for bools). Defaults under the
    given flags: without --data the ``demo`` ones; with ``--recipe NAME`` (a field of ``cls``) ``presets[NAME]``."""
    given = given_flags(cls, argv, description)
    defaults = dict(demo) if given.get("data") is None else {}
    if given.get("recipe") is not None:
        if given["recipe"] not in (presets or {}):
            raise SystemExit(f"--recipe {given['recipe']!r}: unknown; choose one of {', '.join(presets or {})}")
        defaults = presets[given["recipe"]]
    return cls(**{**defaults, **given})


@dataclass
class Recipe:
    """What a training script supplies; see the module docstring for each hook's contract."""

    name: str
    build_model: Callable[[Trainer], torch.nn.Module]
    build_optimizer: Callable[[Trainer, torch.nn.Module], tuple[torch.optim.Optimizer, Any]]
    schedule: str = "epoch"  # "epoch" | "step": when the scheduler steps
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy
    batch_transform: Callable | None = None
    num_extra_views: int = 0
    extra_views: Callable | None = None
    extra_loss: Callable | None = None
    init_state: Callable[[Trainer], None] | None = None
    evaluate: Callable[[Trainer, int], dict] | None = None
    final_report: Callable[[Trainer], dict] | None = None
    describe: Callable[[Trainer], list[str]] | None = None  # extra lines printed at the start
    clean_transform: Callable | None = None  # fn(pil_image, seed) on the clean train view (torch loader only)
    model_settings: Callable[[Trainer], dict] | None = None  # added to the checkpoint's settings (for eval.py)


DEFAULT_RECIPE_HOOKS = Recipe(name="default", build_model=None, build_optimizer=None)  # type: ignore[arg-type]

# the UNet's fast path for online DiffAug (bench/NOTES.md): only the eps rows of the last conv,
# channels_last on GPU, GroupNorm + scale/shift + SiLU fused (the CPU float32 kernel)
FAST_UNET = dict(eps_only=True, channels_last=None, fused_norm=True)


# ---------------------------------------------------------------------------------------------------- helpers


def step_generator(s, epoch: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    """All randomness of one step comes from here: a resumed run replays it exactly."""
    return torch.Generator(device=device).manual_seed(((s.seed * 1_000_003 + epoch) * 1_000_003 + step) * 4099 + rank)


def seed_global_rngs(g: torch.Generator) -> None:
    """Global RNGs (dropout / drop-path, timm's Mixup via numpy, torchvision transforms) follow the step seed."""
    seed = g.initial_seed()
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def amp_dtype_for(device: torch.device, say) -> torch.dtype | None:
    """--amp: fp16 on GPU, bf16 on a CPU with native bf16, else float32 (bf16 emulation is far slower)."""
    dtype = fast_half_dtype(device)
    if dtype is None:
        say(f"--amp: this CPU ({torch.backends.cpu.get_cpu_capability()}) has no native bf16, where bf16 autocast "
            "is ~25x slower than float32: training in float32")
    return dtype


def load_unet(s, device: torch.device) -> Denoiser:
    from .unet import UNet, get_preset

    if s.unet:
        try:
            return load_denoiser(s.unet, s.unet_preset, device=device, **FAST_UNET)
        except Exception as e:  # CheckpointError and friends: one line, no traceback
            raise SystemExit(f"--unet {s.unet}: {e}") from None
    torch.manual_seed(s.seed)
    preset = s.unet_preset or "adm-tiny"
    return Denoiser(UNet(get_preset(preset)).to(device), name=f"{preset} (random weights)", **FAST_UNET)


def open_bank_for_training(path: str, index, train_root: Path, s) -> BankReader:
    """The bank, refused (one line naming the first differing field) unless its views were made from exactly
    this training set (file list, labels, content), geometry, t range and UNet checkpoint (when given)."""
    try:
        return open_for_training(path, index, train_root, unet_path=s.unet, image_size=s.image_size,
                                 resize_size=s.resize_size, t_range=(s.t_min, s.t_max), on_bad=s.bank_on_bad)
    except (BankError, OSError, ValueError, KeyError) as e:
        raise SystemExit(f"--diffaug bank:{path}: {_one_line(e)}") from None


def _fault(kind: str, value: int) -> None:
    """Test-only: SIGKILL ourselves at the point named by $DIFFAUG_FAULT (see FAULT_ENV)."""
    if os.environ.get(FAULT_ENV) == f"{kind}:{value}":
        os.kill(os.getpid(), signal.SIGKILL)


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    if text.startswith("Caught ") and "worker process" in text.splitlines()[0]:
        # re-raised from a DataLoader worker: the message is the worker's traceback, its last line the error
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return text.splitlines()[0] if text else type(e).__name__


# ---------------------------------------------------------------------------------------------------- step


def diffaug_half(batch: dict, labels: torch.Tensor, den: Denoiser | None, s, g: torch.Generator,
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
        augment(sel, den, t_range=(s.t_min, s.t_max or den.num_steps), generator=g, mean=IMAGENET_MEAN,
                std=IMAGENET_STD, out=out[:k])
    if bank is None:
        return labels if online is None else labels.index_select(0, online)
    if k == b:
        return labels
    stored = perm[k:] if perm is not None else torch.arange(b, device=device)
    out[k:b].copy_(bank.to(device, non_blocking=True).index_select(0, stored))
    ok = batch.get("bank_ok")
    if ok is not None and not bool(ok.all()):  # damaged stored views (--bank-on-bad online): made online instead
        bad = (~ok.to(device)).index_select(0, stored).nonzero().squeeze(1)
        if den is None:
            raise RuntimeError("a damaged bank view must be made online, but no UNet is loaded")
        fixed = augment(batch["diffaug"].to(device).index_select(0, stored.index_select(0, bad)), den,
                        t_range=(s.t_min, s.t_max or den.num_steps), generator=g, mean=IMAGENET_MEAN, std=IMAGENET_STD)
        out[k:b].index_copy_(0, bad, fixed.to(out.dtype))
    return labels if perm is None else labels.index_select(0, perm)


def _into(buf_part: torch.Tensor, x: torch.Tensor) -> None:
    if x.data_ptr() != buf_part.data_ptr() or x.shape != buf_part.shape:
        buf_part.copy_(x)


def train_step(model, opt, scaler, batch: dict, den, s, g: torch.Generator, buf: torch.Tensor,
               device: torch.device, amp_dtype, recipe: Recipe | None = None, fault_step: int | None = None):
    """One update on [clean; extra views; DiffAug] in one forward. Returns (loss detached, images trained on).

    buf: the preallocated [(2 + num_extra_views) * B, 3, H, W] batch the views are written into.
    """
    r = recipe or DEFAULT_RECIPE_HOOKS
    clean = batch["clean"].to(device, non_blocking=True)
    y = batch["label"].to(device, non_blocking=True)
    b, n_extra = clean.shape[0], r.num_extra_views
    buf[:b].copy_(clean)
    if n_extra:
        for i, v in enumerate(r.extra_views(buf[:b], g)):
            _into(buf[(1 + i) * b:(2 + i) * b], v)
    a0 = (1 + n_extra) * b  # the DiffAug half starts here
    y_aug = diffaug_half(batch, y, den, s, g, buf[a0:a0 + b], device)
    k = y_aug.shape[0]
    t_clean, t_aug = y, y_aug
    if r.batch_transform is not None:
        xc, xa, t_clean, t_aug = r.batch_transform(buf[:b], buf[a0:a0 + k], y, y_aug, g)
        _into(buf[:b], xc)
        if k:
            _into(buf[a0:a0 + k], xa)
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        logits = model(buf[: a0 + k]).float()
        loss = r.loss_fn(logits[:b], t_clean)
        if k:
            loss = loss + r.loss_fn(logits[a0:], t_aug)
        if n_extra:
            loss = loss + r.extra_loss(logits[:b], [logits[(1 + i) * b:(2 + i) * b] for i in range(n_extra)], y)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if fault_step is not None:
        _fault("step", fault_step)
    scaler.step(opt)
    scaler.update()
    return loss.detach(), (1 + n_extra) * b + k


# ---------------------------------------------------------------------------------------------------- the loop


class _Throughput:
    """img/s over every image the classifier trains on (clean + extra + DiffAug views), and clean img/s;
    the first ``warmup`` steps (compile, allocator) are left out."""

    def __init__(self, world: int, warmup: int = 2):
        self.world, self.warmup = world, warmup
        self.images = self.clean = 0
        self.seconds = 0.0

    def add(self, step: int, images: int, clean: int, seconds: float) -> None:
        if step > self.warmup:
            self.images += images * self.world
            self.clean += clean * self.world
            self.seconds += seconds

    @property
    def rate(self) -> float:
        return self.images / self.seconds if self.seconds else float("nan")

    @property
    def clean_rate(self) -> float:
        return self.clean / self.seconds if self.seconds else float("nan")


class Trainer:
    """One run of a recipe: ``Trainer(recipe, settings).run() -> summary dict`` (see the module docstring)."""

    def __init__(self, recipe: Recipe, s):
        self.recipe, self.s = recipe, s
        self.world = init_distributed()
        self.rank, self.size, self.device = self.world.rank, self.world.size, self.world.device
        self.is_main = self.rank == 0
        self.say = print if self.is_main else (lambda *a, **k: None)
        self.model = self.net = self.opt = self.sched = self.den = None
        self.bank = None
        self.epoch = self.position = self.total_steps = 0
        self.saves = 0

    # ------------------------------------------------------------------ setup, in the order run() calls it

    def check_settings(self) -> None:
        s = self.s
        if s.batch_size % self.size:
            raise SystemExit(f"--batch-size {s.batch_size} is not divisible by the {self.size} processes")
        if s.batch_size < 1 or (s.epochs is not None and s.epochs < 0):
            raise SystemExit("--batch-size must be >= 1 and --epochs >= 0")
        self.bank_dir = s.diffaug[5:] if s.diffaug.startswith("bank:") else None
        if s.diffaug not in ("off", "online") and not self.bank_dir:
            raise SystemExit(f"--diffaug {s.diffaug!r}: expected off, online or bank:BANK_DIR")
        if s.diffaug_fraction is None:
            s.diffaug_fraction = 1.0 if s.diffaug == "online" else 0.0
        if not 0.0 <= s.diffaug_fraction <= 1.0:
            raise SystemExit("--diffaug-fraction must lie in [0, 1]")
        if s.bank_on_bad not in ("error", "online"):
            raise SystemExit(f"--bank-on-bad {s.bank_on_bad!r}: expected error or online")
        if s.resume and s.overwrite:
            raise SystemExit("--resume and --overwrite contradict each other: choose one")

    def setup_data(self) -> None:
        """Scan train/ and val/, check them against each other, build the train loader (before any run folder
        is touched: a bad dataset or batch size costs nothing)."""
        s, say = self.s, self.say
        self.demo = s.data is None
        if self.demo:
            from .synthetic import make_synthetic_dataset

            s.data = broadcast_object(str(make_synthetic_dataset()) if self.is_main else None)
            if not (s.unet or s.unet_preset) and (s.diffaug == "online" or s.de_eval):
                # a denoiser trained on the demo's own images (once, cached beside them): real DiffAug views
                from .denoiser_training import demo_denoiser

                s.unet = broadcast_object(str(demo_denoiser(s.data, say=say)) if self.is_main else None)
                self.demo_unet = True
        root = self.root = Path(s.data)
        if not root.is_dir():
            raise SystemExit(f"--data {root}: no such directory")
        missing = [d for d in ("train", "val") if not (root / d).is_dir()]
        if missing:
            raise SystemExit(f"--data {root}: expected sub-folders train/ and val/ (one folder per class inside "
                             f"each, the ImageNet layout); missing: {', '.join(missing)}")
        show = s.progress and self.is_main
        self.train_index = _scan(root / "train", s.strict, show)
        self.val_index = _scan(root / "val", s.strict, show)
        self.classes = list(self.train_index.classes)
        counts = Counter(self.train_index.labels)
        empty = [c for i, c in enumerate(self.classes) if counts[i] == 0]
        if empty:
            msg = (f"{root / 'train'}: {len(empty)} class folder(s) without usable images ({', '.join(empty[:5])}"
                   f"{', ...' if len(empty) > 5 else ''}): the classifier gets output(s) no image trains")
            if s.strict:
                raise SystemExit(msg + " (--strict; add images or remove the folder)")
            say(f"warning: {msg}; --strict refuses this")
        unknown = [c for c in self.val_index.classes if c not in set(self.classes)]
        if unknown:
            raise SystemExit(f"{root / 'val'}: {len(unknown)} class folder(s) not among the {len(self.classes)} "
                             f"training classes: {', '.join(unknown[:5])}{', ...' if len(unknown) > 5 else ''}")
        if self.is_main:
            for idx in (self.train_index, self.val_index):
                if idx.bad:
                    say(idx.report())
        self.per_rank = s.batch_size // self.size
        self.geometry = dict(crop_size=s.image_size, resize_size=s.resize_size)
        extra = {}
        if self.bank_dir:
            self.bank = open_bank_for_training(self.bank_dir, self.train_index, root / "train", s)
            extra["bank"] = functools.partial(self.bank.epoch_view_bytes, s.seed)  # picklable: loader workers
        self.loader = build_loader(self.train_index, "train", batch_size=self.per_rank, backend=s.loader,
                                   output="float", channels_last=s.channels_last, shard_id=self.rank,
                                   num_shards=self.size, seed=s.seed, num_workers=s.workers, drop_last=s.drop_last,
                                   device=self.device if self.device.type == "cuda" else None, extra_views=extra,
                                   clean_transform=self.recipe.clean_transform, **self.geometry)
        self.steps_per_epoch = len(self.loader)
        n = len(self.train_index)
        if s.epochs is None:  # a step budget (finetune recipes): as many epochs as --max-steps needs
            if not s.max_steps:
                raise SystemExit("give --epochs or --max-steps")
            s.epochs = -(-s.max_steps // max(self.steps_per_epoch, 1))
        if self.steps_per_epoch == 0:
            raise SystemExit(f"--batch-size {s.batch_size} ({self.per_rank} per process) is larger than the {n} "
                             f"training images{f' shared by {self.size} processes' if self.size > 1 else ''}: "
                             "nothing to train; lower --batch-size, or pass --no-drop-last to train on a partial "
                             "batch")
        lengths = gather_objects(self.steps_per_epoch)
        if len(set(lengths)) > 1:
            raise SystemExit(f"--no-drop-last: the {self.size} processes would run {sorted(set(lengths))} steps per "
                             "epoch and wait on each other forever; keep --drop-last, or choose a --batch-size and "
                             "process count that divide the training set")

    def open_run_dir(self) -> None:
        """Lock the run folder (rank 0), refusing an existing run unless --resume / --overwrite."""
        s = self.s
        # the ResNet demo is runs/demo; other recipes' demos get their own folder (each demo starts afresh in it)
        demo_name = "demo" if self.recipe.name == "rn50" else f"demo-{self.recipe.name}"
        s.run_name = s.run_name or (demo_name if self.demo else
                                    f"{self.recipe.name}-{s.diffaug.split(':')[0]}-{time.strftime('%Y%m%d-%H%M%S')}")
        path = Path(s.out) / s.run_name
        error = None
        if s.resume and path.is_dir() and not any((path / f).exists() for f in ("last.pt", "prev.pt")):
            # killed before its first checkpoint: nothing to continue, and nothing lost by starting over
            self.say(f"--resume: {path} has no checkpoint yet (stopped during its first epoch): starting it afresh")
            s.resume, fresh = False, True
        else:
            fresh = False
        if self.is_main:
            try:
                self.rundir = open_run(path, resume=s.resume, overwrite=s.overwrite or fresh,
                                       reuse=self.demo and not s.resume)
            except RunError as e:
                error = str(e)
        error = broadcast_object(error)
        if error:
            raise SystemExit(error)
        if not self.is_main:
            self.rundir = RunDir(path, None)  # other ranks only read checkpoints; rank 0 holds the lock
        self.run_dir = path
        self.log = JsonLog(path / "log.jsonl" if self.is_main else None)
        if self.is_main:
            self.train_index.save_classes(path / "classes.json")

    def build(self) -> None:
        s, dev = self.s, self.device
        torch.manual_seed(s.seed)
        model = self.recipe.build_model(self)
        if s.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.sync_bn = bool(s.sync_bn and self.size > 1 and dev.type == "cuda")
        if s.sync_bn and self.size > 1 and dev.type != "cuda":
            self.say("note: --sync-bn needs GPUs (torch's SyncBatchNorm has no CPU/gloo path): per-process BN here")
        if self.sync_bn:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model
        self.net = torch.nn.parallel.DistributedDataParallel(model) if self.size > 1 else model
        if s.compile:
            self.net = torch.compile(self.net)
        self.opt, self.sched = self.recipe.build_optimizer(self, model)
        self.amp_dtype = amp_dtype_for(dev, self.say) if s.amp else None
        self.scaler = torch.amp.GradScaler(dev.type, enabled=self.amp_dtype == torch.float16)
        wants_unet = s.diffaug == "online" or (self.bank_dir and (s.diffaug_fraction > 0 or s.bank_on_bad == "online"))
        self.den = load_unet(s, dev) if wants_unet else None

    def restore(self) -> None:
        """--resume: the newest readable checkpoint (last.pt, else prev.pt); a fresh run: recipe.init_state."""
        if not self.s.resume:
            if self.recipe.init_state is not None:
                self.recipe.init_state(self)
            return
        path, error = None, None
        if self.is_main:
            try:
                _, path = self.rundir.load_checkpoint(map_location="cpu", say=self.say)
            except RunError as e:
                error = str(e)
        path, error = broadcast_object((str(path) if path else None, error))
        if error:
            raise SystemExit(f"--resume: {error}")
        ck = load_checkpoint_file(path, map_location=self.device)
        try:
            self.model.load_state_dict(ck["model"])
            self.opt.load_state_dict(ck["optimizer"])
            if self.sched is not None and ck.get("scheduler") is not None:
                self.sched.load_state_dict(ck["scheduler"])
            self.scaler.load_state_dict(ck["scaler"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise SystemExit(f"--resume: {path} does not fit this run's model/optimizer ({_one_line(e)[:300]}); "
                             "start afresh with --overwrite or use the settings it was made with") from None
        self.epoch, self.position, self.total_steps = ck["epoch"], ck["position"], ck["total_steps"]
        self.say(f"resumed from {path}: epoch {self.epoch}, step {self.position} of that epoch")

    def announce(self) -> None:
        s, say, den = self.s, self.say, self.den
        self.settings = dataclasses.asdict(s) | {
            "recipe": self.recipe.name, "world_size": self.size, "device": str(self.device),
            "loader_backend": self.loader.backend, "num_classes": len(self.classes), "steps_per_epoch":
            self.steps_per_epoch, "unet_name": den.name if den else None, "resumed": s.resume, "sync_bn_active":
            self.sync_bn, "lr_effective": self.opt.param_groups[0]["lr"] if not s.resume else None}
        if self.recipe.model_settings is not None:
            self.settings |= self.recipe.model_settings(self)
        extra = self.recipe.describe(self) if self.recipe.describe else []
        self.log.write(event="settings", **self.settings, notes=extra)
        say(f"data {self.root} ({len(self.train_index.files)} train / {len(self.val_index.files)} val images, "
            f"{len(self.classes)} classes), loader {self.loader.backend}, {self.size} process(es) on {self.device}")
        mode = (f"bank {self.bank_dir} ({self.bank.views} stored views per image, one per epoch)" if self.bank_dir
                else s.diffaug)
        say(f"DiffAug mode: {mode}" + (
            f", fraction {'online ' if self.bank_dir else ''}{s.diffaug_fraction}, UNet {den.name} "
            f"({'checkpoint ' + s.unet if s.unet else 'no checkpoint'}), t in [{s.t_min}, {s.t_max or den.num_steps})"
            if den else ""))
        if getattr(self, "demo_unet", False):
            say("  the demo's denoiser: an ADM UNet trained on the demo's training images by `python -m "
                "diffaug_fast.train_denoiser` (command and seed in its .json); its one-step PSNR is reported at the end")
        if den is not None and not s.unet:
            say("  note: a random-weight UNet predicts eps = 0, so its 'DiffAug' is only noise; real DiffAug needs a "
                "pretrained checkpoint: --unet 256x256_diffusion_uncond.pt")
        for line in extra:
            say(line)

    # ------------------------------------------------------------------ checkpoints, schedule, evaluation

    def save(self, epoch: int, position: int) -> None:
        """last.pt atomically (the one it replaces kept as prev.pt) on rank 0; every rank waits for it."""
        if self.is_main:
            state = {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                     "scheduler": self.sched.state_dict() if self.sched is not None else None,
                     "scaler": self.scaler.state_dict(), "epoch": epoch, "position": position,
                     "total_steps": self.total_steps, "settings": self.settings, "classes": self.classes,
                     "recipe": self.recipe.name}
            fault = os.environ.get(FAULT_ENV, "")
            if position == 0 and fault in (f"save:{epoch}", f"save-mid:{epoch}"):
                _simulate_killed_save(self.rundir, state, mid=fault.startswith("save-mid"))
            self.rundir.save_checkpoint(state)
        barrier()

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
        _fault("eval", epoch)
        if self.recipe.evaluate is not None:
            res = self.recipe.evaluate(self, epoch)
        else:
            res = evaluate_folder(self.model, self.val_index, self.classes, batch_size=self.per_rank,
                                  backend=self.s.loader, device=self.device, autocast_dtype=self.amp_dtype,
                                  num_workers=self.s.workers, **self.geometry)
            self.say(f"epoch {epoch}: val top-1 {res['top1']:.2f}% ({res['n']} images)")
        self.log.write(event="eval", epoch=epoch, **res)

    def _eval_pending(self) -> bool:
        """A kill during the evaluation after epoch E leaves a checkpoint at (E, 0) and no eval line: redo it."""
        e = self.epoch
        if not (self.s.resume and self.is_main and self.position == 0 and e > 0 and e % self.s.eval_every == 0):
            return False
        return not any(r.get("event") == "eval" and r.get("epoch") == e for r in _read_log(self.log.path))

    # ------------------------------------------------------------------ the loop

    def fit(self) -> dict:
        """Train from the restored position to --epochs / --max-steps, then evaluate and report."""
        s = self.s
        stop = {"signal": None}
        signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(signal=signum))
        signal.signal(signal.SIGINT, lambda signum, frame: stop.update(signal=signum))
        # a resumed run whose training is done but whose evaluation/report was cut short just finishes those
        trained = self.epoch >= s.epochs or (s.max_steps is not None and self.total_steps >= s.max_steps)
        if trained and broadcast_object(self.is_main and any(r.get("event") == "summary"
                                                             for r in _read_log(self.log.path))):
            raise SystemExit(f"--resume: {self.run_dir} already finished (epoch {self.epoch}, {self.total_steps} "
                             "steps): nothing to do; raise --epochs or --max-steps to train on")
        if self._eval_pending():
            self.evaluate(self.epoch)
        barrier()
        buf = torch.empty((2 + self.recipe.num_extra_views) * self.per_rank, 3, s.image_size, s.image_size,
                          device=self.device,
                          memory_format=torch.channels_last if s.channels_last else torch.contiguous_format)
        meter = _Throughput(self.size)
        start_epoch, start_pos = self.epoch, self.position
        for epoch in range(start_epoch, start_epoch if trained else s.epochs):
            end = self._train_epoch(epoch, start_pos if epoch == start_epoch else 0, buf, stop, meter)
            done = s.max_steps is not None and self.total_steps >= s.max_steps
            if end < self.steps_per_epoch:  # --max-steps ends the run inside an epoch
                self.save(epoch, end)
                break
            self.epoch = epoch + 1
            self.sched_step("epoch")
            self.save(epoch + 1, 0)
            if self.is_main and (epoch + 1) % s.eval_every == 0:
                self.evaluate(epoch + 1)
            barrier()
            if done:
                break
        if self.total_steps == 0:
            raise SystemExit(f"trained 0 steps: --epochs {s.epochs} leaves nothing to do")
        return self._finish(meter)

    def _train_epoch(self, epoch: int, pos: int, buf: torch.Tensor, stop: dict, meter: _Throughput) -> int:
        """Steps ``pos``.. of ``epoch`` (until its end or --max-steps); returns the position reached. A stop
        signal on any rank saves the position and exits on every rank at the same step."""
        s, dev = self.s, self.device
        self.epoch = epoch
        self.net.train()
        self.loader.set_epoch(epoch)
        if pos:
            self.loader.load_state_dict({"epoch": epoch, "position": pos})
        bar = tqdm(total=self.steps_per_epoch, initial=pos, desc=f"epoch {epoch + 1}/{s.epochs}", unit="step",
                   disable=not (s.progress and self.is_main), dynamic_ncols=True)
        for step, batch in enumerate(self.loader, start=pos):
            if batch["label"].numel() == 0:  # every image of this batch became unreadable after the scan
                bar.update(1)
                continue
            t0 = time.perf_counter()
            g = step_generator(s, epoch, step, self.rank, dev)
            seed_global_rngs(g)
            loss, n_img = train_step(self.net, self.opt, self.scaler, batch, self.den, s, g, buf, dev, self.amp_dtype,
                                     self.recipe, fault_step=self.total_steps + 1)
            loss_val = loss.item()  # syncs: the timing below covers the whole step
            self.total_steps += 1
            meter.add(self.total_steps, n_img, batch["clean"].shape[0], time.perf_counter() - t0)
            self.sched_step("step")
            if not math.isfinite(loss_val):
                raise SystemExit(f"loss is {loss_val} at epoch {epoch} step {step}: lower --lr or check the data")
            bar.set_postfix(loss=f"{loss_val:.3f}", img_s=f"{meter.rate:.1f}")
            bar.update(1)
            if step % s.log_every == 0:
                self.log.write(event="step", epoch=epoch, step=step, loss=loss_val, lr=self.opt.param_groups[0]["lr"],
                               img_per_s=meter.rate, images_in_batch=n_img)
            if s.stop_after_steps is not None and self.total_steps == s.stop_after_steps:
                os.kill(os.getpid(), signal.SIGTERM)
            if any_rank(stop["signal"] is not None, dev):  # every rank stops at the same step
                bar.close()
                self.save(epoch, step + 1)
                self.say(f"\ninterrupted: checkpoint saved at epoch {epoch}, step {step + 1}; continue with --resume")
                self.log.write(event="interrupted", epoch=epoch, position=step + 1)
                if self.size > 1:
                    dist.destroy_process_group()
                sys.exit(128 + (stop["signal"] or signal.SIGTERM))
            if s.max_steps is not None and self.total_steps >= s.max_steps:
                bar.close()
                return step + 1
        bar.close()
        return self.steps_per_epoch

    def _finish(self, meter: _Throughput) -> dict:
        summary: dict = {"img_per_s": meter.rate, "clean_img_per_s": meter.clean_rate, "steps": self.total_steps,
                         "run_dir": str(self.run_dir)}
        self.say(f"trained {self.total_steps} steps; measured {meter.rate:.1f} img/s through the classifier (clean + "
                 f"DiffAug views), {meter.clean_rate:.1f} clean img/s; warm-up and evaluation excluded")
        if self.is_main:
            from .training_report import final_report

            summary |= (self.recipe.final_report or final_report)(self)
            self.log.write(event="summary", **summary)
        barrier()
        return summary

    def run(self) -> dict:
        if self.device.type == "cpu":
            keep_freed_memory()  # big CPU tensors reuse their pages (diffaug_fast.hardware)
        try:
            self.check_settings()
            self.setup_data()
            self.open_run_dir()
            self.build()
            self.restore()
            self.announce()
            return self.fit()
        except BankError as e:  # a damaged stored view (--bank-on-bad error): named, no traceback
            raise SystemExit(f"--diffaug {self.s.diffaug}: {_one_line(e)}; --bank-on-bad online makes damaged "
                             "views online instead, `python -m diffaug_fast.bank verify --repair` rebuilds them") from None
        finally:
            if getattr(self, "rundir", None) is not None:
                self.rundir.close()  # frees the run-folder lock (in-process callers run again)
            if self.size > 1 and dist.is_initialized():
                dist.destroy_process_group()


def run(recipe: Recipe, s) -> dict:
    """Train ``recipe`` with settings ``s`` (an :class:`EngineSettings` subclass); returns the summary."""
    return Trainer(recipe, s).run()


def _scan(root: Path, strict: bool, progress: bool):
    try:
        return scan_dataset(root, strict=strict, progress=progress)
    except ValueError as e:  # no class folders, no valid image, a bad image under --strict: one line
        msg = _one_line(e)
        raise SystemExit(msg if str(root) in msg else f"{root}: {msg}") from None


def _read_log(path: Path | None) -> list[dict]:
    """The run's JSON-lines log; a line cut by a kill is skipped."""
    import json

    recs = []
    if path is not None and path.exists():
        for line in path.read_text().splitlines():
            try:
                recs.append(json.loads(line))
            except ValueError:
                continue
    return recs


def _simulate_killed_save(run: RunDir, state: dict, mid: bool) -> None:
    """Test-only: die as a kill during RunDir.save_checkpoint would leave things: last.pt already rotated to
    prev.pt and (mid) half a temp file written."""
    if run.last.exists():
        os.replace(run.last, run.prev)
    if mid:
        import io

        data = io.BytesIO()
        torch.save(state, data)
        with open(run.path / f".{run.last.name}.killed.tmp", "wb") as f:
            f.write(data.getvalue()[: len(data.getvalue()) // 2])
    os.kill(os.getpid(), signal.SIGKILL)
