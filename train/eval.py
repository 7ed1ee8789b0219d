#!/usr/bin/env python
"""Top-1 of a trained classifier on folder datasets, plain and with DiffAug Ensemble (DE).

    python train/eval.py --ckpt runs/demo/last.pt --val DATA/val
    python train/eval.py --ckpt last.pt --val imagenet/val imagenet-r imagenet-a --imagenet-c imagenet-c \\
        --unet 256x256_diffusion_uncond.pt --de --out results/

--val takes class-folder datasets; one whose classes are a subset of the training classes (ImageNet-R,
ImageNet-A: 200 WordNet ids) is scored with the logits sliced to those classes before the softmax.
--imagenet-c takes a corruption/severity/class tree and prints a per-corruption table. DE averages the
softmax over t in {0, 50, ..., 450} (t = 0: the unmodified image), with fresh noise for every copy.
Results go to <out>/results.csv and <out>/results.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torchvision

import diffaug_fast as df
from diffaug_fast.ensemble import DE_TIMESTEPS, evaluate_corruptions, evaluate_folder
from diffaug_fast.hardware import fast_half_dtype
from diffaug_fast.io import atomic_write_bytes


def load_classifier(path: str, arch: str | None, classes_file: str | None, device: torch.device):
    """A trainer checkpoint (model + classes + settings) or a plain state_dict with --arch/--classes."""
    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"--ckpt {path}: no such file")
    try:
        ck = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise SystemExit(f"--ckpt {path}: not a readable PyTorch checkpoint ({str(e).splitlines()[0]})") from None
    if isinstance(ck, dict) and "model" in ck and "classes" in ck:
        state, classes = ck["model"], list(ck["classes"])
        settings = ck.get("settings", {})
        arch = arch or settings.get("arch", "resnet50")
        geometry = dict(crop_size=settings.get("image_size", 224), resize_size=settings.get("resize_size", 256))
    elif isinstance(ck, dict) and all(isinstance(v, torch.Tensor) for v in ck.values()):
        if not classes_file:
            raise SystemExit("--ckpt holds a bare state_dict: pass --classes classes.json (the training class order)")
        state, classes = ck, json.loads(Path(classes_file).read_text())
        geometry = dict(crop_size=224, resize_size=256)
        arch = arch or "resnet50"
    else:
        raise SystemExit(f"--ckpt {path}: neither a trainer checkpoint nor a classifier state_dict")
    model = torchvision.models.get_model(arch, num_classes=len(classes))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise SystemExit(f"--ckpt {path} does not fit {arch} with {len(classes)} classes: "
                         f"{str(e).splitlines()[0]}") from None
    model = model.to(device, memory_format=torch.channels_last).eval()
    return model, classes, geometry


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--arch", default=None)
    p.add_argument("--classes", default=None, help="JSON list of training classes (for bare state_dicts)")
    p.add_argument("--val", nargs="*", default=[], help="class-folder datasets (val, ImageNet-R, ImageNet-A...)")
    p.add_argument("--imagenet-c", nargs="*", default=[], help="corruption/severity/class trees")
    p.add_argument("--de", action="store_true", help="also report DiffAug Ensemble top-1")
    p.add_argument("--unet", default=None)
    p.add_argument("--unet-preset", default=None)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--loader", default="auto")
    p.add_argument("--amp", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="eval_out")
    a = p.parse_args(argv)
    if not a.val and not a.imagenet_c:
        raise SystemExit("nothing to evaluate: pass --val and/or --imagenet-c")
    for d in [*a.val, *a.imagenet_c]:
        if not Path(d).is_dir():
            raise SystemExit(f"{d}: no such directory")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, classes, geometry = load_classifier(a.ckpt, a.arch, a.classes, device)
    den = None
    if a.de:
        if a.unet is None:
            raise SystemExit("--de needs --unet CHECKPOINT (DiffAug needs a pretrained diffusion model)")
        try:
            den = df.load_denoiser(a.unet, a.unet_preset, device=device)
        except df.CheckpointError as e:
            raise SystemExit(f"--unet {a.unet}: {e}") from None
    amp = fast_half_dtype(device) if a.amp else None  # None: no native half precision here, float32
    kw = dict(batch_size=a.batch_size, backend=a.loader, device=device, denoiser=den, timesteps=DE_TIMESTEPS,
              autocast_dtype=amp, seed=a.seed, **geometry)

    rows = []
    for d in a.val:
        res = evaluate_folder(model, d, classes, **kw)
        rows.append({"dataset": d, "corruption": "", "severity": "", **res})
        de = f", DE {res['top1_de']:.2f}%" if "top1_de" in res else ""
        print(f"{d}: top-1 {res['top1']:.2f}%{de} ({res['n']} images, {res['classes']} classes)")
    for d in a.imagenet_c:
        table = evaluate_corruptions(model, d, classes, **kw)
        rows += [{"dataset": d, **r} for r in table]
        print_corruption_table(d, table)

    out = Path(a.out)
    fields = ["dataset", "corruption", "severity", "classes", "n", "top1", "top1_de"]
    lines = [",".join(fields)] + [",".join(str(r.get(f, "")) for f in fields) for r in rows]
    atomic_write_bytes(("\n".join(lines) + "\n").encode(), out / "results.csv")
    atomic_write_bytes(json.dumps({"ckpt": a.ckpt, "unet": a.unet, "de_timesteps": list(DE_TIMESTEPS),
                                   "results": rows}, indent=1).encode(), out / "results.json")
    print(f"wrote {out / 'results.csv'} and {out / 'results.json'}")
    return rows


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


if __name__ == "__main__":
    main()
