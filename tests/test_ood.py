"""OOD detection: OpenOOD's metrics against sklearn and an independent FPR@95, each detector against its
paper's formula (numpy/scipy) on tiny networks, the feature/head split, and OOD folders."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from scipy.special import logsumexp, softmax
from sklearn.metrics import average_precision_score, roc_auc_score

from diffaug_fast.eval.models import features_and_head
from diffaug_fast.eval.ood import Detectors, image_index, metrics


def _fpr95_independent(s_id, s_ood):
    """Share of ID scored as OOD (-conf >= tau) at the largest tau that catches >= 95% of OOD."""
    for tau in np.unique(np.concatenate([-s_id, -s_ood]))[::-1]:
        if np.mean(-s_ood >= tau) >= 0.95:
            return np.mean(-s_id >= tau)
    raise AssertionError


def _aupr_independent(pos, neg):
    """Trapezoid area under precision(recall), points at every distinct threshold plus (0, 1)."""
    taus = np.unique(np.concatenate([pos, neg]))[::-1]
    rec = [0.0] + [np.mean(pos >= t) for t in taus]
    prec = [1.0] + [np.sum(pos >= t) / (np.sum(pos >= t) + np.sum(neg >= t)) for t in taus]
    return np.trapezoid(prec, rec)


@pytest.mark.parametrize("kind", ["random", "tied", "separable"])
def test_metrics_match_sklearn_and_independent(kind):
    rng = np.random.default_rng(0)
    s_id, s_ood = rng.normal(1, 1, 700), rng.normal(0, 1, 300)
    if kind == "tied":
        s_id, s_ood = np.round(s_id * 2) / 2, np.round(s_ood * 2) / 2  # few distinct values, many ties
    if kind == "separable":
        s_ood = s_ood - 10
    m = metrics(s_id, s_ood)
    is_ood = np.r_[np.zeros(700), np.ones(300)]
    conf = np.r_[s_id, s_ood]
    assert m["auroc"] == pytest.approx(roc_auc_score(is_ood, -conf), abs=1e-12)
    assert m["fpr95"] == pytest.approx(_fpr95_independent(s_id, s_ood), abs=1e-12)
    assert m["aupr_in"] == pytest.approx(_aupr_independent(s_id, s_ood), abs=1e-12)
    assert m["aupr_out"] == pytest.approx(_aupr_independent(-s_ood, -s_id), abs=1e-12)
    if kind == "random":  # without ties the trapezoid area and sklearn's step-wise AP nearly agree
        assert m["aupr_in"] == pytest.approx(average_precision_score(1 - is_ood, conf), abs=0.02)
        assert m["aupr_out"] == pytest.approx(average_precision_score(is_ood, -conf), abs=0.02)
    if kind == "separable":
        assert m == {"auroc": 1.0, "fpr95": 0.0, "aupr_in": 1.0, "aupr_out": 1.0}


@pytest.fixture(scope="module")
def resnet():
    """A torchvision ResNet (one BasicBlock per stage: the full-width trunk, cheap to build)."""
    torch.manual_seed(0)
    from torchvision.models.resnet import BasicBlock, ResNet

    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=5).eval()


def test_feature_head_split_reproduces_the_logits(resnet):
    x = torch.randn(2, 3, 32, 32)
    for model in (resnet, timm.create_model("resnet10t", num_classes=5).eval(),
                  timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=5).eval()):
        fh = features_and_head(model)
        with torch.no_grad():
            torch.testing.assert_close(fh.head(fh.features(x)), model(x), atol=1e-5, rtol=1e-5)


def _paper_scores(feat, w, b, id_feat, p_react=90, p_ash=90, p_scale=85):
    """Each detector's formula on numpy features [B, D] (float64)."""
    lin = lambda f: f @ w.T + b  # noqa: E731
    c = np.percentile(id_feat.ravel(), p_react)
    out = {"msp": softmax(lin(feat), 1).max(1), "maxlogit": lin(feat).max(1), "energy": logsumexp(lin(feat), 1),
           "react": logsumexp(lin(np.minimum(feat, c)), 1)}
    d = feat.shape[1]
    ash, ash_b, scl = [], [], []
    for row in feat:
        order = np.argsort(row)[::-1]
        k_a, k_s = d - round(d * p_ash / 100), d - round(d * p_scale / 100)
        pruned = np.zeros_like(row)
        pruned[order[:k_a]] = row[order[:k_a]]
        ash.append(pruned * np.exp(row.sum() / pruned.sum()))  # ASH-S: prune, then scale by the lost mass
        binary = np.zeros_like(row)
        binary[order[:k_a]] = row.sum() / k_a  # ASH-B (OpenOOD's "ASH"): kept positions share the whole sum
        ash_b.append(binary)
        scl.append(row * np.exp(row.sum() / row[order[:k_s]].sum()))  # SCALE: same ratio, nothing pruned
    out["ash_s"] = logsumexp(lin(np.array(ash)), 1)
    out["ash"] = logsumexp(lin(np.array(ash_b)), 1)
    out["scale"] = logsumexp(lin(np.array(scl)), 1)
    return out


