"""The effect study: does DiffAug help on this dataset? Train a BASELINE and a DIFFAUG classifier with the same
architecture, budget and seeds, evaluate each plain, with DiffAug Ensemble (DE) and with DDA / DDA-SE on clean
val and on a corruption tree at severities 1-5, and summarize over seeds with paired differences.

    python -m diffaug_fast.study --data DATA --unet den/model.pt --out study/ \\
        --train-args "--arch resnet18 --epochs 30 --batch-size 128 --lr 0.1 --lr-step 20 --image-size 64 \\
                      --resize-size 72 --amp"
    python -m diffaug_fast.study --data DATA --train-denoiser --denoiser-steps 20000 --out study/ ...
    python -m diffaug_fast.study ... --corrupted imagenet-c/ --max-images 2000 --methods plain,de

--data ROOT holds train/ and val/ (one folder per class). --corrupted DIR is an ImageNet-C layout tree
(<corruption>/<severity>/<class>/*); without it the study makes one under OUT/corrupted with
``python -m diffaug_fast.corrupt`` (the 15 ImageNet-C corruptions and the 4 validation ones, severities 1-5;
--corruptions / --severities narrow that, or select folders of a given tree). It corrupts the Resize +
CenterCrop views the classifier sees of the evaluated val images (OUT/val_views; ImageNet-C corrupted 224 px
centre crops the same way), so a clean image and its corrupted copies differ by the corruption only; they
are evaluated at that size without another resize.

Per seed k (0 .. --seeds - 1) two runs of the rn50 recipe (diffaug_fast/train/recipes/rn50.py, in this
process) in OUT/runs/baseline-seed<k> (--diffaug off) and OUT/runs/diffaug-seed<k> (--diffaug online with the
study's denoiser), both with --seed k and the --train-args. Then both classifiers are evaluated in one pass
over each split: the DE views (t in --de-timesteps, fresh noise per view) and the DDA-adapted images depend
only on the image, the seed and the denoiser, so they are made once and fed to both (a paired comparison at
half the UNet work). DDA-SE averages the plain and DDA probabilities.

Resumable: a finished run (a "summary" event in its log.jsonl) is not trained again, a run killed mid-way
continues with --resume; every (seed, split) result is written as it completes (OUT/results/seed<k>/<split>.json,
atomically, with the per-image predictions in a .npz beside it) and skipped when rerun, unless the classifier
checkpoints it was computed from have changed. OUT/settings.json records what the results depend on; a rerun
with other settings is refused (--overwrite starts afresh). More --seeds or corruptions later only add work.

Outputs: OUT/study.csv and study.json (one row per training x method x corruption x severity x seed, and the
clean rows), table.md (printed too: top-1 mean ± std over seeds on clean, and at severity 5 over the noise
corruptions, the 15 standard ones and the 4 validation ones; the paired difference of each method minus
baseline + plain with its 95% t interval) and study.png (top-1 against severity per corruption family).
Randomness: DE and DDA noise comes from generators seeded by (seed, split name); the draws follow the batch
order, so results are reproducible for a given --eval-batch-size.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..corrupt import parse_corruptions, parse_severities
from ..data.corruptions import ALL_CORRUPTIONS
from ..data.synthetic import make_synthetic_dataset
from ..diffusion.denoiser import read_sidecar, sidecar_path
from ..hardware import PRECISIONS, precision_name, resolve_precision
from ..io import atomic_write_bytes
from ..train.core import read_log
from ..train.demo import DEMO_CONFIG, demo_unet
from ..train.denoiser import main as denoiser_main
from ..train.flags import given_flags
from ..train.recipes import rn50
from .dda import DDASettings
from .ensemble import DE_TIMESTEPS
from .study_data import Split, find_splits, generate_corrupted, select_files, split_index, write_views
from .study_eval import EvalParts, check_denoiser, evaluate_seed, evaluate_split, load_denoisers
from .study_report import FIELDS, METHODS, TRAININGS, format_table, plot_study, result_rows, summarize

__all__ = ["StudySettings", "Split", "parse_args", "main", "select_files", "split_index", "generate_corrupted",
           "find_splits", "evaluate_split", "write_views", "check_denoiser", "EvalParts", "CONTROLLED"]

# rn50 settings the study sets for each run; from --train-args they would break the pairing or the run folders
CONTROLLED = ("data", "out", "run_name", "seed", "diffaug", "resume", "overwrite", "de_eval", "unet", "unet_preset",
              "recipe")
SETTINGS_FILE = "settings.json"
_OUTPUTS = ("runs", "results", "denoiser", "corrupted", "val_views", SETTINGS_FILE, "study.csv", "study.json",
            "table.md", "study.png", "views.png")


@dataclass(frozen=True)
class StudySettings:
    """The command line, checked and resolved (paths absolute)."""

    data: Path
    out: Path
    corrupted: Path | None
    unet: Path | None
    unet_preset: str | None
    train_denoiser: bool
    denoiser_steps: int
    denoiser_args: tuple[str, ...]
    seeds: int
    train_args: tuple[str, ...]
    methods: tuple[str, ...]
    de_timesteps: tuple[int, ...]
    dda: DDASettings
    max_images: int | None
    corruptions: tuple[str, ...] | None
    severities: tuple[int, ...] | None
    eval_batch_size: int
    overwrite: bool
    progress: bool
    eval_precision: str | None = None  # None: --train-args' --amp, on the classifier only

    def identity(self) -> dict:
        """What the results depend on (a rerun must match it); seeds, corruptions and severities only add work."""
        return json.loads(json.dumps({
            "data": str(self.data), "corrupted": str(self.corrupted) if self.corrupted else "generated",
            "unet": str(self.unet) if self.unet else None, "unet_preset": self.unet_preset,
            "train_denoiser": self.train_denoiser, "denoiser_steps": self.denoiser_steps if self.train_denoiser else None,
            "denoiser_args": list(self.denoiser_args) if self.train_denoiser else None,
            "train_args": list(self.train_args), "methods": list(self.methods), "de_timesteps": list(self.de_timesteps),
            "dda": dataclasses.asdict(self.dda), "max_images": self.max_images,
            **({"eval_precision": self.eval_precision} if self.eval_precision else {})}))


# ---------------------------------------------------------------------------------------------------- the CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m diffaug_fast.study", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--demo", action="store_true", help="the embedded demo (make demo): the synthetic shapes, the demo's denoiser, "
                                          "one seed, noise/blur/digital corruptions; any flag given overrides it")
    a("--data", default=None, help="dataset root with train/ and val/ class folders")
    a("--out", default=None, help="study folder (runs, results, tables and the figure go here)")
    a("--corrupted", default=None, help="ImageNet-C layout tree <corruption>/<severity>/<class>/*; default: made "
                                        "under OUT/corrupted from the evaluated val images")
    a("--corruptions", default=None, help="comma list; generated tree: names or groups (standard, validation, noise, "
                                          "blur, weather, digital; default all 19); given tree: which of its folders "
                                          "(default all)")
    a("--severities", default=None, help="e.g. 1-5, 3 or 1,3 (default: 1-5 generated, every folder of a given tree)")
    a("--unet", default=None, help="denoiser checkpoint for DiffAug training, DE and DDA")
    a("--unet-preset", default=None, help="UNet preset of a bare --unet state_dict (else read from its .json or inferred)")
    a("--train-denoiser", action="store_true", help="train a denoiser on DATA/train into OUT/denoiser/model.pt first")
    a("--denoiser-steps", type=int, default=2000, help="--train-denoiser: optimizer steps (default: 2000)")
    a("--denoiser-args", default="", help='--train-denoiser: more flags for diffaug_fast.train_denoiser, e.g. '
                                          '"--batch-size 32 --lr 2e-3" (default UNet: the demo denoiser\'s family)')
    a("--seeds", type=int, default=3, help="seeds 0 .. N-1, one baseline and one DiffAug run each (default: 3)")
    a("--train-args", default="", help='flags for both trainings (the rn50 recipe), e.g. "--arch resnet18 --epochs '
                                       '30 --batch-size 128 --image-size 64 --resize-size 72 --amp" (one flag alone: '
                                       '--train-args=--amp); its --amp, --loader and --workers also apply to the '
                                       'evaluation')
    a("--methods", default=",".join(METHODS), help=f"comma list from {','.join(METHODS)} (plain is always reported)")
    a("--de-timesteps", default=",".join(map(str, DE_TIMESTEPS)), help="DiffAug Ensemble's t values "
                                                                       f"(default: {','.join(map(str, DE_TIMESTEPS))})")
    a("--dda", nargs="*", default=[], metavar="KEY=VALUE",
      help=f"DDASettings fields over the reference's defaults: {', '.join(f.name for f in dataclasses.fields(DDASettings))}")
    a("--dda-steps", type=int, default=None, help="DDA reverse steps N (UNet calls per image): start_step N of a 2N-step "
                                                  "chain, the reference's noise level (it runs 50 of 100)")
    a("--max-images", type=int, default=None, help="evaluate at most N images per split: a class-balanced, "
                                                   "deterministic subset (the same files in every split)")
    a("--eval-batch-size", type=int, default=64, help="evaluation batch (default: 64)")
    a("--eval-precision", choices=(*PRECISIONS, "auto"), default=None,
      help="DE's UNet and the classifiers in evaluation: auto = the device's native half precision (fp16 GPU, bf16 "
           "on AMX / AVX512-BF16 CPUs, else fp32); default: the classifiers under --train-args' --amp, the UNet fp32")
    a("--overwrite", action=argparse.BooleanOptionalAction, default=None,
      help="delete OUT's previous study (runs, results, tables) and start afresh (--demo: automatic when OUT "
           "holds a demo with other settings; a finished demo is reused and its table reprinted)")
    a("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")
    return p


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise SystemExit(f"{flag} {text!r}: expected a comma list of integers") from None
    if not vals:
        raise SystemExit(f"{flag}: empty list")
    return vals


def _dda_settings(items: Sequence[str], steps: int | None) -> DDASettings:
    kw: dict = {} if steps is None else {"start_step": steps, "respaced_steps": 2 * steps}
    if steps is not None and steps < 1:
        raise SystemExit(f"--dda-steps must be >= 1, got {steps}")
    fields = {f.name for f in dataclasses.fields(DDASettings)}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise SystemExit(f"--dda {item}: expected KEY=VALUE with KEY one of {', '.join(sorted(fields))}")
        try:
            v = json.loads(value)
        except ValueError:
            raise SystemExit(f"--dda {item}: the value must be a number, true/false, null or [lo, hi]") from None
        kw[key] = tuple(v) if isinstance(v, list) else v
    try:
        return DDASettings(**kw)
    except (TypeError, ValueError) as e:
        raise SystemExit(f"--dda: {e}") from None


# The embedded demo: sized for minutes on 2 CPU cores. The classifiers are the rn50 recipe's demo (ResNet-18,
# 8 epochs of 50 steps at 48 px, lr 0.1 then 0.01); 60 val images per split (15 per class); the corruptions
# of three families at severities 3 and 5; plain and DiffAug Ensemble (DDA: --methods plain,de,dda_se).
DEMO_TRAIN_ARGS = ("--arch resnet18 --epochs 8 --batch-size 32 --lr 0.1 --lr-step 6 --image-size 48 --resize-size 55 "
                   "--zero-init-residual --amp --val-c none")
# Seed 0 of the README's 3-seed study (the same trainings), evaluated on fewer images and severities: 8.5 min
# on a 2-core AVX2 CPU (README), where the two classifiers' training takes ~6 of them
DEMO = dict(seeds=1, train_args=DEMO_TRAIN_ARGS, corruptions="noise,blur,digital", severities="3,5", max_images=60,
            methods="plain,de", out=str(Path("runs") / "study-demo"))


def _demo_defaults(a: argparse.Namespace, argv: list[str]) -> argparse.Namespace:
    """--demo: the demo's data (made once, cached), its shipped denoiser and DEMO's values for every flag not
    given. A rerun continues the demo in --out (finished trainings and results are reused, so it reprints the
    table); a demo there with other settings is started afresh (``_demo_overwrite``), anything else refused."""
    given = {arg.split("=")[0].lstrip("-").replace("-", "_") for arg in argv if arg.startswith("--")}
    for k, v in DEMO.items():
        if k not in given:
            setattr(a, k, v)
    if not a.data:
        a.data = str(make_synthetic_dataset())
    if not (a.unet or a.train_denoiser):
        a.unet = str(demo_unet(a.data))
        if (side := read_sidecar(a.unet)) is not None and side[2].get("held_out_psnr"):
            meta = side[2]
            print(f"the demo's denoiser: {a.unet} ({meta['steps']} steps of python -m diffaug_fast.train_denoiser, seed "
                  f"{meta['seed']}; {sidecar_path(a.unet).name} holds the command); held-out one-step PSNR gain "
                  + ", ".join(f"t={r['t']} {r['gain']:+.1f} dB" for r in meta["held_out_psnr"]))
    return a


def _demo_overwrite(s: StudySettings) -> bool:
    """--demo without --overwrite/--no-overwrite: start OUT afresh only when it holds a demo (a study of the demo's
    data) with other settings; a user's own study there is refused by ``prepare_out`` as any rerun would be."""
    path = s.out / SETTINGS_FILE
    try:
        before = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return False
    return before is not None and before.get("data") == str(s.data) and before != s.identity()


