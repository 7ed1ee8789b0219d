"""What the README's "What is guaranteed" promises, held by the denoiser trainer (python -m
diffaug_fast.train_denoiser) and by the run folders both trainers share: the exported weights are trained ones
(EMA warm-up), a damaged last.pt is named and resume falls back to prev.pt (content checksum; the classifier
recipe too), --resume refuses other training settings, --out is checked and locked, bad images are named, misuse
is refused in one line before anything is written, the README's own command runs, and the default data path
and step are improved-diffusion's."""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffaug_fast.data.synthetic import make_synthetic_dataset
from diffaug_fast.train.denoiser import DenoiserSettings, main

# the export is warned about below this one-step PSNR gain at this t (the README's figure for the demo's trained
# denoiser there: +12.4 dB; an untrained ADM UNet's zero output layer: exactly 0)
WEAK_GAIN_DB, WEAK_GAIN_T = 1.0, 250
TINY = {"model_channels": 32, "num_res_blocks": 1, "channel_mult": [1, 1], "attention_ds": [2], "num_heads": 2,
        "resblock_updown": True}


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("data") / "syn", train_per_class=3, val_per_class=1,
                                  size=24, severities=(1,), ood_per_class=0) / "train"


def _argv(data, out, *extra, steps=4):
    return ["--data", str(data), "--config", json.dumps(TINY), "--image-size", "16", "--steps", str(steps),
            "--batch-size", "4", "--lr", "2e-3", "--held-out", "2", "--eval-every", "100", "--save-every", "2",
            "--workers", "0", "--seed", "5", "--no-progress", "--no-amp", "--out", str(out), *extra]


def _one_line_exit(argv) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    msg = str(e.value.code)
    assert "\n" not in msg and "Traceback" not in msg, msg
    return msg


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def run4(tree, tmp_path_factory):
    """A finished 4-step run: last.pt at step 4, prev.pt at step 2, the export."""
    out = tmp_path_factory.mktemp("run4") / "model.pt"
    main(_argv(tree, out))
    return out


# ---------------------------------------------------------------------------------------------------- 1: EMA warm-up


def test_ema_warmup_decay_matches_its_closed_form():
    """decay_n = min(rate, (1 + n) / (10 + n)): after N updates towards a constant target the initial weights keep
    prod_n decay_n = 9! N! / (N + 9)! = 1 / C(N + 9, 9) of the EMA; without the warm-up, rate^N."""
    from diffaug_fast.train.denoiser_parts import ema_decay, ema_update

    assert [ema_decay(0.9999, n) for n in (0, 1, 90)] == [0.1, 2 / 11, 91 / 100]
    assert ema_decay(0.95, 10**6) == 0.95 and ema_decay(0.9999, 5, warmup=False) == 0.9999
    for warmup, n_updates in ((True, 7), (True, 500), (False, 500)):
        ema, target = torch.nn.Linear(3, 2, dtype=torch.float64), torch.nn.Linear(3, 2, dtype=torch.float64)
        torch.nn.init.zeros_(ema.weight), torch.nn.init.zeros_(ema.bias)
        torch.nn.init.ones_(target.weight), torch.nn.init.ones_(target.bias)
        for n in range(n_updates):
            ema_update(ema, target, ema_decay(0.9999, n, warmup))
        initial_share = 1 / math.comb(n_updates + 9, 9) if warmup else 0.9999**n_updates
        torch.testing.assert_close(ema.weight, torch.full_like(ema.weight, 1 - initial_share), rtol=0, atol=1e-12)
    assert 0.9999**500 > 0.95  # what the constant default rate exported after 500 steps: the initial weights


