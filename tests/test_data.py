"""diffaug_fast.data on JPEG trees generated here: scan + bad files, labels, shards, views, backends, resume."""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image, ImageFile
from torchvision.datasets import ImageFolder

from diffaug_fast.data import available_backends, build_loader, scan_dataset
from diffaug_fast.data import scan as scan_mod
from diffaug_fast.data.plan import train_boxes

BACKENDS = available_backends()
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# good files: (class, name, width, height, kind); sizes mix landscape/portrait/odd/ImageNet-like ones
GOOD = [
    ("zebra", "a.jpg", 500, 375, "rgb"), ("zebra", "b.jpg", 375, 500, "rgb"), ("zebra", "c.jpg", 333, 257, "gray"),
    ("zebra", "sub/d.jpg", 260, 300, "rgb"), ("ant", "a.jpg", 300, 224, "cmyk"), ("ant", "b.JPEG", 241, 263, "rgb"),
    ("ant", "png_named.jpg", 280, 250, "png_rgba"), ("ant", "c.jpg", 400, 300, "rgb"), ("mole", "a.jpg", 64, 48, "rgb"),
    ("mole", "b.jpg", 257, 256, "rgb"), ("mole", "c.jpg", 300, 40, "rgb"), ("mole", "d.jpg", 250, 333, "rgb"),
    ("mole", "e.jpg", 226, 230, "gray"),
]
# bad files: (class, name) -> substring of the reason the scan must give
BAD = {
    ("zebra", "truncated.jpg"): "truncated", ("ant", "empty.jpg"): "empty", ("ant", "tiny.jpg"): "too small",
    ("mole", "long.jpg"): "elongated", ("mole", "notes.txt"): "not an image", ("zebra", "deep.png"): "mode I;16",
}


