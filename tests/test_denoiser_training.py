"""Denoiser training: the loss against guided_diffusion, export, resume, DDP, PSNR, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import oracle_model_and_diffusion, randomize_

import diffaug_fast as df
from diffaug_fast.data import scan_dataset
from diffaug_fast.data.synthetic import make_synthetic_dataset
from diffaug_fast.diffusion.loss import LossTables, hybrid_loss, psnr_table
from diffaug_fast.diffusion.unet import UNet, get_preset
from diffaug_fast.train.denoiser import load_images, main

REPO = Path(__file__).resolve().parents[1]
# tiny, but every part of the family: attention, resblock up/down, learned sigma
TINY = {"model_channels": 32, "num_res_blocks": 1, "channel_mult": [1, 1], "attention_ds": [2], "num_heads": 2,
        "resblock_updown": True}
STEPS = 6  # 10 training images / batch 4 = 2 steps per epoch: a cut at step 3 is mid-epoch


def _oracle_diffusion(cfg, learn_sigma=True):
    from guided_diffusion.script_util import create_gaussian_diffusion

    return create_gaussian_diffusion(steps=cfg.diffusion_steps, learn_sigma=learn_sigma, noise_schedule=cfg.noise_schedule,
                                     rescale_timesteps=cfg.rescale_timesteps, rescale_learned_sigmas=True)


@pytest.mark.parametrize("preset", ["adm-tiny", "iddpm-tiny"])  # linear 1000 / cosine 4000 with rescaled t
def test_loss_terms_equal_guided_diffusion(preset):
    cfg = get_preset(preset, image_size=16)
    oracle, _ = oracle_model_and_diffusion(cfg)
    randomize_(oracle)
    diffusion = _oracle_diffusion(cfg)
    ours = UNet(cfg)
    ours.load_state_dict(oracle.state_dict())
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(6, 3, 16, 16, generator=g) * 2 - 1
    x0[:, :, 0, 0], x0[:, :, 0, 1] = -1.0, 1.0  # the decoder's open-ended edge bins
    T = cfg.diffusion_steps
    t = torch.tensor([0, 1, 7, T // 2, T - 2, T - 1])  # t = 0 takes the decoder NLL, the rest the KL
    noise = torch.randn(x0.shape, generator=g)
    ref = diffusion.training_losses(oracle, x0, t, noise=noise)
    tables = LossTables(cfg.schedule())
    x_t = tables("sqrt_abar", t) * x0 + tables("sqrt_1m_abar", t) * noise
    out = ours(x_t, cfg.schedule().model_timesteps(t))
    mine = hybrid_loss(out, x0, x_t, noise, t, tables)
    for key in ("mse", "vb", "loss"):
        torch.testing.assert_close(mine[key], ref[key], rtol=2e-6, atol=1e-6, msg=key)
    # the vb term trains the variance only: no gradient reaches the eps channels through it
    out_leaf = out.detach().requires_grad_(True)
    hybrid_loss(out_leaf, x0, x_t, noise, t, tables)["vb"].sum().backward()
    assert out_leaf.grad[:, :3].abs().max() == 0 and out_leaf.grad[:, 3:].abs().max() > 0


def test_fixed_sigma_model_trains_on_mse_only():
    cfg = get_preset("adm-tiny", image_size=16, out_channels=3)
    oracle, _ = oracle_model_and_diffusion(cfg)
    randomize_(oracle)
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.rand(3, 3, 16, 16, generator=g) * 2 - 1, torch.randn(3, 3, 16, 16, generator=g)
    t = torch.tensor([0, 300, 999])
    ref = _oracle_diffusion(cfg, learn_sigma=False).training_losses(oracle, x0, t, noise=noise)
    tables = LossTables(cfg.schedule())
    x_t = tables("sqrt_abar", t) * x0 + tables("sqrt_1m_abar", t) * noise
    mine = hybrid_loss(oracle(x_t, t), x0, x_t, noise, t, tables)
    assert "vb" not in mine and "vb" not in ref
    torch.testing.assert_close(mine["loss"], ref["loss"], rtol=2e-6, atol=1e-6)


def test_psnr_table_closed_form():
    """A model predicting eps = 0 gives x0_hat = x_t / sqrt(abar) (gain 0); the true noise gives x0 back."""
    cfg = get_preset("adm-tiny")
    sched = cfg.schedule()
    x0 = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(3)) * 2 - 1
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(7))  # psnr_table's noise for seed=7

    class Zero:
        schedule = sched

        def __call__(self, x_t, t):
            return torch.zeros_like(x_t)

    class Oracle(Zero):
        def __call__(self, x_t, t):
            return noise

    zero, exact = psnr_table(Zero(), x0, ts=(10, 500), seed=7), psnr_table(Oracle(), x0, ts=(10, 500), seed=7)
    for row, t in zip(zero, (10, 500)):
        ab = sched.alphas_cumprod[t]
        noisy = np.clip(x0.double().numpy() + np.sqrt(1 / ab - 1) * noise.double().numpy(), -1, 1)
        want = np.mean([10 * np.log10(4 / np.mean((n - c) ** 2)) for n, c in zip(noisy, x0.double().numpy())])
        assert row["psnr_noisy"] == pytest.approx(want, abs=1e-3)
        assert row["gain"] == pytest.approx(0.0, abs=1e-4)
    assert all(r["psnr_x0"] > 80 and r["gain"] > 40 for r in exact)


def test_loss_window_means_by_quarter_of_t():
    from diffaug_fast.train.denoiser_parts import LossWindow

    g = torch.Generator().manual_seed(0)
    w = LossWindow(1000)
    ts, losses = [], []
    for _ in range(3):
        t = torch.randint(0, 750, (5,), generator=g)  # no sample in the last quarter
        loss = torch.rand(5, generator=g)
        w.add({"loss": loss, "mse": loss / 2}, t)
        ts.append(t.numpy())
        losses.append(loss.numpy())
    t, loss = np.concatenate(ts), np.concatenate(losses)
    rec = w.record()
    assert rec["loss"] == pytest.approx(loss.mean()) and rec["mse"] == pytest.approx(loss.mean() / 2) and rec["vb"] == 0
    for i, (lo, hi) in enumerate([(0, 250), (250, 500), (500, 750)]):
        assert rec[f"loss_q{i}"] == pytest.approx(loss[(t >= lo) & (t < hi)].mean())
    assert rec["loss_q3"] is None
    assert w.n == 0  # reset after a record


# ---------------------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("data") / "syn", train_per_class=3, val_per_class=1,
                                  size=24, severities=(1,), ood_per_class=0) / "train"


def _argv(data, out, *extra):
    return ["--data", str(data), "--config", json.dumps(TINY), "--image-size", "16", "--steps", str(STEPS),
            "--batch-size", "4", "--lr", "2e-3", "--ema-rate", "0.9", "--held-out", "2", "--eval-every", "3",
            "--log-every", "2", "--workers", "0", "--seed", "5", "--no-progress", "--no-amp", "--out", str(out),
            *extra]  # float32: the bf16 autocast a CPU with AMX would pick rounds differently per batch split


@pytest.fixture(scope="module")
def full_run(tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "model.pt"
    summary = main(_argv(tree, out))
    return out, summary


def test_training_reduces_the_loss_and_logs(full_run, tree):
    out, summary = full_run
    recs = [json.loads(line) for line in (out.with_suffix(".run") / "log.jsonl").read_text().splitlines()]
    steps = [r for r in recs if r["event"] == "step"]
    assert [r["step"] for r in steps] == [2, 4, 6]
    assert all({"loss", "mse", "vb", "loss_q0", "loss_q3", "images_per_s"} <= r.keys() for r in steps)
    psnr = [r for r in recs if r["event"] == "psnr"]
    assert [r["step"] for r in psnr] == [3, 6] and {r["t"] for r in psnr[0]["ema"]} == {50, 100, 250, 500, 750}
    # the fixed-t, fixed-noise loss of the trained raw weights is below that of the initial weights
    ck = torch.load(out.with_suffix(".run") / "last.pt", weights_only=True)
    cfg = df.load_denoiser(out).config
    torch.manual_seed(5)
    init = UNet(cfg)
    trained = UNet(cfg)
    trained.load_state_dict(ck["model"])
    x0 = load_images(scan_dataset(tree, progress=False), 16)
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 1000, (len(x0),), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    tables = LossTables(cfg.schedule())
    x_t = tables("sqrt_abar", t) * x0 + tables("sqrt_1m_abar", t) * noise
    with torch.no_grad():
        before = hybrid_loss(init(x_t, t), x0, x_t, noise, t, tables)["mse"].mean()
        after = hybrid_loss(trained(x_t, t), x0, x_t, noise, t, tables)["mse"].mean()
    assert after < 0.9 * before, (before, after)


def test_export_loads_strictly_into_guided_diffusion_and_eps_matches(full_run, tree):
    from guided_diffusion.script_util import create_model
    from safetensors.torch import load_file

    out, _ = full_run
    side = json.loads(out.with_suffix(".json").read_text())
    c = side["unet_config"]
    assert side["steps"] == STEPS and side["seed"] == 5 and side["weights"] == "ema" and len(side["data_fingerprint"]) == 64
    cmd = side["command"]
    assert cmd[:3] == ["python", "-m", "diffaug_fast.train_denoiser"] and cmd[cmd.index("--data") + 1] == str(tree)
    oracle = create_model(
        image_size=c["image_size"], num_channels=c["model_channels"], num_res_blocks=c["num_res_blocks"],
        channel_mult=",".join(map(str, c["channel_mult"])), learn_sigma=c["out_channels"] == 6,
        attention_resolutions=",".join(str(c["image_size"] // d) for d in c["attention_ds"]), num_heads=c["num_heads"],
        num_head_channels=c["num_head_channels"], use_scale_shift_norm=c["use_scale_shift_norm"],
        resblock_updown=c["resblock_updown"]).eval()
    sd = torch.load(out, weights_only=True)
    oracle.load_state_dict(sd, strict=True)
    st = load_file(str(out.with_suffix(".safetensors")))
    assert st.keys() == sd.keys() and all(torch.equal(st[k], sd[k]) for k in sd)
    ema = torch.load(out.with_suffix(".run") / "last.pt", weights_only=True)["ema"]
    assert all(torch.equal(ema[k], sd[k]) for k in sd)  # the export is the EMA weights
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        den = df.load_denoiser(out)  # architecture and schedule from the sidecar: no inference, no warning
    assert den.config.to_dict() == {**c, "channel_mult": tuple(c["channel_mult"]), "attention_ds": tuple(c["attention_ds"])}
    assert den.schedule.name == "linear" and den.num_steps == 1000
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([3, 400, 999])
    with torch.no_grad():
        torch.testing.assert_close(den(x, t), oracle(x, t), rtol=1e-5, atol=1e-5)
    assert any(abs(r["gain"]) > 0 for r in side["held_out_psnr"])
    # as train/rn50.py --unet and the bank load it: the fast path, DiffAug views from the trained weights
    fast = df.load_denoiser(out, eps_only=True, fused_norm=True)
    assert fast.name == "custom"  # the bank reloads by name: a preset's, or "custom" (then from the sidecar)
    images = x.clamp(-1, 1)
    views = df.augment(images, fast, t=torch.tensor([100, 500, 900]), generator=torch.Generator().manual_seed(0))
    assert views.shape == images.shape and -1 <= views.min() and views.max() <= 1 and views.std() > 0


def test_resume_mid_run_gives_identical_weights(full_run, tree, tmp_path):
    out, _ = full_run
    cut = tmp_path / "model.pt"
    with pytest.raises(SystemExit) as e:
        main(_argv(tree, cut, "--stop-after-steps", "3"))
    assert e.value.code == 143
    assert torch.load(cut.with_suffix(".run") / "last.pt", weights_only=True)["step"] == 3
    main(_argv(tree, cut, "--resume"))
    a = torch.load(out.with_suffix(".run") / "last.pt", weights_only=True)
    b = torch.load(cut.with_suffix(".run") / "last.pt", weights_only=True)
    for part in ("model", "ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    assert torch.load(cut, weights_only=True).keys() == a["ema"].keys()


def test_two_processes_equal_one(full_run, tree, tmp_path):
    """torchrun gloo x2 on the same global batch: the same samples, t and noise as one process; DDP's mean
    gradient differs from one process's only by summation order. Adam's first steps move a weight by ~lr
    whatever its gradient's size, so a near-zero gradient's rounding shows as up to ~lr in a few elements: the
    check is that the two runs' difference is small against how far training moved the weights."""
    out, _ = full_run
    two = tmp_path / "model.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          "-m", "diffaug_fast.train_denoiser", *_argv(tree, two)], capture_output=True, text=True,
                         env=env, cwd=REPO, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    a = torch.load(out.with_suffix(".run") / "last.pt", weights_only=True)
    b = torch.load(two.with_suffix(".run") / "last.pt", weights_only=True)
    torch.manual_seed(5)
    init = UNet(df.load_denoiser(out).config).state_dict()
    for part in ("model", "ema"):
        moved = sum((a[part][k] - init[k]).norm() ** 2 for k in init).sqrt()
        diff = sum((a[part][k] - b[part][k]).norm() ** 2 for k in init).sqrt()
        assert diff < 0.005 * moved, (part, diff.item(), moved.item())  # measured ~8e-4 relative


