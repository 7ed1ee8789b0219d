"""Certified L2 accuracy of a classifier checkpoint by randomized smoothing (Cohen et al. 2019), with
diffusion denoised smoothing (Carlini et al. 2023) when --unet is given: the paper's certified table.

    python train/certify.py --ckpt runs/vit/last.pt --data imagenet/val --sigma 0.25 0.5 1.0 \\
        --unet 256x256_diffusion_uncond.pt --out certify/

The defaults are Cohen et al.'s ImageNet protocol (locuslab/smoothing: CERTIFY with N0 = 100, N = 100,000,
alpha = 0.001, every 100th val image); ``--n 10000 --skip 50`` is the ImageNet command of Carlini et al.'s
README (ethz-spylab/diffusion_denoised_smoothing), ten times cheaper per image, with a smaller largest
certifiable radius (3.20 sigma instead of 3.81 sigma at alpha 0.001, printed before the run).

Every --skip-th image of the class-folder dataset --data is certified once per sigma (CERTIFY with n0
selection and n estimation samples, Clopper-Pearson at level alpha). One line per image is appended to
<out>/sigma_<s>.tsv (idx, label, predict, radius, correct, time) and fsynced: rerun the same command
after an interruption and finished images are skipped (the noise of each image depends only on its
index, so the result equals an uninterrupted run). <out>/settings.json records what the certificates
depend on (checkpoint and UNet sha256, the dataset's file list and content, n0, n, alpha, ...): a rerun that
differs in any of them, or a TSV it does not list, is refused unless --overwrite. At the end
<out>/certified_accuracy.{csv,json,png} hold certified accuracy at radii 0, 0.5, ..., 3.0 per sigma and the
best sigma per radius. Cost: images x (n0 + n) classifier calls per sigma, and as many UNet calls with --unet.

On several GPUs or machines the images are split across torchrun processes (one per GPU, or CPU processes
over gloo), each appending to its own <out>/sigma_<s>.rank<k>.tsv; rank 0 merges them into sigma_<s>.tsv in
image order when every process is done. The certificates equal a one-process run's (each image's noise
depends only on the seed, sigma and the image's index), a SIGKILL of any process followed by the same command
loses nothing, and a rerun may use another number of processes:

    torchrun --nproc-per-node 8 train/certify.py --ckpt last.pt --data imagenet/val --unet unet.pt --out cert/
    torchrun --nnodes 2 --node-rank 0 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        train/certify.py ... --out /shared/cert/        (and --node-rank 1 on the second machine)

With --nnodes > 1, --out must be a folder every machine sees (a shared file system); a process that does not
see rank 0's settings.json there stops with a message. The unfinished images of each sigma are dealt out
round-robin when the run starts, so a resumed run keeps every process busy.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import diffaug_fast as df

from ..bank import unet_gflops
from ..data import scan_dataset
from ..distributed import World, barrier, broadcast_object, init_distributed
from ..hardware import add_precision_argument, precision_name, resolve_precision
from ..io import atomic_write_bytes
from ..runs import RunError, open_run
from .certify_files import (
    HEADER,
    append_record,
    check_folder,
    cut_torn_tail,
    discard_results,
    merge_ranks,
    rank_tsv_path,
    read_done,
    read_tsv,
    run_settings,
    tsv_path,
)
from .ensemble import val_batches
from .models import load_classifier, with_normalization
from .smoothing import RADII, Smooth, certified_accuracy, max_certifiable_radius

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
PROBE_VIEWS = 32  # noisy views in the timed probe batch (at most --batch-size)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="classifier: our checkpoint, or a torchvision/timm state_dict")
    p.add_argument("--arch", default=None, help="architecture of a bare state_dict (e.g. resnet50)")
    p.add_argument("--classes", default=None, help="classes.json for a bare state_dict")
    p.add_argument("--data", required=True, help="class-folder dataset (e.g. ImageNet val)")
    p.add_argument("--sigma", type=float, nargs="+", default=[0.25, 0.5, 1.0],
                   help="noise levels (pixel std in [0, 1] units); one TSV each")
    p.add_argument("--n0", "--N0", dest="n0", type=int, default=100, help="samples that select the class (Cohen's N0)")
    p.add_argument("--n", "--N", dest="n", type=int, default=100_000,
                   help="samples that certify it (Cohen's N; --N also passes through torchrun, which takes --n "
                        "for its own --nnodes/--nproc-per-node)")
    p.add_argument("--alpha", type=float, default=0.001, help="failure probability of each certificate")
    p.add_argument("--skip", type=int, default=100, help="certify every skip-th image (100: 500 of ImageNet val)")
    p.add_argument("--max", type=int, default=None, help="at most this many images")
    p.add_argument("--batch-size", "--batch", dest="batch_size", type=int, default=400,
                   help="noisy copies per classifier/UNet call (memory is flat in n)")
    p.add_argument("--unet", default=None, help="diffusion checkpoint: denoised smoothing (else plain smoothing)")
    p.add_argument("--unet-preset", default=None, help="architecture preset of --unet (default: inferred)")
    add_precision_argument(p)
    p.add_argument("--loader", default="auto", help="image decoding: auto, dali or torch")
    p.add_argument("--workers", type=int, default=2, help="decoding threads/processes (0: in the main process)")
    p.add_argument("--seed", type=int, default=0, help="noise key: the same seed repeats every certificate")
    p.add_argument("--out", default="certify_out", help="folder of the TSVs, settings.json and the table")
    p.add_argument("--overwrite", action="store_true", help="discard results made with other settings")
    a = p.parse_args(argv)
    bad = [s for s in a.sigma if not (math.isfinite(s) and s > 0)]
    if bad:
        raise SystemExit(f"--sigma {bad[0]}: the noise level must be > 0 and finite (pixel std in [0, 1] units, "
                         "e.g. 0.25 0.5 1.0)")
    if a.n < 1 or a.n0 < 1 or a.n0 > a.n:
        raise SystemExit(f"--n0 {a.n0} --n {a.n}: need 1 <= n0 <= n (n0 samples pick the class, n certify it)")
    if not 0 < a.alpha < 0.5:
        raise SystemExit(f"--alpha {a.alpha}: must lie in (0, 0.5), e.g. 0.001")
    if a.skip < 1 or a.batch_size < 1 or (a.max is not None and a.max < 1):
        raise SystemExit("--skip, --batch-size and --max must be positive")
    return a


@contextlib.contextmanager
def _full_disk_exits(folder: Path, doing: str, kept: str):
    """A full disk (ENOSPC, EDQUOT) inside the block becomes one line: what was being done, what is kept, and
    that rerunning the same command continues; other OS errors pass."""
    try:
        yield
    except OSError as e:
        if e.errno not in NO_SPACE:
            raise
        raise SystemExit(f"no space left on the device of {folder} {doing}: {kept}; free space and rerun the same "
                         "command to continue") from None


def _write_or_exit(data: bytes, path: Path, kept: str) -> None:
    with _full_disk_exits(path.parent, f"writing {path.name}", kept):
        atomic_write_bytes(data, path)


# ---------------------------------------------------------------------------------------------------- certifying


def certify_sigma(smooth: Smooth, index, todo: list[int], path: Path, a, loader_kw: dict, show: bool = True) -> None:
    """Certify the images ``todo`` at ``smooth.sigma``, appending one fsynced TSV line each; a progress bar
    (images/s, ETA) when ``show`` (torchrun's rank 0). Image idx's noise is the Philox stream (seed, sigma) from
    element idx * (n0 + n) * C * H * W on: the same in every batch order and any number of processes."""
    if not todo:
        return
    cut_torn_tail(path)
    numel = 3 * loader_kw["crop_size"] ** 2
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    bar = tqdm(total=len(todo), desc=f"sigma {smooth.sigma:g}", unit="img", disable=not show)
    idx = None
    try:
        if os.fstat(fd).st_size == 0:
            append_record(fd, HEADER)
        it = iter(todo)
        for x, y in val_batches(index.subset(todo), **loader_kw):
            for xi, yi in zip(x, y.tolist(), strict=True):
                idx = next(it)
                smooth.offset = idx * (a.n0 + a.n) * numel  # this image's noise depends only on idx
                t0 = time.perf_counter()
                label, radius = smooth.certify(xi, a.n0, a.n, a.alpha, a.batch_size)
                dt = time.perf_counter() - t0
                append_record(fd, f"{idx}\t{yi}\t{label}\t{radius:.4f}\t{int(label == yi)}\t{dt:.3f}\n")
                bar.update(1)
    except OSError as e:
        if e.errno not in NO_SPACE:
            raise
        where = f"image {idx}" if idx is not None else "the header"
        raise SystemExit(f"no space left on the device of {path.parent} while appending {where} to {path.name}: "
                         f"every image certified before it is kept ({bar.n} in this run; a torn last line is cut "
                         "on the next run); free space and rerun the same command to continue") from None
    finally:
        os.close(fd)
        bar.close()


def probe(classifier, num_classes: int, den, sigma: float, crop: int, device, amp, views: int) -> float:
    """Run the whole pipeline (noise, UNet, classifier) on a mid-grey crop x crop image before anything is
    written, so a UNet or classifier that cannot take the classifier's crop, or a head of another size, is one
    line instead of a traceback after the TSV header. Returns views/s of one timed batch (warm-up excluded)."""
    smooth = Smooth(classifier, num_classes, sigma, den, autocast_dtype=amp)
    x = torch.full((3, crop, crop), 0.5, device=device)
    try:
        smooth._sample_counts(x, 1, 1)  # warm-up: first-call allocations, cudnn autotuning
        t0 = time.perf_counter()
        smooth._sample_counts(x, views, views)  # ends with .cpu(): synchronized
    except Exception as e:  # whatever the model raises (RuntimeError, timm's AssertionError on a fixed size, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise SystemExit(f"certification fails on a {crop}x{crop} image (the classifier's crop): "
                         f"{type(e).__name__}: {first[:300]}") from None
    return views / max(time.perf_counter() - t0, 1e-9)


def say_plan(a, picks: list[int], todo: dict[float, list[int]], den, crop: int, rate: float, views: int,
             procs: int = 1) -> None:
    """Before the run: the protocol, the largest radius n can certify, and the calls and time left (at the
    probe's rate in each of ``procs`` processes)."""
    per = a.n0 + a.n
    print(f"certifying {len(picks)} images of {a.data} (--skip {a.skip}) at sigma "
          f"{', '.join(f'{s:g}' for s in a.sigma)}: n0 = {a.n0:,}, n = {a.n:,}, alpha = {a.alpha:g}")
    caps = {s: max_certifiable_radius(s, a.n, a.alpha) for s in a.sigma}
    print(f"largest certifiable radius at n = {a.n:,}, alpha = {a.alpha:g}: {caps[a.sigma[0]] / a.sigma[0]:.2f} sigma = "
          + ", ".join(f"{r:.2f} (sigma {s:g})" for s, r in caps.items())
          + "; larger radii are never certified, whatever the classifier")
    left = sum(len(v) for v in todo.values())
    calls = left * per
    what = "plain randomized smoothing: no --unet" if den is None else f"and as many UNet calls ({den.name})"
    print(f"{left} of {len(picks) * len(a.sigma)} (image, sigma) certificates to go: {calls:,} classifier calls ({what})"
          f" = {left} x (n0 + n = {per:,})")
    if den is not None and calls:
        g = unet_gflops(den, crop)
        print(f"  UNet at {crop}x{crop}: {g:.2f} GFLOP per call = {g * calls / 1e6:.3f} PFLOP in total")
    if calls:
        many = f" in each of {procs} processes (images split across them)" if procs > 1 else ""
        print(f"  about {calls / rate / procs / 3600:.2f} h at the {rate:.1f} noisy views/s of a probe batch of {views}"
              f"{many} (--batch-size {a.batch_size} runs faster per view on a GPU)")


# ---------------------------------------------------------------------------------------------------- the table


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
    kept = "every certified image is kept in the TSVs"
    _write_or_exit(("\n".join(lines) + "\n").encode(), out / "certified_accuracy.csv", kept)
    _write_or_exit(json.dumps(table, indent=1).encode(), out / "certified_accuracy.json", kept)
    with _full_disk_exits(out, "writing certified_accuracy.png", kept):
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
    try:
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------- main


def _scan(a):
    try:
        return scan_dataset(a.data, progress=False)
    except ValueError as e:
        raise SystemExit(f"--data {a.data}: {str(e).splitlines()[0]}") from None


def _quiet(*args, **kw) -> None:
    pass


def load(a, w: World):
    """(index, classifier model, classes, info, device, amp dtype, denoiser or None); bad input is one line.
    Rank 0 scans --data first, the other processes then read its scan cache."""
    if not Path(a.data).is_dir():
        raise SystemExit(f"--data {a.data}: no such directory")
    index = _scan(a) if w.is_main else None
    barrier()
    if index is None:
        index = _scan(a)  # reads the scan cache rank 0 wrote
    device = w.device
    say = print if w.is_main else _quiet
    model, classes, info = load_classifier(a.ckpt, device, a.arch, a.classes)
    if not info["classes_known"]:
        raise SystemExit(f"--ckpt {a.ckpt} is a bare state_dict without class names: pass --classes classes.json")
    if index.classes != classes:
        unknown = [c for c in index.classes if c not in classes]
        raise SystemExit(f"--data {a.data} has {len(index.classes)} classes, the classifier {len(classes)}"
                         + (f" ({unknown[0]!r} is not among them)" if unknown else "")
                         + ": certify on a dataset with the training classes, in the training order")
    amp = resolve_precision(a.precision, device)  # None: float32
    say(f"precision {precision_name(amp)} (--precision {a.precision}): the UNet's block convolutions and the "
          "classifier")
    den = None
    if a.unet is not None:
        try:
            den = df.load_denoiser(a.unet, a.unet_preset, device=device, dtype=amp or torch.float32)
        except df.CheckpointError as e:
            raise SystemExit(f"--unet {a.unet}: {e}") from None
        crop, down = info["crop_size"], den.total_downsampling
        if crop % down:
            raise SystemExit(f"--unet {a.unet} downsamples {down}x, but the classifier's crop is {crop}x{crop} "
                             f"(--ckpt {a.ckpt}): denoised smoothing needs a crop that is a multiple of {down}; "
                             "certify a classifier trained at such a size, or drop --unet")
    return index, model, classes, info, device, amp, den


def _start(a, out: Path, picks: list[int], index, info, amp, plan) -> tuple[object, dict, str]:
    """Rank 0: lock --out, check or reset its certificates, print the plan, write settings.json. Returns (the
    locked run folder, sigma -> images still to certify, the settings.json text)."""
    settings = run_settings(a, index, info, amp)
    try:
        run = open_run(out)  # locks the folder; refuses a training run's folder
    except RunError as e:
        raise SystemExit(str(e)) from None
    try:
        old = check_folder(out, settings, a.overwrite)
        if not old:
            discard_results(out)  # a new folder, or --overwrite of other settings / unknown TSVs
        settings["sigmas"] = sorted({*old.get("sigmas", []), *a.sigma})
        todo = {s: [i for i in picks if i not in read_done(out, s)] for s in a.sigma}
        plan(todo)
        text = json.dumps(settings, indent=1)
        _write_or_exit(text.encode(), out / "settings.json", "nothing was certified yet")
    except BaseException:
        run.close()
        raise
    return run, todo, text


def _check_shared(out: Path, text: str, w: World) -> None:
    """Every process must write its rank files where rank 0 merges them: the same --out on every machine."""
    seen = (out / "settings.json").read_text() if (out / "settings.json").is_file() else None
    if seen != text:
        raise SystemExit(f"--out {out}: process {w.rank} does not see the settings.json rank 0 wrote there; with "
                         "torchrun --nnodes > 1, --out must be a folder every machine sees (a shared file system)")


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    w = init_distributed()
    say = print if w.is_main else _quiet
    index, model, classes, info, device, amp, den = load(a, w)
    picks = list(range(0, len(index), a.skip))[: a.max]
    crop = info["crop_size"]
    classifier = with_normalization(model, info["mean"], info["std"])
    views = min(a.batch_size, PROBE_VIEWS)
    rate = probe(classifier, len(classes), den, a.sigma[0], crop, device, amp, views)  # every process its own
    out = Path(a.out)
    run, todo, text = None, None, None
    try:
        if w.is_main:
            run, todo, text = _start(a, out, picks, index, info, amp,
                                     lambda todo: say_plan(a, picks, todo, den, crop, rate, views, w.size))
        todo, text = broadcast_object((todo, text))
        if not w.is_main:
            _check_shared(out, text, w)
        loader_kw = dict(batch_size=8, backend=a.loader, device=device, crop_size=crop,
                         resize_size=info["resize_size"], mean=(0.0,) * 3, std=(1.0,) * 3,  # [0, 1] images
                         num_workers=a.workers)
        for sigma in a.sigma:
            # the Philox key depends on (seed, sigma) only, so a rerun with another --sigma list keeps each TSV valid
            smooth = Smooth(classifier, len(classes), sigma, den, seed=a.seed * 100_003 + round(sigma * 1e4),
                            autocast_dtype=amp)
            if den is not None:
                say(f"sigma {sigma:g}: denoising at t* = {smooth.t} (first t with sqrt((1-abar)/abar) >= {2 * sigma:g})")
            done = len(picks) - len(todo[sigma])
            if done:
                say(f"sigma {sigma:g}: {done} images already certified in {out}, {len(todo[sigma])} to go")
            # the images left are dealt out round-robin: a resumed run keeps every process busy
            path = tsv_path(out, sigma) if w.size == 1 else rank_tsv_path(out, sigma, w.rank)
            certify_sigma(smooth, index, todo[sigma][w.rank::w.size], path, a, loader_kw, show=w.is_main)
        barrier()  # every process's records are fsynced before rank 0 merges them
        table = _finish(out, list(a.sigma)) if w.is_main else None
    finally:
        if run is not None:
            run.close()
    say(f"wrote {out / 'certified_accuracy.csv'}, .json and .png")
    return broadcast_object(table)


def _finish(out: Path, sigmas: list[float]) -> dict:
    """Rank 0: merge the processes' rank files into each sigma's TSV, then the table."""
    for sigma in sigmas:
        with _full_disk_exits(out, f"merging the rank files of sigma {sigma:g}", "every certificate is kept in them"):
            merge_ranks(out, sigma)
    return write_table(out, sigmas)


if __name__ == "__main__":
    main()
