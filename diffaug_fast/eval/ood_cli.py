"""The OOD part of train/eval.py: its folders checked before any work, the ID-val split, OpenOOD v1.5's
percentile search (APS), the scored sets and the tables.

Protocol (OpenOOD v1.5's ``Evaluator``): ReAct's clip value is fitted on an in-distribution split that is not
scored, its ID "val" split: here ``--ood-val-id DIR``, else every ``HOLD_OUT_EVERY``-th image of the --ood-id
folder (positions 0, 5, 10, ... of its sorted file list), which is then left out of every scored set. With
``--ood-val NAME=DIR`` (OpenOOD's OOD "val" split, OpenImage-O's val list for ImageNet) the percentile of
ReAct, ASH, ASH-S and SCALE is chosen per detector by AUROC on ID-val vs OOD-val over OpenOOD's grid before
any test set is scored (separately for the DiffAug Ensemble rows, on DE scores); without it, or for a detector
whose percentile a flag fixes, the fixed value is used and the table says so.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .ensemble import DE_TIMESTEPS, val_batches
from .ood import (
    LABELS,
    PERCENTILE_DEFAULTS,
    PERCENTILE_GRIDS,
    SHAPED,
    Detectors,
    aps_search,
    collect_features,
    image_index,
    metrics,
    react_thresholds,
    score_batches,
)

__all__ = ["OodPlan", "plan_ood", "run_ood", "HOLD_OUT_EVERY", "OOD_FIELDS"]

HOLD_OUT_EVERY = 5  # without --ood-val-id: 1 image in 5 of the ID folder fits ReAct / the search, never scored
OOD_FIELDS = ["dataset", "detector", "de", "percentile", "n_id", "n_ood", "auroc", "fpr95", "aupr_in", "aupr_out"]


@dataclass
class OodPlan:
    """Every OOD-side folder scanned (bad files named) before any model work, and the split of the ID images."""

    id_dir: str
    scored_id: object                      # DatasetIndex of the ID images that are scored
    fit: object | None                     # DatasetIndex of the ID-val split (ReAct's fit, the search's ID side)
    fit_source: str                        # that split in words
    ood: dict[str, object]                 # name -> DatasetIndex of each scored OOD set
    val_ood: dict[str, object] = field(default_factory=dict)  # name -> DatasetIndex of the OOD-val sets
    left_out: dict[str, int] = field(default_factory=dict)    # scored set -> images dropped as fit/val images


def _scan(flag: str, d) -> object:
    """image_index of ``d``; its unreadable files are named now, before any image is scored."""
    idx = image_index(d)
    if idx.bad:
        print(f"{flag}: {len(idx.bad)} file(s) cannot be read and are left out\n{idx.report()}")
    return idx


def _without(index, drop: set[str]):
    """``index`` minus the files in ``drop`` (real paths): images used to fit or choose are never scored."""
    keep = [i for i, f in enumerate(index.files) if os.path.realpath(f) not in drop]
    return index.subset(keep), len(index.files) - len(keep)


def plan_ood(id_dir, ood_dirs: dict[str, Path], val_id_dir, val_ood_dirs: dict[str, Path],
             detectors: list[str]) -> OodPlan:
    """Scan every OOD-side folder and split the ID images (see the module docstring); SystemExit on a folder
    without readable images, before any evaluation starts."""
    id_index = _scan(f"--ood-id {id_dir}", id_dir)
    ood = {name: _scan(f"--ood {name}", d) for name, d in ood_dirs.items()}
    val_ood = {name: _scan(f"--ood-val {name}", d) for name, d in val_ood_dirs.items()}
    need_fit = "react" in detectors or (bool(val_ood) and any(d in SHAPED for d in detectors))
    fit, source = None, "none (no detector is fitted)"
    if val_id_dir is not None:
        fit, source = _scan(f"--ood-val-id {val_id_dir}", val_id_dir), f"--ood-val-id {val_id_dir}"
    elif need_fit:
        if len(id_index) < 2:
            raise SystemExit(f"--ood-id {id_dir}: {len(id_index)} image(s); ReAct and the percentile search need a "
                             "held-out split of it: give --ood-val-id DIR (in-distribution images not scored)")
        held = list(range(0, len(id_index), HOLD_OUT_EVERY))
        fit = id_index.subset(held)
        source = (f"every {HOLD_OUT_EVERY}th image of {id_dir} ({len(held)} images, left out of the scored sets; "
                  "--ood-val-id DIR gives a separate split)")
    drop = set()
    if fit is not None:
        drop |= {os.path.realpath(f) for f in fit.files}
    for idx in val_ood.values():
        drop |= {os.path.realpath(f) for f in idx.files}
    plan = OodPlan(str(id_dir), None, fit, source, {}, val_ood)
    for name, idx in [("ID", id_index), *ood.items()]:
        kept, n_drop = _without(idx, drop)
        if len(kept) == 0:
            raise SystemExit(f"{'--ood-id ' + str(id_dir) if name == 'ID' else '--ood ' + name}: every image is also "
                             "in the fit/validation split, nothing is left to score")
        if n_drop:
            plan.left_out[name] = n_drop
        if name == "ID":
            plan.scored_id = kept
        else:
            plan.ood[name] = kept
    return plan


def _features(fh, index, loader_kw, score_kw, de: bool, desc: str) -> torch.Tensor:
    ts = DE_TIMESTEPS if de else (0,)
    return collect_features(fh.features, val_batches(index, **loader_kw), denoiser=score_kw["denoiser"] if de else None,
                            timesteps=ts, mean=score_kw["mean"], std=score_kw["std"], seed=score_kw["seed"],
                            autocast_dtype=score_kw["autocast_dtype"], progress=desc)[0]


def choose_percentiles(a, fh, plan: OodPlan, detectors, loader_kw, score_kw) -> dict:
    """{False: (Detectors, {name: info}), True: ...} for the plain and (with a denoiser) the DE rows; info says
    how each percentile was set: a flag, the APS search (with its AUROC per grid value) or OpenOOD's default."""
    de_too = score_kw["denoiser"] is not None
    search = bool(plan.val_ood) and any(d in SHAPED for d in detectors)
    fit = _features(fh, plan.fit, loader_kw, score_kw, de_too and search, "features ID-val") if plan.fit else None
    val = None
    if search:
        val = torch.cat([_features(fh, idx, loader_kw, score_kw, de_too, f"features {n}")
                         for n, idx in plan.val_ood.items()], 1)
    out = {}
    for de in [False, True] if de_too else [False]:
        chosen, info = {}, {}
        for name in (d for d in detectors if d in SHAPED):
            given = getattr(a, f"{name}_percentile")
            if given is not None:
                chosen[name], info[name] = given, {"value": given, "how": f"fixed by --{name.replace('_', '-')}-"
                                                                       "percentile"}
            elif search:
                ids, oods = (fit, val) if de else (fit[0], val[0])
                p, aurocs = aps_search(fh.head, name, ids, oods, react_fit=fit[0])
                chosen[name] = p
                info[name] = {"value": p, "how": f"APS: best AUROC on ID-val vs {'+'.join(plan.val_ood)} over "
                                                 f"{list(PERCENTILE_GRIDS[name])}", "val_auroc": aurocs}
            else:
                chosen[name] = PERCENTILE_DEFAULTS[name]
                info[name] = {"value": chosen[name], "how": "OpenOOD's default (no --ood-val split to search on)"}
        thr = react_thresholds(fit[0], [chosen["react"]])[0] if "react" in chosen else None
        out[de] = (Detectors(fh.head, percentiles=chosen, react_threshold=thr), info)
    return out


