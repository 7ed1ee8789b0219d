"""Out-of-distribution detection with post-hoc scores, as OpenOOD v1.5 computes and reports them.

    fh = features_and_head(model)                              # diffaug_fast.eval.models
    det = Detectors(fh.head).fit(id_val_features)              # ReAct's clip from HELD-OUT in-distribution data
    scores = det.scores(features)                              # {"msp": [B], "maxlogit": ..., "scale": ...}
    metrics(scores_id["msp"], scores_ood["msp"])               # {"auroc", "fpr95", "aupr_in", "aupr_out"}
    best = aps_search(fh.head, "ash", id_val_feats, ood_val_feats)   # OpenOOD's APS: percentile by val AUROC

Every score is "higher = more in-distribution". Detectors, on penultimate features f [B, D] (after the global
pool) and the linear head W f + b (OpenOOD's ``forward_threshold`` shapes the same tensor):
- MSP (Hendrycks & Gimpel 2017): max softmax probability.
- MaxLogit (Hendrycks et al. 2022): max logit.
- Energy (Liu et al. 2020): logsumexp of the logits (temperature 1).
- ReAct (Sun et al. 2021): f clipped at c, c = the p-th percentile of all feature values of an in-distribution
  set that is NOT scored (OpenOOD: its ID "val" split), then energy.
- ASH (Djurisic et al. 2023), the ``"ash"`` detector = ASH-B, what OpenOOD v1.5's ASH postprocessor runs
  (``openood/networks/ash_net.py: ash_b``): per image keep the positions of the k = D - round(D p / 100)
  largest values, set each of them to sum(f) / k, zero the rest, energy.
- ASH-S, the ``"ash_s"`` detector (the ASH paper's other variant): keep the top-k values themselves, zero the
  rest, scale the kept ones by exp(sum f / sum kept), energy.
- SCALE (Xu et al. 2024): f * exp(sum f / sum top-k), nothing pruned, energy.
Percentiles: OpenOOD's ``configs/postprocessors/{react,ash,scale}.yml`` defaults (90, 90, 85) and APS sweeps
(``PERCENTILE_GRIDS``), chosen by AUROC on ID-val vs OOD-val before any test set is scored.
With DiffAug Ensemble (several copies of each image, ``diffaug_fast.eval.ensemble``): MSP is the max of the
ensemble-averaged softmax, i.e. the confidence of the DE prediction itself; the logit-space detectors score
the ensemble-averaged (activation-shaped) logits, because energy and max-logit read the logits' magnitude,
which averaging probabilities would discard.
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

__all__ = ["DETECTORS", "DEFAULT_DETECTORS", "LABELS", "PERCENTILE_DEFAULTS", "PERCENTILE_GRIDS", "Detectors",
           "metrics", "react_clip", "ash_b", "ash_s", "scale_shape", "energy", "aps_search", "image_index",
           "collect_features", "score_batches"]

DETECTORS: tuple[str, ...] = ("msp", "maxlogit", "energy", "react", "ash", "ash_s", "scale")
# what a table shows by default: the paper's four (MSP, ReAct, ASH, SCALE) and MaxLogit, Energy; ASH-S on request
DEFAULT_DETECTORS: tuple[str, ...] = ("msp", "maxlogit", "energy", "react", "ash", "scale")
LABELS = {"msp": "MSP", "maxlogit": "MaxLogit", "energy": "Energy", "react": "ReAct",
          "ash": "ASH (ASH-B, as OpenOOD v1.5)", "ash_s": "ASH-S", "scale": "SCALE"}
SHAPED = ("react", "ash", "ash_s", "scale")  # the detectors with a percentile
# OpenOOD v1.5 configs/postprocessors/*.yml: postprocessor_args.percentile and postprocessor_sweep.percentile_list.
# OpenOOD has no ASH-S postprocessor: ASH-S takes ASH's default and sweep.
PERCENTILE_DEFAULTS = {"react": 90.0, "ash": 90.0, "ash_s": 90.0, "scale": 85.0}
PERCENTILE_GRIDS = {"react": (85.0, 90.0, 95.0, 99.0), "ash": (65.0, 70.0, 75.0, 80.0, 85.0, 90.0, 95.0),
                    "ash_s": (65.0, 70.0, 75.0, 80.0, 85.0, 90.0, 95.0),
                    "scale": (65.0, 70.0, 75.0, 80.0, 85.0, 90.0, 95.0)}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm")


def _checked_scores(scores, which: str) -> np.ndarray:
    """float64 [N] from a 1-D sequence of finite scores; ValueError (one line) for any other shape or NaN/inf."""
    a = np.asarray(scores.detach().cpu() if isinstance(scores, torch.Tensor) else scores, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"metrics take 1-D score arrays [N]; the {which} scores have shape {tuple(a.shape)}")
    nan, inf = int(np.isnan(a).sum()), int(np.isinf(a).sum())
    if nan or inf:
        raise ValueError(f"{nan} NaN and {inf} inf among the {a.size} {which} scores: a detector that overflows "
                         "or divides by zero on these features cannot be ranked; drop it or check the features")
    return a


def metrics(scores_id: Sequence[float], scores_ood: Sequence[float]) -> dict[str, float]:
    """AUROC, FPR@95%TPR, AUPR-In and AUPR-Out as fractions in [0, 1], as OpenOOD v1.5's evaluator
    (``openood/evaluators/metrics.py: auc_and_fpr_recall``) computes them.

    scores_id [N_id], scores_ood [N_ood]: 1-D, finite, higher = more in-distribution; any other shape, or a
    NaN/inf, is a ValueError naming how many and in which set (OpenOOD would rank a NaN somewhere silently).
    OOD is the positive class for the ROC: fpr95 is the share of in-distribution images flagged OOD at the
    first threshold that catches >= 95% of OOD images. The AUPRs are trapezoid areas (sklearn ``auc``) under
    sklearn's PR curves: AUPR-In with ID positive scored by conf, AUPR-Out with OOD positive scored by -conf.
    OpenOOD's code named them so until its "ood as pos" rewrite of 10 Aug 2023 (commit 873e8c2), which
    computed AUPR-In with OOD positive and AUPR-Out with ID positive, names swapped; its fix of 18 Dec 2023
    (commit 4a72488, "fix #211") restored them. Ours follow the restored names: tables made with OpenOOD
    between those dates have the two AUPR columns the other way round.
    """
    s_id, s_ood = _checked_scores(scores_id, "ID"), _checked_scores(scores_ood, "OOD")
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


def ash_b(feat: torch.Tensor, percentile: float = 90) -> torch.Tensor:
    """ASH-B (OpenOOD v1.5's ASH): the top-k positions of each row set to sum(f) / k, every other entry 0."""
    v, i = _top_k(feat, percentile)
    fill = (feat.sum(1, keepdim=True) / v.shape[1]).expand_as(v)
    return torch.zeros_like(feat).scatter_(1, i, fill)


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


_SHAPERS = {"ash": ash_b, "ash_s": ash_s, "scale": scale_shape}


def react_thresholds(id_features, percentiles: Sequence[float]) -> list[float]:
    """ReAct's clip value for each percentile: np.percentile over every value of held-out ID features [N, D]."""
    f = np.asarray(id_features.cpu() if isinstance(id_features, torch.Tensor) else id_features, dtype=np.float64)
    return [float(t) for t in np.percentile(f.ravel(), list(percentiles))]


class Detectors:
    """The post-hoc scores over one linear head (see the module docstring for the definitions).

    percentiles: {"react", "ash", "ash_s", "scale"} -> p (missing ones: OpenOOD's defaults). ReAct's clip value
    comes from ``fit(held-out ID features)`` or ``react_threshold``.
    """

    def __init__(self, head: nn.Linear, *, percentiles: dict[str, float] | None = None,
                 react_percentile: float | None = None, ash_percentile: float | None = None,
                 scale_percentile: float | None = None, react_threshold: float | None = None):
        self.head = head
        given = {"react": react_percentile, "ash": ash_percentile, "scale": scale_percentile}
        self.percentiles = {**PERCENTILE_DEFAULTS, **{k: v for k, v in given.items() if v is not None},
                            **(percentiles or {})}
        self.react_threshold = react_threshold

    @property
    def react_percentile(self) -> float:
        return self.percentiles["react"]

    def fit(self, id_features: torch.Tensor | np.ndarray) -> Detectors:
        """ReAct's clip value: the react percentile of all values of in-distribution features [N, D] that are
        not scored afterwards (OpenOOD fits on its ID "val" split)."""
        self.react_threshold = react_thresholds(id_features, [self.react_percentile])[0]
        return self

    def _logits(self, name: str, feat: torch.Tensor) -> torch.Tensor:
        """float32 logits [B, K] of the head on features [B, D] shaped for detector ``name`` ("plain": as is)."""
        if name == "react":
            if self.react_threshold is None:
                raise ValueError("ReAct needs a threshold: call fit(held-out in-distribution features) first")
            feat = react_clip(feat, self.react_threshold)
        elif name in _SHAPERS:
            feat = _SHAPERS[name](feat, self.percentiles[name])
        b = None if self.head.bias is None else self.head.bias.float()
        return nn.functional.linear(feat, self.head.weight.float(), b)

    @torch.no_grad()
    def scores(self, feats: torch.Tensor, names: Sequence[str] = DETECTORS) -> dict[str, torch.Tensor]:
        """Scores [B] of each detector in ``names`` from features [B, D], or [S, B, D] for S ensemble copies."""
        unknown = [n for n in names if n not in DETECTORS]
        if unknown:
            raise ValueError(f"unknown detector(s) {unknown}; choose from {DETECTORS}")
        feats = (feats.unsqueeze(0) if feats.dim() == 2 else feats).float()
        out = {}
        if any(n in ("msp", "maxlogit", "energy") for n in names):
            plain = torch.stack([self._logits("plain", f) for f in feats])
            if "msp" in names:
                out["msp"] = plain.softmax(2).mean(0).amax(1)
            mean = plain.mean(0)
            out |= {"maxlogit": mean.amax(1), "energy": energy(mean)}
        for n in (n for n in names if n in SHAPED):
            out[n] = energy(torch.stack([self._logits(n, f) for f in feats]).mean(0))
        return {n: out[n] for n in names}


def aps_search(head: nn.Linear, name: str, id_val, ood_val, grid: Sequence[float] | None = None,
               react_fit=None) -> tuple[float, dict[float, float]]:
    """OpenOOD v1.5's automatic parameter search (``Evaluator.hyperparam_search``) for one detector's percentile.

    id_val / ood_val: features [N, D] (or [S, N, D] ensemble copies) of the ID-val and OOD-val splits; grid:
    default ``PERCENTILE_GRIDS[name]``; react_fit: ID features [N, D] ReAct's clip values are taken from
    (default ``id_val``, or its first copy, as OpenOOD: its ReAct fits on the ID-val split). Returns (the grid
    value with the highest AUROC, the first one on a tie as OpenOOD's ``auroc > max_auroc``, {value: AUROC}).
    """
    if name not in SHAPED:
        raise ValueError(f"{name!r} has no percentile to search; searchable: {SHAPED}")
    grid = list(PERCENTILE_GRIDS[name] if grid is None else grid)
    fit = react_fit if react_fit is not None else (id_val if id_val.dim() == 2 else id_val[0])
    thresholds = react_thresholds(fit, grid) if name == "react" else [None] * len(grid)
    aurocs = {}
    for p, thr in zip(grid, thresholds, strict=True):
        det = Detectors(head, percentiles={name: p}, react_threshold=thr)
        aurocs[float(p)] = metrics(det.scores(id_val, [name])[name], det.scores(ood_val, [name])[name])["auroc"]
    best = max(aurocs.values())
    return next(p for p, a in aurocs.items() if a == best), aurocs


# ---------------------------------------------------------------------------------------------------
# OOD folders and feature extraction


def image_index(root: str | os.PathLike, **scan_kw):
    """A ``DatasetIndex`` of every image under ``root`` (flat, class sub-folders, or deeper), all label 0.

    OOD sets carry no labels the classifier knows, so the folder structure only locates the files. Files that
    cannot be decoded are left out and listed in ``index.bad``. SystemExit with one line when ``root`` is
    missing or holds no readable image.
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
                  autocast_dtype: torch.dtype | None = None, progress: str | None = None,
                  names: Sequence[str] = DETECTORS, de_detectors: Detectors | None = None) -> dict[str, np.ndarray]:
    """Scores of each detector in ``names`` over ``batches``, computed batch by batch (no feature store).

    Returns {"msp": [N], ...} from the unmodified images and, when ``timesteps`` has t > 0 (DiffAug
    Ensemble, needs ``denoiser``), also {"msp_de": [N], ...} from all copies (t = 0 included if listed),
    scored by ``de_detectors`` (default ``detectors``: the DE rows may use percentiles chosen on DE scores).
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
        parts = dict(detectors.scores(feats[0], names))
        if use_de:
            parts |= {f"{k}_de": v for k, v in (de_detectors or detectors).scores(feats[sel], names).items()}
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
                    backend: str = "auto", num_workers: int = 0, interpolation: str = "bilinear") -> str:
    """One line for the demo: AUROC of ``detector`` (one that needs no fitting: MSP, MaxLogit, Energy, ASH,
    ASH-S, SCALE at OpenOOD's default percentiles) with <data_root>/val as in-distribution and the
    never-trained shapes in <data_root>/ood as OOD (plain classifier, no DiffAug; a few seconds)."""
    if detector == "react":
        raise ValueError("the demo line scores every val image; ReAct would need a held-out split (train/eval.py)")
    root = Path(data_root)
    fh = features_and_head(model)
    kw = dict(batch_size=batch_size, backend=backend, device=torch.device(device), num_workers=num_workers,
              crop_size=crop_size, resize_size=resize_size, mean=tuple(mean), std=tuple(std))
    if interpolation != "bilinear":  # only then: the loader's default stays the one every caller had
        kw["interpolation"] = interpolation
    det = Detectors(fh.head)
    s_id = score_batches(fh, det, val_batches(scan_dataset(root / "val", progress=False), **kw), names=[detector])
    s_ood = score_batches(fh, det, val_batches(image_index(root / "ood"), **kw), names=[detector])
    m = metrics(s_id[detector], s_ood[detector])
    return (f"OOD detection ({LABELS[detector]}, {root / 'val'} in-distribution vs {root / 'ood'}): AUROC "
            f"{100 * m['auroc']:.1f}%, FPR@95 {100 * m['fpr95']:.1f}% ({len(s_id[detector])} ID / "
            f"{len(s_ood[detector])} OOD images)")
