"""Certified L2 robustness: randomized smoothing (Cohen et al. 2019) and diffusion denoised smoothing
(Carlini et al. 2023), with the API of locuslab/smoothing.

    smooth = Smooth(classifier, num_classes, sigma=0.5, denoiser=den)   # denoiser=None: plain smoothing
    label, radius = smooth.certify(x, n0=100, n=10_000, alpha=0.001, batch_size=200)
    label = smooth.predict(x, n=1000, alpha=0.001, batch_size=200)

The smoothed classifier is g(x) = argmax_c P(f(x + d) = c), d ~ N(0, sigma^2 I), with x a [C, H, W] image
in [0, 1] and sigma in that scale. ``certify`` guesses the top class from n0 samples, counts it in n
fresh samples, and takes the one-sided Clopper-Pearson lower bound pA_lower at level alpha; the
certified radius is sigma * Phi^-1(pA_lower), and it abstains (-1) when pA_lower < 0.5. ``predict``
abstains unless the two-sided binomial test of the top two counts rejects a tie at level alpha.

With a denoiser, every noisy sample is first denoised as Carlini et al. do: x + d mapped to [-1, 1]
(noise 2 sigma there), scaled by sqrt(abar_t*), one UNet call at t* = ``snr_timestep(sigma)``, the
clipped x0 estimate mapped back to [0, 1], then the classifier. Scaled x_t is exactly the forward
diffusion's x_t* whenever sqrt((1 - abar)/abar) = 2 sigma, and t* is the first t with at least that
much noise. Noise is drawn in-kernel (Philox, ``ops/philox.py``) by the fused ``pre`` op with a
per-sigma coefficient row, so it never goes through the host; the same (seed, sigma) gives the same
certificates on every backend.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from scipy.stats import beta, binomtest, norm
from torch import nn

from ..constants import IMAGENET_MEAN, IMAGENET_STD
from ..data import scan_dataset
from ..diffusion.denoiser import Denoiser
from ..ops import fused
from .ensemble import val_batches
from .models import with_normalization

__all__ = ["Smooth", "ABSTAIN", "lower_confidence_bound", "max_certifiable_radius", "certified_accuracy", "RADII",
           "demo_certify_line"]

ABSTAIN = -1
RADII: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0)
# how far outside [0, 1] an image may reach (resampling overshoot) before it is taken for another convention:
# ops/augment.py's tolerance around [-1, 1], halved for the [0, 1] scale
_RANGE_TOL = 5e-3


def lower_confidence_bound(n_a: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on a binomial proportion from n_a successes in n.

    The alpha quantile of Beta(n_a, n - n_a + 1); Cohen's ``proportion_confint(nA, N, alpha=2*alpha,
    method="beta")[0]`` (the lower end of the two-sided 1 - 2 alpha interval) is the same number.
    """
    if n_a <= 0:
        return 0.0
    return float(beta.ppf(alpha, n_a, n - n_a + 1))


def max_certifiable_radius(sigma: float, n: int, alpha: float) -> float:
    """The largest radius CERTIFY can return with n samples: every one of the n counts on the top class.

    Then pA_lower = Beta(n, 1).ppf(alpha) = alpha ** (1 / n), and the radius is sigma * Phi^-1(alpha ** (1/n)):
    at alpha = 0.001, 3.20 sigma for n = 10,000 and 3.81 sigma for n = 100,000 (Cohen et al.'s N). Radii
    above it are never certified, however good the classifier.
    """
    return float(sigma) * float(norm.ppf(lower_confidence_bound(int(n), int(n), alpha)))


def certified_accuracy(radius: Sequence[float], correct: Sequence[bool], radii: Sequence[float] = RADII) -> list[float]:
    """Fraction of images certified correct at each radius r: correct and certified radius >= r (Cohen's
    ``analyze.py``); abstentions count as wrong. Fractions in [0, 1]."""
    rad, ok = np.asarray(radius, dtype=np.float64), np.asarray(correct, dtype=bool)
    if rad.size == 0:
        return [float("nan")] * len(radii)
    return [float((ok & (rad >= r)).mean()) for r in radii]