# ---------------------------------------------------------------------------------------------------- bad input


def _one_line_exit(argv) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    msg = str(e.value.code)
    assert "\n" not in msg and "Traceback" not in msg, msg
    return msg


def test_bad_input_one_line_errors(full_run, tree, tmp_path):
    out, _ = full_run
    empty = tmp_path / "empty"
    (empty / "cls").mkdir(parents=True)
    (empty / "cls" / "notes.txt").write_text("no images here")
    assert "no valid images" in _one_line_exit(_argv(empty, tmp_path / "m.pt"))
    msg = _one_line_exit(_argv(tree, tmp_path / "m.pt", "--image-size", "17"))
    assert "--image-size 17" in msg and "multiple of 2" in msg
    # a missing --out folder is created now (the README's own command names one): tests/test_guarantees_denoiser.py
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    assert "not a folder" in _one_line_exit(_argv(tree, a_file / "m.pt"))
    other = json.dumps({**TINY, "model_channels": 64})
    msg = _one_line_exit([*_argv(tree, out, "--resume"), "--config", other])
    assert "another configuration" in msg and "model_channels" in msg
    assert "no such folder" in _one_line_exit(_argv(tmp_path / "nowhere", tmp_path / "m.pt"))


def test_read_only_out_folder(tree, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        probe = ro / "probe"
        try:
            probe.write_text("")
            probe.unlink()
            pytest.skip("this user (root?) can write into a 0o555 folder: read-only case not testable here")
        except OSError:
            pass
        assert "cannot write" in _one_line_exit(_argv(tree, ro / "m.pt"))
    finally:
        ro.chmod(0o755)


# ---------------------------------------------------------------------------------------------------- the demo


def test_demo_denoiser_is_cached_and_atomic(tmp_path, monkeypatch):
    """A killed first training leaves neither the final folder nor its temporary one; a finished one is reused."""
    import diffaug_fast.train.demo as td
    from diffaug_fast.train.demo import demo_denoiser

    root = tmp_path / "synthetic"
    root.mkdir()
    calls = []

    def killed(argv, single_process=False):
        calls.append(argv)
        out = Path(argv[argv.index("--out") + 1])
        out.write_bytes(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(td, "train_denoiser_main", killed)
    with pytest.raises(KeyboardInterrupt):
        demo_denoiser(root, steps=3, say=lambda *a: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synthetic"]
    argv = calls[0]
    assert argv[argv.index("--data") + 1] == str(root / "train") and argv[argv.index("--seed") + 1] == "0"

    def finished(argv, single_process=False):
        assert single_process
        out = Path(argv[argv.index("--out") + 1])
        out.write_bytes(b"weights")
        out.with_suffix(".json").write_text("{}")

    monkeypatch.setattr(td, "train_denoiser_main", finished)
    ckpt = demo_denoiser(root, steps=3, say=lambda *a: None)
    assert ckpt.read_bytes() == b"weights" and ckpt.parent.parent == tmp_path
    monkeypatch.setattr(td, "train_denoiser_main", killed)  # a second call must not train again
    assert demo_denoiser(root, steps=3, say=lambda *a: None) == ckpt
