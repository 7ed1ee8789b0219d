"""train/vit.py and diffaug_fast/vit_recipe.py at tiny scale: Mixup/CutMix of both halves against timm's
Mixup, the schedule against the closed form, learning, exact resume, --init loading and its errors."""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from timm.data.mixup import Mixup

from diffaug_fast.data.synthetic import make_synthetic_dataset
from diffaug_fast.train.engine import Recipe
from diffaug_fast.train.recipe import STEP_ONLY
from diffaug_fast.train.recipes.vit_parts import InitError, PairMix, SeededRandAugment, create_vit, load_init
from diffaug_fast.train.step import DiffAugPlan, StepParts
from diffaug_fast.train.step import step_generator as _step_generator
from diffaug_fast.train.step import train_step as _engine_step


def train_step(model, opt, scaler, batch, den, s, g, buf, device, amp_dtype, recipe=None):
    """The engine's step with its parts spelled out (the call these tests were written against)."""
    parts = StepParts(model, opt, scaler, buf, device, amp_dtype, DiffAugPlan.of(s, den), recipe or STEP_ONLY)
    return _engine_step(parts, batch, g)


def step_generator(s, epoch, step, rank, device):
    return _step_generator(s.seed, epoch, step, rank, device)

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "train" / "vit.py"
TINY = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2, init_values=0.1)
TINY_JSON = json.dumps(TINY)


def _load_vit():
    return importlib.import_module("diffaug_fast.train.recipes.vit")


vit = _load_vit()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("data") / "syn", train_per_class=6, val_per_class=2,
                                  size=40, severities=(2,))


def _tiny(num_classes=4, **kw):
    return create_vit("deit3_small_patch16_224", num_classes, img_size=32, **{**TINY, **kw})


# ------------------------------------------------------------------------------------------- Mixup / CutMix


def test_both_halves_mix_like_timm_with_one_draw():
    """Each half equals timm's own Mixup under the same numpy seed; the DiffAug half's targets are the clean
    half's, and both equal lam * smooth(y_i) + (1 - lam) * smooth(y_{B-1-i}) (the mixed labels of the pairs)."""
    b, c, smooth = 6, 5, 0.1
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    pm = PairMix(0.8, 1.0, smooth, c)
    kinds = set()
    for seed in range(12):
        lam, box = pm.draw(seed, (b, 3, 16, 16))
        kinds.add("cutmix" if box is not None else "mixup")
        g = torch.Generator().manual_seed(seed)
        clean, aug = torch.randn(b, 3, 16, 16, generator=g), torch.randn(b, 3, 16, 16, generator=g)
        ours_c, ours_a = clean.clone(), aug.clone()
        t_c, t_a = pm(ours_c, y, ours_a, y, seed=seed)
        for ours, x, t in ((ours_c, clean, t_c), (ours_a, aug, t_a)):
            ref = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=smooth, num_classes=c)
            np.random.seed(seed)
            ref_x, ref_t = ref(x.clone(), y)
            assert torch.equal(ours, ref_x)
            assert torch.allclose(t, ref_t)
        assert torch.equal(t_a, t_c)
        onehot = torch.full((b, c), smooth / c).scatter_(1, y[:, None], 1 - smooth + smooth / c)
        assert torch.allclose(t_c, lam * onehot + (1 - lam) * onehot.flip(0))
    assert kinds == {"cutmix", "mixup"}


def test_engine_step_gives_the_diffaug_half_the_clean_targets():
    """Through the engine's train_step (bank views as the DiffAug half, in the clean half's order): the loss
    sees identical targets for both halves and the DiffAug rows are mixed with the same lambda and box."""
    s = vit.Settings(data="-", diffaug="bank:-", diffaug_fraction=0.0, mixup=0.8, cutmix=1.0)
    seen = []

    def loss_fn(logits, t):
        seen.append(t)
        return vit.soft_cross_entropy(logits, t)

    recipe = Recipe(name="vit", build_model=None, build_optimizer=None, loss_fn=loss_fn,
                    batch_transform=vit.make_batch_transform(s, 4))
    model = _tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    gen = torch.Generator().manual_seed(0)
    batch = {"clean": torch.randn(4, 3, 32, 32, generator=gen), "bank": torch.randn(4, 3, 32, 32, generator=gen),
             "label": torch.tensor([0, 1, 2, 3])}
    buf = torch.empty(8, 3, 32, 32)
    g = step_generator(s, 0, 5, 0, torch.device("cpu"))
    train_step(model, opt, scaler, batch, None, s, g, buf, torch.device("cpu"), None, recipe)
    assert len(seen) == 2 and torch.equal(seen[0], seen[1])
    lam, box = PairMix(0.8, 1.0, 0.1, 4).draw(g.initial_seed(), (4, 3, 32, 32))
    ref = batch["bank"].clone()
    PairMix.mix_(ref, lam, box)
    assert torch.equal(buf[4:], ref)


def test_randaugment_replays_from_the_sample_seed():
    from PIL import Image

    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    ra = SeededRandAugment("rand-m9-mstd0.5-inc1", 32)
    outs = [np.asarray(ra(img, seed)) for seed in range(16)]
    assert all(np.array_equal(outs[i], np.asarray(ra(img, i))) for i in range(16))
    assert len({o.tobytes() for o in outs}) > 8  # different seeds, different augmentations
    with pytest.raises(InitError, match="--aa"):
        SeededRandAugment("foo-m9", 32)


# ------------------------------------------------------------------------------------------- --init