def parse_args(argv: list[str] | None = None) -> StudySettings:
    """The command line as :class:`StudySettings`, every mistake a one-line SystemExit."""
    argv = sys.argv[1:] if argv is None else list(argv)
    a = _parser().parse_args(argv)
    if a.demo:
        a = _demo_defaults(a, argv)
    if not (a.data and a.out):
        raise SystemExit("give --data ROOT and --out DIR (or --demo)")
    data, out = Path(a.data).resolve(), Path(a.out).resolve()
    for sub in ("", "train", "val"):
        if not (data / sub).is_dir():
            raise SystemExit(f"--data {a.data}: {'no such folder' if not sub else f'no {sub}/ folder'} (expected "
                             "ROOT/train/<class>/* and ROOT/val/<class>/*)")
    if out.exists() and not out.is_dir():
        raise SystemExit(f"--out {a.out}: exists and is not a folder")
    corrupted = Path(a.corrupted).resolve() if a.corrupted else None
    if corrupted is not None and not corrupted.is_dir():
        raise SystemExit(f"--corrupted {a.corrupted}: no such folder")
    if a.unet and a.train_denoiser:
        raise SystemExit("give either --unet CKPT or --train-denoiser, not both")
    if not (a.unet or a.train_denoiser):
        raise SystemExit("no denoiser: give --unet CKPT (a diffusion checkpoint) or --train-denoiser (trains one on "
                         "DATA/train); DiffAug training, DE and DDA all need it")
    if a.unet and not Path(a.unet).is_file():
        raise SystemExit(f"--unet {a.unet}: no such file")
    if a.seeds < 1:
        raise SystemExit(f"--seeds must be >= 1, got {a.seeds}")
    methods = tuple(m.strip() for m in a.methods.split(",") if m.strip())
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise SystemExit(f"--methods: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(METHODS)}")
    methods = tuple(m for m in METHODS if m in methods or m == "plain")
    de_ts = _ints(a.de_timesteps, "--de-timesteps")
    if len(set(de_ts)) != len(de_ts) or min(de_ts) < 0:
        raise SystemExit(f"--de-timesteps {a.de_timesteps}: expected distinct integers >= 0")
    if a.max_images is not None and a.max_images < 1:
        raise SystemExit(f"--max-images must be >= 1, got {a.max_images}")
    if a.eval_batch_size < 1 or a.denoiser_steps < 1:
        raise SystemExit("--eval-batch-size and --denoiser-steps must be >= 1")
    corruptions = None
    if a.corruptions:  # a generated tree takes names and groups (noise, standard, ...); a given one folder names
        corruptions = (parse_corruptions(a.corruptions) if corrupted is None else
                       tuple(c.strip() for c in a.corruptions.split(",") if c.strip()))
    severities = parse_severities(a.severities) if a.severities else None
    train_args = tuple(shlex.split(a.train_args))
    s = StudySettings(
        data=data, out=out, corrupted=corrupted, unet=Path(a.unet).resolve() if a.unet else None,
        unet_preset=a.unet_preset, train_denoiser=a.train_denoiser, denoiser_steps=a.denoiser_steps,
        denoiser_args=tuple(shlex.split(a.denoiser_args)), seeds=a.seeds, train_args=train_args, methods=methods,
        de_timesteps=de_ts, dda=_dda_settings(a.dda, a.dda_steps), max_images=a.max_images, corruptions=corruptions,
        severities=severities, eval_batch_size=a.eval_batch_size, overwrite=bool(a.overwrite), progress=a.progress,
        eval_precision=a.eval_precision)
    if a.demo and a.overwrite is None:
        s = dataclasses.replace(s, overwrite=_demo_overwrite(s))
    return s


