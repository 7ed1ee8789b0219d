"""train/certify.py's guarantees: results only ever extended by runs that agree on what they depend on
(data, checkpoint content, n, ...), TSVs of unknown origin refused, bad input refused before anything is
written, and the papers' protocol as the default, with the radius cap and the cost said before the run.

References: scipy (Clopper-Pearson via Beta, Phi^-1) for the radius cap, locuslab/smoothing's certify.py
argparse (N0 = 100, N = 100,000, alpha = 0.001) and experiments.MD (ImageNet: --skip 100) for the defaults.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import norm

from diffaug_fast.eval import certify as cp
from diffaug_fast.eval.smoothing import Smooth, max_certifiable_radius

VIT = {"arch": "vit_tiny_patch16_224", "model_source": "timm", "model_kwargs": {"img_size": 32, "depth": 1},
       "image_size": 32, "resize_size": 36}


def _images(folder: Path, n: int, rng, bright: float):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        px = np.clip(rng.normal(255 * bright, 40, (40, 40, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(px).save(folder / f"{i}.jpg")


def _vit(path: Path, seed: int, size: int = 32):
    import timm

    torch.manual_seed(seed)
    s = {**VIT, "model_kwargs": {"img_size": size, "depth": 1}, "image_size": size, "resize_size": size + 4}
    vit = timm.create_model(VIT["arch"], num_classes=2, **s["model_kwargs"])
    torch.save({"model": vit.state_dict(), "settings": s, "classes": ["a", "b"]}, path)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """val/ and val2/ (the same class folders and file names, other pixels), two ViTs (32 px, 16 px), a
    timm ResNet at an 18 px crop (not a multiple of adm-tiny's 4x downsampling) and a tiny random UNet."""
    import timm
    from conftest import oracle_model_and_diffusion, randomize_

    import diffaug_fast as df

    root = tmp_path_factory.mktemp("certtree")
    rng = np.random.default_rng(0)
    for name in ("val", "val2"):
        for cls, bright in (("a", 0.3), ("b", 0.7)):
            _images(root / name / cls, 3, rng, bright)
    _vit(root / "vit.pt", 0)
    _vit(root / "vit16.pt", 0, size=16)
    torch.manual_seed(0)
    res = timm.create_model("resnet10t", num_classes=2)
    torch.save({"model": res.state_dict(), "classes": ["a", "b"],
                "settings": {"arch": "resnet10t", "model_source": "timm", "image_size": 18, "resize_size": 20}},
               root / "res18px.pt")
    unet, _ = oracle_model_and_diffusion(df.get_preset("adm-tiny"))
    torch.save(randomize_(unet).state_dict(), root / "unet.pt")
    return root


def _args(tree, out, *extra, ckpt="vit.pt", data="val"):
    return ["--ckpt", str(ckpt if isinstance(ckpt, Path) else tree / ckpt), "--data", str(tree / data),
            "--n0", "4", "--n", "16", "--skip", "2", "--batch-size", "16", "--loader", "torch", "--workers", "0",
            "--out", str(out), *extra]


def _records(tsv: Path) -> list[list[str]]:
    return [ln.split("\t")[:5] for ln in tsv.read_text().splitlines()[1:]]


# ---------------------------------------------------------------------------------------------------- 22.4


def test_rerun_with_other_data_is_refused_naming_data(tree, tmp_path, capsys):
    out = tmp_path / "c"
    first = cp.main(_args(tree, out, "--sigma", "0.25"))
    before = (out / "sigma_0.25.tsv").read_bytes()
    with pytest.raises(SystemExit, match=r"other settings \(data: \['.*val'\] -> \['.*val2'\]\); pass --overwrite"):
        cp.main(_args(tree, out, "--sigma", "0.25", data="val2"))
    assert json.loads((out / "settings.json").read_text())["data"].endswith("val")  # not rewritten
    assert (out / "sigma_0.25.tsv").read_bytes() == before
    # --overwrite: val2's own certificates, the same as a fresh folder gets
    second = cp.main(_args(tree, out, "--sigma", "0.25", "--overwrite", data="val2"))
    fresh = cp.main(_args(tree, tmp_path / "fresh", "--sigma", "0.25", data="val2"))
    assert _records(out / "sigma_0.25.tsv") == _records(tmp_path / "fresh" / "sigma_0.25.tsv")
    assert second == fresh
    assert first["per_sigma"]["0.25"]["n_images"] == second["per_sigma"]["0.25"]["n_images"] == 3
    assert "already certified" not in capsys.readouterr().out


def test_same_path_other_checkpoint_content_is_refused(tree, tmp_path):
    ckpt = tmp_path / "model.pt"
    shutil.copy(tree / "vit.pt", ckpt)
    out = tmp_path / "c"
    cp.main(_args(tree, out, "--sigma", "0.5", ckpt=ckpt))
    _vit(ckpt, seed=1)  # retrained in place: same path, same architecture, other weights
    with pytest.raises(SystemExit, match=r"other settings \(ckpt: .*same path, other content"):
        cp.main(_args(tree, out, "--sigma", "0.5", ckpt=ckpt))
    # n0 and seed change the certificates too, and are named
    shutil.copy(tree / "vit.pt", ckpt)
    with pytest.raises(SystemExit, match=r"other settings \(n0, seed: \[4, 0\] -> \[8, 3\]\)"):
        cp.main([*_args(tree, out, "--sigma", "0.5", ckpt=ckpt), "--n0", "8", "--seed", "3"])


def test_tsv_of_unknown_origin_is_refused(tree, tmp_path):
    out = tmp_path / "c"
    out.mkdir()
    forged = cp.HEADER + "".join(f"{i}\t{i // 3}\t{i // 3}\t9.0000\t1\t0.1\n" for i in (0, 2, 4))
    (out / "sigma_0.25.tsv").write_text(forged)
    with pytest.raises(SystemExit, match=r"sigma_0.25.tsv is not listed in its settings.json: certificates of "
                                         "unknown origin; pass --overwrite"):
        cp.main(_args(tree, out, "--sigma", "0.25"))
    assert (out / "sigma_0.25.tsv").read_text() == forged and not (out / "settings.json").exists()
    # also beside a valid settings.json: a TSV for a sigma it does not list
    cp.main(_args(tree, out, "--sigma", "0.25", "--overwrite"))
    assert "9.0000" not in (out / "sigma_0.25.tsv").read_text()
    shutil.copy(out / "sigma_0.25.tsv", out / "sigma_0.5.tsv")
    with pytest.raises(SystemExit, match="sigma_0.5.tsv is not listed"):
        cp.main(_args(tree, out, "--sigma", "0.5"))
    (out / "sigma_0.5.tsv").unlink()
    # a listed TSV whose first line is not the header
    tsv = out / "sigma_0.25.tsv"
    tsv.write_text(tsv.read_text().split("\n", 1)[1])
    with pytest.raises(SystemExit, match="sigma_0.25.tsv is not a certification TSV"):
        cp.main(_args(tree, out, "--sigma", "0.25"))


def test_adding_a_sigma_keeps_the_other_tsvs(tree, tmp_path):
    """Each sigma has its own TSV and Philox key (seed, sigma): certifying another sigma into the folder
    neither changes nor refuses the certificates of the first, and settings.json lists both."""
    out = tmp_path / "c"
    cp.main(_args(tree, out, "--sigma", "0.25"))
    before = (out / "sigma_0.25.tsv").read_bytes()
    table = cp.main(_args(tree, out, "--sigma", "0.25", "0.5"))
    assert (out / "sigma_0.25.tsv").read_bytes() == before
    assert json.loads((out / "settings.json").read_text())["sigmas"] == [0.25, 0.5]
    alone = cp.main(_args(tree, tmp_path / "alone", "--sigma", "0.5"))
    assert table["per_sigma"]["0.5"] == alone["per_sigma"]["0.5"]
    cp.main(_args(tree, out, "--sigma", "0.5"))  # a later run of one of them is a plain resume
    assert json.loads((out / "settings.json").read_text())["sigmas"] == [0.25, 0.5]


# ---------------------------------------------------------------------------------------------------- 22.12


@pytest.mark.parametrize("sigma", ["inf", "nan", "-1", "0"])
def test_sigma_must_be_finite_and_positive(tree, tmp_path, sigma):
    with pytest.raises(SystemExit, match=rf"--sigma {sigma if sigma != '0' else '0.0'}.*: the noise level must be > 0 "
                                         "and finite"):
        cp.main(_args(tree, tmp_path / "c", "--sigma", sigma))
    assert not (tmp_path / "c").exists()


def test_denoiser_that_cannot_take_the_crop_writes_nothing(tree, tmp_path):
    out = tmp_path / "c"
    with pytest.raises(SystemExit, match=r"downsamples 4x, but the classifier's crop is 18x18 .* a multiple of 4"):
        cp.main(_args(tree, out, "--sigma", "0.5", "--unet", str(tree / "unet.pt"), ckpt="res18px.pt"))
    assert not out.exists()


def test_classifier_that_fails_on_its_crop_is_found_by_the_probe(tree, tmp_path):
    """A checkpoint whose recorded crop the model cannot take (a ViT built for 32 px told to run at 16): the
    probe batch fails before the folder is created, in one line."""
    ck = torch.load(tree / "vit.pt", weights_only=True)
    ck["settings"] = {**ck["settings"], "image_size": 16, "resize_size": 18}
    torch.save(ck, tmp_path / "wrong.pt")
    with pytest.raises(SystemExit, match=r"certification fails on a 16x16 image \(the classifier's crop\)"):
        cp.main(_args(tree, tmp_path / "c", "--sigma", "0.5", ckpt=tmp_path / "wrong.pt"))
    assert not (tmp_path / "c").exists()


# ---------------------------------------------------------------------------------------------------- 20.3


def test_defaults_are_cohens_imagenet_protocol_and_cohens_names_work():
    a = cp.parse_args(["--ckpt", "c.pt", "--data", "d"])
    assert (a.n0, a.n, a.alpha, a.skip) == (100, 100_000, 0.001, 100)  # locuslab/smoothing
    b = cp.parse_args(["--ckpt", "c.pt", "--data", "d", "--N0", "10", "--N", "500", "--batch", "7"])
    c = cp.parse_args(["--ckpt", "c.pt", "--data", "d", "--n0", "10", "--n", "500", "--batch-size", "7"])
    assert (b.n0, b.n, b.batch_size) == (c.n0, c.n, c.batch_size) == (10, 500, 7)


@pytest.mark.parametrize("n", [100, 10_000, 100_000])
@pytest.mark.parametrize("alpha", [0.001, 0.05])
def test_max_certifiable_radius_is_the_closed_form(n, alpha):
    """All n counts on the top class: Clopper-Pearson lower bound alpha ** (1/n), radius sigma Phi^-1 of it."""
    for sigma in (0.25, 0.5, 1.0):
        assert max_certifiable_radius(sigma, n, alpha) == pytest.approx(sigma * norm.ppf(alpha ** (1 / n)), rel=1e-9)


def test_radius_cap_figures_and_a_perfect_classifier_reaches_it():
    assert round(max_certifiable_radius(1.0, 10_000, 0.001), 2) == 3.20
    assert round(max_certifiable_radius(1.0, 100_000, 0.001), 2) == 3.81

    class Always0(torch.nn.Module):
        def forward(self, x):
            return torch.stack([torch.ones(len(x)), torch.zeros(len(x))], 1)

    x = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(0))
    label, radius = Smooth(Always0(), 2, 0.5).certify(x, 10, 2_000, 0.001, 500)
    assert label == 0 and radius == pytest.approx(0.5 * norm.ppf(0.001 ** (1 / 2_000)), rel=1e-9)