def test_init_loads_deit_and_safetensors_files_and_refuses_mismatches(tmp_path):
    src = _tiny()
    sd = src.state_dict()
    # DeiT's own files name LayerScale gamma_1 / gamma_2 and wrap the state_dict in {"model": ...}
    deit = {k.replace("ls1.gamma", "gamma_1").replace("ls2.gamma", "gamma_2"): v for k, v in sd.items()}
    torch.save({"model": deit}, tmp_path / "deit.pth")
    from safetensors.torch import save_file

    save_file(sd, str(tmp_path / "w.safetensors"))
    for f in ("deit.pth", "w.safetensors"):
        dst = _tiny()
        load_init(dst, tmp_path / f)
        assert all(torch.equal(dst.state_dict()[k], v) for k, v in sd.items())
    with pytest.raises(InitError, match="head has 4 classes, this run has 7.*--reset-head"):
        load_init(_tiny(7), tmp_path / "deit.pth")
    dst = _tiny(7)
    head = dst.head.weight.clone()
    load_init(dst, tmp_path / "deit.pth", reset_head=True)
    assert torch.equal(dst.head.weight, head) and torch.equal(dst.blocks[0].ls1.gamma, src.blocks[0].ls1.gamma)
    with pytest.raises(InitError, match="not a checkpoint of this architecture.*--arch"):
        load_init(_tiny(depth=3), tmp_path / "deit.pth")
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(InitError, match="not a readable checkpoint"):
        load_init(_tiny(), tmp_path / "bad.pth")


def _args(data, out, *extra):
    return ["--data", str(data), "--out", str(out), "--run-name", "r", "--arch", "deit3_small_patch16_224",
            "--model-kwargs", TINY_JSON, "--epochs", "2", "--batch-size", "8", "--image-size", "32",
            "--resize-size", "36", "--lr", "1e-3", "--min-lr", "0", "--warmup-lr", "1e-5", "--warmup-epochs", "1",
            "--unet-preset", "adm-tiny", "--workers", "0", "--no-progress", "--no-de-eval", "--seed", "3",
            "--log-every", "1", *extra]


@pytest.mark.parametrize("case", ["arch", "classes"])
def test_cli_init_mismatch_is_one_line(data, tmp_path, case):
    other = _tiny(depth=3) if case == "arch" else _tiny(10)
    torch.save({"model": other.state_dict()}, tmp_path / "other.pth")
    with pytest.raises(SystemExit) as e:
        vit.main(_args(data, tmp_path, "--init", str(tmp_path / "other.pth"), "--diffaug", "off"))
    msg = str(e.value.code)
    assert "\n" not in msg and msg.startswith("--init")
    assert ("--arch" in msg) if case == "arch" else ("--reset-head" in msg and "10 classes" in msg)


# ------------------------------------------------------------------------------------------- training


def test_steps_on_a_fixed_batch_reduce_the_loss():
    s = vit.Settings(data="-", diffaug="off", mixup=0.0, cutmix=0.0)  # smoothed one-hot targets: a clear floor
    recipe = Recipe(name="vit", build_model=None, build_optimizer=None, loss_fn=vit.soft_cross_entropy,
                    batch_transform=vit.make_batch_transform(s, 4))
    torch.manual_seed(0)
    model = _tiny()
    opt = vit.create_optimizer(model, 2e-3, 0.05)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    gen = torch.Generator().manual_seed(1)
    batch = {"clean": torch.randn(8, 3, 32, 32, generator=gen), "label": torch.arange(8) % 4}
    buf = torch.empty(16, 3, 32, 32)
    losses = []
    for _ in range(8):
        g = step_generator(s, 0, 0, 0, torch.device("cpu"))  # the same mix each step: a fixed objective
        losses.append(train_step(model, opt, scaler, batch, None, s, g, buf, torch.device("cpu"), None,
                                 recipe)[0].item())
    assert losses[-1] < 0.75 * losses[0], losses


def _run(cmd):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)


def test_resume_is_bit_identical_and_lr_follows_timm_cosine(data, tmp_path):
    """RandAugment, Mixup/CutMix, drop-path and online DiffAug all on; cut after step 4 of 6 (mid epoch 2)."""
    full = _run([sys.executable, str(TRAIN), *_args(data, tmp_path / "full")])
    assert full.returncode == 0, full.stderr[-3000:]
    cut = _run([sys.executable, str(TRAIN), *_args(data, tmp_path / "cut", "--stop-after-steps", "4")])
    assert cut.returncode != 0 and "interrupted: checkpoint saved at epoch 1, step 1" in cut.stdout, cut.stdout
    resumed = _run([sys.executable, str(TRAIN), *_args(data, tmp_path / "cut", "--resume")])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = torch.load(tmp_path / "full" / "r" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "r" / "last.pt", weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    # what train/eval.py needs to rebuild the model
    st = a["settings"]
    assert st["model_source"] == "timm" and st["arch"] == "deit3_small_patch16_224"
    assert st["model_kwargs"] == {"img_size": 32, **TINY} and len(a["classes"]) == 4
    import timm

    timm.create_model(st["arch"], num_classes=len(a["classes"]), **st["model_kwargs"]).load_state_dict(a["model"])

    # the lr logged after update n is timm's cosine with linear warm-up at n (per update: 3 per epoch)
    recs = [json.loads(line) for line in (tmp_path / "full" / "r" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in recs if r["event"] == "step"]
    assert len(steps) == 6
    lr, lr0, total, warm = 1e-3, 1e-5, 6, 3
    for n, r in enumerate(steps, start=1):
        want = lr0 + n * (lr - lr0) / warm if n < warm else 0.5 * lr * (1 + math.cos(math.pi * n / total))
        assert r["lr"] == pytest.approx(want, rel=1e-9, abs=1e-15), (n, r["lr"], want)
