"""Out-of-distribution detection with post-hoc scores, OpenOOD v1.5 conventions.

    fh = features_and_head(model)                         # diffaug_fast.models
    det = Detectors(fh.head).fit(id_features)             # ReAct's threshold from in-distribution features
    scores = det.scores(features)                         # {"msp": [B], "maxlogit": ..., "scale": ...}
    metrics(scores_id["msp"], scores_ood["msp"])          # {"auroc", "fpr95", "aupr_in", "aupr_out"}

Every score is "higher = more in-distribution". Detectors, on penultimate features f [B, D] and the
linear head W f + b:
- MSP (Hendrycks & Gimpel 2017): max softmax probability.
- MaxLogit (Hendrycks et al. 2022): max logit.
- Energy (Liu et al. 2020): logsumexp of the logits (temperature 1).
- ReAct (Sun et al. 2021): f clipped at c, c = the p-th percentile (default 90) of all in-distribution
  feature values, then the energy of the head's logits.
- ASH-S (Djurisic et al. 2023): per image keep the top (100 - p)% of f (default p = 90; k = D -
  round(D p / 100) values, as OpenOOD), zero the rest, scale the kept ones by exp(sum f / sum kept), energy.
- SCALE (Xu et al. 2024): the same ratio r = sum f / sum top-k (default p = 85) but f itself is scaled by
  exp(r), nothing pruned, energy.
With DiffAug Ensemble (several copies of each image, ``diffaug_fast.ensemble``): MSP is the max of the
ensemble-averaged softmax, i.e. the confidence of the DE prediction itself; the logit-space detectors
score the ensemble-averaged (activation-shaped) logits, because energy and max-logit read the logits'
magnitude, which averaging probabilities would discard.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from sklearn import metrics as skm
from torch import nn

from ..constants import IMAGENET_MEAN, IMAGENET_STD
from ..data import scan_dataset
from ..ops.augment import augment
from .ensemble import val_batches
from .models import features_and_head

__all__ = ["DETECTORS", "Detectors", "metrics", "react_clip", "ash_s", "scale_shape", "energy", "image_index",
           "collect_features"]

DETECTORS: tuple[str, ...] = ("msp", "maxlogit", "energy", "react", "ash", "scale")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm")


def metrics(scores_id: Sequence[float], scores_ood: Sequence[float]) -> dict[str, float]:
    """AUROC, FPR@95%TPR, AUPR-In and AUPR-Out as fractions in [0, 1], as OpenOOD v1.5's evaluator
    (``openood/evaluators/metrics.py: auc_and_fpr_recall``) computes them.

    Scores: higher = more in-distribution. OOD is the positive class for the ROC: fpr95 is the share of
    in-distribution images flagged OOD at the first threshold that catches >= 95% of OOD images. The
    AUPRs are trapezoid areas (sklearn ``auc``) under sklearn's PR curves: AUPR-In with ID positive
    scored by conf, AUPR-Out with OOD positive scored by -conf (OpenOOD issue #211: later OpenOOD code
    swaps the two names; these follow the names).
    """
    s_id = np.nan_to_num(np.asarray(scores_id, dtype=np.float64))
    s_ood = np.nan_to_num(np.asarray(scores_ood, dtype=np.float64))
    if s_id.size == 0 or s_ood.size == 0:
        raise ValueError(f"metrics need scores on both sides; got {s_id.size} ID and {s_ood.size} OOD")
    conf = np.concatenate([s_id, s_ood])
    is_ood = np.concatenate([np.zeros(s_id.size, dtype=int), np.ones(s_ood.size, dtype=int)])
    fpr, tpr, _ = skm.roc_curve(is_ood, -conf)
    p_in, r_in, _ = skm.precision_recall_curve(1 - is_ood, conf)
    p_out, r_out, _ = skm.precision_recall_curve(is_ood, -conf)
    return {"auroc": float(skm.auc(fpr, tpr)), "fpr95": float(fpr[np.argmax(tpr >= 0.95)]),
            "aupr_in": float(skm.auc(r_in, p_in)), "aupr_out": float(skm.auc(r_out, p_out))}


# ---------------------------------------------------------------------------------------------------
# activation shaping, on penultimate features [B, D] (float32)


def energy(logits: torch.Tensor) -> torch.Tensor:
    """Negative free energy logsumexp(logits) [B] (temperature 1)."""
    return torch.logsumexp(logits.float(), dim=1)


def react_clip(feat: torch.Tensor, threshold: float) -> torch.Tensor:
    """ReAct: min(f, threshold) elementwise."""
    return feat.clamp(max=threshold)


def _top_k(feat: torch.Tensor, percentile: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of the k largest entries per row, k = D - round(D * percentile / 100) (OpenOOD)."""
    d = feat.shape[1]
    k = d - int(np.round(d * percentile / 100.0))
    if k < 1:
        raise ValueError(f"percentile {percentile} keeps no feature of {d}")
    return feat.topk(k, dim=1)