def recipe_settings(s: StudySettings):
    """The rn50 recipe's settings for these --train-args (checked once, before any work)."""
    try:
        # parsed, not matched as text: argparse also takes --flag=value and unambiguous prefixes (--se 4)
        given = sorted(set(given_flags(rn50.Settings, list(s.train_args), "")) & set(CONTROLLED))
        settings = rn50.parse_args([*s.train_args, "--data", str(s.data)])
    except SystemExit as e:
        if isinstance(e.code, str):
            raise SystemExit(f"--train-args: {e.code}") from None
        raise SystemExit(f"--train-args {shlex.join(s.train_args)!r}: not accepted by the rn50 recipe (see the "
                         "message above)") from None
    if given:
        raise SystemExit(f"--train-args: --{given[0].replace('_', '-')} is set by the study (it controls data, seeds, "
                         "DiffAug mode, denoiser and run folders); use the study's own flags")
    return settings


def prepare_out(s: StudySettings) -> None:
    """Create OUT; --overwrite deletes what an earlier study wrote there; refuse results of other settings.
    (The settings are recorded by ``record_settings`` once every check has passed.)"""
    if s.overwrite and s.out.is_dir():
        for name in _OUTPUTS:
            p = s.out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    try:
        s.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"--out {s.out}: cannot create it ({e.strerror or e}); give a writable folder") from None
    path = s.out / SETTINGS_FILE
    now = s.identity()
    if path.is_file():
        before = json.loads(path.read_text())
        diff = [k for k in now if before.get(k) != now[k]]
        if diff:
            k = diff[0]
            raise SystemExit(f"--out {s.out} holds a study with other settings ({k}: {before.get(k)!r} there, "
                             f"{now[k]!r} now): use --overwrite to start afresh, or another --out")


