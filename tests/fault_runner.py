"""Run a training CLI with a fault installed: ``python tests/fault_runner.py rn50|denoiser POINT ARGS...``.

POINT is "none" or where to SIGKILL the process: "step:N" (inside global step N, after backward), "save:E" /
"save-mid:E" (in the checkpoint write at the end of epoch E, or for the denoiser at step E: after last.pt moved
to prev.pt / half-way through writing the new one), "eval:E" (before the evaluation after epoch E). The hooks
are the engine's TrainHooks; nothing in the package reads them from the environment.
"""

from __future__ import annotations

import io
import os
import signal
import sys

import torch

from diffaug_fast.train.core import TrainHooks, TrainLoop


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class FaultHooks(TrainHooks):
    def __init__(self, point: str):
        self.kind, _, value = point.partition(":")
        self.value = int(value) if value else -1

    def after_backward(self, loop, step: int) -> None:
        if self.kind == "step" and step == self.value:
            _kill()

    def before_save(self, loop, state: dict) -> None:
        at = state.get("epoch") if "epoch" in state else state.get("step")
        if self.kind in ("save", "save-mid") and at == self.value and state.get("position", 0) == 0:
            run = loop.rundir
            if run.last.exists():  # as a kill between the rotation and the new file's rename leaves it
                os.replace(run.last, run.prev)
            if self.kind == "save-mid":
                data = io.BytesIO()
                torch.save(state, data)
                with open(run.path / f".{run.last.name}.killed.tmp", "wb") as f:
                    f.write(data.getvalue()[: len(data.getvalue()) // 2])
            _kill()

    def before_eval(self, loop, epoch: int) -> None:
        if self.kind == "eval" and epoch == self.value:
            _kill()


def main() -> None:
    which, point, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
    if point != "none":
        TrainLoop.hooks = FaultHooks(point)
    if which == "rn50":
        from diffaug_fast.train.recipes.rn50 import main as run
    else:
        from diffaug_fast.train.denoiser import main as run
    run(argv)


if __name__ == "__main__":
    main()
