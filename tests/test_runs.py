"""Run folders: refusal of an existing run, the lock (held across processes, freed by SIGKILL), checkpoint
rotation and the fallback from a damaged last.pt to prev.pt."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
import torch

from diffaug_fast.runs import JsonLog, RunError, load_checkpoint_file, open_run


def test_existing_run_refused_unless_resume_or_overwrite(tmp_path):
    run = open_run(tmp_path / "r")
    run.save_checkpoint({"epoch": 1})
    JsonLog(run.path / "log.jsonl").write(event="x")
    run.close()
    with pytest.raises(RunError, match="already holds a run.*--resume.*--overwrite"):
        open_run(tmp_path / "r")
    resumed = open_run(tmp_path / "r", resume=True)
    assert resumed.load_checkpoint(say=lambda *_: None)[0]["epoch"] == 1
    resumed.close()
    fresh = open_run(tmp_path / "r", overwrite=True)
    assert not fresh.has_checkpoint() and not (fresh.path / "log.jsonl").exists()
    fresh.close()
    with pytest.raises(RunError, match="no checkpoint"):
        open_run(tmp_path / "r", resume=True)
    with pytest.raises(RunError, match="contradict"):
        open_run(tmp_path / "r", resume=True, overwrite=True)


def test_not_a_folder(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunError, match="not a folder"):
        open_run(tmp_path / "file")


HOLD = "import sys, time; from diffaug_fast.runs import open_run; r = open_run(sys.argv[1]); print('locked', flush=True); time.sleep(60)"


def test_lock_refuses_a_second_process_and_dies_with_its_holder(tmp_path):
    path = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunError, match=f"in use by another run \\(pid {holder.pid}\\)"):
            open_run(path, overwrite=True)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    deadline = time.time() + 10
    while True:  # the kernel frees a flock when its holder dies, SIGKILL included
        try:
            open_run(path, overwrite=True).close()
            break
        except RunError:
            assert time.time() < deadline, "lock outlived its killed holder"
            time.sleep(0.05)


def test_rotation_and_fallback_to_prev(tmp_path):
    run = open_run(tmp_path / "r")
    for epoch in range(3):
        run.save_checkpoint({"epoch": epoch, "w": torch.full((4,), float(epoch))})
    assert load_checkpoint_file(run.last)["epoch"] == 2 and load_checkpoint_file(run.prev)["epoch"] == 1
    data = bytearray(run.last.read_bytes())
    run.last.write_bytes(bytes(data[: len(data) // 2]))  # truncated latest checkpoint
    said = []
    ck, path = run.load_checkpoint(say=said.append)
    assert ck["epoch"] == 1 and path == run.prev
    assert "last.pt: not a readable checkpoint" in said[0]
    run.prev.write_bytes(b"garbage")
    with pytest.raises(RunError, match="no usable checkpoint"):
        run.load_checkpoint(say=lambda *_: None)
    run.close()


def test_stray_temp_files_removed_on_reopen(tmp_path):
    run = open_run(tmp_path / "r")
    run.save_checkpoint({"epoch": 0})
    (run.path / ".last.pt.abc123.tmp").write_bytes(b"partial")
    run.close()
    open_run(tmp_path / "r", resume=True).close()
    assert not list((tmp_path / "r").glob(".*.tmp"))


def test_foreign_checkpoint_message_names_file_without_unsafe_advice(tmp_path):
    bad = tmp_path / "x.pt"
    bad.write_bytes(b"\x00" * 100)
    with pytest.raises(RunError) as e:
        load_checkpoint_file(bad)
    assert str(bad) in str(e.value) and "weights_only=False" not in str(e.value)
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(RunError, match="not a checkpoint of ours"):
        load_checkpoint_file(tmp_path / "list.pt")
