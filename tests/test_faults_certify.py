"""train/certify.py under faults: a full disk mid-append is a message that keeps every finished certificate,
and SIGKILL anywhere (mid TSV write, between images, inside a certificate), followed by rerunning the same
command, ends with exactly the TSVs and table of an uninterrupted run.

Tiny throughout: a 1-block ViT at 32 px, 6 images, n0 = 4, n = 64, two sigmas.
"""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffaug_fast.constants import IMAGENET_MEAN, IMAGENET_STD
from diffaug_fast.eval import certify as cp

REPO = Path(__file__).resolve().parents[1]
SIGMAS = ("0.25", "0.5")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """val/{a,b}: 3 flat grey-ish images each, mean brightness a: 0.44/0.47/0.49, b: 0.51/0.53/0.56, and a
    1-block ViT trained 25 steps to tell them apart: under sigma 0.25/0.5 noise its counts vary per image
    (abstentions, radii below and at the cap), so the records depend on every noise draw."""
    import timm

    root = tmp_path_factory.mktemp("certfaults")
    rng = np.random.default_rng(0)
    crops, labels = [], []
    for label, (cls, brights) in enumerate((("a", (0.44, 0.47, 0.49)), ("b", (0.51, 0.53, 0.56)))):
        (root / "val" / cls).mkdir(parents=True)
        for i, bright in enumerate(brights):
            px = np.clip(rng.normal(255 * bright, 40, (40, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(px).save(root / "val" / cls / f"{i}.jpg")
            crops.append(px[4:36, 4:36])
            labels.append(label)
    x = torch.tensor(np.stack(crops)).permute(0, 3, 1, 2).float() / 255
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.manual_seed(0)
    settings = {"arch": "vit_tiny_patch16_224", "model_source": "timm", "model_kwargs": {"img_size": 32, "depth": 1},
                "image_size": 32, "resize_size": 36}
    vit = timm.create_model(settings["arch"], num_classes=2, **settings["model_kwargs"])
    opt = torch.optim.Adam(vit.parameters(), 1e-3)
    for _ in range(25):  # on noisy copies (std up to 0.3), as smoothing's base classifiers are trained
        noisy = x + torch.randn(x.shape) * torch.rand(len(x), 1, 1, 1) * 0.3
        loss = torch.nn.functional.cross_entropy(vit((noisy - mean) / std), torch.tensor(labels))
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.save({"model": vit.state_dict(), "settings": settings, "classes": ["a", "b"]}, root / "vit.pt")
    return root


def _args(tree: Path, out: Path) -> list[str]:
    return ["--ckpt", str(tree / "vit.pt"), "--data", str(tree / "val"), "--sigma", *SIGMAS, "--n0", "4",
            "--n", "64", "--skip", "1", "--batch-size", "8", "--loader", "torch", "--workers", "0", "--out", str(out)]


def _records(tsv: Path) -> list[list[str]]:
    """The TSV's lines without the time column; asserts every line is whole (6 fields, newline-terminated)."""
    text = tsv.read_text()
    assert text.endswith("\n")
    lines = text.splitlines()
    assert lines[0] + "\n" == cp.HEADER and all(len(ln.split("\t")) == 6 for ln in lines)
    return [ln.split("\t")[:5] for ln in lines[1:]]


def _n_records(out: Path) -> int:
    return sum(len(cp.read_tsv(cp.tsv_path(out, float(s)))) for s in SIGMAS)


# ---------------------------------------------------------------------------------------------------- full disk


def test_full_disk_mid_append_keeps_the_data_and_a_rerun_continues(tree, tmp_path, monkeypatch):
    ref = cp.main(_args(tree, tmp_path / "ref"))
    out = tmp_path / "c"
    tsv = cp.tsv_path(out, 0.25)
    real_write = os.write
    writes = {"n": 0}

    def write(fd, data):  # the 3rd write to sigma_0.25.tsv (header, image 0, image 1) fills the disk half-way
        if os.readlink(f"/proc/self/fd/{fd}") == str(tsv):
            writes["n"] += 1
            if writes["n"] == 3:
                real_write(fd, data[: len(data) // 2])
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    with pytest.raises(SystemExit, match=r"^no space left on the device of .* while appending image 1 to "
                                         r"sigma_0.25.tsv: every image certified before it is kept \(1 in this run; "
                                         r"a torn last line is cut on the next run\); free space and rerun the same "
                                         r"command to continue$"):
        cp.main(_args(tree, out))
    monkeypatch.setattr(os, "write", real_write)
    text = tsv.read_text()
    assert not text.endswith("\n") and list(cp.read_tsv(tsv)) == [0]  # image 0 kept, image 1 torn
    table = cp.main(_args(tree, out))
    assert table == ref
    for s in SIGMAS:
        assert _records(cp.tsv_path(out, float(s))) == _records(cp.tsv_path(tmp_path / "ref", float(s)))


def test_full_disk_on_settings_or_table_is_a_message(tree, tmp_path, monkeypatch):
    real_fsync = os.fsync
    target = {"name": ".settings.json."}

    def fsync(fd):
        if target["name"] in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    out = tmp_path / "c"
    with pytest.raises(SystemExit, match=r"no space left .* writing settings.json: nothing was certified yet; free "
                                         "space and rerun the same command to continue"):
        cp.main(_args(tree, out))
    assert not list(out.glob("sigma_*")) and not list(out.glob(".*.tmp"))
    target["name"] = ".certified_accuracy.json."
    with pytest.raises(SystemExit, match=r"writing certified_accuracy.json: every certified image is kept in the TSVs"):
        cp.main(_args(tree, out))
    assert _n_records(out) == 12
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert cp.main(_args(tree, out))["per_sigma"]["0.5"]["n_images"] == 6


# ---------------------------------------------------------------------------------------------------- SIGKILL


def _run(point: str, tree: Path, out: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, str(REPO / "tests" / "certify_fault_runner.py"), point, *_args(tree, out)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)


def test_sigkill_at_random_points_then_rerun_equals_uninterrupted(tree, tmp_path):
    """Three runs of the same command, each SIGKILLed at a point of its own in random order (a torn TSV line,
    between two images, inside a certificate; at its 1st or 2nd record/certificate, so every kill lands
    before the 12 certificates are done), then one run to the end: the TSVs (all but the time column) and the
    table files equal those of an uninterrupted run, and no torn line is left."""
    ref = _run("none", tree, tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr[-3000:]
    rows = [r for s in SIGMAS for r in _records(cp.tsv_path(tmp_path / "ref", float(s)))]
    assert {r[2] for r in rows} == {"-1", "0", "1"} and len({r[3] for r in rows}) >= 4  # records that tell runs apart
    rng = random.Random(22)
    points = [f"{kind}:{rng.randint(1, 2)}" for kind in rng.sample(["mid", "after", "mc"], 3)]
    out = tmp_path / "killed"
    progress = []
    for point in points:
        r = _run(point, tree, out)
        assert r.returncode == -9, (point, r.returncode, r.stderr[-3000:])
        progress.append((point, _n_records(out)))
    assert 0 < progress[-1][1] < 12
    final = _run("none", tree, out)
    assert final.returncode == 0, final.stderr[-3000:]
    for s in SIGMAS:
        assert _records(cp.tsv_path(out, float(s))) == _records(cp.tsv_path(tmp_path / "ref", float(s)))
    assert json.loads((out / "certified_accuracy.json").read_text()) == json.loads(
        (tmp_path / "ref" / "certified_accuracy.json").read_text())
    assert (out / "certified_accuracy.csv").read_bytes() == (tmp_path / "ref" / "certified_accuracy.csv").read_bytes()
    assert not list(out.glob(".*.tmp"))
    print(f"(kill point, records after it): {progress}")
