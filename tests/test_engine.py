"""The classifier engine (diffaug_fast.train) and the rn50 recipe on it, in-process at tiny scale: run folders,
batch larger than the dataset (14.2), a damaged last.pt (14.6), empty/foreign class folders (14.8), the
recipe hooks (per-step schedules, batch transforms for Mixup, AugMix + JSD), --init and --recipe,
and the reference recipe's defaults."""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from scipy.special import softmax
from scipy.stats import entropy

from diffaug_fast.data.synthetic import make_synthetic_dataset
from diffaug_fast.runs import open_run
from diffaug_fast.train.engine import EngineSettings, Recipe, run
from diffaug_fast.train.recipe import STEP_ONLY
from diffaug_fast.train.step import DiffAugPlan, StepParts
from diffaug_fast.train.step import train_step as _engine_step


def train_step(model, opt, scaler, batch, den, s, g, buf, device, amp_dtype, recipe=None):
    """The engine's step with its parts spelled out (the call these tests were written against)."""
    parts = StepParts(model, opt, scaler, buf, device, amp_dtype, DiffAugPlan.of(s, den), recipe or STEP_ONLY)
    return _engine_step(parts, batch, g)

REPO = Path(__file__).resolve().parents[1]


def _load_rn50():
    return importlib.import_module("diffaug_fast.train.recipes.rn50")


rn50 = _load_rn50()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is faster than contending ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = make_synthetic_dataset(tmp_path_factory.mktemp("data") / "syn", train_per_class=6, val_per_class=2,
                                  size=40, severities=(2,))
    shutil.rmtree(root / "val-c")  # the corrupted split is evaluated at the end of every run: not needed here
    return root


def _argv(data, out, *extra, name="r"):
    return ["--data", str(data), "--out", str(out), "--run-name", name, "--arch", "resnet18", "--epochs", "1",
            "--batch-size", "8", "--image-size", "32", "--resize-size", "36", "--lr", "0.05", "--unet-preset",
            "adm-tiny", "--loader", "torch", "--workers", "0", "--no-progress", "--no-de-eval", "--seed", "3",
            "--diffaug-fraction", "0.5", *extra]


def _log(run_dir) -> list[dict]:
    return [json.loads(x) for x in (Path(run_dir) / "log.jsonl").read_text().splitlines()]


def _fails(argv, match):
    with pytest.raises(SystemExit) as e:
        rn50.main(argv)
    msg = str(e.value.code)
    assert match in msg and "\n" not in msg, msg
    return msg


# ---------------------------------------------------------------------------------------------------- 14.1


def test_existing_run_refused_unless_resume_or_overwrite(data, tmp_path):
    rn50.main(_argv(data, tmp_path))
    _fails(_argv(data, tmp_path), "already holds a run; continue it with --resume")
    _fails(_argv(data, tmp_path, "--resume"), "already finished")
    _fails(_argv(data, tmp_path, "--resume", "--overwrite"), "contradict")
    rn50.main(_argv(data, tmp_path, "--overwrite", "--epochs", "2"))
    recs = _log(tmp_path / "r")
    assert [r["event"] for r in recs].count("settings") == 1  # the old run's log went with it
    assert torch.load(tmp_path / "r" / "last.pt", weights_only=True)["epoch"] == 2


def test_locked_run_names_the_holder(data, tmp_path):
    held = open_run(tmp_path / "r")  # another process's run, as far as the lock is concerned
    try:
        msg = _fails(_argv(data, tmp_path), "in use by another run")
        assert "pid" in msg
    finally:
        held.close()
    rn50.main(_argv(data, tmp_path, "--max-steps", "1"))


@pytest.mark.parametrize("name", ["../x", "a/b", "..", ".", "", "ABS"])
def test_run_name_must_be_a_plain_folder_name(data, tmp_path, name):
    """--run-name is the folder under --out: a path is refused before anything is written (it would have put
    the run, and --overwrite's deletions, outside --out)."""
    name = str(tmp_path / "abs") if name == "ABS" else name
    _fails(_argv(data, tmp_path / "out", "--overwrite", name=name), f"--run-name {name!r}: give a plain folder name")
    assert list(tmp_path.iterdir()) == []  # neither --out nor anything beside it was created


