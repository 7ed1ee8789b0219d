"""Every evaluation table of the DiffAug paper for a classifier checkpoint: top-1 on folder datasets,
ImageNet-C, and OOD detection, each plain and with DiffAug Ensemble (DE).

    python train/eval.py --ckpt runs/demo/last.pt --val DATA/val
    python train/eval.py --ckpt last.pt --val imagenet/val imagenet-r imagenet-a --imagenet-c imagenet-c \\
        --unet 256x256_diffusion_uncond.pt --de --out results/
    python train/eval.py --ckpt last.pt --ood ssb_hard=SSB ninco=NINCO inaturalist=INAT textures=DTD \\
        openimage_o=OIO --ood-id imagenet/val --ood-group near=ssb_hard,ninco far=inaturalist,textures,openimage_o

--ckpt: a trainer checkpoint, a torchvision/timm state_dict (with --arch, --classes), see diffaug_fast.models.
--val takes class-folder datasets; one whose classes are a subset of the training classes (ImageNet-R,
ImageNet-A: 200 WordNet ids) is scored with the logits sliced to those classes before the softmax.
--imagenet-c takes corruption/severity/class trees: a per-corruption table, then the paper's figures over
the 15 standard corruptions (severity-5 mean, all-severity mean, mCE against AlexNet); other corruption
folders are listed apart. --ood NAME=DIR takes image folders (flat or nested, no labels) scored against
the in-distribution folder --ood-id (default: the first --val) by MSP, MaxLogit, Energy, ReAct, ASH and
SCALE (diffaug_fast.ood); --ood-group averages named sets. DE averages over t in {0, 50, ..., 450}.
Results are written as each dataset completes: <out>/results.{csv,json} (top-1 and ImageNet-C) and
<out>/ood.{csv,json}; a later crash loses nothing already finished.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import diffaug_fast as df

from ..hardware import fast_half_dtype
from ..io import atomic_write_bytes
from .ensemble import (
    DE_TIMESTEPS,
    evaluate_corruptions,
    evaluate_folder,
    summarize_corruptions,
    val_batches,
)
from .models import features_and_head, load_classifier
from .ood import DETECTORS, Detectors, collect_features, image_index, metrics, score_batches

TOP1_FIELDS = ["dataset", "corruption", "severity", "classes", "n", "top1", "top1_de"]
OOD_FIELDS = ["dataset", "detector", "de", "n_id", "n_ood", "auroc", "fpr95", "aupr_in", "aupr_out"]


def write_table(rows: list[dict], fields: list[str], meta: dict, stem: Path) -> None:
    """<stem>.csv and <stem>.json, each replaced atomically (a kill mid-write leaves the previous file)."""
    lines = [",".join(fields)] + [",".join(str(r.get(f, "")) for f in fields) for r in rows]
    atomic_write_bytes(("\n".join(lines) + "\n").encode(), stem.with_suffix(".csv"))
    atomic_write_bytes(json.dumps({**meta, "results": rows}, indent=1).encode(), stem.with_suffix(".json"))


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--arch", default=None, help="torchvision or timm model name (for plain state_dicts)")
    p.add_argument("--classes", default=None, help="the run's classes.json or a JSON list (for plain state_dicts)")
    p.add_argument("--val", nargs="*", default=[], help="class-folder datasets (val, ImageNet-R, ImageNet-A...)")
    p.add_argument("--imagenet-c", nargs="*", default=[], help="corruption/severity/class trees")
    p.add_argument("--ood", nargs="*", default=[], metavar="NAME=DIR", help="OOD image folders")
    p.add_argument("--ood-id", default=None, help="in-distribution folder for OOD (default: the first --val)")
    p.add_argument("--ood-group", nargs="*", default=[], metavar="GROUP=NAME,NAME",
                   help="average these OOD sets, e.g. near=ssb_hard,ninco far=inaturalist,textures,openimage_o")
    p.add_argument("--detectors", default=",".join(DETECTORS), help=f"comma list from {','.join(DETECTORS)}")
    p.add_argument("--react-percentile", type=float, default=90)
    p.add_argument("--ash-percentile", type=float, default=90)
    p.add_argument("--scale-percentile", type=float, default=85)
    p.add_argument("--de", action="store_true", help="also report DiffAug Ensemble")
    p.add_argument("--unet", default=None)
    p.add_argument("--unet-preset", default=None)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--loader", default="auto")
    p.add_argument("--workers", type=int, default=4, help="decoding threads/processes (0: in the main process)")
    p.add_argument("--amp", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="eval_out")
    return p.parse_args(argv)


def check_args(a) -> tuple[dict[str, Path], dict[str, list[str]], list[str]]:
    """(OOD name -> folder, group -> names, detectors) after one-line checks of every path and name."""
    if not (a.val or a.imagenet_c or a.ood):
        raise SystemExit("nothing to evaluate: pass --val, --imagenet-c and/or --ood")
    for d in [*a.val, *a.imagenet_c, *([a.ood_id] if a.ood_id else [])]:
        if not Path(d).is_dir():
            raise SystemExit(f"{d}: no such directory")
    ood = {}
    for item in a.ood:
        name, sep, d = item.partition("=")
        if not sep:
            name, d = Path(item).name, item
        if not Path(d).is_dir():
            raise SystemExit(f"--ood {item}: {d} is not a directory")
        if name in ood:
            raise SystemExit(f"--ood: the name {name!r} is given twice")
        ood[name] = Path(d)
    groups = {}
    for item in a.ood_group:
        group, sep, names = item.partition("=")
        members = [n for n in names.split(",") if n]
        if not sep or not members:
            raise SystemExit(f"--ood-group {item}: expected GROUP=NAME,NAME (names given to --ood)")
        unknown = [n for n in members if n not in ood]
        if unknown:
            raise SystemExit(f"--ood-group {group}: {', '.join(unknown)} not among the --ood sets ({', '.join(ood)})")
        groups[group] = members
    detectors = [d.strip().lower() for d in a.detectors.split(",") if d.strip()]
    bad = [d for d in detectors if d not in DETECTORS]
    if bad or not detectors:
        raise SystemExit(f"--detectors: unknown {', '.join(bad) or '(none given)'}; choose from {', '.join(DETECTORS)}")
    if ood and not (a.ood_id or a.val):
        raise SystemExit("--ood needs in-distribution images: pass --ood-id DIR (or --val)")
    return ood, groups, detectors


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    ood_sets, groups, detectors = check_args(a)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, classes, info = load_classifier(a.ckpt, device, a.arch, a.classes)
    if (a.val or a.imagenet_c) and not info["classes_known"]:
        raise SystemExit(f"--ckpt {a.ckpt} is a bare state_dict without class names: pass --classes classes.json "
                         "(the training run's, in the classifier's output order)")
    den = None
    if a.de:
        if a.unet is None:
            raise SystemExit("--de needs --unet CHECKPOINT (DiffAug needs a pretrained diffusion model)")
        try:
            den = df.load_denoiser(a.unet, a.unet_preset, device=device)
        except df.CheckpointError as e:
            raise SystemExit(f"--unet {a.unet}: {e}") from None
    amp = fast_half_dtype(device) if a.amp else None  # None: no native half precision here, float32
    geometry = dict(crop_size=info["crop_size"], resize_size=info["resize_size"], mean=info["mean"], std=info["std"],
                    num_workers=a.workers)
    kw = dict(batch_size=a.batch_size, backend=a.loader, device=device, denoiser=den, timesteps=DE_TIMESTEPS,
              autocast_dtype=amp, seed=a.seed, **geometry)
    out = Path(a.out)
    meta = {"ckpt": a.ckpt, "arch": info["arch"], "unet": a.unet, "de_timesteps": list(DE_TIMESTEPS) if den else []}

    rows, summaries = [], {}

    def flush():
        write_table(rows, TOP1_FIELDS, {**meta, "imagenet_c": summaries}, out / "results")

    for d in a.val:
        try:
            res = evaluate_folder(model, d, classes, **kw)
        except ValueError as e:
            raise SystemExit(f"--val {d}: {str(e).splitlines()[0]}") from None
        rows.append({"dataset": d, "corruption": "", "severity": "", **res})
        flush()
        de = f", DE {res['top1_de']:.2f}%" if "top1_de" in res else ""
        print(f"{d}: top-1 {res['top1']:.2f}%{de} ({res['n']} images, {res['classes']} classes)")
    for d in a.imagenet_c:
        def on_row(r, d=d):
            rows.append({"dataset": d, **r})
            flush()

        try:
            table = evaluate_corruptions(model, d, classes, on_row=on_row, **kw)
        except ValueError as e:
            raise SystemExit(f"--imagenet-c {d}: {str(e).splitlines()[0]}") from None
        summaries[d] = summarize_corruptions(table)
        flush()
        print_corruption_table(d, table)
        print_corruption_summary(summaries[d])
    if rows:
        print(f"wrote {out / 'results.csv'} and {out / 'results.json'}")
    ood_rows = run_ood(a, model, den, kw, ood_sets, groups, detectors, out, meta) if ood_sets else []
    return {"results": rows, "imagenet_c": summaries, "ood": ood_rows}


def run_ood(a, model, den, kw, ood_sets, groups, detectors, out, meta) -> list[dict]:
    """Fit ReAct on the in-distribution features, score every set, write ood.{csv,json} after each set."""
    try:
        fh = features_and_head(model)
    except ValueError as e:
        raise SystemExit(f"--ood: {e}") from None
    loader_kw = {k: kw[k] for k in ("batch_size", "backend", "device", "crop_size", "resize_size", "mean", "std",
                                    "num_workers")}
    score_kw = dict(denoiser=den, timesteps=DE_TIMESTEPS if den else (0,), mean=kw["mean"], std=kw["std"],
                    seed=a.seed, autocast_dtype=kw["autocast_dtype"])
    id_dir = a.ood_id or a.val[0]
    id_index = image_index(id_dir)
    feats, _ = collect_features(fh.features, val_batches(id_index, **loader_kw), autocast_dtype=kw["autocast_dtype"],
                                progress=f"features {Path(id_dir).name}")
    det = Detectors(fh.head, react_percentile=a.react_percentile, ash_percentile=a.ash_percentile,
                    scale_percentile=a.scale_percentile).fit(feats[0])
    s_id = {k: v.numpy() for k, v in det.scores(feats[0]).items()}
    del feats
    if den is not None:
        s_id = score_batches(fh, det, val_batches(id_index, **loader_kw), progress=f"DE {Path(id_dir).name}",
                             **score_kw)
    variants = [(name, False) for name in detectors] + ([(name, True) for name in detectors] if den else [])
    meta = {**meta, "ood_id": str(id_dir), "react_threshold": det.react_threshold, "groups": groups,
            "percentiles": {"react": a.react_percentile, "ash": a.ash_percentile, "scale": a.scale_percentile}}
    rows = []
    for name, d in ood_sets.items():
        s_ood = score_batches(fh, det, val_batches(image_index(d), **loader_kw), progress=name, **score_kw)
        for det_name, de in variants:
            key = det_name + ("_de" if de else "")
            rows.append({"dataset": name, "detector": det_name, "de": de, "n_id": len(s_id[key]),
                         "n_ood": len(s_ood[key]), **metrics(s_id[key], s_ood[key])})
        write_table(rows, OOD_FIELDS, meta, out / "ood")
    for group, members in groups.items():
        for det_name, de in variants:
            sel = [r for r in rows if r["dataset"] in members and r["detector"] == det_name and r["de"] == de]
            rows.append({"dataset": f"{group} (mean)", "detector": det_name, "de": de, "n_id": sel[0]["n_id"],
                         "n_ood": sum(r["n_ood"] for r in sel),
                         **{m: sum(r[m] for r in sel) / len(sel) for m in ("auroc", "fpr95", "aupr_in", "aupr_out")}})
    write_table(rows, OOD_FIELDS, meta, out / "ood")
    print_ood_tables(rows, detectors, bool(den), id_dir)
    print(f"wrote {out / 'ood.csv'} and {out / 'ood.json'}")
    return rows


def print_ood_tables(rows: list[dict], detectors: list[str], de: bool, id_dir) -> None:
    print(f"OOD detection vs {id_dir} (in-distribution), % (AUROC and AUPR higher is better, FPR@95 lower)")
    for det_name in detectors:
        print(f"  {det_name.upper()}" + ("   plain | DiffAug Ensemble" if de else ""))
        head = "".join(f"{h:>9}" for h in ("AUROC", "FPR@95", "AUPR-In", "AUPR-Out"))
        print(f"    {'dataset':<22}{head}" + (f" |{head}" if de else ""))
        for r in [r for r in rows if r["detector"] == det_name and not r["de"]]:
            cells = "".join(f"{100 * r[m]:>9.2f}" for m in ("auroc", "fpr95", "aupr_in", "aupr_out"))
            if de:
                rd = next(x for x in rows if x["detector"] == det_name and x["de"] and x["dataset"] == r["dataset"])
                cells += " |" + "".join(f"{100 * rd[m]:>9.2f}" for m in ("auroc", "fpr95", "aupr_in", "aupr_out"))
            print(f"    {r['dataset']:<22}{cells}")


def print_corruption_table(name: str, table: list[dict]) -> None:
    sevs = sorted({r["severity"] for r in table})
    print(f"{name}: top-1 % by corruption (rows) and severity (columns)" + ("; plain / DE" if "top1_de" in table[0]
                                                                              else ""))
    print(f"  {'corruption':<18}" + "".join(f"{s:>14}" for s in sevs) + f"{'mean':>14}")
    for c in sorted({r["corruption"] for r in table}):
        cells, plain, de = [], [], []
        for s in sevs:
            r = next((r for r in table if r["corruption"] == c and r["severity"] == s), None)
            if r is None:
                cells.append(f"{'-':>14}")
                continue
            plain.append(r["top1"])
            de.append(r.get("top1_de"))
            cells.append(f"{r['top1']:>6.1f}" + (f" / {r['top1_de']:<5.1f}" if "top1_de" in r else " " * 8))
        mean = sum(plain) / len(plain)
        mean_de = f" / {sum(de) / len(de):<5.1f}" if de and de[0] is not None else " " * 8
        print(f"  {c:<18}" + "".join(cells) + f"{mean:>6.1f}{mean_de}")


def print_corruption_summary(s: dict) -> None:
    def fmt(key):
        v, vd = s.get(key), s.get(key + "_de")
        txt = "n/a" if v is None else f"{v:.2f}%"
        return txt + ("" if key + "_de" not in s else f" (DE {'n/a' if vd is None else f'{vd:.2f}%'})")

    print(f"  15 standard corruptions: severity-5 top-1 {fmt('sev5')}, all-severity top-1 {fmt('all')}, "
          f"mCE vs AlexNet {fmt('mce')}")
    if s["missing"]:
        print(f"  missing for these figures: {', '.join(s['missing'][:6])}"
              + (f" and {len(s['missing']) - 6} more" if len(s["missing"]) > 6 else ""))
    if s["extra"]:
        print(f"  other corruption folders (shown above, not averaged in): {', '.join(s['extra'])}")


if __name__ == "__main__":
    main()