def test_short_run_exports_weights_that_denoise(tree, tmp_path, capsys):
    """At the default --ema-rate a short run's export denoises held-out images (gain at t = 250 above the
    warning's threshold); without the warm-up the export is ~ the initial weights (zero output layer: gain 0)
    and the run says so in one line."""
    out = tmp_path / "warm" / "model.pt"
    main(_argv(tree, out, "--lr", "3e-3", "--save-every", "100", steps=12))
    side = json.loads(out.with_suffix(".json").read_text())
    gain = next(r["gain"] for r in side["held_out_psnr"] if r["t"] == WEAK_GAIN_T)
    assert gain > WEAK_GAIN_DB, side["held_out_psnr"]
    assert side["ema_rate"] == 0.9999 and side["ema_warmup"] is True
    assert "hardly denoise" not in capsys.readouterr().out
    cold = tmp_path / "cold" / "model.pt"
    main(_argv(tree, cold, "--no-ema-warmup", "--save-every", "100", steps=2))
    said = capsys.readouterr().out
    warning = [line for line in said.splitlines() if "hardly denoise" in line]
    assert len(warning) == 1 and f"t = {WEAK_GAIN_T}" in warning[0], said
    cold_gain = next(r["gain"] for r in json.loads(cold.with_suffix(".json").read_text())["held_out_psnr"]
                     if r["t"] == WEAK_GAIN_T)
    assert abs(cold_gain) < 0.5


# ---------------------------------------------------------------------------------------------------- 2: damaged last.pt


