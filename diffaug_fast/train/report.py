"""What a finished run reports (the engine's default ``Recipe.final_report``): DiffAug Ensemble accuracy,
the corrupted split, baseline-vs-DiffAug step timing and a picture of the DiffAug views."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch

from ..constants import IMAGENET_MEAN, IMAGENET_STD
from ..data import build_loader
from ..eval.ensemble import DE_TIMESTEPS, evaluate_corruptions, evaluate_folder, protocol_text
from ..eval.ood import demo_auroc_line
from ..eval.smoothing import demo_certify_line
from ..ops.augment import augment
from ..ops.fused import to_unit
from ..viz import save_grid
from .demo import demo_psnr_report
from .step import DiffAugPlan, StepParts, step_generator, train_step

__all__ = ["final_report", "bench_steps", "first_of_each_class", "GRID_TS"]

GRID_TS = (0, 100, 250, 500, 750, 999)


def final_report(tr) -> dict:
    """tr: the finished :class:`diffaug_fast.train.engine.Trainer` (rank 0)."""
    s, say, den, dev = tr.s, tr.say, tr.den, tr.device
    common = dict(batch_size=tr.per_rank, backend=s.loader, device=dev, autocast_dtype=tr.amp_dtype,
                  num_workers=s.workers, **tr.eval_geometry)
    out: dict = {"eval_view": protocol_text(tr.eval_geometry)}
    say(f"evaluation view (val and corrupted val below): {out['eval_view']}")
    if s.de_eval and den is not None:
        res = evaluate_folder(tr.model, tr.val_index, tr.classes, denoiser=den, timesteps=DE_TIMESTEPS, **common)
        say(f"val top-1: plain {res['top1']:.2f}%, DiffAug Ensemble {res['top1_de']:.2f}% "
            f"(t in {list(DE_TIMESTEPS)}, {res['n']} images)")
        out["val"] = res
    val_c = (None if s.val_c == "none" else Path(s.val_c) if s.val_c else
             tr.root / "val-c" if (tr.root / "val-c").is_dir() else None)
    if val_c is not None:
        table = evaluate_corruptions(tr.model, val_c, tr.classes, denoiser=den if s.de_eval else None, **common)
        say(accuracy_table(out.get("val"), table, val_c))
        out["val_c"] = table
    if tr.demo:
        out |= demo_extras(tr, common)
    if s.bench_steps:
        out["bench"] = bench_steps(tr)
    images = first_of_each_class(tr.val_index, dict(tr.geometry, num_workers=s.workers), s.loader)
    if images is not None and den is not None:
        g = torch.Generator(device=dev).manual_seed(s.seed)
        unit = to_unit(images.to(dev), IMAGENET_MEAN, IMAGENET_STD)
        cols = [unit] + [augment(unit, den, t=t, generator=g) for t in GRID_TS]
        path = save_grid(cols, tr.run_dir / "diffaug_views.png", col_labels=["clean"] + [f"t={t}" for t in GRID_TS],
                         row_labels=[tr.classes[i] for i in range(len(cols[0]))],
                         title=f"DiffAug views, UNet {den.name}")
        say(f"wrote {path}")
        out["grid"] = str(path)
    return out


def accuracy_table(val: dict | None, corrupted: list[dict], val_c: Path) -> str:
    """Plain vs DiffAug Ensemble top-1 on the clean val split and on each corrupted copy, one row each, with
    the DE - plain difference (its sign is the direction of the effect; n is the images per row)."""
    rows = ([("clean val", val)] if val else []) + [(f"{r['corruption']} (severity {r['severity']})", r)
                                                     for r in corrupted]
    de = any("top1_de" in r for _, r in rows)
    lines = [f"top-1 (%) on val and its corrupted copies in {val_c}:",
             f"  {'split':<28}{'plain':>8}" + (f"{'DE':>8}{'DE-plain':>10}" if de else "") + f"{'n':>6}"]
    for name, r in rows:
        line = f"  {name:<28}{r['top1']:>8.2f}"
        if de:
            line += f"{r['top1_de']:>8.2f}{r['top1_de'] - r['top1']:>+10.2f}"
        lines.append(line + f"{r['n']:>6}")
    by_t = (val or {}).get("top1_by_t")
    if by_t:
        lines.append("  DE's members on clean val, top-1 of each single view by t: "
                     + ", ".join(f"{t}: {acc:.2f}" for t, acc in by_t.items()))
    return "\n".join(lines)


def demo_extras(tr, common: dict) -> dict:
    """The embedded demo's other tables: the denoiser's one-step PSNR, one OOD line (val vs the never-trained
    ood/ shapes) and one certified-accuracy line (denoised smoothing, a few images, small n)."""
    s, say, out = tr.s, tr.say, {}
    if s.unet and tr.demo_unet:
        out["psnr"] = demo_psnr_report(s.unet, tr.root, say=say)
    geo = dict(crop_size=s.image_size, resize_size=s.resize_size, device=tr.device, num_workers=0)
    if (tr.root / "ood").is_dir():
        out["ood"] = demo_auroc_line(tr.model, tr.root, **geo)
        say(out["ood"])
    out["certify"] = demo_certify_line(tr.model, tr.root, denoiser=tr.den, **geo)
    say(out["certify"])
    return out


def first_of_each_class(val_index, geometry, backend, limit: int = 6) -> torch.Tensor | None:
    """Up to ``limit`` val images (normalized, one per class, by label) for the picture."""
    picks, seen = [], set()
    for i, y in enumerate(val_index.labels):
        if y not in seen:
            seen.add(y)
            picks.append(i)
        if len(picks) == limit:
            break
    loader = build_loader(val_index.subset(picks), "val", batch_size=len(picks), backend=backend, output="float",
                          channels_last=False, **geometry)
    for batch in loader:
        return batch["image"][torch.argsort(batch["label"])]
    return None


def bench_steps(tr) -> dict:
    """Time a few steps baseline (clean only) vs DiffAug online on throwaway copies of the model."""
    s, dev = tr.s, tr.device
    batch = next(iter(tr.loader))
    res = {}
    for mode in ("baseline", "diffaug"):
        m = copy.deepcopy(tr.model)
        o = torch.optim.SGD(m.parameters(), lr=0.0, momentum=0.9)
        sc = torch.amp.GradScaler(dev.type, enabled=tr.amp_dtype == torch.float16)
        b = batch["clean"].shape[0]
        buf = torch.empty((2 + tr.recipe.num_extra_views) * b, *batch["clean"].shape[1:], device=dev,
                          memory_format=torch.channels_last)
        d = tr.den if mode == "diffaug" else None
        parts = StepParts(m, o, sc, buf, dev, tr.amp_dtype, DiffAugPlan.of(s, d), tr.recipe)
        times = []
        for i in range(s.bench_steps + 1):
            g = step_generator(s.seed, 10**6, i, 0, dev)
            t0 = time.perf_counter()
            train_step(parts, batch, g)[0].item()
            times.append(time.perf_counter() - t0)
        res[mode] = b / (sum(times[1:]) / s.bench_steps)
    tr.say(f"throughput (clean images/s, {s.bench_steps} timed steps): baseline {res['baseline']:.1f}, "
           f"DiffAug online {res['diffaug']:.1f} ({res['diffaug'] / res['baseline']:.2f}x baseline)")
    return res
