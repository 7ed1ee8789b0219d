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
the in-distribution folder --ood-id (default: the first --val) by MSP, MaxLogit, Energy, ReAct, ASH (ASH-B,
as OpenOOD v1.5), SCALE and on request ASH-S (diffaug_fast.eval.ood); --ood-group averages named sets.
ReAct is fitted on --ood-val-id (else on every 5th --ood-id image, then not scored); with --ood-val NAME=DIR
the percentiles of ReAct, ASH, ASH-S and SCALE are chosen by AUROC on ID-val vs OOD-val first, as OpenOOD
v1.5 (diffaug_fast.eval.ood_cli). DE averages over t in {0, 50, ..., 450}.
The view: Resize(crop / --eval-crop-ratio) + CenterCrop(crop) with --interpolation; by default the
checkpoint's recipe (rn50: 0.875 bilinear, DiffAug's Resize 256 + CenterCrop 224; vit: 1.0 bicubic,
DeiT-III's), a timm state_dict's pretrained_cfg, or torchvision's 0.875 bilinear; every table names it.
Everything is checked before any image is scored: paths, --out writable, every OOD-side folder scanned (files
that cannot be read are named and left out). Results are written as each dataset completes:
<out>/results.{csv,json} (top-1 and ImageNet-C) and <out>/ood.{csv,json}; a later crash loses nothing finished.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

import diffaug_fast as df

from ..data.base import INTERPOLATIONS
from ..hardware import fast_half_dtype
from ..io import atomic_write_bytes
from .ensemble import (
    DE_TIMESTEPS,
    eval_geometry,
    evaluate_corruptions,
    evaluate_folder,
    protocol_text,
    summarize_corruptions,
)
from .models import features_and_head, load_classifier
from .ood import DEFAULT_DETECTORS, DETECTORS
from .ood_cli import OOD_FIELDS, plan_ood, run_ood

TOP1_FIELDS = ["dataset", "corruption", "severity", "classes", "n", "top1", "top1_de"]
__all__ = ["main", "parse_args", "check_args", "check_out", "write_table", "OOD_FIELDS"]


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
    p.add_argument("--ood-val-id", default=None, metavar="DIR",
                   help="in-distribution images NOT scored: ReAct's fit and the search's ID side (OpenOOD's ID val); "
                        "default: every 5th image of --ood-id, left out of the scored set")
    p.add_argument("--ood-val", nargs="*", default=[], metavar="NAME=DIR",
                   help="OOD validation folders (OpenOOD: OpenImage-O's val list): the percentiles of ReAct, ASH, ASH-S "
                        "and SCALE are chosen by AUROC on them before the --ood sets are scored")
    p.add_argument("--ood-group", nargs="*", default=[], metavar="GROUP=NAME,NAME",
                   help="average these OOD sets, e.g. near=ssb_hard,ninco far=inaturalist,textures,openimage_o")
    p.add_argument("--detectors", default=",".join(DEFAULT_DETECTORS),
                   help=f"comma list from {','.join(DETECTORS)} (ash = ASH-B, OpenOOD's; ash_b is taken too), or all")
    for name in ("react", "ash", "ash_s", "scale"):
        p.add_argument(f"--{name.replace('_', '-')}-percentile", type=float, default=None,
                       help="fix this percentile (default: the search with --ood-val, else OpenOOD's default)")
    p.add_argument("--eval-crop-ratio", type=float, default=None,
                   help="Resize(crop / ratio) + CenterCrop(crop): 0.875 = Resize 256 + CenterCrop 224 (DiffAug's "
                        "scripts, torchvision), 1.0 = DeiT-III's; default: the checkpoint's recipe")
    p.add_argument("--interpolation", choices=INTERPOLATIONS, default=None,
                   help="filter of that Resize (DeiT-III: bicubic); default: the checkpoint's recipe")
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


def _named_dirs(flag: str, items: list[str]) -> dict[str, Path]:
    out = {}
    for item in items:
        name, sep, d = item.partition("=")
        if not sep:
            name, d = Path(item).name, item
        if not Path(d).is_dir():
            raise SystemExit(f"{flag} {item}: {d} is not a directory")
        if name in out:
            raise SystemExit(f"{flag}: the name {name!r} is given twice")
        out[name] = Path(d)
    return out