def _pixels(w: int, h: int, seed: int) -> np.ndarray:
    """Smooth gradients + mild noise: photo-like enough that resampling differences stay at rounding level."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([255 * xx / w, 255 * yy / h, 127 + 100 * np.sin((xx + 2 * yy) / 17)], -1)
    return np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)


def _write(path: str, w: int, h: int, kind: str, seed: int) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    im = Image.fromarray(_pixels(w, h, seed))
    if kind == "gray":
        im.convert("L").save(path, "JPEG", quality=90)
    elif kind == "cmyk":
        im.convert("CMYK").save(path, "JPEG", quality=90)
    elif kind == "png_rgba":
        im.convert("RGBA").save(path, "PNG")
    else:
        im.save(path, "JPEG", quality=90)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("imgs"))
    for n, (cls, name, w, h, kind) in enumerate(GOOD):
        _write(os.path.join(root, cls, name), w, h, kind, n)
    d = lambda cls, name: os.path.join(root, cls, name)  # noqa: E731
    _write(d("zebra", "truncated.jpg"), 300, 200, "rgb", 99)
    data = open(d("zebra", "truncated.jpg"), "rb").read()
    open(d("zebra", "truncated.jpg"), "wb").write(data[: len(data) * 6 // 10])
    open(d("ant", "empty.jpg"), "wb").close()
    _write(d("ant", "tiny.jpg"), 4, 3, "rgb", 98)
    _write(d("mole", "long.jpg"), 1000, 20, "rgb", 97)
    open(d("mole", "notes.txt"), "w").write("annotation file, not an image\n")
    Image.fromarray(_pixels(40, 30, 3)[..., 0].astype(np.uint16) * 200).save(d("zebra", "deep.png"))
    open(d("mole", ".DS_Store"), "wb").write(b"\0\1junk")  # hidden: ignored entirely
    return root


@pytest.fixture(scope="module")
def index(tree, tmp_path_factory):
    return scan_dataset(tree, cache=str(tmp_path_factory.mktemp("cache")), progress=False, num_workers=2)


def _loader(index, split, backend, **kw):
    kw.setdefault("batch_size", 4)
    kw.setdefault("num_workers", 2 if backend == "dali" else 0)
    return build_loader(index, split, backend=backend, **kw)


def _all(loader, key="index"):
    return [b[key] for b in loader]


def test_scan_labels_and_bad_files(tree, index, tmp_path, monkeypatch):
    good = {os.path.join(tree, c, n) for c, n, *_ in GOOD}
    assert set(index.files) == good
    assert index.classes == ["ant", "mole", "zebra"]
    # independent reference: torchvision's ImageFolder restricted to the valid files
    ref = dict(ImageFolder(tree, is_valid_file=lambda p: p in good).samples)
    assert dict(zip(index.files, index.labels, strict=True)) == ref
    reasons = {tuple(os.path.relpath(p, tree).split(os.sep)): r for p, r in index.bad}
    assert set(reasons) == set(BAD)
    for key, want in BAD.items():
        assert want in reasons[key], (key, reasons[key])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # a user's global setting must not hide truncation
    again = scan_dataset(tree, cache=False, progress=False)
    assert again.bad == index.bad and ImageFile.LOAD_TRUNCATED_IMAGES
    for f, (h, w) in zip(index.files, index.sizes, strict=True):
        assert Image.open(f).size == (w, h)
    rep = index.report()
    assert f"{len(BAD)} bad files" in rep and "truncated.jpg" in rep and "notes.txt" in rep
    index.save_classes(tmp_path / "classes.json")
    assert json.load(open(tmp_path / "classes.json"))["classes"] == index.classes
    with pytest.raises(ValueError, match=r"bad image file .*(truncated|empty|tiny|long|notes|deep)"):
        scan_dataset(tree, strict=True, cache=False, progress=False)


def test_scan_cache_follows_tree_mtime(tree, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = scan_dataset(tree, cache=str(cache), progress=False, num_workers=1)
    assert len(list(cache.iterdir())) == 1

    def no_scan(*a, **k):
        raise AssertionError("rescanned although the tree did not change")

    monkeypatch.setattr(scan_mod, "_scan", no_scan)
    again = scan_dataset(tree, cache=str(cache), progress=False)
    assert (again.files, again.labels, again.bad) == (first.files, first.labels, first.bad)
    monkeypatch.undo()
    extra = os.path.join(tree, "ant", "zz_new.jpg")
    _write(extra, 230, 240, "rgb", 7)
    try:
        grown = scan_dataset(tree, cache=str(cache), progress=False, num_workers=1)
        assert extra in grown.files and len(grown) == len(first) + 1
    finally:
        os.remove(extra)


def test_parallel_scan_matches_inline(tree, index, monkeypatch):
    monkeypatch.setattr(scan_mod, "_INLINE_BELOW", 0)  # force the process pool on this small tree
    par = scan_dataset(tree, cache=False, progress=True, num_workers=2)
    assert (par.files, par.labels, par.sizes, par.bad) == (index.files, index.labels, index.sizes, index.bad)


def test_file_list(tree, tmp_path):
    lst = tmp_path / "list.txt"
    lst.write_text("# path label\nzebra/a.jpg 5\nant/c.jpg 0\n\nmole/notes.txt 2\nzebra/sub/d.jpg 1\n")
    idx = scan_dataset(tree, file_list=lst, cache=False, progress=False)
    assert [os.path.relpath(f, tree) for f in idx.files] == ["zebra/a.jpg", "ant/c.jpg", "zebra/sub/d.jpg"]
    assert idx.labels == [5, 0, 1] and len(idx.classes) == 6 and len(idx.bad) == 1
    lst.write_text("zebra/a.jpg cat\n")
    with pytest.raises(ValueError, match=":1: expected"):
        scan_dataset(tree, file_list=lst, cache=False, progress=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_sample_once_per_epoch_across_two_shards(index, backend):
    n = len(index)
    for split in ("train", "val"):
        seen = []
        for shard in (0, 1):
            ld = _loader(index, split, backend, shard_id=shard, num_shards=2, drop_last=False, seed=3)
            ld.set_epoch(1)
            batches = list(ld)
            assert len(batches) == len(ld)
            for b in batches:
                assert torch.equal(b["label"], torch.tensor([index.labels[i] for i in b["index"].tolist()]))
            seen += torch.cat([b["index"] for b in batches]).tolist()
        assert sorted(seen) == list(range(n)), split
    # drop_last (the train default): equal batch counts per shard, still no sample twice
    lds = [_loader(index, "train", backend, shard_id=s, num_shards=2, batch_size=3) for s in (0, 1)]
    got = [torch.cat(_all(ld)).tolist() for ld in lds]
    assert len(lds[0]) == len(lds[1]) == (n // 2) // 3 and len(got[0]) == len(got[1]) == 3 * len(lds[0])
    assert not set(got[0]) & set(got[1])


def test_epochs_reproducible_and_reshuffled(index):
    order = lambda ep, seed=0: torch.cat(_all_epoch(index, ep, seed)).tolist()  # noqa: E731
    assert order(2) == order(2) and order(2) != order(3) and order(2, 0) != order(2, 1)


def _all_epoch(index, epoch, seed):
    ld = _loader(index, "train", "torch", seed=seed, drop_last=False)
    ld.set_epoch(epoch)
    return _all(ld)


def _reference_center(path: str) -> np.ndarray:
    """torchvision's own val transform on the PIL image: the independent reference for val/diffaug views."""
    return np.asarray(T.Compose([T.Resize(256), T.CenterCrop(224)])(Image.open(path).convert("RGB")), dtype=int)


