"""The embedded demo dataset: layout, labels by folder, corrupted copy, created once."""

from __future__ import annotations

import numpy as np
from PIL import Image

from diffaug_fast.data.synthetic import CLASSES, CORRUPTIONS, OOD_CLASSES, make_synthetic_dataset


def test_layout_and_reuse(tmp_path):
    root = make_synthetic_dataset(tmp_path / "syn", train_per_class=3, val_per_class=2, size=32, severities=(1, 5))
    for split, n in (("train", 3), ("val", 2)):
        assert sorted(p.name for p in (root / split).iterdir()) == sorted(CLASSES)
        for cls in CLASSES:
            files = list((root / split / cls).glob("*.jpg"))
            assert len(files) == n
            assert Image.open(files[0]).size == (32, 32)
    for kind in CORRUPTIONS:
        for sev in (1, 5):
            assert len(list((root / "val-c" / kind / str(sev)).glob("*/*.jpg"))) == 2 * len(CLASSES)
    for cls in OOD_CLASSES:
        assert cls not in CLASSES
        files = sorted((root / "ood" / cls).glob("*.jpg"))
        assert len(files) == 100 and Image.open(files[0]).size == (32, 32)
    stamp = (root / "COMPLETE").stat().st_mtime_ns
    assert make_synthetic_dataset(tmp_path / "syn") == root
    assert (root / "COMPLETE").stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert not [p for p in tmp_path.iterdir() if p.name != "syn"]  # no temporary folder left


def test_corruption_strength_grows_with_severity(tmp_path):
    root = make_synthetic_dataset(tmp_path / "syn", train_per_class=1, val_per_class=2, size=32, severities=(1, 5))
    clean = np.stack([np.asarray(Image.open(p), dtype=np.float32) for p in sorted((root / "val").glob("*/*.jpg"))])
    for kind in CORRUPTIONS:
        err = []
        for sev in (1, 5):
            imgs = sorted((root / "val-c" / kind / str(sev)).glob("*/*.jpg"))
            arr = np.stack([np.asarray(Image.open(p), dtype=np.float32) for p in imgs])
            err.append(np.abs(arr - clean).mean())
        assert err[1] > err[0] > 0.5, kind


def test_ood_images_differ_from_every_class_and_leave_the_others_unchanged(tmp_path):
    """ood/ has its own random stream: the train/val images equal those of a build without it."""
    a = make_synthetic_dataset(tmp_path / "a", train_per_class=2, val_per_class=2, size=32, ood_per_class=5)
    b = make_synthetic_dataset(tmp_path / "b", train_per_class=2, val_per_class=2, size=32, ood_per_class=0)
    assert not (b / "ood").exists()
    for p in sorted((a / "train").glob("*/*.jpg")) + sorted((a / "val").glob("*/*.jpg")):
        assert (p.read_bytes() == (b / p.relative_to(a)).read_bytes()), p
    ood = np.stack([np.asarray(Image.open(p), dtype=np.float32) for p in sorted((a / "ood").glob("*/*.jpg"))])
    assert ood.shape == (5, 32, 32, 3) and ood.std() > 20  # drawn shapes, not blank