def check_args(a) -> tuple[dict[str, Path], dict[str, Path], dict[str, list[str]], list[str]]:
    """(OOD name -> folder, OOD-val name -> folder, group -> names, detectors) after one-line checks of every
    path and name."""
    if not (a.val or a.imagenet_c or a.ood):
        raise SystemExit("nothing to evaluate: pass --val, --imagenet-c and/or --ood")
    for d in [*a.val, *a.imagenet_c, *([a.ood_id] if a.ood_id else []), *([a.ood_val_id] if a.ood_val_id else [])]:
        if not Path(d).is_dir():
            raise SystemExit(f"{d}: no such directory")
    if a.eval_crop_ratio is not None and not 0 < a.eval_crop_ratio <= 1:
        raise SystemExit(f"--eval-crop-ratio {a.eval_crop_ratio}: must lie in (0, 1] (0.875: Resize 256 + CenterCrop "
                         "224; 1.0: resize to the crop size)")
    for name in ("react", "ash", "ash_s", "scale"):
        p = getattr(a, f"{name}_percentile")
        if p is not None and not 0 <= p < 100:
            raise SystemExit(f"--{name.replace('_', '-')}-percentile {p}: must lie in [0, 100)")
    ood = _named_dirs("--ood", a.ood)
    val_ood = _named_dirs("--ood-val", a.ood_val)
    if (a.ood_val or a.ood_val_id) and not a.ood:
        raise SystemExit("--ood-val / --ood-val-id choose and fit the OOD detectors: give the --ood sets to score")
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
    detectors = list(DETECTORS) if detectors == ["all"] else ["ash" if d == "ash_b" else d for d in detectors]
    detectors = list(dict.fromkeys(detectors))
    bad = [d for d in detectors if d not in DETECTORS]
    if bad or not detectors:
        raise SystemExit(f"--detectors: unknown {', '.join(bad) or '(none given)'}; choose from {', '.join(DETECTORS)}")
    if ood and not (a.ood_id or a.val):
        raise SystemExit("--ood needs in-distribution images: pass --ood-id DIR (or --val)")
    return ood, val_ood, groups, detectors


def check_out(out: Path) -> None:
    """--out is (or can be made) a folder we can write in: checked before any work, not after it."""
    if out.exists() and not out.is_dir():
        raise SystemExit(f"--out {out} is a file: give a folder (created if missing) for the result tables")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test."):
            pass
    except OSError as e:
        raise SystemExit(f"--out {out}: cannot write there ({e.strerror or e}); give a writable folder") from None


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    ood_sets, val_ood, groups, detectors = check_args(a)
    out = Path(a.out)
    check_out(out)
    plan = plan_ood(a.ood_id or a.val[0], ood_sets, a.ood_val_id, val_ood, detectors) if ood_sets else None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, classes, info = load_classifier(a.ckpt, device, a.arch, a.classes)
    if (a.val or a.imagenet_c) and not info["classes_known"]:
        raise SystemExit(f"--ckpt {a.ckpt} is a bare state_dict without class names: pass --classes classes.json "
                         "(the training run's, in the classifier's output order)")
    try:
        fh = features_and_head(model) if plan else None
    except ValueError as e:
        raise SystemExit(f"--ood: {e}") from None
    den = None
    if a.de:
        if a.unet is None:
            raise SystemExit("--de needs --unet CHECKPOINT (DiffAug needs a pretrained diffusion model)")
        try:
            den = df.load_denoiser(a.unet, a.unet_preset, device=device)
        except df.CheckpointError as e:
            raise SystemExit(f"--unet {a.unet}: {e}") from None
    amp = fast_half_dtype(device) if a.amp else None  # None: no native half precision here, float32
    view = eval_geometry(info["crop_size"], a.eval_crop_ratio or info["crop_ratio"],
                         a.interpolation or info["interpolation"])
    given = a.eval_crop_ratio is not None or a.interpolation is not None
    protocol = f"{protocol_text(view)}, {'set by the flags' if given else info['protocol']}"
    print(f"evaluation view (every table below): {protocol}")
    geometry = dict(mean=info["mean"], std=info["std"], num_workers=a.workers, **view)
    kw = dict(batch_size=a.batch_size, backend=a.loader, device=device, denoiser=den, timesteps=DE_TIMESTEPS,
              autocast_dtype=amp, seed=a.seed, **geometry)
    meta = {"ckpt": a.ckpt, "arch": info["arch"], "unet": a.unet, "de_timesteps": list(DE_TIMESTEPS) if den else [],
            "protocol": protocol, "crop_size": view["crop_size"], "resize_size": view["resize_size"],
            "interpolation": view["interpolation"]}

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
        print(f"{d}: top-1 {res['top1']:.2f}%{de} ({res['n']} images, {res['classes']} classes; "
              f"{protocol_text(view)})")
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
        print_corruption_table(d, table, protocol_text(view))
        print_corruption_summary(summaries[d])
    if rows:
        print(f"wrote {out / 'results.csv'} and {out / 'results.json'}")
    ood_rows = run_ood(a, fh, den, kw, plan, groups, detectors, out, meta, write_table) if plan else []
    return {"results": rows, "imagenet_c": summaries, "ood": ood_rows}


def print_corruption_table(name: str, table: list[dict], view: str = "") -> None:
    sevs = sorted({r["severity"] for r in table})
    print(f"{name}: top-1 % by corruption (rows) and severity (columns)" + ("; plain / DE" if "top1_de" in table[0]
                                                                              else "") + (f" [{view}]" if view else ""))
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