def _finite_or_exit(scores: dict[str, np.ndarray], where: str) -> None:
    for key, v in scores.items():
        bad = int((~np.isfinite(v)).sum())
        if bad:
            det = key.removesuffix("_de")
            raise SystemExit(f"{LABELS[det]}{' (DiffAug Ensemble)' if key.endswith('_de') else ''}: {bad} of "
                             f"{v.size} scores on {where} are NaN or inf; leave it out with --detectors")


def run_ood(a, model_fh, den, kw, plan: OodPlan, groups, detectors, out: Path, meta, write_table) -> list[dict]:
    """Choose the percentiles, score the ID images once and every OOD set, write ood.{csv,json} after each set."""
    fh = model_fh
    loader_kw = {k: kw[k] for k in ("batch_size", "backend", "device", "crop_size", "resize_size", "mean", "std",
                                    "num_workers", "interpolation") if k in kw}
    score_kw = dict(denoiser=den, timesteps=DE_TIMESTEPS if den else (0,), mean=kw["mean"], std=kw["std"],
                    seed=a.seed, autocast_dtype=kw["autocast_dtype"])
    setup = choose_percentiles(a, fh, plan, detectors, loader_kw, score_kw)
    det, de_det = setup[False][0], setup[True][0] if den else None
    variants = [(name, False) for name in detectors] + ([(name, True) for name in detectors] if den else [])
    meta = {**meta, "ood_id": plan.id_dir, "fit_split": plan.fit_source, "left_out": plan.left_out,
            "ood_val": {n: str(idx.root) for n, idx in plan.val_ood.items()}, "groups": groups,
            "react_threshold": det.react_threshold, "react_threshold_de": de_det.react_threshold if den else None,
            "percentiles": {"plain": setup[False][1], **({"de": setup[True][1]} if den else {})}}
    s_id = score_batches(fh, det, val_batches(plan.scored_id, **loader_kw), names=detectors, de_detectors=de_det,
                         progress=f"{'DE ' if den else ''}{Path(plan.id_dir).name}", **score_kw)
    _finite_or_exit(s_id, f"the in-distribution images of {plan.id_dir}")
    rows = []
    for name, idx in plan.ood.items():
        s_ood = score_batches(fh, det, val_batches(idx, **loader_kw), names=detectors, de_detectors=de_det,
                              progress=name, **score_kw)
        _finite_or_exit(s_ood, f"--ood {name}")
        for det_name, de in variants:
            key = det_name + ("_de" if de else "")
            p = setup[de][1].get(det_name, {}).get("value", "")
            rows.append({"dataset": name, "detector": det_name, "de": de, "percentile": p, "n_id": len(s_id[key]),
                         "n_ood": len(s_ood[key]), **metrics(s_id[key], s_ood[key])})
        write_table(rows, OOD_FIELDS, meta, out / "ood")
    for group, members in groups.items():
        for det_name, de in variants:
            sel = [r for r in rows if r["dataset"] in members and r["detector"] == det_name and r["de"] == de]
            rows.append({"dataset": f"{group} (mean)", "detector": det_name, "de": de, "percentile": sel[0]["percentile"],
                         "n_id": sel[0]["n_id"], "n_ood": sum(r["n_ood"] for r in sel),
                         **{m: sum(r[m] for r in sel) / len(sel) for m in ("auroc", "fpr95", "aupr_in", "aupr_out")}})
    write_table(rows, OOD_FIELDS, meta, out / "ood")
    print_ood_tables(rows, detectors, bool(den), plan, meta)
    print(f"wrote {out / 'ood.csv'} and {out / 'ood.json'}")
    return rows


