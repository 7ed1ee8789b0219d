"""ResNet-50 with DiffAug (Sastry et al., NeurIPS 2024): a recipe on the shared engine (diffaug_fast.train).

    python train/rn50.py --amp                                  # embedded demo: ResNet-18, synthetic data, ~4 min
    python train/rn50.py --data /imagenet --unet 256x256_diffusion_uncond.pt --amp
    torchrun --nproc-per-node 8 train/rn50.py --data /imagenet --unet ... --amp
    python train/rn50.py --recipe augmix-diffaug --init augmix_checkpoint.pth.tar --data /imagenet --unet ...

Every step trains on [clean; diffaug] in one classifier forward: loss = CE(clean) + CE(diffaug), same
labels, no gradient into the UNet. The clean view is RandomResizedCrop + flip, the DiffAug view the same
image's Resize + CenterCrop, diffused to a random t and denoised in one UNet call (x0 estimate).
--diffaug-fraction p augments a random p of each batch. Recipe defaults: torchvision's ResNet-50 (global
batch 256, SGD lr 0.1 x batch/256, momentum 0.9, wd 1e-4 on all parameters, BN and biases included as in
torchvision's recipe and the authors' code, lr x0.1 every 30 epochs, 90 epochs; SyncBatchNorm under DDP).

Finetunes: --init CKPT starts from a torchvision state_dict, an AugMix/DeepAugment checkpoint
({"state_dict", "optimizer"}) or one of ours, with its optimizer state when it has one that fits.
--augmix adds two AugMix views of the clean crop (the AugMix paper's ImageNet code and settings: severity 1,
width 3, depth 1-3; recipes/augmix.py) and the Jensen-Shannon consistency loss x --jsd-weight (12):
loss = CE(clean) + CE(diffaug) + 12 * JSD(clean, augmix1, augmix2), as the authors' diffaugmix.py.

Checkpoints are written atomically at every epoch end and on SIGTERM/SIGINT (last.pt, the previous one
kept as prev.pt); --resume continues exactly where the run stopped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision

from ...runs import RunError, load_checkpoint_file
from ..demo import classifier_demo
from ..engine import EngineSettings, Recipe, parse_settings, run, setting
from ..step import DiffAugPlan, StepParts
from ..step import train_step as _engine_step
from .augmix import AugMixConfig
from .augmix import augmix_views as _augmix_views


@dataclass(frozen=True)
class Settings(EngineSettings):
    arch: str = setting("resnet50", "torchvision model name")
    lr: float | None = setting(None, "default 0.1 * batch_size / 256 (or the --init checkpoint's optimizer lr)")
    momentum: float = setting(0.9, "SGD momentum")
    nesterov: bool = setting(False, "Nesterov momentum")
    zero_init_residual: bool = setting(False, "zero the last BN of each residual branch (Goyal et al.): steadier start")
    weight_decay: float = setting(1e-4, "weight decay")
    wd_bn_bias: bool = setting(True, "weight decay on BN weights and biases too (torchvision's and the authors' recipe)")
    lr_step: int = setting(30, "multiply the lr by --lr-gamma every this many epochs")
    lr_gamma: float = setting(0.1, "the lr's factor every --lr-step epochs")
    init: str | None = setting(None, "start from these weights (torchvision / AugMix / DeepAugment / ours)")
    augmix: bool = setting(False, "two AugMix views + JSD consistency loss")
    jsd_weight: float = setting(12.0, "weight of the AugMix Jensen-Shannon consistency loss")
    recipe: str | None = setting(None, "augmix-diffaug | deepaugment-diffaug: the paper's finetunes (prints what it sets)")
    eval_crop_ratio: float | None = setting(0.875, "evaluation view: Resize(image_size / ratio) + CenterCrop(image_size); "
                                                   "0.875 = Resize 256 + CenterCrop 224, DiffAug's eval scripts")


# The embedded demo (no --data): synthetic 64 px images, 4 classes x 400, cut to 48 px. Sized for minutes on 2
# CPU cores: a ResNet-18 (the recipe's ResNet-50 needs more steps than that to learn the shapes: 80% after 250
# steps where ResNet-18 had 88%, bench/NOTES.md), 8 epochs of 50 steps, lr 0.1 then 0.01 for the last two.
DEMO = dict(arch="resnet18", epochs=8, batch_size=32, lr=0.1, lr_step=6, image_size=48, resize_size=55,
            diffaug_fraction=0.5, zero_init_residual=True,
            bench_steps=3, eval_crop_ratio=None)  # None: evaluate on the DiffAug view's Resize 55 + CenterCrop 48

# The paper's finetunes of robust ResNet-50s (the authors' training_scripts/diffaugmix.py and diffda.py):
# 50k steps at batch 256 from the checkpoint and its optimizer state, constant lr, SGD momentum 0.9, wd 1e-4.
PRESETS = {
    "augmix-diffaug": dict(augmix=True, jsd_weight=12.0, max_steps=50_000, epochs=None, batch_size=256,
                           lr_step=10**9, diffaug="online"),  # lr: the AugMix checkpoint's optimizer
    "deepaugment-diffaug": dict(max_steps=50_000, epochs=None, batch_size=256, lr=1e-6, nesterov=True,
                                lr_step=10**9, diffaug="online"),
}


def parse_args(argv: list[str] | None = None) -> Settings:
    return parse_settings(Settings, argv, __doc__, DEMO, PRESETS)


# ---------------------------------------------------------------------------------------------------- hooks


def build_model(tr) -> torch.nn.Module:
    extra = {"zero_init_residual": True} if tr.s.zero_init_residual else {}
    try:
        model = torchvision.models.get_model(tr.s.arch, num_classes=len(tr.classes), **extra)
    except ValueError as e:
        raise SystemExit(f"--arch {tr.s.arch}: {e}") from None
    return model.to(tr.device)


def build_optimizer(tr, model):
    s = tr.s
    lr = s.lr if s.lr is not None else 0.1 * s.batch_size / 256
    if s.wd_bn_bias:
        groups = [{"params": list(model.parameters()), "weight_decay": s.weight_decay}]
    else:  # --no-wd-bn-bias: BN weights and biases (1-d tensors) without decay
        groups = [{"params": [p for p in model.parameters() if p.dim() > 1], "weight_decay": s.weight_decay},
                  {"params": [p for p in model.parameters() if p.dim() <= 1], "weight_decay": 0.0}]
    opt = torch.optim.SGD(groups, lr=lr, momentum=s.momentum, nesterov=s.nesterov)
    return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=s.lr_step, gamma=s.lr_gamma)


def init_state(tr) -> None:
    """--init: the weights (strict: same architecture and classes) and, when it has one that fits, the
    optimizer state. lr: --lr (or the preset's) > the checkpoint optimizer's > 0.1 x batch / 256."""
    s = tr.s
    if not s.init:
        return
    try:
        ck = load_checkpoint_file(s.init)
    except RunError as e:
        raise SystemExit(f"--init {e}") from None
    sd, opt_sd = _weights_and_optimizer(ck)
    if sd is None:
        raise SystemExit(f"--init {s.init}: holds no model weights (expected a state_dict, or a dict with "
                         "'model' or 'state_dict')")
    fc = sd.get("fc.weight")
    if fc is not None and fc.dim() == 2 and fc.shape[0] != len(tr.classes):
        raise SystemExit(f"--init {s.init}: its classifier has {fc.shape[0]} classes, the data has "
                         f"{len(tr.classes)} ({tr.root / 'train'})")
    mine = tr.model.state_dict()
    missing = [k for k in mine if k not in sd]
    unexpected = [k for k in sd if k not in mine]
    shapes = [k for k in mine if k in sd and tuple(sd[k].shape) != tuple(mine[k].shape)]
    if missing or unexpected or shapes:
        raise SystemExit(f"--init {s.init}: not a {s.arch} checkpoint ({len(missing)} missing keys, e.g. "
                         f"{missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]}; {len(shapes)} of another "
                         f"shape, e.g. {shapes[:2]}): pass the matching --arch")
    tr.model.load_state_dict(sd)
    tr.say(f"--init: weights from {s.init}")
    if opt_sd is not None:
        problem = _optimizer_mismatch(tr.opt, opt_sd)
        if problem:
            tr.say(f"--init: optimizer state not used ({problem}); starting with a fresh optimizer")
        else:
            tr.opt.load_state_dict(opt_sd)
            tr.say(f"--init: optimizer state too (lr {tr.opt.param_groups[0]['lr']:g} as saved)")
    elif s.recipe == "augmix-diffaug" and s.lr is None:
        raise SystemExit(f"--init {s.init}: has no optimizer state, whose lr the augmix-diffaug recipe continues "
                         "with; give --lr (the AugMix run's last lr)")
    for g in tr.opt.param_groups:
        if s.lr is not None:
            g["lr"] = s.lr
        g["initial_lr"] = g["lr"]
    tr.sched = torch.optim.lr_scheduler.StepLR(tr.opt, step_size=s.lr_step, gamma=s.lr_gamma)


def _weights_and_optimizer(ck: dict):
    """(model state_dict without DataParallel/DDP 'module.' prefixes, optimizer state or None)."""
    if isinstance(ck.get("model"), dict):
        sd, opt_sd = ck["model"], ck.get("optimizer")
    elif isinstance(ck.get("state_dict"), dict):
        sd, opt_sd = ck["state_dict"], ck.get("optimizer")
    elif ck and all(isinstance(v, torch.Tensor) for v in ck.values()):
        sd, opt_sd = ck, None
    else:
        return None, None
    return {k.removeprefix("module."): v for k, v in sd.items()}, opt_sd if isinstance(opt_sd, dict) else None


def _optimizer_mismatch(opt, opt_sd: dict) -> str | None:
    groups = opt_sd.get("param_groups", [])
    if len(groups) != len(opt.param_groups):
        return (f"{len(groups)} parameter group(s) saved, {len(opt.param_groups)} here; --no-wd-bn-bias makes 2, "
                "a single group is the usual")
    for saved, here in zip(groups, opt.param_groups, strict=True):
        if len(saved["params"]) != len(here["params"]):
            return f"a group of {len(saved['params'])} parameters saved, {len(here['params'])} here"
        for pid, p in zip(saved["params"], here["params"], strict=True):
            buf = opt_sd.get("state", {}).get(pid, {}).get("momentum_buffer")
            if buf is not None and tuple(buf.shape) != tuple(p.shape):
                return "momentum buffers of other shapes"
    return None


# AugMix as the AugMix paper's ImageNet code (google-research/augmix imagenet.py: severity 1, width 3, depth
# 1-3, alpha 1, the base operations; augmix.py says how each magnitude is drawn); applied to the clean crop's
# own pixels in the training process, so it works with either loader and every DiffAug mode.
AUGMIX = AugMixConfig()


def augmix_views(clean: torch.Tensor, g: torch.Generator) -> list[torch.Tensor]:
    """Two AugMix views of each normalized clean crop [b, 3, H, W], normalized the same way; drawn from the
    step generator's seed, so a resumed run replays them."""
    return _augmix_views(clean, g, AUGMIX)


def jsd_loss(logits_clean: torch.Tensor, extra: list[torch.Tensor], y: torch.Tensor, weight: float = 12.0):
    """weight x Jensen-Shannon divergence of the softmaxes of [clean, *extra] (each [b, C]): the mean KL of each
    to their mixture, the mixture clamped to [1e-7, 1] as in AugMix's code; KL summed over classes, batch mean."""
    probs = [F.softmax(x.float(), dim=1) for x in (logits_clean, *extra)]
    log_m = torch.clamp(sum(probs) / len(probs), 1e-7, 1).log()
    return weight * sum(F.kl_div(log_m, p, reduction="batchmean") for p in probs) / len(probs)


def describe(tr) -> list[str]:
    s = tr.s
    lines = [f"model: torchvision {s.arch}" + (" (the demo's; --arch resnet50 for the recipe's)" if tr.demo
                                                and s.arch != "resnet50" else "") + f", {len(tr.classes)} classes",
             f"optimizer: SGD lr {tr.opt.param_groups[0]['lr']:g}, momentum {s.momentum}, nesterov {s.nesterov}, "
             f"wd {s.weight_decay} on {'all parameters' if s.wd_bn_bias else 'weights only (not BN, biases)'}; "
             f"SyncBatchNorm {'on' if tr.sync_bn else 'off'}"]
    if s.augmix:
        c = AUGMIX
        lines.append(f"AugMix: 2 views per image (severity {c.severity:g}, width {c.width}, depth "
                     f"{'1-3' if c.depth < 0 else c.depth}, alpha {c.alpha:g}, {len(c.ops)} base operations, as "
                     f"google-research/augmix), JSD consistency loss x {s.jsd_weight}")
    if s.recipe:
        parts = []
        for k, v in PRESETS[s.recipe].items():
            flag, now = "--" + k.replace("_", "-"), getattr(s, k)
            if k == "epochs" and v is None:
                parts.append(f"{flag} {now} (as many as --max-steps needs)")
            else:
                parts.append(f"{flag} {v}" + (f" (overridden: {now})" if now != v else ""))
        lines.append(f"--recipe {s.recipe} sets: " + ", ".join(parts)
                     + ("; lr: the --init checkpoint's optimizer" if "lr" not in PRESETS[s.recipe] else ""))
        if s.recipe == "deepaugment-diffaug":
            lines.append("  note: the authors also train on DeepAugment's EDSR and CAE image sets (not read here); "
                         "this finetune sees ImageNet + DiffAug views")
    return lines


def make_recipe(s: Settings) -> Recipe:
    extra = {}
    if s.augmix:
        extra = dict(num_extra_views=2, extra_views=augmix_views,
                     extra_loss=lambda lc, views, y: jsd_loss(lc, views, y, s.jsd_weight))
    return Recipe(name="rn50", build_model=build_model, build_optimizer=build_optimizer, schedule="epoch",
                  init_state=init_state, describe=describe, demo=classifier_demo("demo"), **extra)


def train_step(model, opt, scaler, batch, den, s, g, buf, device, amp_dtype):
    """One plain [clean; DiffAug] step of this recipe's settings ``s`` (bench/bench_train.py times it)."""
    return _engine_step(StepParts(model, opt, scaler, buf, device, amp_dtype, DiffAugPlan.of(s, den)), batch, g)


def main(argv: list[str] | None = None) -> dict:
    s = parse_args(argv)
    if s.recipe and not s.init:
        raise SystemExit(f"--recipe {s.recipe} finetunes a trained ResNet-50: give its checkpoint with --init")
    if s.init and not Path(s.init).is_file():
        raise SystemExit(f"--init {s.init}: no such file")
    return run(make_recipe(s), s)