def _flip_middle(path: Path, n: int = 64) -> None:
    """Invert n bytes in the middle of a file: its size and zip structure stay, torch.load still reads it."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid: mid + n] = bytes(b ^ 0xFF for b in data[mid: mid + n])
    path.write_bytes(bytes(data))
    torch.load(path, weights_only=True)  # the damage is invisible to torch itself


def test_flipped_bytes_in_last_pt_fall_back_to_prev_denoiser(run4, tree, tmp_path, capsys):
    run = tmp_path / "model.run"
    shutil.copytree(run4.with_suffix(".run"), run)
    out = tmp_path / "model.pt"
    _flip_middle(run / "last.pt")
    capsys.readouterr()
    main(_argv(tree, out, "--resume", "--run-dir", str(run)))
    said = capsys.readouterr().out
    damaged = [line for line in said.splitlines() if "last.pt" in line and "damaged" in line]
    assert len(damaged) == 1 and "checksum" in damaged[0], said
    assert f"resumed from {run / 'prev.pt'}: step 2" in said, said
    # steps 3-4 replayed from prev.pt: the weights of the undamaged run, bit for bit
    assert _same_weights(torch.load(out, weights_only=True), torch.load(run4, weights_only=True))


RN50 = ["--arch", "resnet18", "--epochs", "2", "--batch-size", "8", "--image-size", "32", "--resize-size", "36",
        "--lr", "0.05", "--diffaug", "off", "--loader", "torch", "--workers", "0", "--no-progress", "--no-de-eval",
        "--seed", "3", "--run-name", "r"]


def test_flipped_bytes_in_last_pt_fall_back_to_prev_classifier(tmp_path, capsys):
    from diffaug_fast.train.recipes.rn50 import main as rn50_main

    data = make_synthetic_dataset(tmp_path / "syn", train_per_class=6, val_per_class=2, size=40, severities=(1,),
                                  ood_per_class=0)
    shutil.rmtree(data / "val-c")
    rn50_main(["--data", str(data), "--out", str(tmp_path / "runs"), *RN50])
    run = tmp_path / "runs" / "r"
    want = torch.load(run / "last.pt", weights_only=True)["model"]
    _flip_middle(run / "last.pt")
    capsys.readouterr()
    rn50_main(["--data", str(data), "--out", str(tmp_path / "runs"), *RN50, "--resume"])
    said = capsys.readouterr().out
    assert any("last.pt" in line and "damaged" in line for line in said.splitlines()), said
    assert f"resumed from {run / 'prev.pt'}: epoch 1" in said, said
    assert _same_weights(torch.load(run / "last.pt", weights_only=True)["model"], want)


# ---------------------------------------------------------------------------------------------------- 3: --resume


@pytest.mark.parametrize("flag, value, saved", [("--lr", "5e-2", "--lr 0.002"), ("--weight-decay", "0.1",
                         "--weight-decay 0.0"), ("--ema-rate", "0.99", "--ema-rate 0.9999"),
                         ("--grad-clip", "1.0", "--grad-clip 0.0"), ("--crop", "random-resized", "--crop center"),
                         ("--flip", None, "--no-flip")])
def test_resume_with_other_training_settings_is_refused(run4, tree, flag, value, saved):
    before = run4.with_suffix(".run") / "log.jsonl"
    lines = before.read_text()
    msg = _one_line_exit(_argv(tree, run4, "--resume", flag, *([value] if value else [])))
    assert saved in msg and flag in msg.split("this command:")[1] and "--overwrite" in msg, msg
    assert before.read_text() == lines  # refused before the log records settings that were never applied


# ---------------------------------------------------------------------------------------------------- 5: --out


def test_out_that_is_not_ours_is_refused_unless_overwrite(run4, tree, tmp_path):
    user = tmp_path / "mine.pt"
    user.write_bytes(b"the user's own file")
    user.with_suffix(".json").write_text("{}")
    msg = _one_line_exit(_argv(tree, user))
    assert "exists and was not written by this run" in msg and "--overwrite" in msg
    assert user.read_bytes() == b"the user's own file" and not user.with_suffix(".run").exists()
    folder = tmp_path / "folder.pt"
    folder.mkdir()
    assert "is a folder" in _one_line_exit(_argv(tree, folder))
    assert not folder.with_suffix(".run").exists()
    # another run folder exporting to the same --out: refused, the first run's export named
    other = tmp_path / "other.run"
    msg = _one_line_exit(_argv(tree, run4, "--run-dir", str(other)))
    assert str(run4) in msg and not other.exists()
    main(_argv(tree, user, "--overwrite", steps=1))
    assert json.loads(user.with_suffix(".json").read_text())["run_dir"] == str(user.with_suffix(".run").resolve())


HOLD = ("import sys, time; from pathlib import Path; from diffaug_fast.train.denoiser_checks import lock_out; "
        "lock_out(Path(sys.argv[1])); print('locked', flush=True); time.sleep(60)")


def test_out_is_locked_while_a_run_writes_it(tree, tmp_path):
    out = tmp_path / "den" / "model.pt"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        msg = _one_line_exit(_argv(tree, out, "--run-dir", str(tmp_path / "second.run")))
        assert f"--out {out} is in use by another run (pid {holder.pid})" in msg and "another --out" in msg
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        holder.stdout.close()
    # the run folder's own lock: the refusal names no flag this tool lacks (it has no --run-name)
    run = tmp_path / "held.run"
    holder = subprocess.Popen([sys.executable, "-c", RUN_HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        msg = _one_line_exit(_argv(tree, tmp_path / "third.pt", "--run-dir", str(run)))
        assert f"{run} is in use by another run (pid {holder.pid})" in msg and "--run-name" not in msg, msg
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        holder.stdout.close()


RUN_HOLD = ("import sys, time; from diffaug_fast.runs import open_run; open_run(sys.argv[1]); print('locked', "
            "flush=True); time.sleep(60)")


# ---------------------------------------------------------------------------------------------------- 6: bad images


def _png_header_only(path: Path, w: int, h: int) -> None:
    """A PNG whose header claims w x h (PIL refuses > 2 x MAX_IMAGE_PIXELS as a decompression bomb at open)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                     + chunk(b"IEND", b""))