class Smooth:
    """A smoothed classifier around ``classifier`` (see the module docstring).

    classifier: nn.Module mapping float [B, C, H, W] images in [0, 1] to logits [B, num_classes]; wrap a
    model trained on mean/std-normalized inputs with ``diffaug_fast.models.with_normalization``.
    denoiser: a ``Denoiser`` for diffusion denoised smoothing, or None for plain randomized smoothing.
    t: the denoiser's timestep (default ``denoiser.schedule.snr_timestep(sigma)``).
    seed: Philox key; draws use consecutive offsets, so a fixed seed repeats every certificate.
    autocast_dtype: run the classifier under autocast in this dtype (float16/bfloat16 on GPU), or None.
    """

    def __init__(self, classifier: nn.Module, num_classes: int, sigma: float, denoiser: Denoiser | None = None, *,
                 t: int | None = None, seed: int = 0, backend: str | None = None,
                 autocast_dtype: torch.dtype | None = None):
        if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"sigma must be a positive number (noise std in [0, 1] pixel units), got {sigma}")
        if int(num_classes) < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        self.base_classifier = classifier
        self.num_classes = int(num_classes)
        self.sigma = float(sigma)
        self.denoiser = denoiser
        self.seed = int(seed)
        self.offset = 0  # Philox elements drawn so far
        self.backend = backend
        self.autocast_dtype = autocast_dtype
        self.t = None
        if denoiser is not None:
            self.t = denoiser.schedule.snr_timestep(self.sigma) if t is None else int(t)
            if not 0 <= self.t < denoiser.num_steps:
                raise ValueError(f"t must lie in 0..{denoiser.num_steps - 1}, got {self.t}")
        self._tables: dict[torch.device, torch.Tensor] = {}

    # ------------------------------------------------------------------------------------------------
    # the noisy (and denoised) views

    def _table(self, device: torch.device) -> torch.Tensor:
        """float32 [T, 4] coefficient rows for the fused ops: column 0 scales x, column 1 scales the noise.

        Plain smoothing: one row (1, sigma, -, -) applied to x itself. Denoised: the schedule's table with
        row t* = (sqrt(abar), 2 sigma sqrt(abar), sqrt(1/abar), sqrt(1/abar - 1)), all from float64.
        """
        if device not in self._tables:
            if self.denoiser is None:
                rows = np.array([[1.0, self.sigma, 1.0, 0.0]])
            else:
                s = self.denoiser.schedule
                rows = np.stack([s.sqrt_alphas_cumprod, s.sqrt_one_minus_alphas_cumprod, s.sqrt_recip_alphas_cumprod,
                                 s.sqrt_recipm1_alphas_cumprod], axis=1)
                rows[self.t, 1] = 2.0 * self.sigma * s.sqrt_alphas_cumprod[self.t]
            self._tables[device] = torch.from_numpy(rows).to(device=device, dtype=torch.float32)
        return self._tables[device]

    @torch.no_grad()
    def noisy_views(self, x: torch.Tensor, num: int) -> torch.Tensor:
        """float32 [num, C, H, W] in [0, 1] units: x + N(0, sigma^2) (plain), or its denoised estimate.

        The noise is Philox (seed, offset) from ``ops/philox.py``; ``offset`` advances by num * C * H * W.
        """
        c = x.shape[0]
        xb = x.float().unsqueeze(0).expand(num, *x.shape)
        philox = torch.tensor([self.seed, self.offset], dtype=torch.int64, device=x.device)
        self.offset += xb.numel()
        backend = fused.resolve_backend(self.backend, x.device)
        table = self._table(x.device)
        if self.denoiser is None:
            # mean = std = 0.5 makes the op's input map 2 * (0.5 x + 0.5) - 1 the identity: x + sigma z in [0, 1] units
            t = torch.zeros(num, dtype=torch.long, device=x.device)
            return fused.pre(xb, t, table, None, philox, (0.5,) * c, (0.5,) * c, torch.float32, False, backend)
        den = self.denoiser
        t = torch.full((num,), self.t, dtype=torch.long, device=x.device)
        zero, one = (0.0,) * c, (1.0,) * c  # read [0, 1] images, write [0, 1] images
        x_t = fused.pre(xb, t, table, None, philox, zero, one, den.dtype, x.is_cuda, backend)
        out = torch.empty(xb.shape, dtype=torch.float32, device=x.device)
        fused.post(den(x_t, t), x_t, t, table, zero, one, True, backend, out)
        return out

    @torch.no_grad()
    def _sample_counts(self, x: torch.Tensor, num: int, batch_size: int) -> np.ndarray:
        """int64 [num_classes] counts of the base classifier's predictions on num noisy views of x."""
        counts = torch.zeros(self.num_classes, dtype=torch.long, device=x.device)
        left = num
        while left > 0:
            b = min(batch_size, left)
            left -= b
            views = self.noisy_views(x, b)
            with torch.autocast(x.device.type, dtype=self.autocast_dtype or torch.bfloat16,
                                enabled=self.autocast_dtype is not None):
                logits = self.base_classifier(views)
            if logits.shape[-1] != self.num_classes:
                raise ValueError(f"the classifier gives {logits.shape[-1]} logits, Smooth was built with "
                                 f"num_classes={self.num_classes}")
            counts += torch.bincount(logits.argmax(1), minlength=self.num_classes)
        return counts.cpu().numpy()

    def _check(self, x: torch.Tensor, n: int, alpha: float, batch_size: int) -> None:
        """One clear ValueError for input CERTIFY/PREDICT cannot take, before any sample is drawn: not one float
        image [C, H, W], channels or size the UNet cannot take, NaN/inf, values outside [0, 1]."""
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or not x.is_floating_point():
            got = (f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__)
            hint = " (uint8 pixels: x.float() / 255)" if isinstance(x, torch.Tensor) and x.dtype == torch.uint8 else ""
            raise ValueError(f"x must be one float image [C, H, W] in [0, 1]; got {got}{hint}")
        if int(n) < 1 or int(batch_size) < 1:
            raise ValueError(f"n and batch_size must be positive, got n={n}, batch_size={batch_size}")
        if not 0 < alpha < 0.5:
            raise ValueError(f"alpha must lie in (0, 0.5), got {alpha}")
        if x.numel() == 0:
            raise ValueError(f"x is an empty image {tuple(x.shape)}")
        if self.denoiser is not None:
            cin, down, (h, w) = self.denoiser.config.in_channels, self.denoiser.total_downsampling, x.shape[-2:]
            if x.shape[0] != cin:
                raise ValueError(f"x has {x.shape[0]} channels in dim 0, the UNet takes {cin}: x must be [C, H, W]")
            if h % down or w % down:
                raise ValueError(f"x is {h}x{w}, but the UNet downsamples {down}x: H and W must be multiples of {down}")
        lo, hi = (v.item() for v in torch.aminmax(x.detach()))
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError("x contains non-finite values (NaN or inf)")
        if lo < -_RANGE_TOL or hi > 1 + _RANGE_TOL:
            if hi > 2 and lo >= -_RANGE_TOL:
                guess = "it looks like [0, 255] pixels: use x / 255"
            elif lo >= -1 - _RANGE_TOL and hi <= 1 + _RANGE_TOL:
                guess = "it looks like a [-1, 1] image: use (x + 1) / 2"
            else:
                guess = "it looks mean/std-normalized: undo it (x * std + mean); the classifier normalizes itself"
            raise ValueError(f"x must lie in [0, 1] (sigma is in those units); its values span [{lo:.3g}, {hi:.3g}]: "
                             + guess)

    # ------------------------------------------------------------------------------------------------
    # Cohen et al.'s CERTIFY and PREDICT

    def certify(self, x: torch.Tensor, n0: int, n: int, alpha: float, batch_size: int) -> tuple[int, float]:
        """(class, radius) with P(g(x + delta) = class) for all ||delta||_2 < radius with probability
        >= 1 - alpha over the sampling; (-1, 0.0) to abstain."""
        self._check(x, n, alpha, batch_size)
        if int(n0) < 1 or n0 > n:
            raise ValueError(f"need 1 <= n0 <= n (n0 samples select the class, n certify it); got n0={n0}, n={n}")
        c_hat = int(self._sample_counts(x, int(n0), batch_size).argmax())
        n_a = int(self._sample_counts(x, int(n), batch_size)[c_hat])
        p_lower = lower_confidence_bound(n_a, int(n), alpha)
        if p_lower < 0.5:
            return ABSTAIN, 0.0
        return c_hat, self.sigma * float(norm.ppf(p_lower))

    def predict(self, x: torch.Tensor, n: int, alpha: float, batch_size: int) -> int:
        """The smoothed prediction, or -1 when the top two counts do not differ at level alpha (two-sided
        binomial test of n_A against n_A + n_B at p = 1/2, scipy.stats.binomtest)."""
        self._check(x, n, alpha, batch_size)
        counts = self._sample_counts(x, int(n), batch_size)
        top2 = np.argsort(counts, kind="stable")[::-1][:2]
        n_a, n_b = int(counts[top2[0]]), int(counts[top2[1]])
        if binomtest(n_a, n_a + n_b, p=0.5).pvalue > alpha:
            return ABSTAIN
        return int(top2[0])


