"""The view bank under faults and misuse: a bank refuses what its views do not fit, a
damaged bank is named precisely (shard, image, view) and never trains silently, ``--out`` never writes into
a folder that is not a bank, a full disk is a message, and SIGKILL at random points of a build loses nothing.

Tiny throughout: adm-tiny with random weights, 8 images of 24 px, 16 px lossless views (verify's
recomputation is then exact), 2 views, 8 shards.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import oracle_model_and_diffusion, randomize_
from PIL import Image

import diffaug_fast as df
from diffaug_fast import bank as bk
from diffaug_fast.bank import BankError, BankReader, verify_bank
from diffaug_fast.data import build_loader, scan_dataset
from diffaug_fast.data.synthetic import make_synthetic_dataset

REPO = Path(__file__).resolve().parents[1]
SETTINGS = dict(image_size=16, resize_size=20, t_range=(0, None))


def _args(data, unet, out, *extra):
    return ["build", "--data", str(data), "--unet", str(unet), "--views", "2", "--out", str(out),
            "--image-size", "16", "--resize-size", "20", "--shard-images", "1", "--batch-size", "1",
            "--workers", "0", "--loader", "torch", "--lossless", "--no-progress", *extra]


def _start(setup, out) -> subprocess.Popen:
    """A build in its own process group (SIGKILL reaches its loader workers too), stdout piped."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "diffaug_fast.bank", *_args(setup["data"], setup["unet"], out)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env,
                            start_new_session=True)


def _wait_for_shard_phase(p: subprocess.Popen) -> float:
    """Read the build's stdout up to its "bank: ... to build" line (printed when the plan is written and
    shard work starts); returns that moment (perf_counter), or inf if the build ended first."""
    for line in p.stdout:
        if line.startswith("bank: "):
            return time.perf_counter()
    return float("inf")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    data = make_synthetic_dataset(root / "syn", train_per_class=2, val_per_class=1, size=24, severities=(1,))
    unet, _ = oracle_model_and_diffusion(df.get_preset("adm-tiny"))
    randomize_(unet, seed=3)
    torch.save(unet.state_dict(), root / "unet.pt")
    s = {"root": root, "data": data / "train", "unet": root / "unet.pt"}
    t0 = time.perf_counter()
    p = _start(s, root / "ref")
    t_shards = _wait_for_shard_phase(p)
    rest, err = p.communicate(timeout=300)
    s["startup_s"], s["shards_s"] = t_shards - t0, time.perf_counter() - t_shards
    assert p.returncode == 0, err[-3000:]
    s["ref"] = root / "ref"
    s["index"] = scan_dataset(s["data"], progress=False)
    return s


@pytest.fixture
def bank_copy(setup, tmp_path):
    out = tmp_path / "bank"
    shutil.copytree(setup["ref"], out)
    return out


