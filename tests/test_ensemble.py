"""DiffAug Ensemble: which t values are averaged, the unmodified t = 0 copy, subset slicing."""

from __future__ import annotations

import pytest
import torch

import diffaug_fast as df
from diffaug_fast.eval.ensemble import (
    DE_TIMESTEPS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ensemble_probs,
    evaluate,
    subset_indices,
)
from diffaug_fast.ops.fused import from_unit, to_unit


class TinyNet(torch.nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, classes)

    def forward(self, x):
        return self.fc(self.conv(x).relu().mean((2, 3)))


@pytest.fixture(scope="module")
def den():
    torch.manual_seed(1)
    unet = df.UNet(df.get_preset("adm-tiny"))
    for m in unet.modules():  # non-zero output layers, so every t gives a different copy
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.normal_(m.weight, std=0.05)
    return df.Denoiser(unet)


def _x(b=3, seed=3):
    g = torch.Generator().manual_seed(seed)
    unit = torch.rand(b, 3, 16, 16, generator=g) * 2 - 1
    return from_unit(unit, IMAGENET_MEAN, IMAGENET_STD)


def test_unit_range_round_trip():
    x = _x()
    torch.testing.assert_close(from_unit(to_unit(x, IMAGENET_MEAN, IMAGENET_STD), IMAGENET_MEAN,
                                               IMAGENET_STD), x, atol=1e-5, rtol=0)


def test_de_uses_exactly_the_paper_timesteps(den):
    assert DE_TIMESTEPS == (0, 50, 100, 150, 200, 250, 300, 350, 400, 450)
    seen = []
    orig = den.forward

    def spy(x_t, t):
        seen.append(sorted(set(t.tolist())))
        return orig(x_t, t)

    den.forward = spy
    try:
        probs = ensemble_probs(TinyNet(), _x(), den)
    finally:
        del den.forward
    assert seen == [[t] for t in DE_TIMESTEPS if t != 0]  # t = 0 never calls the UNet
    assert probs.shape == (10, 3, 10)


def test_de_average_equals_manual_computation(den, device):
    """DE on ``device`` (classifier, denoiser and batch there; noise from a generator of that device)
    equals the copies made one by one with augment and averaged by hand."""
    import copy

    den = den if device.type == "cpu" else copy.deepcopy(den).to(device)
    model, x = TinyNet().to(device), _x().to(device)
    probs = ensemble_probs(model, x, den, generator=torch.Generator(device).manual_seed(9))
    assert probs.device == x.device
    g = torch.Generator(device).manual_seed(9)
    unit = to_unit(x, IMAGENET_MEAN, IMAGENET_STD)
    manual = [model(x).softmax(1)]  # t = 0: the unmodified image
    for t in DE_TIMESTEPS[1:]:
        aug = from_unit(df.augment(unit, den, t=t, generator=g), IMAGENET_MEAN, IMAGENET_STD)
        manual.append(model(aug).softmax(1))
    torch.testing.assert_close(probs, torch.stack(manual).detach())
    assert not torch.allclose(probs[1], probs[-1])  # the copies differ


def test_subset_slicing_before_softmax():
    model = TinyNet(classes=1000)
    train = [f"n{i:08d}" for i in range(1000)]
    subset = train[::5]  # 200 classes, like ImageNet-R / ImageNet-A
    idx = subset_indices(subset, train)
    assert len(idx) == 200 and idx[:3] == [0, 5, 10]
    x = _x()
    probs = ensemble_probs(model, x, None, timesteps=[0], class_idx=idx)
    assert probs.shape == (1, 3, 200)
    torch.testing.assert_close(probs[0], model(x)[:, idx].softmax(1).detach())
    assert subset_indices(train, train) is None
    with pytest.raises(ValueError, match="not among the classifier's"):
        subset_indices(["n99999999"], train)


def test_evaluate_counts(den, device):
    import copy

    den = den if device.type == "cpu" else copy.deepcopy(den).to(device)
    model = TinyNet(classes=4).to(device)
    x = _x(6).to(device)
    y = model(x).argmax(1)  # labels the plain model gets right
    res = evaluate(model, [(x, y)], den, seed=0)
    assert res["n"] == 6 and res["top1"] == 100.0 and 0 <= res["top1_de"] <= 100
    res_plain = evaluate(model, [(x, (y + 1) % 4)], None)
    assert res_plain["top1"] == 0.0 and "top1_de" not in res_plain
    with pytest.raises(ValueError, match="needs a denoiser"):
        ensemble_probs(model, x, None)


def test_evaluate_top1_by_t_counts_each_member(den):
    """top1_by_t: each single view's top-1, over two batches, as counted from ensemble_probs with the same
    generator stream (t = 0 is the plain prediction)."""
    class MeanSign(torch.nn.Module):  # class 0 / 1 by the sign of the image mean: noise flips it at large t
        def forward(self, x):
            m = x.mean((1, 2, 3))
            return torch.stack([m, -m, m - 9, m - 9], 1) * 100

    model = MeanSign()
    batches = [(x, model(x).argmax(1)) for x in (_x(6, seed=1), _x(5, seed=2))]  # all right at t = 0
    ts = (0, 100, 400, 900)
    res = evaluate(model, batches, den, timesteps=ts, seed=3)
    g = torch.Generator().manual_seed(3)
    correct = torch.zeros(len(ts))
    for x, y in batches:
        probs = ensemble_probs(model, x, den, timesteps=ts, generator=g)
        correct += (probs.argmax(2) == y).sum(1)
    assert res["top1_by_t"] == {t: pytest.approx(100 * c / 11) for t, c in zip(ts, correct.tolist(), strict=True)}
    assert res["top1_by_t"][0] == res["top1"] == 100.0
    assert res["top1_by_t"][900] < 100.0, res  # the members differ: the counts are per view
