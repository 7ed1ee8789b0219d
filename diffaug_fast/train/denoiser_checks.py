"""What denoiser training checks before it does any work (diffaug_fast/train/denoiser.py calls these first): the
numbers on the command line, the UNet config (a preset and/or JSON fields; fields not given take the family's
defaults), the --out path (a .pt file, not a folder, ours to replace), its lock, and on --resume the training
settings the run was started with. Each refusal is one line that says what to do.
"""

from __future__ import annotations

import json
import os
from dataclasses import fields, replace
from pathlib import Path

import torch

from ..diffusion.checkpoint import SIDECAR_FORMAT, sidecar_path
from ..diffusion.unet import UNet, UNetConfig, get_preset
from ..runs import RunError, lock_file
from .core import read_log

__all__ = ["FAMILY_DEFAULTS", "ARCH_DEFAULTS", "CHANNEL_MULT", "CROPS", "HYPER_FLAGS", "check_numbers",
           "resolve_config", "check_out_path", "lock_out", "hyper_mismatch"]

# The family settings of unet.py's presets (_guided / _improved), which a --config without --preset starts from.
FAMILY_DEFAULTS: dict[str, dict] = {
    "guided-diffusion": dict(use_scale_shift_norm=True, resblock_updown=True, conv_resample=True,
                             noise_schedule="linear", diffusion_steps=1000, rescale_timesteps=False),
    "improved-diffusion": dict(use_scale_shift_norm=True, resblock_updown=False, conv_resample=True,
                               noise_schedule="cosine", diffusion_steps=4000, rescale_timesteps=True),
}
# OpenAI's script defaults (guided- and improved-diffusion script_util.py): 128 channels, 2 res blocks per
# level, 4 heads, attention at the 16 and 8 px resolutions, channel_mult by image size
ARCH_DEFAULTS = dict(model_channels=128, num_res_blocks=2, num_heads=4)
ATTENTION_RESOLUTIONS = (16, 8)
CHANNEL_MULT = {256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4), 32: (1, 2, 2, 2)}
CROPS = ("center", "random-resized")
# settings a resumed run must share with its checkpoint: the flag and the DenoiserSettings field
HYPER_FLAGS = {"lr": "--lr", "weight_decay": "--weight-decay", "ema_rate": "--ema-rate", "ema_warmup": "--ema-warmup",
               "grad_clip": "--grad-clip", "crop": "--crop", "flip": "--flip"}


def _fail(msg: str):
    raise SystemExit(msg)


def check_numbers(s) -> None:
    """Flags out of range, refused before anything is read or written."""
    checks = [(s.steps >= 1, "--steps must be >= 1"), (s.batch_size >= 1, "--batch-size must be >= 1"),
              (s.lr > 0, "--lr must be > 0"), (0.0 <= s.ema_rate < 1.0, "--ema-rate must lie in [0, 1)"),
              (s.weight_decay >= 0, "--weight-decay must be >= 0"),
              (s.grad_clip >= 0, "--grad-clip must be >= 0 (0 = no clipping)"),
              (s.held_out >= 1, "--held-out must be >= 1"), (s.workers >= 0, "--workers must be >= 0"),
              (s.crop in CROPS, f"--crop {s.crop!r}: choose one of {', '.join(CROPS)}"),
              (min(s.eval_every, s.log_every, s.save_every) >= 1, "--eval-every/--log-every/--save-every must be >= 1"),
              (not (s.resume and s.overwrite), "--resume and --overwrite contradict each other: choose one")]
    for ok, msg in checks:
        if not ok:
            _fail(msg)


# ---------------------------------------------------------------------------------------------------- the UNet


def _read_config_json(config: str) -> dict:
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
    return {k: tuple(v) if isinstance(v, list) else v for k, v in extra.items()}