@pytest.fixture
def inprocess():
    """build_bank in this process installs SIGTERM/SIGINT handlers: put pytest's back afterwards. One intra-op
    thread, as the reference build's subprocess (OMP_NUM_THREADS=1): a view's bytes depend on the thread count
    (the manifest records it for verify), so with the machine's default the shards differed from the reference."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield lambda *argv: bk.main(list(argv))
    torch.set_num_threads(threads)
    for s, h in saved.items():
        signal.signal(s, h)


def _shas(out: Path) -> list[str]:
    return [s["sha256"] for s in json.loads((out / "manifest.json").read_text())["shards"]]


def _temps(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*.tmp"))


# ---------------------------------------------------------------------------------------------------- item 3


def test_bank_refuses_other_settings_naming_the_first_differing_field(setup, tmp_path):
    ref, index, train = setup["ref"], setup["index"], setup["data"]
    ok = bk.open_for_training(ref, index, train, unet_path=setup["unet"], **SETTINGS)
    assert ok.views == 2 and ok.manifest["t_range"] == [0, 1000]
    cases = {"image_size": dict(SETTINGS, image_size=32), "resize_size": dict(SETTINGS, resize_size=24),
             "t_range": dict(SETTINGS, t_range=(100, None))}
    for field, kw in cases.items():
        with pytest.raises(BankError, match=rf"built with {field}=.*, training uses"):
            bk.open_for_training(ref, index, train, unet_path=setup["unet"], **kw)
    with pytest.raises(BankError, match="built with schedule="):
        bk.open_for_training(ref, index, train, unet_path=None, **SETTINGS,
                          schedule={"name": "cosine", "steps": 4000, "rescale_timesteps": True})
    other = tmp_path / "other.pt"
    sd = torch.load(setup["unet"], weights_only=True)
    sd["out.2.bias"] = sd["out.2.bias"] + 1
    torch.save(sd, other)
    with pytest.raises(BankError, match="another UNet checkpoint"):
        bk.open_for_training(ref, index, train, unet_path=other, **SETTINGS)


def test_bank_refuses_a_tree_with_the_same_names_and_other_pixels(setup, tmp_path):
    tree = tmp_path / "train"
    shutil.copytree(setup["data"], tree)
    victim = sorted((tree / "squares").iterdir())[1]
    Image.new("RGB", (24, 24), (200, 30, 30)).save(victim, format="JPEG")  # same name, other pixels
    index = scan_dataset(tree, progress=False, cache=False)
    # the name/label fingerprint, the only check banks used to have, cannot see it:
    assert bk.dataset_fingerprint(index, tree) == bk.dataset_fingerprint(setup["index"], setup["data"])
    with pytest.raises(BankError, match=rf"other pixels.*first: {victim}"):
        bk.open_for_training(setup["ref"], index, tree, unet_path=None, **SETTINGS)


def test_source_digest_is_size_and_three_samples(tmp_path):
    """Against hashlib directly: what is sampled is what the docstring says (an edit there is seen)."""
    import hashlib

    data = np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes()
    p = tmp_path / "f.jpg"
    p.write_bytes(data)
    n, s = len(data), 4096
    want = hashlib.blake2b(n.to_bytes(8, "little"), digest_size=8)
    for off in (0, n // 2 - s // 2, n - s):
        want.update(data[off: off + s])
    assert bk.source_digest(p) == want.digest()
    for pos in (10, n // 2, n - 1):  # a byte changed in any sampled region changes the digest
        changed = bytearray(data)
        changed[pos] ^= 1
        p.write_bytes(bytes(changed))
        assert bk.source_digest(p) != want.digest()


# ---------------------------------------------------------------------------------------------------- item 4


def _cli_verify(out: Path) -> str:
    """The CLI's verify, in process: it must end in SystemExit with a message (no other exception)."""
    with pytest.raises(SystemExit) as e:
        bk.main(["verify", str(out), "--no-recompute"])
    assert isinstance(e.value.code, str) and e.value.code.startswith("verify failed: ")
    return e.value.code


def test_deleted_and_truncated_shards_named_on_open_and_in_verify(bank_copy):
    (bank_copy / "shards" / "shard-00001.tar").unlink()
    tar2 = bank_copy / "shards" / "shard-00002.tar"
    tar2.write_bytes(tar2.read_bytes()[:3000])
    with pytest.raises(BankError, match=r"damaged: shard shard-00001.tar is missing; shard shard-00002.tar is "
                                        r"truncated: 3000 bytes"):
        BankReader(bank_copy)
    with pytest.raises(BankError) as e:
        verify_bank(bank_copy)
    msg = str(e.value)
    assert "shard-00001.tar is missing" in msg and "shard-00002.tar is truncated" in msg
    assert ".jpg" not in msg  # named by shard, not by source image
    cli = _cli_verify(bank_copy)
    assert "shard-00001.tar is missing" in cli and "shard-00002.tar is truncated" in cli


def test_verify_repair_then_build_restores_the_bank(bank_copy, setup, inprocess):
    shard = _flip_view_byte(bank_copy, 6, 1)
    (bank_copy / "shards" / "shard-00001.tar").unlink()
    tar2 = bank_copy / "shards" / "shard-00002.tar"
    tar2.write_bytes(tar2.read_bytes()[:3000])
    with pytest.raises(BankError, match=rf"repair: removed 3 damaged shard\(s\) \(shard-00001.tar, "
                                        rf"shard-00002.tar, {shard}\) and manifest.json"):
        verify_bank(bank_copy, repair=True)
    inprocess(*_args(setup["data"], setup["unet"], bank_copy))  # the original build command
    assert _shas(bank_copy) == _shas(setup["ref"])
    assert verify_bank(bank_copy, recompute=False)["checksums"] == "ok"


def test_garbage_manifest_is_one_line_not_a_traceback(bank_copy):
    (bank_copy / "manifest.json").write_bytes(b"\x00garbage{")
    with pytest.raises(BankError, match="manifest.json is unreadable or not JSON"):
        BankReader(bank_copy)
    assert "not JSON" in _cli_verify(bank_copy)


