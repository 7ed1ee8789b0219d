"""The effect study's aggregation: result files -> rows, the summary table with paired differences over seeds,
and the figure (``python -m diffaug_fast.study`` computes the results; eval/study.py).

Rows: one per training x method x split x seed, ``{"training", "method", "corruption", "family", "severity",
"seed", "n", "correct", "top1"}``; the clean split is ``corruption="clean"``, ``family="clean"``,
``severity=0``; top-1 is in % (100 * correct / n).

Summary figures, each computed per seed first and then summarized over seeds:

- ``clean``: top-1 on the clean split;
- ``noise``: the mean top-1 over the noise family's corruptions at the table severity (5, or the highest
  present when the tree has no severity 5);
- ``all15``: the same over the 15 standard ImageNet-C corruptions (the paper's headline figure at severity 5);
- ``validation``: the same over the 4 held-out validation corruptions.

Over seeds: the mean and the sample standard deviation (ddof = 1). Paired differences (a method minus
baseline + plain) are taken seed by seed, the two classifiers of a seed having seen the same data order,
initialisation seed and test-time noise; their 95% interval is mean +- t_{0.975, n-1} * sd / sqrt(n)
(``scipy.stats.t.interval``), undefined with one seed.
"""

from __future__ import annotations

import io
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from scipy import stats

from ..data.corruptions import CORRUPTIONS, FAMILIES, VALIDATION_CORRUPTIONS
from ..io import atomic_write_bytes

__all__ = ["TRAININGS", "METHODS", "METRICS", "FIELDS", "family_of", "result_rows", "table_severity",
           "seed_values", "summarize", "format_table", "plot_study"]

TRAININGS = ("baseline", "diffaug")
METHODS = ("plain", "de", "dda", "dda_se")
METHOD_NAMES = {"plain": "plain", "de": "DiffAug Ensemble", "dda": "DDA", "dda_se": "DDA-SE"}
METRICS = ("clean", "noise", "blur", "weather", "digital", "all15", "validation")
METRIC_NAMES = {"clean": "clean", "noise": "noise", "blur": "blur", "weather": "weather", "digital": "digital",
                "all15": "15 corruptions", "validation": "4 validation"}
FIELDS = ["training", "method", "corruption", "family", "severity", "seed", "n", "correct", "top1"]
REFERENCE = ("baseline", "plain")
HEADLINE = ("diffaug", "de")
_FAMILY = {c: f for f, members in FAMILIES.items() for c in members} | dict.fromkeys(VALIDATION_CORRUPTIONS,
                                                                                   "validation")
_PANELS = (*FAMILIES, "validation", "other")


def family_of(corruption: str) -> str:
    """The family of a corruption folder: "clean", a FAMILIES name (noise, blur, weather, digital),
    "validation" or "other" (a folder the corruptions module does not name)."""
    return "clean" if corruption == "clean" else _FAMILY.get(corruption, "other")


def _order(key: tuple[str, str]) -> tuple[int, int, str, str]:
    """(training, method) in TRAININGS x METHODS order; unknown names last."""
    training, method = key
    return (TRAININGS.index(training) if training in TRAININGS else 9, METHODS.index(method) if method in METHODS
            else 9, training, method)


def result_rows(results: Iterable[dict]) -> list[dict]:
    """Rows (see the module docstring) from per-(seed, split) result dicts as eval/study.py writes them:
    ``{"seed", "corruption", "severity", "n", "correct": {training: {method: count}}}``."""
    rows = []
    for r in results:
        for training, by_method in r["correct"].items():
            for method, correct in by_method.items():
                rows.append({"training": training, "method": method, "corruption": r["corruption"],
                             "family": family_of(r["corruption"]), "severity": int(r["severity"]),
                             "seed": int(r["seed"]), "n": int(r["n"]), "correct": int(correct),
                             "top1": 100.0 * correct / r["n"]})
    order = {c: i for i, c in enumerate(("clean", *CORRUPTIONS, *VALIDATION_CORRUPTIONS))}
    rows.sort(key=lambda w: (*_order((w["training"], w["method"])), order.get(w["corruption"], len(order)),
                             w["corruption"], w["severity"], w["seed"]))
    return rows


def table_severity(rows: Sequence[dict]) -> int | None:
    """5 when any corrupted row has it, else the highest severity present (None: no corrupted rows)."""
    sevs = {r["severity"] for r in rows if r["corruption"] != "clean"}
    return None if not sevs else 5 if 5 in sevs else max(sevs)


def _group(metric: str, corruption: str) -> bool:
    if metric in FAMILIES:
        return corruption in FAMILIES[metric]
    if metric == "all15":
        return corruption in CORRUPTIONS
    return corruption in VALIDATION_CORRUPTIONS