def record_settings(s: StudySettings) -> None:
    """OUT/settings.json: what the results depend on (checked by ``prepare_out`` on every rerun)."""
    path = s.out / SETTINGS_FILE
    if not path.is_file():
        atomic_write_bytes(json.dumps(s.identity(), indent=1).encode(), path)


# ---------------------------------------------------------------------------------------------------- training


def _finished(run: Path) -> bool:
    return any(r.get("event") == "summary" for r in read_log(run / "log.jsonl"))


def train_denoiser(s: StudySettings, ts, say=print) -> Path:
    """OUT/denoiser/model.pt: trained once on DATA/train (resumed if a run was cut short)."""
    ckpt = s.out / "denoiser" / "model.pt"
    if ckpt.is_file() and sidecar_path(ckpt).is_file():
        return ckpt
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    run = ckpt.with_suffix(".run")
    argv = ["--data", str(s.data / "train"), "--out", str(ckpt), "--steps", str(s.denoiser_steps),
            "--image-size", str(ts.image_size), "--seed", "0", "--loader", ts.loader, "--workers", str(ts.workers)]
    if not any(a.split("=")[0] in ("--preset", "--config") for a in s.denoiser_args):
        # default: the demo denoiser's family (0.94 M parameters, no attention), at the classifier's crop size
        argv += ["--config", json.dumps({k: getattr(DEMO_CONFIG, k) for k in (
            "model_channels", "num_res_blocks", "channel_mult", "attention_ds", "resblock_updown")})]
    argv += list(s.denoiser_args)
    if (run / "last.pt").exists() or (run / "prev.pt").exists():
        argv.append("--resume")
    elif run.exists():
        argv.append("--overwrite")
    if not s.progress:
        argv.append("--no-progress")
    say(f"training the study's denoiser: python -m diffaug_fast.train_denoiser {shlex.join(argv)}")
    _call("denoiser", denoiser_main, argv)
    return ckpt