def _flip_view_byte(out: Path, image: int, view: int) -> str:
    m = BankReader(out).meta(image, view)
    tar = out / "shards" / f"shard-{m.shard:05d}.tar"
    data = bytearray(tar.read_bytes())
    data[m.offset + m.size // 2] ^= 0x55
    tar.write_bytes(bytes(data))
    return tar.name


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_flipped_byte_refused_or_made_online(bank_copy, setup, backend):
    if backend not in df.data.available_backends():
        pytest.skip(f"{backend} not installed")
    victim = 5
    v = bk.pick_view(7, 0, victim, 2)  # the view image 5 reads in epoch 0
    shard = _flip_view_byte(bank_copy, victim, v)
    with pytest.raises(BankError, match=rf"shard {shard}, image {victim}, view {v}: checksum mismatch"):
        BankReader(bank_copy).view_bytes(victim, v)
    reader = BankReader(bank_copy, on_bad="online")
    with pytest.warns(UserWarning, match=rf"made online instead.*image {victim}, view {v}"):
        assert reader.view_bytes(victim, v) is None
    good = BankReader(setup["ref"])
    loader = build_loader(setup["index"], "train", batch_size=4, backend=backend, crop_size=16, resize_size=20,
                          num_workers=0 if backend == "torch" else 1, seed=7,
                          extra_views={"bank": lambda e, i: reader.epoch_view_bytes(7, e, i)})
    seen = 0
    for batch in loader:
        for row, ok, i in zip(batch["bank"], batch["bank_ok"], batch["index"].tolist()):
            seen += 1
            assert bool(ok) == (i != victim)
            if i == victim:
                assert not row.any()  # zeros: the trainer makes this row online
            else:
                stored = np.asarray(Image.open(io.BytesIO(good.epoch_view_bytes(7, 0, i))).convert("RGB"))
                assert np.array_equal(row.numpy(), stored)
    assert seen == 8
    with pytest.raises(BankError, match=rf"shard {shard}, image {victim}, view {v}: checksum mismatch"):
        verify_bank(bank_copy)


def test_swapped_index_offsets_caught_by_default_verify(bank_copy):
    ipath = bank_copy / "shards" / "shard-00000.json"
    idx = json.loads(ipath.read_text())
    a, b = idx["members"][0], idx["members"][1]
    a["offset"], b["offset"] = b["offset"], a["offset"]
    ipath.write_text(json.dumps(idx))
    with pytest.raises(BankError, match="shard-00000.json was modified after the build"):
        BankReader(bank_copy)
    # the same swap written by a faulty writer (index hash recorded after the swap): the tar headers tell
    man = json.loads((bank_copy / "manifest.json").read_text())
    man["shards"][0]["index_sha256"] = hashlib.sha256(ipath.read_bytes()).hexdigest()
    (bank_copy / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(BankError) as e:
        verify_bank(bank_copy)  # the default arguments
    assert str(e.value).count("index offsets wrong") == 2


# ---------------------------------------------------------------------------------------------------- item 5


def test_out_that_is_not_a_bank_is_refused(setup, tmp_path, inprocess):
    d, u = setup["data"], setup["unet"]
    a_file = tmp_path / "file"
    a_file.write_text("mine")
    user = tmp_path / "user"
    user.mkdir()
    (user / "thesis.tex").write_text("mine")
    foreign_manifest = tmp_path / "fm"
    foreign_manifest.mkdir()
    (foreign_manifest / "manifest.json").write_text('{"name": "my package"}')
    foreign_plan = tmp_path / "fp"
    foreign_plan.mkdir()
    (foreign_plan / "plan.json").write_text('{"steps": [1, 2]}')
    for out, why in [(a_file, "is a file, not a folder"), (user, "not part of a DiffAug bank (thesis.tex)"),
                     (foreign_manifest, "manifest.json or shards but no plan.json"),
                     (foreign_plan, "plan.json is not a DiffAug bank plan")]:
        with pytest.raises(SystemExit, match=re.escape(why)):
            inprocess(*_args(d, u, out))
    assert a_file.read_text() == "mine" and sorted(os.listdir(user)) == ["thesis.tex"]
    assert json.loads((foreign_manifest / "manifest.json").read_text()) == {"name": "my package"}


def test_disk_check_counts_tar_and_index_overhead(setup, tmp_path, inprocess, monkeypatch):
    man = json.loads((setup["ref"] / "manifest.json").read_text())
    views = sum(m["size"] for s in man["shards"]
                for m in json.loads((setup["ref"] / "shards" / s["index"]).read_text())["members"])
    on_disk = sum(f.stat().st_size for f in setup["ref"].rglob("*") if f.is_file())
    assert on_disk > 1.3 * views  # tiny views: headers and indexes are a large share
    assert bk.bank_bytes_needed(views / 16, 16, 8) >= on_disk - (setup["ref"] / "manifest.json").stat().st_size
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage",
                        lambda p: real(p)._replace(free=int(1.2 * views)))  # views fit, the bank does not
    with pytest.raises(SystemExit, match="not enough disk"):
        inprocess(*_args(setup["data"], setup["unet"], tmp_path / "b"))


def test_enospc_mid_build_is_a_message_and_resumes(setup, tmp_path, inprocess, monkeypatch, capsys):
    out = tmp_path / "b"
    real_fsync = os.fsync

    def fsync(fd):
        if ".shard-00001.tar." in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(SystemExit, match=r"no space left .* writing shard 1 .*rerun the same command to resume"):
        inprocess(*_args(setup["data"], setup["unet"], out))
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert _temps(out) == []  # the failed write removed its temporary file
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["shard-00000.json", "shard-00000.tar"]
    # a SIGKILL runs no cleanup: temporaries of the bank's own files and of shards stay; the next run removes them
    (out / ".manifest.json.x1y2.tmp").write_bytes(b"partial")
    (out / "shards" / ".shard-00002.tar.999.tmp").write_bytes(b"partial")
    inprocess(*_args(setup["data"], setup["unet"], out))
    assert "resuming the build" in capsys.readouterr().out
    assert _temps(out) == [] and _shas(out) == _shas(setup["ref"])


# ---------------------------------------------------------------------------------------------------- kill


def test_sigkill_at_random_points_then_resume_equals_uninterrupted(setup, tmp_path):
    """SIGKILL (process group: loader workers too) at random points of a build, then resume, 4 times: once
    at a random time of the start (scan, source fingerprints, plan.json, sources.npy), three times at a
    random moment (0 to one shard's time) after a random number (1-6 of 8) of shards is done (mid-UNet, mid-write or between
    shards). The finished bank verifies clean, equals the uninterrupted build byte for byte, and no
    temporary file remains."""
    out = tmp_path / "killed"
    rng = random.Random(14)
    targets = [None, *sorted(rng.sample(range(1, 7), 3))]
    per_shard = setup["shards_s"] / 8
    progress = []

    def done():
        return len(list((out / "shards").glob("shard-*.json"))) if (out / "shards").exists() else 0

    for target in targets:
        p = _start(setup, out)
        if target is None:
            time.sleep(rng.uniform(0.5, setup["startup_s"]))
        else:
            while done() < target and p.poll() is None:
                time.sleep(0.005)
            time.sleep(rng.uniform(0, per_shard))
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        progress.append((done(), (out / "manifest.json").exists()))
    assert sum(not finished for _, finished in progress) >= 2  # kills that landed before the end
    p = _start(setup, out)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    assert _temps(out) == []
    assert _shas(out) == _shas(setup["ref"])
    for s in json.loads((out / "manifest.json").read_text())["shards"]:
        assert (out / "shards" / s["tar"]).read_bytes() == (setup["ref"] / "shards" / s["tar"]).read_bytes()
    res = verify_bank(out, sample=2)
    assert res["checksums"] == "ok" and res["min_psnr_db"] == float("inf")  # lossless: recomputed exactly
    print(f"(shard indexes, finished) after each kill: {progress}; uninterrupted build: start "
          f"{setup['startup_s']:.1f} s, shards {setup['shards_s']:.1f} s")


# ---------------------------------------------------------------------------------------------------- the trainer


def _train(setup, bank: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    data = setup["data"].parent
    cmd = [sys.executable, str(REPO / "train" / "rn50.py"), "--data", str(data), "--out", str(out), "--overwrite",
           "--run-name", "r", "--arch", "resnet18", "--epochs", "1", "--batch-size", "4", "--image-size", "16",
           "--resize-size", "20", "--loader", "torch", "--workers", "1", "--no-progress", "--no-de-eval",
           "--eval-every", "9", "--diffaug", f"bank:{bank}", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)


def test_trainer_refuses_mismatch_and_damaged_view_or_makes_it_online(bank_copy, setup, tmp_path):
    """Through train/rn50.py: a bank of other geometry is refused naming the field; a view failing its checksum
    stops training naming (shard, image, view), or with --bank-on-bad online is made online (the run trains)."""
    res = _train(setup, setup["ref"], tmp_path, "--resize-size", "24")
    assert res.returncode != 0 and "built with resize_size=20, training uses 24" in res.stderr
    assert "Traceback" not in res.stderr
    victim = 5
    v = bk.pick_view(0, 0, victim, 2)  # the view image 5 reads in epoch 0 under the trainer's default seed 0
    shard = _flip_view_byte(bank_copy, victim, v)
    res = _train(setup, bank_copy, tmp_path)
    assert res.returncode != 0, res.stdout[-2000:]
    assert f"shard {shard}, image {victim}, view {v}: checksum mismatch" in res.stderr
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    res = _train(setup, bank_copy, tmp_path, "--bank-on-bad", "online", "--unet", str(setup["unet"]))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "made online instead" in res.stderr
    steps = [json.loads(x) for x in (tmp_path / "r" / "log.jsonl").read_text().splitlines()]
    assert all(r["images_in_batch"] == 8 for r in steps if r["event"] == "step")  # clean + one view each
    assert [r["steps"] for r in steps if r["event"] == "summary"] == [2]  # both batches trained


def test_damaged_view_under_the_dali_loader_is_one_line_naming_the_flag(bank_copy, setup, tmp_path):
    """The default loader (DALI) reads stored views inside its pipeline: a view failing its checksum still
    stops training with one line naming (shard, image, view) and the flag --bank-on-bad online (it used to be
    that line under ~60 lines of DALI traceback, suggesting on_bad=online)."""
    if "dali" not in df.data.available_backends():
        pytest.skip("dali not installed")
    victim = 5
    v = bk.pick_view(0, 0, victim, 2)
    shard = _flip_view_byte(bank_copy, victim, v)
    res = _train(setup, bank_copy, tmp_path, "--loader", "dali")
    assert res.returncode != 0, res.stdout[-2000:]
    lines = [x for x in res.stderr.splitlines() if f"shard {shard}, image {victim}, view {v}: checksum mismatch" in x]
    assert len(lines) == 1 and "--bank-on-bad online" in lines[0], res.stderr[-3000:]
    assert "Traceback" not in res.stderr and "on_bad=online" not in res.stderr, res.stderr[-3000:]


# ---------------------------------------------------------------------------------------------------- build misuse


@pytest.mark.parametrize("extra,match", [
    (["--t-min", "500", "--t-max", "100"], "--t-min 500 --t-max 100: the views' t is drawn from [t_min, t_max)"),
    (["--t-min", "-1"], "0 <= t_min < t_max is needed"),
    (["--t-max", "5000"], "--t-max 5000: the UNet's schedule (linear) has 1000 steps"),
    (["--t-min", "1000"], "--t-min 1000: the views' t is drawn from [t_min, 1000), which is empty"),
    (["--image-size", "31", "--resize-size", "36"], "--image-size 31: the UNet downsamples 4x in total"),
    (["--image-size", "24"], "--image-size 24 --resize-size 20: "),
    (["--shard-images", "0"], "--shard-images 0: must be >= 1"),
    (["--data", "EMPTY"], "no class folders found"),
    (["--data", "NOIMAGES"], "no valid images found (0 images in 1 classes, 1 bad files; bad: "),
])
def test_build_misuse_is_one_line_before_anything_is_written(setup, tmp_path, inprocess, extra, match):
    """Bad build settings are refused with one line before --out is created: an inverted or too large t range
    used to build a bank with t outside it (or fail after plan.json, so the corrected rerun was refused as
    "t_range differ"), an image size the UNet cannot take and an empty --data were raw tracebacks."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "noimg" / "cls").mkdir(parents=True)
    (tmp_path / "noimg" / "cls" / "notes.txt").write_text("not an image\n")
    extra = [str(tmp_path / "empty") if x == "EMPTY" else str(tmp_path / "noimg") if x == "NOIMAGES" else x
             for x in extra]
    out = tmp_path / "bank"
    with pytest.raises(SystemExit) as e:
        inprocess(*_args(setup["data"], setup["unet"], out, *extra))
    msg = e.value.code
    assert isinstance(msg, str) and match in msg and "\n" not in msg, msg
    assert not out.exists()


def test_corrected_rerun_after_a_refused_t_range_builds_within_it(setup, tmp_path, inprocess):
    out = tmp_path / "bank"
    with pytest.raises(SystemExit, match="--t-max 5000"):
        inprocess(*_args(setup["data"], setup["unet"], out, "--t-max", "5000"))
    man = inprocess(*_args(setup["data"], setup["unet"], out, "--t-min", "100", "--t-max", "500"))
    assert man["t_range"] == [100, 500]
    reader = BankReader(out)
    ts = [reader.meta(i, v).t for i in range(reader.num_images) for v in range(reader.views)]
    assert all(100 <= t < 500 for t in ts)
    assert ts == [bk.view_t(0, i, v, (100, 500)) for i in range(reader.num_images) for v in range(reader.views)]