@pytest.mark.parametrize("backend", BACKENDS)
def test_view_geometry_and_values(index, backend):
    ld = _loader(index, "train", backend, batch_size=len(index), drop_last=False, seed=5)
    ld.set_epoch(4)
    (b,) = list(ld)
    assert b["clean"].shape == b["diffaug"].shape == (len(index), 224, 224, 3)
    assert b["clean"].dtype == b["diffaug"].dtype == torch.uint8 and b["label"].dtype == torch.int64
    for j, i in enumerate(b["index"].tolist()):
        img = Image.open(index.files[i]).convert("RGB")
        # diffaug view = Resize(256)+CenterCrop(224), up to resampling rounding
        assert np.abs(b["diffaug"][j].numpy().astype(int) - _reference_center(index.files[i])).max() <= 1
        # clean view = torchvision resized_crop with the plan's box (+flip); borders differ by construction
        # (we resample the box from the full image, torchvision from the cut-out), so compare the interior:
        # the border band is ~2 source pixels wide, i.e. 2*224/crop output pixels when a small crop is enlarged
        h, w = index.sizes[i]
        (top, left, ch, cw), flip = train_boxes(5, 4, i, h, w)
        ref = TF.resized_crop(img, top, left, ch, cw, [224, 224])
        ref = np.asarray(TF.hflip(ref) if flip else ref, dtype=int)
        my, mx = 2 + 2 * 224 // ch, 2 + 2 * 224 // cw
        diff = np.abs(b["clean"][j].numpy().astype(int) - ref)[my:-my, mx:-mx]
        assert diff.max() <= 1, (index.files[i], flip, diff.max())
        assert 0.08 * h * w * 0.95 <= ch * cw <= h * w and 3 / 4 * 0.95 <= cw / ch <= 4 / 3 * 1.05 or ch * cw == h * w


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,channels_last", [(torch.float32, True), (torch.float16, False), (torch.bfloat16, True)])
def test_float_output_is_normalised_uint8(index, backend, dtype, channels_last, device):
    """Float batches on ``device`` (on cuda: DALI decodes there, the torch backend copies pinned batches)
    are the uint8 batches of the same loader and device, normalised."""
    u8 = _loader(index, "train", backend, drop_last=False, device=device)
    fl = _loader(index, "train", backend, drop_last=False, output="float", dtype=dtype, channels_last=channels_last,
                 device=device)
    for bu, bf in zip(u8, fl, strict=True):
        assert torch.equal(bu["index"].cpu(), bf["index"].cpu())
        bu = {k: v.cpu() for k, v in bu.items()}
        for v in ("clean", "diffaug"):
            x = bf[v]
            assert x.device.type == device.type
            x = x.cpu()
            assert x.shape == (len(bu["index"]), 3, 224, 224) and x.dtype == dtype
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            assert x.is_contiguous(memory_format=fmt)
            mean = torch.tensor(MEAN).view(1, 3, 1, 1)
            std = torch.tensor(STD).view(1, 3, 1, 1)
            ref = (bu[v].permute(0, 3, 1, 2).double() / 255 - mean) / std
            tol = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
            torch.testing.assert_close(x.double(), ref, atol=tol, rtol=0)
            assert x.min() >= ((0 - mean) / std).min() - tol and x.max() <= ((1 - mean) / std).max() + tol