def test_detectors_follow_their_papers(resnet):
    fh = features_and_head(resnet)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        id_feat = fh.features(torch.randn(8, 3, 32, 32, generator=g))
        feat = fh.features(torch.randn(4, 3, 32, 32, generator=g) * 3)
    det = Detectors(fh.head).fit(id_feat)
    ours = det.scores(feat)
    w, b = fh.head.weight.detach().double().numpy(), fh.head.bias.detach().double().numpy()
    ref = _paper_scores(feat.double().numpy(), w, b, id_feat.double().numpy())
    for name in ref:
        np.testing.assert_allclose(ours[name].numpy(), ref[name], rtol=1e-4, atol=1e-5, err_msg=name)
    assert det.react_threshold < feat.max()  # the clip is active on these features
    # the shaping changes the score: ReAct/ASH/SCALE differ from plain energy
    for name in ("react", "ash", "ash_s", "scale"):
        assert not torch.allclose(ours[name], ours["energy"])


def test_ensemble_scores_average_probabilities_and_logits(resnet):
    fh = features_and_head(resnet)
    with torch.no_grad():
        feats = fh.features(torch.randn(12, 3, 32, 32)).view(4, 3, -1)  # [S=4 copies, B=3 images, D]
    det = Detectors(fh.head).fit(feats[0])
    ours = det.scores(feats)
    w, b = fh.head.weight.detach().double().numpy(), fh.head.bias.detach().double().numpy()
    logits = np.stack([f @ w.T + b for f in feats.double().numpy()])
    np.testing.assert_allclose(ours["msp"].numpy(), softmax(logits, 2).mean(0).max(1), rtol=1e-5)
    np.testing.assert_allclose(ours["energy"].numpy(), logsumexp(logits.mean(0), 1), rtol=1e-5)
    with pytest.raises(ValueError, match="call fit"):
        Detectors(fh.head).scores(feats[0])


def test_ood_folders_flat_nested_and_empty(tmp_path):
    img = Image.fromarray(np.zeros((20, 20, 3), np.uint8))
    (tmp_path / "flat").mkdir()
    for i in range(3):
        img.save(tmp_path / "flat" / f"{i}.jpg")
    (tmp_path / "nested" / "a").mkdir(parents=True)
    (tmp_path / "nested" / "b" / "deep").mkdir(parents=True)
    img.save(tmp_path / "nested" / "a" / "x.png")
    img.save(tmp_path / "nested" / "b" / "deep" / "y.JPEG")
    assert len(image_index(tmp_path / "flat")) == 3
    idx = image_index(tmp_path / "nested")
    assert len(idx) == 2 and set(idx.labels) == {0}
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(SystemExit, match="no images found"):
        image_index(tmp_path / "empty")
    with pytest.raises(SystemExit, match="no such directory"):
        image_index(tmp_path / "missing")
