"""The parts of denoiser training (diffaug_fast/train/denoiser.py runs them): the UNet config from flags, the
per-sample t and noise, the forward half (improved-diffusion's hybrid loss) and the backward half (clipping,
AdamW, EMA) of a step, the loss by quarter of t, and the outputs (the OpenAI-format checkpoint with its JSON
sidecar, the PNG grid of one-step denoising).
"""

from __future__ import annotations

import json
import os
from dataclasses import fields, replace
from pathlib import Path

import torch

from ..constants import derive_seed
from ..diffusion.denoiser import SIDECAR_FORMAT, read_sidecar, sidecar_path
from ..diffusion.loss import PSNR_TS, LossTables, format_psnr_table, hybrid_loss, one_step, psnr_table
from ..diffusion.schedule import Schedule
from ..diffusion.unet import UNet, UNetConfig, get_preset
from ..io import atomic_save, atomic_write_bytes
from ..viz import save_grid

__all__ = ["resolve_config", "export_checkpoint", "read_sidecar", "sidecar_path", "sample_t_noise", "ema_update",
           "diffusion_forward", "optimizer_step", "LossWindow", "ModelFn", "check_out_path", "save_grid_png",
           "psnr_table", "format_psnr_table", "PSNR_TS", "hybrid_loss", "LossTables"]

GRID_TS = (50, 100, 250, 500, 750, 999)




def _fail(msg: str):
    raise SystemExit(msg)


def resolve_config(preset: str | None, config: str | None, image_size: int) -> UNetConfig:
    """The UNetConfig from a preset and/or JSON fields; exits with one line on bad input."""
    if preset is None and config is None:
        _fail("give the architecture: --preset NAME or --config JSON (UNetConfig fields)")
    try:
        base = get_preset(preset) if preset else None
    except ValueError as e:
        _fail(f"--preset: {e}")
    extra: dict = {}
    if config:
        text = Path(config).read_text() if Path(config).is_file() else config
        try:
            extra = json.loads(text)
        except json.JSONDecodeError as e:
            _fail(f"--config {config!r}: neither a JSON file nor valid JSON ({e.msg} at char {e.pos})")
        if not isinstance(extra, dict):
            _fail(f"--config: expected a JSON object of UNetConfig fields, got {type(extra).__name__}")
        known = {f.name for f in fields(UNetConfig)}
        if unknown := sorted(set(extra) - known):
            _fail(f"--config: unknown UNetConfig fields {unknown}; known: {sorted(known)}")
        extra = {k: tuple(v) if isinstance(v, list) else v for k, v in extra.items()}
    try:
        cfg = replace(base, **extra) if base else UNetConfig(**extra)
        cfg = replace(cfg, image_size=image_size)
        cfg.schedule()
        with torch.device("meta"):
            UNet(cfg)
    except (TypeError, ValueError) as e:
        _fail(f"invalid UNet config: {e}")
    if image_size < cfg.total_downsampling or image_size % cfg.total_downsampling:
        _fail(f"--image-size {image_size}: this UNet downsamples by {cfg.total_downsampling} "
              f"({len(cfg.channel_mult)} levels), so the size must be a multiple of {cfg.total_downsampling}")
    return cfg


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
    """Backward half: backward (scaled), gradient clipping, the optimizer step, the EMA update; the grad norm.
    ``after_backward()`` runs between the backward and the update (a test hook)."""
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if after_backward is not None:
        after_backward()
    scaler.unscale_(opt)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
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


def check_out_path(out: str | None) -> Path:
    if not out:
        _fail("--out CKPT is required (where the trained weights go, e.g. den/model.pt)")
    out = Path(out)
    if out.suffix not in (".pt", ".pth"):
        _fail(f"--out {out}: name a .pt file (the .safetensors and .json are written beside it)")
    parent = out.parent
    if not parent.exists():
        _fail(f"--out {out}: the folder {parent} does not exist; create it first")
    if not parent.is_dir():
        _fail(f"--out {out}: {parent} is not a folder")
    try:  # os.access says yes to root on a read-only mount: try a real file
        probe = parent / f".{out.name}.{os.getpid()}.probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        _fail(f"--out {out}: cannot write in {parent} ({e.strerror}); choose a writable folder")
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


