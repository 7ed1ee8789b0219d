"""Loading OpenAI diffusion checkpoints into our UNet, safely and without doubling RAM.

A released checkpoint is an untrusted file: it is read with ``torch.load(weights_only=True)`` (or as
.safetensors), never unpickled freely. The model is built on the meta device and the checkpoint's
tensors are assigned into it, so a 2.2 GB float32 checkpoint read through ``mmap`` costs its page
cache, not twice its size in private memory.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import pickle
import warnings
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import torch

from ..runs import load_error_reason
from .schedule import Schedule
from .unet import PRESETS, UNet, UNetConfig

__all__ = ["CheckpointError", "infer_config", "read_state_dict", "read_sidecar", "sidecar_path", "check_state_dict",
           "check_finite_weights", "nearest_preset", "SIDECAR_FORMAT"]

StateDict = Mapping[str, torch.Tensor]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, is unsafe, or does not fit the requested architecture."""


# what a file handed over as a checkpoint may really be, by its first bytes (named in the refusal)
_MAGIC = {b"\xff\xd8\xff": "a JPEG image", b"\x89PNG": "a PNG image", b"GIF8": "a GIF image",
          b"{": "JSON text?", b"\x93NUMPY": "a NumPy .npy file"}


# ----------------------------------------------------------------------------------------------------
# reading


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state_dict from .pt/.pth (weights_only, mmap when possible) or .safetensors."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint is an empty file: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path} is not a readable .safetensors file: {e}") from None
    with path.open("rb") as f:
        head = f.read(8)
    zip_file, pickle_file = head[:4] == b"PK\x03\x04", head[:1] == b"\x80"  # torch.save's two formats
    if not (zip_file or pickle_file):
        kind = next((name for magic, name in _MAGIC.items() if head.startswith(magic)), None)
        raise CheckpointError(f"{path} is not a PyTorch checkpoint: neither a torch.save zip archive nor a pickle "
                              f"(it starts with bytes {head[:4].hex(' ')}{f': {kind}' if kind else ''})")
    try:  # mmap only for the zip format: legacy (pre-zip) files cannot be memory-mapped
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zip_file)
    except pickle.UnpicklingError as e:
        reason = load_error_reason(e)
        if "unsupported global" in reason.lower():
            # weights_only refuses any pickle that would import or call code: say so, never retry unsafely.
            raise CheckpointError(f"refusing to load {path}: it is not a plain tensor state_dict and loading it "
                                  f"would execute code from the file ({reason})") from None
        raise CheckpointError(f"cannot read checkpoint {path}: damaged or not a checkpoint ({reason})") from None
    except Exception as e:  # noqa: BLE001 - a truncated zip, random bytes (KeyError from the unpickler), ...
        raise CheckpointError(f"cannot read checkpoint {path}: truncated, damaged or not a checkpoint "
                              f"({load_error_reason(e)})") from None
    return _as_state_dict(obj, str(path))


def _as_state_dict(obj, where: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "ema"):  # wrapped training checkpoints
            inner = obj.get(key)
            if isinstance(inner, Mapping) and any(k.removeprefix("module.") == "out.2.weight" for k in inner):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{where} does not hold a state_dict (a mapping of names to tensors)")
    sd = {k.removeprefix("module."): v for k, v in obj.items()}
    if "input_blocks.0.0.weight" not in sd or "out.2.weight" not in sd:
        raise CheckpointError(
            f"{where} is not an ADM UNet state_dict (no 'input_blocks.0.0.weight' / 'out.2.weight'); "
            f"first keys: {list(sd)[:5]}"
        )
    return sd


# ----------------------------------------------------------------------------------------------------
# the sidecar our own trainer writes (diffaug_fast.train_denoiser): architecture and schedule, no guessing

SIDECAR_FORMAT = "diffaug-fast-denoiser/1"


def sidecar_path(checkpoint: str | os.PathLike) -> Path:
    """``model.json`` beside ``model.pt`` / ``model.safetensors``."""
    return Path(checkpoint).with_suffix(".json")


def read_sidecar(checkpoint: str | os.PathLike) -> tuple[UNetConfig, Schedule, dict] | None:
    """(UNetConfig, Schedule, the whole sidecar) from the JSON beside a checkpoint we trained, else None."""
    path = sidecar_path(checkpoint)
    if not path.is_file():
        return None
    try:
        side = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable denoiser sidecar ({e})") from None
    if not isinstance(side, dict) or side.get("format") != SIDECAR_FORMAT:
        return None  # some other JSON that happens to share the name
    try:
        raw = {k: tuple(v) if isinstance(v, list) else v for k, v in side["unet_config"].items()}
        s = side["schedule"]
        return UNetConfig(**raw), Schedule(s["name"], int(s["num_steps"]), bool(s["rescale_timesteps"])), side
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: damaged denoiser sidecar ({type(e).__name__}: {e})") from None