class _Counting(torch.nn.Module):
    """Records the batch size of every call of ``inner``."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.sizes = inner, []

    def forward(self, x, *rest):
        self.sizes.append(len(x))
        return self.inner(x, *rest)


def test_monte_carlo_sends_batches_never_n_images():
    """n = 100,000 (the default) at --batch-size 1000: no classifier call sees more than 1000 images, and the
    calls add up to n0 + n exactly."""
    w = torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(1))
    clf = _Counting(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 2)))
    with torch.no_grad():
        clf.inner[1].weight.copy_(torch.stack([w.flatten(), -w.flatten()]))
    Smooth(clf, 2, 0.25).certify(torch.rand(3, 8, 8), 100, 100_000, 0.001, 1000)
    assert max(clf.sizes) == 1000 and sum(clf.sizes) == 100_100 and len(clf.sizes) == 1 + 100


def test_denoised_monte_carlo_batches_the_unet_too(tree):
    import diffaug_fast as df

    den = df.load_denoiser(str(tree / "unet.pt"), "adm-tiny")
    calls = []
    den.register_forward_pre_hook(lambda m, args: calls.append(len(args[0])))
    clf = _Counting(lambda x: x.mean((2, 3))[:, :2])
    Smooth(clf, 2, 0.5, den).certify(torch.rand(3, 16, 16), 10, 150, 0.001, 64)
    assert calls == clf.sizes == [10, 64, 64, 22]


def test_protocol_radius_cap_and_cost_printed_before_the_run(tree, tmp_path, capsys):
    import diffaug_fast as df
    from diffaug_fast.bank import unet_gflops

    out = tmp_path / "c"
    cp.main(_args(tree, out, "--sigma", "0.25", "1.0", "--max", "1", "--unet", str(tree / "unet.pt"), ckpt="vit16.pt"))
    text = capsys.readouterr().out
    head = text[: text.index("sigma 0.25: denoising")]  # all of it printed before the first certificate
    cap = [0.25 * norm.ppf(0.001 ** (1 / 16)), 1.0 * norm.ppf(0.001 ** (1 / 16))]
    assert f"largest certifiable radius at n = 16, alpha = 0.001: {cap[1]:.2f} sigma = {cap[0]:.2f} (sigma 0.25), " \
           f"{cap[1]:.2f} (sigma 1)" in head
    calls = 1 * 2 * (4 + 16)  # images x sigmas x (n0 + n)
    assert f"2 of 2 (image, sigma) certificates to go: {calls:,} classifier calls (and as many UNet calls" in head
    g = unet_gflops(df.load_denoiser(str(tree / "unet.pt")), 16)
    assert f"{g:.2f} GFLOP per call = {g * calls / 1e6:.3f} PFLOP in total" in head
    hours = float(re.search(r"about ([0-9.]+) h at the ([0-9.]+) noisy views/s", head).group(1))
    assert 0 <= hours < 1
    cp.main(_args(tree, out, "--sigma", "0.25", "1.0", "--max", "1", "--unet", str(tree / "unet.pt"), ckpt="vit16.pt"))
    assert "0 of 2 (image, sigma) certificates to go: 0 classifier calls" in capsys.readouterr().out
