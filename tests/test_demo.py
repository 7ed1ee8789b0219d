"""The demo and the picture helpers."""

from __future__ import annotations

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