def _call(what: str, fn, argv: list[str]):
    try:
        return fn(argv)
    except SystemExit as e:
        if isinstance(e.code, str):  # a one-line error: say which training it came from
            raise SystemExit(f"training {what}: {e.code}") from None
        raise  # an exit status (a stop signal: 128 + signal): pass it on


def train_runs(s: StudySettings, seed: int, unet: Path, say=print) -> dict[str, Path]:
    """{training: run folder} of this seed, trained (or continued) as needed."""
    runs = {}
    for training in TRAININGS:
        run = s.out / "runs" / f"{training}-seed{seed}"
        runs[training] = run
        if _finished(run):
            say(f"{run.name}: trained before in {run} (reused; --overwrite trains again)")
            continue
        argv = ["--data", str(s.data), "--out", str(run.parent), "--run-name", run.name, "--seed", str(seed),
                "--diffaug", "off" if training == "baseline" else "online", "--no-de-eval", "--unet", str(unet),
                *(["--unet-preset", s.unet_preset] if s.unet_preset else []), *s.train_args]
        if run.exists():
            argv.append("--resume")
        if not s.progress:
            argv.append("--no-progress")
        say(f"training {run.name}" + (" (continuing)" if run.exists() else "") + f": rn50 {shlex.join(argv)}")
        _call(run.name, rn50.main, argv)
    return runs


