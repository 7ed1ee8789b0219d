"""Evaluation with DiffAug Ensemble (DE): average the classifier's softmax over DiffAug'd copies.

For S = {0, 50, ..., 450} (t = 0 is the unmodified image) each copy gets fresh noise; the prediction is
the argmax of the mean probability. For datasets that cover a subset of the training classes
(ImageNet-R, ImageNet-A: 200 classes) the logits are sliced to those classes before the softmax.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

from ..constants import IMAGENET_MEAN, IMAGENET_STD
from ..data import build_loader, scan_dataset
from ..diffusion.denoiser import Denoiser
from ..ops.augment import augment

__all__ = ["DE_TIMESTEPS", "IMAGENET_MEAN", "IMAGENET_STD", "ensemble_probs", "evaluate", "subset_indices",
           "evaluate_folder", "evaluate_corruptions", "val_batches", "CORRUPTIONS", "ALEXNET_ERR",
           "summarize_corruptions", "eval_resize", "eval_geometry", "protocol_text"]

DE_TIMESTEPS: tuple[int, ...] = tuple(range(0, 500, 50))


def eval_resize(crop_size: int, crop_ratio: float) -> int:
    """Resize size R of the evaluation transform Resize(R) + CenterCrop(crop_size) at ``crop_ratio`` in (0, 1]:
    floor(crop / ratio) as DeiT's ``int(input_size / eval_crop_ratio)`` and timm's ``floor(img_size /
    crop_pct)`` (224 / 0.875 = 256, DiffAug's and torchvision's; 224 / 1.0 = 224, DeiT-III's); the 1e-6 keeps
    a ratio given as a quotient (48 / 55) from landing one pixel short."""
    if not 0 < crop_ratio <= 1:
        raise ValueError(f"crop ratio must lie in (0, 1], got {crop_ratio}")
    return int(crop_size / crop_ratio + 1e-6)


def eval_geometry(crop_size: int, crop_ratio: float, interpolation: str = "bilinear") -> dict:
    """{"crop_size", "resize_size", "interpolation"} of the evaluation view (``val_batches`` / ``build_loader``)."""
    return {"crop_size": int(crop_size), "resize_size": eval_resize(crop_size, crop_ratio),
            "interpolation": interpolation}


def protocol_text(geometry: dict) -> str:
    """The evaluation view in words, for table headers: e.g. "Resize 256 bilinear + CenterCrop 224 (crop ratio
    0.875)"."""
    c, r = geometry["crop_size"], geometry["resize_size"]
    return (f"Resize {r} {geometry.get('interpolation', 'bilinear')} + CenterCrop {c} "
            f"(crop ratio {c / r:.3g})")


def subset_indices(eval_classes: Sequence[str], train_classes: Sequence[str]) -> list[int] | None:
    """Indices of ``eval_classes`` in the classifier's output order, or None when they are the same set.

    ImageNet-R / ImageNet-A folders are named by WordNet id like the ImageNet train folders, so the
    200-class slice is found by name; a class the classifier never saw is an error, not a silent guess.
    """
    if list(eval_classes) == list(train_classes):
        return None
    pos = {c: i for i, c in enumerate(train_classes)}
    unknown = [c for c in eval_classes if c not in pos]
    if unknown:
        raise ValueError(f"{len(unknown)} evaluation classes are not among the classifier's "
                         f"{len(train_classes)} training classes, e.g. {unknown[:3]}")
    return [pos[c] for c in eval_classes]


