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

DE noise is seeded per image: the view of image i of a folder of N images at t = 50 (k + 1) is drawn from
the Philox stream of --seed at element (k N + i) C H W (``augment``'s seed/offset), so it does not depend on
the batch size, the batch order or the number of processes. Top-1 (--val, --imagenet-c) runs under torchrun
with each folder's images split into contiguous blocks, one per process; the correct counts are summed
over the processes (all_gather), so the tables equal a one-process run's. Rank 0 prints and writes them, with
a progress bar (images/s, ETA) and the UNet calls and time to expect:

    torchrun --nproc-per-node 8 train/eval.py --ckpt last.pt --val imagenet/val --imagenet-c imagenet-c \\
        --unet 256x256_diffusion_uncond.pt --de --out results/
    torchrun --nnodes 2 --node-rank 0 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        train/eval.py ...        (and --node-rank 1 on the second machine; each machine reads the datasets at
                                  the same paths, rank 0 writes --out)

--ood runs in one process (run it without torchrun).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

import diffaug_fast as df

from ..data import scan_dataset
from ..data.base import INTERPOLATIONS
from ..distributed import World, barrier, block_of, gather_objects, init_distributed
from ..hardware import add_precision_argument, precision_name, resolve_precision
from ..io import atomic_write_bytes
from ..ops.augment import augment
from ..train.setup import FAST_UNET
from .ensemble import (
    DE_TIMESTEPS,
    ensemble_probs,
    eval_geometry,
    protocol_text,
    subset_indices,
    summarize_corruptions,
    val_batches,
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
    add_precision_argument(p)
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


def top1_folders(a) -> list[tuple[str, str, str, int | str, Path]]:
    """(flag, dataset, corruption, severity, folder) of every class-folder set to score: each --val, then each
    --imagenet-c tree's <corruption>/<severity>/ folders (the layout is checked here, before any image is
    scored)."""
    jobs = [("--val", d, "", "", Path(d)) for d in a.val]
    for d in a.imagenet_c:
        corruptions = sorted(p for p in Path(d).iterdir() if p.is_dir())
        if not corruptions:
            raise SystemExit(f"--imagenet-c {d}: expected <corruption>/<severity>/<class>/ folders (the ImageNet-C "
                             "layout)")
        for cdir in corruptions:
            sevs = sorted((p for p in cdir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
            if not sevs:
                raise SystemExit(f"--imagenet-c {d}: {cdir}: expected numbered severity folders (1..5)")
            jobs += [("--imagenet-c", d, cdir.name, int(sdir.name), sdir) for sdir in sevs]
    return jobs


def scan_folders(jobs: list, w: World) -> list:
    """The dataset index of each job's folder: rank 0 scans first, the other processes read its scan cache."""
    def scan(job):
        flag, d, *_, folder = job
        try:
            return scan_dataset(folder, progress=False)
        except ValueError as e:
            raise SystemExit(f"{flag} {d}: {str(e).splitlines()[0]}") from None

    first = [scan(j) for j in jobs] if w.is_main else None
    barrier()
    return first if first is not None else [scan(j) for j in jobs]


@torch.no_grad()
def count_correct(model, index, train_classes, w: World, *, denoiser=None, timesteps=DE_TIMESTEPS, seed: int = 0,
                  batch_size: int, backend: str, device, autocast_dtype=None, bar=None, on_batch=None,
                  **geometry) -> dict:
    """This process's block of ``index`` (``block_of``) scored plain and, with a denoiser, by DiffAug Ensemble
    (``ensemble.evaluate``'s protocol); returns integer counts {"n", "plain", "de", "by_t": {t: count}}.

    The noise of image i (of the whole folder) at the (k + 1)-th t > 0 is Philox (seed, (k N + i) C H W): a
    batch of consecutive images is one augment call per t, and the counts summed over any split of the
    folder equal one process's. ``on_batch(images)`` is called after each batch (the estimate)."""
    class_idx = subset_indices(index.classes, train_classes)
    use_de = denoiser is not None and len(timesteps) > 1
    ts = list(timesteps) if use_de else [0]
    ts = ts if ts[0] == 0 else [0, *ts]  # the plain prediction is always reported
    members = [i for i, t in enumerate(ts) if not use_de or t in timesteps]
    norm = {k: geometry[k] for k in ("mean", "std") if k in geometry}
    counts = {"n": 0, "plain": 0, "de": 0, "by_t": {ts[i]: 0 for i in members} if use_de else {}}
    block = block_of(len(index), w)
    if not block:
        return counts
    model.eval()
    first = block.start
    for x, y in val_batches(index.subset(block), batch_size=batch_size, backend=backend, device=torch.device(device),
                            **geometry):
        numel = x[0].numel()
        views = []
        for k, t in enumerate(ts):
            offset = ((k - 1) * len(index) + first) * numel  # k - 1: slot 0 is t = 0 (no noise)
            view = x if t == 0 else augment(x, denoiser, t=t, seed=seed, offset=offset, **norm)
            views.append(ensemble_probs(model, view, None, timesteps=[0], class_idx=class_idx,
                                        autocast_dtype=autocast_dtype)[0])
        probs = torch.stack(views)
        y = y.to(probs.device)
        counts["plain"] += int((probs[0].argmax(1) == y).sum())
        counts["de"] += int((probs[members].mean(0).argmax(1) == y).sum())
        if use_de:  # each member view alone
            for i, c in zip(members, (probs[members].argmax(2) == y).sum(1).tolist(), strict=True):
                counts["by_t"][ts[i]] += c
        counts["n"] += len(y)
        first += len(y)
        if bar is not None:
            bar.update(len(y))
        if on_batch is not None:
            on_batch(len(y))
    return counts


def top1_of(counts: list[dict], n_classes: int) -> dict:
    """The processes' counts summed into ``ensemble.evaluate``'s result: n, top1 (%), and with DE top1_de and
    top1_by_t."""
    n = sum(c["n"] for c in counts)
    if n == 0:
        raise ValueError("evaluation saw no images")
    res = {"n": n, "top1": 100.0 * sum(c["plain"] for c in counts) / n}
    if counts[0]["by_t"]:
        res["top1_de"] = 100.0 * sum(c["de"] for c in counts) / n
        res["top1_by_t"] = {int(t): 100.0 * sum(c["by_t"][t] for c in counts) / n for t in counts[0]["by_t"]}
    res["classes"] = n_classes
    return res


class _Estimate:
    """Rank 0's time estimate from the second batch (the first pays for warm-up), all processes assumed alike."""

    def __init__(self, total: int, procs: int, say):
        self.total, self.procs, self.say, self.batches, self.t = total, procs, say, 0, time.perf_counter()

    def __call__(self, images: int) -> None:
        now = time.perf_counter()
        self.batches += 1
        if self.batches == 2:
            rate = images / max(now - self.t, 1e-9)
            self.say(f"\n  estimate from the second batch: {rate:.1f} images/s per process, about "
                     f"{self.total / rate / self.procs / 60:.1f} min for all {self.total:,} images")
        self.t = now


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    ood_sets, val_ood, groups, detectors = check_args(a)
    w = init_distributed()
    say = print if w.is_main else (lambda *args, **kw: None)
    if ood_sets and w.size > 1:
        raise SystemExit(f"--ood runs in one process, this is process {w.rank} of {w.size}: run the OOD tables "
                         "without torchrun (--val and --imagenet-c are split across torchrun's processes)")
    out = Path(a.out)
    if w.is_main:
        check_out(out)
    plan = plan_ood(a.ood_id or a.val[0], ood_sets, a.ood_val_id, val_ood, detectors) if ood_sets else None
    jobs = top1_folders(a)
    indexes = scan_folders(jobs, w)
    device = w.device
    amp = resolve_precision(a.precision, device)  # None: float32
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
            # the training's fast UNet (eps rows only, fused GroupNorm+SiLU on CPU): DE needs only eps; the
            # default options ran DE at 0.82x the bare forward, these at ~0.95x (bench/bench_paths.py)
            den = df.load_denoiser(a.unet, a.unet_preset, device=device, dtype=amp or torch.float32, **FAST_UNET)
        except df.CheckpointError as e:
            raise SystemExit(f"--unet {a.unet}: {e}") from None
    view = eval_geometry(info["crop_size"], a.eval_crop_ratio or info["crop_ratio"],
                         a.interpolation or info["interpolation"])
    given = a.eval_crop_ratio is not None or a.interpolation is not None
    protocol = f"{protocol_text(view)}, {'set by the flags' if given else info['protocol']}"
    say(f"evaluation view (every table below): {protocol}; precision {precision_name(amp)} ({a.precision})")
    geometry = dict(mean=info["mean"], std=info["std"], num_workers=a.workers, **view)
    kw = dict(batch_size=a.batch_size, backend=a.loader, device=device, denoiser=den, timesteps=DE_TIMESTEPS,
              autocast_dtype=amp, seed=a.seed, **geometry)
    meta = {"ckpt": a.ckpt, "arch": info["arch"], "unet": a.unet, "de_timesteps": list(DE_TIMESTEPS) if den else [],
            "protocol": protocol, "crop_size": view["crop_size"], "resize_size": view["resize_size"],
            "interpolation": view["interpolation"], "precision": precision_name(amp)}

    rows, summaries = [], {}

    def flush():
        write_table(rows, TOP1_FIELDS, {**meta, "imagenet_c": summaries}, out / "results")

    total = sum(len(ix) for ix in indexes)
    if jobs:
        calls = f"{total:,} x {len(DE_TIMESTEPS) - 1} = {total * (len(DE_TIMESTEPS) - 1):,} UNet calls (DE)" if den \
            else "no UNet calls (no --de)"
        say(f"top-1 of {total:,} images in {len(jobs)} folder(s), {w.size} process(es): {calls}; time: estimated "
            "after the second batch")
    mine = sum(len(block_of(len(ix), w)) for ix in indexes)
    bar = tqdm(total=mine, unit="img", desc="top-1" + (f" (rank 0 of {w.size})" if w.size > 1 else ""),
               disable=not w.is_main or not jobs)
    estimate = _Estimate(total, w.size, say)
    tables: dict[str, list[dict]] = {d: [] for d in a.imagenet_c}
    for j, ((flag, d, corruption, severity, folder), index) in enumerate(zip(jobs, indexes, strict=True)):
        bar.set_postfix_str(str(folder)[-40:], refresh=False)
        try:
            counts = count_correct(model, index, classes, w, bar=bar, on_batch=estimate, **kw)
            res = top1_of(gather_objects(counts), len(index.classes))
        except ValueError as e:
            raise SystemExit(f"{flag} {d}: {str(e).splitlines()[0]}") from None
        rows.append({"dataset": d, "corruption": corruption, "severity": severity, **res})
        if w.is_main:
            flush()
        if flag == "--val":
            de = f", DE {res['top1_de']:.2f}%" if "top1_de" in res else ""
            say(f"{d}: top-1 {res['top1']:.2f}%{de} ({res['n']} images, {res['classes']} classes; "
                f"{protocol_text(view)})")
            continue
        tables[d].append({"corruption": corruption, "severity": severity, **res})
        if jobs[j + 1:j + 2] and jobs[j + 1][:2] == (flag, d):
            continue  # more folders of this tree to come
        summaries[d] = summarize_corruptions(tables[d])
        if w.is_main:
            flush()
            bar.clear()
            print_corruption_table(d, tables[d], protocol_text(view))
            print_corruption_summary(summaries[d])
    bar.close()
    if rows:
        say(f"wrote {out / 'results.csv'} and {out / 'results.json'}")
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