# ---------------------------------------------------------------------------------------------------- outputs


def write_outputs(s: StudySettings, results: list[dict], meta: dict) -> dict:
    """study.csv, study.json, table.md and study.png from the result dicts; returns the summary."""
    rows = result_rows(results)
    summary = summarize(rows)
    lines = [",".join(FIELDS)] + [",".join(str(r[f]) for f in FIELDS) for r in rows]
    atomic_write_bytes(("\n".join(lines) + "\n").encode(), s.out / "study.csv")
    table = format_table(summary)
    atomic_write_bytes(json.dumps({**meta, "summary": summary, "rows": rows}, indent=1).encode(), s.out / "study.json")
    atomic_write_bytes(("# DiffAug effect study\n\n" + table).encode(), s.out / "table.md")
    plot_study(rows, s.out / "study.png", title=f"{s.data.name}: top-1 by severity")
    print(table)
    print(f"wrote {s.out / 'study.csv'}, study.json, table.md and study.png")
    return summary


def main(argv: list[str] | None = None) -> dict:
    """Run (or continue) the study; returns {"summary", "rows", "out"}."""
    s = parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SystemExit("run the study as one process (not under torchrun): it trains and evaluates in turn")
    ts = recipe_settings(s)
    prepare_out(s)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if s.eval_precision:  # refused or warned about before any training
        print(f"evaluation precision: {precision_name(resolve_precision(s.eval_precision, device))} "
              f"(--eval-precision {s.eval_precision})")
    unet = train_denoiser(s, ts) if s.train_denoiser else s.unet
    check_denoiser(s, unet, ts.image_size)
    record_settings(s)
    # the trainer's classes: the sorted class folders of train/ (its scan's order)
    classes = sorted(p.name for p in (s.data / "train").iterdir() if p.is_dir() and not p.name.startswith("."))
    clean = Split("clean", 0, s.data / "val")
    indices = {"clean": split_index(clean.folder, classes, s.max_images)}
    if s.corrupted is not None:
        splits = find_splits(s.corrupted, s.corruptions, s.severities)
    else:
        tree = generate_corrupted(indices["clean"], s.out, s.corruptions or ALL_CORRUPTIONS,
                                  s.severities or (1, 2, 3, 4, 5), crop=ts.image_size, resize=ts.resize_size,
                                  workers=ts.workers, progress=s.progress)
        splits = find_splits(tree, s.corruptions or ALL_CORRUPTIONS, s.severities or (1, 2, 3, 4, 5), native=True)
    splits = [clean, *splits]
    loaded: list = []

    def denoisers() -> tuple:
        if not loaded:  # after the first trainings: not held in memory while they run
            loaded.extend(load_denoisers(s, unet, device))
        return tuple(loaded)

    results = []
    for seed in range(s.seeds):
        runs = train_runs(s, seed, unet)
        results += evaluate_seed(s, seed, runs, splits, denoisers, ts, device, indices)
    meta = {"settings": s.identity(), "seeds": list(range(s.seeds)), "denoiser": str(unet),
            "splits": [sp.name for sp in splits], "device": str(device)}
    summary = write_outputs(s, results, meta)
    views = s.out / "runs" / f"{TRAININGS[1]}-seed0" / "diffaug_views.png"  # the DiffAug run's grid of its views
    if views.is_file():
        shutil.copyfile(views, s.out / "views.png")
        print(f"the DiffAug views its classifier trained on (one image per class, t = 0 .. 999): {s.out / 'views.png'}")
    return {"summary": summary, "rows": result_rows(results), "out": str(s.out)}
