"""DDA: diffusion-driven test-time adaptation (Gao et al., "Back to the Source", CVPR 2023), and DDA-SE.

DDA projects a (corrupted) test image y back towards the diffusion model's training domain: it diffuses y
part of the way (to an intermediate noise level), then runs the reverse chain down to t = 0 while a
guidance term keeps the low-frequency structure of each x0 estimate close to that of y. DDA-SE
("self-ensemble") combines the classifier's predictions on y and on the adapted image.

Every setting below is the reference code's (github.com/shiyegao/DDA at accf067, the CVPR version of the
method, commit b18cf09 "Update method"), read from the files named:

==========================  ================================  ==================================================
setting                     value                             where
==========================  ================================  ==================================================
respaced reverse chain      100 steps spread over the 1000    image_adapt.sh ``--timestep_respacing 100``;
                            (``space_timesteps``, betas       image_adapt/guided_diffusion/respace.py
                            re-derived from abar at the kept  (``SpacedDiffusion.__init__``, ``_WrappedModel``
                            steps, UNet called with the       maps the index to the original t)
                            original t)
start (N)                   respaced index 50: y is noised    image_adapt.sh ``--N 50``; gaussian_diffusion.py
                            with ``q_sample`` at index 50     ``p_sample_loop_progressive`` lines 527-530:
                            (t = 505, abar 0.074), then the   ``q_sample(noise, N)`` and
                            chain runs indices 49..0          ``indices = range(N)[::-1]``
                            (t = 494 ... 0): 50 UNet calls.
                            The first step is one index below
                            the noise level; kept as is
reverse step                ``p_sample`` with clipped x0      gaussian_diffusion.py ``p_mean_variance`` /
                            (``clip_denoised=True``), the     ``p_sample``; image_sample.py line 122
                            learned-range variance of the     ``clip_denoised=True``; image_adapt.sh
                            ``learn_sigma`` checkpoint        ``--learn_sigma True``
low-pass filter phi         down by D then up by D, D = 4:    image_adapt.sh ``--D 4``; gaussian_diffusion.py
                            ``resize_right.resize`` with its  line 558; resize_right.py ``resize`` defaults
                            defaults: cubic (Keys a = -0.5),  (``interp_method=cubic``, ``antialiasing=True``,
                            antialiased when shrinking,       ``pad_mode='constant'``); interp_methods.py
                            zero padding at the borders       ``cubic``
guidance                    after each step,                  gaussian_diffusion.py lines 547-561: ``img``
                            x_{t-1} -= scale * grad_{x_t}     requires grad, ``norm = th.linalg.norm(
                            || phi(y) - phi(x0_hat(x_t)) ||,  difference)``, ``autograd.grad(norm, img)``,
                            scale = 6; the gradient runs      ``out["sample"] -= norm_grad * scale``;
                            back through the UNet             image_adapt.sh ``--scale 6``
guidance t range            every step of the chain (49..0)   same loop: no condition on i (the earlier ILVR
                                                              version, 55786bc, projected x_{t-1} - phi(x_{t-1})
                                                              + phi(q_sample(y, t)) for i > M = 20, D = 8)
norm over a group of 4      ONE L2 norm over the whole        gaussian_diffusion.py line 559 (a norm of the 4-D
                            per-process batch, batch 4        batch tensor); image_adapt.sh ``--batch_size 4``
                                                              (one batch per MPI process)
output                      the last sample, clamped to       image_sample.py lines 105-111: ``save_image(...,
                            [-1, 1] (no clamp inside the      normalize=True, range=(-1, 1))``
                            chain)
DDA-SE                      sum of the classifier's softmax   test.sh ``--ensemble sum``; model_adapt/evaluation.py
                            probabilities on the input and    lines 83-99 ``ensemble_from_logits`` mode 'sum'
                            on the adapted image              (``logits1 + logits2``): its inputs are mmcls's
                                                              ``simple_test`` outputs, which LinearClsHead returns
                                                              after ``F.softmax``, so they are probabilities
==========================  ================================  ==================================================

Where we differ, on purpose: the reference saves the adapted image as an 8-bit PNG and the classifier
reads it back (Resize 256 + CenterCrop 224 on both images, model_adapt/configs/_base_/datasets/); here the
adapted image stays float and the evaluator owns the geometry. DDA-SE returns (p + q) / 2, not p + q
(same argmax, still a distribution). phi(y) is computed once, not once per step (same values).

Cost: each of the 50 steps is one UNet forward on the whole batch plus, because the guidance
differentiates through the UNet, one backward pass (gradient w.r.t. the input only: the UNet's weights
are frozen), about 2x a forward in all (bench/bench_dda.py: the guided chain reached 45-52% of the
forward-only bound, the unguided one ~100%), and the activations of one forward are held per step. With
``guidance_scale=0`` the chain runs under no_grad (forward only). Noise order, for reproducibility: the
start noise, then one draw per step from index N-1 down to 1 (the last step adds none), all of x's shape,
from ``generator``.

Schedules other than the reference's: the settings count steps of the respaced chain, which always spans
the whole schedule, so a model with T steps gets the reference flags as guided_diffusion would apply them
(for a linear schedule of any T the same noise levels, as ``linear_betas`` rescales beta with T); a
schedule with fewer than ``respaced_steps`` steps keeps all of them and the same fraction for the start.
For another schedule shape (cosine: half-way is abar 0.49, not 0.074) ``DDASettings.noise_matched``
moves the start to the reference's noise level.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from ..constants import IMAGENET_MEAN, IMAGENET_STD
from .dda_parts import LowPass, RespacedChain, lowpass_matrix, respaced_timesteps

__all__ = ["DDASettings", "RespacedChain", "respaced_timesteps", "lowpass_matrix", "LowPass", "adapt",
           "unet_calls_per_image", "self_ensemble", "dda_predict"]

# The reference's start noise level: linear 1000-step schedule, respaced index 50 of 100 = t 505.
_REFERENCE_START_ABAR = 0.0739391247214384
_RANGE_TOL = 1e-2  # as ops/augment.py: a little overshoot from resampling is tolerated, more is a convention error


@dataclass(frozen=True)
class DDASettings:
    """DDA's settings, defaults = the reference's (see the module docstring for where each comes from).

    respaced_steps: steps of the strided reverse chain spread over the whole schedule (100).
    start_step: respaced index N at which the input is noised; the chain then runs N-1 .. 0 (50).
    lowpass_factor: D, the down/up factor of the low-pass filter phi; must divide H and W (4).
    guidance_scale: step size on the gradient of ||phi(y) - phi(x0_hat)|| (6.0); 0 turns guidance off.
    guidance_steps: respaced indices [lo, hi) where guidance is applied; None = every step (the reference).
    norm_group: images sharing one norm (4, the reference's per-process batch); 1 makes images independent.
        Groups are consecutive; a batch that is not a multiple ends with a smaller one (the reference's
        loader drops such a remainder, ``drop_last=True`` in image_datasets.py).
    clip_denoised: clamp each x0 estimate to [-1, 1] (True).
    """

    respaced_steps: int = 100
    start_step: int = 50
    lowpass_factor: int = 4
    guidance_scale: float = 6.0
    guidance_steps: tuple[int, int] | None = None
    norm_group: int = 4
    clip_denoised: bool = True

    def __post_init__(self) -> None:
        if not (isinstance(self.respaced_steps, int) and self.respaced_steps >= 2):
            raise ValueError(f"respaced_steps must be an integer >= 2, got {self.respaced_steps!r}")
        if not (isinstance(self.start_step, int) and 1 <= self.start_step < self.respaced_steps):
            raise ValueError(f"start_step must be an integer in [1, respaced_steps - 1 = {self.respaced_steps - 1}] "
                             f"(the chain is noised at that index and runs down to 0), got {self.start_step!r}")
        if not (isinstance(self.lowpass_factor, int) and self.lowpass_factor >= 1):
            raise ValueError(f"lowpass_factor must be an integer >= 1, got {self.lowpass_factor!r}")
        if not (isinstance(self.guidance_scale, (int, float)) and math.isfinite(self.guidance_scale)
                and self.guidance_scale >= 0):
            raise ValueError(f"guidance_scale must be a finite number >= 0, got {self.guidance_scale!r}")
        if not (isinstance(self.norm_group, int) and self.norm_group >= 1):
            raise ValueError(f"norm_group must be an integer >= 1, got {self.norm_group!r}")
        if self.guidance_steps is not None:
            lo, hi = self.guidance_steps
            if not (0 <= lo < hi <= self.start_step):
                raise ValueError(f"guidance_steps must be (lo, hi) with 0 <= lo < hi <= start_step "
                                 f"= {self.start_step}, got {self.guidance_steps!r}")

    def for_schedule(self, num_steps: int) -> DDASettings:
        """The settings for a schedule of ``num_steps`` steps: unchanged when it has at least
        ``respaced_steps``; otherwise every step is kept and the start (and guidance range) keep their
        fraction of the chain."""
        if num_steps >= self.respaced_steps:
            return self
        if num_steps < 2:
            raise ValueError(f"DDA needs a schedule of at least 2 steps, got {num_steps}")

        def scaled(k: int) -> int:
            return round(k * num_steps / self.respaced_steps)

        start = min(max(1, scaled(self.start_step)), num_steps - 1)
        steps = None
        if self.guidance_steps is not None:
            lo = min(scaled(self.guidance_steps[0]), start - 1)
            steps = (lo, min(max(lo + 1, scaled(self.guidance_steps[1])), start))
        return replace(self, respaced_steps=num_steps, start_step=start, guidance_steps=steps)

    def noise_matched(self, schedule) -> DDASettings:
        """These settings with ``start_step`` moved to the respaced index whose abar is nearest the
        reference's start (abar 0.0739: linear 1000 steps, t = 505). For schedules of another shape
        (improved-diffusion's cosine); a linear schedule keeps start_step = 50."""
        s = self.for_schedule(schedule.num_steps)
        abar = np.asarray(schedule.alphas_cumprod)[respaced_timesteps(schedule.num_steps, s.respaced_steps)]
        start = int(np.argmin(np.abs(np.log(abar[1:]) - math.log(_REFERENCE_START_ABAR)))) + 1
        return replace(s, start_step=start, guidance_steps=None)


def unet_calls_per_image(settings: DDASettings = DDASettings(), num_steps: int = 1000) -> int:
    """UNet forward calls per adapted image: the ``start_step`` reverse steps (50 for the reference).

    Each guided step also runs one backward pass through the UNet (input gradient only); the batch goes
    through the UNet whole in every call, so per-batch calls equal per-image calls."""
    return settings.for_schedule(num_steps).start_step


# ----------------------------------------------------------------------------------------------------
# adaptation


def _check_denoiser(denoiser: nn.Module, guided: bool) -> None:
    config = getattr(denoiser, "config", None)
    if guided and getattr(denoiser, "compiled", False):
        raise ValueError("DDA's guidance backpropagates through the UNet, but a compiled Denoiser runs under "
                         "no_grad: load it with compile=False (or set guidance_scale=0)")
    if getattr(denoiser, "eps_only", False) and config is not None and config.learn_sigma:
        raise ValueError("DDA's reverse steps use the learned variance channels, but this Denoiser computes eps "
                         "only: load it with eps_only=False")


def _check_images(x: torch.Tensor, denoiser: nn.Module, factor: int, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    config = getattr(denoiser, "config", None)
    cin = config.in_channels if config is not None else 3
    if x.dim() != 4 or x.shape[1] != cin:
        raise ValueError(f"{name} must be float NCHW [B, {cin}, H, W]; got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} has dtype {x.dtype}; DDA takes float images in [-1, 1] (uint8: x.float() / 127.5 - 1)")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch")
    h, w = x.shape[-2:]
    if h % factor or w % factor:
        raise ValueError(f"{name} is {h}x{w}, but the low-pass factor D = {factor} must divide H and W "
                         f"(DDA shrinks the image D times and enlarges it back)")
    down = getattr(denoiser, "total_downsampling", 1)
    if h % down or w % down:
        raise ValueError(f"{name} is {h}x{w}, but the UNet downsamples {down}x in total: H and W must be multiples "
                         f"of {down}")
    lo, hi = (v.item() for v in torch.aminmax(x.detach().float()))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")
    if lo < -1 - _RANGE_TOL or hi > 1 + _RANGE_TOL:
        raise ValueError(f"{name} must lie in [-1, 1]; its values span [{lo:.3g}, {hi:.3g}]")


def _group_norms(d: torch.Tensor, group: int) -> torch.Tensor:
    """Sum over consecutive groups of ``group`` images of the L2 norm of d over the group (the reference
    takes one norm over its batch of 4); its gradient is 0 where a group's d is 0."""
    return torch.stack([torch.linalg.vector_norm(part) for part in d.split(group)]).sum()


def adapt(x: torch.Tensor, denoiser: nn.Module, settings: DDASettings = DDASettings(), *,
          generator: torch.Generator | None = None) -> torch.Tensor:
    """DDA-adapt a batch of images: diffuse to ``start_step``, run the guided reverse chain to t = 0.

    x: float [B, C, H, W] in [-1, 1] (H, W multiples of ``lowpass_factor`` and of the UNet's downsampling).
    denoiser: a ``Denoiser`` (or any module with ``.schedule`` whose ``forward(x_t, t)`` returns the raw UNet
        output [B, C or 2C, H, W]: eps first, then the learned-range variance channels if any).
    generator: draws all noise (on x's device; order in the module docstring).
    Returns the adapted images, float32 [B, C, H, W] clamped to [-1, 1]. ``unet_calls_per_image(settings)``
    UNet forwards run, each on the whole batch; guided steps add a backward pass each. Works under
    ``torch.no_grad`` and ``torch.inference_mode`` (the guidance re-enables autograd for itself).
    """
    s = settings.for_schedule(denoiser.schedule.num_steps)
    guided_any = s.guidance_scale > 0
    _check_denoiser(denoiser, guided_any)
    _check_images(x, denoiser, s.lowpass_factor)
    chain = _chain(denoiser.schedule, s.respaced_steps)
    dev = x.device
    lo, hi = s.guidance_steps or (0, s.start_step)

    def randn() -> torch.Tensor:
        return torch.randn(x.shape, generator=generator, device=dev, dtype=torch.float32)

    # autograd must be usable for the guided steps even when the caller evaluates under inference_mode
    with torch.inference_mode(False):
        lowpass = LowPass(x.shape[-2], x.shape[-1], s.lowpass_factor, dev)
        y = x.detach().float().clone()
        with torch.no_grad():
            target = lowpass(y)
            x_t = chain.q_sample(y, s.start_step, randn())
        for k in range(s.start_step - 1, -1, -1):
            noise = randn() if k > 0 else None
            if guided_any and lo <= k < hi:
                with torch.enable_grad():
                    x_in = x_t.detach().requires_grad_(True)
                    sample, x0 = chain.p_sample(denoiser, x_in, k, noise, s.clip_denoised)
                    norm = _group_norms(target - lowpass(x0), s.norm_group)
                    (grad,) = torch.autograd.grad(norm, x_in)
                x_t = sample.detach() - s.guidance_scale * grad
            else:
                with torch.no_grad():
                    x_t, _ = chain.p_sample(denoiser, x_t, k, noise, s.clip_denoised)
        return x_t.clamp_(-1, 1)


_CHAINS: dict[tuple, RespacedChain] = {}


def _chain(schedule, count: int) -> RespacedChain:
    """The chain of a named schedule is built once per (schedule, count); an unnamed one every call."""
    name = getattr(schedule, "name", None)
    if name is None:
        return RespacedChain(schedule, count)
    key = (name, schedule.num_steps, count)
    if key not in _CHAINS:
        _CHAINS[key] = RespacedChain(schedule, count)
    return _CHAINS[key]


# ----------------------------------------------------------------------------------------------------
# prediction: plain, DDA, DDA-SE


def self_ensemble(p_input: torch.Tensor, p_adapted: torch.Tensor) -> torch.Tensor:
    """DDA-SE: (p_input + p_adapted) / 2 for softmax probabilities [B, K] of the input and of its adapted
    image. The reference sums the two probability vectors (its 'sum' ensemble of mmcls's softmax outputs);
    halving keeps a distribution and the argmax. Not a sum of logits: a confident input prediction can
    outvote an adapted one that wins on logits."""
    if p_input.shape != p_adapted.shape:
        raise ValueError(f"probability shapes differ: {tuple(p_input.shape)} vs {tuple(p_adapted.shape)}")
    return (p_input + p_adapted) / 2


def _channel(v: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(list(v), dtype=torch.float32, device=like.device).view(1, -1, 1, 1)


def dda_predict(
    model: nn.Module,
    x_normalized: torch.Tensor,
    denoiser: nn.Module,
    *,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    settings: DDASettings = DDASettings(),
    generator: torch.Generator | None = None,
    autocast_dtype: torch.dtype | None = None,
    class_idx: Sequence[int] | None = None,
) -> dict[str, torch.Tensor]:
    """Softmax probabilities of ``model`` on the input and on its DDA adaptation, from one adaptation.

    x_normalized: float [B, 3, H, W], the classifier's input convention ((x01 - mean) / std, x01 in [0, 1]).
    Returns {"plain": p(x), "dda": p(adapt(x)), "dda_se": self_ensemble(plain, dda)}, each float32 [B, K]
    (K = len(class_idx) when given: the logits are sliced to those classes before the softmax, as
    ``ensemble_probs`` does). The classifier runs under autocast in ``autocast_dtype`` when given.
    """
    if not isinstance(x_normalized, torch.Tensor) or not x_normalized.is_floating_point():
        raise TypeError("x_normalized must be a float tensor [B, 3, H, W] normalized with mean/std")
    if len(mean) != x_normalized.shape[1] or len(std) != x_normalized.shape[1]:
        raise ValueError(f"mean/std need one value per channel ({x_normalized.shape[1]}), got {mean}, {std}")
    m, sd = _channel(mean, x_normalized), _channel(std, x_normalized)
    unit = 2 * (x_normalized.detach().float() * sd + m) - 1
    lo, hi = (v.item() for v in torch.aminmax(unit))
    if lo < -1 - _RANGE_TOL or hi > 1 + _RANGE_TOL:  # checked here to name the normalization, not [-1, 1]
        raise ValueError(f"x_normalized with mean={list(mean)}, std={list(std)} maps to [{lo:.3g}, {hi:.3g}] in "
                         "[-1, 1] units: is it normalized with these mean/std (the loader's)?")
    adapted = adapt(unit, denoiser, settings, generator=generator)
    adapted_normalized = ((adapted + 1) / 2 - m) / sd
    idx = None if class_idx is None else torch.as_tensor(list(class_idx), device=x_normalized.device)

    def probs(view: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), torch.autocast(view.device.type, dtype=autocast_dtype or torch.bfloat16,
                                             enabled=autocast_dtype is not None):
            logits = model(view).float()
        if idx is not None:
            logits = logits.index_select(1, idx)
        return logits.softmax(dim=1)

    plain = probs(x_normalized)
    dda = probs(adapted_normalized.to(x_normalized.dtype))
    return {"plain": plain, "dda": dda, "dda_se": self_ensemble(plain, dda)}
