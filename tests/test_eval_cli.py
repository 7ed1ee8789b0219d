"""train/eval.py (top-1, ImageNet-C summary, OOD) and train/certify.py on tiny generated trees, in process:
results written as they complete, resume, checkpoint formats, and one-line errors for bad input."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from diffaug_fast.eval.ensemble import ALEXNET_ERR, CORRUPTIONS, summarize_corruptions
from diffaug_fast.eval.smoothing import certified_accuracy

REPO = Path(__file__).resolve().parents[1]
VIT = {"arch": "vit_tiny_patch16_224", "model_source": "timm", "model_kwargs": {"img_size": 32, "depth": 1},
       "image_size": 32, "resize_size": 36}


def _script(name):
    return importlib.import_module({"eval": "diffaug_fast.eval.evaluate", "certify": "diffaug_fast.eval.certify"}[name])


@pytest.fixture(scope="module")
def cli():
    return _script("eval"), _script("certify")


def _images(folder: Path, n: int, rng, bright: float = 0.5):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        px = np.clip(rng.normal(255 * bright, 40, (40, 40, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(px).save(folder / f"{i}.jpg")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """val/{a,b} (3 images each), imagenet-c/<15 standard + speckle_noise>/5/{a,b}, ood/ (flat), a ViT
    trainer checkpoint (the timm format the ViT trainer saves) and a random tiny UNet checkpoint."""
    root = tmp_path_factory.mktemp("evaltree")
    rng = np.random.default_rng(0)
    for cls, bright in (("a", 0.3), ("b", 0.7)):
        _images(root / "val" / cls, 3, rng, bright)
        for c in (*CORRUPTIONS, "speckle_noise"):
            _images(root / "imagenet-c" / c / "5" / cls, 1, rng, bright)
    _images(root / "ood", 4, rng, 0.5)
    import timm

    torch.manual_seed(0)
    vit = timm.create_model(VIT["arch"], num_classes=2, **VIT["model_kwargs"])
    torch.save({"model": vit.state_dict(), "settings": VIT, "classes": ["a", "b"]}, root / "vit.pt")
    # the same model at 16 px crops: the DiffAug/denoised cases run the UNet 9-20 times per image
    small = {**VIT, "model_kwargs": {"img_size": 16, "depth": 1}, "image_size": 16, "resize_size": 18}
    vit16 = timm.create_model(VIT["arch"], num_classes=2, **small["model_kwargs"])
    torch.save({"model": vit16.state_dict(), "settings": small, "classes": ["a", "b"]}, root / "vit16.pt")
    from conftest import oracle_model_and_diffusion, randomize_

    import diffaug_fast as df

    unet, _ = oracle_model_and_diffusion(df.get_preset("adm-tiny"))
    torch.save(randomize_(unet).state_dict(), root / "unet.pt")
    return root


def test_summarize_corruptions_formula():
    rng = np.random.default_rng(1)
    rows = [{"corruption": c, "severity": s, "top1": float(rng.uniform(5, 70)), "top1_de": float(rng.uniform(5, 70))}
            for c in (*CORRUPTIONS, "speckle_noise") for s in range(1, 6)]
    out = summarize_corruptions(rows)
    std = [r for r in rows if r["corruption"] in CORRUPTIONS]
    assert out["sev5"] == pytest.approx(np.mean([r["top1"] for r in std if r["severity"] == 5]))
    assert out["all_de"] == pytest.approx(np.mean([r["top1_de"] for r in std]))
    ce = [np.mean([1 - r["top1"] / 100 for r in std if r["corruption"] == c]) / ALEXNET_ERR[c] for c in CORRUPTIONS]
    assert out["mce"] == pytest.approx(100 * np.mean(ce))
    assert out["extra"] == ["speckle_noise"] and out["missing"] == []
    # the extra folder never moves the averages
    for r in rows:
        if r["corruption"] == "speckle_noise":
            r["top1"] = 0.0
    assert summarize_corruptions(rows)["sev5"] == out["sev5"]
    # AlexNet's own errors give mCE 100 (the normalization)
    alex = [{"corruption": c, "severity": s, "top1": 100 * (1 - ALEXNET_ERR[c])} for c in CORRUPTIONS
            for s in range(1, 6)]
    assert summarize_corruptions(alex)["mce"] == pytest.approx(100.0)


def test_eval_top1_imagenet_c_and_ood(cli, tree, tmp_path, capsys):
    ev, _ = cli
    out = tmp_path / "eval"
    res = ev.main(["--ckpt", str(tree / "vit.pt"), "--val", str(tree / "val"), "--imagenet-c", str(tree / "imagenet-c"),
                   "--ood", f"noise={tree / 'ood'}", f"same={tree / 'val'}", "--ood-group", "all=noise,same",
                   "--batch-size", "4", "--loader", "torch", "--workers", "0", "--out", str(out)])
    saved = json.loads((out / "results.json").read_text())
    assert saved["results"][0]["n"] == 6 and len(saved["results"]) == 1 + 16
    summary = saved["imagenet_c"][str(tree / "imagenet-c")]
    cells = [r["top1"] for r in saved["results"][1:] if r["corruption"] in CORRUPTIONS]
    assert summary["sev5"] == pytest.approx(np.mean(cells))  # the 15 only
    assert summary["extra"] == ["speckle_noise"] and summary["all"] is None and summary["mce"] is None
    ood = json.loads((out / "ood.json").read_text())["results"]
    assert {(r["dataset"], r["detector"]) for r in ood} == {(d, m) for d in ("noise", "same", "all (mean)")
                                                             for m in ("msp", "maxlogit", "energy", "react", "ash",
                                                                       "scale")}
    same = [r for r in ood if r["dataset"] == "same"]
    assert all(r["auroc"] == pytest.approx(0.5) for r in same)  # ID against itself: chance, exactly
    mean = next(r for r in ood if r["dataset"] == "all (mean)" and r["detector"] == "msp")
    parts = [r["auroc"] for r in ood if r["dataset"] in ("noise", "same") and r["detector"] == "msp"]
    assert mean["auroc"] == pytest.approx(np.mean(parts))
    assert res["ood"] == ood
    printed = capsys.readouterr().out
    assert "severity-5 top-1" in printed and "speckle_noise" in printed and "ASH" in printed


def test_eval_ood_with_diffaug_ensemble(cli, tree, tmp_path):
    ev, _ = cli
    out = tmp_path / "eval"
    ev.main(["--ckpt", str(tree / "vit16.pt"), "--ood-id", str(tree / "val"), "--ood", f"noise={tree / 'ood'}",
             "--detectors", "msp,energy", "--de", "--unet", str(tree / "unet.pt"), "--batch-size", "8",
             "--loader", "torch", "--workers", "0", "--out", str(out)])
    ood = json.loads((out / "ood.json").read_text())["results"]
    assert sorted((r["detector"], r["de"]) for r in ood) == [("energy", False), ("energy", True), ("msp", False),
                                                             ("msp", True)]
    assert all(0 <= r["auroc"] <= 1 for r in ood)


def test_eval_writes_each_result_as_it_completes(cli, tree, tmp_path):
    ev, _ = cli
    bad = tmp_path / "other"
    _images(bad / "zzz", 1, np.random.default_rng(2))
    out = tmp_path / "eval"
    with pytest.raises(SystemExit, match=r"--val .*other: 1 evaluation classes are not among the classifier's 2"):
        ev.main(["--ckpt", str(tree / "vit.pt"), "--val", str(tree / "val"), str(bad), "--loader", "torch", "--workers", "0",
                 "--out", str(out)])
    rows = json.loads((out / "results.json").read_text())["results"]
    assert [r["dataset"] for r in rows] == [str(tree / "val")]  # the finished set survived the failure


def test_bare_state_dict_with_classes_json(cli, tree, tmp_path):
    ev, _ = cli
    model = torchvision.models.mobilenet_v3_small(num_classes=2)
    torch.save(model.state_dict(), tmp_path / "plain.pth")
    (tmp_path / "classes.json").write_text(json.dumps({"root": "x", "classes": ["a", "b"]}))  # the trainer's file
    res = ev.main(["--ckpt", str(tmp_path / "plain.pth"), "--arch", "mobilenet_v3_small", "--classes",
                   str(tmp_path / "classes.json"), "--val", str(tree / "val"), "--loader", "torch", "--workers", "0",
                   "--out", str(tmp_path / "o")])
    assert res["results"][0]["n"] == 6
    (tmp_path / "three.json").write_text(json.dumps(["a", "b", "c"]))
    with pytest.raises(SystemExit, match="has a 2-class head, but 3 classes are listed"):
        ev.main(["--ckpt", str(tmp_path / "plain.pth"), "--arch", "mobilenet_v3_small", "--classes",
                 str(tmp_path / "three.json"), "--val", str(tree / "val")])
    with pytest.raises(SystemExit, match="bare state_dict without class names"):
        ev.main(["--ckpt", str(tmp_path / "plain.pth"), "--arch", "mobilenet_v3_small", "--val", str(tree / "val")])


def test_eval_bad_input(cli, tree, tmp_path):
    ev, _ = cli
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    ck = str(tree / "vit.pt")
    with pytest.raises(SystemExit, match="no images found"):
        ev.main(["--ckpt", ck, "--ood-id", str(tree / "val"), "--ood", f"e={tmp_path / 'empty'}"])
    with pytest.raises(SystemExit, match="not among the --ood sets"):
        ev.main(["--ckpt", ck, "--ood-id", str(tree / "val"), "--ood", f"n={tree / 'ood'}", "--ood-group", "near=x"])
    with pytest.raises(SystemExit, match="unknown nope"):
        ev.main(["--ckpt", ck, "--ood-id", str(tree / "val"), "--ood", f"n={tree / 'ood'}", "--detectors", "msp,nope"])


def _certify(cp, tree, out, *extra, ckpt="vit.pt"):
    return cp.main(["--ckpt", str(tree / ckpt), "--data", str(tree / "val"), "--n0", "4", "--n", "16",
                    "--skip", "2", "--batch-size", "16", "--loader", "torch", "--workers", "0", "--out", str(out), *extra])


def test_certify_table_and_resume(cli, tree, tmp_path):
    _, cp = cli
    out = tmp_path / "cert"
    table = _certify(cp, tree, out, "--sigma", "0.25", "0.5")
    tsv = out / "sigma_0.25.tsv"
    lines = tsv.read_text().splitlines()
    assert lines[0].split("\t") == ["idx", "label", "predict", "radius", "correct", "time"]
    assert [int(ln.split("\t")[0]) for ln in lines[1:]] == [0, 2, 4]
    rows = [ln.split("\t") for ln in lines[1:]]
    assert table["per_sigma"]["0.25"]["accuracy"] == certified_accuracy([float(r[3]) for r in rows],
                                                                        [int(r[4]) for r in rows])
    assert table["best"] == [max(a, b) for a, b in zip(table["per_sigma"]["0.25"]["accuracy"],
                                                        table["per_sigma"]["0.5"]["accuracy"], strict=True)]
    assert (out / "certified_accuracy.png").stat().st_size > 0
    assert (out / "certified_accuracy.csv").read_text().startswith("sigma,n_images,r=0,r=0.5")
    # a kill mid-file: the last record is torn; the rerun redoes only that image, with the same noise
    tsv.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:3])
    _certify(cp, tree, out, "--sigma", "0.25", "0.5")
    again = [ln.split("\t")[:5] for ln in tsv.read_text().splitlines()[1:] if len(ln.split("\t")) == 6]
    assert again == [r[:5] for r in rows]
    with pytest.raises(SystemExit, match=r"other settings \(n: \[16\] -> \[32\]\)"):
        cp.main(["--ckpt", str(tree / "vit.pt"), "--data", str(tree / "val"), "--n0", "4", "--n", "32",
                 "--skip", "2", "--out", str(out)])


def test_certify_denoised(cli, tree, tmp_path, capsys):
    _, cp = cli
    _certify(cp, tree, tmp_path / "c", "--sigma", "0.5", "--max", "1", "--unet", str(tree / "unet.pt"), ckpt="vit16.pt")
    assert len((tmp_path / "c" / "sigma_0.5.tsv").read_text().splitlines()) == 2
    assert "t* = 259" in capsys.readouterr().out


def test_certify_bad_input(cli, tree, tmp_path):
    _, cp = cli
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(SystemExit, match="no valid images"):
        _certify(cp, tree, tmp_path / "o", "--data", str(tmp_path / "empty"))
    with pytest.raises(SystemExit, match="must be > 0"):
        _certify(cp, tree, tmp_path / "o", "--sigma", "0")
    with pytest.raises(SystemExit, match="need 1 <= n0 <= n"):
        _certify(cp, tree, tmp_path / "o", "--n0", "100")
    three = tmp_path / "three"
    for c in "abc":
        _images(three / c, 1, np.random.default_rng(3))
    with pytest.raises(SystemExit, match="has 3 classes, the classifier 2"):
        _certify(cp, tree, tmp_path / "o", "--data", str(three))


def test_demo_lines(cli, tree, tmp_path):
    """The demo's one-liners agree with the full CLIs on the same data."""
    from diffaug_fast.eval.models import load_classifier
    from diffaug_fast.eval.ood import demo_auroc_line
    from diffaug_fast.eval.smoothing import demo_certify_line

    ev, _ = cli
    model, _, info = load_classifier(tree / "vit.pt")
    geometry = dict(crop_size=info["crop_size"], resize_size=info["resize_size"], mean=info["mean"], std=info["std"])
    line = demo_auroc_line(model, tree, backend="torch", **geometry)
    res = ev.main(["--ckpt", str(tree / "vit.pt"), "--ood-id", str(tree / "val"), "--ood", f"ood={tree / 'ood'}",
                   "--detectors", "msp", "--loader", "torch", "--workers", "0", "--out", str(tmp_path / "e")])
    assert f"AUROC {100 * res['ood'][0]['auroc']:.1f}%" in line and "6 ID / 4 OOD" in line
    line = demo_certify_line(model, tree, n_images=2, n0=4, n=20, backend="torch", **geometry)
    assert line.startswith("certified accuracy (randomized smoothing, sigma 0.25, no denoiser, n=20, 2 images)")


def test_timm_checkpoints_deit_style_and_safetensors(tmp_path):
    import timm
    from safetensors.torch import save_file

    from diffaug_fast.eval.models import load_classifier

    torch.manual_seed(0)
    ref = timm.create_model("resnet10t", num_classes=3).eval()
    torch.save({"model": ref.state_dict()}, tmp_path / "deit_style.pth")
    save_file(ref.state_dict(), tmp_path / "w.safetensors")
    x = torch.randn(1, 3, 32, 32)
    for name in ("deit_style.pth", "w.safetensors"):
        model, classes, info = load_classifier(tmp_path / name, arch="resnet10t")
        assert info["source"] == "timm" and classes == ["0", "1", "2"] and not info["classes_known"]
        with torch.no_grad():
            torch.testing.assert_close(model(x), ref(x))
    with pytest.raises(SystemExit, match=r"does not fit timm resnet18d with 3 classes: shape of conv1.0.weight"):
        load_classifier(tmp_path / "w.safetensors", arch="resnet18d")
