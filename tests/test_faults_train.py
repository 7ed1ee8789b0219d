"""Fault injection: a short train/rn50.py run is SIGKILLed 20 times at points drawn by a seeded
RNG (inside a training step, inside the checkpoint write before and in the middle of writing last.pt, inside
the evaluation after an epoch) and resumed after each kill. Every resume must succeed, the final weights
must equal an uninterrupted run's bit for bit, every epoch's evaluation must be in the log, and no temp
file may remain. The kill points are TrainHooks installed by tests/fault_runner.py."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diffaug_fast.data.synthetic import make_synthetic_dataset

REPO = Path(__file__).resolve().parents[1]
RUNNER = Path(__file__).with_name("fault_runner.py")
EPOCHS, STEPS_PER_EPOCH, KILLS = 6, 3, 20


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = make_synthetic_dataset(tmp_path_factory.mktemp("data") / "syn", train_per_class=6, val_per_class=2,
                                  size=40, severities=(2,))
    shutil.rmtree(root / "val-c")
    return root


def _launch(data, out, fault=None, resume=False):
    args = ["--data", str(data), "--out", str(out), "--run-name", "r", "--arch", "resnet18", "--epochs", str(EPOCHS),
            "--batch-size", "8", "--image-size", "32", "--resize-size", "36", "--lr", "0.05", "--unet-preset",
            "adm-tiny", "--diffaug-fraction", "0.5", "--loader", "torch", "--workers", "0", "--no-progress",
            "--no-de-eval", "--seed", "3", "--log-every", "1"] + (["--resume"] if resume else [])
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(RUNNER), "rn50", fault or "none", *args], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=600)


def kill_points(rng: np.random.Generator, n: int) -> list[str]:
    """n distinct fault points in the order the run reaches them: steps 1..18, and per epoch E the checkpoint
    write (odd E: after last.pt moved to prev.pt; even E: half-way through writing the new one) and the
    evaluation after it."""
    events = [((k, 0), f"step:{k}") for k in range(1, EPOCHS * STEPS_PER_EPOCH + 1)]
    for e in range(1, EPOCHS + 1):
        events.append(((e * STEPS_PER_EPOCH, 1), f"{('save-mid', 'save')[e % 2]}:{e}"))
        events.append(((e * STEPS_PER_EPOCH, 2), f"eval:{e}"))
    events.sort()
    chosen = sorted(rng.choice(len(events), size=n, replace=False))
    return [events[i][1] for i in chosen]


def test_sigkill_anywhere_then_resume_gives_the_uninterrupted_weights(data, tmp_path):
    points = kill_points(np.random.default_rng(2024), KILLS)
    assert {p.split(":")[0] for p in points} == {"step", "save", "save-mid", "eval"}
    ref = _launch(data, tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr[-3000:]
    out = tmp_path / "cut"
    for i, point in enumerate(points):
        res = _launch(data, out, fault=point, resume=i > 0)
        assert res.returncode == -signal.SIGKILL, (point, res.returncode, res.stdout[-2000:], res.stderr[-3000:])
        assert "Traceback" not in res.stderr, (point, res.stderr[-3000:])
        if i > 0:  # killed before the first checkpoint: --resume starts over, later ones continue
            assert "resumed from" in res.stdout or "has no checkpoint yet" in res.stdout, (point, res.stdout[-2000:])
    final = _launch(data, out, resume=True)
    assert final.returncode == 0, final.stderr[-3000:]
    a = torch.load(tmp_path / "ref" / "r" / "last.pt", weights_only=True)
    b = torch.load(out / "r" / "last.pt", weights_only=True)
    assert (b["epoch"], b["position"], b["total_steps"]) == (EPOCHS, 0, EPOCHS * STEPS_PER_EPOCH)
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    recs = [json.loads(x) for x in (out / "r" / "log.jsonl").read_text().splitlines()]
    assert {r["epoch"] for r in recs if r["event"] == "eval"} == set(range(1, EPOCHS + 1))
    assert recs[-1]["event"] == "summary"
    assert not [p.name for p in (out / "r").iterdir() if p.name.endswith(".tmp")]
