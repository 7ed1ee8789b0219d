"""DeiT-III ViT finetune stage with DiffAug (Sastry et al., NeurIPS 2024, Table 1 "ViT"), on the shared engine.

    python train/vit.py                                             # embedded demo: tiny ViT, synthetic data
    python train/vit.py --data /imagenet --init deit_3_base_224_1k.pth --unet 256x256_diffusion_uncond.pt --amp
    torchrun --nproc-per-node 8 train/vit.py --data /imagenet --init ... --unet ... --amp

Recipe (facebookresearch/deit README_revenge.md, 224 px finetune of deit_base_patch16_LS, plus DiffAug):
timm ``deit3_base_patch16_224`` (LayerScale), AdamW lr 1e-5 (not scaled with the batch), global batch 512,
20 epochs, weight decay 0.1 except norms, biases, LayerScale gammas, pos_embed and cls_token; timm's cosine
schedule from warmup-lr 1e-6 over 5 warm-up epochs to lr, then towards min-lr 1e-5 (DeiT's defaults: with
lr = min-lr = 1e-5 the "cosine" is flat after warm-up), stepped once per update; label smoothing 0.1,
Mixup 0.8, CutMix 1.0, drop-path 0.2, RandAugment rand-m9-mstd0.5-inc1 on the clean view, no repeated
augmentation, no random erasing.

DiffAug: every image gives a clean view (RandomResizedCrop + flip + RandAugment) and a DiffAug view (the same
image's Resize + CenterCrop, diffused to a random t and denoised in one UNet call). Both halves go through
Mixup/CutMix with ONE draw: the same lambda, the same CutMix box, and each image mixed with the image at the
mirrored batch position, so the DiffAug half carries exactly the clean half's mixed, smoothed targets
(its images are the DiffAug views of the same pairs). loss = SoftCE(clean) + SoftCE(DiffAug), one forward.
With --diffaug-fraction < 1 the DiffAug half holds a subset; it is mixed within itself with the same
lambda and box, its targets those of its own pairs.

Checkpoints hold {"model", "settings": {"arch", "model_source": "timm", "model_kwargs", ...}, "classes"}:
train/eval.py builds the timm model from them. --resume continues bit-identically (engine).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from ..demo import classifier_demo
from ..engine import EngineSettings, Recipe, parse_settings, run, setting
from .vit_parts import (
    InitError,
    PairMix,
    SeededRandAugment,
    create_optimizer,
    create_scheduler,
    create_vit,
    load_init,
    soft_cross_entropy,
)


@dataclass(frozen=True)
class Settings(EngineSettings):
    arch: str = setting("deit3_base_patch16_224", "any timm model name")
    model_kwargs: str | None = setting(None, "JSON of extra timm.create_model arguments, e.g. '{'depth': 4}'")
    init: str | None = setting(None, "DeiT/timm weights: {'model': sd} .pth, a plain state_dict, or .safetensors")
    reset_head: bool = setting(False, "--init with another class count: start a new head (else refused)")
    epochs: int = setting(20, "training epochs")
    batch_size: int = setting(512, "global, over all processes")
    lr: float = setting(1e-5, "not scaled with the batch size (DeiT's --unscale-lr)")
    min_lr: float = setting(1e-5, "the cosine schedule's floor")
    warmup_lr: float = setting(1e-6, "lr at the start of the warm-up")
    warmup_epochs: int = setting(5, "linear warm-up epochs")
    weight_decay: float = setting(0.1, "AdamW weight decay (not on norms, biases, LayerScale, pos_embed, cls_token)")
    smoothing: float = setting(0.1, "label smoothing")
    mixup: float = setting(0.8, "Mixup alpha; 0 disables")
    cutmix: float = setting(1.0, "CutMix alpha; 0 disables")
    drop_path: float = setting(0.2, "stochastic depth rate")
    aa: str = setting("rand-m9-mstd0.5-inc1", "RandAugment policy of the clean view (timm); 'none' disables")
    sync_bn: bool = setting(False, "a ViT has no BatchNorm")
    eval_crop_ratio: float | None = setting(1.0, "evaluation view: Resize(image_size / ratio) + CenterCrop(image_size); "
                                                 "1.0 bicubic = DeiT-III's (--eval-crop-ratio 1.0 in its README)")
    eval_interpolation: str = setting("bicubic", "filter of the evaluation view's Resize (DeiT's Resize(..., "
                                                 "interpolation=3) = bicubic)")


# The embedded demo (no --data): a 4-block ViT with LayerScale, 8 px patches on the 48 px synthetic images,
# random init (so a higher lr than the finetune), sized to train in a few minutes on 2 cores.
DEMO = dict(arch="deit3_small_patch16_224", model_kwargs='{"patch_size": 8, "embed_dim": 96, "depth": 4, "num_heads": 3, "init_values": 0.1}',
            epochs=6, batch_size=32, lr=2e-3, min_lr=1e-5, warmup_lr=1e-5, warmup_epochs=1, weight_decay=0.05,
            drop_path=0.1, image_size=48, resize_size=55, diffaug_fraction=1.0,
            bench_steps=3, eval_crop_ratio=None, eval_interpolation="bilinear")  # the demo's val view: Resize 55 + Crop 48


def model_kwargs(s: Settings) -> dict:
    """timm.create_model arguments besides the name and class count (what eval.py needs to rebuild it)."""
    try:
        extra = json.loads(s.model_kwargs) if s.model_kwargs else {}
    except json.JSONDecodeError as e:
        raise SystemExit(f"--model-kwargs {s.model_kwargs!r}: not JSON ({e.msg}); e.g. '{{\"depth\": 4}}'") from None
    if not isinstance(extra, dict):
        raise SystemExit(f"--model-kwargs {s.model_kwargs!r}: expected a JSON object")
    return {"img_size": s.image_size, **extra}


def build_model(tr):
    s = tr.s
    try:
        model = create_vit(s.arch, len(tr.classes), drop_path=s.drop_path, **model_kwargs(s))
    except InitError as e:
        raise SystemExit(str(e)) from None
    except (TypeError, ValueError, AssertionError) as e:  # timm refusing an argument or a shape combination
        raise SystemExit(f"--arch {s.arch} --model-kwargs {s.model_kwargs}: timm cannot build it ({e})") from None
    # Mixup's one-hot targets need the class count, known from here on (the data is scanned)
    tr.recipe.batch_transform = make_batch_transform(s, len(tr.classes))
    return model.to(tr.device)


def build_optimizer(tr, model):
    s, n = tr.s, tr.steps_per_epoch
    opt = create_optimizer(model, s.lr, s.weight_decay)
    sched = create_scheduler(opt, total_updates=s.epochs * n, warmup_updates=s.warmup_epochs * n,
                             warmup_lr=s.warmup_lr, min_lr=s.min_lr)
    return opt, sched


def init_state(tr):
    s = tr.s
    if s.init is None:
        return
    try:
        tr.say(f"initialised from {load_init(tr.model, s.init, reset_head=s.reset_head)}")
    except InitError as e:
        raise SystemExit(str(e)) from None


def make_batch_transform(s: Settings, num_classes: int):
    mix = PairMix(s.mixup, s.cutmix, s.smoothing, num_classes)

    def transform(clean, aug, y, y_aug, g):
        # the step's generator seed: Mixup's draws replay on resume and are the same on every rank's step
        t_clean, t_aug = mix(clean, y, aug, y_aug, seed=g.initial_seed())
        return clean, aug, t_clean, t_aug

    return transform


def describe(tr) -> list[str]:
    s, n = tr.s, tr.steps_per_epoch
    return [f"ViT: timm {s.arch} {model_kwargs(s)}, drop-path {s.drop_path}, {len(tr.classes)} classes"
            + (f", --init {s.init}" if s.init else ", random init"),
            f"  AdamW lr {s.lr:g} wd {s.weight_decay:g} (none on norms/biases/LayerScale/pos_embed/cls_token); cosine "
            f"per update over {s.epochs * n} updates, warm-up {s.warmup_epochs * n} updates from {s.warmup_lr:g}, "
            f"min {s.min_lr:g}",
            f"  Mixup {s.mixup:g} / CutMix {s.cutmix:g}, smoothing {s.smoothing:g}, one draw for the clean and DiffAug "
            f"halves; RandAugment {s.aa} on the clean view"]


def main(argv: list[str] | None = None) -> dict:
    s = parse_settings(Settings, argv, __doc__, DEMO)
    if s.reset_head and not s.init:
        raise SystemExit("--reset-head needs --init (the head is re-initialised only when loading weights)")
    if s.aa != "none":
        if s.loader == "dali":
            raise SystemExit(f"--aa {s.aa}: RandAugment runs on PIL images in the torch loader's workers, not in "
                             "DALI; use --loader torch (or auto), or --aa none to keep DALI")
        s = dataclasses.replace(s, loader="torch")
    try:
        clean_tf = SeededRandAugment(s.aa, s.image_size) if s.aa != "none" else None
    except InitError as e:
        raise SystemExit(str(e)) from None
    recipe = Recipe(
        name="vit", build_model=build_model, build_optimizer=build_optimizer, schedule="step",
        loss_fn=soft_cross_entropy, init_state=init_state, describe=describe,
        clean_transform=clean_tf, demo=classifier_demo("demo-vit"),
        model_settings=lambda tr: {"arch": s.arch, "model_source": "timm", "model_kwargs": model_kwargs(s)},
    )
    return run(recipe, s)