# ----------------------------------------------------------------------------------------------------
# architecture checks and inference


def _expected_shapes(config: UNetConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = UNet(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_state_dict(sd: StateDict, config: UNetConfig, name: str = "the requested architecture") -> None:
    """Raise CheckpointError naming missing / unexpected keys and wrong shapes, if any."""
    want = _expected_shapes(config)
    missing = [k for k in want if k not in sd]
    unexpected = [k for k in sd if k not in want]
    wrong = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {want[k]}" for k in want if k in sd
             and tuple(sd[k].shape) != want[k]]
    if not (missing or unexpected or wrong):
        return

    def show(items: list[str]) -> str:
        more = f" ... (+{len(items) - 8} more)" if len(items) > 8 else ""
        return "\n    " + "\n    ".join(items[:8]) + more

    parts = [f"checkpoint does not match {name}:"]
    if missing:
        parts.append(f"  {len(missing)} missing keys:{show(missing)}")
    if unexpected:
        parts.append(f"  {len(unexpected)} unexpected keys:{show(unexpected)}")
    if wrong:
        parts.append(f"  {len(wrong)} wrong shapes:{show(wrong)}")
    guess = _matching_preset(sd)
    parts.append(f"  (the checkpoint looks like preset {guess!r})" if guess else
                 "  (pass preset=None to infer the architecture from the checkpoint)")
    raise CheckpointError("\n".join(parts))


def _count_blocks(sd: StateDict, prefix: str) -> int:
    idx = {int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix)}
    return max(idx) + 1 if idx else 0


def _candidate_configs(sd: StateDict):
    """Every UNetConfig consistent with the key structure of ``sd`` (heads cannot be seen in shapes)."""
    mc = sd["time_embed.0.weight"].shape[1]
    in_ch = sd["input_blocks.0.0.weight"].shape[1]
    out_ch = sd["out.2.weight"].shape[0]
    n_out = _count_blocks(sd, "output_blocks.")
    conv_resample = any(".op.weight" in k for k in sd) or any(k.endswith(".conv.weight") for k in sd)
    resblock_updown = any(
        f"output_blocks.{i}.{j}.in_layers.0.weight" in sd and f"output_blocks.{i}.0.in_layers.0.weight" in sd
        for i in range(n_out) for j in (1, 2)
    )
    num_classes = sd["label_emb.weight"].shape[0] if "label_emb.weight" in sd else None
    scale_shift_key = "input_blocks.1.0.emb_layers.1.weight"
    for levels in range(1, 9):
        if n_out % levels:
            continue
        nrb = n_out // levels - 1
        if nrb < 1:
            continue
        mult, attn = [], set()
        try:
            for level in range(levels):
                first = 1 + level * (nrb + 1)
                mult.append(sd[f"input_blocks.{first}.0.out_layers.3.weight"].shape[0] / mc)
                if f"input_blocks.{first}.1.qkv.weight" in sd:
                    attn.add(2**level)
            scale_shift = sd[scale_shift_key].shape[0] == 2 * sd["input_blocks.1.0.out_layers.3.weight"].shape[0]
        except KeyError:
            continue
        mult = tuple(int(m) if float(m).is_integer() else m for m in mult)
        yield UNetConfig(
            model_channels=mc, num_res_blocks=nrb, channel_mult=mult, attention_ds=tuple(sorted(attn)),
            in_channels=in_ch, out_channels=out_ch, use_scale_shift_norm=scale_shift,
            resblock_updown=resblock_updown, conv_resample=conv_resample, num_classes=num_classes,
        )


_ARCH_FIELDS = ("model_channels", "num_res_blocks", "channel_mult", "attention_ds", "in_channels", "out_channels",
                "use_scale_shift_norm", "resblock_updown", "num_classes")


def _same_arch(a: UNetConfig, b: UNetConfig) -> bool:
    return all(getattr(a, f) == getattr(b, f) for f in _ARCH_FIELDS) and (
        a.resblock_updown or a.conv_resample == b.conv_resample
    )


def _matching_preset(sd: StateDict) -> str | None:
    try:
        for cand in _candidate_configs(sd):
            for name, preset in PRESETS.items():
                if _same_arch(cand, preset) and _expected_shapes(preset) == {k: tuple(v.shape) for k, v in sd.items()}:
                    return name
    except KeyError:
        return None
    return None