def test_bad_images_are_named_with_where_the_full_list_is(tree, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(tree, data)
    cls = data / sorted(p.name for p in data.iterdir())[0]
    good = next(cls.glob("*.jpg")).read_bytes()
    bad = {"empty.jpg": b"", "random.jpg": np.random.default_rng(0).bytes(3000), "truncated.jpg": good[:300]}
    for name, body in bad.items():
        (cls / name).write_bytes(body)
    Image.new("I;16", (32, 32)).save(cls / "deep16.png")
    _png_header_only(cls / "huge.png", 20000, 20000)
    Image.new("RGB", (1, 1)).save(cls / "one.png")
    for i in range(6):  # 12 in all: the printed list stops at 10
        (cls / f"empty{i}.jpg").write_bytes(b"")
    main(_argv(data, tmp_path / "m.pt", steps=1))
    said = capsys.readouterr().out
    listed = tmp_path / "m.run" / "bad_images.txt"
    assert f"--data {data.resolve()}: 12 bad file(s) left out" in said, said
    assert len([line for line in said.splitlines() if line.startswith("  bad: ")]) == 10
    assert f"... and 2 more; the full list: {listed}" in said
    rows = dict(line.split("\t") for line in listed.read_text().splitlines())
    assert {Path(p).name for p in rows} == {*bad, "deep16.png", "huge.png", "one.png", *(f"empty{i}.jpg" for i in range(6))}
    assert "too small" in rows[str(cls.resolve() / "one.png")]


# ---------------------------------------------------------------------------------------------------- 12: misuse


@pytest.mark.parametrize("config, words", [({"model_channels": -32}, "model_channels must be a positive integer"),
                                           ({"channel_mult": []}, "channel_mult must be a non-empty list"),
                                           ({"in_channels": 1}, "in_channels must be 3")])
def test_bad_config_is_one_line_and_leaves_nothing_behind(tree, tmp_path, config, words):
    out = tmp_path / "den" / "model.pt"
    argv = _argv(tree, out)
    argv[argv.index("--config") + 1] = json.dumps({**TINY, **config})
    assert words in _one_line_exit(argv)
    assert not (tmp_path / "den").exists()  # so the corrected command is not refused as a second run


def test_bad_workers_then_the_corrected_rerun(tree, tmp_path):
    out = tmp_path / "den" / "model.pt"
    argv = _argv(tree, out, steps=1)
    argv[argv.index("--workers") + 1] = "-1"
    assert "--workers must be >= 0" in _one_line_exit(argv)
    assert not (tmp_path / "den").exists()
    main(_argv(tree, out, steps=1))
    assert out.is_file()


def test_full_disk_during_a_checkpoint_write_says_so_and_a_rerun_continues(run4, tree, tmp_path, monkeypatch):
    import errno

    real_save, calls = torch.save, []

    def disk_full(obj, f, *a, **k):
        calls.append(1)
        if len(calls) == 2:  # the step-4 checkpoint: half written, then the disk is full
            f.write(b"x" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", disk_full)
    out = tmp_path / "model.pt"
    msg = _one_line_exit(_argv(tree, out))
    assert "cannot write the checkpoint" in msg and "No space left on device" in msg and "ENOSPC" in msg, msg
    assert "last.pt" in msg and "--resume" in msg
    monkeypatch.setattr(torch, "save", real_save)
    run = out.with_suffix(".run")
    assert not list(run.glob(".*.tmp")) and torch.load(run / "last.pt", weights_only=True)["step"] == 2
    main(_argv(tree, out, "--resume"))
    assert _same_weights(torch.load(out, weights_only=True), torch.load(run4, weights_only=True))


def test_non_checkpoint_files_are_one_line_checkpoint_errors(tree, tmp_path):
    import diffaug_fast as df
    from diffaug_fast.diffusion.checkpoint import CheckpointError
    from diffaug_fast.runs import RunError, load_checkpoint_file

    class Code:
        def __reduce__(self):
            return (print, ("ran",))

    rnd, jpg, code = tmp_path / "random.pt", next(tree.rglob("*.jpg")), tmp_path / "code.pt"
    rnd.write_bytes(np.random.default_rng(1).bytes(5000))
    torch.save({"x": Code()}, code)
    for path, words in ((rnd, "not a PyTorch checkpoint"), (jpg, "a JPEG image"), (code, "would execute code")):
        with pytest.raises(CheckpointError) as e:
            df.load_denoiser(path)
        msg = str(e.value)
        assert words in msg and str(path) in msg and "\n" not in msg and "weights_only" not in msg, msg
    with pytest.raises(RunError) as e:  # --resume, --init and the evaluation CLIs read through this one
        load_checkpoint_file(code)
    assert "would run code" in str(e.value) and "weights_only" not in str(e.value) and "allowlist" not in str(e.value)


def test_model_pt_without_its_json_is_refused_unless_a_preset_is_given(run4, tmp_path):
    import diffaug_fast as df
    from diffaug_fast.diffusion.checkpoint import CheckpointError
    from diffaug_fast.diffusion.unet import UNetConfig

    alone = tmp_path / "copied.pt"
    shutil.copy(run4, alone)
    with pytest.raises(CheckpointError, match="fits no preset and has no copied.json beside it"):
        df.load_denoiser(alone)
    side = json.loads(run4.with_suffix(".json").read_text())
    cfg = UNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in side["unet_config"].items()})
    den = df.load_denoiser(alone, cfg)
    assert den.schedule.name == "linear" and den.num_steps == 1000


