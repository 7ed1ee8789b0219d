"""The ViT-specific parts of the DeiT-III finetune stage with DiffAug (train/vit.py), all on top of timm.

- :func:`create_vit`: a timm ViT (DeiT-III ``deit3_*`` with LayerScale by default), drop-path set.
- :func:`load_init`: ``--init`` weights from a DeiT/timm file (``{"model": sd}``, a plain state_dict or
  safetensors), read safely, converted by timm's own filter (DeiT's ``gamma_1`` -> ``ls1.gamma``, position
  embeddings resampled to the image size), and refused with one readable line on any mismatch.
- :func:`create_optimizer` / :func:`create_scheduler`: AdamW with timm's weight-decay groups (no decay on
  norms, biases, LayerScale gammas, ``pos_embed``, ``cls_token``: DeiT's ``create_optimizer`` with
  ``model.no_weight_decay()``), and timm's cosine schedule with linear warm-up, stepped per update.
- :class:`PairMix`: Mixup/CutMix (timm's ``Mixup`` draws, batch mode) applied to the clean half and the
  DiffAug half of the training batch with ONE draw: same lambda, same mode, same CutMix box, each image
  paired with the image at the mirrored position (timm's ``flip(0)``). When the DiffAug half holds the
  whole batch in the clean half's order (online fraction 1, the paper's setting) both halves mix the same
  pairs and carry identical smoothed, mixed targets.
- :class:`SeededRandAugment`: timm's RandAugment on the clean view (PIL, in the torch loader's workers),
  replayable from a per-sample seed so a resumed run sees the same augmentations.
"""

from __future__ import annotations

import contextlib
import random
from pathlib import Path

import numpy as np
import timm
import torch
from timm.data.auto_augment import rand_augment_transform
from timm.data.mixup import Mixup, cutmix_bbox_and_lam, mixup_target
from timm.models.vision_transformer import checkpoint_filter_fn
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler

from ...constants import IMAGENET_MEAN
from ...runs import RunError, load_checkpoint_file

__all__ = ["InitError", "create_vit", "load_init", "create_optimizer", "create_scheduler", "PairMix",
           "SeededRandAugment", "soft_cross_entropy"]


class InitError(ValueError):
    """An --init file that cannot initialise this model; the message says why and what to do."""


