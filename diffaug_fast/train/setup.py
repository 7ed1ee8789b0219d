"""The classifier trainer's set-up, in the order ``Trainer.run`` calls it: settings checked and resolved once,
data scanned and checked, the run folder locked, model / optimizer / UNet built, a checkpoint restored, the
run described. (A mixin of :class:`~diffaug_fast.train.engine.Trainer`, which holds the loop.)"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections import Counter
from pathlib import Path

import torch

from ..bank import BankError, BankReader, open_for_training
from ..data import build_loader, scan_dataset
from ..data.base import INTERPOLATIONS
from ..diffusion.denoiser import Denoiser, load_denoiser
from ..diffusion.unet import UNet, get_preset
from ..distributed import gather_objects
from ..eval.ensemble import eval_geometry
from ..hardware import fast_half_dtype
from ..runs import LAST, PREV

__all__ = ["SetupMixin", "FAST_UNET", "load_unet", "open_bank_for_training", "one_line"]

# the UNet's fast path for online DiffAug (bench/NOTES.md): only the eps rows of the last conv,
# channels_last on GPU, GroupNorm + scale/shift + SiLU fused (the CPU float32 kernel)
FAST_UNET = dict(eps_only=True, channels_last=None, fused_norm=True)


def one_line(e: BaseException) -> str:
    text = str(e).strip()
    if text.startswith("Caught ") and "worker process" in text.splitlines()[0]:
        # re-raised from a DataLoader worker: the message is the worker's traceback, its last line the error
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return text.splitlines()[0] if text else type(e).__name__


def amp_dtype_for(device: torch.device, say) -> torch.dtype | None:
    """--amp: fp16 on GPU, bf16 on a CPU with native bf16, else float32 (bf16 emulation is far slower)."""
    dtype = fast_half_dtype(device)
    if dtype is None:
        say(f"--amp: this CPU ({torch.backends.cpu.get_cpu_capability()}) has no native bf16, where bf16 autocast "
            "is ~25x slower than float32: training in float32")
    return dtype


def load_unet(s, device: torch.device) -> Denoiser:
    """--unet's checkpoint on the fast path, else a random-weight UNet of --unet-preset (default adm-tiny)."""
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
        raise SystemExit(f"--diffaug bank:{path}: {one_line(e)}") from None


def _scan(root: Path, strict: bool, progress: bool):
    try:
        return scan_dataset(root, strict=strict, progress=progress)
    except ValueError as e:  # no class folders, no valid image, a bad image under --strict: one line
        msg = one_line(e)
        raise SystemExit(msg if str(root) in msg else f"{root}: {msg}") from None


