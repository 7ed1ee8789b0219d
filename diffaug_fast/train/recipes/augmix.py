"""AugMix (Hendrycks et al., ICLR 2020) parameterized as the authors' ImageNet code (google-research/augmix:
augmentations.py for the operations, imagenet.py's ``aug`` for the chains and the mixing).

Each view of an image: ``width`` chains, each of ``depth`` operations (``depth`` -1: uniform in {1, 2, 3}
per chain) drawn uniformly with replacement from the 9 base operations; chain weights w ~ Dirichlet(alpha),
mixing weight m ~ Beta(alpha, alpha); view = (1 - m) * image + m * sum_i w_i * chain_i(image), in float
[0, 1] (never re-quantized, as the reference mixes its preprocessed tensors). Every operation with a
magnitude draws its own level L ~ U(0.1, severity) on the reference's 0..10 scale:

    rotate       +-int(30 L / 10) degrees          shear_x / y   +-0.3 L / 10 (affine shear factor)
    translate    +-int((S / 3) L / 10) pixels      posterize     4 - int(4 L / 10) bits kept
    solarize     threshold 256 - int(256 L / 10)   autocontrast, equalize: no magnitude
    (S: the crop's side, the reference's IMAGE_SIZE; each sign + or - with probability 1/2)

At the paper's ImageNet setting (severity 1) a rotation is 0, 1 or 2 degrees and a translation 0 to 7
pixels at 224. torchvision's ``AugMix(severity=1)`` is not this: it picks magnitude bin 0 of its linspace
for every operation, so its rotations, shears and translations are exactly 0.

The pixel work is PIL's (``ImageOps``, ``Image.rotate`` / ``Image.transform`` with bilinear resampling,
as the reference). All draws of one view of one image come from one numpy generator seeded by (step seed,
view, image position): a resumed run replays them, and images can be processed in any order or thread.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

from ...constants import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["AugMixConfig", "OPS", "draw_level", "draw_op_param", "draw_plan", "apply_op", "augmix_image",
           "crop_pixels", "augmix_views"]

OPS = ("autocontrast", "equalize", "posterize", "rotate", "solarize", "shear_x", "shear_y", "translate_x",
       "translate_y")  # the reference's `augmentations` list (not `augmentations_all`, which overlaps ImageNet-C)


@dataclass(frozen=True)
class AugMixConfig:
    """The reference's ImageNet defaults: --aug-severity 1, --mixture-width 3, --mixture-depth -1,
    --aug-prob-coeff 1, the base operations. ``ops=()`` disables every operation (a view is then the image)."""

    severity: float = 1.0
    width: int = 3
    depth: int = -1
    alpha: float = 1.0
    ops: tuple[str, ...] = OPS

    def __post_init__(self):
        unknown = [o for o in self.ops if o not in OPS]
        if unknown or self.severity < 0.1 or self.width < 1 or self.depth == 0 or self.alpha <= 0:
            raise ValueError(f"AugMixConfig: need severity >= 0.1, width >= 1, depth -1 or >= 1, alpha > 0 and "
                             f"ops among {OPS}; got {self}")


def draw_level(rng: np.random.Generator, severity: float) -> float:
    """A magnitude level on the reference's 0..10 scale: uniform in [0.1, severity)."""
    return float(rng.uniform(0.1, severity))


def _signed(rng: np.random.Generator, value: float) -> float:
    return -value if rng.uniform() > 0.5 else value


def draw_op_param(name: str, rng: np.random.Generator, severity: float, size: int) -> float | None:
    """The magnitude of one application of operation ``name`` on a ``size`` x ``size`` crop (see the module
    docstring; None for autocontrast and equalize). Draws the level, then the sign, as the reference."""
    if name in ("autocontrast", "equalize"):
        return None
    level = draw_level(rng, severity)
    if name == "posterize":
        return 4 - int(level * 4 / 10)
    if name == "solarize":
        return 256 - int(level * 256 / 10)
    if name == "rotate":
        return _signed(rng, int(level * 30 / 10))
    if name in ("shear_x", "shear_y"):
        return _signed(rng, level * 0.3 / 10)
    return _signed(rng, int(level * (size / 3) / 10))  # translate_x / translate_y, in pixels


@dataclass(frozen=True)
class Plan:
    """Everything random about one AugMix view: chain weights [width] and mixing weight (float32, as the
    reference casts them), and per chain its (operation, magnitude) list."""

    weights: np.ndarray
    mix: float
    chains: tuple[tuple[tuple[str, float | None], ...], ...]