@pytest.mark.skipif("dali" not in BACKENDS, reason="DALI not installed")
def test_dali_and_torch_backends_agree(index):
    for split, views in (("val", ("image",)), ("train", ("clean", "diffaug"))):
        a = list(_loader(index, split, "dali", drop_last=False, seed=1))
        b = list(_loader(index, split, "torch", drop_last=False, seed=1, num_workers=2))  # worker processes
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x["index"], y["index"]) and torch.equal(x["label"], y["label"])
            for v in views:
                # decoders give identical pixels (both libjpeg-turbo); the two antialiased bilinear
                # resamplers round differently: at most 1 level apart each from torchvision -> 2 apart
                d = (x[v].int() - y[v].int()).abs()
                assert d.max() <= 2 and d.float().mean() < 0.5, (split, v, d.max(), d.float().mean())


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_mid_epoch_yields_exactly_the_rest(index, backend):
    kw = dict(shard_id=1, num_shards=2, batch_size=2, drop_last=False, seed=7)
    full = _loader(index, "train", backend, **kw)
    full.set_epoch(3)
    ref = list(full)
    assert full.state_dict()["epoch"] == 4 and full.state_dict()["position"] == 0

    first = _loader(index, "train", backend, **kw)
    first.set_epoch(3)
    it = iter(first)
    got = [next(it), next(it)]
    sd = first.state_dict()
    assert (sd["epoch"], sd["position"], sd["samples"]) == (3, 2, 4)

    resumed = _loader(index, "train", backend, **kw)
    resumed.load_state_dict(sd)
    resumed.set_epoch(3)  # the trainer's usual call must not throw the restored position away
    got += list(resumed)
    assert len(got) == len(ref)
    for g, r in zip(got, ref, strict=True):
        assert torch.equal(g["index"], r["index"]) and torch.equal(g["label"], r["label"])
        assert torch.equal(g["clean"], r["clean"]) and torch.equal(g["diffaug"], r["diffaug"])
    # the abandoned iterator's loader continues where it stopped, then the next epoch starts afresh
    assert torch.equal(torch.cat(_all(first)), torch.cat([r["index"] for r in ref[2:]]))
    assert first.epoch == 4 and len(list(first)) == len(ref)
    with pytest.raises(ValueError, match="batch_size"):
        _loader(index, "train", backend, **{**kw, "batch_size": 3}).load_state_dict(sd)


@pytest.mark.parametrize("backend", BACKENDS)
def test_new_iteration_while_an_old_one_is_open(index, backend):
    ld = _loader(index, "val", backend, batch_size=2)
    ref = torch.cat(_all(ld)).tolist()  # full pass: the pipeline is reused below
    it = iter(ld)
    head = [next(it)["index"] for _ in range(2)]
    tail = _all(ld)  # `it` is still alive with batches prefetched inside its pipeline
    assert torch.cat(head + tail).tolist() == ref
    del it
    assert torch.cat(_all(ld)).tolist() == ref


