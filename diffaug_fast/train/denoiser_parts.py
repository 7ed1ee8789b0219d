"""The parts of denoiser training (diffaug_fast/train/denoiser.py runs them): the training view of a batch, the
per-sample t and noise, the forward half (improved-diffusion's hybrid loss) and the backward half (optional
clipping, AdamW, the EMA with its warm-up) of a step, the loss by quarter of t, and the outputs (the bad-image
report, the OpenAI-format checkpoint with its JSON sidecar, the PNG grid of one-step denoising).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from ..constants import derive_seed
from ..data.plan import train_boxes
from ..diffusion.denoiser import SIDECAR_FORMAT, read_sidecar, sidecar_path
from ..diffusion.loss import PSNR_TS, LossTables, format_psnr_table, hybrid_loss, one_step, psnr_table
from ..diffusion.schedule import Schedule
from ..diffusion.unet import UNet, UNetConfig
from ..io import atomic_save, atomic_write_bytes
from ..viz import save_grid
from .denoiser_checks import check_out_path, resolve_config

__all__ = ["resolve_config", "export_checkpoint", "read_sidecar", "sidecar_path", "sample_t_noise", "ema_update",
           "ema_decay", "sample_flips", "training_view", "diffusion_forward", "optimizer_step", "LossWindow", "ModelFn",
           "check_out_path", "save_grid_png", "report_bad_images", "psnr_table", "format_psnr_table", "PSNR_TS",
           "hybrid_loss", "LossTables", "WEAK_GAIN_DB", "WEAK_GAIN_T"]

GRID_TS = (50, 100, 250, 500, 750, 999)
# the exported weights are warned about when they denoise less than this at this t (a trained model of the
# demo's size gains +12 dB there; the zero-initialised output layer of an untrained one, exactly 0)
WEAK_GAIN_DB, WEAK_GAIN_T = 1.0, 250




# ---------------------------------------------------------------------------------------------------- step parts


def sample_t_noise(seed: int, step: int, ids: torch.Tensor, shape: tuple[int, ...], num_steps: int):
    """Uniform t int64 [B] and noise float32 [B, *shape] (CPU), sample i drawn from (seed, step, ids[i])."""
    ts, noise = torch.empty(len(ids), dtype=torch.long), torch.empty(len(ids), *shape)
    g = torch.Generator()
    for i, k in enumerate(ids.tolist()):
        g.manual_seed(derive_seed(seed, step, int(k)) % 2**63)
        ts[i] = torch.randint(num_steps, (1,), generator=g)
        noise[i] = torch.randn(shape, generator=g)
    return ts, noise


def ema_decay(rate: float, n: int, warmup: bool = True) -> float:
    """The EMA decay of update ``n`` (0 for the first): ``min(rate, (1 + n) / (10 + n))`` with the warm-up
    (diffusers' EMAModel, whose step count starts at 0), else ``rate`` (improved-diffusion's constant rate).

    Why the warm-up: at rate 0.9999 the initial weights keep a share 0.9999^N after N updates, 95% after 500,
    so a short run would export its untrained start; with the warm-up that share is 9! N! / (N + 9)!.
    """
    return min(rate, (1.0 + n) / (10.0 + n)) if warmup else rate


def sample_flips(seed: int, step: int, ids: torch.Tensor) -> torch.Tensor:
    """bool [B]: whether sample i is mirrored at this step, p = 0.5, drawn from (seed, step, ids[i], 1)."""
    g = torch.Generator()
    out = torch.empty(len(ids), dtype=torch.bool)
    for i, k in enumerate(ids.tolist()):
        g.manual_seed(derive_seed(seed, step, int(k), 1) % 2**63)
        out[i] = bool(torch.rand((), generator=g) < 0.5)
    return out


def training_view(batch: dict, crop: str, flip: bool, *, seed: int, step: int, epoch: int,
                  sizes: np.ndarray) -> torch.Tensor:
    """float [B, 3, S, S] in [-1, 1] the UNet trains on, from a train-split loader batch.

    crop "center": the loader's Resize(S) + CenterCrop(S) view (improved-diffusion's image_datasets.py: the
    shorter side resized to S, the centre cut), mirrored where ``sample_flips`` says when ``flip``.
    crop "random-resized": the loader's RandomResizedCrop(0.08-1) view, which the loader mirrors with p = 0.5
    (data/plan.py ``train_boxes``); without ``flip`` those mirrors are undone (the same draw, recomputed from the
    loader's seed, the epoch and the image size ``sizes[index]`` = (h, w)).
    """
    ids = batch["index"].cpu()
    if crop == "center":
        x = batch["diffaug"].float()
        mirror = sample_flips(seed, step, ids) if flip else None
    else:
        x = batch["clean"].float()
        mirror = None if flip else torch.tensor([train_boxes(seed, epoch, int(i), int(sizes[i][0]), int(sizes[i][1]))[1]
                                                 for i in ids.tolist()], dtype=torch.bool)
    if mirror is None or not bool(mirror.any()):
        return x
    return torch.where(mirror.to(x.device)[:, None, None, None], x.flip(-1), x)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, rate: float) -> None:
    """ema <- rate * ema + (1 - rate) * model, parameter by parameter."""
    e = list(ema.parameters())
    torch._foreach_lerp_(e, [p.detach() for p in model.parameters()], 1.0 - rate)


def diffusion_forward(net, x0: torch.Tensor, ids: torch.Tensor, seed: int, step: int, tables: LossTables,
                      amp_dtype: torch.dtype | None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Forward half of a training step: (per-example loss terms [B], t [B]) for clean images x0 [B, C, H, W]
    in [-1, 1] whose dataset indices are ``ids`` [B]; ``net`` is the UNet (or its DDP wrapper)."""
    schedule = tables.schedule
    t, noise = sample_t_noise(seed, step, ids.cpu(), tuple(x0.shape[1:]), schedule.num_steps)
    t, noise = t.to(x0.device), noise.to(x0.device)
    x_t = tables("sqrt_abar", t) * x0 + tables("sqrt_1m_abar", t) * noise
    with torch.autocast(x0.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        model_out = net(x_t, schedule.model_timesteps(t))
    return hybrid_loss(model_out.float(), x0, x_t, noise, t, tables), t


def optimizer_step(loss: torch.Tensor, model: torch.nn.Module, ema: torch.nn.Module, opt, scaler, grad_clip: float,
                   ema_rate: float, after_backward=None) -> torch.Tensor:
    """Backward half: backward (scaled), gradient clipping when ``grad_clip > 0`` (0: none, as improved-diffusion,
    which only logs the norm), the optimizer step, the EMA update at decay ``ema_rate``; the gradient norm.
    ``after_backward()`` runs between the backward and the update (a test hook)."""
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if after_backward is not None:
        after_backward()
    scaler.unscale_(opt)
    # max_norm=inf measures the norm and scales by min(1, inf / norm) = 1: the gradients are left as they are
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    scaler.step(opt)
    scaler.update()
    ema_update(ema, model, ema_rate)
    return grad_norm


class LossWindow:
    """Running means of the loss terms since the last record, and the loss by quarter of t (improved-diffusion's
    loss_q0..q3: q0 is t < T/4, the nearly clean end)."""

    def __init__(self, num_steps: int):
        self.num_steps = num_steps
        self.reset()

    def reset(self) -> None:
        self.n, self.sums = 0, {"loss": 0.0, "mse": 0.0, "vb": 0.0}
        self.q = [[0.0, 0] for _ in range(4)]

    def add(self, terms: dict[str, torch.Tensor], t: torch.Tensor) -> None:
        self.n += len(t)
        for k in self.sums:
            self.sums[k] += terms[k].detach().sum().item() if k in terms else 0.0
        quarter = (4 * t // self.num_steps).clamp(max=3)
        loss = terms["loss"].detach()
        for i in range(4):
            sel = quarter == i
            self.q[i][0] += loss[sel].sum().item()
            self.q[i][1] += int(sel.sum())

    def record(self) -> dict:
        """{"loss", "mse", "vb", "loss_q0".."loss_q3" (None for a quarter with no sample)}; then resets."""
        rec = {k: v / max(self.n, 1) for k, v in self.sums.items()}
        rec |= {f"loss_q{i}": (tot / cnt if cnt else None) for i, (tot, cnt) in enumerate(self.q)}
        self.reset()
        return rec


class ModelFn:
    """A bare UNet called like a Denoiser (integer t in, the schedule's timestep convention applied)."""

    def __init__(self, unet: UNet, schedule: Schedule):
        self.unet, self.schedule = unet, schedule

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.unet(x_t, self.schedule.model_timesteps(t))


# ---------------------------------------------------------------------------------------------------- outputs


def report_bad_images(indexes: dict, path: Path, shown: int = 10) -> str | None:
    """Write every bad file of ``indexes`` ({flag: DatasetIndex}) to ``path`` (one "file<TAB>reason" line each);
    the text to print: per index the count, then the first ``shown`` files and where the full list is. None
    when there are none."""
    bad = [(flag, idx, f, why) for flag, idx in indexes.items() for f, why in idx.bad]
    if not bad:
        return None
    atomic_write_bytes("".join(f"{f}\t{why}\n" for _, _, f, why in bad).encode(), path)
    lines = [f"warning: {flag} {idx.root}: {len(idx.bad)} bad file(s) left out ({len(idx.files)} images used)"
             for flag, idx in indexes.items() if idx.bad]
    lines += [f"  bad: {f}: {why}" for _, _, f, why in bad[:shown]]
    more = f"... and {len(bad) - shown} more; " if len(bad) > shown else ""
    return "\n".join([*lines, f"  {more}the full list: {path}"])


def export_checkpoint(state_dict: dict, config: UNetConfig, out: str | os.PathLike, meta: dict) -> Path:
    """Write ``out`` (.pt state_dict), its .safetensors twin and the JSON sidecar, each atomically.

    The sidecar is written last: a reader that finds it finds complete weights.
    """
    from safetensors.torch import save as st_save

    out = Path(out)
    sd = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state_dict.items()}
    atomic_save(sd, out)
    atomic_write_bytes(st_save(sd), out.with_suffix(".safetensors"))
    sched = config.schedule()
    side = {"format": SIDECAR_FORMAT, "unet_config": config.to_dict(),
            "schedule": {"name": sched.name, "num_steps": sched.num_steps, "rescale_timesteps": sched.rescale_timesteps},
            "image_size": config.image_size, **meta}
    atomic_write_bytes((json.dumps(side, indent=1, default=str) + "\n").encode(), sidecar_path(out))
    return out


def save_grid_png(model_fn, schedule: Schedule, images: torch.Tensor, path: Path, seed: int, title: str) -> Path:
    """PNG grid: clean, then pairs (x_t / sqrt(abar_t) "xt t", clipped one-step x0 "x0 t") at GRID_TS; one row
    per held-out image."""
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed)).to(images.device)
    cols, labels = [images], ["clean"]
    for t in GRID_TS:
        noisy, x0_hat = one_step(model_fn, schedule, images, t, noise)
        cols += [noisy, x0_hat]
        labels += [f"xt {t}", f"x0 {t}"]
    unit = [(c.float().clamp(-1, 1) + 1) / 2 for c in cols]
    return save_grid(unit, path, col_labels=labels, title=title)


