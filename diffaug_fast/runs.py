"""Run directories that lose nothing and mix nothing: one owner at a time, checkpoints kept in two
generations, logs appended one JSON line per event.

Every training entry point (the classifier trainer, the denoiser trainer, recipes on top of them) opens
its output folder through :func:`open_run` and writes checkpoints with :meth:`RunDir.save_checkpoint`:

- an existing run is refused unless the caller resumes it or asked to overwrite it;
- the folder is locked (``fcntl.flock`` on ``RUN_LOCK``) while a process uses it: a second process is
  refused with the holder's pid; the kernel drops the lock when the holder dies, even by SIGKILL, so a
  killed run never leaves a stale lock behind;
- ``last.pt`` is replaced atomically and the previous one is kept as ``prev.pt``: a damaged latest file
  costs at most one checkpoint interval (:meth:`RunDir.load_checkpoint` falls back to it and says so);
- temp files of a write interrupted by a kill (``.last.pt.*.tmp``) are removed when the run is reopened.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import time
from pathlib import Path

import torch

from .io import atomic_save

__all__ = ["RunError", "RunDir", "open_run", "JsonLog", "load_checkpoint_file"]

LOCK_NAME = "RUN_LOCK"
LAST, PREV = "last.pt", "prev.pt"


class RunError(RuntimeError):
    """A run folder that cannot be used as asked; the message says why and what to do."""


class JsonLog:
    """Appends one JSON object per line (``time`` added); ``path=None`` writes nothing (non-zero ranks)."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path) if path is not None else None

    def write(self, **rec) -> None:
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps({"time": time.time(), **rec}, default=str) + "\n")


def load_checkpoint_file(path: str | os.PathLike, map_location="cpu") -> dict:
    """``torch.load(weights_only=True)`` with one readable error for a damaged or foreign file (torch's own
    message advises ``weights_only=False``, which would execute whatever a damaged or foreign file holds)."""
    path = Path(path)
    try:
        ck = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise RunError(f"{path}: no such checkpoint") from None
    except Exception as e:  # truncated zip, flipped bytes, a pickle with code in it, not a torch file at all
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RunError(f"{path}: not a readable checkpoint ({type(e).__name__}: {first[:200]})") from None
    if not isinstance(ck, dict):
        raise RunError(f"{path}: not a checkpoint of ours (holds a {type(ck).__name__}, expected a dict)")
    return ck


class RunDir:
    """One run's folder, locked by this process for its lifetime (``close()`` or process exit frees it)."""

    def __init__(self, path: Path, lock_fd: int | None):
        self.path = path
        self._lock_fd = lock_fd

    @property
    def last(self) -> Path:
        return self.path / LAST

    @property
    def prev(self) -> Path:
        return self.path / PREV

    def has_checkpoint(self) -> bool:
        return self.last.exists() or self.prev.exists()

    def save_checkpoint(self, state: dict) -> Path:
        """Write ``last.pt`` atomically, keeping the one it replaces as ``prev.pt``."""
        if self.last.exists():
            os.replace(self.last, self.prev)  # a kill between the two renames leaves prev.pt: still resumable
        return atomic_save(state, self.last)

    def load_checkpoint(self, map_location="cpu", say=print) -> tuple[dict, Path]:
        """The newest readable checkpoint: ``last.pt``, else ``prev.pt`` (saying why ``last.pt`` was skipped)."""
        errors = []
        for path in (self.last, self.prev):
            if not path.exists():
                continue
            try:
                return load_checkpoint_file(path, map_location), path
            except RunError as e:
                errors.append(str(e))
                say(f"warning: {e}; trying the previous checkpoint")
        if not errors:
            raise RunError(f"{self.path}: no checkpoint to resume from ({LAST} or {PREV})")
        raise RunError("no usable checkpoint: " + "; ".join(errors))

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None


def _lock(path: Path) -> int:
    fd = os.open(path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
            raise RunError(f"{path} is in use by another run (pid {holder}); wait for it, or choose another "
                           "--run-name") from None
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def open_run(path: str | os.PathLike, *, resume: bool = False, overwrite: bool = False, reuse: bool = False,
             lock: bool = True) -> RunDir:
    """Create or reopen a run folder and lock it.

    resume: the folder must hold a checkpoint (continue it). overwrite: an existing run is deleted first.
    reuse: an existing run is silently started afresh in place (the embedded demo, re-runnable by design).
    Otherwise a folder that already holds a run (a checkpoint or a log) is refused. ``lock=False`` for
    processes that only read (non-zero ranks); rank 0 holds the lock for the run.
    """
    if resume and overwrite:
        raise RunError("--resume and --overwrite contradict each other: choose one")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RunError(f"{path} exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunError(f"cannot create the run folder {path}: {e.strerror}") from None
    if not os.access(path, os.W_OK):
        raise RunError(f"the run folder {path} is not writable")
    fd = _lock(path) if lock else None
    try:
        existing = (path / LAST).exists() or (path / PREV).exists() or (path / "log.jsonl").exists()
        if resume and not ((path / LAST).exists() or (path / PREV).exists()):
            raise RunError(f"--resume: no checkpoint in {path} ({LAST} or {PREV})")
        if existing and not (resume or reuse):
            if not overwrite:
                raise RunError(f"{path} already holds a run; continue it with --resume, or start it afresh with "
                               "--overwrite (its checkpoints and log are deleted)")
        if existing and (overwrite or (reuse and not resume)):
            for child in path.iterdir():
                if child.name == LOCK_NAME:
                    continue
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        for stray in path.glob(".*.tmp"):  # an atomic write killed before its rename
            stray.unlink(missing_ok=True)
    except BaseException:
        if fd is not None:
            os.close(fd)
        raise
    return RunDir(path, fd)