def ash_s(feat: torch.Tensor, percentile: float = 90) -> torch.Tensor:
    """ASH-S: keep the top-k values of each row, zero the rest, multiply by exp(sum(f) / sum(kept))."""
    v, i = _top_k(feat, percentile)
    s1 = feat.sum(1, keepdim=True)
    out = torch.zeros_like(feat).scatter_(1, i, v)
    return out * torch.exp(s1 / v.sum(1, keepdim=True))


def scale_shape(feat: torch.Tensor, percentile: float = 85) -> torch.Tensor:
    """SCALE: f * exp(sum(f) / sum(top-k of f)) per row; nothing is pruned."""
    v, _ = _top_k(feat, percentile)
    return feat * torch.exp(feat.sum(1, keepdim=True) / v.sum(1, keepdim=True))


class Detectors:
    """The six post-hoc scores over one linear head (see the module docstring for the definitions)."""

    def __init__(self, head: nn.Linear, *, react_percentile: float = 90, ash_percentile: float = 90,
                 scale_percentile: float = 85, react_threshold: float | None = None):
        self.head = head
        self.react_percentile = react_percentile
        self.ash_percentile = ash_percentile
        self.scale_percentile = scale_percentile
        self.react_threshold = react_threshold

    def fit(self, id_features: torch.Tensor | np.ndarray) -> Detectors:
        """ReAct's clip value: the react_percentile-th percentile of all in-distribution feature values."""
        f = np.asarray(id_features.cpu() if isinstance(id_features, torch.Tensor) else id_features, dtype=np.float64)
        self.react_threshold = float(np.percentile(f.ravel(), self.react_percentile))
        return self

    @torch.no_grad()
    def logits(self, feat: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"plain", "react", "ash", "scale"}: float32 logits [B, K] of the head on (shaped) features [B, D]."""
        if self.react_threshold is None:
            raise ValueError("ReAct needs a threshold: call fit(in-distribution features) first")
        w, b = self.head.weight.float(), None if self.head.bias is None else self.head.bias.float()
        feat = feat.float()

        def lin(f):
            return nn.functional.linear(f, w, b)

        return {"plain": lin(feat), "react": lin(react_clip(feat, self.react_threshold)),
                "ash": lin(ash_s(feat, self.ash_percentile)), "scale": lin(scale_shape(feat, self.scale_percentile))}

    @torch.no_grad()
    def scores(self, feats: torch.Tensor) -> dict[str, torch.Tensor]:
        """Scores [B] per detector from features [B, D], or [S, B, D] for S ensemble copies of each image."""
        if feats.dim() == 2:
            feats = feats.unsqueeze(0)
        per_copy = [self.logits(f) for f in feats]
        mean = {k: torch.stack([c[k] for c in per_copy]).mean(0) for k in per_copy[0]}
        probs = torch.stack([c["plain"].softmax(1) for c in per_copy]).mean(0)
        return {"msp": probs.amax(1), "maxlogit": mean["plain"].amax(1), "energy": energy(mean["plain"]),
                "react": energy(mean["react"]), "ash": energy(mean["ash"]), "scale": energy(mean["scale"])}


# ---------------------------------------------------------------------------------------------------
# OOD folders and feature extraction


def image_index(root: str | os.PathLike, **scan_kw):
    """A ``DatasetIndex`` of every image under ``root`` (flat, class sub-folders, or deeper), all label 0.

    OOD sets carry no labels the classifier knows, so the folder structure only locates the files.
    SystemExit with one line when ``root`` is missing or holds no readable image.
    """
    root = Path(root)
    if not root.is_dir():
        raise SystemExit(f"{root}: no such directory")
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*")
                   if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and not p.name.startswith("."))
    if not files:
        raise SystemExit(f"{root}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)} files, flat or in "
                         "sub-folders)")
    with tempfile.TemporaryDirectory() as tmp:
        listing = Path(tmp) / "files.txt"
        listing.write_text("".join(f"{f} 0\n" for f in files))
        try:
            return scan_dataset(root, file_list=listing, cache=False, progress=False, **scan_kw)
        except ValueError as e:
            raise SystemExit(f"{root}: no readable images ({str(e).splitlines()[0]})") from None


@torch.no_grad()
def collect_features(features, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *, denoiser=None,
                     timesteps: Sequence[int] = (0,), mean=None, std=None, seed: int = 0,
                     autocast_dtype: torch.dtype | None = None, progress: str | None = None):
    """Penultimate features float32 [S, N, D] (one row per timestep in ``timesteps``; t = 0 is the
    unmodified image) and the labels [N] over ``batches`` of normalized images.

    features: ``FeatureHead.features``. With a denoiser each t > 0 copy is a DiffAug view with fresh noise.
    """
    from tqdm import tqdm

    out, labels, g = [], [], None
    for x, y in tqdm(batches, desc=progress, disable=progress is None, leave=False):
        if g is None:
            g = torch.Generator(device=x.device).manual_seed(seed)
        copies = []
        for t in timesteps:
            view = x if t == 0 else augment(x, denoiser, t=int(t), generator=g, mean=mean, std=std)
            with torch.autocast(x.device.type, dtype=autocast_dtype or torch.bfloat16,
                                enabled=autocast_dtype is not None):
                copies.append(features(view).float().cpu())
        out.append(torch.stack(copies))
        labels.append(torch.as_tensor(y).cpu())
    if not out:
        raise ValueError("no images to score")
    return torch.cat(out, 1), torch.cat(labels)


@torch.no_grad()
def score_batches(fh, detectors: Detectors, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *, denoiser=None,
                  timesteps: Sequence[int] = (0,), mean=None, std=None, seed: int = 0,
                  autocast_dtype: torch.dtype | None = None, progress: str | None = None) -> dict[str, np.ndarray]:
    """Scores of every detector over ``batches``, computed batch by batch (no feature store).

    Returns {"msp": [N], ...} from the unmodified images and, when ``timesteps`` has t > 0 (DiffAug
    Ensemble, needs ``denoiser``), also {"msp_de": [N], ...} from all copies (t = 0 included if listed).
    """
    timesteps = list(timesteps)
    ts = timesteps if timesteps[0] == 0 else [0, *timesteps]
    use_de = any(t != 0 for t in timesteps)
    if use_de and denoiser is None:
        raise ValueError("DiffAug Ensemble scores need a denoiser")
    sel = [i for i, t in enumerate(ts) if t in timesteps]
    out: dict[str, list] = {}
    for x, y in batches if progress is None else _bar(batches, progress):
        feats, _ = collect_features(fh.features, [(x, y)], denoiser=denoiser, timesteps=ts, mean=mean, std=std,
                                    seed=seed, autocast_dtype=autocast_dtype)
        seed += 1  # fresh noise for the next batch
        parts = dict(detectors.scores(feats[0]))
        if use_de:
            parts |= {f"{k}_de": v for k, v in detectors.scores(feats[sel]).items()}
        for k, v in parts.items():
            out.setdefault(k, []).append(v.numpy())
    if not out:
        raise ValueError("no images to score")
    return {k: np.concatenate(v) for k, v in out.items()}


def _bar(it, desc):
    from tqdm import tqdm

    return tqdm(it, desc=desc, leave=False)


def demo_auroc_line(model: nn.Module, data_root: str | os.PathLike, *, crop_size: int, resize_size: int,
                    mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                    detector: str = "msp", device: torch.device | str = "cpu", batch_size: int = 32,
                    backend: str = "auto", num_workers: int = 0) -> str:
    """One line for the demo: AUROC of ``detector`` with <data_root>/val as in-distribution and the
    never-trained shapes in <data_root>/ood as OOD (plain classifier, no DiffAug; a few seconds)."""
    root = Path(data_root)
    fh = features_and_head(model)
    geometry = dict(crop_size=crop_size, resize_size=resize_size, mean=tuple(mean), std=tuple(std))
    kw = dict(batch_size=batch_size, backend=backend, device=torch.device(device), num_workers=num_workers, **geometry)
    id_index = scan_dataset(root / "val", progress=False)
    feats, _ = collect_features(fh.features, val_batches(id_index, **kw))
    det = Detectors(fh.head).fit(feats[0])
    s_id = det.scores(feats[0])[detector].numpy()
    s_ood = score_batches(fh, det, val_batches(image_index(root / "ood"), **kw))[detector]
    m = metrics(s_id, s_ood)
    return (f"OOD detection ({detector.upper()}, {root / 'val'} in-distribution vs {root / 'ood'}): AUROC "
            f"{100 * m['auroc']:.1f}%, FPR@95 {100 * m['fpr95']:.1f}% ({len(s_id)} ID / {len(s_ood)} OOD images)")
