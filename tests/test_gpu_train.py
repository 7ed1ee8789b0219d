"""The trainer on the GPU through its CLI: a train step with --amp (fp16 autocast + GradScaler
on cuda; bf16 or float32 on CPU, see rn50.amp_dtype_for) and, where two GPUs exist, DDP over nccl.

The CLI is the interface here (train/rn50.py's internals are being refactored): each case runs a few
steps with --max-steps on a tiny synthetic set and reads the run's log.jsonl. The cpu case runs the same
path with the GPUs hidden, so the test is exercised on every machine.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import HAS_CUDA, NO_CUDA_REASON, TWO_GPUS

from diffaug_fast.data.synthetic import make_synthetic_dataset

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "train" / "rn50.py"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("data") / "syn", train_per_class=4, val_per_class=1,
                                  size=40, severities=(1,))


def _train(data, out, device: str, *extra, procs: int = 1):
    args = ["--data", str(data), "--out", str(out), "--run-name", "r", "--arch", "resnet18", "--epochs", "1",
            "--batch-size", "8", "--image-size", "32", "--resize-size", "36", "--unet-preset", "adm-tiny",
            "--workers", "1", "--no-progress", "--no-de-eval", "--log-every", "1", "--amp", *extra]
    launch = [sys.executable, str(TRAIN)] if procs == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}", str(TRAIN)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    res = subprocess.run([*launch, *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return [json.loads(line) for line in (Path(out) / "r" / "log.jsonl").read_text().splitlines()]


def test_amp_train_steps(data, tmp_path, device):
    log = _train(data, tmp_path / "amp", device.type, "--max-steps", "2")
    (settings,) = [r for r in log if r["event"] == "settings"]
    assert settings["device"].startswith(device.type) and settings["amp"] is True
    steps = [r for r in log if r["event"] == "step"]
    assert len(steps) == 2 and all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in steps), steps


@pytest.mark.gpu
@pytest.mark.skipif(not TWO_GPUS, reason=NO_CUDA_REASON if not HAS_CUDA else "DDP over nccl needs two CUDA GPUs; one here")
def test_ddp_nccl_two_gpus(data, tmp_path):
    log = _train(data, tmp_path / "ddp", "cuda", "--max-steps", "2", procs=2)
    (settings,) = [r for r in log if r["event"] == "settings"]
    assert settings["world_size"] == 2 and settings["device"].startswith("cuda")
    steps = [r for r in log if r["event"] == "step"]
    assert len(steps) == 2 and all(math.isfinite(r["loss"]) for r in steps)