def family_config(extra: dict, image_size: int) -> tuple[UNetConfig, list[str]]:
    """A UNetConfig from JSON fields alone: the family's settings (``family``, default guided-diffusion) and
    OpenAI's script defaults under the given fields; also the names of the defaulted fields."""
    family = extra.get("family", "guided-diffusion")
    if family not in FAMILY_DEFAULTS:
        _fail(f"--config: family {family!r}: choose one of {', '.join(FAMILY_DEFAULTS)}")
    mult = extra.get("channel_mult")
    levels = len(mult) if isinstance(mult, tuple) else len(CHANNEL_MULT.get(image_size, ()))
    attention = tuple(image_size // r for r in ATTENTION_RESOLUTIONS
                      if image_size % r == 0 and image_size // r in {2**i for i in range(max(levels, 1))})
    base = {**FAMILY_DEFAULTS[family], **ARCH_DEFAULTS, "attention_ds": tuple(sorted(attention)), "family": family}
    if image_size in CHANNEL_MULT:
        base["channel_mult"] = CHANNEL_MULT[image_size]
    if "num_head_channels" in extra:
        base.pop("num_heads")  # heads given by their width
    if "channel_mult" not in extra and "channel_mult" not in base:
        _fail(f"--config: give channel_mult (OpenAI's defaults exist for image sizes {sorted(CHANNEL_MULT)} only, "
              f"not {image_size})")
    cfg = UNetConfig(**{**base, **extra, "image_size": image_size})
    named = ("model_channels", "num_res_blocks", "channel_mult", "attention_ds") + (("num_heads",) if cfg.attention_ds
                                                                                   else ())
    return cfg, [f"{k}={base[k]!r}" for k in named if k in base and k not in extra]


def _check_fields(cfg: UNetConfig) -> None:
    """What the trainer can train: RGB in, eps (+ variance) out, no classes; positive sizes."""
    def whole(v, low: int) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= low

    mult, ds = cfg.channel_mult, cfg.attention_ds
    checks = [
        (whole(cfg.model_channels, 1), f"model_channels must be a positive integer, got {cfg.model_channels!r}"),
        (whole(cfg.num_res_blocks, 1), f"num_res_blocks must be a positive integer, got {cfg.num_res_blocks!r}"),
        (isinstance(mult, tuple) and len(mult) >= 1 and all(isinstance(m, (int, float)) and m > 0 for m in mult),
         f"channel_mult must be a non-empty list of positive numbers, got {mult!r}"),
        (isinstance(ds, tuple) and all(whole(d, 1) for d in ds), f"attention_ds must list positive integers, got {ds!r}"),
        (cfg.in_channels == 3, f"in_channels must be 3 (the trainer feeds RGB images), got {cfg.in_channels!r}"),
        (cfg.out_channels in (3, 6), "out_channels must be 3 (eps) or 6 (eps and learned variance), got "
         f"{cfg.out_channels!r}"),
        (cfg.num_classes is None, "num_classes: class-conditional training is not supported (no labels are fed)"),
        (isinstance(cfg.dropout, (int, float)) and 0 <= cfg.dropout < 1, f"dropout must lie in [0, 1), got {cfg.dropout!r}"),
        (whole(cfg.diffusion_steps, 2), f"diffusion_steps must be an integer >= 2, got {cfg.diffusion_steps!r}"),
        (whole(cfg.num_heads, 1) or cfg.num_head_channels != -1, f"num_heads must be >= 1, got {cfg.num_heads!r}"),
    ]
    for ok, msg in checks:
        if not ok:
            _fail(f"--config: {msg}")


def resolve_config(preset: str | None, config: str | None, image_size: int, say=print) -> UNetConfig:
    """The UNetConfig from a preset and/or JSON fields (without a preset, the fields not given take the family's
    defaults, named in one line); exits with one line on bad input."""
    if preset is None and config is None:
        _fail("give the architecture: --preset NAME or --config JSON (UNetConfig fields)")
    if image_size < 1:
        _fail(f"--image-size must be >= 1, got {image_size}")
    try:
        base = get_preset(preset) if preset else None
    except ValueError as e:
        _fail(f"--preset: {e}")
    extra = _read_config_json(config) if config else {}
    if base is not None:
        cfg = replace(base, **{**extra, "image_size": image_size})
    else:
        cfg, defaulted = family_config(extra, image_size)
        if defaulted:
            say(f"--config: fields not given take the {cfg.family} defaults: {', '.join(defaulted)}")
    _check_fields(cfg)
    try:
        cfg.schedule()
        with torch.device("meta"):
            UNet(cfg)
    except Exception as e:  # noqa: BLE001 - whatever the constructor rejects, as one line
        _fail(f"invalid UNet config: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}")
    if image_size < cfg.total_downsampling or image_size % cfg.total_downsampling:
        _fail(f"--image-size {image_size}: this UNet downsamples by {cfg.total_downsampling} "
              f"({len(cfg.channel_mult)} levels), so the size must be a multiple of {cfg.total_downsampling}")
    return cfg


# ---------------------------------------------------------------------------------------------------- --out


def _ours(out: Path, run_dir: Path) -> bool:
    """Whether the files at ``out`` were written by the run in ``run_dir``: its sidecar names that run folder,
    or (an export cut short before its sidecar) that run's log recorded this --out."""
    side = sidecar_path(out)
    if side.is_file():
        try:
            meta = json.loads(side.read_text())
        except (OSError, ValueError):
            return False
        return (isinstance(meta, dict) and meta.get("format") == SIDECAR_FORMAT
                and meta.get("run_dir") == str(run_dir.resolve()))
    logged = [r.get("out") for r in read_log(run_dir / "log.jsonl") if r.get("event") == "settings"]
    return bool(logged) and all(o is not None and Path(o).resolve() == out.resolve() for o in logged)


def check_out_path(out: str | None, run_dir: str | None, overwrite: bool) -> tuple[Path, Path]:
    """(--out, the run folder): a .pt path that is not a folder, in a folder that exists or can be made and is
    writable, holding nothing but this run's own outputs unless --overwrite. Writes nothing."""
    if not out:
        _fail("--out CKPT is required (where the trained weights go, e.g. den/model.pt)")
    out = Path(out)
    if out.suffix not in (".pt", ".pth"):
        _fail(f"--out {out}: name a .pt file (the .safetensors and .json are written beside it)")
    if out.is_dir():
        _fail(f"--out {out} is a folder: name a .pt file (e.g. {out / 'model.pt'})")
    run = Path(run_dir) if run_dir else out.with_suffix(".run")
    existing = next((p for p in (out.parent, *out.parent.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        _fail(f"--out {out}: {existing} is not a folder")
    try:  # os.access says yes to root on a read-only mount: try a real file
        probe = existing / f".{out.name}.{os.getpid()}.probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        _fail(f"--out {out}: cannot write in {existing} ({e.strerror}); choose a writable folder")
    there = [p for p in (out, out.with_suffix(".safetensors"), sidecar_path(out)) if p.exists()]
    if there and not overwrite and not _ours(out, run):
        _fail(f"--out {out}: {there[0]} exists and was not written by this run (run folder {run}); choose another "
              "--out, or pass --overwrite to replace it")
    return out, run


def lock_out(out: Path) -> int:
    """Create --out's folder and lock ``.<name>.lock`` beside --out for this process (freed when it exits, even
    by SIGKILL): two runs exporting to the same path are refused, not raced. Returns the descriptor."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return lock_file(out.parent / f".{out.name}.lock", f"--out {out}")
    except RunError as e:
        _fail(str(e).replace("another path", "another --out"))
    except OSError as e:
        _fail(f"--out {out}: cannot create or lock it ({e.strerror})")


def hyper_mismatch(saved: dict | None, now: dict, where: Path) -> str | None:
    """The refusal for a --resume whose training settings differ from the run's (None when they agree)."""
    if saved is None:
        return (f"--resume: {where} records no training settings (written by an older version): start afresh "
                "with --overwrite")
    diff = [k for k in now if saved.get(k) != now[k]]
    if not diff:
        return None

    def show(values: dict) -> str:
        return " ".join(f"{HYPER_FLAGS[k]} {values.get(k)}" if not isinstance(values.get(k), bool) else
                        f"{HYPER_FLAGS[k] if values.get(k) else '--no-' + HYPER_FLAGS[k][2:]}" for k in diff)

    return (f"--resume: the run in {where} was trained with {show(saved)} (this command: {show(now)}); repeat "
            "its values to continue it, or start a new run (--overwrite, or another --run-dir / --out)")