def seed_values(rows: Sequence[dict], severity: int | None = None) -> tuple[dict, dict]:
    """({(training, method): {metric: {seed: value}}}, {metric: corruptions averaged}) at ``severity``
    (default ``table_severity(rows)``). A seed enters a corruption group's mean only when it has every
    corruption of the group that any seed has (so no seed's mean is over an easier subset)."""
    severity = table_severity(rows) if severity is None else severity
    out: dict = defaultdict(lambda: defaultdict(dict))
    counts = {}
    cell = defaultdict(dict)  # (training, method, metric) -> {seed: {corruption: top1}}
    for r in rows:
        key = (r["training"], r["method"])
        if r["corruption"] == "clean":
            out[key]["clean"][r["seed"]] = r["top1"]
            continue
        if r["severity"] != severity:
            continue
        for metric in METRICS[1:]:
            if _group(metric, r["corruption"]):
                cell[(*key, metric)].setdefault(r["seed"], {})[r["corruption"]] = r["top1"]
    for (training, method, metric), by_seed in cell.items():
        names = set().union(*(set(v) for v in by_seed.values()))
        counts[metric] = max(counts.get(metric, 0), len(names))
        for seed, vals in by_seed.items():
            if set(vals) == names:
                out[(training, method)][metric][seed] = float(np.mean(list(vals.values())))
    return {k: dict(v) for k, v in out.items()}, counts


def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else None


def paired_difference(a: dict[int, float], b: dict[int, float], level: float = 0.95) -> dict:
    """a - b seed by seed over the seeds both have: {"seeds", "per_seed", "mean", "std", "ci"}; ci is the
    t interval (``level``) of the mean, None with fewer than 2 seeds (and (mean, mean) when every seed's
    difference is the same: a zero spread)."""
    seeds = sorted(set(a) & set(b))
    d = np.array([a[k] - b[k] for k in seeds], dtype=np.float64)
    res = {"seeds": seeds, "per_seed": {k: float(v) for k, v in zip(seeds, d)}, "mean": None, "std": None,
           "ci": None}
    if len(d) == 0:
        return res
    res["mean"] = float(d.mean())
    if len(d) >= 2:
        sd = float(d.std(ddof=1))
        res["std"] = sd
        if sd > 0:
            lo, hi = stats.t.interval(level, len(d) - 1, loc=d.mean(), scale=sd / math.sqrt(len(d)))
            res["ci"] = (float(lo), float(hi))
        else:
            res["ci"] = (res["mean"], res["mean"])
    return res


def summarize(rows: Sequence[dict], severity: int | None = None) -> dict:
    """{"severity", "counts", "seeds", "cells", "differences"}: per (training, method) and metric the mean
    and std over seeds ("cells"), and every (training, method) minus baseline + plain, paired by seed, with
    DiffAug + DE first ("differences")."""
    severity = table_severity(rows) if severity is None else severity
    values, counts = seed_values(rows, severity)
    cells, diffs = [], []
    for training, method in sorted(values, key=_order):
        for metric in METRICS:
            per_seed = values[(training, method)].get(metric, {})
            mean, std = _mean_std(list(per_seed.values()))
            cells.append({"training": training, "method": method, "metric": metric, "mean": mean, "std": std,
                          "per_seed": per_seed})
    ref = values.get(REFERENCE, {})
    for key in sorted(values, key=lambda k: (k != HEADLINE, *_order(k))):
        if key == REFERENCE or not ref:
            continue
        for metric in METRICS:
            d = paired_difference(values[key].get(metric, {}), ref.get(metric, {}))
            diffs.append({"training": key[0], "method": key[1], "metric": metric, **d})
    return {"severity": severity, "counts": counts, "seeds": sorted({r["seed"] for r in rows}), "cells": cells,
            "differences": diffs}


def _label(training: str, method: str) -> str:
    return f"{'DiffAug' if training == 'diffaug' else training} + {METHOD_NAMES.get(method, method)}"


def _cell(mean, std) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.2f}" + (f" ± {std:.2f}" if std is not None else "")


def _diff_cell(d: dict) -> str:
    if d["mean"] is None:
        return "n/a"
    if d["ci"] is None:
        return f"{d['mean']:+.2f} (interval undefined: 1 seed)"
    return f"{d['mean']:+.2f} [{d['ci'][0]:+.2f}, {d['ci'][1]:+.2f}]"


