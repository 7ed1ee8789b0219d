"""The demo and the picture helpers."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffaug_fast import demo
from diffaug_fast.viz import sample_images, save_grid, to_uint8


def test_sample_images_distinct_and_in_range():
    x = sample_images(64)
    assert x.shape == (4, 3, 64, 64) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    flat = x.flatten(1)
    assert torch.cdist(flat, flat).triu(1)[torch.triu(torch.ones(4, 4, dtype=torch.bool), 1)].min() > 10


def test_save_grid_layout_and_pixels(tmp_path):
    a = torch.full((2, 3, 8, 8), -1.0)
    b = torch.ones(2, 3, 8, 8)
    path = save_grid([a, b], tmp_path / "g.png", pad=2)
    img = np.asarray(Image.open(path))
    assert img.shape == (2 + 2 * (8 + 2), 2 + 2 * (8 + 2), 3)
    assert (img[2:10, 2:10] == 0).all() and (img[2:10, 12:20] == 255).all()
    assert not (tmp_path / "g.png.tmp").exists()
    with pytest.raises(ValueError, match="same shape"):
        save_grid([a, b[:1]], tmp_path / "bad.png")


def test_to_uint8_round_trip():
    x = torch.randint(0, 256, (1, 3, 4, 4)).float() / 127.5 - 1
    back = to_uint8(x)
    assert back.dtype == np.uint8
    assert np.array_equal(back, ((x + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())


def test_demo_writes_grid(tmp_path, capsys):
    path = demo.main(["--size", "32", "--t", "0", "999", "--out", str(tmp_path / "grid.png")])
    img = np.asarray(Image.open(path))
    assert img.shape[0] > 4 * 32 and img.shape[1] > 3 * 32
    out = capsys.readouterr().out
    assert "random-weight" in out and "pretrained checkpoint" in out and "img/s" in out


# ---------------------------------------------------------------------------------------------------- make demo

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_make_demo_runs_the_study_and_prints_its_table(tmp_path):
    """`make demo` exactly as the Makefile runs it (`python -m diffaug_fast.study --demo`, here into a temporary
    --out): the shipped denoiser is used (nothing trained but the two classifiers), both classifiers learn the
    four shape classes (clean top-1 >= 90%), and the printed table is table.md, whose cells are the mean of the
    per-split rows of study.csv; study.png and views.png are written."""
    r = subprocess.run([sys.executable, "-m", "diffaug_fast.study", "--demo", "--out", str(tmp_path / "demo"),
                        "--no-progress"], cwd=REPO, capture_output=True, text=True, timeout=2400)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    out = tmp_path / "demo"
    assert "training the demo's denoiser" not in r.stdout and "demo_denoiser.safetensors" in r.stdout
    table = (out / "table.md").read_text()
    assert table.split("\n", 2)[2].strip() in r.stdout  # the printed table is the file's
    rows = list(csv.DictReader((out / "study.csv").open()))
    clean = {(w["training"], w["method"]): float(w["top1"]) for w in rows if w["corruption"] == "clean"}
    assert clean[("baseline", "plain")] >= 90 and clean[("diffaug", "plain")] >= 90, clean
    # the table's "noise, severity 5" cell of DiffAug + DE is the mean over the noise corruptions of its rows
    noise = [float(w["top1"]) for w in rows if (w["training"], w["method"], w["family"], w["severity"])
             == ("diffaug", "de", "noise", "5")]
    line = next(ln for ln in table.splitlines() if ln.startswith("| DiffAug + DiffAug Ensemble |"))
    heads = next(ln for ln in table.splitlines() if ln.startswith("| training + method |")).split("|")[2:-1]
    col = next(i for i, h in enumerate(heads) if h.strip().startswith("noise, severity 5"))
    assert line.split("|")[2:-1][col].strip().startswith(f"{np.mean(noise):.2f}"), (line, noise)
    for png in ("study.png", "views.png"):
        assert Image.open(out / png).size[0] > 200
