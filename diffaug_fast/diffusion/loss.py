"""improved-diffusion's training objective and one-step denoising quality, written against our Schedule.

Objective (Nichol & Dhariwal 2021, the "hybrid" loss of improved-diffusion):

    loss = mse + vb           mse = mean over pixels of (eps - eps_hat)^2             (L_simple)
                              vb  = L_t in bits per dim, with eps_hat stop-gradiented  (only when the model
                                    learns its variance: out_channels == 2 * in_channels)

vb is KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0 and the discretized Gaussian decoder NLL at
t = 0, times num_steps / 1000. lambda * L_vlb with lambda = 0.001 and L_vlb = T * L_t gives that same factor
(improved-diffusion's ``rescale_learned_sigmas=True``, guided-diffusion's LossType.RESCALED_MSE; for T = 1000
it is plain mse + vb). The learned variance interpolates log beta_t and the clipped log posterior variance
(``LEARNED_RANGE``). Every coefficient is computed in float64 and cast to float32 when gathered by t,
as the OpenAI code does, so our terms equal theirs to float32 rounding (tests/test_denoiser_training.py).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .schedule import Schedule

__all__ = ["LossTables", "hybrid_loss", "one_step", "psnr_table", "format_psnr_table", "PSNR_TS"]

PSNR_TS = (50, 100, 250, 500, 750)


class LossTables:
    """float64 per-t coefficient tables of the posterior q(x_{t-1} | x_t, x_0), gathered as float32 [B]."""

    def __init__(self, schedule: Schedule):
        betas, abar = schedule.betas, schedule.alphas_cumprod
        abar_prev = np.append(1.0, abar[:-1])
        post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
        # the posterior variance is 0 at t = 0: its log is clipped to the t = 1 value
        self.schedule = schedule
        self.np = {
            "sqrt_abar": np.sqrt(abar),
            "sqrt_1m_abar": np.sqrt(1.0 - abar),
            "sqrt_recip_abar": np.sqrt(1.0 / abar),
            "sqrt_recipm1_abar": np.sqrt(1.0 / abar - 1.0),
            "post_coef1": betas * np.sqrt(abar_prev) / (1.0 - abar),
            "post_coef2": (1.0 - abar_prev) * np.sqrt(1.0 - betas) / (1.0 - abar),
            "post_logvar": np.log(np.append(post_var[1], post_var[1:])),
            "log_betas": np.log(betas),
        }
        self._dev: dict = {}

    def __call__(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """float32 [B, 1, 1, 1] of table ``name`` at integer timesteps ``t`` [B]."""
        key = (name, t.device)
        if key not in self._dev:
            self._dev[key] = torch.from_numpy(self.np[name]).to(t.device)  # float64 on the device
        return self._dev[key][t].float().view(-1, 1, 1, 1)


def _normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """Elementwise KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    # the tanh approximation of Phi that Ho et al. and improved-diffusion use: the decoder NLL is defined with it
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _discretized_gaussian_nll(x0: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """-log P(x0's 8-bit bin) under N(mean, e^(2 log_scale)), in nats; x0 in [-1, 1], edge bins open-ended."""
    inv_std = torch.exp(-log_scale)
    cdf_hi = _std_normal_cdf(inv_std * (x0 - mean + 1.0 / 255.0))
    cdf_lo = _std_normal_cdf(inv_std * (x0 - mean - 1.0 / 255.0))
    log_hi = torch.log(cdf_hi.clamp(min=1e-12))
    log_1m_lo = torch.log((1.0 - cdf_lo).clamp(min=1e-12))
    log_mid = torch.log((cdf_hi - cdf_lo).clamp(min=1e-12))
    return -torch.where(x0 < -0.999, log_hi, torch.where(x0 > 0.999, log_1m_lo, log_mid))


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.dim())))