# ---------------------------------------------------------------------------------------------------- 13: README command


def test_readme_command_at_a_tiny_size(tree, tmp_path, monkeypatch):
    """The README's --config example (no preset, 2 fields) with a missing --out folder: the other fields take the
    guided family's defaults, which guided_diffusion's own create_model builds with OpenAI's script defaults."""
    from guided_diffusion.script_util import create_model

    shutil.copytree(tree, tmp_path / "DATA" / "train")
    monkeypatch.chdir(tmp_path)
    main(["--data", "DATA/train", "--config", '{"model_channels": 64, "channel_mult": [1, 2, 2]}', "--image-size",
          "16", "--steps", "2", "--batch-size", "4", "--lr", "1e-4", "--out", "den/model.pt", "--workers", "0",
          "--no-progress"])
    oracle = create_model(image_size=16, num_channels=64, num_res_blocks=2, channel_mult="1,2,2", learn_sigma=True,
                          attention_resolutions="16,8", num_heads=4, use_scale_shift_norm=True, resblock_updown=True)
    oracle.load_state_dict(torch.load(tmp_path / "den" / "model.pt", weights_only=True), strict=True)
    cfg = json.loads((tmp_path / "den" / "model.json").read_text())["unet_config"]
    assert (cfg["num_res_blocks"], cfg["attention_ds"], cfg["num_heads"], cfg["noise_schedule"]) == (2, [1, 2], 4,
                                                                                                     "linear")