class SetupMixin:
    """Set-up steps of :class:`Trainer`; each reads ``self.s`` and replaces it (frozen) only to resolve it."""

    def check_settings(self) -> None:
        s = self.s
        if s.batch_size % self.size:
            raise SystemExit(f"--batch-size {s.batch_size} is not divisible by the {self.size} processes")
        if s.batch_size < 1 or (s.epochs is not None and s.epochs < 0):
            raise SystemExit("--batch-size must be >= 1 and --epochs >= 0")
        self.bank_dir = s.diffaug[5:] if s.diffaug.startswith("bank:") else None
        if s.diffaug not in ("off", "online") and not self.bank_dir:
            raise SystemExit(f"--diffaug {s.diffaug!r}: expected off, online or bank:BANK_DIR")
        if s.diffaug_fraction is not None and not 0.0 <= s.diffaug_fraction <= 1.0:
            raise SystemExit("--diffaug-fraction must lie in [0, 1]")
        if s.bank_on_bad not in ("error", "online"):
            raise SystemExit(f"--bank-on-bad {s.bank_on_bad!r}: expected error or online")
        if s.eval_crop_ratio is not None and not 0 < s.eval_crop_ratio <= 1:
            raise SystemExit(f"--eval-crop-ratio {s.eval_crop_ratio}: must lie in (0, 1]")
        if s.eval_interpolation not in INTERPOLATIONS:
            raise SystemExit(f"--eval-interpolation {s.eval_interpolation!r}: choose {' or '.join(INTERPOLATIONS)}")
        if s.resume and s.overwrite:
            raise SystemExit("--resume and --overwrite contradict each other: choose one")
        if s.run_name is not None and (s.run_name in ("", ".", "..") or Path(s.run_name).name != s.run_name):
            # the run folder is --out/NAME: a path would put it (and --overwrite's deletions) outside --out
            raise SystemExit(f"--run-name {s.run_name!r}: give a plain folder name (no '/', not '.' or '..'); "
                             "the run is written to --out/NAME")
        self.demo = s.data is None and self.recipe.demo is not None
        if s.data is None and not self.demo:
            raise SystemExit("--data DIR is required (a folder with train/ and val/)")

    def setup_data(self) -> None:
        """Scan train/ and val/, check them against each other, build the train loader (before any run folder
        is touched: a bad dataset or batch size costs nothing)."""
        if self.demo:  # the embedded demo's data and denoiser, made once and cached
            self.s = self.recipe.demo.prepare(self)
        s, say = self.s, self.say
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
        self._check_classes(root)
        if self.is_main:
            for idx in (self.train_index, self.val_index):
                if idx.bad:
                    say(idx.report())
        self.per_rank = s.batch_size // self.size
        self.geometry = dict(crop_size=s.image_size, resize_size=s.resize_size)
        # the val / final evaluation's view: the recipe's protocol (rn50: 0.875 bilinear; vit: 1.0 bicubic)
        self.eval_geometry = eval_geometry(s.image_size, s.eval_crop_ratio or s.image_size / s.resize_size,
                                           s.eval_interpolation)
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
        self._check_steps()

    def _check_classes(self, root: Path) -> None:
        counts = Counter(self.train_index.labels)
        empty = [c for i, c in enumerate(self.classes) if counts[i] == 0]
        if empty:
            msg = (f"{root / 'train'}: {len(empty)} class folder(s) without usable images ({', '.join(empty[:5])}"
                   f"{', ...' if len(empty) > 5 else ''}): the classifier gets output(s) no image trains")
            if self.s.strict:
                raise SystemExit(msg + " (--strict; add images or remove the folder)")
            self.say(f"warning: {msg}; --strict refuses this")
        unknown = [c for c in self.val_index.classes if c not in set(self.classes)]
        if unknown:
            raise SystemExit(f"{root / 'val'}: {len(unknown)} class folder(s) not among the {len(self.classes)} "
                             f"training classes: {', '.join(unknown[:5])}{', ...' if len(unknown) > 5 else ''}")

    def _check_steps(self) -> None:
        s, n = self.s, len(self.train_index)
        if s.epochs is None and not s.max_steps:
            raise SystemExit("give --epochs or --max-steps")
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

    def resolve_settings(self) -> None:
        """What the flags leave open, fixed once: the DiffAug fraction, epochs for a step budget, the run
        folder's name, and --resume of a run killed before its first checkpoint (it starts afresh)."""
        s = self.s
        fraction = s.diffaug_fraction if s.diffaug_fraction is not None else float(s.diffaug == "online")
        # a step budget (finetune recipes): as many epochs as --max-steps needs
        epochs = s.epochs if s.epochs is not None else -(-s.max_steps // max(self.steps_per_epoch, 1))
        name = s.run_name or (self.recipe.demo.run_name if self.demo else
                              f"{self.recipe.name}-{s.diffaug.split(':')[0]}-{time.strftime('%Y%m%d-%H%M%S')}")
        path = Path(s.out) / name
        self.fresh = s.resume and path.is_dir() and not any((path / f).exists() for f in (LAST, PREV))
        if self.fresh:  # killed before its first checkpoint: nothing to continue, nothing lost by starting over
            self.say(f"--resume: {path} has no checkpoint yet (stopped during its first epoch): starting it afresh")
        self.s = dataclasses.replace(s, diffaug_fraction=fraction, epochs=epochs, run_name=name,
                                     resume=s.resume and not self.fresh)

    def open_run_dir(self) -> None:
        """Lock the run folder (rank 0), refusing an existing run unless --resume / --overwrite."""
        s = self.s
        self.run_dir = Path(s.out) / s.run_name
        self.open_folder(self.run_dir, resume=s.resume, overwrite=s.overwrite or self.fresh,
                         reuse=self.demo and not s.resume)
        if self.is_main:
            self.train_index.save_classes(self.run_dir / "classes.json")

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
        ck, path = self.load_state()
        try:
            self.model.load_state_dict(ck["model"])
            self.opt.load_state_dict(ck["optimizer"])
            if self.sched is not None and ck.get("scheduler") is not None:
                self.sched.load_state_dict(ck["scheduler"])
            self.scaler.load_state_dict(ck["scaler"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise SystemExit(f"--resume: {path} does not fit this run's model/optimizer ({one_line(e)[:300]}); "
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
        if self.demo_unet:
            say(self.recipe.demo.note)
        if den is not None and not s.unet:
            say("  note: a random-weight UNet predicts eps = 0, so its 'DiffAug' is only noise; real DiffAug needs a "
                "pretrained checkpoint: --unet 256x256_diffusion_uncond.pt")
        for line in extra:
            say(line)