def create_vit(arch: str, num_classes: int, *, img_size: int, drop_path: float = 0.0,
               **model_kwargs) -> torch.nn.Module:
    """A randomly initialised timm model ``arch`` at ``img_size`` px with stochastic depth ``drop_path``."""
    if not timm.is_model(arch):
        raise InitError(f"--arch {arch!r} is not a timm model (e.g. deit3_base_patch16_224; "
                        "list them with timm.list_models('deit3*'))")
    return timm.create_model(arch, pretrained=False, num_classes=num_classes, img_size=img_size,
                             drop_path_rate=drop_path, **model_kwargs)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise InitError(f"--init {path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # header or size damaged
            raise InitError(f"--init {path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    try:
        ck = load_checkpoint_file(path)  # weights_only=True: a pickle with code in it is refused, not run
    except RunError as e:
        raise InitError(f"--init {e}") from None
    for key in ("model", "state_dict", "model_ema"):  # DeiT: {"model": sd}; others nest under state_dict
        if isinstance(ck.get(key), dict):
            ck = ck[key]
            break
    if not ck or not all(isinstance(v, torch.Tensor) for v in ck.values()):
        raise InitError(f"--init {path}: holds no state_dict (expected a dict of tensors, or one under 'model')")
    return ck


def load_init(model: torch.nn.Module, path: str | Path, *, reset_head: bool = False) -> str:
    """Load ``path`` into ``model`` (in place); returns a one-line description of what was loaded.

    The classifier head is kept from the file when its class count matches; when it differs the call is
    refused unless ``reset_head`` (the head then keeps its fresh initialisation). Any other missing,
    unexpected or differently shaped tensor means another architecture: refused.
    """
    path = Path(path)
    sd = {k.removeprefix("module."): v for k, v in _read_state_dict(path).items()}
    try:
        sd = checkpoint_filter_fn(sd, model, adapt_layer_scale=True)
    except Exception as e:  # e.g. a position embedding that cannot be resampled to this grid
        raise InitError(f"--init {path}: cannot be adapted to this model ({type(e).__name__}: {e})") from None
    own = model.state_dict()
    head = {k for k in own if k.startswith("head.")}
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shape = sorted(k for k in set(own) & set(sd) if own[k].shape != sd[k].shape and k not in head)
    if missing or unexpected or shape:
        what = [f"{len(missing)} of the model's tensors missing (e.g. {missing[0]})" if missing else "",
                f"{len(unexpected)} unknown (e.g. {unexpected[0]})" if unexpected else "",
                f"{len(shape)} of another shape (e.g. {shape[0]}: {tuple(sd[shape[0]].shape)} in the file, "
                f"{tuple(own[shape[0]].shape)} here)" if shape else ""]
        raise InitError(f"--init {path}: not a checkpoint of this architecture ({', '.join(w for w in what if w)}); "
                        "pass --arch of the model it was trained as")
    file_classes = sd["head.weight"].shape[0] if "head.weight" in sd else None
    n_classes = own["head.weight"].shape[0] if "head.weight" in own else None
    note = ""
    if file_classes != n_classes:
        if not reset_head:
            raise InitError(f"--init {path}: its head has {file_classes} classes, this run has {n_classes} "
                            "(the data's classes); pass --reset-head to start a new head from random weights")
        for k in head:
            sd[k] = own[k]
        note = f", head re-initialised ({file_classes} -> {n_classes} classes)"
    elif reset_head:
        raise InitError(f"--reset-head: the file's head already has this run's {n_classes} classes; "
                        "drop --reset-head to keep it")
    model.load_state_dict(sd, strict=True)
    return f"{path} ({len(sd)} tensors{note})"


def create_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW (betas 0.9/0.999, eps 1e-8, DeiT's defaults); no decay on 1-d parameters (norms, biases,
    LayerScale gammas) nor on ``model.no_weight_decay()`` (pos_embed, cls_token): timm's grouping."""
    return create_optimizer_v2(model, "adamw", lr=lr, weight_decay=weight_decay, filter_bias_and_bn=True)


def create_scheduler(opt: torch.optim.Optimizer, *, total_updates: int, warmup_updates: int, warmup_lr: float,
                     min_lr: float) -> CosineLRScheduler:
    """timm's cosine schedule counted in optimizer updates (call ``step_update(n)`` after update n).

    DeiT steps the same scheduler once per epoch; per update gives the same curve without the staircase.
    """
    return CosineLRScheduler(opt, t_initial=total_updates, lr_min=min_lr, warmup_t=warmup_updates,
                             warmup_lr_init=warmup_lr, t_in_epochs=False)


@contextlib.contextmanager
def _seeded_global_rngs(seed: int):
    """Run code that draws from numpy's and Python's global RNGs (timm's Mixup, RandAugment) from ``seed``,
    leaving the caller's global states as they were."""
    np_state, py_state = np.random.get_state(), random.getstate()
    np.random.seed(seed % 2**32)
    random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)


class PairMix:
    """Mixup/CutMix over both halves of a [clean; DiffAug] batch with one draw (timm's ``Mixup``, batch mode)."""

    def __init__(self, mixup_alpha: float, cutmix_alpha: float, label_smoothing: float, num_classes: int):
        self.mixup = Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, label_smoothing=label_smoothing,
                           num_classes=num_classes, mode="batch")
        self.active = mixup_alpha > 0 or cutmix_alpha > 0
        self.smoothing, self.num_classes = label_smoothing, num_classes

    def draw(self, seed: int, shape) -> tuple[float, tuple[int, int, int, int] | None]:
        """(lambda, CutMix box (y0, y1, x0, x1) or None) for images of ``shape`` [..., H, W]."""
        if not self.active:
            return 1.0, None
        with _seeded_global_rngs(seed):
            lam, use_cutmix = self.mixup._params_per_batch()
            box = None
            if use_cutmix and lam != 1.0:
                box, lam = cutmix_bbox_and_lam(shape, lam, correct_lam=True)  # lam = 1 - box area share
        return float(lam), box

    @staticmethod
    def mix_(x: torch.Tensor, lam: float, box) -> None:
        """Mix ``x`` [N, C, H, W] in place with its mirror ``x.flip(0)`` (image i with image N-1-i)."""
        if lam == 1.0 or x.shape[0] == 0:
            return
        if box is not None:
            y0, y1, x0, x1 = box
            x[:, :, y0:y1, x0:x1] = x.flip(0)[:, :, y0:y1, x0:x1]
        else:
            partner = x.flip(0).mul_(1.0 - lam)  # a copy, taken before x is scaled in place
            x.mul_(lam).add_(partner)

    def targets(self, y: torch.Tensor, lam: float) -> torch.Tensor:
        """Smoothed mixed targets float32 [N, num_classes]: lam * onehot(y) + (1 - lam) * onehot(y.flip(0))."""
        return mixup_target(y, self.num_classes, lam, self.smoothing)

    def __call__(self, clean: torch.Tensor, y: torch.Tensor, aug: torch.Tensor, y_aug: torch.Tensor,
                 seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mix ``clean`` [B,3,H,W] and ``aug`` [K,3,H,W] in place; returns their targets ([B,C], [K,C])."""
        lam, box = self.draw(seed, clean.shape)
        self.mix_(clean, lam, box)
        self.mix_(aug, lam, box)
        return self.targets(y, lam), self.targets(y_aug, lam)


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -sum(target * log_softmax(logits)), in float32 (timm's SoftTargetCrossEntropy)."""
    return torch.sum(-target * torch.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def _posterize(img, bits_to_keep, **_):
    """timm's posterize, also for 0 bits (what 'inc1' at magnitude 10 asks): Pillow >= 10 refuses 0 bits,
    which keep no bit at all (a black image, what older Pillow returned)."""
    from PIL import Image, ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep < 1:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


class SeededRandAugment:
    """timm's RandAugment (``config`` like DeiT's 'rand-m9-mstd0.5-inc1') as ``fn(pil_image, seed)``.

    RandAugment draws from numpy's and Python's global RNGs; running it under the sample's seed makes the
    clean view a function of (seed, epoch, image), so it is independent of worker count and replays on resume.
    """

    def __init__(self, config: str, img_size: int, mean=IMAGENET_MEAN):
        from PIL import Image

        # the hyper-parameters timm's create_transform passes (translate 45% of the size, fill = the mean colour)
        hparams = dict(translate_const=int(img_size * 0.45), img_mean=tuple(min(255, round(255 * m)) for m in mean),
                       interpolation=Image.BICUBIC)
        try:
            self.op = rand_augment_transform(config, hparams)
        except Exception as e:
            why = f" ({e})" if str(e) else ""
            raise InitError(f"--aa {config!r}: not a RandAugment policy timm understands{why}; "
                            "e.g. rand-m9-mstd0.5-inc1, or none") from None
        for op in getattr(self.op, "ops", []):
            if op.name.startswith("Posterize"):
                op.aug_fn = _posterize
        self.config = config

    def __call__(self, img, seed: int):
        with _seeded_global_rngs(seed):
            return self.op(img)

    def __repr__(self) -> str:
        return f"SeededRandAugment({self.config!r})"