def demo_certify_line(model: nn.Module, data_root, *, crop_size: int, resize_size: int,
                      mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                      denoiser: Denoiser | None = None, sigma: float = 0.25, n_images: int = 4, n0: int = 10,
                      n: int = 100, alpha: float = 0.001, device: torch.device | str = "cpu",
                      backend: str = "auto", num_workers: int = 0) -> str:
    """One line for the demo: certified accuracy at radius 0 and sigma of ``n_images`` images spread over
    <data_root>/val (n noisy copies each; with a denoiser, n UNet calls per image: seconds at demo size)."""
    index = scan_dataset(Path(data_root) / "val", progress=False)
    picks = np.linspace(0, len(index) - 1, min(n_images, len(index))).round().astype(int)
    sub = index.subset(picks)
    smooth = Smooth(with_normalization(model, mean, std), len(index.classes), sigma, denoiser)
    radius, correct = [], []
    for x, y in val_batches(sub, batch_size=len(sub), backend=backend, device=torch.device(device),
                            crop_size=crop_size, resize_size=resize_size, mean=(0.0,) * 3, std=(1.0,) * 3,
                            num_workers=num_workers):
        for xi, yi in zip(x, y.tolist(), strict=True):
            label, r = smooth.certify(xi, n0, n, alpha, batch_size=n)
            radius.append(r)
            correct.append(label == yi)
    acc = certified_accuracy(radius, correct, (0.0, sigma))
    how = f"denoised at t={smooth.t}" if denoiser is not None else "no denoiser"
    return (f"certified accuracy (randomized smoothing, sigma {sigma}, {how}, n={n}, {len(radius)} images): "
            f"{100 * acc[0]:.0f}% at radius 0, {100 * acc[1]:.0f}% at radius {sigma}")