def test_demo_is_rerunnable(tmp_path):
    argv = ["--out", str(tmp_path), "--arch", "resnet18", "--batch-size", "8", "--image-size", "32", "--resize-size",
            "36", "--max-steps", "1", "--bench-steps", "0", "--no-de-eval", "--loader", "torch", "--workers", "0",
            "--no-progress"]
    for _ in range(2):
        assert rn50.main(argv)["steps"] == 1
    assert [r["event"] for r in _log(tmp_path / "demo")].count("settings") == 1


# ---------------------------------------------------------------------------------------------------- 14.2


def test_batch_larger_than_dataset(data, tmp_path):
    _fails(_argv(data, tmp_path, "--batch-size", "32"), "larger than the 24 training images")
    assert not (tmp_path / "r").exists()  # refused before any work
    out = rn50.main(_argv(data, tmp_path, "--batch-size", "32", "--no-drop-last", "--epochs", "2", "--log-every",
                          "1"))
    assert out["steps"] == 2
    steps = [r for r in _log(tmp_path / "r") if r["event"] == "step"]
    assert [r["images_in_batch"] for r in steps] == [24 + 12, 24 + 12]  # the partial batch + half of it DiffAug


def test_zero_epochs_is_not_a_success(data, tmp_path):
    _fails(_argv(data, tmp_path, "--epochs", "0"), "trained 0 steps")


# ---------------------------------------------------------------------------------------------------- 14.6


def test_damaged_last_checkpoint_falls_back_to_prev(data, tmp_path, capsys):
    rn50.main(_argv(data, tmp_path, "--epochs", "2"))
    last, prev = tmp_path / "r" / "last.pt", tmp_path / "r" / "prev.pt"
    assert torch.load(prev, weights_only=True)["epoch"] == 1
    last.write_bytes(last.read_bytes()[:1000])  # cut short, as by a full disk
    capsys.readouterr()
    rn50.main(_argv(data, tmp_path, "--epochs", "3", "--resume"))
    out = capsys.readouterr().out
    warn = [line for line in out.splitlines() if "not a readable checkpoint" in line]
    assert len(warn) == 1 and str(last) in warn[0] and "weights_only=False" not in out
    assert f"resumed from {prev}: epoch 1" in out
    assert torch.load(last, weights_only=True)["epoch"] == 3
    for f in (last, prev):
        f.write_bytes(b"garbage")
    msg = _fails(_argv(data, tmp_path, "--epochs", "4", "--resume"), "no usable checkpoint")
    assert str(last) in msg and str(prev) in msg


# ---------------------------------------------------------------------------------------------------- 14.8


@pytest.fixture
def tree(data, tmp_path):
    root = tmp_path / "tree"
    shutil.copytree(data, root)
    return root


def test_train_class_without_images_warns_or_is_refused(tree, tmp_path, capsys):
    (tree / "train" / "zebras").mkdir()
    _fails(_argv(tree, tmp_path / "a", "--strict"), "zebras")
    capsys.readouterr()
    rn50.main(_argv(tree, tmp_path / "b"))
    out = capsys.readouterr().out
    assert "warning:" in out and "zebras" in out and "--strict" in out
    assert _log(tmp_path / "b" / "r")[0]["num_classes"] == 5


def test_empty_val_and_foreign_val_classes(tree, tmp_path):
    shutil.copytree(tree / "val" / "circles", tree / "val" / "hexagons")
    _fails(_argv(tree, tmp_path), "hexagons")
    shutil.rmtree(tree / "val")
    (tree / "val").mkdir()
    _fails(_argv(tree, tmp_path), "no class folders")
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------------------------------------------- hooks


def _tiny(tr):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, len(tr.classes))).to(tr.device)


def _timm_cosine(o):
    from timm.scheduler import CosineLRScheduler

    return CosineLRScheduler(o, t_initial=6, warmup_t=2, warmup_lr_init=0.01, lr_min=0.001, t_in_epochs=False)