def format_table(summary: dict) -> str:
    """The summary as Markdown: top-1 mean ± std over seeds, then the paired differences with 95% intervals."""
    sev, counts, seeds = summary["severity"], summary["counts"], summary["seeds"]
    n = len(seeds)
    total = {f: len(members) for f, members in FAMILIES.items()} | {"all15": len(CORRUPTIONS),
                                                                     "validation": len(VALIDATION_CORRUPTIONS)}
    metrics = ["clean"] + [m for m in METRICS[1:] if counts.get(m, 0)]  # groups with no corruption are left out
    heads = ["clean"] + [f"{METRIC_NAMES[m]}, severity {sev} ({counts[m]} of {total[m]})" for m in metrics[1:]]
    spread = "mean ± sample std (n - 1)" if n > 1 else "one seed: no spread"
    lines = [f"Top-1 (%) over {n} seed(s) ({', '.join(map(str, seeds))}), {spread}. Corruption columns: the "
             "mean over the corruptions present at that severity, per seed.", "",
             "| training + method | " + " | ".join(heads) + " |", "|---|" + "---|" * len(heads)]
    by = {(c["training"], c["method"], c["metric"]): c for c in summary["cells"]}
    for key in dict.fromkeys((c["training"], c["method"]) for c in summary["cells"]):
        lines.append(f"| {_label(*key)} | " + " | ".join(_cell(by[(*key, m)]["mean"], by[(*key, m)]["std"])
                                                        for m in metrics) + " |")
    if summary["differences"]:
        interval = ("95% interval: t distribution over seeds, mean ± t(0.975, n - 1) · sd / √n" if n > 1
                    else "one seed: the interval is undefined")
        lines += ["", f"Paired difference, seed by seed, minus baseline + plain (percentage points; {interval}). "
                  "DiffAug + DiffAug Ensemble is the paper's claim.", "",
                  "| comparison | " + " | ".join(heads) + " |", "|---|" + "---|" * len(heads)]
        dby = {(d["training"], d["method"], d["metric"]): d for d in summary["differences"]}
        for key in dict.fromkeys((d["training"], d["method"]) for d in summary["differences"]):
            name = f"**{_label(*key)}**" if key == HEADLINE else _label(*key)
            lines.append(f"| {name} − baseline + plain | " + " | ".join(_diff_cell(dby[(*key, m)])
                                                                     for m in metrics) + " |")
        if (*HEADLINE, "clean") in dby:
            per = [f"seed {k}: " + " / ".join(f"{dby[(*HEADLINE, m)]['per_seed'][k]:+.2f}"
                                              if k in dby[(*HEADLINE, m)]["per_seed"] else "n/a" for m in metrics)
                   for k in seeds]
            lines += ["", f"{_label(*HEADLINE)} − baseline + plain, seed by seed ("
                      + " / ".join(METRIC_NAMES[m] for m in metrics) + "): " + "; ".join(per) + "."]
    return "\n".join(lines) + "\n"


def _family_curves(rows: Sequence[dict]) -> dict:
    """{panel: {(training, method): {severity: {seed: mean top-1 over the panel's corruptions}}}}; severity 0
    is the clean split, shared by every panel."""
    per: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(dict)))
    clean = defaultdict(dict)
    for r in rows:
        key = (r["training"], r["method"])
        if r["corruption"] == "clean":
            clean[key][r["seed"]] = r["top1"]
        else:
            per[r["family"]][key][r["severity"]].setdefault(r["seed"], []).append(r["top1"])
    out = {}
    for panel in [p for p in _PANELS if p in per]:
        out[panel] = {}
        for key, by_sev in per[panel].items():
            curve = {0: dict(clean.get(key, {}))}
            for sev, by_seed in by_sev.items():
                curve[sev] = {seed: float(np.mean(v)) for seed, v in by_seed.items()}
            out[panel][key] = curve
    return out


def plot_study(rows: Sequence[dict], path: str | Path, title: str = "") -> Path:
    """Top-1 against severity (0 = clean), one panel per corruption family (the mean over the family's
    corruptions present), one line per (training, method): the mean over seeds, the band the min-max over
    seeds. Colour = method, line style = training (solid DiffAug, dashed baseline). Writes a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = _family_curves(rows)
    panels = list(curves) or ["clean"]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.6), squeeze=False, sharey=True)
    colors = dict(zip(METHODS, ("tab:gray", "tab:blue", "tab:orange", "tab:green"), strict=True))
    for ax, panel in zip(axes[0], panels, strict=True):
        for (training, method), curve in sorted(curves.get(panel, {}).items(), key=lambda kv: _order(kv[0])):
            sevs = sorted(s for s in curve if curve[s])
            vals = [np.array(list(curve[s].values())) for s in sevs]
            mean = np.array([v.mean() for v in vals])
            style = "-" if training == "diffaug" else "--"
            color = colors.get(method, "black")
            ax.plot(sevs, mean, style, marker="o", ms=3, color=color, label=_label(training, method))
            ax.fill_between(sevs, [v.min() for v in vals], [v.max() for v in vals], color=color, alpha=0.12,
                            lw=0)
        members = sorted({r["corruption"] for r in rows if r["family"] == panel})
        ax.set_title(f"{panel} ({len(members)})", fontsize=10)
        ax.set_xlabel("severity (0 = clean)")
        ax.set_xticks(range(0, 6))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("top-1 (%)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, max(1, len(labels))), fontsize=8, frameon=False)
    fig.suptitle((title + "\n" if title else "") + "mean over seeds; band: min-max over seeds", fontsize=10)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return atomic_write_bytes(buf.getvalue(), path)
