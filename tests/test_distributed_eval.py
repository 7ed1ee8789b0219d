"""train/eval.py and train/certify.py under torchrun (2 gloo processes on the CPU): the tables equal a
one-process run's exactly, and a SIGKILLed process followed by the same command loses nothing.

References: a one-process run of the same CLI (in this process), and for DiffAug Ensemble's per-image noise
an explicit loop over single images calling ``augment`` at the documented Philox offsets (k N + i) C H W.
Tiny throughout: a 1-block ViT at 16 px crops (trained 25 steps, so predictions and radii vary per image),
adm-tiny with random weights, 10 images.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffaug_fast.constants import IMAGENET_MEAN, IMAGENET_STD
from diffaug_fast.eval import certify as cp
from diffaug_fast.eval import evaluate as ev

REPO = Path(__file__).resolve().parents[1]
SIGMAS = ("0.25", "0.5")
BRIGHT = {"a": (0.40, 0.44, 0.47, 0.49, 0.5), "b": (0.5, 0.51, 0.53, 0.56, 0.6)}


def _save(folder: Path, brights, rng) -> list[np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    crops = []
    for i, b in enumerate(brights):
        px = np.clip(rng.normal(255 * b, 40, (20, 20, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(px).save(folder / f"{i}.png")  # PNG: the pixels the classifier sees are these
        crops.append(px[2:18, 2:18])
    return crops


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """val/{a,b} (5 images each), imagenet-c/{fog,snow}/3/{a,b} (1 each: one image per process), a 16 px ViT
    trained 25 steps on noisy copies (so counts under noise vary per image) and a random adm-tiny UNet."""
    import timm
    from conftest import oracle_model_and_diffusion, randomize_

    import diffaug_fast as df

    root = tmp_path_factory.mktemp("disteval")
    rng = np.random.default_rng(0)
    crops, labels = [], []
    for label, cls in enumerate(BRIGHT):
        crops += _save(root / "val" / cls, BRIGHT[cls], rng)
        labels += [label] * len(BRIGHT[cls])
        for c in ("fog", "snow"):
            _save(root / "imagenet-c" / c / "3" / cls, BRIGHT[cls][2:3], rng)
    x = torch.tensor(np.stack(crops)).permute(0, 3, 1, 2).float() / 255
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.manual_seed(0)
    settings = {"arch": "vit_tiny_patch16_224", "model_source": "timm", "model_kwargs": {"img_size": 16, "depth": 1},
                "image_size": 16, "resize_size": 20}
    vit = timm.create_model(settings["arch"], num_classes=2, **settings["model_kwargs"])
    opt = torch.optim.Adam(vit.parameters(), 1e-3)
    for _ in range(25):
        noisy = x + torch.randn(x.shape) * torch.rand(len(x), 1, 1, 1) * 0.3
        loss = torch.nn.functional.cross_entropy(vit((noisy - mean) / std), torch.tensor(labels))
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.save({"model": vit.state_dict(), "settings": settings, "classes": ["a", "b"]}, root / "vit16.pt")
    unet, _ = oracle_model_and_diffusion(df.get_preset("adm-tiny"))
    torch.save(randomize_(unet).state_dict(), root / "unet.pt")
    return root


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="")


def _torchrun(script: Path, *args: str, procs: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}", str(script),
           *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=REPO, timeout=600)


# ---------------------------------------------------------------------------------------------------- eval


def _eval_args(tree: Path, out: Path, batch: int) -> list[str]:
    return ["--ckpt", str(tree / "vit16.pt"), "--val", str(tree / "val"), "--imagenet-c", str(tree / "imagenet-c"),
            "--de", "--unet", str(tree / "unet.pt"), "--batch-size", str(batch), "--loader", "torch", "--workers",
            "0", "--out", str(out)]


def test_eval_de_noise_is_per_image_and_matches_a_single_image_loop(tree, tmp_path):
    """--batch-size 3 and 4 give the same table, and top1_by_t equals a loop over single images with the noise
    at Philox offset (k N + i) C H W of --seed (t = 50 (k + 1), i: the image's index in its folder)."""
    import diffaug_fast as df
    from diffaug_fast.data import scan_dataset
    from diffaug_fast.eval.ensemble import DE_TIMESTEPS, eval_geometry, val_batches
    from diffaug_fast.eval.models import load_classifier
    from diffaug_fast.ops.augment import augment

    a = ev.main(_eval_args(tree, tmp_path / "b3", 3))["results"]
    b = ev.main(_eval_args(tree, tmp_path / "b4", 4))["results"]
    assert a == b
    val = a[0]
    model, _, info = load_classifier(tree / "vit16.pt")
    den = df.load_denoiser(str(tree / "unet.pt"))
    index = scan_dataset(tree / "val", progress=False)
    norm = dict(mean=info["mean"], std=info["std"])
    geo = eval_geometry(info["crop_size"], info["crop_ratio"], info["interpolation"])
    right = dict.fromkeys(DE_TIMESTEPS, 0)
    for i, (x, y) in enumerate(val_batches(index, batch_size=1, backend="torch", device=torch.device("cpu"),
                                           num_workers=0, **geo, **norm)):
        for k, t in enumerate(DE_TIMESTEPS):
            view = x if t == 0 else augment(x, den, t=t, seed=0, offset=((k - 1) * len(index) + i) * x.numel(), **norm)
            with torch.no_grad():
                right[t] += int(model(view).argmax(1).item() == y.item())
    assert val["top1_by_t"] == {t: 100.0 * c / len(index) for t, c in right.items()}
    assert len(set(val["top1_by_t"].values())) > 1  # the views differ: a table that can tell noise apart


def test_eval_two_processes_equal_one(tree, tmp_path):
    one = ev.main(_eval_args(tree, tmp_path / "one", 4))
    r = _torchrun(REPO / "train" / "eval.py", *_eval_args(tree, tmp_path / "two", 4))
    assert r.returncode == 0, r.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["results"] == json.loads(json.dumps(one["results"]))  # int t keys become strings in JSON
    assert two["imagenet_c"] == json.loads(json.dumps(one["imagenet_c"]))
    assert [r["n"] for r in two["results"]] == [10, 2, 2] and "top1_de" in two["results"][0]
    assert "14 x 9 = 126 UNet calls (DE)" in r.stdout and "2 process(es)" in r.stdout
    assert r.stdout.count("top-1 of 14 images") == 1  # rank 0 alone prints
    plain = ev.main([*_eval_args(tree, tmp_path / "plain", 4)[:6], "--loader", "torch", "--workers", "0", "--out",
                     str(tmp_path / "plain")])["results"]
    assert [p["top1"] for p in plain] == [p["top1"] for p in two["results"]]  # no --de: the same plain column


def test_eval_ood_under_torchrun_is_refused(tree, tmp_path):
    r = _torchrun(REPO / "train" / "eval.py", "--ckpt", str(tree / "vit16.pt"), "--ood-id", str(tree / "val"),
                  "--ood", f"x={tree / 'val'}", "--out", str(tmp_path / "o"))
    assert r.returncode != 0 and "--ood runs in one process" in r.stderr


# ---------------------------------------------------------------------------------------------------- certify


def _cert_args(tree: Path, out: Path, *extra: str) -> list[str]:
    return ["--ckpt", str(tree / "vit16.pt"), "--data", str(tree / "val"), "--sigma", *SIGMAS, "--N0", "10", "--N",
            "50", "--skip", "1", "--batch-size", "25", "--loader", "torch", "--workers", "0", "--out", str(out),
            *extra]


def _records(out: Path) -> dict[str, list[list[str]]]:
    """Per sigma the TSV's records without the time column; every line whole, no rank file left."""
    assert not list(out.glob("sigma_*.rank*.tsv"))
    rows = {}
    for s in SIGMAS:
        text = cp.tsv_path(out, float(s)).read_text()
        assert text.endswith("\n") and text.startswith(cp.HEADER)
        rows[s] = [ln.split("\t")[:5] for ln in text.splitlines()[1:]]
    return rows


@pytest.fixture(scope="module")
def cert_ref(tree, tmp_path_factory):
    """One process, in this process, plain and denoised smoothing."""
    out = tmp_path_factory.mktemp("certref")
    cp.main(_cert_args(tree, out / "plain"))
    cp.main(_cert_args(tree, out / "den", "--unet", str(tree / "unet.pt")))
    rows = _records(out / "plain")
    assert [int(r[0]) for r in rows["0.25"]] == list(range(10))
    assert len({r[3] for s in SIGMAS for r in rows[s]}) >= 4  # radii that tell runs apart
    return out


@pytest.mark.parametrize("kind", ["plain", "den"])
def test_certify_two_processes_equal_one(tree, tmp_path, cert_ref, kind):
    extra = ("--unet", str(tree / "unet.pt")) if kind == "den" else ()
    r = _torchrun(REPO / "train" / "certify.py", *_cert_args(tree, tmp_path / "two", *extra))
    assert r.returncode == 0, r.stderr[-3000:]
    assert _records(tmp_path / "two") == _records(cert_ref / kind)  # in image order, radii equal
    assert json.loads((tmp_path / "two" / "certified_accuracy.json").read_text()) == json.loads(
        (cert_ref / kind / "certified_accuracy.json").read_text())
    assert r.stdout.count("certifying 10 images") == 1 and "in each of 2 processes" in r.stdout


def test_certify_sigkill_of_one_process_then_rerun_equals_uninterrupted(tree, tmp_path, cert_ref):
    """Process 1 is SIGKILLed half-way through writing its 2nd record (a torn line in its rank file); torchrun
    then stops process 0. The same command run again ends with exactly the one-process TSVs and table."""
    wrapper = tmp_path / "kill_rank1.py"
    wrapper.write_text("import os, runpy, sys\n"
                       "if os.environ.get('RANK') != '1':\n    sys.argv[1] = 'none'\n"
                       f"runpy.run_path({str(REPO / 'tests' / 'certify_fault_runner.py')!r}, run_name='__main__')\n")
    out = tmp_path / "killed"
    r = _torchrun(wrapper, "mid:2", *_cert_args(tree, out))
    assert r.returncode != 0
    rank1 = cp.rank_tsv_path(out, 0.25, 1)
    assert not rank1.read_text().endswith("\n") and len(cp.read_tsv(rank1)) == 1  # one record, one torn
    done = len(cp.read_done(out, 0.25)) + len(cp.read_done(out, 0.5))
    assert 0 < done < 20
    r = _torchrun(REPO / "train" / "certify.py", *_cert_args(tree, out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "images already certified" in r.stdout
    assert _records(out) == _records(cert_ref / "plain")
    assert (out / "certified_accuracy.csv").read_bytes() == (cert_ref / "plain" / "certified_accuracy.csv").read_bytes()


def test_rank_files_left_by_a_killed_run_are_merged_by_a_one_process_rerun(tree, tmp_path, cert_ref):
    """A rerun with another process count (here one, in process) reads the rank files as finished images
    and merges them: the number of processes never changes the result."""
    out = tmp_path / "c"
    cp.main(_cert_args(tree, out))
    for s in SIGMAS:  # split the finished TSV into two rank files, as an interrupted 2-process run leaves them
        lines = cp.tsv_path(out, float(s)).read_text().splitlines(keepends=True)
        cp.rank_tsv_path(out, float(s), 0).write_text(cp.HEADER + "".join(lines[1:4]))
        cp.rank_tsv_path(out, float(s), 1).write_text(cp.HEADER + "".join(lines[7:9]) + lines[9][:5])
        cp.tsv_path(out, float(s)).write_text(cp.HEADER)
    table = cp.main(_cert_args(tree, out))
    assert _records(out) == _records(cert_ref / "plain")
    assert table == json.loads((cert_ref / "plain" / "certified_accuracy.json").read_text())