def hybrid_loss(model_out: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, noise: torch.Tensor,
                t: torch.Tensor, tables: LossTables) -> dict[str, torch.Tensor]:
    """Per-example loss terms, each float32 [B]: {"mse", "loss"} and, for learned-sigma models, "vb".

    model_out [B, C or 2C, H, W] (eps, then the variance interpolation value v in [-1, 1] for 2C);
    x0, x_t, noise [B, C, H, W] float32 with x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise; t int64 [B].
    """
    c = x0.shape[1]
    eps = model_out[:, :c].float()
    terms = {"mse": _mean_flat((noise - eps) ** 2)}
    if model_out.shape[1] == 2 * c:
        v = model_out[:, c:].float()
        frac = (v + 1) / 2
        min_log, max_log = tables("post_logvar", t), tables("log_betas", t)
        model_logvar = frac * max_log + (1 - frac) * min_log
        # the mean is stop-gradiented: the vb term only trains the variance (improved-diffusion, section 3.1)
        x0_hat = tables("sqrt_recip_abar", t) * x_t - tables("sqrt_recipm1_abar", t) * eps.detach()
        coef1, coef2 = tables("post_coef1", t), tables("post_coef2", t)
        model_mean = coef1 * x0_hat + coef2 * x_t
        true_mean = coef1 * x0 + coef2 * x_t
        kl = _mean_flat(_normal_kl(true_mean, min_log, model_mean, model_logvar)) / math.log(2.0)
        nll = _mean_flat(_discretized_gaussian_nll(x0, model_mean, 0.5 * model_logvar)) / math.log(2.0)
        vb = torch.where(t == 0, nll, kl) * (tables.schedule.num_steps / 1000.0)
        terms["vb"] = vb
        terms["loss"] = terms["mse"] + vb
    elif model_out.shape[1] == c:
        terms["loss"] = terms["mse"]
    else:
        raise ValueError(f"model output has {model_out.shape[1]} channels; expected {c} or {2 * c}")
    return terms


# ---------------------------------------------------------------------------------------------------- quality


@torch.no_grad()
def one_step(model, schedule: Schedule, x0: torch.Tensor, t: int, noise: torch.Tensor):
    """(x_t / sqrt(abar_t), clipped one-step x0 estimate), both [B, C, H, W] in [-1, 1] (the first clipped too).

    model(x_t [B, C, H, W], t int64 [B]) -> [B, >= C, H, W] with eps in the first C channels (a ``Denoiser``).
    """
    tt = torch.full((x0.shape[0],), t, dtype=torch.long, device=x0.device)
    k = schedule.gather(tt).view(-1, 4, 1, 1)
    x_t = k[:, 0:1] * x0 + k[:, 1:2] * noise
    eps = model(x_t, tt)[:, : x0.shape[1]].float()
    x0_hat = (k[:, 2:3] * x_t - k[:, 3:4] * eps).clamp(-1, 1)
    return (x_t * k[:, 2:3]).clamp(-1, 1), x0_hat


def _psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of [-1, 1] images (peak-to-peak 2): 10 log10(4 / MSE)."""
    return 10.0 * torch.log10(4.0 / _mean_flat((a - b) ** 2).clamp(min=1e-12))


@torch.no_grad()
def psnr_table(den, images: torch.Tensor, ts=PSNR_TS, seed: int = 0, schedule: Schedule | None = None) -> list[dict]:
    """One-step denoising quality by t: rows {t, psnr_noisy, psnr_x0, gain} (dB, mean over images).

    den: a ``Denoiser`` (or any model(x_t, t) with ``.schedule``, or pass ``schedule``); images [B, 3, H, W]
    in [-1, 1]. psnr_noisy is that of the noisy input rescaled, x_t / sqrt(abar_t), clipped to [-1, 1] like the
    estimate, so the gain is the network's and not the clipping's. The noise is drawn from ``seed`` (the same
    noise for every t).
    """
    schedule = schedule or den.schedule
    dev = images.device
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed)).to(dev)
    rows = []
    for t in ts:
        noisy, x0_hat = one_step(den, schedule, images.float(), int(t), noise)
        pn, px = _psnr(noisy, images).mean().item(), _psnr(x0_hat, images).mean().item()
        rows.append({"t": int(t), "psnr_noisy": pn, "psnr_x0": px, "gain": px - pn})
    return rows


def format_psnr_table(rows: list[dict], title: str = "one-step denoising PSNR (dB)") -> str:
    lines = [title, f"  {'t':>5} {'noisy':>8} {'x0_hat':>8} {'gain':>7}"]
    lines += [f"  {r['t']:>5} {r['psnr_noisy']:>8.2f} {r['psnr_x0']:>8.2f} {r['gain']:>+7.2f}" for r in rows]
    return "\n".join(lines)