def _readme_block(heading: str) -> list[str]:
    """The commands of the first bash block under ``heading`` in the README, continuation lines joined and the
    trailing comments cut."""
    import re

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = text.split(heading, 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    joined = re.sub(r"\\\n\s*", " ", block)
    return [line.split("  #")[0].strip() for line in joined.splitlines() if line.strip()]


def _tiny(argv: list[str]) -> list[str]:
    """A README command at a tiny size: the numbers that set its cost made small, nothing else changed."""
    small = {"--steps": "2", "--batch-size": "2", "--image-size": "16"}
    return [small.get(argv[i - 1], a) if i else a for i, a in enumerate(argv)] + ["--workers", "0", "--no-progress"]


def test_readme_denoiser_block_runs_as_written(tree, tmp_path, monkeypatch):
    """Every complete train_denoiser command of the README's "Train your own denoiser" block (those with "..."
    are templates) runs as written on a class-folder DATA/train, each then continued by the block's --resume
    line: only --steps, --batch-size and --image-size are made small."""
    import shlex

    cmds = [c for c in _readme_block("## Train your own denoiser") if "diffaug_fast.train_denoiser" in c]
    runs = [c for c in cmds if "..." not in c]
    assert len(runs) >= 2 and any("--resume" in c for c in cmds), cmds
    shutil.copytree(tree, tmp_path / "DATA" / "train")
    monkeypatch.chdir(tmp_path)
    for cmd in runs:
        argv = _tiny(shlex.split(cmd.split("diffaug_fast.train_denoiser", 1)[1]))
        shutil.rmtree(tmp_path / "den", ignore_errors=True)
        main(argv)
        assert (tmp_path / "den" / "model.safetensors").is_file() and (tmp_path / "den" / "model.json").is_file()
        more = [a if argv[i - 1] != "--steps" else "4" for i, a in enumerate(argv)]  # the --resume line, 2 more
        main([*more, "--resume"])
        assert json.loads((tmp_path / "den" / "model.json").read_text())["steps"] == 4


# ---------------------------------------------------------------------------------------------------- 20.4: data path


def test_defaults_train_as_improved_diffusion():
    s = DenoiserSettings()
    assert (s.crop, s.flip, s.grad_clip, s.weight_decay, s.ema_rate) == ("center", False, 0.0, 0.0, 0.9999)


def _loader_batch(tree, size=16, seed=5):
    from diffaug_fast.constants import UNIT_MEAN, UNIT_STD
    from diffaug_fast.data import build_loader, scan_dataset

    index = scan_dataset(tree, progress=False)
    loader = build_loader(index, "train", batch_size=len(index), backend="torch", output="float", mean=UNIT_MEAN,
                          std=UNIT_STD, channels_last=False, seed=seed, num_workers=0, crop_size=size,
                          resize_size=size)
    loader.set_epoch(0)
    return index, next(iter(loader))


def _reference(path: str, size: int, box=None) -> torch.Tensor:
    """torchvision on the PIL image: Resize(size) + CenterCrop(size), or the crop ``box`` resized to size."""
    import torchvision.transforms.functional as TF

    with Image.open(path) as f:
        img = f.convert("RGB")
    img = TF.center_crop(TF.resize(img, size), size) if box is None else TF.resized_crop(img, *box, [size, size])
    return TF.to_tensor(img) * 2 - 1


def test_training_views_are_improved_diffusion_s_unless_asked(tree):
    """Default: the shorter side resized to the size and the centre cut, no mirror (improved-diffusion's
    image_datasets.py); --flip mirrors exactly the samples its draw picks; --crop random-resized without --flip
    is the loader's RandomResizedCrop box, not mirrored."""
    from diffaug_fast.data.plan import train_boxes
    from diffaug_fast.train.denoiser_parts import sample_flips, training_view

    index, batch = _loader_batch(tree)
    sizes = np.asarray(index.sizes).reshape(-1, 2)
    ids = batch["index"].tolist()
    kw = dict(seed=5, step=3, epoch=0, sizes=sizes)
    centre = training_view(batch, "center", False, **kw)
    for row, i in zip(centre, ids):
        assert (row - _reference(index.files[i], 16)).abs().max() <= 4 / 255  # two 8-bit levels
    mirrored = training_view(batch, "center", True, **kw)
    picks = sample_flips(5, 3, batch["index"])
    assert 0 < int(picks.sum()) < len(ids)
    assert torch.equal(mirrored[picks], centre[picks].flip(-1)) and torch.equal(mirrored[~picks], centre[~picks])
    rrc = training_view(batch, "random-resized", False, **kw)
    for row, i in zip(rrc, ids):
        (top, left, h, w), _ = train_boxes(5, 0, i, *sizes[i])
        # the loader resamples the box in place, so its outermost output pixels also weigh source pixels just
        # outside the box, which a crop-then-resize cannot see: the interior is compared
        diff = row - _reference(index.files[i], 16, (top, left, h, w))
        assert diff[:, 1:-1, 1:-1].abs().max() <= 4 / 255


def test_grad_clip_zero_leaves_the_gradient_as_it_is():
    """--grad-clip 0 (the default): the update is AdamW's on the raw gradient (improved-diffusion logs the norm,
    never clips); the returned norm is the gradient's L2 norm. Reference: torch's AdamW stepped by hand."""
    from diffaug_fast.train.denoiser_parts import optimizer_step

    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    ref = torch.nn.Linear(8, 4)
    ref.load_state_dict(model.state_dict())
    ema = torch.nn.Linear(8, 4).requires_grad_(False)
    x = torch.randn(16, 8) * 100  # a gradient norm far above 1
    opt, ref_opt = (torch.optim.AdamW(m.parameters(), lr=0.1, weight_decay=0.0) for m in (model, ref))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for _ in range(3):
        norm = optimizer_step(model(x).pow(2).mean(), model, ema, opt, scaler, 0.0, 0.9)
        ref_opt.zero_grad()
        ref(x).pow(2).mean().backward()
        want = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in ref.parameters()]))
        ref_opt.step()
        assert want > 10 and float(norm) == pytest.approx(float(want), rel=1e-5)
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=0)