@pytest.mark.parametrize("kind", ["torch", "timm"])
def test_per_step_schedule_and_batch_transform(data, tmp_path, kind):
    """A recipe with a per-step LR schedule (torch's, or timm's cosine with warm-up driven by update count)
    and a Mixup-style batch transform with soft targets."""
    seen = []

    def mix(clean, aug, y, y_aug, g):  # mix each half with its flip; soft targets mixed the same way
        seen.append((clean.shape[0], aug.shape[0]))
        t = F.one_hot(y, 4).float()
        ta = F.one_hot(y_aug, 4).float()
        return (0.7 * clean + 0.3 * clean.flip(0), 0.7 * aug + 0.3 * aug.flip(0), 0.7 * t + 0.3 * t.flip(0),
                0.7 * ta + 0.3 * ta.flip(0))

    def opt(tr, model):
        o = torch.optim.SGD(model.parameters(), lr=0.1)
        return o, (torch.optim.lr_scheduler.LambdaLR(o, lambda n: 1.0 / (1 + n)) if kind == "torch"
                   else _timm_cosine(o))

    s = EngineSettings(data=str(data), out=str(tmp_path), run_name="h", epochs=2, batch_size=8, image_size=32,
                       resize_size=36, unet_preset="adm-tiny", loader="torch", workers=0, progress=False,
                       de_eval=False, diffaug_fraction=0.5, log_every=1)
    run(Recipe(name="t", build_model=_tiny, build_optimizer=opt, schedule="step", batch_transform=mix), s)
    steps = [r for r in _log(tmp_path / "h") if r["event"] == "step"]
    assert len(steps) == 6 and set(seen) == {(8, 4)}
    # the lr logged after update n (counted from 1) is the schedule's value at n
    if kind == "torch":
        want = [0.1 / (1 + n) for n in range(1, 7)]
    else:
        ref = _timm_cosine(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1))
        want = [ref._get_lr(n)[0] for n in range(1, 7)]
        assert want[0] < want[1] > want[-1]  # warm-up, then the cosine decay
    assert [r["lr"] for r in steps] == pytest.approx(want)


def test_batch_transform_targets_reach_the_loss():
    """train_step's loss with a transform = CE of the transformed inputs against the returned soft targets."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 5))
    clean, view = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    y = torch.tensor([0, 1, 2, 3])
    batch = {"clean": clean, "diffaug": view, "label": y, "bank": view}  # bank view stands in for DiffAug
    soft = torch.full((4, 5), 0.2)

    def tf(c, a, yy, ya, g):
        return c * 2, a - 1, soft, soft.flip(0)

    s = SimpleNamespace(diffaug_fraction=0.0, t_min=0, t_max=None)
    buf = torch.empty(8, 3, 8, 8)
    recipe = Recipe(name="t", build_model=None, build_optimizer=None, batch_transform=tf)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    loss, n = train_step(model, opt, torch.amp.GradScaler("cpu", enabled=False), batch, None, s,
                         torch.Generator().manual_seed(0), buf, torch.device("cpu"), None, recipe)
    ref = F.cross_entropy(model(clean * 2), soft) + F.cross_entropy(model(view - 1), soft)
    assert n == 8 and torch.allclose(loss, ref, atol=1e-6)


def _reference_ce_jsd(lc, l1, l2, y, weight):
    """float64 CE(clean) + weight * JSD(clean, aug1, aug2) with scipy: JSD = H(mixture) - mean H(view)."""
    p = [softmax(x.detach().double().numpy(), axis=1) for x in (lc, l1, l2)]
    ce = -np.log(p[0][np.arange(len(y)), y.numpy()]).mean()
    m = sum(p) / 3
    jsd = (entropy(m, axis=1) - sum(entropy(q, axis=1) for q in p) / 3).mean()
    return ce + weight * jsd


def test_augmix_step_loss_is_ce_plus_12_jsd(data):
    """The --augmix step on a fixed batch: the loss equals CE + 12 * JSD over the three views."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=4)
    g = torch.Generator().manual_seed(1)
    clean = ((torch.rand(4, 3, 32, 32, generator=g) - 0.45) / 0.22)
    y = torch.tensor([0, 1, 2, 3])
    s = rn50.Settings(data="-", augmix=True, diffaug="off", diffaug_fraction=0.0)
    recipe = rn50.make_recipe(s)
    buf = torch.empty(4 * 4, 3, 32, 32)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    torch.manual_seed(5)
    loss, n = train_step(model, opt, torch.amp.GradScaler("cpu", enabled=False), {"clean": clean, "label": y}, None,
                         s, g, buf, torch.device("cpu"), None, recipe)
    assert n == 12
    views = buf[:12]
    assert not torch.equal(views[:4], views[4:8]) and not torch.equal(views[4:8], views[8:12])
    logits = model(views)  # train mode, lr 0: the same batch statistics and weights as in the step
    ref = _reference_ce_jsd(logits[:4], logits[4:8], logits[8:12], y, 12.0)
    assert loss.item() == pytest.approx(ref, rel=1e-4)
    # the loss function alone, on fixed logits where JSD is large (the mixture clamp at 1e-7 is not reached)
    lg = torch.randn(3, 6, 10, generator=g) * 3
    yy = torch.randint(0, 10, (6,), generator=g)
    direct = F.cross_entropy(lg[0], yy) + rn50.jsd_loss(lg[0], [lg[1], lg[2]], yy, 12.0)
    assert direct.item() == pytest.approx(_reference_ce_jsd(lg[0], lg[1], lg[2], yy, 12.0), rel=1e-5)


