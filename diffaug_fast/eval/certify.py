"""Certified L2 accuracy of a classifier checkpoint by randomized smoothing (Cohen et al. 2019), with
diffusion denoised smoothing (Carlini et al. 2023) when --unet is given: the paper's certified table.

    python train/certify.py --ckpt runs/vit/last.pt --data imagenet/val --sigma 0.25 0.5 1.0 \\
        --n0 100 --n 10000 --alpha 0.001 --skip 50 --unet 256x256_diffusion_uncond.pt --out certify/

Every --skip-th image of the class-folder dataset --data is certified once per sigma (CERTIFY with n0
selection and n estimation samples, Clopper-Pearson at level alpha). One line per image is appended to
<out>/sigma_<s>.tsv (idx, label, predict, radius, correct, time) and flushed: rerun the same command
after an interruption and finished images are skipped (the noise of each image depends only on its
index, so the result equals an uninterrupted run). At the end <out>/certified_accuracy.{csv,json,png}
hold certified accuracy at radii 0, 0.5, ..., 3.0 per sigma and the best sigma per radius.
Cost: images x (n0 + n) classifier calls per sigma, and as many UNet calls with --unet.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import diffaug_fast as df

from ..data import scan_dataset
from ..hardware import fast_half_dtype
from ..io import atomic_write_bytes
from ..runs import RunError, open_run
from .ensemble import val_batches
from .models import load_classifier, with_normalization
from .smoothing import RADII, Smooth, certified_accuracy

HEADER = "idx\tlabel\tpredict\tradius\tcorrect\ttime\n"
SETTINGS_KEYS = ("ckpt", "unet", "n0", "n", "alpha", "skip", "max", "seed")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--arch", default=None)
    p.add_argument("--classes", default=None)
    p.add_argument("--data", required=True, help="class-folder dataset (e.g. ImageNet val)")
    p.add_argument("--sigma", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    p.add_argument("--n0", type=int, default=100)
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--alpha", type=float, default=0.001)
    p.add_argument("--skip", type=int, default=50, help="certify every skip-th image")
    p.add_argument("--max", type=int, default=None, help="at most this many images")
    p.add_argument("--batch-size", type=int, default=400, help="noisy copies per classifier/UNet call")
    p.add_argument("--unet", default=None, help="diffusion checkpoint: denoised smoothing (else plain smoothing)")
    p.add_argument("--unet-preset", default=None)
    p.add_argument("--amp", action="store_true", help="classifier and UNet in half precision (GPU)")
    p.add_argument("--loader", default="auto")
    p.add_argument("--workers", type=int, default=2, help="decoding threads/processes (0: in the main process)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="certify_out")
    p.add_argument("--overwrite", action="store_true", help="discard results made with other settings")
    a = p.parse_args(argv)
    bad = [s for s in a.sigma if not s > 0]
    if bad:
        raise SystemExit(f"--sigma {bad[0]}: the noise level must be > 0 (pixel std in [0, 1] units, e.g. 0.25 0.5 1.0)")
    if a.n < 1 or a.n0 < 1 or a.n0 > a.n:
        raise SystemExit(f"--n0 {a.n0} --n {a.n}: need 1 <= n0 <= n (n0 samples pick the class, n certify it)")
    if not 0 < a.alpha < 0.5:
        raise SystemExit(f"--alpha {a.alpha}: must lie in (0, 0.5), e.g. 0.001")
    if a.skip < 1 or a.batch_size < 1 or (a.max is not None and a.max < 1):
        raise SystemExit("--skip, --batch-size and --max must be positive")
    return a


def tsv_path(out: Path, sigma: float) -> Path:
    return out / f"sigma_{sigma:g}.tsv"


def read_tsv(path: Path) -> dict[int, dict]:
    """Finished images of one sigma: idx -> row. A torn last line (killed mid-write) is ignored."""
    rows = {}
    if not path.exists():
        return rows
    for line in path.read_text().splitlines()[1:]:
        f = line.split("\t")
        if len(f) != 6:
            continue
        try:
            rows[int(f[0])] = {"label": int(f[1]), "predict": int(f[2]), "radius": float(f[3]),
                               "correct": int(f[4]), "time": float(f[5])}
        except ValueError:
            continue
    return rows


def check_settings(out: Path, settings: dict, overwrite: bool) -> None:
    """Refuse to mix certificates made with other settings into the same TSVs (unless --overwrite)."""
    path = out / "settings.json"
    if path.exists():
        old = json.loads(path.read_text())
        diff = [k for k in SETTINGS_KEYS if old.get(k) != settings.get(k)]
        if diff and not overwrite:
            raise SystemExit(f"{out} holds certificates made with other settings ({', '.join(diff)}: "
                             f"{[old.get(k) for k in diff]} -> {[settings.get(k) for k in diff]}); "
                             "pass --overwrite to discard them, or another --out")
        if diff:
            for p in out.glob("sigma_*.tsv"):
                p.unlink()
    atomic_write_bytes(json.dumps(settings, indent=1).encode(), path)


def certify_sigma(smooth: Smooth, index, picks: list[int], path: Path, a, loader_kw: dict) -> None:
    done = read_tsv(path)
    todo = [i for i in picks if i not in done]
    if done:
        print(f"sigma {smooth.sigma:g}: {len(done)} images already certified in {path}, {len(todo)} to go")
    if not todo:
        return
    numel = 3 * loader_kw["crop_size"] ** 2
    with open(path, "a") as f:
        if f.tell() == 0:
            f.write(HEADER)
        elif not path.read_text().endswith("\n"):
            f.write("\n")  # end a line torn by a kill, so the next record starts cleanly
        bar = tqdm(total=len(todo), desc=f"sigma {smooth.sigma:g}")
        it = iter(todo)
        for x, y in val_batches(index.subset(todo), **loader_kw):
            for xi, yi in zip(x, y.tolist(), strict=True):
                idx = next(it)
                smooth.offset = idx * (a.n0 + a.n) * numel  # this image's noise depends only on idx
                t0 = time.perf_counter()
                label, radius = smooth.certify(xi, a.n0, a.n, a.alpha, a.batch_size)
                dt = time.perf_counter() - t0
                f.write(f"{idx}\t{yi}\t{label}\t{radius:.4f}\t{int(label == yi)}\t{dt:.3f}\n")
                f.flush()
                os.fsync(f.fileno())
                bar.update(1)
        bar.close()


def write_table(out: Path, sigmas: list[float]) -> dict:
    per = {}
    for s in sigmas:
        rows = list(read_tsv(tsv_path(out, s)).values())
        per[f"{s:g}"] = {"n_images": len(rows), "accuracy": certified_accuracy([r["radius"] for r in rows],
                                                                               [r["correct"] for r in rows])}
    acc = np.array([v["accuracy"] for v in per.values()])  # [sigmas, radii]
    best = np.nanmax(acc, 0)
    best_sigma = [list(per)[int(np.nanargmax(col))] for col in acc.T]
    table = {"radii": list(RADII), "per_sigma": per, "best": best.tolist(), "best_sigma": best_sigma}
    lines = ["sigma,n_images," + ",".join(f"r={r:g}" for r in RADII)]
    lines += [f"{s},{v['n_images']}," + ",".join(f"{100 * x:.2f}" for x in v["accuracy"]) for s, v in per.items()]
    lines.append("best,," + ",".join(f"{100 * x:.2f}" for x in best))
    lines.append("best_sigma,," + ",".join(best_sigma))
    atomic_write_bytes(("\n".join(lines) + "\n").encode(), out / "certified_accuracy.csv")
    atomic_write_bytes(json.dumps(table, indent=1).encode(), out / "certified_accuracy.json")
    plot(table, out / "certified_accuracy.png")
    print("certified top-1 % at L2 radius " + " ".join(f"{r:>6g}" for r in RADII))
    for line in lines[1:-1]:
        s, _, *vals = line.split(",")
        print(f"  sigma {s:<24}" + " ".join(f"{v:>6}" for v in vals))
    return table


def plot(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for s, v in table["per_sigma"].items():
        ax.plot(table["radii"], [100 * x for x in v["accuracy"]], marker="o", label=f"sigma = {s}")
    ax.plot(table["radii"], [100 * x for x in table["best"]], "k--", label="best sigma per radius")
    ax.set(xlabel="L2 radius", ylabel="certified accuracy (%)", ylim=(0, 100))
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    if not Path(a.data).is_dir():
        raise SystemExit(f"--data {a.data}: no such directory")
    try:
        index = scan_dataset(a.data, progress=False)
    except ValueError as e:
        raise SystemExit(f"--data {a.data}: {str(e).splitlines()[0]}") from None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, classes, info = load_classifier(a.ckpt, device, a.arch, a.classes)
    if not info["classes_known"]:
        raise SystemExit(f"--ckpt {a.ckpt} is a bare state_dict without class names: pass --classes classes.json")
    if index.classes != classes:
        unknown = [c for c in index.classes if c not in classes]
        raise SystemExit(f"--data {a.data} has {len(index.classes)} classes, the classifier {len(classes)}"
                         + (f" ({unknown[0]!r} is not among them)" if unknown else "")
                         + ": certify on a dataset with the training classes, in the training order")
    amp = fast_half_dtype(device) if a.amp else None
    den = None
    if a.unet is not None:
        try:
            den = df.load_denoiser(a.unet, a.unet_preset, device=device, dtype=amp or torch.float32)
        except df.CheckpointError as e:
            raise SystemExit(f"--unet {a.unet}: {e}") from None
    picks = list(range(0, len(index), a.skip))[: a.max]
    out = Path(a.out)
    try:
        run = open_run(out)  # locks the folder; refuses a training run's folder
    except RunError as e:
        raise SystemExit(str(e)) from None
    settings = {"ckpt": str(a.ckpt), "unet": a.unet, "n0": a.n0, "n": a.n, "alpha": a.alpha, "skip": a.skip,
                "max": a.max, "seed": a.seed, "data": str(a.data), "arch": info["arch"]}
    check_settings(out, settings, a.overwrite)
    calls = len(picks) * (a.n0 + a.n)
    print(f"certifying {len(picks)} images of {a.data} at sigma {', '.join(f'{s:g}' for s in a.sigma)}: "
          f"{calls:,} classifier calls per sigma" + (f" and as many UNet calls ({den.name})" if den else
                                                     " (plain randomized smoothing: no --unet)"))
    classifier = with_normalization(model, info["mean"], info["std"])
    loader_kw = dict(batch_size=8, backend=a.loader, device=device, crop_size=info["crop_size"],
                     resize_size=info["resize_size"], mean=(0.0,) * 3, std=(1.0,) * 3,  # [0, 1] images
                     num_workers=a.workers)
    for sigma in a.sigma:
        # the Philox key depends on (seed, sigma) only, so a rerun with another --sigma list keeps each TSV valid
        smooth = Smooth(classifier, len(classes), sigma, den, seed=a.seed * 100_003 + round(sigma * 1e4),
                        autocast_dtype=amp)
        if den is not None:
            print(f"sigma {sigma:g}: denoising at t* = {smooth.t} (first t with sqrt((1-abar)/abar) >= {2 * sigma:g})")
        certify_sigma(smooth, index, picks, tsv_path(out, sigma), a, loader_kw)
    table = write_table(out, list(a.sigma))
    run.close()
    print(f"wrote {out / 'certified_accuracy.csv'}, .json and .png")
    return table


if __name__ == "__main__":
    main()
