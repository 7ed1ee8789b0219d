"""Fault injection for denoiser training: a short ``python -m diffaug_fast.train_denoiser`` run is SIGKILLed 6
times at points drawn by a seeded RNG (inside a training step, after backward; inside a checkpoint write, after
last.pt moved to prev.pt or half-way through writing the new file) and rerun with --resume after each kill.
Every rerun must continue (or start afresh when killed before its first checkpoint), the exported weights must
equal an uninterrupted run's bit for bit, and no temp file may remain. The kill points are TrainHooks installed
by tests/fault_runner.py."""

from __future__ import annotations

import json
import os
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
STEPS, SAVE_EVERY, KILLS = 8, 2, 6
CONFIG = {"model_channels": 32, "num_res_blocks": 1, "channel_mult": [1, 1], "attention_ds": [2], "num_heads": 2,
          "resblock_updown": True}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("data") / "syn", train_per_class=3, val_per_class=1,
                                  size=24, severities=(1,), ood_per_class=0) / "train"


def _launch(data, out, fault=None, resume=False):
    args = ["--data", str(data), "--config", json.dumps(CONFIG), "--image-size", "16", "--steps", str(STEPS),
            "--batch-size", "4", "--lr", "2e-3", "--held-out", "2", "--eval-every", "4", "--save-every",
            str(SAVE_EVERY), "--workers", "0", "--seed", "5", "--no-progress", "--no-amp", "--out", str(out)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(RUNNER), "denoiser", fault or "none", *args,
                           *(["--resume"] if resume else [])], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=600)


def kill_points(rng: np.random.Generator, n: int) -> list[str]:
    """n distinct fault points in the order the run reaches them: first inside step 1 (before any checkpoint:
    the rerun starts afresh), then n - 1 drawn from inside steps 2..8 and the checkpoint writes (steps 2, 4, 6
    and the final one at 8; alternately after the rotation and half-way through the new file)."""
    events = [((k, 0), f"step:{k}") for k in range(2, STEPS + 1)]
    events += [((k, 1), f"{('save', 'save-mid')[(k // SAVE_EVERY) % 2]}:{k}") for k in range(SAVE_EVERY, STEPS + 1,
                                                                                        SAVE_EVERY)]
    events.sort()
    return ["step:1"] + [events[i][1] for i in sorted(rng.choice(len(events), size=n - 1, replace=False))]


def test_sigkill_anywhere_then_resume_exports_the_uninterrupted_weights(data, tmp_path):
    points = kill_points(np.random.default_rng(3), KILLS)
    assert {p.split(":")[0] for p in points} == {"step", "save", "save-mid"}, points
    ref = _launch(data, tmp_path / "ref" / "model.pt")
    assert ref.returncode == 0, ref.stderr[-3000:]
    out = tmp_path / "cut" / "model.pt"
    for i, point in enumerate(points):
        res = _launch(data, out, fault=point, resume=i > 0)
        assert res.returncode == -signal.SIGKILL, (point, res.returncode, res.stdout[-2000:], res.stderr[-3000:])
        assert "Traceback" not in res.stderr, (point, res.stderr[-3000:])
        if i > 0:  # killed before the first checkpoint: --resume starts afresh; later ones continue
            assert "resumed from" in res.stdout or "has no checkpoint yet" in res.stdout, (point, res.stdout[-2000:])
    final = _launch(data, out, resume=True)
    assert final.returncode == 0, final.stderr[-3000:]
    a, b = torch.load(tmp_path / "ref" / "model.pt", weights_only=True), torch.load(out, weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.load(out.with_suffix(".run") / "last.pt", weights_only=True)["step"] == STEPS
    assert not [p.name for p in out.parent.rglob("*.tmp")]