# ---------------------------------------------------------------------------------------------------- --init


def test_init_from_torchvision_and_augmix_checkpoints(data, tmp_path, capsys):
    torch.manual_seed(7)
    net = torchvision.models.resnet18(num_classes=4)
    torch.save(net.state_dict(), tmp_path / "tv.pt")
    out = rn50.main(_argv(data, tmp_path, "--init", str(tmp_path / "tv.pt"), "--lr", "0", "--weight-decay", "0",
                          "--max-steps", "1", name="tv"))
    assert out["steps"] == 1
    got = torch.load(tmp_path / "tv" / "last.pt", weights_only=True)["model"]
    assert torch.equal(got["conv1.weight"], net.state_dict()["conv1.weight"])  # lr 0: the init weights
    # AugMix's checkpoint layout: DataParallel names and the optimizer, whose lr the finetune continues with
    opt = torch.optim.SGD(net.parameters(), lr=0.0123, momentum=0.9, weight_decay=1e-4)
    net(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    torch.save({"epoch": 90, "state_dict": {"module." + k: v for k, v in net.state_dict().items()},
                "optimizer": opt.state_dict()}, tmp_path / "am.pt")
    capsys.readouterr()
    rn50.main(_argv(data, tmp_path, "--init", str(tmp_path / "am.pt"), "--max-steps", "1", "--log-every", "1",
                    name="am"))
    text = capsys.readouterr().out
    assert "optimizer state too" in text
    # --lr given (0.05 by _argv) wins over the checkpoint's
    assert _log(tmp_path / "am")[1]["lr"] == pytest.approx(0.05)
    argv = _argv(data, tmp_path, "--init", str(tmp_path / "am.pt"), "--max-steps", "1", "--log-every", "1",
                 name="am2")
    i = argv.index("--lr")
    del argv[i:i + 2]
    rn50.main(argv)
    assert _log(tmp_path / "am2")[1]["lr"] == pytest.approx(0.0123)


def test_init_and_recipe_bad_input(data, tmp_path):
    torch.save(torchvision.models.resnet34(num_classes=4).state_dict(), tmp_path / "r34.pt")
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), tmp_path / "c10.pt")
    _fails(_argv(data, tmp_path, "--init", str(tmp_path / "r34.pt"), name="a"), "not a resnet18 checkpoint")
    _fails(_argv(data, tmp_path, "--init", str(tmp_path / "c10.pt"), name="b"), "classifier has 10 classes")
    _fails(_argv(data, tmp_path, "--init", str(tmp_path / "nope.pt"), name="c"), "no such file")
    _fails(_argv(data, tmp_path, "--recipe", "cutout-diffaug"), "unknown; choose one of augmix-diffaug")
    _fails(_argv(data, tmp_path, "--recipe", "augmix-diffaug"), "give its checkpoint with --init")


def test_recipe_presets_and_reference_defaults():
    s = rn50.parse_args(["--data", "/d", "--recipe", "deepaugment-diffaug", "--init", "x.pt"])
    assert (s.lr, s.max_steps, s.nesterov, s.epochs, s.batch_size) == (1e-6, 50_000, True, None, 256)
    s = rn50.parse_args(["--data", "/d", "--recipe", "augmix-diffaug", "--init", "x.pt", "--max-steps", "10"])
    assert (s.augmix, s.jsd_weight, s.lr, s.max_steps) == (True, 12.0, None, 10)  # explicit flags win
    # weight decay on every parameter by default (BN and biases too), SyncBN on by default
    s = rn50.parse_args(["--data", "/d"])
    assert s.sync_bn and s.wd_bn_bias
    model = torchvision.models.resnet18(num_classes=4)
    opt, _ = rn50.build_optimizer(SimpleNamespace(s=s), model)
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["weight_decay"] == 1e-4
    assert len(opt.param_groups[0]["params"]) == len(list(model.parameters()))
    s = rn50.parse_args(["--data", "/d", "--no-wd-bn-bias"])
    opt, _ = rn50.build_optimizer(SimpleNamespace(s=s), model)
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-4, 0.0]
    assert all(p.dim() <= 1 for p in opt.param_groups[1]["params"])