def draw_plan(rng: np.random.Generator, cfg: AugMixConfig, size: int) -> Plan:
    """Draw one view's plan in the reference's order: Dirichlet weights, Beta mixing weight, then per chain
    its depth and, per step, the operation and its magnitude."""
    ws = np.float32(rng.dirichlet([cfg.alpha] * cfg.width))
    m = float(np.float32(rng.beta(cfg.alpha, cfg.alpha)))
    chains = []
    for _ in range(cfg.width):
        depth = cfg.depth if cfg.depth > 0 else int(rng.integers(1, 4))
        steps = []
        for _ in range(depth if cfg.ops else 0):
            name = cfg.ops[int(rng.integers(len(cfg.ops)))]
            steps.append((name, draw_op_param(name, rng, cfg.severity, size)))
        chains.append(tuple(steps))
    return Plan(ws, m, tuple(chains))


def apply_op(img: Image.Image, name: str, param: float | None) -> Image.Image:
    """One operation on an RGB PIL image, output the same size (affine ones fill uncovered pixels black)."""
    if name == "autocontrast":
        return ImageOps.autocontrast(img)
    if name == "equalize":
        return ImageOps.equalize(img)
    if name == "posterize":
        return ImageOps.posterize(img, int(param))
    if name == "solarize":
        return ImageOps.solarize(img, int(param))
    if name == "rotate":
        return img.rotate(param, resample=Image.BILINEAR)
    # PIL's affine maps each output pixel (x, y) to the input pixel (a x + b y + c, d x + e y + f)
    coeffs = {"shear_x": (1, param, 0, 0, 1, 0), "shear_y": (1, 0, 0, param, 1, 0),
              "translate_x": (1, 0, param, 0, 1, 0), "translate_y": (1, 0, 0, 0, 1, param)}[name]
    return img.transform(img.size, Image.AFFINE, coeffs, resample=Image.BILINEAR)


def augmix_image(pixels: np.ndarray, plan: Plan) -> np.ndarray:
    """One AugMix view of uint8 [H, W, 3] pixels: float32 [H, W, 3] in [0, 1]."""
    img = Image.fromarray(pixels)
    clean = pixels.astype(np.float32) / 255
    mix = np.zeros_like(clean)
    for w, chain in zip(plan.weights, plan.chains, strict=True):
        aug = img
        for name, param in chain:
            aug = apply_op(aug, name, param)
        mix += w * (np.asarray(aug, dtype=np.float32) / 255)
    return (1 - plan.mix) * clean + plan.mix * mix


def crop_pixels(clean: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """The clean crop's own 8-bit pixels: normalized float [b, 3, H, W] ((p / 255 - mean) / std) ->
    uint8 [b, H, W, 3] on the CPU (the inverse of the loader's normalization, rounded)."""
    m = torch.tensor(mean, device=clean.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=clean.device).view(1, 3, 1, 1)
    x = (clean.float() * s + m).mul_(255).round_().clamp_(0, 255)
    return x.to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu()


_POOL: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    """Threads for the per-image PIL work (PIL releases the GIL in its C loops)."""
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1)))
    return _POOL


def augmix_views(clean: torch.Tensor, g: torch.Generator, cfg: AugMixConfig = AugMixConfig(), views: int = 2,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD) -> list[torch.Tensor]:
    """``views`` AugMix views of each normalized clean crop [b, 3, H, W] (float, (p / 255 - mean) / std), each
    [b, 3, H, W] normalized the same way, on clean's device and dtype. Seeded by the step generator ``g``
    (its seed, not its state: the step's other draws are unchanged): view v of image j draws from
    numpy's generator seeded by (g.initial_seed(), v, j)."""
    b, _, h, w = clean.shape
    if h != w:
        raise ValueError(f"AugMix takes square crops (the translate range is a third of the side); got {h}x{w}")
    pixels = crop_pixels(clean, mean, std).numpy()
    seed = g.initial_seed()

    def one(vj: tuple[int, int]) -> np.ndarray:
        v, j = vj
        return augmix_image(pixels[j], draw_plan(np.random.default_rng([seed, v, j]), cfg, h))

    out = np.stack(list(_pool().map(one, [(v, j) for v in range(views) for j in range(b)])))
    x = torch.from_numpy(out).to(clean.device).permute(0, 3, 1, 2)  # [views * b, 3, H, W], values in [0, 1]
    m = torch.tensor(mean, device=clean.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=clean.device).view(1, 3, 1, 1)
    x = ((x - m) / s).to(clean.dtype)
    return [x[v * b:(v + 1) * b] for v in range(views)]
