"""What a classifier training script supplies to the engine: settings (a frozen dataclass of flags) and a
:class:`Recipe` of hooks. A recipe (diffaug_fast/train/recipes/rn50.py, vit.py) is settings + a few hooks:

    @dataclass(frozen=True)
    class Settings(EngineSettings):           # the engine's flags plus the recipe's own
        lr: float = setting(0.1, "peak learning rate")

    recipe = Recipe(name="rn50", build_model=..., build_optimizer=...)
    run(recipe, parse_settings(Settings, argv, __doc__, demo={...}))

Hooks (all receive the :class:`~diffaug_fast.train.engine.Trainer`, whose attributes ``s``, ``device``,
``world``, ``classes``, ``steps_per_epoch``, ``say`` and, once built, ``model``/``opt``/``sched`` they may read):

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
- ``demo``: a :class:`~diffaug_fast.train.demo.DemoSetup` used when no --data is given (the embedded demo).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["Recipe", "STEP_ONLY"]


@dataclass
class Recipe:
    """What a training script supplies; see the module docstring for each hook's contract."""

    name: str
    build_model: Callable[[Any], torch.nn.Module]
    build_optimizer: Callable[[Any, torch.nn.Module], tuple[torch.optim.Optimizer, Any]]
    schedule: str = "epoch"  # "epoch" | "step": when the scheduler steps
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy
    batch_transform: Callable | None = None
    num_extra_views: int = 0
    extra_views: Callable | None = None
    extra_loss: Callable | None = None
    init_state: Callable[[Any], None] | None = None
    evaluate: Callable[[Any, int], dict] | None = None
    final_report: Callable[[Any], dict] | None = None
    describe: Callable[[Any], list[str]] | None = None  # extra lines printed at the start
    clean_transform: Callable | None = None  # fn(pil_image, seed) on the clean train view (torch loader only)
    model_settings: Callable[[Any], dict] | None = None  # added to the checkpoint's settings (for eval.py)
    demo: Any = None  # DemoSetup: what runs without --data


# the step hooks' defaults (plain cross-entropy, no transform, no extra views)
STEP_ONLY = Recipe(name="default", build_model=None, build_optimizer=None)  # type: ignore[arg-type]
