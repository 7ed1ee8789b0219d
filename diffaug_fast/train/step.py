"""One classifier training step: [clean; extra views; DiffAug] in one forward, written into one preallocated
batch; and the per-step randomness that makes a resumed run replay its steps exactly."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..constants import IMAGENET_MEAN, IMAGENET_STD, derive_seed, rank_seed
from ..diffusion.denoiser import Denoiser
from ..ops.augment import augment
from .recipe import STEP_ONLY, Recipe

__all__ = ["DiffAugPlan", "StepParts", "train_step", "diffaug_half", "step_generator", "seed_global_rngs",
           "Throughput"]


def step_generator(seed: int, epoch: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    """All randomness of one step comes from here: a resumed run replays it exactly."""
    return torch.Generator(device=device).manual_seed(rank_seed(derive_seed(seed, epoch, step), rank))


def seed_global_rngs(g: torch.Generator) -> None:
    """Global RNGs (dropout / drop-path, timm's Mixup via numpy, torchvision transforms) follow the step seed."""
    seed = g.initial_seed()
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


@dataclass(frozen=True)
class DiffAugPlan:
    """The DiffAug half of a step: the denoiser (None: no online views), the share of each batch made online
    (the rest, in bank mode, are stored views) and the t range [t_min, t_max) (t_max None: the schedule's)."""

    den: Denoiser | None
    fraction: float
    t_min: int = 0
    t_max: int | None = None

    @classmethod
    def of(cls, s, den: Denoiser | None) -> DiffAugPlan:
        """From settings with ``diffaug_fraction``, ``t_min`` and ``t_max``."""
        return cls(den, s.diffaug_fraction, s.t_min, s.t_max)

    @property
    def t_range(self) -> tuple[int, int]:
        return self.t_min, self.t_max or self.den.num_steps


@dataclass(frozen=True)
class StepParts:
    """What stays the same from step to step: the classifier and its optimizer, the preallocated batch
    ``buf`` [(2 + num_extra_views) * B, 3, H, W], the device and autocast dtype, the recipe's step hooks,
    the DiffAug plan, and a callback run between backward and the update (tests act there)."""

    model: torch.nn.Module
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    buf: torch.Tensor
    device: torch.device
    amp_dtype: torch.dtype | None
    diffaug: DiffAugPlan
    recipe: Recipe = field(default_factory=lambda: STEP_ONLY)
    after_backward: Callable[[], None] | None = None


def diffaug_half(batch: dict, labels: torch.Tensor, plan: DiffAugPlan, g: torch.Generator, out: torch.Tensor,
                 device: torch.device) -> torch.Tensor:
    """Fill ``out`` (the DiffAug half of the preallocated batch) and return its labels.

    online: DiffAug of a random ``plan.fraction`` of the Resize+CenterCrop views, written by the fused op
    straight into ``out`` (no torch.cat). bank: the stored views read by the loader, except a random
    ``plan.fraction`` of them made online instead.
    """
    den = plan.den
    b = labels.shape[0]
    bank = batch.get("bank")
    k = 0 if den is None else round(plan.fraction * b)
    if bank is None and k == 0:
        return labels[:0]
    perm = torch.randperm(b, generator=g, device=g.device).to(device) if 0 < k < b else None
    online = perm[:k] if perm is not None else None
    if k:
        view = batch["diffaug"].to(device, non_blocking=True)
        sel = view if online is None else view.index_select(0, online)
        augment(sel, den, t_range=plan.t_range, generator=g, mean=IMAGENET_MEAN, std=IMAGENET_STD, out=out[:k])
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
                        t_range=plan.t_range, generator=g, mean=IMAGENET_MEAN, std=IMAGENET_STD)
        out[k:b].index_copy_(0, bad, fixed.to(out.dtype))
    return labels if perm is None else labels.index_select(0, perm)


def _into(buf_part: torch.Tensor, x: torch.Tensor) -> None:
    if x.data_ptr() != buf_part.data_ptr() or x.shape != buf_part.shape:
        buf_part.copy_(x)


def train_step(p: StepParts, batch: dict, g: torch.Generator) -> tuple[torch.Tensor, int]:
    """One update on [clean; extra views; DiffAug] in one forward. Returns (loss detached, images trained on)."""
    r, buf, device = p.recipe, p.buf, p.device
    clean = batch["clean"].to(device, non_blocking=True)
    y = batch["label"].to(device, non_blocking=True)
    b, n_extra = clean.shape[0], r.num_extra_views
    buf[:b].copy_(clean)
    if n_extra:
        for i, v in enumerate(r.extra_views(buf[:b], g)):
            _into(buf[(1 + i) * b:(2 + i) * b], v)
    a0 = (1 + n_extra) * b  # the DiffAug half starts here
    y_aug = diffaug_half(batch, y, p.diffaug, g, buf[a0:a0 + b], device)
    k = y_aug.shape[0]
    t_clean, t_aug = y, y_aug
    if r.batch_transform is not None:
        xc, xa, t_clean, t_aug = r.batch_transform(buf[:b], buf[a0:a0 + k], y, y_aug, g)
        _into(buf[:b], xc)
        if k:
            _into(buf[a0:a0 + k], xa)
    with torch.autocast(device.type, dtype=p.amp_dtype, enabled=p.amp_dtype is not None):
        logits = p.model(buf[: a0 + k]).float()
        loss = r.loss_fn(logits[:b], t_clean)
        if k:
            loss = loss + r.loss_fn(logits[a0:], t_aug)
        if n_extra:
            loss = loss + r.extra_loss(logits[:b], [logits[(1 + i) * b:(2 + i) * b] for i in range(n_extra)], y)
    p.opt.zero_grad(set_to_none=True)
    p.scaler.scale(loss).backward()
    if p.after_backward is not None:
        p.after_backward()
    p.scaler.step(p.opt)
    p.scaler.update()
    return loss.detach(), (1 + n_extra) * b + k


class Throughput:
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
