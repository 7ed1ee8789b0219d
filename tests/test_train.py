"""train/rn50.py and train/eval.py at tiny scale: learning, exact resume (1 and 2 processes), errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffaug_fast.data.synthetic import make_synthetic_dataset

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "train" / "rn50.py"
EVAL = REPO / "train" / "eval.py"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("data") / "syn", train_per_class=6, val_per_class=2,
                                  size=40, severities=(2,))


def _args(data, out, *extra):
    return ["--data", str(data), "--out", str(out), "--run-name", "r", "--arch", "resnet18", "--epochs", "2",
            "--batch-size", "8", "--image-size", "32", "--resize-size", "36", "--lr", "0.05",
            "--unet-preset", "adm-tiny", "--workers", "1", "--no-progress", "--no-de-eval", "--seed", "3", *extra]


def _run(cmd, **kw):
    # CPU runs on every machine (the exactness and gloo cases assume them); GPU train steps: test_gpu_train.py
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600, **kw)


def _torchrun(n, args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", str(TRAIN), *args]


def _weights(out):
    return torch.load(Path(out) / "r" / "last.pt", weights_only=True)["model"]


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    diff = {k: (a[k].float() - b[k].float()).abs().max().item() for k in a if a[k].is_floating_point()}
    assert max(diff.values()) == 0.0, sorted(diff.items(), key=lambda kv: -kv[1])[:3]


def _resume_equivalence(data, tmp_path, launch):
    full = _run(launch(_args(data, tmp_path / "full")))
    assert full.returncode == 0, full.stderr[-3000:]
    # 24 images / batch 8 = 3 steps per epoch: step 4 of 6 is in the middle of epoch 2
    cut = _run(launch(_args(data, tmp_path / "cut", "--stop-after-steps", "4")))
    assert cut.returncode != 0 and "interrupted: checkpoint saved at epoch 1, step 1" in cut.stdout, cut.stdout
    resumed = _run(launch(_args(data, tmp_path / "cut", "--resume")))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    _assert_same_weights(_weights(tmp_path / "full"), _weights(tmp_path / "cut"))
    ck = torch.load(tmp_path / "cut" / "r" / "last.pt", weights_only=True)
    assert ck["epoch"] == 2 and ck["position"] == 0 and ck["total_steps"] == 6


def test_resume_mid_epoch_gives_identical_weights(data, tmp_path):
    _resume_equivalence(data, tmp_path, lambda a: [sys.executable, str(TRAIN), *a])


def test_resume_mid_epoch_two_process_gloo(data, tmp_path):
    _resume_equivalence(data, tmp_path, lambda a: _torchrun(2, a))


def test_log_states_mode_fraction_unet_and_speed(data, tmp_path):
    res = _run([sys.executable, str(TRAIN), *_args(data, tmp_path, "--diffaug-fraction", "0.5", "--epochs", "1")])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "DiffAug mode: online, fraction 0.5, UNet adm-tiny (random weights)" in res.stdout
    assert "pretrained checkpoint" in res.stdout and "img/s" in res.stdout
    recs = [json.loads(line) for line in (tmp_path / "r" / "log.jsonl").read_text().splitlines()]
    settings = recs[0]
    assert settings["event"] == "settings" and settings["diffaug"] == "online" and settings["diffaug_fraction"] == 0.5
    assert settings["batch_size"] == 8 and settings["unet_name"] == "adm-tiny (random weights)"
    steps = [r for r in recs if r["event"] == "step"]
    assert steps and all(r["images_in_batch"] == 12 for r in steps)  # 8 clean + 4 DiffAug views
    assert recs[-1]["event"] == "summary" and recs[-1]["img_per_s"] > 0
    assert json.loads((tmp_path / "r" / "classes.json").read_text())["classes"] == sorted(os.listdir(data / "train"))


def _fixed_view_ce(data, ckpt) -> float:
    """Cross-entropy of the trained ResNet-18 on the un-augmented views of the 24 training images: torchvision's
    Resize(36) + CenterCrop(32) + ImageNet normalization, one batch, BN on its batch statistics (the statistics
    the network trained with; 30 steps leave its running averages between the random crops' and these)."""
    import torchvision
    import torchvision.transforms as T
    from PIL import Image

    tf = T.Compose([T.Resize(36), T.CenterCrop(32), T.ToTensor(),
                    T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    classes = sorted(os.listdir(data / "train"))
    pairs = [(tf(Image.open(f).convert("RGB")), k) for k, c in enumerate(classes)
             for f in sorted((data / "train" / c).iterdir())]
    model = torchvision.models.resnet18(num_classes=len(classes))
    model.load_state_dict(torch.load(ckpt, weights_only=True)["model"])
    model.train()
    with torch.no_grad():
        logits = model(torch.stack([x for x, _ in pairs]))
    return torch.nn.functional.cross_entropy(logits, torch.tensor([k for _, k in pairs])).item()


def test_loss_falls_on_learnable_set(data, tmp_path):
    """30 full-batch steps learn the 4 classes: the trained network's cross-entropy on the fixed (un-augmented)
    views of its training images is below half the chance level ln 4.

    Not the logged training loss: each step's loss is on that epoch's RandomResizedCrop views (scale down to
    8% of a 40 px image), so it jumps 0.2-1.3 from step to step; "mean of the last 5 steps < half the first 3"
    held with a 2% margin at seed 3 and failed at seed 5, and runs that differ only in float rounding (another
    CPU's oneDNN or ATen kernels, the DALI vs the torch loader) crossed it too. The fixed-view CE was 0.07-0.32
    (vs the bound 0.69) over seeds 0-6, both loaders and those kernel variants."""
    res = _run([sys.executable, str(TRAIN), *_args(data, tmp_path, "--epochs", "30", "--batch-size", "24",
                                                   "--diffaug", "off", "--log-every", "1", "--lr", "0.01",
                                                   "--eval-every", "1000", "--seed", "5")])
    assert res.returncode == 0, res.stderr[-3000:]
    recs = [json.loads(x) for x in (tmp_path / "r" / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs if r["event"] == "step"]
    assert len(losses) == 30 and all(math.isfinite(x) for x in losses)
    ce = _fixed_view_ce(data, tmp_path / "r" / "last.pt")
    assert ce < 0.5 * math.log(4), (ce, losses)


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--data", "/nonexistent/data"], "no such directory"),
        (["--diffaug-fraction", "1.5"], "must lie in"),
        (["--batch-size", "7"], None),
    ],
)
def test_bad_arguments_give_clear_errors(data, tmp_path, extra, match):
    if match is None:  # batch not divisible by the world size: only with 2 processes (torchrun adds its
        res = _run(_torchrun(2, _args(data, tmp_path, *extra)))  # own traceback of the failed children)
        assert res.returncode != 0 and "--batch-size 7 is not divisible by the 2 processes" in res.stderr
        return
    res = _run([sys.executable, str(TRAIN), *_args(data, tmp_path, *extra)])
    assert res.returncode != 0
    assert match in res.stderr + res.stdout
    assert "Traceback" not in res.stderr


def test_data_without_train_val_layout(tmp_path):
    (tmp_path / "flat" / "cats").mkdir(parents=True)
    res = _run([sys.executable, str(TRAIN), *_args(tmp_path / "flat", tmp_path)])
    assert res.returncode != 0 and "expected sub-folders train/ and val/" in res.stderr


@pytest.mark.parametrize("kind", ["garbage", "wrong_arch"])
def test_wrong_unet_checkpoint_gives_clear_error(data, tmp_path, kind):
    path = tmp_path / "unet.pt"
    if kind == "garbage":
        path.write_bytes(b"\x00not a checkpoint")
    else:
        torch.save(torch.nn.Conv2d(3, 3, 1).state_dict(), path)
    res = _run([sys.executable, str(TRAIN), *_args(data, tmp_path, "--unet", str(path))])
    assert res.returncode != 0 and f"--unet {path}" in res.stderr
    assert "Traceback" not in res.stderr


def test_eval_script_plain_de_and_corruptions(data, tmp_path):
    res = _run([sys.executable, str(TRAIN), *_args(data, tmp_path, "--epochs", "1", "--diffaug", "off")])
    assert res.returncode == 0, res.stderr[-3000:]
    # a random-weight UNet checkpoint stands in for a pretrained one
    from conftest import oracle_model_and_diffusion

    import diffaug_fast as df

    unet, _ = oracle_model_and_diffusion(df.get_preset("adm-tiny"))
    torch.save(unet.state_dict(), tmp_path / "unet.pt")
    # a 2-class subset folder, like ImageNet-R/A's 200 of 1000
    sub = tmp_path / "subset"
    for cls in ("squares", "circles"):
        (sub / cls).mkdir(parents=True)
        for f in (data / "val" / cls).iterdir():
            (sub / cls / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "eval"
    res = _run([sys.executable, str(EVAL), "--ckpt", str(tmp_path / "r" / "last.pt"), "--val", str(data / "val"),
                str(sub), "--imagenet-c", str(data / "val-c"), "--de", "--unet", str(tmp_path / "unet.pt"),
                "--batch-size", "4", "--out", str(out)])
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads((out / "results.json").read_text())["results"]
    assert [r["classes"] for r in rows[:2]] == [4, 2]
    assert all("top1_de" in r for r in rows)
    assert {(r["corruption"], r["severity"]) for r in rows[2:]} == {("blur", 2), ("contrast", 2), ("gaussian_noise", 2)}
    assert (out / "results.csv").read_text().startswith("dataset,corruption,severity")
    bad = _run([sys.executable, str(EVAL), "--ckpt", str(tmp_path / "unet.pt"), "--val", str(data / "val")])
    assert bad.returncode != 0 and "bare state_dict" in bad.stderr


def test_demo_defaults_apply_only_without_data():
    import importlib

    mod = importlib.import_module("diffaug_fast.train.recipes.rn50")
    demo = mod.parse_args(["--amp", "--epochs", "3"])
    assert demo.data is None and demo.amp and demo.epochs == 3  # explicit flags win over the demo's
    assert (demo.image_size, demo.batch_size, demo.zero_init_residual) == (48, 32, True)
    real = mod.parse_args(["--data", "/d"])
    assert (real.epochs, real.batch_size, real.lr, real.image_size, real.zero_init_residual) == (90, 256, None, 224,
                                                                                                 False)
    assert real.diffaug == "online" and real.diffaug_fraction is None  # resolved to 1.0 (online) / 0.0 (bank)