def print_ood_tables(rows: list[dict], detectors: list[str], de: bool, plan: OodPlan, meta: dict) -> None:
    print(f"OOD detection vs {plan.id_dir} (in-distribution, {len(plan.scored_id)} images scored), % (AUROC and "
          f"AUPR higher is better, FPR@95 lower); AUPR-In: ID positive, AUPR-Out: OOD positive (OpenOOD v1.5)")
    print(f"  view: {meta.get('protocol', '')}; ID-val split (ReAct's fit, the search): {plan.fit_source}")
    if plan.left_out:
        print("  left out of the scored sets as fit/validation images: "
              + ", ".join(f"{k} {v}" for k, v in plan.left_out.items()))
    for det_name in detectors:
        how = ""
        if det_name in SHAPED:
            parts = [f"{'DE ' if k == 'de' else ''}p={v[det_name]['value']:g} ({v[det_name]['how']})"
                     for k, v in meta["percentiles"].items()]
            how = "  " + "; ".join(parts)
        print(f"  {LABELS[det_name]}" + ("   plain | DiffAug Ensemble" if de else "") + how)
        head = "".join(f"{h:>9}" for h in ("AUROC", "FPR@95", "AUPR-In", "AUPR-Out"))
        print(f"    {'dataset':<22}{head}" + (f" |{head}" if de else ""))
        for r in [r for r in rows if r["detector"] == det_name and not r["de"]]:
            cells = "".join(f"{100 * r[m]:>9.2f}" for m in ("auroc", "fpr95", "aupr_in", "aupr_out"))
            if de:
                rd = next(x for x in rows if x["detector"] == det_name and x["de"] and x["dataset"] == r["dataset"])
                cells += " |" + "".join(f"{100 * rd[m]:>9.2f}" for m in ("auroc", "fpr95", "aupr_in", "aupr_out"))
            print(f"    {r['dataset']:<22}{cells}")