@torch.no_grad()
def ensemble_probs(
    model: nn.Module,
    x: torch.Tensor,
    denoiser: Denoiser | None,
    *,
    timesteps: Iterable[int] = DE_TIMESTEPS,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    class_idx: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Softmax probabilities [len(timesteps), B, K] for each DiffAug'd copy of x (normalized input).

    The mean over dim 0 is the DE prediction; entry 0 with timesteps[0] == 0 is the plain prediction.
    """
    timesteps = list(timesteps)
    if any(t != 0 for t in timesteps) and denoiser is None:
        raise ValueError("DiffAug Ensemble with t > 0 needs a denoiser")
    idx = None if class_idx is None else torch.as_tensor(list(class_idx), device=x.device)
    out = []
    for t in timesteps:
        # the fused op reads and writes the classifier's normalization and keeps x's layout
        view = x if t == 0 else augment(x, denoiser, t=t, generator=generator, mean=mean, std=std)
        with torch.autocast(x.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            logits = model(view).float()
        if idx is not None:
            logits = logits.index_select(1, idx)
        out.append(logits.softmax(dim=1))
    return torch.stack(out)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    denoiser: Denoiser | None = None,
    *,
    timesteps: Sequence[int] = DE_TIMESTEPS,
    class_idx: Sequence[int] | None = None,
    seed: int = 0,
    **kw,
) -> dict[str, float]:
    """Top-1 (%) plain and with DE over (images, labels) batches; labels index the evaluated classes.

    With DE also ``top1_by_t``: {t: top-1 of the single view at t} for each of the ensemble's members (where
    the ensemble gains or loses accuracy)."""
    model.eval()
    g = None
    correct_plain = correct_de = n = 0
    correct_t = dict.fromkeys(timesteps, 0)
    use_de = denoiser is not None and len(timesteps) > 1
    for x, y in batches:
        if g is None:
            g = torch.Generator(device=x.device).manual_seed(seed)
        ts = list(timesteps) if use_de else [0]
        if ts[0] != 0:
            ts = [0, *ts]  # the plain prediction is always reported
        probs = ensemble_probs(model, x, denoiser if use_de else None, timesteps=ts, class_idx=class_idx,
                               generator=g, **kw)
        y = y.to(probs.device)
        correct_plain += (probs[0].argmax(1) == y).sum().item()
        members = [i for i, t in enumerate(ts) if t in timesteps]
        correct_de += (probs[members].mean(0).argmax(1) == y).sum().item()
        if use_de:  # each member view alone: one count per t, one transfer per batch
            for i, c in zip(members, (probs[members].argmax(2) == y).sum(1).tolist(), strict=True):
                correct_t[ts[i]] += c
        n += y.numel()
    if n == 0:
        raise ValueError("evaluation saw no images")
    res = {"n": n, "top1": 100.0 * correct_plain / n}
    if use_de:
        res["top1_de"] = 100.0 * correct_de / n
        res["top1_by_t"] = {int(t): 100.0 * c / n for t, c in correct_t.items()}
    return res


def val_batches(index, *, batch_size, backend, device, **geometry):
    """(images, labels) batches of ``index``: Resize + CenterCrop views, float NCHW on ``device``, normalized
    with ``geometry``'s mean/std (ImageNet's by default; mean=(0,)*3, std=(1,)*3 gives [0, 1] images);
    ``geometry`` also takes crop_size, resize_size and interpolation ("bilinear" | "bicubic", ``eval_geometry``)."""
    loader = build_loader(index, "val", batch_size=batch_size, backend=backend, output="float", channels_last=True,
                          device=device if device is not None and torch.device(device).type == "cuda" else None,
                          **geometry)
    for batch in loader:
        yield batch["image"].to(device), batch["label"]


def evaluate_folder(
    model: nn.Module,
    index_or_root,
    train_classes: Sequence[str],
    *,
    batch_size: int = 64,
    backend: str = "auto",
    device: torch.device | str = "cpu",
    denoiser: Denoiser | None = None,
    timesteps: Sequence[int] = DE_TIMESTEPS,
    autocast_dtype: torch.dtype | None = None,
    seed: int = 0,
    **geometry,
) -> dict[str, float]:
    """Top-1 on a class-folder dataset (path or scanned index), plain and (with a denoiser) DE.

    Folders that name a subset of the training classes (ImageNet-R/A) are scored on that subset.
    """
    index = scan_dataset(index_or_root, progress=False) if isinstance(index_or_root, (str, Path)) else index_or_root
    class_idx = subset_indices(index.classes, train_classes)
    batches = val_batches(index, batch_size=batch_size, backend=backend, device=torch.device(device), **geometry)
    norm = {k: geometry[k] for k in ("mean", "std") if k in geometry}  # the same normalization for DiffAug's views
    res = evaluate(model, batches, denoiser, timesteps=timesteps, class_idx=class_idx, seed=seed,
                   autocast_dtype=autocast_dtype, **norm)
    res["classes"] = len(index.classes)
    return res


def evaluate_corruptions(model: nn.Module, root, train_classes: Sequence[str], on_row=None, **kw) -> list[dict]:
    """ImageNet-C layout ``root/<corruption>/<severity>/<class>/*``: one row per corruption and severity.

    on_row(row) is called as each (corruption, severity) finishes, so a caller can write it at once.
    """
    root = Path(root)
    rows = []
    corruptions = sorted(p for p in root.iterdir() if p.is_dir())
    if not corruptions:
        raise ValueError(f"{root}: expected <corruption>/<severity>/<class>/ folders (the ImageNet-C layout)")
    for cdir in corruptions:
        sev_dirs = sorted((p for p in cdir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
        if not sev_dirs:
            raise ValueError(f"{cdir}: expected numbered severity folders (1..5)")
        for sdir in sev_dirs:
            res = evaluate_folder(model, sdir, train_classes, **kw)
            rows.append({"corruption": cdir.name, "severity": int(sdir.name), **res})
            if on_row is not None:
                on_row(rows[-1])
    return rows


# The 15 corruptions of Hendrycks & Dietterich (ICLR 2019) that ImageNet-C results average over; the four
# "extra" ones (speckle_noise, gaussian_blur, spatter, saturate) and any other folder are reported apart.
CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression")
# AlexNet's top-1 error on each, averaged over severities 1-5: the published normalizers of the mean
# Corruption Error (Hendrycks & Dietterich 2019, Table/appendix; hendrycks/robustness, ImageNet-C/test.py).
ALEXNET_ERR: dict[str, float] = dict(zip(CORRUPTIONS, (
    0.886428, 0.894468, 0.922640, 0.819880, 0.826268, 0.785948, 0.798360,
    0.866816, 0.826572, 0.819324, 0.564592, 0.853204, 0.646056, 0.717840, 0.606500), strict=True))


def summarize_corruptions(rows: Sequence[dict]) -> dict:
    """The paper's ImageNet-C figures from ``evaluate_corruptions`` rows (top-1 in %).

    Returns {"sev5", "all", "mce"} (and "sev5_de", "all_de", "mce_de" when the rows have DE), each over
    the 15 standard corruptions only: severity-5 top-1 averaged over corruptions (the paper's headline),
    the mean over all 15 x 5 cells, and mCE = mean over corruptions of sum_s err(c, s) / sum_s
    err_AlexNet(c, s), in %. A figure whose cells are not all present is None and "missing" names what
    is absent; "extra" lists the other corruption folders, which are never averaged in.
    """
    by = {(r["corruption"], int(r["severity"])): r for r in rows}
    names = sorted({r["corruption"] for r in rows})
    out = {"extra": [c for c in names if c not in CORRUPTIONS],
           "missing": [f"{c}/{s}" for c in CORRUPTIONS for s in range(1, 6) if (c, s) not in by]}
    has_de = any("top1_de" in r for r in rows)
    for key, suffix in [("top1", "")] + ([("top1_de", "_de")] if has_de else []):
        sev5 = [by[(c, 5)][key] for c in CORRUPTIONS if (c, 5) in by]
        out["sev5" + suffix] = sum(sev5) / len(sev5) if len(sev5) == len(CORRUPTIONS) else None
        full = [c for c in CORRUPTIONS if all((c, s) in by for s in range(1, 6))]
        cells = [by[(c, s)][key] for c in full for s in range(1, 6)]
        complete = len(full) == len(CORRUPTIONS)
        out["all" + suffix] = sum(cells) / len(cells) if complete else None
        ce = [sum(1 - by[(c, s)][key] / 100 for s in range(1, 6)) / (5 * ALEXNET_ERR[c]) for c in full]
        out["mce" + suffix] = 100 * sum(ce) / len(ce) if complete else None
    return out
