"""OOD detection as OpenOOD v1.5 reports it (20.2), its metrics' input checks (22.8), the eval CLI's checks
before any work (22.11) and the evaluation view, crop ratio and interpolation (20.5).

References: OpenOOD's formulas re-derived in numpy (openood/networks/ash_net.py ash_b / ash_s,
scale_net.py, react_net.py), its search (evaluation_api/evaluator.py hyperparam_search) with sklearn's
roc_auc_score, np.percentile for ReAct's clip value, torchvision's Resize + CenterCrop for the view."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image, ImageFilter
from scipy.special import logsumexp
from sklearn.metrics import roc_auc_score
from torchvision import transforms as T

from diffaug_fast.data import build_loader, scan_dataset
from diffaug_fast.eval import ood
from diffaug_fast.eval.ensemble import val_batches
from diffaug_fast.eval.models import features_and_head, load_classifier

SETTINGS = {"arch": "resnet18", "image_size": 32, "resize_size": 36}
GRID = {"react": (85, 90, 95, 99), "ash": (65, 70, 75, 80, 85, 90, 95), "scale": (65, 70, 75, 80, 85, 90, 95)}


@pytest.fixture(scope="module")
def ev():
    return importlib.import_module("diffaug_fast.eval.evaluate")


def _images(folder: Path, n: int, rng, bright: float, start: int = 0):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + n):
        px = np.clip(rng.normal(255 * bright, 60, (40 + 3 * i, 44, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(px).filter(ImageFilter.GaussianBlur(1)).save(folder / f"{i:03d}.jpg")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """val/{a,b} (10 + 10), idval/ (6, ID-like, flat), ood/ and oodval/ (8 and 6, brighter), a torchvision
    ResNet-18 trainer-style checkpoint at 32 px (random weights: its features are what the detectors read)."""
    root = tmp_path_factory.mktemp("oodtree")
    rng = np.random.default_rng(0)
    _images(root / "val" / "a", 10, rng, 0.3)
    _images(root / "val" / "b", 10, rng, 0.6)
    _images(root / "idval", 6, rng, 0.45)
    _images(root / "ood", 8, rng, 0.8)
    _images(root / "oodval", 6, rng, 0.75)
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=2)
    torch.save({"model": model.state_dict(), "settings": SETTINGS, "classes": ["a", "b"]}, root / "rn.pt")
    return root


def _common(tree, out):
    return ["--ckpt", str(tree / "rn.pt"), "--ood-id", str(tree / "val"), "--batch-size", "8", "--loader", "torch",
            "--workers", "0", "--out", str(out)]


def _features(tree, index_or_dir) -> np.ndarray:
    """Penultimate features [N, D] float64 of the images (sorted, as every OOD-side folder is read)."""
    model, _, info = load_classifier(tree / "rn.pt")
    fh = features_and_head(model)
    index = ood.image_index(index_or_dir) if isinstance(index_or_dir, Path) else index_or_dir
    geo = dict(crop_size=info["crop_size"], resize_size=info["resize_size"], mean=info["mean"], std=info["std"])
    with torch.no_grad():
        return torch.cat([fh.features(x) for x, _ in val_batches(index, batch_size=8, backend="torch", device="cpu",
                                                                  num_workers=0, **geo)]).double().numpy()


def _head(tree):
    model, _, _ = load_classifier(tree / "rn.pt")
    fc = features_and_head(model).head
    return fc.weight.detach().double().numpy(), fc.bias.detach().double().numpy()


# --- numpy re-derivations of OpenOOD v1.5's shaping (one row at a time, k = D - round(D p / 100))


def _k(d, p):
    return d - int(np.round(d * p / 100.0))


def np_ash_b(f, p):
    out = np.zeros_like(f)
    for r, row in enumerate(f):
        top = np.argsort(row)[::-1][: _k(f.shape[1], p)]
        out[r, top] = row.sum() / len(top)
    return out


def np_ash_s(f, p):
    out = np.zeros_like(f)
    for r, row in enumerate(f):
        top = np.argsort(row)[::-1][: _k(f.shape[1], p)]
        out[r, top] = row[top] * np.exp(row.sum() / row[top].sum())
    return out


def np_scale(f, p):
    return np.stack([row * np.exp(row.sum() / np.sort(row)[::-1][: _k(f.shape[1], p)].sum()) for row in f])


def np_energy(name, f, w, b, p, react_fit=None):
    if name == "react":
        f = np.minimum(f, np.percentile(react_fit.ravel(), p))
    else:
        f = {"ash": np_ash_b, "ash_s": np_ash_s, "scale": np_scale}[name](f, p)
    return logsumexp(f @ w.T + b, axis=1)


def sk_auroc(s_id, s_ood):
    return roc_auc_score(np.r_[np.zeros(len(s_id)), np.ones(len(s_ood))], -np.r_[s_id, s_ood])


# ---------------------------------------------------------------------------------------------------- 22.8


def test_metrics_refuse_nan_inf_and_2d_in_one_line():
    rng = np.random.default_rng(0)
    s_id, s_ood = rng.normal(1, 1, 700), rng.normal(0, 1, 300)
    s_id[[3, 50, 70]] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning either: an error that names the problem
        with pytest.raises(ValueError, match=r"^3 NaN and 0 inf among the 700 ID scores") as e:
            ood.metrics(s_id, s_ood)
    assert "\n" not in str(e.value)
    s_ood[[1, 2]] = [np.inf, -np.inf]
    with pytest.raises(ValueError, match=r"^0 NaN and 2 inf among the 300 OOD scores"):
        ood.metrics(np.nan_to_num(s_id), s_ood)
    with pytest.raises(ValueError, match=r"1-D score arrays \[N\]; the ID scores have shape \(350, 2\)") as e:
        ood.metrics(np.nan_to_num(s_id).reshape(350, 2), np.zeros(5))
    assert "\n" not in str(e.value)
    assert ood.metrics(np.nan_to_num(s_id), np.nan_to_num(s_ood, posinf=0, neginf=0))["auroc"] > 0.5


# ---------------------------------------------------------------------------------------------------- 22.11


def _unwritable(tmp_path: Path) -> Path:
    if os.geteuid() != 0:
        d = tmp_path / "ro"
        d.mkdir()
        d.chmod(0o500)
        return d / "out"
    out = Path("/sys/diffaug_fast_eval_out")  # root writes wherever chmod forbids; sysfs takes no new entries
    try:
        out.mkdir()
    except OSError:
        return out
    out.rmdir()
    pytest.skip("no folder here refuses root's writes")


@pytest.mark.parametrize("kind", ["file", "under_a_file", "not_writable"])
def test_out_is_checked_before_any_work(ev, tree, tmp_path, kind, capsys):
    (tmp_path / "f").write_text("not a folder")
    out = {"file": lambda: tmp_path / "f", "under_a_file": lambda: tmp_path / "f" / "sub",
           "not_writable": lambda: _unwritable(tmp_path)}[kind]()
    args = _common(tree, out) + ["--val", str(tree / "val"), "--ood", f"x={tree / 'ood'}", "--detectors", "msp"]
    with pytest.raises(SystemExit, match=r"^--out ") as e:
        ev.main(args)
    assert "\n" not in str(e.value.code)
    assert "top-1" not in capsys.readouterr().out  # nothing was evaluated
    # checked before the checkpoint is even read: a missing --ckpt is not what stops it
    with pytest.raises(SystemExit, match=r"^--out "):
        ev.main([*args, "--ckpt", str(tmp_path / "missing.pt")])


def test_unreadable_ood_files_are_named_and_checked_before_the_id_pass(ev, tree, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(tree / "ood", bad)
    (bad / "zz_truncated.jpg").write_bytes((bad / "000.jpg").read_bytes()[:200])
    (bad / "zz_empty.png").write_bytes(b"")
    out = tmp_path / "o"
    res = ev.main(_common(tree, out) + ["--val", str(tree / "val"), "--ood", f"bad={bad}", "--detectors", "msp"])
    printed = capsys.readouterr().out
    assert "zz_truncated.jpg" in printed and "zz_empty.png" in printed
    assert printed.index("zz_truncated.jpg") < printed.index("top-1")  # named before the first image is scored
    assert res["ood"][0]["n_ood"] == 8
    # a folder of nothing readable stops the run before the --val pass has written anything
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "a.jpg").write_bytes(b"\xff\xd8 not really")
    out2 = tmp_path / "o2"
    with pytest.raises(SystemExit, match=r"none: no readable images"):
        ev.main(_common(tree, out2) + ["--val", str(tree / "val"), "--ood", f"n={tmp_path / 'none'}"])
    assert not (out2 / "results.json").exists()


# ---------------------------------------------------------------------------------------------------- 20.2


@pytest.mark.parametrize("p", [65, 85, 90, 95])
def test_ash_b_and_ash_s_follow_openood(p):
    rng = np.random.default_rng(p)
    f = rng.gamma(1.5, 1.0, (5, 2048))  # post-ReLU-like, no ties
    ours_b = ood.ash_b(torch.from_numpy(f), p).numpy()
    ours_s = ood.ash_s(torch.from_numpy(f), p).numpy()
    np.testing.assert_allclose(ours_b, np_ash_b(f, p), rtol=1e-12)
    np.testing.assert_allclose(ours_s, np_ash_s(f, p), rtol=1e-10)
    np.testing.assert_allclose(ours_b.sum(1), f.sum(1), rtol=1e-12)  # ASH-B keeps the sum, binarized
    assert ((ours_b > 0).sum(1) == _k(2048, p)).all()


def test_aps_search_picks_the_best_validation_auroc():
    rng = np.random.default_rng(1)
    d, k = 64, 10
    head = torch.nn.Linear(d, k).double()
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(rng.normal(0, 1, (k, d))))
    f_id = rng.gamma(2.0, 1.0, (40, d))
    f_ood = rng.gamma(2.0, 1.0, (30, d)) * rng.uniform(0.5, 1.5, (30, 1))
    f_ood[:, :8] *= 3  # OOD activations concentrated differently: the shaping percentile matters
    w, b = head.weight.detach().numpy(), head.bias.detach().numpy()
    varied = False
    for name in ("react", "ash", "ash_s", "scale"):
        grid = GRID.get(name, GRID["ash"])
        ref = {p: sk_auroc(np_energy(name, f_id, w, b, p, f_id), np_energy(name, f_ood, w, b, p, f_id))
               for p in grid}
        best = next(p for p in grid if ref[p] == max(ref.values()))  # OpenOOD: first grid value with the max
        chosen, aurocs = ood.aps_search(head, name, torch.from_numpy(f_id), torch.from_numpy(f_ood))
        assert chosen == best, (name, ref, aurocs)
        assert aurocs == pytest.approx({float(p): a for p, a in ref.items()}, abs=1e-9)
        varied |= len({round(a, 9) for a in ref.values()}) > 1
    assert varied  # the grids give different AUROCs here: choosing is not a formality


def _run(ev, tree, out, *extra):
    return ev.main(_common(tree, out) + ["--ood", f"far={tree / 'ood'}", *extra])


def test_react_is_fitted_on_held_out_id_images(ev, tree, tmp_path):
    # with --ood-val-id: np.percentile of those images' features, every --ood-id image scored
    res = _run(ev, tree, tmp_path / "a", "--ood-val-id", str(tree / "idval"), "--detectors", "react")
    meta = json.loads((tmp_path / "a" / "ood.json").read_text())
    assert meta["react_threshold"] == pytest.approx(np.percentile(_features(tree, tree / "idval").ravel(), 90),
                                                    rel=1e-5)
    assert res["ood"][0]["n_id"] == 20
    # without it: every 5th image of --ood-id (sorted) fits ReAct and none of those is scored
    res = _run(ev, tree, tmp_path / "b", "--detectors", "react")
    meta = json.loads((tmp_path / "b" / "ood.json").read_text())
    index = scan_dataset(tree / "val", cache=False, progress=False)
    files = sorted(index.files)
    held = [i for i, f in enumerate(index.files) if files.index(f) % 5 == 0]
    assert meta["react_threshold"] == pytest.approx(np.percentile(_features(tree, index.subset(held)).ravel(), 90),
                                                    rel=1e-5)
    assert res["ood"][0]["n_id"] == 20 - len(held) == 16
    assert "every 5th image" in meta["fit_split"]


def test_aps_search_in_the_cli_and_the_ash_row_is_ash_b(ev, tree, tmp_path, capsys):
    out = tmp_path / "e"
    res = _run(ev, tree, out, "--ood-val-id", str(tree / "idval"), "--ood-val", f"v={tree / 'oodval'}",
               "--detectors", "react,ash,ash_s,scale")
    printed = capsys.readouterr().out
    meta = json.loads((out / "ood.json").read_text())
    w, b = _head(tree)
    f_val_id, f_val_ood = _features(tree, tree / "idval"), _features(tree, tree / "oodval")
    f_id, f_ood = _features(tree, scan_dataset(tree / "val", cache=False, progress=False)), _features(tree, tree / "ood")
    for name in ("react", "ash", "ash_s", "scale"):
        grid = GRID.get(name, GRID["ash"])
        ref = {p: sk_auroc(np_energy(name, f_val_id, w, b, p, f_val_id), np_energy(name, f_val_ood, w, b, p, f_val_id))
               for p in grid}
        best = next(p for p in grid if ref[p] == max(ref.values()))
        got = meta["percentiles"]["plain"][name]
        assert got["value"] == best and got["how"].startswith("APS"), (name, ref, got)
        row = next(r for r in res["ood"] if r["detector"] == name)
        # the test sets are scored at the chosen percentile; "ash" is ASH-B (OpenOOD's), "ash_s" ASH-S
        want = sk_auroc(np_energy(name, f_id, w, b, best, f_val_id), np_energy(name, f_ood, w, b, best, f_val_id))
        assert row["auroc"] == pytest.approx(want, abs=1e-9) and row["percentile"] == best
    assert "ASH (ASH-B, as OpenOOD v1.5)" in printed and "ASH-S" in printed and "APS: best AUROC" in printed
    # no validation split: the fixed defaults, and the table says so
    _run(ev, tree, tmp_path / "f", "--detectors", "ash,scale")
    assert "OpenOOD's default (no --ood-val split to search on)" in capsys.readouterr().out
    fixed = json.loads((tmp_path / "f" / "ood.json").read_text())["percentiles"]["plain"]
    assert fixed["ash"]["value"] == 90 and fixed["scale"]["value"] == 85


def test_diffaug_ensemble_rows_choose_their_own_percentiles(ev, tree, tmp_path):
    from conftest import oracle_model_and_diffusion, randomize_

    import diffaug_fast as df

    unet, _ = oracle_model_and_diffusion(df.get_preset("adm-tiny"))
    torch.save(randomize_(unet).state_dict(), tmp_path / "unet.pt")
    res = _run(ev, tree, tmp_path / "de", "--ood-val", f"v={tree / 'oodval'}", "--detectors", "msp,ash",
               "--de", "--unet", str(tmp_path / "unet.pt"))
    meta = json.loads((tmp_path / "de" / "ood.json").read_text())
    for variant in ("plain", "de"):
        info = meta["percentiles"][variant]["ash"]
        assert info["how"].startswith("APS") and set(info["val_auroc"]) == {str(float(p)) for p in GRID["ash"]}
        best = max(info["val_auroc"].values())
        assert info["value"] == next(float(p) for p, a in info["val_auroc"].items() if a == best)
    rows = {(r["detector"], r["de"]): r for r in res["ood"]}
    assert set(rows) == {("msp", False), ("msp", True), ("ash", False), ("ash", True)}
    assert rows[("ash", True)]["percentile"] == meta["percentiles"]["de"]["ash"]["value"]
    assert rows[("ash", True)]["n_id"] == 16  # every 5th ID image fitted, not scored, in the DE rows too


def test_metrics_docstring_tells_openood_aupr_history():
    doc = " ".join(ood.metrics.__doc__.split())
    assert "10 Aug 2023 (commit 873e8c2)" in doc and "18 Dec 2023 (commit 4a72488" in doc
    assert "Ours follow the restored names" in doc


# ---------------------------------------------------------------------------------------------------- 20.5


def _edgy(folder: Path, rng):
    """Blocky images with edges (bicubic and bilinear differ there), several aspect ratios."""
    folder.mkdir(parents=True)
    for i, (w, h) in enumerate([(40, 40), (57, 41), (33, 70), (100, 64)]):
        blocks = rng.integers(0, 256, (h // 4 + 1, w // 4 + 1, 3)).astype(np.uint8)
        px = np.kron(blocks, np.ones((4, 4, 1), np.uint8))[:h, :w]
        Image.fromarray(px).filter(ImageFilter.GaussianBlur(0.7)).save(folder / f"{i}.png")


@pytest.mark.parametrize("backend", ["torch", "dali"])
@pytest.mark.parametrize("crop, resize", [(32, 32), (24, 32)])
def test_bicubic_view_is_torchvisions_resize_and_center_crop(tmp_path, crop, resize, backend):
    from diffaug_fast.data.loader import available_backends

    if backend not in available_backends():
        pytest.skip(f"{backend} is not installed here")
    _edgy(tmp_path / "d" / "a", np.random.default_rng(0))
    idx = scan_dataset(tmp_path / "d", cache=False, progress=False)
    views = {}
    for interp in ("bicubic", "bilinear"):  # measured here: torch 0-1 levels off, DALI (CPU) 1 (bilinear 3)
        batch = next(iter(build_loader(idx, "val", batch_size=8, backend=backend, crop_size=crop, resize_size=resize,
                                       num_workers=0 if backend == "torch" else 1, interpolation=interp)))
        views[interp] = batch["image"].numpy().astype(int)
        mode = T.InterpolationMode.BICUBIC if interp == "bicubic" else T.InterpolationMode.BILINEAR
        ref = T.Compose([T.Resize(resize, interpolation=mode), T.CenterCrop(crop)])
        for j, i in enumerate(batch["index"].tolist()):
            want = np.asarray(ref(Image.open(idx.files[i]).convert("RGB"))).astype(int)
            assert np.abs(views[interp][j] - want).max() <= (2 if backend == "torch" else 3), (interp, i)
    assert np.abs(views["bicubic"] - views["bilinear"]).max() > 4  # the option changes the pixels


def test_eval_view_from_the_checkpoint_and_the_flags(ev, tree, tmp_path, capsys):
    model = torch.load(tree / "rn.pt", weights_only=True)
    # a checkpoint of the vit recipe records DeiT-III's view; eval.py uses it unless told otherwise
    ck = {**model, "settings": {**SETTINGS, "eval_crop_ratio": 1.0, "eval_interpolation": "bicubic"}}
    torch.save(ck, tmp_path / "deit.pt")
    _, _, info = load_classifier(tmp_path / "deit.pt")
    assert (info["resize_size"], info["interpolation"]) == (32, "bicubic")
    res = ev.main(["--ckpt", str(tmp_path / "deit.pt"), "--val", str(tree / "val"), "--loader", "torch", "--workers",
                   "0", "--out", str(tmp_path / "a")])
    meta = json.loads((tmp_path / "a" / "results.json").read_text())
    assert (meta["resize_size"], meta["interpolation"]) == (32, "bicubic")
    assert "Resize 32 bicubic + CenterCrop 32 (crop ratio 1), the checkpoint's recipe" in capsys.readouterr().out
    # the same top-1 as torchvision's transform of DeiT (Resize(32, bicubic) + CenterCrop(32)) through the model
    net, _, _ = load_classifier(tmp_path / "deit.pt")
    tf = T.Compose([T.Resize(32, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(32), T.ToTensor(),
                    T.Normalize(info["mean"], info["std"])])
    index = scan_dataset(tree / "val", cache=False, progress=False)
    with torch.no_grad():
        pred = net(torch.stack([tf(Image.open(f).convert("RGB")) for f in index.files])).argmax(1)
    assert res["results"][0]["top1"] == pytest.approx(100 * (pred == torch.tensor(index.labels)).float().mean().item())
    # the flags override it; a checkpoint without the fields keeps its run's view (36, bilinear)
    ev.main(["--ckpt", str(tmp_path / "deit.pt"), "--val", str(tree / "val"), "--eval-crop-ratio", "0.875",
             "--interpolation", "bilinear", "--loader", "torch", "--workers", "0", "--out", str(tmp_path / "b")])
    meta = json.loads((tmp_path / "b" / "results.json").read_text())
    assert (meta["resize_size"], meta["interpolation"]) == (36, "bilinear") and "set by the flags" in meta["protocol"]
    _, _, info = load_classifier(tree / "rn.pt")
    assert (info["resize_size"], info["interpolation"]) == (36, "bilinear")
    with pytest.raises(SystemExit, match=r"--eval-crop-ratio 1.2: must lie in \(0, 1\]"):
        ev.main(["--ckpt", str(tree / "rn.pt"), "--val", str(tree / "val"), "--eval-crop-ratio", "1.2"])


def test_recipes_evaluate_with_their_papers_view(tmp_path):
    from diffaug_fast.data.synthetic import make_synthetic_dataset
    from diffaug_fast.train.recipes import rn50, vit

    assert (rn50.Settings().eval_crop_ratio, rn50.Settings().eval_interpolation) == (0.875, "bilinear")
    assert (vit.Settings().eval_crop_ratio, vit.Settings().eval_interpolation) == (1.0, "bicubic")
    data = make_synthetic_dataset(tmp_path / "syn", train_per_class=4, val_per_class=2, size=40, severities=(2,))
    shutil.rmtree(data / "val-c")
    out = rn50.main(["--data", str(data), "--out", str(tmp_path / "runs"), "--run-name", "r", "--arch", "resnet18",
                     "--max-steps", "1", "--epochs", "1", "--batch-size", "8", "--image-size", "32", "--resize-size",
                     "36", "--eval-crop-ratio", "1.0", "--eval-interpolation", "bicubic", "--diffaug", "off",
                     "--loader", "torch", "--workers", "0", "--no-progress", "--no-de-eval"])
    assert out["eval_view"] == "Resize 32 bicubic + CenterCrop 32 (crop ratio 1)"
    _, _, info = load_classifier(tmp_path / "runs" / "r" / "last.pt")  # eval.py then evaluates the same way
    assert (info["crop_ratio"], info["resize_size"], info["interpolation"]) == (1.0, 32, "bicubic")
