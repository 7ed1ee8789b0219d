"""The training core every trainer here stands on (the classifier engine, denoiser training): the world of
processes, the rank-0 voice, the locked run folder, checkpoints saved and restored on every rank, stop
signals, and the DDP teardown. A trainer subclasses :class:`TrainLoop` and keeps its own step and schedule.

Stop: SIGTERM / SIGINT only set a flag; the loop checks it after each step on every rank at once
(``stop_requested``), saves, logs and exits with 128 + the signal (``interrupt``); the handlers that were
installed before are restored when the loop ends.

Test hooks: ``TrainLoop.hooks`` is a :class:`TrainHooks` whose methods do nothing; tests replace it (e.g. with
monkeypatch, or in a runner script) to act at named points, such as killing the process mid-checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
from pathlib import Path
from typing import NoReturn

import torch.distributed as dist

from ..distributed import World, any_rank, barrier, broadcast_object, init_distributed
from ..runs import JsonLog, RunDir, RunError, load_checkpoint_file, open_run

__all__ = ["TrainHooks", "TrainLoop", "read_log"]


class TrainHooks:
    """Points where a test may act; the defaults do nothing."""

    def after_backward(self, loop: TrainLoop, step: int) -> None:
        """Inside global step ``step`` (counted from 1): gradients computed, weights not yet updated."""

    def before_save(self, loop: TrainLoop, state: dict) -> None:
        """Rank 0, just before ``state`` is written as the run's checkpoint."""

    def before_eval(self, loop: TrainLoop, epoch: int) -> None:
        """Before the evaluation that follows ``epoch``."""


def read_log(path: Path | None) -> list[dict]:
    """A run's JSON-lines log; a line cut short by a kill is skipped."""
    recs = []
    if path is not None and path.exists():
        for line in path.read_text().splitlines():
            try:
                recs.append(json.loads(line))
            except ValueError:
                continue
    return recs


class TrainLoop:
    """What every trainer shares; ``world`` defaults to the torchrun environment (a world of one without it)."""

    hooks: TrainHooks = TrainHooks()

    def __init__(self, world: World | None = None):
        self.world = world or init_distributed()
        self.rank, self.size, self.device = self.world.rank, self.world.size, self.world.device
        self.is_main = self.rank == 0
        self.rundir: RunDir | None = None
        self.log = JsonLog(None)
        self._stop: int | None = None

    def say(self, *args, **kwargs) -> None:
        """print on rank 0 only."""
        if self.is_main:
            print(*args, **kwargs)

    # ------------------------------------------------------------------ collectives (none in a world of one)

    def sync(self) -> None:
        if self.size > 1:
            barrier()

    def share(self, obj):
        """rank 0's ``obj`` on every rank."""
        return broadcast_object(obj) if self.size > 1 else obj

    # ------------------------------------------------------------------ the run folder and checkpoints

    def open_folder(self, path: Path, *, resume: bool, overwrite: bool, reuse: bool = False) -> None:
        """Rank 0 creates/locks ``path`` (refusing an existing run unless resume/overwrite/reuse); the other
        ranks only read from it. Opens the run's log."""
        error = None
        if self.is_main:
            try:
                self.rundir = open_run(path, resume=resume, overwrite=overwrite, reuse=reuse)
            except RunError as e:
                error = str(e)
        error = self.share(error)
        if error:
            raise SystemExit(error)
        if not self.is_main:
            self.rundir = RunDir(path, None)
        self.log = JsonLog(path / "log.jsonl" if self.is_main else None)

    def save_state(self, state: dict) -> None:
        """``state`` as last.pt, atomically (the one it replaces kept as prev.pt) on rank 0; all ranks wait. A
        write that fails (a full disk) stops every rank with one line: what happened and that a rerun continues."""
        error = None
        if self.is_main:
            self.hooks.before_save(self, state)
            try:
                self.rundir.save_checkpoint(state)
            except RunError as e:
                error = str(e)
        error = self.share(error)  # a collective: every rank waits here for rank 0's write, as a barrier would
        if error:
            raise SystemExit(error)

    def load_state(self, map_location=None) -> tuple[dict, Path]:
        """The newest readable checkpoint (last.pt, else prev.pt), chosen by rank 0 and read on every rank."""
        path, error = None, None
        if self.is_main:
            try:
                _, path = self.rundir.load_checkpoint(map_location="cpu", say=self.say)
            except RunError as e:
                error = str(e)
        path, error = self.share((str(path) if path else None, error))
        if error:
            raise SystemExit(f"--resume: {error}")
        return load_checkpoint_file(path, map_location=map_location or self.device), Path(path)

    # ------------------------------------------------------------------ stopping

    @contextlib.contextmanager
    def stop_signals(self):
        """SIGTERM / SIGINT request a stop (checked after each step) while the block runs."""
        self._stop = None

        def request(signum, frame):
            self._stop = signum

        old = {sig: signal.signal(sig, request) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)

    def stop_requested(self) -> bool:
        """True on every rank when any rank received a stop signal (all stop at the same step)."""
        flag = self._stop is not None
        return any_rank(flag, self.device) if self.size > 1 else flag

    def interrupt(self, save, where: str, **log) -> NoReturn:
        """Save (``save()``), say where the run stopped, log it, and exit with 128 + the signal."""
        save()
        self.say(f"\ninterrupted: checkpoint saved at {where}; continue with --resume")
        self.log.write(event="interrupted", **log)
        self.teardown()
        sys.exit(128 + (self._stop or signal.SIGTERM))

    def teardown(self) -> None:
        if self.size > 1 and dist.is_initialized():
            dist.destroy_process_group()

    def close(self) -> None:
        """Free the run folder's lock (in-process callers may run again) and leave the process group."""
        if self.rundir is not None:
            self.rundir.close()
        self.teardown()
