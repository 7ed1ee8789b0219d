"""The study's evaluation: both classifiers of a seed in one pass over each split, plain, DiffAug Ensemble
(each view made once) and DDA / DDA-SE (one adaptation); each (seed, split) result written as it completes."""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..constants import derive_seed
from ..data.scan import DatasetIndex
from ..diffusion.denoiser import Denoiser, load_denoiser
from ..hardware import fast_half_dtype, resolve_precision
from ..io import atomic_write_bytes
from ..ops.augment import augment
from ..train.setup import FAST_UNET
from .dda import adapt, self_ensemble
from .ensemble import val_batches
from .models import load_classifier
from .study_data import Split, split_index

if TYPE_CHECKING:  # annotations only: study.py imports this module
    from .study import StudySettings

__all__ = ["EvalParts", "evaluate_split", "evaluate_seed", "check_denoiser", "load_denoisers"]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _stream_seed(seed: int, split: str, stream: int) -> int:
    # crc32, not hash(): Python salts str hashes per process, and a resumed split must redraw the same noise
    return derive_seed(seed, zlib.crc32(split.encode()), stream) % (1 << 63)


def _channel(v: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(list(v), dtype=torch.float32, device=like.device).view(1, -1, 1, 1)


def _probs(model: nn.Module, x: torch.Tensor, amp: torch.dtype | None) -> torch.Tensor:
    with torch.no_grad(), torch.autocast(x.device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
        return model(x).float().softmax(dim=1)


@dataclass
class EvalParts:
    """What one seed's evaluation needs: the two classifiers (same classes and geometry), the denoisers."""

    models: dict[str, nn.Module]
    info: dict
    classes: list[str]
    de_denoiser: Denoiser | None
    dda_denoiser: Denoiser | None
    amp: torch.dtype | None
    device: torch.device


def evaluate_split(parts: EvalParts, index: DatasetIndex, split: Split, seed: int, s: StudySettings, *,
                   backend: str, workers: int) -> tuple[dict, dict[str, np.ndarray]]:
    """Both classifiers on one split, every method: (result dict, per-image arrays).

    result: {"correct": {training: {method: count}}, "top1": ... in %, "de_views": {training: {t: top-1 of
    the single view at t}}, "n", ...}; arrays: "label" int64 [N] and "pred_<training>_<method>" int64 [N]
    (argmax class, the classifier's index), in the order of ``index.files`` (saved beside the result as
    <split>.npz, with "files": the paths relative to the split's folder)."""
    info, dev = parts.info, parts.device
    crop = info["crop_size"]
    geometry = dict(crop_size=crop, resize_size=crop if split.native else info["resize_size"], mean=info["mean"],
                    std=info["std"], num_workers=workers)
    g_de = torch.Generator(device=dev).manual_seed(_stream_seed(seed, split.name, 0))
    g_dda = torch.Generator(device=dev).manual_seed(_stream_seed(seed, split.name, 1))
    want = set(s.methods)
    preds: dict[str, list[torch.Tensor]] = {f"pred_{tr}_{m}": [] for tr in parts.models for m in s.methods}
    labels, views = [], {tr: dict.fromkeys(s.de_timesteps, 0) for tr in parts.models}
    for x, y in val_batches(index, batch_size=s.eval_batch_size, backend=backend, device=dev, **geometry):
        y = y.to(dev)
        labels.append(y.cpu())
        probs = {tr: {"plain": _probs(m, x, parts.amp)} for tr, m in parts.models.items()}
        if "de" in want:  # each view made once, seen by both classifiers
            stacks = {tr: [] for tr in parts.models}
            for t in s.de_timesteps:
                view = x if t == 0 else augment(x, parts.de_denoiser, t=t, generator=g_de, mean=info["mean"],
                                                std=info["std"])
                for tr, m in parts.models.items():
                    p = probs[tr]["plain"] if t == 0 else _probs(m, view, parts.amp)
                    stacks[tr].append(p)
                    views[tr][t] += int((p.argmax(1) == y).sum())
            for tr in parts.models:
                probs[tr]["de"] = torch.stack(stacks[tr]).mean(0)
        if want & {"dda", "dda_se"}:  # one adaptation, both classifiers
            mean, std = _channel(info["mean"], x), _channel(info["std"], x)
            adapted = adapt(2 * (x.float() * std + mean) - 1, parts.dda_denoiser, s.dda, generator=g_dda)
            adapted = (((adapted + 1) / 2 - mean) / std).to(x.dtype)
            for tr, m in parts.models.items():
                probs[tr]["dda"] = _probs(m, adapted, parts.amp)
                probs[tr]["dda_se"] = self_ensemble(probs[tr]["plain"], probs[tr]["dda"])
        for tr in parts.models:
            for m in s.methods:
                preds[f"pred_{tr}_{m}"].append(probs[tr][m].argmax(1).cpu())
    arrays = {"label": torch.cat(labels).numpy().astype(np.int64)}
    arrays |= {k: torch.cat(v).numpy().astype(np.int64) for k, v in preds.items()}
    n = len(arrays["label"])
    if n != len(index.files):
        raise SystemExit(f"{split.folder}: {len(index.files)} images checked, {n} evaluated (files changed while "
                         "reading?)")
    correct = {tr: {m: int((arrays[f"pred_{tr}_{m}"] == arrays["label"]).sum()) for m in s.methods}
               for tr in parts.models}
    res = {"corruption": split.corruption, "severity": split.severity, "split": split.name,
           "folder": str(split.folder), "n": n, "bad_files": len(index.bad), "correct": correct,
           "top1": {tr: {m: 100.0 * c / n for m, c in by.items()} for tr, by in correct.items()},
           "geometry": {k: geometry[k] for k in ("crop_size", "resize_size")}}
    if "de" in want:
        res["de_views"] = {tr: {str(t): 100.0 * c / n for t, c in v.items()} for tr, v in views.items()}
    return res, arrays


def load_denoisers(s: StudySettings, unet: Path, device: torch.device) -> tuple[Denoiser | None, Denoiser | None]:
    def load(**kw) -> Denoiser:
        try:
            return load_denoiser(unet, s.unet_preset, device=device, **kw)
        except Exception as e:  # CheckpointError and friends: one line
            raise SystemExit(f"--unet {unet}: {str(e).splitlines()[0]}") from None

    # DE: the training's fast path (eps rows only); DDA: the full output (learned variance) and autograd
    half = resolve_precision(s.eval_precision, device) if s.eval_precision else None  # --eval-precision
    de = load(**FAST_UNET, dtype=half or torch.float32) if "de" in s.methods else None
    dda = load() if {"dda", "dda_se"} & set(s.methods) else None
    return de, dda


def check_denoiser(s: StudySettings, unet: Path, crop: int) -> None:
    """Before any classifier is trained: the checkpoint loads, the DE t values lie in its schedule, and the
    crop suits the UNet (and DDA's low-pass filter). The weights are read memory-mapped and released."""
    try:
        den = load_denoiser(unet, s.unet_preset)
    except Exception as e:  # CheckpointError and friends: one line
        raise SystemExit(f"--unet {unet}: {str(e).splitlines()[0]}") from None
    if max(s.de_timesteps) >= den.num_steps:
        raise SystemExit(f"--de-timesteps: t must be < {den.num_steps} (the denoiser's schedule)")
    down = den.total_downsampling
    if crop % down:
        raise SystemExit(f"--image-size {crop}: the UNet downsamples {down}x in total, so the crop must be a multiple "
                         f"of {down}")
    if {"dda", "dda_se"} & set(s.methods) and crop % s.dda.lowpass_factor:
        raise SystemExit(f"--image-size {crop}: DDA's low-pass factor {s.dda.lowpass_factor} must divide the crop "
                         "(or set --dda lowpass_factor=...)")


def evaluate_seed(s: StudySettings, seed: int, runs: dict[str, Path], splits: list[Split], denoisers,
                  ts, device: torch.device, indices: dict[str, DatasetIndex]) -> list[dict]:
    """Every split of one seed not yet done; results written as each completes. Returns all of the seed's.

    denoisers: a callable giving (DE denoiser, DDA denoiser), called only when there is work (loaded once);
    indices: split name -> its evaluated images, filled as splits are first read (shared by the seeds)."""
    ckpts = {tr: run / "last.pt" for tr, run in runs.items()}
    shas = {tr: _sha256(p) if p.is_file() else None for tr, p in ckpts.items()}
    folder = s.out / "results" / f"seed{seed}"
    done, todo = [], []
    for sp in splits:
        path = folder / f"{sp.name}.json"
        if path.is_file():
            r = json.loads(path.read_text())
            if r.get("classifiers") == shas and r.get("methods") == list(s.methods):
                done.append(r)
                continue
        todo.append(sp)
    if not todo:
        return done
    models, info, classes = {}, None, indices["clean"].classes
    for tr, p in ckpts.items():
        models[tr], cls, inf = load_classifier(p, device)
        if cls != classes or (info is not None and inf != info):
            raise SystemExit(f"{p}: other classes or geometry than {s.data / 'train'} and {ckpts['baseline']} "
                             "(the study pairs them)")
        info = inf
    amp = (resolve_precision(s.eval_precision, device) if s.eval_precision else
           fast_half_dtype(device) if ts.amp else None)
    parts = EvalParts(models, info, classes, *denoisers(), amp, device)
    bar = tqdm(total=len(splits), initial=len(done), desc=f"evaluating seed {seed}", unit="split",
               disable=not s.progress, dynamic_ncols=True)
    for sp in todo:
        if sp.name not in indices:
            indices[sp.name] = split_index(sp.folder, classes, s.max_images)
        index = indices[sp.name]
        t0 = time.perf_counter()
        res, arrays = evaluate_split(parts, index, sp, seed, s, backend=ts.loader, workers=ts.workers)
        secs = time.perf_counter() - t0
        files = [os.path.relpath(f, sp.folder) for f in index.files]
        res |= {"seed": seed, "classifiers": shas, "methods": list(s.methods), "seconds": secs,
                "images_per_s": res["n"] / secs, "device": str(device),
                "files_sha1": hashlib.sha1("\n".join(files).encode()).hexdigest()}
        buf = io.BytesIO()
        np.savez_compressed(buf, files=np.array(files, dtype=str), **arrays)
        atomic_write_bytes(buf.getvalue(), folder / f"{sp.name}.npz")  # first: the .json marks the pair complete
        atomic_write_bytes(json.dumps(res, indent=1).encode(), folder / f"{sp.name}.json")
        done.append(res)
        bar.set_postfix(split=sp.name, img_s=f"{res['images_per_s']:.1f}")
        bar.update(1)
    bar.close()
    return done