def test_bad_arguments(index):
    with pytest.raises(ValueError, match="available"):
        build_loader(index, "train", batch_size=2, backend="nope")
    with pytest.raises(ValueError, match="split"):
        build_loader(index, "test", batch_size=2)
    with pytest.raises(ValueError, match="dtype"):
        build_loader(index, "train", batch_size=2, output="float", dtype=torch.int32)
    with pytest.raises(ValueError, match="shard_id"):
        build_loader(index, "train", batch_size=2, shard_id=2, num_shards=2)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            build_loader(index, "train", batch_size=2, device="cuda")
    assert build_loader(index, "val", batch_size=2, device="auto").backend == BACKENDS[0]


# ---------------------------------------------------------------------------------------------------- changed files


def _small_tree(root) -> str:
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        os.makedirs(root / c)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / c / f"{i}.jpg", quality=90)
    return str(root)


def _break(path: str, how: str) -> None:
    """Make a scanned image undecodable in place (same name, the folder's mtime kept so the scan cache would
    not notice either): garbage bytes, or the JPEG cut short (its header intact)."""
    st = os.stat(os.path.dirname(path))
    data = open(path, "rb").read()
    open(path, "wb").write(b"no longer an image " * 20 if how == "garbage" else data[: len(data) * 9 // 10])
    os.utime(os.path.dirname(path), ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize("batch_size", [4, 1])  # 1: a batch with nothing left in it
@pytest.mark.parametrize("how", ["garbage", "truncated"])
def test_images_broken_after_the_scan_are_skipped_alike_by_both_backends(tmp_path, how, batch_size):
    """An image that cannot be decoded any more is left out of its batch, named once as a warning and listed
    in ``loader.skipped``, by every backend, with the same batches otherwise (DALI used to fail the epoch
    with a traceback of its pipeline)."""
    index = scan_dataset(_small_tree(tmp_path / "t"), cache=False, progress=False)
    victims = {2: index.files[2], 5: index.files[5]}
    for path in victims.values():
        _break(path, how)
    got = {}
    for backend in BACKENDS:
        loader = build_loader(index, "train", batch_size=batch_size, backend=backend, crop_size=16,
                              resize_size=20, num_workers=1, seed=3, output="float", dtype=torch.float32)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            epochs = [[b["index"].tolist() for b in loader] for _ in range(2)]
            for b in loader:  # a third epoch: batch tensors agree in length, an empty batch included
                assert b["clean"].shape[0] == b["diffaug"].shape[0] == b["label"].shape[0] == b["index"].shape[0]
        named = [str(w.message) for w in caught if "cannot be read any more" in str(w.message)]
        assert sorted(named) == sorted(f"skipped {p}: it cannot be read any more (changed after the scan); rescan "
                                       "the dataset to drop it for good" for p in victims.values()), backend
        assert loader.skipped == victims
        assert sorted(i for e in epochs for b in e for i in b) == sorted(2 * [i for i in range(8) if i not in victims])
        got[backend] = epochs
    assert all(g == got[BACKENDS[0]] for g in got.values())


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_extra_view_source_error_surfaces_as_itself_at_its_batch(index, backend):
    """A stored view that cannot be given (the bank's BankError on a checksum mismatch) is raised as itself
    when the loader reaches that image's batch, after the batches before it (DALI, which reads views ahead,
    used to raise it early, wrapped in its pipeline's traceback)."""
    from diffaug_fast.bank import BankError

    blank = _png(224)

    def view(epoch, i):
        if i == victim:
            raise BankError(f"damaged view in bank B: shard shard-00000.tar, image {i}, view 0: checksum mismatch")
        return blank

    ld = _loader(index, "train", backend, seed=2, num_workers=0 if backend == "torch" else 1,
                 extra_views={"bank": view})
    plan = [b.tolist() for b in ld._plan()]
    victim = plan[1][2]
    it = iter(ld)
    assert next(it)["index"].tolist() == plan[0]
    with pytest.raises(BankError, match=rf"damaged view in bank B: shard shard-00000.tar, image {victim}, view 0"):
        next(it)


def _png(size: int) -> bytes:
    import io

    buf = io.BytesIO()
    Image.new("RGB", (size, size)).save(buf, format="PNG")
    return buf.getvalue()