def infer_config(sd: StateDict) -> tuple[UNetConfig, str]:
    """The architecture of a state_dict, and its name: a preset's when one matches exactly.

    Head counts, attention order and the diffusion schedule are not visible in weights; when no preset
    matches, they follow the family's released defaults (guided-diffusion: 64 channels per head, linear
    1000 steps; improved-diffusion: 4 heads, cosine 4000 steps, rescaled t), with a warning.
    """
    name = _matching_preset(sd)
    if name is not None:
        return PRESETS[name], name
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    for cand in _candidate_configs(sd):
        if cand.resblock_updown:
            heads = dict(num_head_channels=64 if all(int(m * cand.model_channels) % 64 == 0 for m in cand.channel_mult)
                         else -1, num_heads=4)
            cfg = replace(cand, **heads, family="guided-diffusion")
        else:
            cfg = replace(cand, num_heads=4, noise_schedule="cosine", diffusion_steps=4000, rescale_timesteps=True,
                          family="improved-diffusion")
        try:
            if _expected_shapes(cfg) == shapes:
                warnings.warn(
                    f"checkpoint matches no preset; inferred a {cfg.family} UNet (model_channels={cfg.model_channels}, "
                    f"channel_mult={cfg.channel_mult}, num_res_blocks={cfg.num_res_blocks}). Head count and noise "
                    f"schedule are assumed ({cfg.num_head_channels=}, {cfg.num_heads=}, {cfg.noise_schedule} "
                    f"{cfg.diffusion_steps}): pass preset= or schedule= if they differ.",
                    stacklevel=3,
                )
                return cfg, "custom"
        except ValueError:
            continue
    near, diffs = nearest_preset(sd)
    shown = "; ".join(diffs[:4]) + (f"; ... (+{len(diffs) - 4} more)" if len(diffs) > 4 else "")
    raise CheckpointError(
        "could not infer an ADM UNet architecture from this state_dict "
        f"({len(sd)} tensors, {_count_blocks(sd, 'input_blocks.')} input blocks); the nearest preset is "
        f"{near!r}, which differs in {len(diffs)} key(s): {shown}. Pass preset= explicitly if the checkpoint "
        "is that model (then the full list is shown), or check that the file is complete"
    )


def nearest_preset(sd: StateDict) -> tuple[str, list[str]]:
    """The preset whose state_dict differs from ``sd`` in the fewest keys (missing, unexpected, or of
    another shape), and those differences, one line each."""
    best = None
    for name, config in PRESETS.items():
        want = _expected_shapes(config)
        diffs = [f"{k} missing" for k in want if k not in sd]
        diffs += [f"{k} unexpected" for k in sd if k not in want]
        diffs += [f"{k} has shape {tuple(sd[k].shape)}, preset {want[k]}" for k in want
                  if k in sd and tuple(sd[k].shape) != want[k]]
        if best is None or len(diffs) < len(best[1]):
            best = (name, diffs)
    return best


def _file_spans(path: str) -> list[tuple[int, int]]:
    """Address ranges where this process maps ``path`` (Linux /proc/self/maps; [] elsewhere)."""
    real, spans = os.path.realpath(path), []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].rstrip("\n") == real:
                    a, b = (int(x, 16) for x in parts[0].split("-"))
                    spans.append((a, b))
    except OSError:
        pass
    return spans


def _drop_pages(ptr: int, nbytes: int, spans: list[tuple[int, int]]) -> None:
    """Give back the resident pages wholly inside [ptr, ptr + nbytes) of a file mapping (MADV_DONTNEED:
    clean file pages are re-read from the file on the next access, contents unchanged)."""
    page = mmap.PAGESIZE
    start, end = -(-ptr // page) * page, (ptr + nbytes) // page * page
    if end > start and any(a <= start and end <= b for a, b in spans):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), 4)  # 4 = MADV_DONTNEED


_FINITE_CHUNK = 1 << 22  # elements checked at a time: 16 MB of float32 resident at most


def check_finite_weights(sd: StateDict, where: str = "checkpoint") -> None:
    """Raise CheckpointError naming the tensors holding NaN or inf: such weights give NaN everywhere.

    A memory-mapped checkpoint is read chunk by chunk and each chunk's pages are given back at once, so
    the check does not make loading hold the file in RAM (tests/test_checkpoint.py's peak-RSS bound).
    """
    spans = _file_spans(where) if os.path.isfile(where) else []
    bad = []
    for k, v in sd.items():
        if not v.is_floating_point():
            continue
        flat = v.reshape(-1) if v.is_contiguous() else v.flatten()
        n_bad = 0
        for i in range(0, flat.numel(), _FINITE_CHUNK):
            part = flat[i: i + _FINITE_CHUNK]
            n_bad += int(torch.isfinite(part).logical_not_().sum())
            if spans and part.device.type == "cpu":
                _drop_pages(part.data_ptr(), part.numel() * part.element_size(), spans)
        if n_bad:
            bad.append(f"{k} ({n_bad} of {v.numel()})")
    if bad:
        more = f" ... (+{len(bad) - 6} more)" if len(bad) > 6 else ""
        raise CheckpointError(f"{where} has non-finite weights (NaN or inf) in {len(bad)} tensor(s): "
                              f"{', '.join(bad[:6])}{more}; the file is damaged or training diverged")
