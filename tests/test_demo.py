"""The demo and the picture helpers."""

from __future__ import annotations

import json
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
def test_make_demo_learns_its_classes_and_its_denoiser_denoises(tmp_path):
    """The demo's bar, on the demo exactly as `make demo` runs it (a first run also trains and caches the
    denoiser beside the synthetic data, ~1 min): the classifier learns the four shape classes (clean val top-1
    >= 90% on 400 images), the denoiser's one-step x0 beats the noisy input by >= 3 dB PSNR at t = 100, 250, 500,
    and the printed table has plain and DiffAug Ensemble top-1 for clean val and each corruption, as logged."""
    r = subprocess.run([sys.executable, str(REPO / "train" / "rn50.py"), "--amp", "--out", str(tmp_path),
                        "--no-progress"], cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    log = [json.loads(line) for line in (tmp_path / "demo" / "log.jsonl").read_text().splitlines()]
    summary = [e for e in log if e["event"] == "summary"][-1]
    assert summary["val"]["n"] == 400 and summary["val"]["top1"] >= 90.0, summary["val"]
    gains = {row["t"]: row["psnr_x0"] - row["psnr_noisy"] for row in summary["psnr"]}
    assert all(gains[t] >= 3.0 for t in (100, 250, 500)), gains
    rows = {"clean val": summary["val"]} | {f"{c['corruption']} (severity {c['severity']})": c for c in summary["val_c"]}
    assert len(rows) == 4
    for name, res in rows.items():  # the printed line of each split carries the logged plain, DE and difference
        line = next(ln for ln in r.stdout.splitlines() if ln.strip().startswith(name))
        assert line.split()[-4:] == [f"{res['top1']:.2f}", f"{res['top1_de']:.2f}",
                                     f"{res['top1_de'] - res['top1']:+.2f}", str(res["n"])], line
    assert "model: torchvision resnet18 (the demo's" in r.stdout
    assert (tmp_path / "demo" / "diffaug_views.png").is_file()
